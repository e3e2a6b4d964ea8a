"""Whether the Hugging Face Hub can be reached, decided in seconds.

huggingface_hub's and datasets' HTTP clients retry for tens of seconds (or, without a timeout,
hang) before an unreachable hub fails, so a model or dataset named by hub id is first probed with
one TCP connection to the first hop those clients would take: the proxy the environment sets for
the hub endpoint's scheme (`https_proxy`, `all_proxy`), unless `no_proxy` exempts the endpoint's
host, else the endpoint itself. Probing the endpoint directly behind a proxy would fail on networks
that only the proxy leaves; skipping the probe behind a proxy would lose the fast failure when the
proxy is down. A connection that opens proves the first hop only; the client reports the rest.
"""

from __future__ import annotations

import socket
import urllib.parse
import urllib.request

PROBE_TIMEOUT_S = 3.0  # a reachable hub or proxy answers in milliseconds
_PORTS = {"https": 443, "http": 80}


def first_hop() -> tuple[str, int]:
  """(host, port) the hub clients connect to first: a proxy, or the hub endpoint."""
  from huggingface_hub import constants
  endpoint = urllib.parse.urlparse(constants.ENDPOINT)
  proxies = urllib.request.getproxies()
  proxy = proxies.get(endpoint.scheme) or proxies.get("all")
  if proxy and not urllib.request.proxy_bypass(endpoint.hostname):
    url = urllib.parse.urlparse(proxy if "://" in proxy else "http://" + proxy)
    return url.hostname, url.port or _PORTS.get(url.scheme, 80)
  return endpoint.hostname, endpoint.port or _PORTS.get(endpoint.scheme, 443)


def probe(timeout_s: float = PROBE_TIMEOUT_S) -> None:
  """Returns when a TCP connection to `first_hop()` opens; raises the OSError otherwise
  (refused, timed out, unknown host)."""
  socket.create_connection(first_hop(), timeout=timeout_s).close()
