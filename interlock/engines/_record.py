"""`WorkerRecord`: what a worker is and where to reach it, as a discovery service publishes it.

The record names the engine *kind* that reaches the worker (``"remote"``: an ``interlock
worker`` over TCP, the default; ``"openai"``: an OpenAI-compatible HTTP server; ...), so that
whoever reads records (etcd's `WorkerWatcher`) hands them to `engine_from_record` without
knowing any kind. Its JSON form is what etcd stores under ``{prefix}/workers/{worker_id}``.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from ..wire._snapshot import ROLES, Role

#: The kind a record without a ``kind`` field names: records written before kinds existed
#: are all ``interlock worker``s.
DEFAULT_KIND = "remote"


class BadRecord(ValueError):
    """A worker record that does not parse, or lacks what its kind needs (the message says
    which field is wrong)."""


@attrs.frozen(kw_only=True)
class WorkerRecord:
    """What a worker registers: which kind of engine reaches it, where, and what it is.

    ``kind`` names the engine kind (`engine_kinds`). Where the worker is: ``host`` and
    ``port`` (an ``interlock worker``'s TCP listener), or ``url`` (an HTTP server's root,
    ``http://10.0.0.5:8000``), or neither (an in-process ``mock``); the kind's builder
    says which it needs (`BadRecord` otherwise).
    ``block_size`` is the worker's tokens per KV block, as it registered them.
    ``kv_replay`` is an engine's KV-event replay endpoint (vLLM's ``replay_endpoint``), for
    kinds fed by the frontend's KV-event feed.
    """

    worker_id: int
    host: str = ""
    port: int = 0
    role: Role = "agg"
    block_size: int = 16
    kind: str = DEFAULT_KIND
    url: str | None = None
    kv_replay: str | None = None

    @property
    def address(self) -> str:
        """Where the frontend reaches the worker, for messages: ``host:port`` (an
        ``interlock worker``'s worker protocol, even when its record also has the ``url`` of
        its HTTP surface), else its ``url``."""
        if (self.host or self.port) or self.url is None:
            return f"{self.host}:{self.port}"
        return self.url

    def to_json(self) -> str:
        """The record as etcd stores it. ``kind`` is written only when it is not the default
        and ``url`` only when set, so an ``interlock worker``'s record reads as it did before
        records had kinds."""
        data: dict[str, Any] = {"worker_id": self.worker_id}
        if self.kind != DEFAULT_KIND:
            data["kind"] = self.kind
        if self.host or self.port:
            data["host"] = self.host
            data["port"] = self.port
        if self.url is not None:
            data["url"] = self.url
        if self.kv_replay is not None:
            data["kv_replay"] = self.kv_replay
        data["role"] = self.role
        data["block_size"] = self.block_size
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: bytes | str) -> WorkerRecord:
        """Parse a stored record (pure). Fields it does not know are ignored (a newer
        worker's record still parses); ``kind`` is not checked against the registered kinds
        here (`engine_from_record` does).

        Raises:
            BadRecord: not a JSON object, a field missing (``worker_id``; ``host`` without
                ``port`` or the reverse) or of the wrong type or range.
        """
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRecord(f"not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise BadRecord(f"not a JSON object: {raw!r}")

        def field(name: str, kind: type, default: Any = None) -> Any:
            value = raw.get(name, default)
            if type(value) is not kind:
                raise BadRecord(f"{name} must be a {kind.__name__}, got {value!r}")
            return value

        worker_id = field("worker_id", int)
        kind = field("kind", str, DEFAULT_KIND)
        url = raw.get("url")
        if url is not None and (type(url) is not str or not url):
            raise BadRecord(f"url must be a non-empty str, got {url!r}")
        kv_replay = raw.get("kv_replay")
        if kv_replay is not None and (type(kv_replay) is not str or not kv_replay):
            raise BadRecord(f"kv_replay must be a non-empty str, got {kv_replay!r}")
        # Host and port come together or not at all (which a kind needs, its builder says).
        where = "host" in raw or "port" in raw
        host = field("host", str) if where else ""
        port = field("port", int) if where else 0
        role = field("role", str, "agg")
        block_size = field("block_size", int, 16)
        if worker_id < 0 or (where and (not host or not 1 <= port <= 65535)) or block_size < 1:
            raise BadRecord(f"out of range: {raw!r}")
        if not kind:
            raise BadRecord(f"kind must name an engine kind, got {kind!r}")
        if role not in ROLES:
            raise BadRecord(f"role must be one of {ROLES}, got {role!r}")
        return cls(
            worker_id=worker_id,
            host=host,
            port=port,
            role=role,
            block_size=block_size,
            kind=kind,
            url=url,
            kv_replay=kv_replay,
        )
