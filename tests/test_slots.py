"""The serving engine (`slots.SlotPool`, `slots.SpeculativePool`): requests started into rows
while others decode give what `generate` gives each prompt alone (the lossless pool: full depth),
nothing is compiled after the warm-up, a stopped row frees its slot, and a seeded request
samples the same tokens whatever runs beside it."""

from __future__ import annotations

import numpy as np
import pytest

from ulskip_jax import testing as tiny
from ulskip_jax import decode, skipping, slots

EOS = 2
ROWS, SLOTS, STEPS = 4, 32, 3
RNG = np.random.default_rng(0)
PROMPTS = [RNG.integers(3, tiny.VOCAB, size=n).tolist() for n in (4, 9, 2, 20, 5, 17, 3, 11)]
MAX_NEW = [10, 5, 12, 13, 9, 3, 11, 6]  # prompt 3 fills all SLOTS: 20 + 13 - 1


pytestmark = pytest.mark.usefixtures("fast_engine_compile")


@pytest.fixture(scope="module")
def model():
  return tiny.tiny_model()


@pytest.fixture(scope="module")
def pools(model):
  """ratio -> a warmed-up pool (built once for the file)."""
  out = {}
  for ratio in (1, 2):
    pool = slots.SlotPool(model, skip=skipping.resolve(4, ratio=ratio), rows=ROWS,
                          num_slots=SLOTS, eos_id=EOS, steps=STEPS)
    pool.warm_up()
    out[ratio] = pool
  return out


def serve(pool, requests, stop_after=None, per_step=None):
  """Runs (prompt, max_new, options) requests through the pool, starting each in the first free
  row as soon as one frees up (so most start while others decode): their tokens, cut at EOS.
  stop_after: {request: n} stops that request once it has n tokens. per_step: start at most
  this many requests between two steps (so rows that have never held one start later)."""
  out, owner, waiting = [[] for _ in requests], {}, list(range(len(requests)))
  stop_after = stop_after or {}
  while waiting or owner:
    started = 0
    for row in range(pool.rows):
      if row not in owner and waiting and started < (per_step or pool.rows):
        started += 1
        i = waiting.pop(0)
        prompt, max_new, options = requests[i]
        out[i].append(pool.start(row, prompt, max_new=max_new, **options))
        owner[row] = i
    for row, i in owner.items():
      if len(out[i]) >= stop_after.get(i, 1 << 30):
        pool.stop(row)
    tokens, emitted, done = pool.step()
    for row, i in list(owner.items()):
      out[i] += tokens[row][emitted[row]].tolist()
      if done[row]:
        del owner[row]
  done = pool.state.spec.done if hasattr(pool.state, "spec") else pool.state.done
  assert np.all(done), "a row still decodes with no request"
  return [o[:o.index(EOS)] if EOS in o else o for o in out]


@pytest.fixture(scope="module")
def lossless(model):
  pool = slots.SpeculativePool(model, draft_skip=skipping.resolve(4, ratio=2),
                               num_draft_tokens=3, rows=ROWS, num_slots=SLOTS, eos_id=EOS,
                               steps=2)
  pool.warm_up()
  return pool


@pytest.mark.parametrize("ratio", [1, 2])
def test_rows_started_while_others_decode_equal_generate_alone(model, pools, ratio):
  pool = pools[ratio]
  before = slots.num_compiles()
  got = serve(pool, [(p, m, {}) for p, m in zip(PROMPTS, MAX_NEW)])
  assert slots.num_compiles() == before, "an executable was built after the warm-up"
  want = [decode.generate(model, [p], max_new_tokens=m, eos_id=EOS, ratio=ratio)[0][0]
          for p, m in zip(PROMPTS, MAX_NEW)]
  assert got == want
  assert sum(map(len, got)) > 3 * len(got)  # not all cut short by an early EOS


def test_lossless_rows_started_while_others_decode_equal_full_depth_generate(model, lossless):
  before = slots.num_compiles()
  requests = [(p, m, {}) for p, m in zip(PROMPTS, MAX_NEW)]
  order = [0, 3, 1, 2, 4, 5, 6, 7]
  # First, on the fresh pool: one start a step puts prompt 3, whose bucket is all SLOTS slots,
  # in a row that has been stepped without a request.
  staggered = serve(lossless, [requests[i] for i in order], per_step=1)
  got = serve(lossless, requests)
  assert slots.num_compiles() == before, "an executable was built after the warm-up"
  want = [decode.generate(model, [p], max_new_tokens=m, eos_id=EOS)[0][0]
          for p, m in zip(PROMPTS, MAX_NEW)]
  assert got == want
  assert staggered == [want[i] for i in order]
  with pytest.raises(ValueError, match="temperature=0.5: the lossless plan decodes greedily"):
    lossless.start(0, PROMPTS[0], max_new=4, temperature=0.5)


def test_the_plans_differ(pools):
  """Otherwise the equivalence above could not tell a pool that ignores its skip."""
  requests = [(p, 8, {}) for p in PROMPTS[:4]]
  assert serve(pools[1], requests) != serve(pools[2], requests)


def test_a_stopped_row_frees_its_slot_and_spares_the_others(pools):
  pool = pools[1]
  requests = [(p, 12, {}) for p in PROMPTS]
  full = serve(pool, requests)
  cut = serve(pool, requests, stop_after={0: 2, 3: 1})
  assert cut[0] == full[0][:len(cut[0])] and len(cut[0]) <= 2 + STEPS
  assert len(cut[3]) <= 1 + STEPS
  assert [c for i, c in enumerate(cut) if i not in (0, 3)] == [
      f for i, f in enumerate(full) if i not in (0, 3)]


def test_seeded_sampling_ignores_its_neighbours(pools):
  pool = pools[2]
  options = dict(temperature=1.0, top_p=0.9, seed=7)
  alone = serve(pool, [(PROMPTS[1], 12, options)])[0]
  crowded = serve(pool, [(p, 12, dict(temperature=0.7, seed=i)) for i, p in enumerate(PROMPTS)]
                  + [(PROMPTS[1], 12, options)])[-1]
  assert alone == crowded
  greedy = serve(pool, [(PROMPTS[1], 12, {})])[0]
  other_seed = serve(pool, [(PROMPTS[1], 12, dict(options, seed=8))])[0]
  assert alone != greedy or alone != other_seed


def test_a_request_the_rows_cannot_hold_is_refused(pools):
  with pytest.raises(ValueError, match=r"with max_tokens=10 it needs 34 positions but this "
                                       r"server allows 32"):
    pools[1].check_request(25, 10)
  pools[1].check_request(23, 10)
