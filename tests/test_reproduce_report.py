"""benchmarks/reproduce.py's report stage rebuilds every table from cached stage outputs alone."""

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="module")
def reproduce():
  spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_report_rebuilds_tables_from_cached_stages(reproduce, tmp_path):
  c = reproduce.load_config(str(ROOT / "configs" / "reproduce_smollm2.py"), quick=False)
  c.workdir, c.results_dir = str(tmp_path / "work"), str(tmp_path / "results")
  (tmp_path / "work" / "quality").mkdir(parents=True)
  (tmp_path / "results").mkdir()
  names = [n for _, group, _ in reproduce.quality_groups(c) for n in group if n != "copy"]
  quality = {}
  for i, name in enumerate(names):  # distinct values, so a row read from the wrong run shows
    target = reproduce._target(name)
    quality[name] = dict(bleu=10.0 + i, chrf=40.0 + i, ppl=2.0 + i, ratio=target, tok_s=5.0 + i)
    if name.startswith("early_exit"):
      quality[name].update(threshold=0.5, ratio=1.25)
    (tmp_path / "work" / "quality" / f"{name}.json").write_text(json.dumps(quality[name]))
  cases = ["full"] + [f"{m}_r{r:g}" for r in c.ratios for m in ("uls", "early_exit")] + [
      f"skipdecode_r{r:g}" for r in reproduce.method_ratios(c, "skipdecode")]
  speed = {str(b): {n: dict(tok_s=100.0 + 10 * k + b, compile_s=1.0, cache_bytes=1, ratio=None)
                    for k, n in enumerate(cases)} for b in c.speed.batches}
  (tmp_path / "work" / "speed_trained.json").write_text(json.dumps(speed))

  reproduce.report(c)

  results = json.loads((tmp_path / "results" / "results.json").read_text())
  assert {k: v for k, v in results["quality"].items() if k != "copy"} == quality
  assert results["speed_trained"] == speed
  assert results["quality"]["copy"]["bleu"] > 0  # the copy baseline, recomputed from the data
  table = (tmp_path / "results" / "quality.md").read_text()
  for name, r in quality.items():
    assert f"| {name} | " in table and f"| {r['bleu']:.1f} | {r['chrf']:.1f} |" in table, name
  paper = (tmp_path / "results" / "paper_table.md").read_text()
  row = next(line for line in paper.splitlines() if line.startswith("| ULS 2x |"))
  b8 = str(c.speed.plot_batch)
  rel = quality["uls_ft_r2"]["bleu"] / quality["full_ft"]["bleu"]
  speedup = speed[b8]["uls_r2"]["tok_s"] / speed[b8]["full"]["tok_s"]
  assert f"| {rel:.0%} |" in row and f"| {speedup:.2f} |" in row, row
  assert "**(e)" in (tmp_path / "results" / "claims.md").read_text()
  assert (tmp_path / "results" / "quality_vs_speedup.png").stat().st_size > 0
