"""Reading request traces: the Mooncake JSONL format and the Azure LLM inference CSV format.

A trace holds no text. Each request becomes a prompt of deterministic token ids: the Mooncake
format gives one hash id per 512-token block of the prompt, prefix-chained (two requests that
share their first k ids share their first k x 512 tokens), and hash id ``h`` expands to the
tokens ``h*512, h*512+1, ..., h*512+511``. Equal ids give equal tokens and different ids
different ones, so prefix sharing survives any KV block size, and a prompt is rebuilt on
demand instead of being kept in memory. Azure rows carry lengths only: each request gets hash
ids of its own, so nothing is shared.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import attrs

TraceFormat = Literal["mooncake", "azure"]
TRACE_FORMATS: tuple[TraceFormat, ...] = ("mooncake", "azure")

#: Tokens per hash id in the Mooncake format.
TOKENS_PER_HASH = 512
_MAX_HASH_ID = 2**32 // TOKENS_PER_HASH  # token ids must fit in u32
_MOONCAKE_KEYS = ("timestamp", "input_length", "output_length", "hash_ids")
_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file and line."""


@attrs.frozen(slots=True)
class TraceRequest:
    """One request of a trace: it arrives ``at`` seconds after the trace starts with a prompt of
    ``input_length`` tokens (``hash_ids``: one per 512-token block) and asks for
    ``output_length`` tokens."""

    at: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]

    def token_ids(self) -> list[int]:
        """The prompt: hash id ``h`` expands to ``h*512 ... h*512+511``; the last block is cut
        to ``input_length``."""
        tokens: list[int] = []
        extend = tokens.extend
        for h in self.hash_ids:
            base = h * TOKENS_PER_HASH
            extend(range(base, base + TOKENS_PER_HASH))
        del tokens[self.input_length :]
        return tokens


@attrs.frozen
class Trace:
    """The requests of one trace file, in arrival order."""

    path: str
    format: TraceFormat
    requests: tuple[TraceRequest, ...]

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def span(self) -> float:
        """Seconds from the first arrival to the last."""
        return self.requests[-1].at - self.requests[0].at if self.requests else 0.0

    def head(self, limit: int | None) -> Trace:
        """The first ``limit`` requests (all when None)."""
        if limit is None or limit >= len(self.requests):
            return self
        return attrs.evolve(self, requests=self.requests[:limit])

    def scaled(self, rate_scale: float) -> Trace:
        """Arrivals ``rate_scale`` times as dense (every time divided by it).

        Raises:
            ValueError: ``rate_scale`` is not a positive finite number.
        """
        if not (rate_scale > 0 and math.isfinite(rate_scale)):
            raise ValueError(f"rate_scale must be a positive number, got {rate_scale!r}")
        if rate_scale == 1:
            return self
        return attrs.evolve(
            self, requests=tuple(attrs.evolve(r, at=r.at / rate_scale) for r in self.requests)
        )


def detect_format(path: str | os.PathLike[str]) -> TraceFormat:
    """``mooncake`` for ``.jsonl`` / ``.json`` files, ``azure`` for ``.csv``; otherwise by the
    first character (``{`` is JSON).

    Raises:
        TraceError: the file cannot be read, or its format cannot be told.
    """
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "mooncake"
    if suffix == ".csv":
        return "azure"
    try:
        with open(path, encoding="utf-8") as f:
            first = f.read(1)
    except OSError as exc:
        raise TraceError(f"cannot read trace {os.fspath(path)!r}: {exc.strerror}") from None
    if first == "{":
        return "mooncake"
    if first == "T":
        return "azure"
    raise TraceError(
        f"cannot tell the format of {os.fspath(path)!r}: name it .jsonl (Mooncake) or .csv "
        "(Azure), or pass the format"
    )


def read_trace(
    path: str | os.PathLike[str],
    *,
    format: TraceFormat | Literal["auto"] = "auto",
    limit: int | None = None,
) -> Trace:
    """Read a trace file (the first ``limit`` requests when given).

    Raises:
        TraceError: the file is missing, or a line is malformed (named by file and line).
    """
    kind = detect_format(path) if format == "auto" else format
    if kind not in TRACE_FORMATS:
        raise TraceError(f"unknown trace format {kind!r}; use one of {', '.join(TRACE_FORMATS)}")
    reader = _read_mooncake if kind == "mooncake" else _read_azure
    requests: list[TraceRequest] = []
    try:
        for request in reader(os.fspath(path)):
            if limit is not None and len(requests) >= limit:
                break
            requests.append(request)
    except OSError as exc:
        raise TraceError(f"cannot read trace {os.fspath(path)!r}: {exc.strerror}") from None
    if not requests and limit != 0:
        raise TraceError(f"{os.fspath(path)}: the trace holds no requests")
    return Trace(os.fspath(path), kind, tuple(requests))


def _positive_int(value: object, key: str, where: str, *, minimum: int = 1) -> int:
    if type(value) is not int or value < minimum:
        raise TraceError(f"{where}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _read_mooncake(path: str) -> Iterator[TraceRequest]:
    previous = 0.0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceError(f"{where}: not JSON ({exc})") from None
            if not isinstance(row, dict):
                raise TraceError(f"{where}: expected a JSON object, got {type(row).__name__}")
            unknown = sorted(set(row) - set(_MOONCAKE_KEYS))
            if unknown:
                raise TraceError(
                    f"{where}: unknown key {unknown[0]!r}; a Mooncake row has "
                    f"{', '.join(_MOONCAKE_KEYS)}"
                )
            missing = [k for k in _MOONCAKE_KEYS if k not in row]
            if missing:
                raise TraceError(f"{where}: missing key {missing[0]!r}")
            timestamp = row["timestamp"]
            if isinstance(timestamp, bool) or not isinstance(timestamp, int | float):
                raise TraceError(f"{where}: timestamp must be a number (ms), got {timestamp!r}")
            at = timestamp / 1000.0
            if at < previous:
                raise TraceError(
                    f"{where}: timestamp {timestamp} ms goes back in time (previous row: "
                    f"{previous * 1000:g} ms); sort the trace by timestamp"
                )
            previous = at
            length = _positive_int(row["input_length"], "input_length", where)
            output = _positive_int(row["output_length"], "output_length", where)
            ids = row["hash_ids"]
            if not isinstance(ids, list) or any(
                type(h) is not int or not 0 <= h < _MAX_HASH_ID for h in ids
            ):
                raise TraceError(
                    f"{where}: hash_ids must be a list of integers in [0, {_MAX_HASH_ID})"
                )
            needed = -(-length // TOKENS_PER_HASH)
            if len(ids) not in (needed, length // TOKENS_PER_HASH):
                raise TraceError(
                    f"{where}: {len(ids)} hash_ids for input_length={length}; expected "
                    f"ceil({length} / {TOKENS_PER_HASH}) = {needed} (one per 512-token block)"
                )
            if len(ids) < needed:
                # Some generators give no id to the partial last block: it is shared by none.
                ids = [*ids, _MAX_HASH_ID - 1 - number]
            yield TraceRequest(at, length, output, tuple(ids))


def _parse_azure_time(text: str, where: str) -> float:
    stamp = text.strip()
    try:
        whole = datetime.fromisoformat(stamp[:19]).replace(tzinfo=UTC)
        fraction = float("0" + stamp[19:]) if len(stamp) > 19 else 0.0
    except ValueError:
        raise TraceError(
            f"{where}: TIMESTAMP {text!r} is not a time like 2023-11-16 18:15:46.6805900"
        ) from None
    return whole.timestamp() + fraction


def _read_azure(path: str) -> Iterator[TraceRequest]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None or tuple(h.strip() for h in header) != _AZURE_COLUMNS:
            raise TraceError(
                f"{path}:1: expected the header {','.join(_AZURE_COLUMNS)}, got "
                f"{','.join(header) if header else 'nothing'}"
            )
        start: float | None = None
        previous = 0.0
        next_id = 0
        for number, row in enumerate(rows, start=2):
            if not row:
                continue
            where = f"{path}:{number}"
            if len(row) != 3:
                raise TraceError(f"{where}: expected 3 columns, got {len(row)}")
            stamp = _parse_azure_time(row[0], where)
            if start is None:
                start = stamp
            at = stamp - start
            if at < previous:
                raise TraceError(f"{where}: TIMESTAMP goes back in time; sort the trace")
            previous = at
            try:
                length, output = int(row[1]), int(row[2])
            except ValueError:
                raise TraceError(f"{where}: token counts must be integers, got {row[1:]}") from None
            _positive_int(length, "ContextTokens", where)
            _positive_int(output, "GeneratedTokens", where)
            blocks = -(-length // TOKENS_PER_HASH)
            ids = tuple(range(next_id, next_id + blocks))
            next_id += blocks
            yield TraceRequest(at, length, output, ids)
