"""Shared defaults; experiment configs override a few fields. Not meant to be run alone.

Every key, its default, what it allows and what it means is one entry of the run config's schema,
`ulskip_jax/config_schema.py` (`KEYS`; the model keys derived from `ModelConfig`), listed in
docs/training.md.
"""

import ml_collections

from ulskip_jax import config_schema


def get_config() -> ml_collections.ConfigDict:
  return config_schema.default_config()
