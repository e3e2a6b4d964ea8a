"""Chat-format prompts: what training feeds the model is exactly what inference feeds it.

The tokenizer here is a ChatML one like SmolLM2-Instruct's (bos = <|im_start|>, pad = eos =
<|im_end|>, a system turn added by the template), so every special-token subtlety of a real
instruct tokenizer is present: a model fine-tuned on a few examples must decode what it was
trained on through infer.py on its workdir, and the prompt ids of training and inference must be
equal token for token.
"""

from __future__ import annotations

import pathlib

import pytest
import tokenizers
import transformers

import infer
from ulskip_jax import testing as tiny
from ulskip_jax import batching, decode, train_lib
from ulskip_jax.tokenizer import Tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
from configs import tiny as tiny_config  # noqa: E402

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEMPLATE = "Rewrite in modern English.\nKJV: {source}"
PAIRS = [
    dict(source="Jesus wept.", target="Jesus wept."),
    dict(source="And God said, Let there be light: and there was light.",
         target="God said, \"Let there be light,\" and there was light."),
    dict(source="The LORD is my shepherd; I shall not want.",
         target="Yahweh is my shepherd: I shall lack nothing."),
    dict(source="In the beginning God created the heaven and the earth.",
         target="In the beginning, God created the heavens and the earth."),
]


def chatml_tokenizer() -> transformers.PreTrainedTokenizerFast:
  texts = [p[k] for p in PAIRS for k in ("source", "target")] + [TEMPLATE, "system user assistant"]
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  bpe.train_from_iterator(texts, trainer)
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
      pad_token="<|im_end|>", unk_token="<|endoftext|>", clean_up_tokenization_spaces=False)
  tok.chat_template = CHATML
  return tok


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
  """A tiny random Llama with the ChatML tokenizer: what `model.init_from` points at."""
  path = tmp_path_factory.mktemp("chat_base")
  hf_tok = chatml_tokenizer()
  model = tiny.hf_model("llama", num_layers=4)
  model.resize_token_embeddings(len(hf_tok))
  model.config.bos_token_id, model.config.eos_token_id = hf_tok.bos_token_id, hf_tok.eos_token_id
  model.config.pad_token_id = hf_tok.pad_token_id
  model.save_pretrained(path)
  hf_tok.save_pretrained(path)
  return path


def test_chat_prompt_and_target_layout(base_folder):
  tok = Tokenizer.from_pretrained(str(base_folder), chat=True)
  (prompt, target), = batching.encode_examples(tok, TEMPLATE, PAIRS[:1], 128)[0]
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(base_folder))
  want = hf_tok.apply_chat_template([{"role": "user", "content": TEMPLATE.format(**PAIRS[0])}],
                                    tokenize=False, add_generation_prompt=True)
  assert prompt == hf_tok(want, add_special_tokens=False)["input_ids"]
  assert prompt.count(tok.bos_id) == 3  # system, user, assistant turns; no extra bos
  assert target == tok.encode(PAIRS[0]["target"]) + [tok.eos_id]  # no leading space
  # Training prompts are what inference sends: the same ids token for token.
  assert decode.encode_prompt(tok, TEMPLATE.format(**PAIRS[0])) == prompt
  assert decode.encode_prompt(hf_tok, TEMPLATE.format(**PAIRS[0]), chat=True) == prompt
  # A truncated source keeps the whole chat frame around it.
  (short, _), = batching.encode_examples(tok, TEMPLATE, PAIRS[1:2], len(prompt) + 4)[0]
  head = tok.encode(tok.prompt_template(TEMPLATE).split("{source}")[0])
  tail = tok.encode(tok.prompt_template(TEMPLATE).split("{source}")[1])
  assert short[:len(head)] == head and short[-len(tail):] == tail


def test_chat_without_a_template_is_one_line(tmp_path):
  tiny.save_tiny_tokenizer(tmp_path)
  with pytest.raises(ValueError, match="no chat template"):
    Tokenizer.from_pretrained(str(tmp_path), chat=True)


def test_fine_tuned_chat_model_decodes_what_it_was_trained_on(base_folder, tmp_path):
  c = tiny_config.get_config()
  c.model.init_from = str(base_folder)
  c.data.chat, c.data.template, c.data.seq_len = True, TEMPLATE, 96
  c.num_steps, c.batch_size, c.optim.lr, c.optim.warmup_steps = 60, 4, 1e-2, 5
  c.optim.final_lr_fraction, c.optim.weight_decay = 1.0, 0.0
  c.skip.ratio, c.data.pack, c.checkpoint.every = 2.0, False, 60
  workdir = tmp_path / "run"
  trainer = train_lib.Trainer(c, str(workdir))
  # Memorise exactly these pairs (the Trainer's own encoding, so the chat format of training).
  trainer.batcher = batching.Batcher.from_pairs(trainer.tok, TEMPLATE, PAIRS, 4, 96, pack=False)
  state = trainer.restore_or_init()
  for step in range(c.num_steps):
    state, metrics = trainer.step(state, next(trainer.batcher), step)
  assert float(metrics["loss"]) < 0.05
  trainer.save(state, c.num_steps, force=True)
  trainer.ckpt.close()

  (tmp_path / "in.txt").write_text("".join(p["source"] + "\n" for p in PAIRS))
  out = tmp_path / "out.txt"
  assert infer.main(["--checkpoint", str(workdir), "--input", str(tmp_path / "in.txt"),
                     "--output", str(out), "--ratio", "2", "--max-new-tokens", "32",
                     "--no-progress"]) == 0
  assert out.read_text().splitlines() == [p["target"] for p in PAIRS]
