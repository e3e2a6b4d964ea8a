"""Q4_K and Q6_K GGUF files end to end: the weights we load equal llama.cpp's dequantisation
written out here from its reference C (`dequantize_row_q4_K`, `dequantize_row_q6_K` in
ggml-quants.c), not from `gguf.quants` (which both we and transformers call), and our logits equal
transformers' GGUF loader's on the same file.

gguf.quants cannot quantise K-quants, so each matrix is random blocks with small f16 scales: every
bit of the sub-block scales, mins and quants is exercised. Every row is 256 values (one super-block)
so that every matrix can be a K-quant; the two types alternate over the matrices.
"""

from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from ulskip_jax import gguf_io, hf
from ulskip_jax import testing as tiny

D, F, L, H, K, HD, V = 256, 256, 2, 4, 2, 64, 96

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def dequantize_q4_k(block: bytes) -> np.ndarray:
  """One 144-byte Q4_K super-block -> 256 floats (ggml-quants.c, dequantize_row_q4_K)."""
  d, dmin = (float(np.frombuffer(block[i:i + 2], np.float16)[0]) for i in (0, 2))
  scales, qs = block[4:16], block[16:144]

  def scale_min(j):  # get_scale_min_k4
    if j < 4:
      return scales[j] & 63, scales[j + 4] & 63
    return ((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4))

  out = []
  for j in range(0, 8, 2):  # 64 values per step: low nibbles, then high nibbles, of 32 bytes
    q = qs[j * 16:j * 16 + 32]
    sc, m = scale_min(j)
    out += [d * sc * (b & 0xF) - dmin * m for b in q]
    sc, m = scale_min(j + 1)
    out += [d * sc * (b >> 4) - dmin * m for b in q]
  return np.array(out, np.float32)


def dequantize_q6_k(block: bytes) -> np.ndarray:
  """One 210-byte Q6_K super-block -> 256 floats (ggml-quants.c, dequantize_row_q6_K)."""
  ql, qh = block[0:128], block[128:192]
  sc = np.frombuffer(block[192:208], np.int8)
  d = float(np.frombuffer(block[208:210], np.float16)[0])
  out = np.zeros(256, np.float32)
  for n in range(2):  # two halves of 128 values
    for l in range(32):
      is_ = l // 16
      lo, hi, h = ql[64 * n + l], ql[64 * n + l + 32], qh[32 * n + l]
      q = [(lo & 0xF) | ((h >> 0 & 3) << 4), (hi & 0xF) | ((h >> 2 & 3) << 4),
           (lo >> 4) | ((h >> 4 & 3) << 4), (hi >> 4) | ((h >> 6 & 3) << 4)]
      for i in range(4):
        out[128 * n + l + 32 * i] = d * sc[8 * n + is_ + 2 * i] * (q[i] - 32)
  return out


REFERENCE = {Q.Q4_K: dequantize_q4_k, Q.Q6_K: dequantize_q6_k}


def random_blocks(kind, rows, rng):
  """rows x 256 values of random `kind` blocks with finite, small f16 super-block scales."""
  _, size = gguf.GGML_QUANT_SIZES[kind]
  raw = rng.integers(0, 256, (rows, size), dtype=np.uint8)
  for start in {Q.Q4_K: (0, 2), Q.Q6_K: (208,)}[kind]:  # d (and dmin)
    raw[:, start:start + 2] = np.frombuffer(
        rng.uniform(0.002, 0.01, rows).astype(np.float16).tobytes(), np.uint8).reshape(rows, 2)
  return raw


def reference_values(kind, raw):
  return np.stack([REFERENCE[kind](bytes(row)) for row in raw])


@pytest.fixture(scope="module")
def kquant_file(tmp_path_factory):
  """(path, {GGUF name: (type, its raw blocks [rows, bytes])}) of a 2-layer Llama."""
  path = tmp_path_factory.mktemp("kquants") / "tiny-k.gguf"
  rng = np.random.default_rng(0)
  shapes = {"token_embd.weight": (V, D), "output_norm.weight": (D,)}
  for i in range(L):
    shapes.update({f"blk.{i}.attn_norm.weight": (D,), f"blk.{i}.ffn_norm.weight": (D,),
                   f"blk.{i}.attn_q.weight": (H * HD, D), f"blk.{i}.attn_k.weight": (K * HD, D),
                   f"blk.{i}.attn_v.weight": (K * HD, D),
                   f"blk.{i}.attn_output.weight": (D, H * HD), f"blk.{i}.ffn_gate.weight": (F, D),
                   f"blk.{i}.ffn_up.weight": (F, D), f"blk.{i}.ffn_down.weight": (D, F)})
  writer = gguf.GGUFWriter(str(path), "llama")
  meta = {"block_count": L, "context_length": 64, "embedding_length": D, "feed_forward_length": F,
          "attention.head_count": H, "attention.head_count_kv": K, "rope.dimension_count": HD,
          "rope.freq_base": 10000.0, "attention.layer_norm_rms_epsilon": 1e-5, "vocab_size": V}
  for key, value in meta.items():
    (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(f"llama.{key}", value)
  stored, matrices = {}, 0
  for name, shape in shapes.items():
    if len(shape) == 1:
      writer.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
      continue
    kind = (Q.Q4_K, Q.Q6_K)[matrices % 2]
    matrices += 1
    raw = random_blocks(kind, shape[0], rng)
    writer.add_tensor(name, raw, raw_dtype=kind)
    stored[name] = kind, raw
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path, stored


def test_weights_equal_llama_cpp_reference_dequantisation(kquant_file):
  path, stored = kquant_file
  assert {kind for kind, _ in stored.values()} == {Q.Q4_K, Q.Q6_K}
  header = gguf_io.read_header(path)
  tensors = gguf_io.read_tensors(header, gguf_io.hf_config(header), _hf_names())
  assert len(tensors) == len(stored)
  for gguf_name, w in tensors.values():
    kind, raw = stored[gguf_name]
    want = reference_values(kind, raw[:HD])  # the first head's rows (the C loops are slow)
    if ".attn_q." in gguf_name or ".attn_k." in gguf_name:  # llama.cpp's row pairs -> halves
      want = want.reshape(-1, 2, D).swapaxes(0, 1).reshape(want.shape)
    np.testing.assert_allclose(w[:HD], want, rtol=1e-6, atol=1e-7,
                               err_msg=f"{gguf_name} ({kind.name})")


def _hf_names():
  names = ["model.embed_tokens.weight"]
  for i in range(L):
    names += [f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"]
    names += [f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
  return names


def test_logits_equal_transformers_gguf_loader(kquant_file):
  path, _ = kquant_file
  model, _ = hf.from_pretrained(path)
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      path.parent, gguf_file=path.name, dtype=torch.float32).eval()
  tokens = np.random.default_rng(1).integers(0, V, (2, 10))
  with torch.no_grad():
    want = reference(torch.tensor(tokens), use_cache=False).logits.numpy()
  got = np.asarray(tiny.jit_call(model)(jnp.asarray(tokens)))
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
