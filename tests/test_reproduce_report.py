"""The reproduction's report (benchmarks/reproduce_report.py) rebuilds every table from cached stage
outputs alone, through either entry point, with nothing trained or loaded."""

import json
import pathlib

import pytest

from benchmarks import reproduce, reproduce_report
from ulskip_jax import hf, train_lib
from ulskip_jax import testing as tiny

ROOT = pathlib.Path(__file__).parent.parent
SAVED = ROOT / "benchmarks" / "results" / "smollm2"  # a whole run: results.json and its tables


def test_report_rebuilds_tables_from_cached_stages(tmp_path):
  c = reproduce_report.load_config(str(ROOT / "configs" / "reproduce_smollm2.py"), quick=False)
  c.workdir, c.results_dir = str(tmp_path / "work"), str(tmp_path / "results")
  (tmp_path / "work" / "quality").mkdir(parents=True)
  (tmp_path / "results").mkdir()
  names = [n for _, group, _ in reproduce_report.quality_groups(c) for n in group if n != "copy"]
  quality = {}
  for i, name in enumerate(names):  # distinct values, so a row read from the wrong run shows
    target = reproduce_report.target_ratio(name)
    quality[name] = dict(bleu=10.0 + i, chrf=40.0 + i, ppl=2.0 + i, ratio=target, tok_s=5.0 + i)
    if name.startswith("early_exit"):
      quality[name].update(threshold=0.5, ratio=1.25)
    (tmp_path / "work" / "quality" / f"{name}.json").write_text(json.dumps(quality[name]))
  cases = ["full"] + [f"{m}_r{r:g}" for r in c.ratios for m in ("uls", "early_exit")] + [
      f"skipdecode_r{r:g}" for r in reproduce_report.method_ratios(c, "skipdecode")]
  speed = {str(b): {n: dict(tok_s=100.0 + 10 * k + b, compile_s=1.0, cache_bytes=1, ratio=None)
                    for k, n in enumerate(cases)} for b in c.speed.batches}
  (tmp_path / "work" / "speed_trained.json").write_text(json.dumps(speed))

  reproduce_report.report(c)

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


def _no_model(*args, **kwargs):
  raise AssertionError("the report trained or loaded a model")


@pytest.mark.parametrize("entry", ["reproduce_report", "reproduce --stages report"])
def test_report_alone_rewrites_the_saved_run(entry, tmp_path, monkeypatch):
  """The saved SmolLM2 run's stage outputs (what its results.json holds) in a fresh workdir, the
  report run alone: the same markdown and results.json as the run wrote. If this fails after a
  deliberate change to the report's format, rerun the report on the run's workdir
  (`python -m benchmarks.reproduce_report --config configs/reproduce_smollm2.py`) and commit the
  tables it rewrites under benchmarks/results/smollm2/."""
  saved = json.loads((SAVED / "results.json").read_text())
  work = tmp_path / "work"
  (work / "quality").mkdir(parents=True)
  for name, row in saved["quality"].items():
    if name != "copy":  # the report recomputes it from the data
      (work / "quality" / f"{name}.json").write_text(json.dumps(row))
  for stage in ("speed_trained", "stage_seconds", "provenance"):
    (work / f"{stage}.json").write_text(json.dumps(saved[stage]))
  # The base stage's export tells the report the run's depth (SmolLM2's 30 layers, not the
  # config's model): only its config.json is read.
  (work / "base_hf").mkdir()
  (work / "base_hf" / "config.json").write_text(
      json.dumps(hf.config_to_hf(tiny.tiny_config(num_layers=30))))
  config = tmp_path / "config.py"
  config.write_text(
      "from configs import reproduce_smollm2\n\n\n"
      "def get_config():\n"
      "  c = reproduce_smollm2.get_config()\n"
      f"  c.workdir, c.results_dir = {str(work)!r}, {str(tmp_path / 'results')!r}\n"
      "  return c\n")
  for module, name in ((train_lib, "train_and_evaluate"), (hf, "from_pretrained")):
    monkeypatch.setattr(module, name, _no_model)

  if entry == "reproduce_report":
    reproduce_report.main(["--config", str(config)])
  else:
    reproduce.main(["--config", str(config), "--stages", "report"])

  for table in ("quality", "paper_table", "claims", "speed_trained"):
    assert ((tmp_path / "results" / f"{table}.md").read_text()
            == (SAVED / f"{table}.md").read_text()), table
  assert json.loads((tmp_path / "results" / "results.json").read_text()) == saved
  assert not (tmp_path / "results" / "speed.md").exists()  # no speed stage in this run
