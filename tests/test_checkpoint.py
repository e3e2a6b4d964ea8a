"""Checkpointer: round trips, retention, resharding, corruption, kills and preemption.

Tests that need another device count or a killed process run a child Python process,
because XLA_FLAGS must be set before jax is imported.
"""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ulskip_jax import checkpoint
from ulskip_jax.checkpoint import CheckpointError, Checkpointer, PreemptionGuard

REPO = pathlib.Path(__file__).resolve().parents[1]


def _params(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {
      'embed': jax.random.normal(k1, (16, 8), jnp.bfloat16),
      'layers': [{'w': jax.random.normal(k2, (8, 8)), 'b': jnp.arange(8, dtype=jnp.int32)}],
  }


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _run_child(code: str, devices: int) -> subprocess.Popen:
  flags = os.environ.get('XLA_FLAGS', '')  # conftest's fast-compile flags, kept
  env = dict(os.environ, XLA_FLAGS=f'{flags} --xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  return subprocess.Popen([sys.executable, '-c', textwrap.dedent(code)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_child(proc: subprocess.Popen, timeout=60) -> str:
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return out


def _make_tokenizer(path: pathlib.Path) -> pathlib.Path:
  path.mkdir()
  (path / 'tokenizer.json').write_text('{"model": {"vocab": {"a": 0}}}')
  (path / 'tokenizer_config.json').write_text('{}')
  (path / 'model.safetensors').write_bytes(b'weights, not copied')
  return path


def test_round_trip_with_opt_state_meta_and_tokenizer(tmp_path):
  params = _params()
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  key = jax.random.key(7)
  meta = {'rng': key, 'data': {'epoch': 1, 'index': 42}, 'config': {'lr': 1e-3}}
  tokenizer_dir = _make_tokenizer(tmp_path / 'tok')
  with Checkpointer(tmp_path / 'ckpt', tokenizer_dir=str(tokenizer_dir)) as ckpt:
    assert ckpt.save(3, params, opt_state, meta=meta)
    ckpt.wait()
    got_params, got_opt, got_meta = ckpt.restore(
        params_target=_abstract(params), opt_state_target=_abstract(opt_state))
    tok = pathlib.Path(ckpt.tokenizer_dir(3))

  _assert_tree_equal(got_params, params)
  _assert_tree_equal(got_opt, opt_state)
  assert isinstance(got_opt[0], optax.ScaleByAdamState)  # structure comes from the target
  assert got_meta['step'] == 3
  assert got_meta['data'] == {'epoch': 1, 'index': 42} and got_meta['config'] == {'lr': 1e-3}
  restored_key = jax.random.wrap_key_data(np.array(got_meta['rng'], np.uint32))
  np.testing.assert_array_equal(jax.random.key_data(restored_key), jax.random.key_data(key))
  names = {p.name for p in tok.iterdir()}  # Orbax adds its commit_success.txt
  assert {'tokenizer.json', 'tokenizer_config.json'} <= names
  assert 'model.safetensors' not in names
  assert (tok / 'tokenizer.json').read_text() == (tokenizer_dir / 'tokenizer.json').read_text()


def test_restore_without_target_gives_arrays_on_default_device(tmp_path):
  params = _params()
  with Checkpointer(tmp_path, async_=False) as ckpt:
    ckpt.save(1, params, meta={'model': {'layers': 1}})
  got = checkpoint.restore_params(tmp_path)
  _assert_tree_equal(got.params, {'embed': params['embed'], 'layers': params['layers']})
  assert got.meta == {'model': {'layers': 1}, 'step': 1}
  assert got.tokenizer_dir is None
  assert got.params['embed'].sharding.device_set == {jax.local_devices()[0]}


def test_inference_only_save_has_no_opt_state(tmp_path):
  params = _params()
  with Checkpointer(tmp_path, async_=False) as ckpt:
    ckpt.save(1, params)
    _, opt_state, _ = ckpt.restore()
    assert opt_state is None
    with pytest.raises(CheckpointError, match='no opt_state'):
      ckpt.restore(opt_state_target=_abstract(optax.sgd(1.0).init(params)))


def test_nnx_state_round_trip(tmp_path):
  class Tiny(nnx.Module):

    def __init__(self, rngs):
      self.linear = nnx.Linear(4, 8, param_dtype=jnp.bfloat16, rngs=rngs)
      self.norm = nnx.RMSNorm(8, rngs=rngs)

  model = Tiny(nnx.Rngs(0))
  with Checkpointer(tmp_path, async_=False) as ckpt:
    ckpt.save(1, nnx.state(model, nnx.Param))
    # nnx.eval_shape leaves carry no sharding (flax#5110): the caller adds it.
    abstract_model = nnx.eval_shape(lambda: Tiny(nnx.Rngs(1)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nnx.state(abstract_model, nnx.Param))
    params, _, _ = ckpt.restore(params_target=target)
  nnx.update(abstract_model, params)
  _assert_tree_equal(nnx.state(abstract_model, nnx.Param), nnx.state(model, nnx.Param))


def test_keep_deletes_old_steps_and_save_interval_is_respected(tmp_path):
  params = _params()
  with Checkpointer(tmp_path, save_every=2, keep=2, async_=False) as ckpt:
    saved = [step for step in range(1, 9) if ckpt.save(step, params)]
    assert saved == [2, 4, 6, 8]
    assert ckpt.all_steps() == [6, 8]
    assert ckpt.save(9, params, force=True)
    assert not ckpt.save(9, params, force=True)  # already there: skipped, not an error
    assert ckpt.all_steps() == [8, 9] and ckpt.latest_step() == 9
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ['8', '9']


def test_async_save_then_wait(tmp_path):
  params = {'w': jnp.ones((512, 512))}
  ckpt = Checkpointer(tmp_path, async_=True)
  assert ckpt.save(1, params, meta={'note': 'async'})
  ckpt.wait()
  assert (tmp_path / '1' / 'params').is_dir()
  ckpt.close()
  got, _, meta = Checkpointer(tmp_path, read_only=True).restore()
  _assert_tree_equal(got, params)
  assert meta['note'] == 'async'


def test_missing_directory_and_step_errors(tmp_path):
  missing = tmp_path / 'nope'
  with pytest.raises(CheckpointError, match=f'{missing} does not exist'):
    checkpoint.restore_params(missing)
  assert not missing.exists()  # a reader must not create it
  with Checkpointer(tmp_path / 'empty') as ckpt:
    with pytest.raises(CheckpointError, match='no checkpoint in .*empty'):
      ckpt.restore()
  with Checkpointer(tmp_path / 'ckpt', async_=False) as ckpt:
    ckpt.save(1, _params())
    ckpt.save(2, _params())
    with pytest.raises(CheckpointError, match=r'step 5 not in .*available steps: \[1, 2\]'):
      ckpt.restore(5)


def test_target_without_sharding_is_refused(tmp_path):
  params = _params()
  with Checkpointer(tmp_path, async_=False) as ckpt:
    ckpt.save(1, params)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    with pytest.raises(CheckpointError, match=r"params_target leaf \['embed'\] has no sharding"):
      ckpt.restore(params_target=target)


def _corrupt_truncate_data(step_dir: pathlib.Path):
  biggest = max((p for p in (step_dir / 'params').rglob('*') if p.is_file()),
                key=lambda p: p.stat().st_size)
  with open(biggest, 'r+b') as f:
    f.truncate(biggest.stat().st_size // 2)


def _corrupt_delete_data(step_dir: pathlib.Path):
  for p in (step_dir / 'params').rglob('d/*'):
    p.unlink()


def _corrupt_meta(step_dir: pathlib.Path):
  (step_dir / 'meta' / 'metadata').write_text('{garbage')


@pytest.mark.parametrize('corrupt', [_corrupt_truncate_data, _corrupt_delete_data, _corrupt_meta])
def test_corrupt_latest_names_step_and_fallback_restores_previous(tmp_path, corrupt):
  old, new = {'w': jnp.full((256,), 1.0)}, {'w': jnp.full((256,), 2.0)}
  with Checkpointer(tmp_path, async_=False) as ckpt:
    ckpt.save(10, old)
    ckpt.save(20, new)
  corrupt(tmp_path / '20')

  ckpt = Checkpointer(tmp_path, read_only=True)
  with pytest.raises(CheckpointError) as info:
    ckpt.restore(params_target=_abstract(old))
  message = str(info.value)
  assert '\n' not in message
  assert 'step 20' in message and 'earlier steps: [10]' in message
  assert '--config.checkpoint.resume_step=N' in message

  got, _, meta = ckpt.restore(params_target=_abstract(old), fallback=True)
  assert meta['step'] == 10
  _assert_tree_equal(got, old)


def test_restore_onto_another_mesh(tmp_path):
  # Written by 8 devices on a (4, 2) mesh, read by 2 devices on a (1, 2) mesh.
  writer = _run_child(f"""
      import jax, jax.numpy as jnp
      from jax.sharding import NamedSharding, PartitionSpec as P
      from ulskip_jax.checkpoint import Checkpointer
      mesh = jax.make_mesh((4, 2), ('data', 'model'))
      params = {{
          'w': jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16),
          'e': jnp.arange(16 * 4).reshape(16, 4).astype(jnp.bfloat16),
      }}
      params = {{
          'w': jax.device_put(params['w'], NamedSharding(mesh, P('data', 'model'))),
          'e': jax.device_put(params['e'], NamedSharding(mesh, P('model', None))),
      }}
      with Checkpointer({str(tmp_path)!r}) as ckpt:
        ckpt.save(5, params, meta={{'mesh': [4, 2]}})
      """, devices=8)
  _check_child(writer)
  reader = _run_child(f"""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      from ulskip_jax.checkpoint import Checkpointer
      assert jax.device_count() == 2
      mesh = jax.make_mesh((1, 2), ('data', 'model'))
      target = {{
          'w': jax.ShapeDtypeStruct((8, 16), jnp.float32,
                                    sharding=NamedSharding(mesh, P(None, 'model'))),
          'e': jax.ShapeDtypeStruct((16, 4), jnp.bfloat16,
                                    sharding=NamedSharding(mesh, P('model'))),
      }}
      params, _, meta = Checkpointer({str(tmp_path)!r}, read_only=True).restore(
          params_target=target)
      assert params['w'].sharding == target['w'].sharding
      assert params['e'].dtype == jnp.bfloat16
      np.testing.assert_array_equal(params['w'], np.arange(8 * 16).reshape(8, 16))
      np.testing.assert_array_equal(params['e'].astype(np.float32),
                                    np.arange(16 * 4).reshape(16, 4))
      assert meta == {{'mesh': [4, 2], 'step': 5}}
      print('ok')
      """, devices=2)
  assert _check_child(reader).strip() == 'ok'


def test_sigkill_during_save_leaves_previous_step_latest(tmp_path):
  # The child blocks inside the meta write of step 2, after the step's tmp dir exists,
  # and is killed there: a deterministic "killed mid-save".
  child = _run_child(f"""
      import time
      import jax.numpy as jnp
      import orbax.checkpoint as ocp
      from ulskip_jax.checkpoint import Checkpointer
      ckpt = Checkpointer({str(tmp_path)!r})
      ckpt.save(1, {{'w': jnp.full((1000,), 1.0)}})
      ckpt.wait()
      async def block(self, x, directory):
        print('saving', flush=True)
        time.sleep(60)
      ocp.JsonCheckpointHandler._save_fn = block
      ckpt.save(2, {{'w': jnp.full((1000,), 2.0)}})
      ckpt.wait()
      """, devices=1)
  assert child.stdout.readline().strip() == 'saving', child.stderr.read()[-3000:]
  child.send_signal(signal.SIGKILL)
  child.wait(timeout=10)
  child.stdout.close()
  child.stderr.close()
  assert any('tmp' in p.name for p in tmp_path.iterdir())  # really killed mid-save

  reader = Checkpointer(tmp_path, read_only=True)
  assert reader.all_steps() == [1]
  got, _, meta = reader.restore()
  assert meta['step'] == 1
  np.testing.assert_array_equal(got['w'], np.full((1000,), 1.0))

  with Checkpointer(tmp_path, async_=False) as writer:  # a resumed run saves step 2 again
    assert writer.save(2, {'w': jnp.full((1000,), 2.0)})
    assert writer.all_steps() == [1, 2]
  assert not any('tmp' in p.name for p in tmp_path.iterdir())  # the writer cleaned up


def test_preemption_guard_catches_sigterm():
  previous = signal.getsignal(signal.SIGTERM)
  with PreemptionGuard() as guard:
    assert not guard.should_stop(0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.requested and guard.should_stop(1)
  assert signal.getsignal(signal.SIGTERM) is previous


def test_sigterm_mid_training_saves_and_exits_cleanly(tmp_path):
  child = _run_child(f"""
      import jax.numpy as jnp
      from ulskip_jax.checkpoint import Checkpointer, PreemptionGuard
      ckpt = Checkpointer({str(tmp_path)!r}, save_every=1000)
      with PreemptionGuard() as guard:
        for step in range(1, 10**9):
          if step == 3:
            print('training', flush=True)
          stop = guard.should_stop(step)
          ckpt.save(step, {{'w': jnp.zeros(4)}}, meta={{'stopped': stop}}, force=stop)
          if stop:
            break
      ckpt.close()
      print('saved', step, flush=True)
      """, devices=1)
  assert child.stdout.readline().strip() == 'training', child.stderr.read()[-3000:]
  child.send_signal(signal.SIGTERM)
  out = _check_child(child)
  step = int(out.split()[-1])
  _, _, meta = Checkpointer(tmp_path, read_only=True).restore()
  assert meta == {'stopped': True, 'step': step}
