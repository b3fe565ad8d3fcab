"""Endpoints: the ``host:port`` a gateway sends a worker's requests to, and back.

A gateway (Envoy) forwards HTTP, so only a worker with an HTTP surface can be picked: an
engine of kind ``openai`` (``--engine ID=URL``, an etcd record with a ``url``: a vLLM, or an
``interlock worker --openai-port`` reached at that port), whose endpoint is the ``host:port``
of its URL (the scheme's default port when the URL names none), or an ``interlock worker
--openai-port --etcd`` found in etcd and reached over the worker protocol, whose record names
its HTTP surface's URL (the engine's ``http_url``). In-process mock workers and ``interlock
worker``s without ``--openai-port`` have none.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import httpx

from ..engines import Engine

__all__ = ["endpoint_of", "host_port", "http_endpoints", "match_endpoints"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


def endpoint_of(engine: Engine) -> str | None:
    """``host:port`` of ``engine``'s HTTP surface (``[v6]:port`` for an IPv6 host): its
    ``http_url`` (a worker's surface beside the worker protocol), else its ``base_url`` (an
    HTTP engine's); None when it has neither. Pure."""
    url = getattr(engine, "http_url", None)
    if type(url) is not str:
        url = getattr(engine, "base_url", None)
    if type(url) is not str:
        return None
    return url_endpoint(url)


@functools.lru_cache(maxsize=4096)
def url_endpoint(url: str) -> str | None:
    """``host:port`` of ``url`` (None when it has no host). Pure (and cached: every pick asks
    for every worker's)."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return None
    host = parsed.host
    if not host:
        return None
    port = parsed.port if parsed.port is not None else _DEFAULT_PORTS.get(parsed.scheme, 80)
    return host_port(host, port)


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 ``host`` in brackets (``[::1]:8000``). Pure."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def http_endpoints(workers: Mapping[int, Engine]) -> dict[int, str]:
    """Each worker of ``workers`` that has an HTTP surface -> its endpoint. Pure."""
    found = {}
    for worker_id, engine in workers.items():
        endpoint = endpoint_of(engine)
        if endpoint is not None:
            found[worker_id] = endpoint
    return found


def _host(entry: str) -> str:
    """The host of ``host:port``, ``[v6]:port``, ``[v6]``, or a bare host or IPv4 address."""
    if entry.startswith("["):
        return entry[1 : entry.find("]")] if "]" in entry else entry
    if entry.count(":") == 1:
        return entry.partition(":")[0]
    return entry  # a bare host, or a bare IPv6 address


def _with_port(entry: str) -> bool:
    return (
        entry.rpartition("]")[2].startswith(":")
        if entry.startswith("[")
        else (entry.count(":") == 1)
    )


def match_endpoints(entries: Iterable[str], endpoints: Mapping[int, str]) -> frozenset[int]:
    """The workers whose endpoint ``entries`` name: ``host:port`` names that endpoint, a bare
    host (or IP) every endpoint on that host (GAIE's conformance lists pod IPs). Pure."""
    chosen: set[int] = set()
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        if _with_port(entry):
            chosen.update(w for w, e in endpoints.items() if e == entry)
        else:
            host = _host(entry)
            chosen.update(w for w, e in endpoints.items() if _host(e) == host)
    return frozenset(chosen)
