"""infer.py on a tiny Hugging Face folder: outputs, per-ratio files, metrics JSON, errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import infer
from ulskip_jax import testing as tiny
from ulskip_jax import decode, hf, plan_layers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUTS = ["w4 w5 w6", "w4", "w5 w6 w7 w8 w9 w10 w11", "w12 w13", "w7 w7 w7 w7", "w20 w21 w22",
          "w30"]


pytestmark = pytest.mark.usefixtures("fast_engine_compile")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama")
  tiny.save_hf_model("llama", path, seed=1)
  tiny.save_tiny_tokenizer(path)
  return str(path)


@pytest.fixture
def files(tmp_path):
  def write(name, lines):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)
  return write


def run_main(capsys, *argv):
  code = infer.main([str(a) for a in argv] + ["--no-progress"])
  out, err = capsys.readouterr()
  return code, out, err


def test_one_line_per_input_per_ratio_in_order(checkpoint, files, tmp_path, capsys):
  inputs = files("in.txt", INPUTS)
  refs = files("refs.txt", ["w4 w5"] * len(INPUTS))
  output, metrics = tmp_path / "out.txt", tmp_path / "m.json"
  code, out, err = run_main(capsys, "--checkpoint", checkpoint, "--input", inputs, "--output",
                            output, "--ratio", "1,2", "--batch-size", 3, "--max-new-tokens", 6,
                            "--references", refs, "--metrics-out", metrics)
  assert code == 0, err
  model, tokenizer = hf.from_pretrained(checkpoint)
  summary = json.loads(metrics.read_text())
  assert [r["label"] for r in summary["runs"]] == ["r1", "r2"]
  for run, ratio in zip(summary["runs"], (1, 2)):
    lines = (tmp_path / f"out.r{ratio}.txt").read_text().split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(INPUTS)
    # Each line is what its prompt gives alone (greedy decoding is batch-invariant).
    alone = [decode.generate_text(model, tokenizer, [text], ratio=ratio, max_new_tokens=6)[0][0]
             for text in INPUTS]
    assert lines[:-1] == [" ".join(a.split()) for a in alone]
    for field in ("output", "skip", "kept_layers", "prompt_tokens", "generated_tokens", "wall_s",
                  "compile_s", "cache_bytes", "generated_tokens_per_s", "total_tokens_per_s",
                  "bleu", "chrf"):
      assert field in run, field
    assert run["kept_layers"] == 4 // ratio and run["prompt_tokens"] > 0
    # What it prints and records is the plan the lines above were decoded with.
    plan = plan_layers(4, ratio)
    assert f"r{ratio}: {plan}, " in out and "tok/s" in out and "BLEU" not in err
    assert (run["plan"]["kept"], run["plan"]["strategy"]) == (list(plan.kept), "uls")
  assert summary["runs"][1]["cache_bytes"] < summary["runs"][0]["cache_bytes"]
  assert not output.exists()  # several ratios: only the per-ratio files


def test_jsonl_template_single_ratio_and_rouge(checkpoint, files, tmp_path, capsys):
  records = [json.dumps(dict(src=text, lang="w50")) for text in INPUTS[:3]]
  inputs = files("in.jsonl", records)
  refs = files("refs.txt", ["w4 w5", "w6", "w7 w8"])
  output, metrics = tmp_path / "out.txt", tmp_path / "m.json"
  code, out, err = run_main(capsys, "--checkpoint", checkpoint, "--input", inputs, "--output",
                            output, "--input-field", "src", "--template", "{lang} w51\\n{source}",
                            "--ratio", "2", "--mode", "everywhere", "--max-new-tokens", 5,
                            "--num-beams", 2, "--no-repeat-ngram-size", 3, "--references", refs,
                            "--metric", "rouge", "--metrics-out", metrics)
  assert code == 0, err
  assert len(output.read_text().splitlines()) == 3
  (run,) = json.loads(metrics.read_text())["runs"]
  assert {"rouge1", "rouge2", "rougeL"} <= set(run) and run["skip"] == [1, 2]


@pytest.mark.parametrize("case,message", [
    ("missing_checkpoint", "is not a directory"),
    ("broken_checkpoint", "config.json is not valid JSON"),
    ("ratio_out_of_range", "ratio=9.0 is out of range"),
    ("empty_input", "is empty"),
    ("missing_input", "cannot read input"),
    ("prompt_too_long", "tokens; with max_new_tokens=8"),
    ("unknown_template_field", "template field {lang} is unknown"),
    ("references_mismatch", "references"),
    ("ratio_and_skip", "--ratio and --skip both given"),
])
def test_bad_input_is_one_line_and_exit_code_2(checkpoint, files, tmp_path, capsys, case,
                                               message):
  args = dict(checkpoint=checkpoint, input=files("in.txt", INPUTS), output=tmp_path / "o.txt",
              ratio="2", max_new_tokens=8)
  if case == "missing_checkpoint":
    args["checkpoint"] = tmp_path / "nowhere"
  elif case == "broken_checkpoint":
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    args["checkpoint"] = tmp_path / "broken"
  elif case == "ratio_out_of_range":
    args["ratio"] = "9"
  elif case == "empty_input":
    args["input"] = files("empty.txt", [])
  elif case == "missing_input":
    args["input"] = tmp_path / "none.txt"
  elif case == "prompt_too_long":
    args["input"] = files("long.txt", ["w5 " * 125])
  elif case == "unknown_template_field":
    args["template"] = "{lang}: {source}"
  elif case == "references_mismatch":
    args["references"] = files("refs.txt", ["w5"])
  elif case == "ratio_and_skip":
    args["skip"] = "1,2"
  argv = [x for k, v in args.items() for x in ("--" + k.replace("_", "-"), v)]
  code, _, err = run_main(capsys, *argv)
  assert code == 2
  assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_script_exits_2_without_traceback(files, tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "infer.py"), "--checkpoint", str(tmp_path / "none"),
       "--input", files("in.txt", INPUTS), "--output", str(tmp_path / "o.txt")],
      capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: checkpoint")


def test_parse_speculative():
  assert infer.parse_speculative("draft_ratio=2,k=4") == dict(draft_ratio=2.0, num_draft_tokens=4)
  assert infer.parse_speculative("draft_skip=1-2, num_draft_tokens=3,draft_cache=shared") == dict(
      draft_skip=(1, 2), num_draft_tokens=3, draft_cache="shared")
  for text, message in [("ratio=2", "'ratio' is unknown"), ("k=four", "'k=four' is invalid"),
                        ("draft_ratio", "'draft_ratio' is invalid")]:
    with pytest.raises(ValueError, match=re.escape(message)):
      infer.parse_speculative(text)


def test_attention_impl_reaches_the_model(checkpoint, files, tmp_path, capsys, monkeypatch):
  """--attention-impl xla: the decoder's attention runs JAX's fused call's XLA path, and the
  lines are the einsum run's; cuDNN on a model it cannot compute is one line, exit code 2."""
  from ulskip_jax import attention
  inputs = files("in.txt", INPUTS[:3])
  args = ["--checkpoint", checkpoint, "--input", inputs, "--ratio", "2", "--max-new-tokens", 6]
  code, _, err = run_main(capsys, *args, "--output", tmp_path / "einsum.txt")
  assert code == 0, err
  ran = []
  resolve = attention.resolve
  monkeypatch.setattr(attention, "resolve", lambda cfg: ran.append(resolve(cfg)) or ran[-1])
  code, _, err = run_main(capsys, *args, "--output", tmp_path / "xla.txt", "--attention-impl",
                          "xla")
  assert code == 0, err
  assert ran and {impl for impl, _ in ran} == {"xla"}, ran
  assert (tmp_path / "xla.txt").read_text() == (tmp_path / "einsum.txt").read_text()
  code, _, err = run_main(capsys, *args, "--output", tmp_path / "cudnn.txt", "--attention-impl",
                          "cudnn")
  assert code == 2 and err.count("\n") == 1, err
  assert err.startswith("error: --attention-impl cudnn: attention_impl='cudnn' cannot compute"), err
