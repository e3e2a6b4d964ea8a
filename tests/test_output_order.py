"""Output order: infer.py sorts prompts by length into static batches (--static-batches, beam
search), and every output line must still be its own prompt's, which each prompt decoded alone
gives (greedy decoding and beam search are batch-invariant)."""

from __future__ import annotations

import pytest

import infer
from ulskip_jax import testing as tiny
from ulskip_jax import decode, hf

# Lengths out of order, so that the length-sorted order differs from the input order everywhere.
INPUTS = ["w5 w6 w7 w8 w9 w10 w11", "w4", "w12 w13 w14", "w30 w31 w32 w33 w34", "w20 w21"]
MAX_NEW = 6


pytestmark = pytest.mark.usefixtures("fast_engine_compile")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama")
  tiny.save_hf_model("llama", path, seed=1)
  tiny.save_tiny_tokenizer(path)
  return str(path)


@pytest.mark.parametrize("flags,kw", [(["--static-batches"], {}),
                                      (["--num-beams", "2"], dict(num_beams=2))])
def test_each_line_is_its_prompt_decoded_alone(checkpoint, tmp_path, capsys, flags, kw):
  inputs, output = tmp_path / "in.txt", tmp_path / "out.txt"
  inputs.write_text("".join(text + "\n" for text in INPUTS))
  code = infer.main(["--checkpoint", checkpoint, "--input", str(inputs), "--output", str(output),
                     "--batch-size", "2", "--max-new-tokens", str(MAX_NEW), "--no-progress",
                     *flags])
  assert code == 0, capsys.readouterr().err
  model, tokenizer = hf.from_pretrained(checkpoint)
  alone = [" ".join(decode.generate_text(model, tokenizer, [text], max_new_tokens=MAX_NEW,
                                         **kw)[0][0].split()) for text in INPUTS]
  assert len(set(alone)) == len(INPUTS)  # distinct outputs: a line in the wrong place shows
  assert output.read_text().splitlines() == alone
