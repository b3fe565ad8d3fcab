"""Transition records and where they go.

Every state change of every request becomes one `TransitionRecord`. The pipeline keeps the
newest in memory (`MemoryLog`) and can also append them to a JSONL file (`JsonlSink`); the
schema is versioned by ``SCHEMA_VERSION`` and documented in docs/transition-logs.md.
"""

from __future__ import annotations

import array
import collections
import copyreg
import enum
import io
import json
import logging
import operator
import os
import pickle
import time
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import attrs
import trio

from ..kv._cost import SelectionReason
from ..kv._hashing import PackedTokenIds, kv_salt, salt_hex
from ..wire import CandidateRecord, RoutingDecision, SelectionRecord, to_builtins
from ._modes import State, Trigger

_logger = logging.getLogger("interlock.transitions")

#: Bumped whenever a record field is added, removed or changes meaning.
SCHEMA_VERSION = 1


@attrs.frozen(slots=True)
class TransitionRecord:
    """One transition of one request.

    ``t`` is trio's clock (virtual under `trio.testing.MockClock`), ``wall`` the Unix time.
    ``worker_id`` is the worker the transition concerns (the decode worker on ``route``, the
    prefill worker on ``start_prefill``, the broken one on ``migrate``). ``decision`` is the
    record behind the transition: the `RoutingDecision` for ``route``, the migration plan for
    ``migrate``, the error for ``fail``.
    """

    request_id: str
    seq: int
    mode: str
    t: float
    wall: float
    src: str
    dst: str
    trigger: str
    worker_id: int | None = None
    decision: Any = None
    detail: str | None = None

    def to_json_dict(self) -> dict[str, Any]:
        """The record as the JSONL sink writes it (schema `SCHEMA_VERSION`)."""
        return {
            "v": SCHEMA_VERSION,
            "request_id": self.request_id,
            "seq": self.seq,
            "mode": self.mode,
            "t": self.t,
            "wall": self.wall,
            "src": self.src,
            "dst": self.dst,
            "trigger": self.trigger,
            "worker_id": self.worker_id,
            "decision": _decision_json(self.decision),
            "detail": self.detail,
        }


def _decision_json(decision: Any) -> Any:
    if decision is None:
        return None
    data = to_builtins(decision)
    if isinstance(data, dict):
        # A prompt can be 100k tokens; logging it with every decision would swamp the file.
        for key in ("token_ids",):
            if isinstance(data.get(key), list):
                data["prompt_tokens"] = len(data.pop(key))
        request = data.get("request")
        if isinstance(request, dict):
            if isinstance(request.get("token_ids"), list):
                request["prompt_tokens"] = len(request.pop("token_ids"))
            _hide_cache_salt(request)
    return data


def _hide_cache_salt(request: dict[str, Any]) -> None:
    """Replace a request's ``cache_salt`` by its ``kv_salt`` in hex: a tenant may keep its salt
    secret (it guards its cached prefixes), and records are files anyone on the box may read;
    the hex says which blocks the request's overlap was looked up under, as the decision
    record's ``inputs["kv_salt"]`` does."""
    salt = request.pop("cache_salt", None)
    if isinstance(salt, str):
        model = request.get("model")
        salted = kv_salt(model if isinstance(model, str) else None, salt)
        assert salted is not None  # a cache salt makes one
        request["kv_salt"] = salt_hex(salted)


class TransitionSink(Protocol):
    """Receives every record. ``offer`` must never block or raise: a sink that cannot keep up
    drops records and counts them."""

    def offer(self, record: TransitionRecord) -> None: ...


# What a record costs in memory, estimated without walking it (`estimate_record_bytes`); measured
# with tracemalloc on CPython 3.11 over real requests. A record alone: the slotted object, its two
# floats and its share of the strings.
_RECORD_BYTES = 200
# A decision object (a RoutingDecision, a MigrationPlan, an error dict) without its token ids.
_DECISION_BYTES = 300
# A token id of a prompt that a decision keeps: its slot in the tuple (8) and, for ids above 256
# (most of a real vocabulary's), the int object itself (32): a tokenizer makes new ones each time.
_TOKEN_BYTES = 40
# A token id of packed ids (`PackedTokenIds`): its 4-byte word.
_PACKED_TOKEN_BYTES = 4
# One leg's SelectionRecord (with its reason and inputs) and each candidate worker in it.
_SELECTION_BYTES = 400
_CANDIDATE_BYTES = 100


def estimate_record_bytes(record: TransitionRecord) -> int:
    """About how many bytes of memory ``record`` keeps alive, cheaply: a fixed cost, plus, for
    a decision, its prompt's token ids (``decision.token_ids``, or ``decision.request.token_ids``
    for a migration plan) and its selections' candidates. Never raises."""
    decision = record.decision
    if decision is None:
        return _RECORD_BYTES
    size = _RECORD_BYTES + _DECISION_BYTES
    tokens = getattr(decision, "token_ids", None)
    if tokens is None:
        tokens = getattr(getattr(decision, "request", None), "token_ids", None)
    if tokens is not None:
        per_token = _PACKED_TOKEN_BYTES if type(tokens) is PackedTokenIds else _TOKEN_BYTES
        try:
            size += per_token * len(tokens)
        except TypeError:
            pass  # not a sequence: the fixed cost stands
    for selection in getattr(decision, "selections", ()):
        size += _SELECTION_BYTES + _CANDIDATE_BYTES * len(getattr(selection, "candidates", ()))
    return size


# Records older than the newest `_PACK_BATCH` are kept pickled, a batch in one ``bytes``: the
# garbage collector never walks a ``bytes``, while a logged request as objects is ~20 tracked
# objects (its records, routing decision, selection and candidate records, their tuples, dicts
# and lists) that every young and middle-generation collection walked until the log dropped
# them (docs/benchmarks.md, "Where the tail at C=256 comes from"). Pickling a batch costs a few
# microseconds a request, less than the collections it saves.
_PACK_BATCH = 256
# A tuple or list of ints longer than this is kept by reference (`_BatchPickler`): a prompt's
# token ids are already in memory, and pickling 8,000 ints costs ~40 us on the trio thread.
_SMALL_SEQUENCE = 16


def _attrs_reducer(cls: type) -> Callable[[Any], tuple[Any, ...]]:
    """A pickle reducer for the slotted attrs class ``cls`` that reads its fields in C
    (`operator.attrgetter`) where attrs' own ``__getstate__`` builds a dict in Python; attrs'
    ``__setstate__`` takes the values back as a tuple in field order."""
    names = [field.name for field in attrs.fields(cls)]
    assert len(names) > 1, "attrgetter of one name gives the value, not a tuple"
    values = operator.attrgetter(*names)
    newobj = copyreg.__newobj__  # type: ignore[attr-defined]

    def reduce(obj: Any) -> tuple[Any, ...]:
        return newobj, (cls,), values(obj)

    return reduce


# The decisions every routed request logs; interlock's other attrs records pickle the default way.
_REDUCERS: dict[type, Callable[[Any], tuple[Any, ...]]] = {
    cls: _attrs_reducer(cls) for cls in (RoutingDecision, SelectionRecord, CandidateRecord)
}
# A record's fields as a tuple, read in C: a batch pickles its records as tuples of fields,
# a reducer call fewer a record (TransitionRecord's __init__ neither converts nor validates).
_record_fields = operator.attrgetter(*(field.name for field in attrs.fields(TransitionRecord)))

# How `_BatchPickler` keeps an object of each type: by value, the only types it pickles, are
# those that unpickle equal and of the same type whatever they hold (their contents are judged
# one by one); anything else (a custom policy's object, an exception, a token-id class) is kept
# by reference, so unpickling never runs code that may fail and gives back the same object.
_BY_REFERENCE, _BY_VALUE, _BY_MEMBER, _BY_LENGTH, _BY_NAN = range(5)
_KEEP: dict[type, int] = {
    **dict.fromkeys((int, str, bool, type(None), bytes, dict, set, frozenset), _BY_VALUE),
    **dict.fromkeys((tuple, list), _BY_LENGTH),
    float: _BY_NAN,
    # Classes and functions: some by name (`_BatchPickler.persistent_id`).
    type: _BY_MEMBER,
    types.FunctionType: _BY_MEMBER,
}


def _keep(cls: type) -> int:
    """How to keep instances of ``cls`` (`_KEEP`, filled on first sight): by value only for
    interlock's own attrs records (restored field by field, no __init__ run); by reference
    for everything else, exceptions included (their __init__ runs on unpickling)."""
    own = (
        cls.__module__.startswith("interlock.")
        and attrs.has(cls)
        and not issubclass(cls, BaseException)
    )
    _KEEP[cls] = keep = _BY_VALUE if own else _BY_REFERENCE
    return keep


# The members of interlock's enums (states, triggers, reasons), pickled as their index here: an
# enum member pickles as a call of its class, and a record has three of them.
# By class first: members of two StrEnums with one value are equal and hash alike.
_MEMBERS: tuple[enum.Enum, ...] = (*State, *Trigger, *SelectionReason)
_MEMBER_IDS: dict[type, dict[enum.Enum, int]] = {}
for _n, _member in enumerate(_MEMBERS):
    _MEMBER_IDS.setdefault(type(_member), {})[_member] = -1 - _n
    _KEEP[type(_member)] = _BY_MEMBER


class _BatchPickler(pickle.Pickler):
    """Pickles a batch's records one by one (`dump_record`), keeping by reference, in ``refs``,
    every object `_KEEP` does not pickle; ``starts[i]`` is where record ``i``'s references
    begin, so an evicted record's references can be dropped at once."""

    def __init__(self, out: io.BytesIO) -> None:
        super().__init__(out, pickle.HIGHEST_PROTOCOL)
        self.dispatch_table = _REDUCERS
        self.refs: list[Any] = []
        self.starts = array.array("I")

    def dump_record(self, fields: tuple[Any, ...]) -> None:
        # A memo per record: a record read back must not take objects from an evicted one.
        self.clear_memo()
        self.starts.append(len(self.refs))
        self.dump(fields)

    def persistent_id(self, obj: Any) -> Any:
        # Called for every object pickled, ~100 a routed request (~7 us of its ~15 us).
        cls = type(obj)
        keep = _KEEP.get(cls)
        if keep is None:
            keep = _keep(cls)
        if keep == _BY_VALUE:
            return None
        if keep == _BY_LENGTH:
            if len(obj) <= _SMALL_SEQUENCE or type(obj[0]) is not int:
                return None
        elif keep == _BY_NAN:
            if obj == obj:  # NaN is not: only the same object keeps a record equal
                return None
        elif keep == _BY_MEMBER:
            if cls is types.FunctionType:
                if obj in _NAMED:
                    return None
            elif cls is type:
                # A class pickles by name: interlock's own records' classes, which attrs'
                # pickling names too, and the builtins.
                named = _KEEP.get(obj)
                if (named if named is not None else _keep(obj)) != _BY_REFERENCE:
                    return None
            else:
                return _MEMBER_IDS[cls][obj]
        self.refs.append(obj)
        return len(self.refs) - 1


# The classes and function pickled by name: those `_REDUCERS` and attrs' pickling emit, which
# unpickle to themselves; any other class or function is kept by reference.
_NAMED: frozenset[Any] = frozenset(
    (copyreg.__newobj__, copyreg.__newobj_ex__)  # type: ignore[attr-defined]
)


@attrs.frozen(slots=True, eq=False)
class _PackedBatch:
    """Records kept as one pickle (`_pack`), and the objects the pickle refers to (``refs``,
    record ``i``'s from ``starts[i]``): a prompt's token ids, a custom policy's objects. Reading
    gives back those very objects. ``records`` holds the records themselves when one of them
    could not be pickled."""

    count: int
    request_ids: frozenset[str]
    data: bytes | None
    refs: list[Any] = attrs.Factory(list)
    starts: array.array[int] = attrs.Factory(lambda: array.array("I"))
    records: tuple[TransitionRecord, ...] = ()

    def drop(self, index: int) -> None:
        """Let go of record ``index``'s references (it was evicted): its prompt's ids must not
        outlive it while the rest of the batch is kept."""
        if self.data is None:
            return
        end = self.starts[index + 1] if index + 1 < self.count else len(self.refs)
        for n in range(self.starts[index], end):
            self.refs[n] = None


def _pack(records: list[TransitionRecord]) -> _PackedBatch:
    """``records`` as one `_PackedBatch`; never raises (if a record cannot be pickled, such as
    an interlock record holding a lock, the batch keeps its records as objects)."""
    request_ids = frozenset(record.request_id for record in records)
    out = io.BytesIO()
    pickler = _BatchPickler(out)
    try:
        for fields in map(_record_fields, records):
            pickler.dump_record(fields)
    except Exception:
        # A sink's offer must never raise; only interlock's own records are pickled, and
        # pickle's refusals are TypeError (locks, sockets, generators), AttributeError and
        # PicklingError (local functions and classes).
        return _PackedBatch(len(records), request_ids, None, records=tuple(records))
    return _PackedBatch(len(records), request_ids, out.getvalue(), pickler.refs, pickler.starts)


def _unpack(batch: _PackedBatch) -> list[TransitionRecord]:
    """The records `_pack` packed, equal to them and of the same types (an evicted record's
    references read as None; the caller skips it)."""
    if batch.data is None:
        return list(batch.records)
    refs = batch.refs

    def persistent_load(pid: int) -> Any:
        return refs[pid] if pid >= 0 else _MEMBERS[-1 - pid]

    stream = io.BytesIO(batch.data)
    records = []
    for _ in range(batch.count):
        # An unpickler a record, a memo a record, as `_BatchPickler.dump_record` pickled them
        # (assigning a fresh ``memo`` to one unpickler crashes CPython 3.11).
        unpickler = pickle.Unpickler(stream)
        unpickler.persistent_load = persistent_load
        records.append(TransitionRecord(*unpickler.load()))
    return records


class MemoryLog:
    """The newest records, in order: at most ``capacity`` of them and, with ``max_bytes``, at
    most that many bytes of memory as `estimate_record_bytes` counts them (a routing decision
    keeps its prompt's token ids, so records of long prompts weigh more). The oldest are dropped
    first; the newest record is always kept. Reading is safe at any time.

    All but the newest few hundred records are kept pickled, in batches, out of the garbage
    collector's sight; reading gives back records equal to those offered, of the same types.
    Only builtin values, interlock's own records and enums are pickled; everything else (the
    prompts' token ids, a custom policy's objects, NaN) is kept by reference, and read back as
    the very object offered. Reading costs an unpickling, so `records` with a request id reads
    only the batches that hold that request. An evicted record's references go at once, its
    pickled bytes with the last record of its batch.

    Raises:
        ValueError: ``capacity`` or ``max_bytes`` below 1.
    """

    def __init__(self, capacity: int = 100_000, max_bytes: int | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(
                f"max_bytes must be at least 1 (or None for no byte bound), got {max_bytes}"
            )
        self.capacity = capacity
        self.max_bytes = max_bytes
        #: Older records, oldest first; the first ``_head`` of the oldest batch were evicted.
        self._batches: collections.deque[_PackedBatch] = collections.deque()
        self._head = 0
        #: The newest records, as offered, until `_PACK_BATCH` of them are packed together.
        self._live: collections.deque[TransitionRecord] = collections.deque()
        #: `estimate_record_bytes` of every record kept, oldest first.
        self._sizes: collections.deque[int] = collections.deque()
        self._pack_batch = _PACK_BATCH
        #: Records pushed out by newer ones.
        self.evicted = 0
        #: The estimated bytes of the records kept (`estimate_record_bytes`).
        self.bytes = 0

    def offer(self, record: TransitionRecord) -> None:
        size = estimate_record_bytes(record)
        self._live.append(record)
        self._sizes.append(size)
        self.bytes += size
        limit = self.max_bytes
        while len(self._sizes) > self.capacity or (
            limit is not None and self.bytes > limit and len(self._sizes) > 1
        ):
            self._evict_oldest()
        if len(self._live) >= self._pack_batch:
            self._batches.append(_pack(list(self._live)))
            self._live.clear()

    def _evict_oldest(self) -> None:
        if self._batches:
            # A batch is freed whole once all its records are evicted; until then its
            # evicted records cost only their share of its bytes: their references go now.
            self._batches[0].drop(self._head)
            self._head += 1
            if self._head == self._batches[0].count:
                self._batches.popleft()
                self._head = 0
        else:
            self._live.popleft()
        self.bytes -= self._sizes.popleft()
        self.evicted += 1

    def __len__(self) -> int:
        return len(self._sizes)

    def __iter__(self) -> Iterator[TransitionRecord]:
        return iter(self.records())

    def _unpacked(self, batch_index: int, batch: _PackedBatch) -> list[TransitionRecord]:
        records = _unpack(batch)
        return records[self._head :] if batch_index == 0 else records

    def records(self, request_id: str | None = None) -> list[TransitionRecord]:
        """All records kept, or those of one request, oldest first."""
        kept: list[TransitionRecord] = []
        for index, batch in enumerate(self._batches):
            if request_id is None:
                kept.extend(self._unpacked(index, batch))
            elif request_id in batch.request_ids:
                kept.extend(r for r in self._unpacked(index, batch) if r.request_id == request_id)
        if request_id is None:
            kept.extend(self._live)
        else:
            kept.extend(r for r in self._live if r.request_id == request_id)
        return kept

    def by_request(self) -> dict[str, list[TransitionRecord]]:
        """Records grouped by request id, each group in sequence order."""
        grouped: dict[str, list[TransitionRecord]] = {}
        for record in self.records():
            grouped.setdefault(record.request_id, []).append(record)
        return grouped

    def path(self, request_id: str) -> list[str]:
        """The states one request went through, starting with ``received``."""
        records = self.records(request_id)
        return [records[0].src, *(r.dst for r in records)] if records else []

    def clear(self) -> None:
        self._batches.clear()
        self._head = 0
        self._live.clear()
        self._sizes.clear()
        self.bytes = 0


class JsonlSink:
    """Appends records to a JSONL file from a background task, never blocking the pipeline.

    Records wait in a bounded buffer; when it is full, new records are dropped and counted in
    ``dropped``, and the count is logged (logger ``interlock.transitions``, at most once per
    second of trio time, and once more when `serve` ends), so a record is never lost silently.
    A batch the file system refuses (disk full, no permission) counts as dropped too: a sink
    must not take the pipeline down. Run `serve` in a nursery; it flushes what is buffered when
    cancelled.

    With ``max_bytes``, the file rotates like `logging.handlers.RotatingFileHandler`: before a
    record would take it past ``max_bytes``, ``path`` becomes ``path.1`` (``path.1`` becomes
    ``path.2``, and so on up to ``path.<backups>``; the oldest is deleted) and a new file starts.
    A file grows past ``max_bytes`` only when one record alone is larger. ``backups=0`` keeps no
    old file. Read a rotated log oldest first: ``path.<backups>`` ... ``path.1``, ``path``.

    Raises:
        ValueError: ``max_bytes`` below 1, or ``backups`` below 0.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        buffer_size: int = 65_536,
        max_bytes: int | None = None,
        backups: int = 5,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(
                f"max_bytes must be at least 1 (or None to never rotate), got {max_bytes}"
            )
        if backups < 0:
            raise ValueError(f"backups must be 0 or more, got {backups}")
        self.path = os.fspath(path)
        self.buffer_size = buffer_size
        self.max_bytes = max_bytes
        self.backups = backups
        self.dropped = 0
        self.written = 0
        #: How many times the file was rotated.
        self.rotations = 0
        self._clock = clock
        self._reported = 0
        self._last_report: float | None = None
        self._buffer: collections.deque[TransitionRecord] = collections.deque()
        self._wakeup = trio.Event()

    def offer(self, record: TransitionRecord) -> None:
        if len(self._buffer) >= self.buffer_size:
            self.dropped += 1
            self._report_dropped()
            return
        self._buffer.append(record)
        if len(self._buffer) == 1:
            self._wakeup.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write buffered records until cancelled, then write what is left and return."""
        task_status.started()
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                await trio.to_thread.run_sync(self._write_batch)
                self._report_dropped()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._write_batch)
            self._report_dropped(final=True)

    def _report_dropped(self, *, final: bool = False) -> None:
        # Runs on the hot path when the buffer is full: one clock read, one log line a second.
        unreported = self.dropped - self._reported
        if not unreported:
            return
        try:
            now: float | None = self._clock()
        except RuntimeError:  # outside trio.run: no clock, so only the final report logs
            now = None
        if not final:
            if now is None:
                return
            if self._last_report is not None and now - self._last_report < 1.0:
                return
        self._last_report = now
        self._reported = self.dropped
        _logger.warning(
            "transition log %s fell behind: %d record(s) dropped since the last report, %d in "
            "total; the log is missing them (raise buffer_size, or write to a faster disk)",
            self.path,
            unreported,
            self.dropped,
        )

    def _write_batch(self) -> None:
        # Runs in a worker thread; offer() appends on the trio thread (deque ops are atomic).
        lines: list[str] = []
        while self._buffer:
            record = self._buffer.popleft()
            lines.append(
                json.dumps(record.to_json_dict(), separators=(",", ":"), default=_json_fallback)
            )
        if not lines:
            return
        written_before = self.written
        try:
            self._write_lines(lines)
        except OSError as exc:
            self.dropped += len(lines) - (self.written - written_before)
            _logger.error("transition log %s: cannot write: %s", self.path, exc)

    def _write_lines(self, lines: list[str]) -> None:
        if self.max_bytes is None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
            self.written += len(lines)
            return
        limit = self.max_bytes
        pending = list(lines)
        while pending:
            with open(self.path, "a", encoding="utf-8") as f:
                size = os.fstat(f.fileno()).st_size
                chunk: list[str] = []
                for line in pending:
                    # json.dumps escapes non-ASCII, so characters are bytes.
                    needed = len(line) + 1
                    if size + needed > limit and (size or chunk):
                        break
                    chunk.append(line)
                    size += needed
                if chunk:
                    f.write("\n".join(chunk) + "\n")
                    self.written += len(chunk)
            pending = pending[len(chunk) :]
            if pending:
                self._rotate()

    def _rotate(self) -> None:
        if self.backups == 0:
            os.remove(self.path)
        else:
            for index in range(self.backups - 1, 0, -1):
                older = f"{self.path}.{index}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{index + 1}")
            os.replace(self.path, f"{self.path}.1")
        self.rotations += 1


def _json_fallback(value: Any) -> Any:
    # A sink must never take the pipeline down over a value JSON cannot hold.
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    return repr(value)


def read_jsonl(path: str | os.PathLike[str]) -> Iterable[dict[str, Any]]:
    """Yield the records of a JSONL transition log as dicts."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


class TransitionLog:
    """Fans each record out to its sinks; the first sink is the in-memory log."""

    def __init__(
        self,
        memory: MemoryLog,
        sinks: Iterable[TransitionSink] = (),
        *,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.memory = memory
        self._sinks = (memory, *sinks)
        self.clock = clock

    def emit(self, record: TransitionRecord) -> None:
        for sink in self._sinks:
            sink.offer(record)

    def now(self) -> tuple[float, float]:
        return self.clock(), time.time()
