"""Planted bugs, one at a time, on a temporary copy of the repo: does the test meant to catch each
one fail? Run by hand or nightly, not by the suite (each mutation runs its test files again).

  python benchmarks/mutations.py                  # every mutation, then the summary
  python benchmarks/mutations.py --only NAME ...  # some of them (names below; prefixes work)
  python benchmarks/mutations.py --list
  python benchmarks/mutations.py --write benchmarks/results/mutations.md

A mutation is a text patch (an exact string, found exactly once, replaced) in one file of the
working tree's tracked and untracked (not ignored) files, copied to a temporary folder; or in an
installed package (`site:gguf/quants.py`), copied into a folder put first on PYTHONPATH, for the
bugs a test must catch without trusting the library it would otherwise compare against. The
copy's tests run with `python -m pytest -x` on the files listed with the mutation: caught means
a test failed (exit code 1); escaped means they passed; anything else (a collection error, a
timeout) is reported as such. The unmutated files run first (`--no-baseline` skips that), so a
test that fails anyway is not counted as catching anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SITE = "site:"  # a path in an installed package, e.g. site:gguf/quants.py


@dataclasses.dataclass(frozen=True)
class Mutation:
  name: str
  path: str               # repo-relative, or SITE + a path inside site-packages
  old: str                # found exactly once
  new: str
  tests: tuple[str, ...]  # test files (or node ids) expected to fail
  why: str                # the bug, in words
  also: tuple[tuple[str, str, str], ...] = ()  # more (path, old, new) patches of the same bug


MUTATIONS = [
    # The two escapes of issue 29: no test failed before the tests named here were written.
    Mutation("sampling_ignores_options", "ulskip_jax/decode.py",
             "jax.random.categorical(key, sampling.filtered_logits(\n"
             "        lg, x.temperature, self.top_k, x.top_p if self.use_top_p else None))",
             "jax.random.categorical(key, lg)",
             ("tests/test_sampling_options.py",),
             "decode.py samples the raw logits: temperature and top_p ignored"),
    Mutation("in_chunks_sorted_order", "ulskip_jax/engine.py",
             "    for i, row in zip(chunk, ids):\n      outputs[i] = row",
             "    for row in ids:\n      outputs[outputs.index(None)] = row",
             ("tests/test_output_order.py",),
             "engine.in_chunks leaves the outputs in length-sorted order"),
    # The six that issue 29 found caught.
    Mutation("generated_position_off_by_one", "ulskip_jax/decode.py",
             "s.prompt_len + s.count - 1, s.cache", "s.prompt_len + s.count, s.cache",
             ("tests/test_decode.py::test_cached_greedy_equals_recompute",),
             "each generated token is fed at the next position"),
    Mutation("speculative_residual", "ulskip_jax/speculative.py",
             "residual = jnp.maximum(p_next - q_next, 0.0)", "residual = p_next",
             ("tests/test_speculative.py::test_sampling_keeps_the_full_model_distribution",),
             "a rejected draft is resampled from p, not from max(0, p - q)"),
    Mutation("draft_never_runs", "ulskip_jax/speculative.py",
             "jax.lax.fori_loop(1, k, step, (drafts, qs, dcache))",
             "jax.lax.fori_loop(1, 1, step, (drafts, qs, dcache))",
             ("tests/test_speculative.py::test_full_depth_draft_accepts_every_token",),
             "the draft loop never runs: drafts 2..k stay token 0 (still lossless)"),
    Mutation("old_layer_order_restore", "ulskip_jax/checkpoint.py",
             "restore_params(directory, step, params_target=target)",
             "restore_params(directory, step, params_target=None)",
             ("tests/test_restore.py::test_workdir_restores_the_trained_params_exactly",),
             "restore without the model's abstract state, then merge the leaves in their "
             "flattened order: string keys put layer '10' before '2' (the bug b2512de fixed)",
             also=(("ulskip_jax/checkpoint.py",
                    "  nnx.replace_by_pure_dict(state := nnx.state(model, nnx.Param), restored.params)\n"
                    "  nnx.update(model, state)\n",
                    "  state = nnx.state(model, nnx.Param)\n"
                    "  nnx.update(model, jax.tree.unflatten(jax.tree.structure(state),\n"
                    "                                       jax.tree.leaves(restored.params)))\n"),)),
    Mutation("norm_epsilon_ignored", "ulskip_jax/model.py",
             "self.kind, self.eps = cfg.norm, cfg.norm_eps", "self.kind, self.eps = cfg.norm, 1e-3",
             ("tests/test_hf.py::test_full_depth_logits_match_torch",),
             "the norms use a fixed epsilon, not the config's"),
    Mutation("sliding_window_edge", "ulskip_jax/model.py",
             "k_pos[:, None, :] > positions_BT[:, :, None] - self.window",
             "k_pos[:, None, :] >= positions_BT[:, :, None] - self.window",
             ("tests/test_families.py::test_full_depth_logits_match_torch",),
             "a sliding window one key wider than the model's"),
    # One for each test written for issue 29.
    Mutation("speculative_ignores_top_p", "ulskip_jax/speculative.py",
             "return sampling.filtered_logits(logits, x.temperature, self.top_k,\n"
             "                                    x.top_p if self.use_top_p else None)",
             "return sampling.filtered_logits(logits, x.temperature, self.top_k, None)",
             ("tests/test_sampling_options.py::test_speculative_samples_the_filtered_distribution",),
             "speculative sampling drops top_p (draft and verify alike)"),
    Mutation("eval_at_full_depth", "ulskip_jax/train_lib.py",
             "m = self._eval_step(params, self.global_batch(b), skip=skip)",
             "m = self._eval_step(params, self.global_batch(b), skip=())",
             ("tests/test_train_eval.py",),
             "validation loss computed at full depth whatever the ratio it is logged for"),
    Mutation("bleu_reference_shift", "ulskip_jax/train_lib.py",
             "    prompts, refs = batching.eval_prompts(self.tok, cfg.data.template, pairs, "
             "cfg.data.seq_len)\n",
             "    prompts, refs = batching.eval_prompts(self.tok, cfg.data.template, pairs, "
             "cfg.data.seq_len)\n    refs = refs[1:] + refs[:1]\n",
             ("tests/test_train_eval.py",),
             "validation BLEU / chrF score each hypothesis against the next example's reference"),
    Mutation("window_only_without_cache", "ulskip_jax/model.py",
             "if self.window is not None:  # positions, not slots",
             "if self.window is not None and kv is None:  # positions, not slots",
             ("tests/test_windowed_decode.py",),
             "cached decoding (every strategy) attends beyond the sliding window"),
    Mutation("sliding_window_edge_decode", "ulskip_jax/model.py",
             "k_pos[:, None, :] > positions_BT[:, :, None] - self.window",
             "k_pos[:, None, :] >= positions_BT[:, :, None] - self.window",
             ("tests/test_windowed_decode.py",),
             "a sliding window one key wider than the model's (as above, the new test's view)"),
    Mutation("lora_scale_sqrt_rank", "ulskip_jax/lora.py",
             "self.scale, self.dropout = alpha / rank, dropout",
             "self.scale, self.dropout = alpha / rank ** 0.5, dropout",
             ("tests/test_lora_reference.py::test_adapters_equal_hand_merged_weights",),
             "adapters and merging both scale by alpha / sqrt(rank) (rsLoRA), not alpha / rank",
             also=(("ulskip_jax/lora.py", "params = merge_params(params, cfg.lora_alpha / cfg.lora_rank)",
                    "params = merge_params(params, cfg.lora_alpha / cfg.lora_rank ** 0.5)"),)),
    Mutation("lora_dropout_keeps_with_p", "ulskip_jax/lora.py",
             "jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)",
             "jax.random.bernoulli(key, self.dropout, x.shape)",
             ("tests/test_lora_reference.py::test_dropout_zeroes_p_of_the_inputs_and_rescales_the_rest",),
             "LoRA dropout keeps inputs with probability p instead of 1 - p"),
    Mutation("lora_dropout_never_on", "ulskip_jax/train_lib.py",
             "dropout_seed=self.config.seed if self.model_cfg.lora_dropout else None",
             "dropout_seed=None",
             ("tests/test_lora_reference.py::test_trainer_steps_apply_dropout",),
             "the trainer never passes a dropout key: LoRA dropout is off in training"),
    Mutation("beam_prefill_full_depth", "ulskip_jax/decode.py",
             "    logits, cache = self.prefill(model, x.prompts, x.pad, P + N)\n"
             "    rows = jnp.arange(B).repeat(nb)",
             "    logits, cache = engine.prefill(model, x.prompts, x.pad, P + N, skip=self.skip,\n"
             "                                   paper_mode=bool(self.skip))\n"
             "    rows = jnp.arange(B).repeat(nb)",
             ("tests/test_beam_skip.py",),
             "beam search prefills every prompt at full depth (paper mode) even in 'everywhere'"),
    Mutation("verify_commit_right_after_verify", "ulskip_jax/speculative.py",
             "    s = s.replace(cache=s.cache.commit(Z, k + 1, jnp.zeros_like(s.count), *s.last_commit))\n",
             "",
             ("tests/test_hlo_default.py",),
             "the verify commit moved back to right after the verify pass (same tokens; XLA then "
             "copies the verify cache between the pass's write and the commit's)",
             also=(("ulskip_jax/speculative.py",
                    "        rnd=s.rnd + 1, cache=cache, draft_cache=draft_cache,",
                    "        rnd=s.rnd + 1, draft_cache=draft_cache,\n"
                    "        cache=cache.commit(Z, k + 1, jnp.zeros_like(count), count, P + committed, pos0),"),)),
    Mutation("q4k_high_scale_bits", "site:gguf/quants.py",
             "(m_d & 0x0F) | ((d >> 2) & 0x30)", "(m_d & 0x0F) | ((d >> 4) & 0x30)",
             ("tests/test_gguf_kquants.py",),
             "gguf.quants mis-unpacks Q4_K's upper sub-block scales (transformers shares it)"),
    Mutation("q6k_offset", "site:gguf/quants.py",
             "q = (ql | (qh << np.uint8(4))).astype(np.int8) - np.int8(32)",
             "q = (ql | (qh << np.uint8(4))).astype(np.int8) - np.int8(31)",
             ("tests/test_gguf_kquants.py",),
             "gguf.quants centres Q6_K on 31, not 32 (transformers shares it)"),
    Mutation("kquant_rows_transposed", "ulskip_jax/gguf_io.py",
             "  # F32 comes back as a view of the mapped file",
             "  if block == 256:\n"
             "    values = values.reshape(values.shape[-1], -1).T.reshape(values.shape)\n"
             "  # F32 comes back as a view of the mapped file",
             ("tests/test_gguf_kquants.py",),
             "K-quant tensors read in the wrong element order"),
    Mutation("sublayer_greedy_ignores_bytes", "ulskip_jax/calibrate.py",
             '                if unit == "sublayer" else kl)',
             "                if False else kl)",
             ("tests/test_calibrate.py::test_sublayer_greedy_takes_the_cheapest_kl_per_byte_and_"
              "plans_by_bytes",),
             "unit 'sublayer' calibration removes the least-KL block whatever bytes it saves"),
    Mutation("mlp_gate_reads_attention", "ulskip_jax/model.py",
             "      mlp = True if i in mlp_on else paper",
             "      mlp = True if i in attention_on else paper",
             ("tests/test_sublayer_plans.py",),
             "a layer's MLP runs where its attention does: sublayer plans skip the wrong blocks"),
    Mutation("mlp_only_plan_is_full", "ulskip_jax/train_lib.py",
             '  return plan if plan.unit != "layer" else plan.skipped',
             '  return plan if plan.unit != "layer" and plan.skipped else plan.skipped',
             ("tests/test_sublayer_plans.py::test_run_config_plans_by_unit",),
             "training takes a unit 'sublayer' plan skipping only MLP blocks for full depth"),
]


def copy_tree(dest: pathlib.Path) -> None:
  """The working tree's tracked and untracked (not ignored) files, as they are now."""
  files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
  for name in filter(None, files):
    src = REPO / name
    if src.is_file():
      (dest / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(src, dest / name)


def site_packages() -> pathlib.Path:
  import gguf  # any installed package: its parent is the site-packages folder
  return pathlib.Path(gguf.__file__).resolve().parents[1]


def apply(m: Mutation, root: pathlib.Path, site_root: pathlib.Path | None) -> None:
  """Patch the copy at root (a SITE path: a copy of its package under site_root)."""
  for path, old, new in ((m.path, m.old, m.new), *m.also):
    if path.startswith(SITE):
      rel = pathlib.Path(path[len(SITE):])
      if not (site_root / rel.parts[0]).exists():
        shutil.copytree(site_packages() / rel.parts[0], site_root / rel.parts[0])
      target = site_root / rel
    else:
      target = root / path
    text = target.read_text()
    if text.count(old) != 1:
      raise ValueError(f"{m.name}: the patch's old text occurs {text.count(old)} times in {path} "
                       "(the code moved on: update the mutation)")
    target.write_text(text.replace(old, new))


def run_tests(tests, root: pathlib.Path, site_root: pathlib.Path | None, timeout: int):
  """(outcome, seconds, the last lines of output)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(p) for p in (site_root, root) if p] + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  env["PYTHONDONTWRITEBYTECODE"] = "1"
  cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return "timeout", time.perf_counter() - start, ""
  tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
  outcome = {0: "escaped", 1: "caught"}.get(proc.returncode, f"error (exit {proc.returncode})")
  return outcome, time.perf_counter() - start, tail


def check_copy_imports_itself(root: pathlib.Path) -> None:
  """The copy's package must be the one imported, not the editable install of the repo."""
  env = dict(os.environ, PYTHONPATH=str(root))
  found = subprocess.run([sys.executable, "-c", "import ulskip_jax; print(ulskip_jax.__file__)"],
                         cwd=root, env=env, capture_output=True, text=True, check=True).stdout
  assert found.strip().startswith(str(root)), f"the copy imports {found.strip()}, not its own"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--only", nargs="+", help="mutation names (or prefixes) to run")
  p.add_argument("--list", action="store_true", help="list the mutations and exit")
  p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
  p.add_argument("--timeout", type=int, default=1200, help="seconds per pytest run")
  p.add_argument("--write", help="also write the results as markdown to this file")
  args = p.parse_args(argv)
  chosen = [m for m in MUTATIONS if not args.only or any(m.name.startswith(o) for o in args.only)]
  if args.list:
    for m in MUTATIONS:
      print(f"{m.name:36} {m.path:28} {' '.join(m.tests)}\n{'':36} {m.why}")
    return 0
  if not chosen:
    p.error(f"--only {args.only} matches no mutation (see --list)")
  rows, start = [], time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="ulskip_mut_") as tmp:
    clean = pathlib.Path(tmp) / "clean"
    copy_tree(clean)
    check_copy_imports_itself(clean)
    if not args.no_baseline:
      files = sorted({t for m in chosen for t in m.tests})
      outcome, seconds, tail = run_tests(files, clean, None, args.timeout * 2)
      print(f"baseline (unmutated) {outcome} in {seconds:.0f} s", flush=True)
      if outcome != "escaped":  # i.e. the unmutated tests did not all pass
        print(tail)
        return 1
    for m in chosen:
      work = pathlib.Path(tmp) / m.name
      shutil.copytree(clean, work)
      paths = [m.path] + [path for path, _, _ in m.also]
      site_root = (pathlib.Path(tmp) / (m.name + ".site")
                   if any(p.startswith(SITE) for p in paths) else None)
      try:
        apply(m, work, site_root)
        outcome, seconds, tail = run_tests(m.tests, work, site_root, args.timeout)
      except ValueError as e:
        outcome, seconds, tail = "stale patch", 0.0, str(e)
      rows.append((m, outcome, seconds))
      print(f"{outcome:9} {seconds:6.0f} s  {m.name}: {m.why}", flush=True)
      if outcome != "caught":
        print("    " + tail.replace("\n", "\n    "), flush=True)
      shutil.rmtree(work)
  caught = sum(outcome == "caught" for _, outcome, _ in rows)
  total_s = time.perf_counter() - start
  print(f"\n{caught} of {len(rows)} caught in {total_s / 60:.1f} min")
  if args.write:
    write_markdown(pathlib.Path(args.write), rows, caught, total_s, argv)
  return 0 if caught == len(rows) else 1


def write_markdown(path, rows, caught, total_s, argv) -> None:
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
  dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                         capture_output=True, text=True).stdout.strip()
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
              if line.startswith("model name")), platform.processor())
  lines = [
      "# Mutation run: planted bugs and the tests that catch them",
      "",
      f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
      f"- machine: {cpu}, {os.cpu_count()} cores (shared with other jobs)",
      f"- commit: {commit}{' plus uncommitted changes in the working tree' if dirty else ''}",
      f"- command: `python benchmarks/mutations.py {' '.join(argv or sys.argv[1:])}`",
      f"- result: **{caught} of {len(rows)} caught**, {total_s / 60:.1f} min wall",
      "",
      "| mutation | file | outcome | seconds | tests | bug |",
      "|---|---|---|---|---|---|",
  ]
  for m, outcome, seconds in rows:
    lines.append(f"| {m.name} | {m.path} | {outcome} | {seconds:.0f} | {' '.join(m.tests)} | "
                 f"{m.why} |")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  sys.exit(main())
