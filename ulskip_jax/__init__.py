"""ulskip_jax: Unified Layer Skipping (Liu, Meng and Zhou, 2024) in JAX / Flax NNX."""

import logging as _logging

# transformers announces on import that PyTorch is missing; we only use its tokenizers, which
# need no torch, so that notice is noise. Its other warnings and errors still show.
_logging.getLogger("transformers").addFilter(
    lambda record: "PyTorch was not found" not in record.getMessage())

from ulskip_jax.decode import generate, generate_text
from ulskip_jax.gguf_io import smollm2_path
from ulskip_jax.hf import config_from_hf, config_to_hf, from_pretrained, save_pretrained
from ulskip_jax.kv_cache import KVCache, cache_bytes, init_cache
from ulskip_jax.model import Decoder, ModelConfig
from ulskip_jax.skipping import SkipPlan, kept_layers, plan_layers

__all__ = ["Decoder", "KVCache", "ModelConfig", "SkipPlan", "cache_bytes", "config_from_hf",
           "config_to_hf", "from_pretrained", "generate", "generate_text", "init_cache",
           "kept_layers", "plan_layers", "save_pretrained", "smollm2_path"]
