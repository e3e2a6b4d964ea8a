"""The hub probe connects to the first hop the hub clients take: the proxy for the endpoint's
scheme unless no_proxy exempts the endpoint, else the endpoint; and fails fast when nothing
listens there."""

from __future__ import annotations

import time

import pytest
from huggingface_hub import constants

from ulskip_jax import hub

_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture
def env(monkeypatch):
  for name in _PROXY_VARS:
    monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(name.upper(), raising=False)
  return monkeypatch


@pytest.mark.parametrize("endpoint,proxies,hop", [
    ("https://hub.example", {}, ("hub.example", 443)),
    ("http://127.0.0.1:9", {}, ("127.0.0.1", 9)),
    ("https://hub.example", {"https_proxy": "http://proxy.example:3128"}, ("proxy.example", 3128)),
    ("https://hub.example", {"all_proxy": "proxy.example:8080"}, ("proxy.example", 8080)),
    # A proxy for the other scheme is not the one the client takes.
    ("http://hub.example", {"https_proxy": "http://proxy.example:3128"}, ("hub.example", 80)),
    # no_proxy exempts the endpoint: the client connects to it directly.
    ("https://hub.example", {"https_proxy": "http://proxy.example:3128",
                             "no_proxy": "hub.example"}, ("hub.example", 443)),
])
def test_first_hop(env, endpoint, proxies, hop):
  env.setattr(constants, "ENDPOINT", endpoint)
  for name, value in proxies.items():
    env.setenv(name, value)
  assert hub.first_hop() == hop


def test_a_dead_proxy_fails_fast_even_when_the_hub_would_answer(env):
  # Port 9 (discard) on localhost refuses at once, whether or not this machine is online.
  env.setattr(constants, "ENDPOINT", "https://huggingface.co")
  env.setenv("https_proxy", "http://127.0.0.1:9")
  start = time.monotonic()
  with pytest.raises(ConnectionRefusedError):
    hub.probe()
  assert time.monotonic() - start < hub.PROBE_TIMEOUT_S
