"""Training-time evaluation: a tiny run with evaluation and BLEU on reports the validation loss,
perplexity, BLEU and chrF that a direct computation on its saved checkpoints gives (the loss from
the model's logits and numpy's cross-entropy, BLEU and chrF from decoding the prompts afresh)."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import sacrebleu

from configs import tiny as tiny_config
from ulskip_jax import checkpoint as ckpt_lib
from ulskip_jax import batching, corpora
from ulskip_jax import decode, plan_layers, train_lib
from ulskip_jax import testing as tiny

RATIO = 2.0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  c = tiny_config.get_config()
  c.num_steps, c.batch_size, c.data.max_examples, c.data.seq_len = 4, 4, 40, 48
  c.optim.lr, c.checkpoint.every = 1e-2, 2
  c.skip.ratio = RATIO
  c.eval_every, c.eval_batches, c.eval_bleu_examples, c.eval_max_new_tokens = 2, 2, 4, 8
  workdir = tmp_path_factory.mktemp("eval_run")
  with contextlib.redirect_stdout(io.StringIO()) as out:
    last = train_lib.train_and_evaluate(c, str(workdir))
  # The log names the plan its evaluation runs (the tests below recompute with this one).
  assert f"plan r2: {plan_layers(4, RATIO)}\n" in out.getvalue(), out.getvalue()
  logged = [json.loads(line) for line in (workdir / "log.jsonl").read_text().splitlines()]
  evals = {m["step"]: m for m in logged if "val_loss/r2" in m}
  assert sorted(evals) == [2, 4]  # every eval_every steps
  assert all(last[k] == evals[4][k] for k in evals[4] if "/" in k)
  return c, workdir, evals


STEPS = [2, 4]


@pytest.mark.parametrize("step", STEPS)
def test_val_loss_is_the_cross_entropy_of_the_validation_batches(run, step):
  c, workdir, evals = run
  model, tok = ckpt_lib.load_for_inference(str(workdir), step)
  pairs = corpora.load_pairs(c.data)["validation"]
  skip = plan_layers(4, RATIO).skipped
  call = tiny.jit_call(model)
  batches = batching.Batcher.from_pairs(tok, c.data.template, pairs, c.batch_size, c.data.seq_len,
                                        pack=c.data.pack, shuffle=False, repeat=False)
  nll, tokens = 0.0, 0
  for _, b in zip(range(c.eval_batches), batches):
    logits = np.asarray(call(b["tokens"], skip=skip, positions_BT=b["positions"],
                             segment_ids_BT=b["segment_ids"], full_depth_BT=b["full_depth"]),
                        np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    target_logp = np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
    nll -= np.sum(target_logp * b["loss_mask"])
    tokens += int(np.sum(b["loss_mask"]))
  assert tokens > 0
  assert evals[step]["val_loss/r2"] == pytest.approx(nll / tokens, rel=1e-5)
  assert evals[step]["val_ppl/r2"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_bleu_and_chrf_are_those_of_the_decoded_prompts(run):
  c, workdir, evals = run
  pairs = corpora.load_pairs(c.data)["validation"][:c.eval_bleu_examples]
  refs = [p["target"] for p in pairs]
  bleus = []
  for step in STEPS:
    model, tok = ckpt_lib.load_for_inference(str(workdir), step)
    # Long sources are cut to seq_len as in training (test_data checks eval_prompts).
    prompts = batching.eval_prompts(tok, c.data.template, pairs, c.data.seq_len)[0]
    ids, _ = decode.generate(model, prompts, skip=plan_layers(4, RATIO).skipped, mode="paper",
                             max_new_tokens=c.eval_max_new_tokens, eos_id=tok.eos_id,
                             pad_id=tok.pad_id)
    hyps = [tok.decode(row).strip() for row in ids]
    chrf, bleu = (sacrebleu.corpus_chrf(hyps, [refs]).score,
                  sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert evals[step]["chrf/r2"] == pytest.approx(chrf, abs=1e-9)
    assert evals[step]["bleu/r2"] == pytest.approx(bleu, abs=1e-9)
    bleus.append(bleu)
  assert max(bleus) > 0  # a wrong pairing of hypotheses and references shows
