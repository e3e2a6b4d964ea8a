"""The run config has one schema (`config_schema.KEYS`, the model keys derived from ModelConfig):
a key or a ModelConfig field added in one place only fails here.

configs/base.py holds exactly the schema's keys, config_check rejects a bad value of each of them
in one line, docs/training.md lists each once as the schema generates it, every ModelConfig field
has a source, and every model key reaches the ModelConfig a run builds (from scratch all of them;
over model.init_from the runtime ones only, the architecture being the checkpoint's). The runtime
fields, the cluster variables and the hub probe have one home, which every reader uses.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import jax
import ml_collections
import pytest

from configs import base
from configs import tiny as tiny_config
from ulskip_jax import config_check, config_schema
from ulskip_jax.config_schema import KEYS, MODEL_FIELDS, MODEL_KEYS, Source
from ulskip_jax.model import ModelConfig

REPO = pathlib.Path(__file__).resolve().parents[1]

# A valid value other than the default for every model key, on configs/tiny.py's model (4 layers,
# width 32, 4 heads, 2 KV heads of 8): (the keys to set, the ModelConfig fields they must give).
# A new model key needs a row here.
SAMPLES = {
    "num_layers": ({"num_layers": 6}, None),
    "d_model": ({"d_model": 48}, None),
    "num_heads": ({"num_heads": 8}, None),
    "num_kv_heads": ({"num_kv_heads": 4}, None),
    "head_dim": ({"head_dim": 16}, None),
    "d_ff": ({"d_ff": 96}, None),
    "norm": ({"norm": "layer"}, None),
    "norm_eps": ({"norm_eps": 1e-5}, None),
    "mlp": ({"mlp": "plain"}, None),
    "act": ({"act": "gelu_tanh"}, None),
    "pos": ({"pos": "alibi"}, None),
    "max_position": ({"max_position": 512}, None),
    "rope_theta": ({"rope_theta": 5e5}, None),
    "rope_scaling": ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
                     {"rope_scaling": (("factor", 2.0), ("rope_type", "linear"))}),
    "rope_layers": ({"rope_layers": (True, False, True, True)}, None),
    "qk_norm": ({"qk_norm": True}, None),
    "attention_windows": ({"attention_windows": (16, None, 16, None)}, None),
    "local_rope_theta": ({"attention_windows": (16, None, 16, None), "local_rope_theta": 100.0},
                         None),
    "post_norms": ({"post_norms": True}, None),
    "embed_scale": ({"embed_scale": True}, None),
    "query_pre_attn_scalar": ({"query_pre_attn_scalar": 16}, None),
    "attn_softcap": ({"attn_softcap": 50.0}, None),
    "final_softcap": ({"final_softcap": 30.0}, None),
    "qkv_bias": ({"qkv_bias": True}, None),
    "out_bias": ({"out_bias": True}, None),
    "mlp_bias": ({"mlp_bias": True}, None),
    "embed_norm": ({"embed_norm": True}, None),
    "tie_embeddings": ({"tie_embeddings": False}, None),
    "dtype": ({"dtype": "bfloat16"}, None),
    "param_dtype": ({"param_dtype": "bfloat16"}, None),
    "remat": ({"remat": True}, None),
    "attention_impl": ({"attention_impl": "xla"}, None),
}


def _leaves(config, prefix=""):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, prefix + key + ".")
    else:
      yield prefix + key, value


def _tiny(**model) -> ml_collections.ConfigDict:
  config = tiny_config.get_config()
  for key, value in model.items():
    setattr(config.model, key, value)
  return config


def test_base_holds_exactly_the_schema():
  leaves = dict(_leaves(base.get_config()))
  assert set(leaves) == set(KEYS), (set(leaves) ^ set(KEYS))
  for path, value in leaves.items():
    assert value == KEYS[path].default, path
    KEYS[path].check(path, value)  # every default is allowed


@pytest.mark.parametrize("path", sorted(KEYS))
def test_config_check_refuses_a_bad_value_of_every_key(path, tmp_path):
  config = ml_collections.ConfigDict(tiny_config.get_config().to_dict(), type_safe=False)
  config.update_from_flattened_dict({path: object()})  # of no type any key allows
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate_run(config, str(tmp_path / "run"))
  assert str(e.value).startswith(f"{path}=<object object at") and "\n" not in str(e.value)


def test_docs_list_every_key_once_as_generated():
  text = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
  assert config_schema.docs_with_tables(text) == text, (
      "docs/training.md's tables are not the schema's: run "
      "python -c 'from ulskip_jax import config_schema; config_schema.write_docs()'")
  groups = config_schema.documented_groups(text)
  assert sorted(groups) == sorted({config_schema.group_of(p) for p in KEYS}), groups
  for path in KEYS:
    assert text.count(f"| `{path}` |") == 1, path


def test_every_model_field_has_a_source():
  fields = [f.name for f in dataclasses.fields(ModelConfig)]
  assert list(MODEL_FIELDS) == fields, "a ModelConfig field needs a row in MODEL_FIELDS"
  for name, spec in MODEL_FIELDS.items():
    settable = {Source.ARCHITECTURE: f"model.{name}", Source.RUNTIME: f"model.{name}",
                Source.ADAPTERS: f"optim.lora.{name.removeprefix('lora_')}"}.get(spec.source)
    if settable:
      assert settable in KEYS, name
    else:
      assert spec.source is Source.TOKENIZER and f"model.{name}" not in KEYS, name
  assert set(SAMPLES) == set(MODEL_KEYS), "a model key needs a row in SAMPLES"


def test_each_choice_field_has_one_list_of_values():
  """A Literal field's allowed values are its ModelConfig annotation's: the dataclass refuses any
  other value in one line, and the schema allows exactly those."""
  choices = ModelConfig.choices()
  assert {"norm", "mlp", "act", "pos", "dtype", "param_dtype", "attention_impl"} <= set(choices)
  built = config_schema.model_config(_tiny(), vocab_size=97)
  for field, values in choices.items():
    assert KEYS[f"model.{field}"].check.allowed == ", ".join(f"`{v}`" for v in values), field
    with pytest.raises(ValueError, match=rf"^{field}='bogus' is unknown: allowed are "
                                         rf"{re.escape(str(values))}$"):
      dataclasses.replace(built, **{field: "bogus"})


@pytest.mark.parametrize("name", MODEL_KEYS)
def test_every_model_key_reaches_the_model(name, tmp_path):
  """Set from a run config, validated, and in the ModelConfig a run from scratch builds."""
  overrides, expected = SAMPLES[name]
  config = _tiny(**overrides)
  config_check.validate_run(config, str(tmp_path / "run"))
  built = config_schema.model_config(config, vocab_size=97)
  for field, value in (expected or overrides).items():
    assert getattr(built, field) == value, field
    assert getattr(built, field) != getattr(config_schema.model_config(_tiny(), 97), field)


def test_over_init_from_only_the_runtime_keys_apply():
  """The checkpoint's architecture wins over every model key; the runtime keys and the adapters
  apply over it (what train_lib's Trainer builds with model.init_from)."""
  checkpoint = config_schema.model_config(_tiny(), vocab_size=50)
  config = _tiny(**{k: v for name in MODEL_KEYS for k, v in SAMPLES[name][0].items()})
  config.model.init_from = "/a/checkpoint"
  config.optim.lora.rank = 4
  built = config_schema.model_config(config, base=checkpoint)
  for name in MODEL_KEYS:
    want = config.model[name] if name in config_schema.RUNTIME_FIELDS else getattr(checkpoint, name)
    assert getattr(built, name) == want, name
  assert built.vocab_size == 50 and built.lora_rank == 4


def test_gemma_switches_from_a_run_config_are_checked_against_each_other(tmp_path):
  for overrides, named in (
      ({"attention_windows": (16, None)}, "model.attention_windows=(16, None) is invalid: it "
       "needs one entry per layer (4)"),
      ({"attention_windows": (16, 0, None, None)}, "model.attention_windows[1]=0"),
      ({"attn_softcap": 50.0, "attention_impl": "xla"}, "model.attention_impl='xla' cannot "
       "compute this model's attention")):
    with pytest.raises(config_check.ConfigError, match=re.escape(named)):
      config_check.validate_run(_tiny(**overrides), str(tmp_path / "run"))


def test_one_home_for_runtime_fields_cluster_variables_and_the_hub_probe():
  sources = {p.relative_to(REPO): p.read_text(encoding="utf-8")
             for p in [*REPO.glob("ulskip_jax/*.py"), REPO / "train.py", REPO / "infer.py"]}
  for pattern in (r"RUNTIME_FIELDS\s*=", r"SLURM_JOB_ID", r"TPU_WORKER_HOSTNAMES",
                  r"constants\.ENDPOINT"):  # where the hub is: hub.first_hop
    homes = [str(p) for p, text in sources.items() if re.search(pattern, text)]
    assert len(homes) == 1, (pattern, homes)


def test_cluster_variables_start_jax_distributed_and_defer_the_mesh_check(monkeypatch, tmp_path):
  from ulskip_jax import train_lib
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a: calls.append(a))
  config = tiny_config.get_config()
  config.mesh.shape = (len(jax.devices()) + 1, 1, 1)  # more devices than this process has
  for name in config_schema.CLUSTER_ENV:
    monkeypatch.setenv(name, "1")
    train_lib.maybe_initialize_distributed(config.distributed)
    config_check.validate_run(config, str(tmp_path / "run"))  # the mesh waits for the cluster
    monkeypatch.delenv(name)
  assert len(calls) == len(config_schema.CLUSTER_ENV)
  with pytest.raises(config_check.ConfigError, match=r"mesh.shape="):
    config_check.validate_run(config, str(tmp_path / "run"))
