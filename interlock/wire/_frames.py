"""The worker protocol: its messages and their frames (docs/wire-protocol.md).

A frame is a 4-byte big-endian body length, then a msgpack body: a two-element array of the
message's tag and its fields as a map, ``["output", {"stream": 7, "output": {...}}]``. This
module is sans-IO: `encode_frame` turns a message into bytes, `FrameParser` turns received
bytes (split or joined anyhow) back into messages. The trio side, a coalescing writer and a
buffered reader per connection, is in `interlock.engines.remote`.

Decoding is as strict as the rest of the wire layer: an unknown tag, an unknown or missing
field, a value of the wrong type, or a frame longer than the limit raises `ProtocolError`,
and the connection it came on is closed.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable, Iterable
from typing import Any, cast, get_args

import attrs
import cattrs
import msgpack  # type: ignore[import-untyped]
from cattrs.errors import ForbiddenExtraKeysError
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from .._errors import InterlockError
from ..kv import KvCleared, KvRemoved, KvStored
from ._codec import converter
from ._events import WorkerJoined, WorkerLeft
from ._output import EngineOutput, FinishReason, Usage
from ._request import PreprocessedRequest, RoutingHints
from ._snapshot import WorkerSnapshot

__all__ = [
    "AUTH_VERSION",
    "HEARTBEAT_VERSION",
    "HOLD_VERSION",
    "MAX_BATCH",
    "MAX_FRAME_SIZE",
    "OUTPUTS_VERSION",
    "PROTOCOL_VERSION",
    "SALT_VERSION",
    "SUPPORTED_VERSIONS",
    "Auth",
    "Broken",
    "Cancel",
    "Challenge",
    "FrameParser",
    "Goodbye",
    "Hello",
    "Output",
    "Outputs",
    "Ping",
    "Pong",
    "ProtocolError",
    "Refused",
    "SnapshotReply",
    "SnapshotRequest",
    "Start",
    "Welcome",
    "WorkerCapacity",
    "decode_body",
    "encode_frame",
    "frame_tag",
]

#: The version this code speaks best; a connection uses the highest version both ends speak.
PROTOCOL_VERSION = 5
#: Every version this code speaks.
SUPPORTED_VERSIONS: tuple[int, ...] = (1, 2, 3, 4, 5)
#: The first version with `Ping` / `Pong` (a version-1 peer gets no heartbeat).
HEARTBEAT_VERSION = 2
#: The first version with the shared-secret handshake (`Challenge`, `Auth`, ``Welcome.proof``).
AUTH_VERSION = 2
#: The first version with `Outputs`: a worker sends the outputs queued since its last write,
#: joined per stream, in one frame (a version-2 peer gets an `Output` frame per output).
OUTPUTS_VERSION = 3
#: The first version with ``Start.hold``: a frontend that needs only a stream's final result
#: lets the worker keep its outputs (joined) for up to ``hold`` seconds between sends.
HOLD_VERSION = 4
#: The first version with ``PreprocessedRequest.cache_salt``: a salted request goes only to a
#: worker that speaks it (an older one would share its cached prefixes with other tenants).
SALT_VERSION = 5
#: Outputs per `Outputs` frame at most (a backlog is split over several frames).
MAX_BATCH = 1024
#: The longest frame body accepted or sent by default (64 MiB): a snapshot of a large cache
#: fits, and a corrupt length prefix cannot make a reader buffer gigabytes.
MAX_FRAME_SIZE = 64 * 1024 * 1024

_HEADER = struct.Struct(">I")


class ProtocolError(InterlockError):
    """A peer broke the worker protocol: a malformed, unknown or oversized frame, a frame out
    of place, or a failed handshake (no common protocol version).

    The connection it happened on is closed, with the reason logged; other connections and the
    process carry on.
    """


# -- messages ---------------------------------------------------------------------------------


def _hold_seconds(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if type(value) not in (int, float) or not 0 <= value < math.inf:
        raise ValueError(f"{attribute.name} must be a finite number of seconds >= 0, got {value!r}")


@attrs.frozen(kw_only=True)
class Hello:
    """Frontend → worker, first frame of a connection: the protocol versions it speaks, and a
    name for the worker's logs."""

    versions: tuple[int, ...]
    client: str = ""


@attrs.frozen(kw_only=True)
class WorkerCapacity:
    """How much a worker holds (None: not reported)."""

    #: KV cache blocks in all.
    kv_blocks: int | None = None
    #: Sequences it runs at once.
    max_num_seqs: int | None = None


@attrs.frozen(kw_only=True)
class Welcome:
    """Worker → frontend, the answer to `Hello`: the version chosen and who the worker is.

    ``registered`` is False while the worker is withdrawn from routing (draining, or down
    after a crash); `WorkerJoined` announces its return. ``vocab_size`` bounds the token ids
    the worker may generate (all in ``0..vocab_size-1``), and ``tokenizer`` is the
    `interlock.processing.tokenizer_fingerprint` of the tokenizer it reads and decodes with;
    None: not reported (the frontend then checks what it can).
    """

    version: int
    worker_id: int
    role: str
    block_size: int | None
    capacity: WorkerCapacity = attrs.field(factory=WorkerCapacity)
    registered: bool = True
    vocab_size: int | None = None
    tokenizer: str | None = None
    #: Version 2, a worker with a secret: its HMAC proof that it knows the secret, over both
    #: nonces of the handshake (docs/wire-protocol.md). Left out of the frame while None.
    proof: bytes | None = None


@attrs.frozen(kw_only=True)
class Challenge:
    """Worker → frontend (version 2), the answer to `Hello` of a worker with a secret: the
    version chosen and a fresh random ``nonce``; the frontend must answer `Auth`."""

    version: int
    nonce: bytes


@attrs.frozen(kw_only=True)
class Auth:
    """Frontend → worker (version 2), the answer to `Challenge`: the frontend's own fresh
    ``nonce`` and its ``proof``, an HMAC-SHA256 under the shared secret over the version and
    both nonces. The secret itself never crosses the wire."""

    nonce: bytes
    proof: bytes


@attrs.frozen(kw_only=True)
class Ping:
    """Frontend → worker (version 2): are you there? Answered at once with a `Pong` of the
    same ``token`` by the worker's reader, whatever its engine is doing."""

    token: int


@attrs.frozen(kw_only=True)
class Pong:
    """Worker → frontend (version 2): the answer to the `Ping` with ``token``."""

    token: int


@attrs.frozen(kw_only=True)
class Start:
    """Frontend → worker: run ``request`` as stream ``stream`` (an id the frontend picks,
    unique among the connection's open streams).

    ``hold`` (version 4; 0: none): the frontend needs only the stream's final result (a
    non-streamed answer), so the worker may keep its outputs, joined, and send them at most
    every ``hold`` seconds: the first output with tokens at once (the frontend's router
    counts the prefill as done on it), then whatever accumulated ``hold`` seconds after the
    last send (an output arriving later than that, with nothing held, at once), and the last
    output with everything left: the frontend never waits longer than ``hold`` or the
    engine's own gap between outputs. A stream that breaks loses only the tokens held (a
    migration generates them again).
    """

    stream: int
    request: PreprocessedRequest
    hold: float = attrs.field(default=0.0, validator=_hold_seconds)


@attrs.frozen(kw_only=True)
class Cancel:
    """Frontend → worker: stop stream ``stream`` and free its slot (ignored once it ended)."""

    stream: int


@attrs.frozen(kw_only=True, slots=True)
class Output:
    """Worker → frontend: the next output of stream ``stream``; the one with a
    ``finish_reason`` is the stream's last frame."""

    stream: int
    output: EngineOutput


@attrs.frozen(kw_only=True, slots=True)
class Outputs:
    """Worker → frontend (version 3): the outputs of several streams, or several outputs of
    one stream joined (`join_outputs`), as ``(stream, output)`` pairs in the order they were
    produced; the frame a busy worker sends instead of one `Output` frame per output.

    On the wire each pair is compact: ``[stream, token_ids, text, finish_reason]`` for an
    output with nothing else, ``[stream, {output's fields}]`` for any other.
    """

    outputs: tuple[tuple[int, EngineOutput], ...]


@attrs.frozen(kw_only=True)
class Refused:
    """Worker → frontend: the worker would not start stream ``stream`` (nothing generated);
    the last frame of that stream."""

    stream: int
    message: str


@attrs.frozen(kw_only=True)
class Broken:
    """Worker → frontend: stream ``stream`` ended without its final output (the engine
    failed); the last frame of that stream."""

    stream: int
    message: str


@attrs.frozen(kw_only=True)
class SnapshotRequest:
    """Frontend → worker: send your `WorkerSnapshot`, tagged ``token``."""

    token: int


@attrs.frozen(kw_only=True)
class SnapshotReply:
    """Worker → frontend: the snapshot asked for with ``token``. The worker's KV events sent
    before this frame are reflected in it; those after it are not."""

    token: int
    snapshot: WorkerSnapshot


@attrs.frozen(kw_only=True)
class Goodbye:
    """Either way: the sender is closing the connection, and why (a protocol error, no
    common version). Informational: the reader logs it and expects the end of the stream."""

    reason: str


#: Every message by its tag. The worker's events travel as themselves: the KV events of
#: `interlock.kv` and the membership events of `interlock.wire`.
TAGS: dict[str, type[Any]] = {
    "hello": Hello,
    "welcome": Welcome,
    "start": Start,
    "cancel": Cancel,
    "output": Output,
    "outputs": Outputs,
    "refused": Refused,
    "broken": Broken,
    "snapshot": SnapshotRequest,
    "snapshot_reply": SnapshotReply,
    "goodbye": Goodbye,
    "challenge": Challenge,
    "auth": Auth,
    "ping": Ping,
    "pong": Pong,
    "kv_stored": KvStored,
    "kv_removed": KvRemoved,
    "kv_cleared": KvCleared,
    "worker_left": WorkerLeft,
    "worker_joined": WorkerJoined,
}
_TAG_OF: dict[type[Any], str] = {kind: tag for tag, kind in TAGS.items()}


def frame_tag(message: Any) -> str | None:
    """The tag ``message`` travels under, or None for a type the protocol does not carry."""
    return _TAG_OF.get(type(message))


# -- codec ------------------------------------------------------------------------------------


@functools.cache
def _converter() -> cattrs.Converter:
    """The frame converter: the wire converter's strict rules, plus snapshots (built on first
    use, then shared)."""
    frames = converter.copy()
    # Nonces and proofs are msgpack bin, which decodes to bytes and nothing else.
    frames.register_structure_hook(bytes, _bytes)
    # msgpack decodes arrays as lists only: check their element types in one C-level pass
    # (prompts are long; the shared hook's per-element loop is 2.5x slower here).
    frames.register_structure_hook_func(lambda kind: kind == tuple[int, ...], _int_tuple)
    attrs.resolve_types(SnapshotReply)
    # A snapshot's kv_blocks is typed loosely by the engine protocol; on this wire it holds
    # KvStored events (what MockEngine and the router exchange).
    frames.register_structure_hook(
        WorkerSnapshot,
        make_dict_structure_fn(
            WorkerSnapshot,
            frames,
            _cattrs_forbid_extra_keys=True,
            kv_blocks=override(struct_hook=lambda v, _t: frames.structure(v, tuple[KvStored, ...])),
        ),
    )
    # The admission queue's fields are the frontend's own: no worker reads them, and a
    # worker from before them would refuse a start frame that carried them.
    # (Before the hooks below: `PreprocessedRequest`'s binds this one when it is made.)
    frames.register_unstructure_hook(
        RoutingHints,
        make_dict_unstructure_fn(
            RoutingHints, frames, **{name: override(omit=True) for name in _ADMISSION_FIELDS}
        ),
    )
    # Fields that joined version 1 later are left out of a frame while unset, so that a peer
    # from before them still decodes every frame that does not use them (docs/wire-protocol.md).
    for kind, late in _LATE_FIELDS.items():
        overrides = {name: override(omit_if_default=True) for name in late}
        overrides.update({name: override(omit=True) for name in _FRONTEND_FIELDS.get(kind, ())})
        frames.register_unstructure_hook(kind, make_dict_unstructure_fn(kind, frames, **overrides))
    return frames


#: Optional fields added to version 1 after its first release: sent only when set.
_LATE_FIELDS: dict[type[Any], tuple[str, ...]] = {
    # cache_salt is version 5's, sent only to a version-5 worker (the engine client checks).
    PreprocessedRequest: ("chat", "cache_salt"),
    EngineOutput: ("chat_delta",),
    # Version 2's, sent only by a worker with a secret, so that welcomes without it stay
    # what version-1 frontends decode.
    Welcome: ("proof",),
    # Version 4's, sent only to a version-4 worker.
    Start: ("hold",),
}

#: Fields that stay in the frontend: never sent (a worker from before them would refuse them).
_FRONTEND_FIELDS: dict[type[Any], tuple[str, ...]] = {PreprocessedRequest: ("model_rewrite",)}

#: `RoutingHints` fields that stay in the frontend (its admission queue's): never sent.
_ADMISSION_FIELDS: tuple[str, ...] = ("priority", "fairness_id")


def _bytes(value: Any, _type: Any) -> bytes:
    if type(value) is bytes:
        return value
    raise TypeError(f"must be bytes (msgpack bin), got {type(value).__name__}")


_INT_ONLY = frozenset({int})


def _int_tuple(value: Any, _type: Any) -> tuple[int, ...]:
    if type(value) is list and set(map(type, value)) <= _INT_ONLY:
        return tuple(value)
    if type(value) is not list:
        raise TypeError(f"must be a list of integers, got {type(value).__name__}")
    bad = next(v for v in value if type(v) is not int)
    raise TypeError(f"must be a list of integers; found {bad!r}")


_Hook = Callable[[Any], Any]


@functools.cache
def _hooks() -> tuple[dict[type[Any], _Hook], dict[type[Any], _Hook]]:
    """Per message type: its unstructure hook, and its structure hook bound to the type."""
    frames = _converter()
    # EngineOutput's too: an `Outputs` frame carries each output that is not plain as a map.
    kinds = (*TAGS.values(), EngineOutput)
    unstructure = {kind: frames.get_unstructure_hook(kind) for kind in kinds}
    structure = {kind: _bind(frames.get_structure_hook(kind), kind) for kind in kinds}
    return unstructure, structure


def _bind(hook: Callable[[Any, Any], Any], kind: type[Any]) -> _Hook:
    def structure(fields: Any) -> Any:
        return hook(fields, kind)

    return structure


_packb = msgpack.Packer(autoreset=True).pack


def encode_frame(message: Any, *, max_frame_size: int = MAX_FRAME_SIZE) -> bytes:
    """``message`` as one frame: length prefix and msgpack body.

    Raises:
        TypeError: the protocol does not carry this type.
        ProtocolError: the body would exceed ``max_frame_size`` bytes.
    """
    kind = type(message)
    tag = _TAG_OF.get(kind)
    if tag is None:
        raise TypeError(f"{kind.__name__} is not a worker-protocol message")
    fields = _outputs_fields(message) if kind is Outputs else _hooks()[0][kind](message)
    body: bytes = _packb([tag, fields])
    size = len(body)
    if size > max_frame_size:
        raise ProtocolError(
            f"a {tag!r} frame of {size} bytes exceeds the {max_frame_size}-byte frame limit"
        )
    return _HEADER.pack(size) + body


def _outputs_fields(message: Outputs) -> dict[str, Any]:
    """An `Outputs` frame's fields: each plain output as a 4-element array, others as maps."""
    unstructure = _hooks()[0][EngineOutput]
    entries: list[list[Any]] = []
    for stream, output in message.outputs:
        if output.usage is None and output.prefill_result is None and output.chat_delta is None:
            entries.append([stream, output.token_ids, output.text, output.finish_reason])
        else:
            entries.append([stream, unstructure(output)])
    return {"outputs": entries}


def decode_body(body: bytes | bytearray | memoryview) -> Any:
    """The message in one frame body (without its length prefix).

    Raises:
        ProtocolError: not msgpack, not a ``[tag, fields]`` pair, an unknown tag, or fields
            that do not make that message (naming the field).
    """
    try:
        data = msgpack.unpackb(body)
    except Exception as exc:  # msgpack raises several types for corrupt input
        raise ProtocolError(
            f"a frame body is not valid msgpack ({str(exc) or type(exc).__name__})"
        ) from None
    if type(data) is not list or len(data) != 2 or type(data[0]) is not str:
        raise ProtocolError(f"a frame body must be a [tag, fields] pair, got {_preview(data)}")
    tag, fields = data
    kind = TAGS.get(tag)
    if kind is None:
        raise ProtocolError(f"unknown frame tag {tag!r}; known: {', '.join(TAGS)}")
    if type(fields) is not dict:
        raise ProtocolError(f"the fields of a {tag!r} frame must be a map, got {_preview(fields)}")
    if kind is Outputs:
        return _decode_outputs(fields)
    if kind is Output:
        common = _plain_output(fields)
        if common is not None:
            return common
    try:
        return _hooks()[1][kind](fields)
    except Exception as exc:  # validators and cattrs raise many types; all mean "malformed"
        raise ProtocolError(f"malformed {tag!r} frame: {_describe(exc)}") from None


#: The fields of a plain output frame (``chat_delta`` is sent only when set).
_OUTPUT_FIELDS = frozenset(
    field.name
    for field in attrs.fields(EngineOutput)
    if field.name not in _LATE_FIELDS[EngineOutput]
)
_FINISH_REASONS = frozenset(get_args(FinishReason))


def _plain_output(fields: dict[str, Any]) -> Output | None:
    """The frame of almost every token (an output without usage or prefill result), checked
    and built directly: twice as fast as the general path. None for anything else, which
    the general path then decodes or rejects with its precise error."""
    stream = fields.get("stream")
    output = fields.get("output")
    if (
        type(stream) is not int
        or type(output) is not dict
        or len(fields) != 2
        or output.keys() != _OUTPUT_FIELDS
        or output["usage"] is not None
        or output["prefill_result"] is not None
    ):
        return None
    plain = _checked_output(output, None)
    return None if plain is None else Output(stream=stream, output=plain)


def _checked_output(output: dict[str, Any], usage: dict[str, Any] | None) -> EngineOutput | None:
    """The `EngineOutput` of an output frame's fields (with ``usage``, already checked), or
    None when its token ids, text or finish reason are not what the fast paths accept."""
    token_ids = output["token_ids"]
    text = output["text"]
    finish = output["finish_reason"]
    if (
        type(token_ids) is not list
        or not set(map(type, token_ids)) <= _INT_ONLY
        or (text is not None and type(text) is not str)
        or (finish is not None and (type(finish) is not str or finish not in _FINISH_REASONS))
    ):
        return None
    return EngineOutput(
        token_ids=tuple(token_ids),
        text=text,
        finish_reason=cast("FinishReason | None", finish),
        usage=None if usage is None else Usage(**usage),
    )


_USAGE_FIELDS = frozenset(field.name for field in attrs.fields(Usage))


def _final_output(output: Any) -> EngineOutput | None:
    """The output that ends almost every stream (its usage set, no prefill result or chat
    delta), checked and built directly: the general path's Literal and Optional dispatch
    cost a tenth of a short request's wire decoding. None for anything else, which the
    general path then decodes or rejects with its precise error."""
    if (
        type(output) is not dict
        or output.keys() != _OUTPUT_FIELDS
        or output["prefill_result"] is not None
    ):
        return None
    usage = output["usage"]
    if (
        type(usage) is not dict
        or usage.keys() != _USAGE_FIELDS
        or not set(map(type, usage.values())) <= _INT_ONLY
    ):
        return None
    return _checked_output(output, usage)


def _decode_outputs(fields: dict[str, Any]) -> Outputs:
    """An `Outputs` frame, each entry checked as strictly as an `Output` frame's fields.

    Raises:
        ProtocolError: naming the entry and what is wrong with it.
    """
    entries = fields.get("outputs")
    if len(fields) != 1 or type(entries) is not list:
        extra = sorted(set(fields) - {"outputs"})
        what = f"unknown field {extra[0]!r}" if extra else "'outputs' must be a list"
        raise ProtocolError(f"malformed 'outputs' frame: {what}")
    pairs: list[tuple[int, EngineOutput]] = []
    append = pairs.append
    for index, entry in enumerate(entries):
        if type(entry) is list and len(entry) == 4:
            stream, token_ids, text, finish = entry
            if (
                type(stream) is int
                and type(token_ids) is list
                and set(map(type, token_ids)) <= _INT_ONLY
                and (text is None or type(text) is str)
                and (finish is None or (type(finish) is str and finish in _FINISH_REASONS))
            ):
                append(
                    (
                        stream,
                        EngineOutput(
                            token_ids=tuple(token_ids),
                            text=text,
                            finish_reason=cast("FinishReason | None", finish),
                        ),
                    )
                )
                continue
        elif type(entry) is list and len(entry) == 2 and type(entry[0]) is int:
            final = _final_output(entry[1])
            if final is not None:
                append((entry[0], final))
                continue
            try:
                append((entry[0], _hooks()[1][EngineOutput](entry[1])))
            except Exception as exc:  # cattrs raises many types; all mean "malformed"
                raise ProtocolError(
                    f"malformed 'outputs' frame: output {index}: {_describe(exc)}"
                ) from None
            continue
        raise ProtocolError(
            f"malformed 'outputs' frame: output {index} must be [stream, token_ids, text, "
            f"finish_reason] or [stream, output], got {_preview(entry)}"
        )
    return Outputs(outputs=tuple(pairs))


def _describe(error: BaseException, field: str | None = None) -> str:
    """The first leaf of a cattrs validation error, naming the innermost field."""
    if isinstance(error, ForbiddenExtraKeysError):
        return f"unknown field {sorted(error.extra_fields)[0]!r} in {error.cl.__name__}"
    if isinstance(error, BaseExceptionGroup):
        inner = error.exceptions[0]
        name = field
        for note in getattr(inner, "__notes__", ()):
            name = getattr(note, "name", None) or name
        return _describe(inner, name if isinstance(name, str) else field)
    if isinstance(error, KeyError):
        return f"missing field {error.args[0]!r}"
    if isinstance(error, InterlockError) or field is None:
        return str(error)
    return f"{field}: {error}"


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class FrameParser:
    """Turns a byte stream into messages: feed it whatever each read returned.

    A frame may arrive split over many reads and a read may hold many frames; the parser
    keeps the incomplete tail for the next `feed`. An oversized length prefix is refused as
    soon as it arrives, before its body is buffered. Frames whose tag is in ``skip_tags``
    are dropped undecoded (and so unchecked): a frontend that routes without KV events
    skips the ``kv_*`` frames of a worker that sends them anyway.
    """

    __slots__ = ("_buffer", "_skip", "max_frame_size", "skipped")

    def __init__(
        self, *, max_frame_size: int = MAX_FRAME_SIZE, skip_tags: Iterable[str] = ()
    ) -> None:
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        # A body starts with its [tag, fields] array header and the tag: a frame to skip is
        # known by these first bytes, without decoding it.
        self._skip = tuple(_packb([tag, {}])[:-1] for tag in skip_tags)
        #: Frames skipped undecoded (their tag is in ``skip_tags``).
        self.skipped = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet part of a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Any]:
        """Add received bytes; return the messages of every frame now complete, in order.

        Raises:
            ProtocolError: a frame longer than ``max_frame_size``, or a malformed frame (the
                stream cannot be resynchronised after either: close the connection).
        """
        buffer = self._buffer
        buffer += data
        end = len(buffer)
        if end < 4:
            return []
        messages: list[Any] = []
        limit = self.max_frame_size
        skip = self._skip
        unpack_header = _HEADER.unpack_from
        position = 0
        with memoryview(buffer) as view:
            while end - position >= 4:
                (size,) = unpack_header(buffer, position)
                if size > limit:
                    raise ProtocolError(
                        f"a frame announces {size} bytes, over the {limit}-byte frame limit"
                    )
                stop = position + 4 + size
                if stop > end:
                    break
                if skip and bytes(view[position + 4 : position + 36]).startswith(skip):
                    self.skipped += 1
                else:
                    messages.append(decode_body(view[position + 4 : stop]))
                position = stop
        if position:
            del buffer[:position]
        return messages
