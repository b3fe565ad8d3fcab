"""`EngineAddress`: the ``--engine ID=URL[/ROLE]`` grammar, one OpenAI-compatible server (a
vLLM) named by hand. ``interlock serve --engine`` serves over it; ``interlock register
--engine`` registers it in etcd. Pure parsing; no I/O."""

from __future__ import annotations

import attrs
import httpx

from .._errors import ConfigError
from ..engines import ROLES, Role, WorkerRecord

__all__ = ["ENGINE_FORM", "EngineAddress"]

#: What ``--engine`` takes, for error messages.
ENGINE_FORM = (
    "ID=URL or ID=URL/ROLE (URL: http(s)://HOST:PORT of an OpenAI-compatible server; ROLE: "
    "agg, prefill or decode)"
)
_ENGINE_EXAMPLE = "e.g. 1=http://127.0.0.1:8101, 2=http://10.0.0.7:8000/prefill"


@attrs.frozen
class EngineAddress:
    """One ``--engine ID=URL[/ROLE]``: an OpenAI-compatible server (a vLLM) at ``url`` that
    interlock serves over as worker ``worker_id``; its KV events arrive with topic ``kv@ID``."""

    worker_id: int
    url: str
    role: Role = "agg"

    @classmethod
    def parse(cls, text: str) -> EngineAddress:
        """Parse ``ID=URL`` or ``ID=URL/ROLE``. Pure; no I/O.

        Raises:
            ConfigError: ``text`` is not of that form (the message quotes it and shows the
                form).
        """

        def bad(why: str) -> ConfigError:
            return ConfigError(
                f"--engine {text!r}: {why}; the form is {ENGINE_FORM}, {_ENGINE_EXAMPLE}"
            )

        ident, equals, url = text.partition("=")
        if not equals:
            raise bad("no '=' between the engine id and its URL")
        if not (ident.isascii() and ident.isdigit()):
            raise bad(f"the engine id {ident!r} is not a whole number")
        role: Role = "agg"
        head, slash, last = url.rstrip("/").rpartition("/")
        if slash and last in ROLES and "://" in head and head.split("://", 1)[1]:
            url, role = head, next(r for r in ROLES if r == last)
        if not url.startswith(("http://", "https://")):
            raise bad(f"the URL {url!r} does not start with http:// or https://")
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise bad(f"the URL {url!r} is not valid ({exc})") from None
        if not parsed.host:
            raise bad(f"the URL {url!r} has no host")
        return cls(int(ident), url.rstrip("/"), role)

    def record(self, *, kv_replay: str | None = None, block_size: int = 16) -> WorkerRecord:
        """The `WorkerRecord` of this engine (kind ``"openai"``), from which the engine
        factory builds it, or under which ``interlock register`` registers it."""
        return WorkerRecord(
            worker_id=self.worker_id,
            kind="openai",
            url=self.url,
            role=self.role,
            block_size=block_size,
            kv_replay=kv_replay,
        )

    def __str__(self) -> str:
        return f"{self.worker_id}={self.url}/{self.role}"
