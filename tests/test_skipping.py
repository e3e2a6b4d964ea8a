import pytest
from hypothesis import given, settings, strategies as st

from ulskip_jax import plan_layers
from ulskip_jax.skipping import STRATEGIES, num_kept, parse_ratios


@st.composite
def layers_and_ratio(draw, min_kept=1):
  L = draw(st.integers(1, 128))
  ratio = draw(st.floats(1.0, float(L), allow_nan=False))
  n = int(L / ratio)
  if n < min_kept:
    ratio = L / min_kept if L >= min_kept else 1.0
  return L, ratio


@settings(max_examples=400, deadline=None)
@given(layers_and_ratio(min_kept=2))
def test_uls_plan_properties(lr):
  L, r = lr
  if L < 2:
    return
  plan = plan_layers(L, r)
  n = int(L / r)
  assert len(plan.kept) == n
  assert plan.kept[0] == 0 and plan.kept[-1] == L - 1
  assert list(plan.kept) == sorted(set(plan.kept))
  assert sorted(plan.kept + plan.skipped) == list(range(L))
  gaps = [b - a for a, b in zip(plan.kept, plan.kept[1:])]
  assert max(gaps) - min(gaps) <= 1, gaps
  assert plan == plan_layers(L, r)  # deterministic
  hash(plan.skipped)


@settings(max_examples=300, deadline=None)
@given(layers_and_ratio(), st.sampled_from([s for s in STRATEGIES
                                            if not s.startswith("uls") and s != "calibrated"]),
       st.integers(0, 10))
def test_baseline_plans_keep_n_sorted_layers(lr, strategy, seed):
  L, r = lr
  plan = plan_layers(L, r, strategy, seed=seed)
  assert len(plan.kept) == int(L / r)
  assert list(plan.kept) == sorted(set(plan.kept))
  assert set(plan.kept).isdisjoint(plan.skipped)
  assert sorted(plan.kept + plan.skipped) == list(range(L))
  assert plan == plan_layers(L, r, strategy, seed=seed)


def test_paper_plans_for_30_layers():
  assert plan_layers(30, 2).kept == (0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29)
  assert plan_layers(30, 5).kept == (0, 6, 12, 17, 23, 29)
  # The authors' code (reproduced by "uls_reference"): every s-th layer, then the last.
  assert plan_layers(30, 2, "uls_reference").kept == tuple(range(0, 27, 2)) + (29,)
  assert plan_layers(30, 5, "uls_reference").kept == (0, 6, 12, 18, 24, 29)


def test_baselines_by_hand():
  assert plan_layers(12, 3, "top").kept == (0, 1, 2, 3)
  assert plan_layers(12, 3, "bottom").kept == (8, 9, 10, 11)
  assert plan_layers(12, 3, "middle").kept == (0, 1, 10, 11)
  assert plan_layers(12, 3, "every_other").kept == (0, 3, 6, 9)
  assert plan_layers(12, 2, "every_other").kept == (0, 2, 4, 6, 8, 10)
  assert plan_layers(12, 3, "random", seed=1) != plan_layers(12, 3, "random", seed=2)
  assert plan_layers(12, strategy=[3, 1]).skipped == (1, 3)
  assert plan_layers(12, 1).skipped == ()


@pytest.mark.parametrize("args, match", [
    ((0, 2), "num_layers=0"),
    ((12, 0.5), "ratio=0.5 is out of range"),
    ((12, 13), "ratio=13 is out of range"),
    ((12, float("nan")), "ratio=nan"),
    ((12, 7), r"keeps n=int\(12/7\)=1"),
    ((12, 2, "fancy"), "strategy='fancy' is unknown"),
    ((12, None, [1, 1]), r"\[1\] appear more than once"),
    ((12, None, [12]), "skip index 12 is out of range"),
    ((12, None, [1.5]), "skip index 1.5 is not an int"),
    ((12, 2, [1]), "explicit skip list"),
    ((12, None, list(range(12))), "skips all 12 layers"),
    ((20, 1.5, "uls_reference"), "use strategy='uls'"),
])
def test_bad_input_errors(args, match):
  with pytest.raises(ValueError, match=match):
    plan_layers(*args)


@settings(max_examples=300, deadline=None)
@given(layers_and_ratio(min_kept=2), st.data())
def test_uls_keep_plan_properties(lr, data):
  L, r = lr
  if L < 2:
    return
  n = int(L / r)
  keep = data.draw(st.lists(st.integers(0, L - 1), unique=True, max_size=n - 2))
  plan = plan_layers(L, r, keep=keep)
  assert len(plan.kept) == n and {0, L - 1, *keep} <= set(plan.kept)
  assert sorted(plan.kept + plan.skipped) == list(range(L))
  if not keep:
    assert plan == plan_layers(L, r)
  # Nothing beats the plan's longest gap by moving one free layer.
  fixed = {0, L - 1, *keep}
  longest = max(b - a for a, b in zip(plan.kept, plan.kept[1:]))
  for i in set(plan.kept) - fixed:
    for j in set(plan.skipped):
      moved = sorted(set(plan.kept) - {i} | {j})
      assert max(b - a for a, b in zip(moved, moved[1:])) >= longest


def test_uls_keep_by_hand():
  gemma3_1b_globals = (5, 11, 17, 23)  # every 6th of 26 layers
  assert plan_layers(26, 2).kept == (0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21, 23, 25)
  assert plan_layers(26, 2, keep=gemma3_1b_globals).kept == (0, 3, 5, 7, 9, 11, 13, 15, 17, 19,
                                                             21, 23, 25)
  assert plan_layers(26, 26 / 6, keep=gemma3_1b_globals).kept == (0, 5, 11, 17, 23, 25)
  assert plan_layers(12, 3, keep=[0, 11]) == plan_layers(12, 3)


def test_local_global_models_keep_their_global_layers():
  gemma3_1b = [None if (i + 1) % 6 == 0 else 512 for i in range(26)]
  assert plan_layers(26, 2, windows=gemma3_1b) == plan_layers(26, 2, keep=(5, 11, 17, 23))
  assert plan_layers(26, 26 / 6, windows=gemma3_1b).kept == (0, 5, 11, 17, 23, 25)
  assert plan_layers(26, 5, windows=gemma3_1b).kept == (0, 5, 17, 23, 25)  # 3 of 4 fit
  assert plan_layers(26, 2, windows=gemma3_1b, keep=(7,)) == plan_layers(26, 2, keep=(7,))
  for windows in (None, [None] * 26, [512] * 26):  # nothing to keep: plain ULS
    assert plan_layers(26, 3, windows=windows) == plan_layers(26, 3)
  assert plan_layers(26, 3, "top", windows=gemma3_1b) == plan_layers(26, 3, "top")
  with pytest.raises(ValueError, match=r"windows has 4 entries but num_layers=26: give one per layer$"):
    plan_layers(26, 2, windows=[None, 1, None, 1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(keep=(5, 11, 17, 23)), r"keep=\(5, 11, 17, 23\) with the first and last layers is 6 "
     r"layers but the ratio keeps n=5: allowed is ratio <= 4.33333$"),
    (dict(keep=(26,)), r"keep index 26 is out of range: allowed are ints 0 <= index < 26$"),
    (dict(keep=(1.5,)), r"keep index 1.5 is out of range"),
    (dict(keep=(3, 3)), r"keep=\(3, 3\) has duplicate indices"),
    (dict(keep="5"), r"keep='5' is invalid"),
    (dict(keep=(5,), strategy="top"), r"keep works with strategy='uls' or 'calibrated' only"),
])
def test_keep_errors(kwargs, match):
  with pytest.raises(ValueError, match=match) as error:
    plan_layers(26, 5, **kwargs)
  assert "\n" not in str(error.value)


def test_num_kept_and_parse_ratios():
  assert num_kept(30, 3) == 10 and num_kept(30, 2.5) == 12
  assert parse_ratios("1,2, 5") == [1.0, 2.0, 5.0]
  with pytest.raises(ValueError, match="ratios='a,b'"):
    parse_ratios("a,b")


@settings(max_examples=300, deadline=None)
@given(layers_and_ratio(min_kept=2), st.data())
def test_calibrated_plans_skip_the_lowest_scores_nested(lr, data):
  L, r = lr
  if L < 3:
    return
  scores = [None] + data.draw(st.lists(st.integers(0, 5), min_size=L - 2, max_size=L - 2)) + [None]
  n = int(L / r)
  keep = data.draw(st.lists(st.integers(1, L - 2), unique=True, max_size=max(n - 2, 0)))
  plan = plan_layers(L, r, "calibrated", scores=scores, keep=keep)
  assert len(plan.kept) == n and {0, L - 1, *keep} <= set(plan.kept)
  free = [i for i in range(1, L - 1) if i not in keep]
  # The skipped are the lowest scores, the lower index first on ties.
  assert list(plan.skipped) == sorted(sorted(free, key=lambda i: (scores[i], i))[:L - n])
  smaller = plan_layers(L, 1 + (r - 1) / 2, "calibrated", scores=scores, keep=keep)
  assert set(smaller.skipped) <= set(plan.skipped)


@pytest.mark.parametrize("kwargs, match", [
    (dict(), r"strategy='calibrated' needs scores"),
    (dict(scores=[0.0] * 5), r"give one number \(or None = never skipped\) per layer, 6 in all"),
    (dict(scores=[None, 1, float("nan"), 0, 0, None]), r"scores\[2\]=nan is invalid"),
    (dict(scores=[None, 1, "a", 0, 0, None]), r"scores\[2\]='a' is invalid"),
    (dict(scores=[None, 1, 2, None, None, None]), r"ratio keeps n=3 of 6 layers, but the scores "
     r"let only 2 be skipped \(None = never, nor keep\): allowed is ratio <= 1.5$"),
    (dict(scores=[None, 1, 2, 3, 4, None], keep=(1, 2)), r"let only 2 be skipped"),
    (dict(scores=[0] * 6, strategy="uls"), r"scores given with strategy='uls'"),
])
def test_calibrated_plan_errors(kwargs, match):
  kwargs = dict(dict(strategy="calibrated"), **kwargs)
  with pytest.raises(ValueError, match=match) as error:
    plan_layers(6, 2, **kwargs)
  assert "\n" not in str(error.value)
