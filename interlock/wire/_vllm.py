"""vLLM's KV-cache event feed on the wire: event shapes, their msgpack codec, the ZMQ frames.

What a vLLM server publishes (reference/vllm-cpu.md section 2, reference/engines.md section 1):

* a live message is 3 ZMQ frames ``[topic, seq u64 big-endian, payload]``; ``seq`` counts
  batches from 0 per publisher process;
* the payload is a msgpack array ``[ts, events, data_parallel_rank]`` (the rank is left off when
  it is ``None``); vLLM 0.26+ writes each event as a map keyed ``"type"``, older versions as a
  tag-first array (:data:`KvBatchLayout` names the two);
* a replay (a DEALER asking the engine's ROUTER for batches from ``start``) answers one message
  per buffered batch, ``[b"", seq, payload]`` up to vLLM 0.25 and ``[b"", topic, seq, payload]``
  since, then an end marker whose ``seq`` is eight ``0xFF`` bytes and whose payload is empty.

Block hashes are opaque ids. vLLM sends them as unsigned 64-bit ints by default; older
``builtin`` hashing sent signed ones, which are read as the same 64 bits unsigned; with
``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`` it sends the raw digest bytes, which are read as their
last 8 bytes, big-endian: exactly the int vLLM itself would have sent (its
``maybe_convert_block_hash``), so an engine's ids do not depend on that switch. Decoding
therefore always yields ``int`` hashes in ``[0, 2**64)``.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable, Iterator, Sequence
from typing import Annotated, Any, Literal

import attrs
import msgpack  # type: ignore[import-untyped]
import msgspec

from .._errors import InterlockError

__all__ = [
    "REPLAY_END_SEQ",
    "KvBatchDecoder",
    "KvBatchLayout",
    "VllmAllBlocksCleared",
    "VllmBlockRemoved",
    "VllmBlockStored",
    "VllmKvBatch",
    "VllmKvDecodeError",
    "VllmKvEvent",
    "VllmKvMessage",
    "decode_kv_batch",
    "encode_kv_batch",
    "kv_message_frames",
    "kv_topic",
    "parse_kv_message",
    "parse_replay_reply",
    "parse_replay_request",
    "replay_end_frames",
    "replay_reply_frames",
    "replay_request_frames",
]

KvBatchLayout = Literal["map", "array"]
"""How events are written: ``"map"`` (vLLM 0.26+, measured on 0.32: ``{"type": ..., ...}``)
or ``"array"`` (vLLM up to 0.25: ``["BlockStored", field, ...]``). The batch is an array in both."""

#: The ``seq`` of a replay's end marker: eight 0xFF bytes.
REPLAY_END_SEQ = 2**64 - 1

_U64 = 2**64
_MASK = _U64 - 1
_U32 = 2**32
_INT_ONLY = frozenset({int})


class VllmKvDecodeError(InterlockError, ValueError):
    """A vLLM KV-event message or payload that cannot be read; the message names what is wrong.

    One bad message is dropped (and counted) by the feed; other messages are unaffected.
    """


def _int_tuple(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(values)


def _optional_tuple(values: Iterable[Any] | None) -> tuple[Any, ...] | None:
    return None if values is None else tuple(values)


@attrs.frozen
class VllmBlockStored:
    """vLLM cached a run of full blocks (``BlockPool.cache_full_blocks``).

    ``block_hashes`` are the new blocks' ids, in order; ``parent_block_hash`` is the id of the
    block before the run (``None`` when the run starts at token 0); ``token_ids`` are the
    tokens of all the new blocks concatenated (``len(block_hashes) * block_size`` of them; vLLM's
    CPU offloading sends tier updates with none). vLLM 0.32 also sends ``lora_id=None``,
    ``medium="GPU"``, ``lora_name=None``, ``extra_keys`` (one ``None`` per block),
    ``group_idx=0`` and ``kv_cache_spec_kind="full_attention"``; the last four are left off the
    wire when ``None``.
    """

    block_hashes: tuple[int, ...] = attrs.field(converter=_int_tuple)
    parent_block_hash: int | None
    token_ids: tuple[int, ...] = attrs.field(converter=_int_tuple)
    block_size: int
    lora_id: int | None = None
    medium: str | None = "GPU"
    lora_name: str | None = None
    extra_keys: tuple[Any, ...] | None = attrs.field(default=None, converter=_optional_tuple)
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


@attrs.frozen
class VllmBlockRemoved:
    """vLLM evicted blocks (lazily, when their slots were reused); 0.32 sends one hash per event."""

    block_hashes: tuple[int, ...] = attrs.field(converter=_int_tuple)
    medium: str | None = "GPU"
    group_idx: int | None = None


@attrs.frozen
class VllmAllBlocksCleared:
    """vLLM dropped its whole prefix cache (``/reset_prefix_cache``, sleep, weight reload).

    It is published with the next scheduler step, not when the reset happens.
    """


VllmKvEvent = VllmBlockStored | VllmBlockRemoved | VllmAllBlocksCleared
"""Any event a :class:`VllmKvBatch` holds."""

_CLEARED = VllmAllBlocksCleared()


@attrs.frozen
class VllmKvBatch:
    """One published batch: the events of one scheduler step.

    ``ts`` is the engine's wall clock (float seconds); ``data_parallel_rank`` is the publisher's
    DP rank (0.32 always sends it; ``None`` when absent). ``unknown_event_types`` names the events
    the decoder did not know and skipped, in order (never encoded).
    """

    ts: float
    events: tuple[VllmKvEvent, ...] = attrs.field(converter=tuple)
    data_parallel_rank: int | None = None
    unknown_event_types: tuple[str, ...] = attrs.field(default=(), converter=tuple)


@attrs.frozen
class VllmKvMessage:
    """One message of the feed, live or replayed: ``payload`` is an encoded :class:`VllmKvBatch`.

    ``topic`` is ``None`` for a replay reply in the pre-0.26 layout, which carries none.
    """

    topic: bytes | None
    seq: int
    payload: bytes


# -- payload decoding ---------------------------------------------------------------------------


def decode_kv_batch(payload: bytes, *, merge_removals: bool = False) -> VllmKvBatch:
    """Decode one batch payload, in either event layout (maps keyed ``"type"`` or tag-first arrays).

    The batch itself may be an array ``[ts, events, rank?]`` (every released vLLM) or a map with
    those keys. Hashes become ``int`` in ``[0, 2**64)`` (see the module docstring). Fields vLLM
    added after this code, and events of a type it does not know, are skipped (the latter are
    named in ``unknown_event_types``), so a newer vLLM keeps working.

    With ``merge_removals``, consecutive ``BlockRemoved`` events of one ``medium`` and
    ``group_idx`` come back as one `VllmBlockRemoved` holding all their hashes, in order: vLLM
    sends one event per evicted block, and a consumer that treats removals alike (`KvMirror`)
    then handles a big eviction as one sequence instead of thousands of objects. Without it,
    decoding is the inverse of `encode_kv_batch`.

    Returns the batch. Raises :class:`VllmKvDecodeError` naming the field when the payload is not
    msgpack, not a batch, or an event lacks a field or has one of the wrong type; never any
    other exception, however the payload is built.
    """
    # No memory of the layout between calls: vLLM 0.26+'s is tried first. The feed keeps a
    # KvBatchDecoder per engine instead.
    return KvBatchDecoder().decode(payload, merge_removals=merge_removals)


class KvBatchDecoder:
    """:func:`decode_kv_batch` for one engine's payloads: it remembers which event layout
    decoded last and tries it first, so an engine in vLLM's older array layout does not pay a
    failed try per batch. Use one per engine (topic); safe to share between threads (the
    remembered layout is one attribute, replaced whole).
    """

    def __init__(self) -> None:
        # The layout that decoded last first (vLLM 0.26+'s to begin with): a payload in the
        # other fails at its first event.
        self._order: tuple[msgspec.msgpack.Decoder[Any], ...] = (_MAP_DECODER, _ARRAY_DECODER)

    def decode(self, payload: bytes, *, merge_removals: bool = False) -> VllmKvBatch:
        """Decode one batch payload as :func:`decode_kv_batch` does (same result, same errors)."""
        # The shapes vLLM sends are decoded and type-checked in C by msgspec (a 100k-token
        # prompt's BlockStored in about the time msgpack takes to build its Python objects,
        # where checking them field by field here cost as much again). Anything else, malformed
        # or merely unusual (bytes or negative hashes aside, which are fixed up below), takes
        # the careful path, which accepts what it can and otherwise names the field at fault.
        order = self._order
        for decoder in order:
            try:
                batch = _from_fast(decoder.decode(payload), merge_removals)
            except Exception:
                # msgspec's DecodeError/ValidationError, or anything odder (a RecursionError
                # from pathological nesting): whatever the fast path cannot take, the careful
                # path either decodes or names the field at fault.
                continue
            if decoder is not order[0]:
                # The other layout's engine (an engine never changes layouts).
                self._order = order[::-1]
            return batch
        batch = _decode_checked(payload)
        if merge_removals:
            batch = attrs.evolve(batch, events=_merge_removed(batch.events))
        return batch


# -- the fast path: msgspec types for the batches vLLM sends --------------------------------------

_TokenId = Annotated[int, msgspec.Meta(ge=0, lt=_U32)]
_BlockSize = Annotated[int, msgspec.Meta(gt=0)]


def _fast_decoder(array_like: bool) -> tuple[msgspec.msgpack.Decoder[Any], type[Any], type[Any]]:
    """A decoder of batches whose events are in one layout, and its BlockStored and
    BlockRemoved struct types.

    The events' fields and defaults are vLLM's (and :class:`VllmBlockStored`'s); unknown fields
    are ignored, as the careful path ignores them; msgspec cannot mix map and array structs in
    one union, hence one decoder per layout. ``gc=False``: the structs hold ints, strings and
    lists (``extra_keys``' may hold any msgpack value, nested), all freshly decoded and none
    referring back to a struct, and they are dropped once converted, so they can never be part
    of a reference cycle.
    """
    options: dict[str, Any] = {"tag_field": "type", "array_like": array_like, "gc": False}
    optional_int = (int | None, None)
    optional_str = (str | None, None)
    stored: type[Any] = msgspec.defstruct(
        "Stored",
        [
            # Lists: msgspec builds them faster than tuples, even counting the copy into one.
            ("block_hashes", list[int]),
            ("parent_block_hash", int | None),
            ("token_ids", list[_TokenId]),
            ("block_size", _BlockSize),
            ("lora_id", *optional_int),
            ("medium", *optional_str),
            ("lora_name", *optional_str),
            ("extra_keys", list[Any] | None, None),
            ("group_idx", *optional_int),
            ("kv_cache_spec_kind", *optional_str),
            ("kv_cache_spec_sliding_window", *optional_int),
        ],
        tag="BlockStored",
        **options,
    )
    removed = msgspec.defstruct(
        "Removed",
        [
            ("block_hashes", list[int]),
            ("medium", *optional_str),
            ("group_idx", *optional_int),
        ],
        tag="BlockRemoved",
        **options,
    )
    cleared = msgspec.defstruct("Cleared", [], tag="AllBlocksCleared", **options)
    batch = msgspec.defstruct(
        "Batch",
        [
            ("ts", float),
            ("events", list[stored | removed | cleared]),  # type: ignore[operator]
            ("data_parallel_rank", *optional_int),
        ],
        array_like=True,
        forbid_unknown_fields=True,
        gc=False,
    )
    return msgspec.msgpack.Decoder(batch), stored, removed


_MAP_DECODER, _MAP_STORED, _MAP_REMOVED = _fast_decoder(False)
_ARRAY_DECODER, _ARRAY_STORED, _ARRAY_REMOVED = _fast_decoder(True)
_FAST_STORED = frozenset({_MAP_STORED, _ARRAY_STORED})
_FAST_REMOVED = frozenset({_MAP_REMOVED, _ARRAY_REMOVED})


def _unsigned(hashes: list[int]) -> list[int]:
    """Hashes as u64 keys: negative ones (vLLM's old signed hashing) read as the same 64 bits."""
    if hashes and min(hashes) < 0:
        return [h & _MASK for h in hashes]
    return hashes


def _frozen(value: list[Any]) -> tuple[Any, ...]:
    """``value`` with its arrays (at any depth) as tuples, as the careful path decodes them
    (msgspec's ``Any`` decodes arrays as lists).

    Iterative: a payload of a few hundred bytes can nest arrays deeper than Python's recursion
    limit. Raises ``TypeError`` for a map inside (the careful path then decodes the batch).
    """
    # Each entry: an array being copied and the items copied so far.
    stack: list[tuple[list[Any], list[Any]]] = [(value, [])]
    while True:
        source, copied = stack[-1]
        while len(copied) < len(source):
            item = source[len(copied)]
            if type(item) is list:
                stack.append((item, []))
                break
            if type(item) is dict:
                # Never sent by vLLM; the careful path decodes maps with tuples inside.
                raise TypeError("a map in extra_keys")
            copied.append(item)
        else:
            done = tuple(copied)
            stack.pop()
            if not stack:
                return done
            stack[-1][1].append(done)


_WHERE = operator.attrgetter("medium", "group_idx")
_HASHES = operator.attrgetter("block_hashes")


def _from_fast(raw: Any, merge_removals: bool) -> VllmKvBatch:
    events: list[VllmKvEvent] = []
    # Runs of one event type; a big eviction is one run of thousands of removals.
    for kind, group in itertools.groupby(raw.events, type):
        if kind in _FAST_REMOVED:
            if merge_removals:
                events.extend(_merged(group))
            else:
                events.extend(
                    VllmBlockRemoved(_unsigned(event.block_hashes), event.medium, event.group_idx)
                    for event in group
                )
        elif kind in _FAST_STORED:
            events.extend(map(_stored, group))
        else:
            events.extend(_CLEARED for _ in group)
    return VllmKvBatch(ts=raw.ts, events=events, data_parallel_rank=raw.data_parallel_rank)


def _merged(removals: Iterable[Any]) -> Iterator[VllmBlockRemoved]:
    """A run of consecutive removals (msgspec's structs or `VllmBlockRemoved`\\ s) as one
    `VllmBlockRemoved` per stretch of one ``medium`` and ``group_idx``: each hash is copied
    once (C-level chain), so the cost is linear in the hashes however many events they came in.
    """
    for where, same in itertools.groupby(removals, _WHERE):
        hashes = list(itertools.chain.from_iterable(map(_HASHES, same)))
        yield VllmBlockRemoved(_unsigned(hashes), *where)


def _merge_removed(events: Iterable[VllmKvEvent]) -> list[VllmKvEvent]:
    """The careful path's events with their removals merged as the fast path merges them."""
    merged: list[VllmKvEvent] = []
    for kind, group in itertools.groupby(events, type):
        if kind is VllmBlockRemoved:
            merged.extend(_merged(group))
        else:
            merged.extend(group)
    return merged


def _stored(event: Any) -> VllmBlockStored:
    parent = event.parent_block_hash
    extra_keys = event.extra_keys
    # vLLM sends one None per block; anything else may hold arrays.
    if extra_keys and extra_keys.count(None) != len(extra_keys):
        extra_keys = _frozen(extra_keys)
    return VllmBlockStored(
        block_hashes=_unsigned(event.block_hashes),
        parent_block_hash=parent if parent is None or parent >= 0 else parent & _MASK,
        token_ids=event.token_ids,
        block_size=event.block_size,
        lora_id=event.lora_id,
        medium=event.medium,
        lora_name=event.lora_name,
        extra_keys=extra_keys,
        group_idx=event.group_idx,
        kv_cache_spec_kind=event.kv_cache_spec_kind,
        kv_cache_spec_sliding_window=event.kv_cache_spec_sliding_window,
    )


# -- the careful path: every shape any vLLM sent, and the errors that name the field ------------


def _decode_checked(payload: bytes) -> VllmKvBatch:
    try:
        data = msgpack.unpackb(payload, use_list=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several types for corrupt input
        raise VllmKvDecodeError(
            f"a vLLM KV event payload is not valid msgpack ({str(exc) or type(exc).__name__})"
        ) from None
    if type(data) is tuple:
        if not 2 <= len(data) <= 3:
            raise VllmKvDecodeError(
                f"a vLLM KV event batch must be [ts, events, data_parallel_rank?], got an array "
                f"of {len(data)} items"
            )
        ts, events = data[0], data[1]
        rank = data[2] if len(data) == 3 else None
    elif type(data) is dict:
        if "ts" not in data or "events" not in data:
            raise VllmKvDecodeError(
                "a vLLM KV event batch map needs keys 'ts' and 'events', got "
                f"{sorted(map(str, data))}"
            )
        ts, events, rank = data["ts"], data["events"], data.get("data_parallel_rank")
    else:
        raise VllmKvDecodeError(
            f"a vLLM KV event batch must be a msgpack array or map, got {type(data).__name__}"
        )
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise VllmKvDecodeError(f"batch field 'ts' must be a number, got {ts!r}")
    if type(events) is not tuple:
        raise VllmKvDecodeError(
            f"batch field 'events' must be an array, got {type(events).__name__}"
        )
    _check_optional_int(rank, "batch field 'data_parallel_rank'")
    decoded: list[VllmKvEvent] = []
    unknown: list[str] = []
    for index, raw in enumerate(events):
        event = _decode_event(raw, index)
        if isinstance(event, str):
            unknown.append(event)
        else:
            decoded.append(event)
    return VllmKvBatch(
        ts=float(ts), events=decoded, data_parallel_rank=rank, unknown_event_types=unknown
    )


# Field order of the tag-first array layout (after the tag), which is also the map layout's key
# set (reference/engines.md 1.3).
_STORED_FIELDS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
)
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")
# The fields with no default: present in every release that has them (the first four since
# vLLM 0.9). Later ones may be missing from older senders and read as None.
_STORED_REQUIRED = 4
_REMOVED_REQUIRED = 1


def _decode_event(raw: Any, index: int) -> VllmKvEvent | str:
    """One event, or its type name when the type is unknown."""
    if type(raw) is dict:
        tag = raw.get("type")
        fields: dict[str, Any] = raw
    elif type(raw) is tuple and raw:
        tag = raw[0]
        fields = {}
    else:
        raise VllmKvDecodeError(
            f"event {index} must be a map with a 'type' key or a [tag, ...] array, got {raw!r:.80}"
        )
    if type(tag) is not str:
        raise VllmKvDecodeError(f"event {index} has no string type tag (got {tag!r:.80})")
    if tag == "BlockStored":
        names, required = _STORED_FIELDS, _STORED_REQUIRED
    elif tag == "BlockRemoved":
        names, required = _REMOVED_FIELDS, _REMOVED_REQUIRED
    elif tag == "AllBlocksCleared":
        return _CLEARED
    else:
        return tag
    if type(raw) is tuple:
        fields = dict(zip(names, raw[1:], strict=False))
    where = f"event {index} ({tag})"
    for name in names[:required]:
        if name not in fields:
            raise VllmKvDecodeError(f"{where} lacks field {name!r}")
    hashes = _hashes(fields["block_hashes"], f"{where} field 'block_hashes'")
    medium = fields.get("medium")
    if medium is not None and type(medium) is not str:
        raise VllmKvDecodeError(f"{where} field 'medium' must be a string or nil, got {medium!r}")
    group_idx = fields.get("group_idx")
    _check_optional_int(group_idx, f"{where} field 'group_idx'")
    if tag == "BlockRemoved":
        return VllmBlockRemoved(block_hashes=hashes, medium=medium, group_idx=group_idx)
    parent = fields["parent_block_hash"]
    if parent is not None:
        parent = _hash(parent, f"{where} field 'parent_block_hash'")
    token_ids = fields["token_ids"]
    # C-level passes over the ids (one step can store thousands): types, then range.
    if type(token_ids) is not tuple or (
        token_ids
        and (
            not set(map(type, token_ids)) <= _INT_ONLY
            or min(token_ids) < 0
            or max(token_ids) >= _U32
        )
    ):
        raise VllmKvDecodeError(
            f"{where} field 'token_ids' must be an array of unsigned 32-bit ints"
        )
    block_size = fields["block_size"]
    if type(block_size) is not int or block_size <= 0:
        raise VllmKvDecodeError(
            f"{where} field 'block_size' must be a positive int, got {block_size!r}"
        )
    lora_id = fields.get("lora_id")
    _check_optional_int(lora_id, f"{where} field 'lora_id'")
    for name in ("lora_name", "kv_cache_spec_kind"):
        value = fields.get(name)
        if value is not None and type(value) is not str:
            raise VllmKvDecodeError(f"{where} field {name!r} must be a string or nil")
    window = fields.get("kv_cache_spec_sliding_window")
    _check_optional_int(window, f"{where} field 'kv_cache_spec_sliding_window'")
    extra_keys = fields.get("extra_keys")
    if extra_keys is not None and type(extra_keys) is not tuple:
        raise VllmKvDecodeError(f"{where} field 'extra_keys' must be an array or nil")
    return VllmBlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=token_ids,
        block_size=block_size,
        lora_id=lora_id,
        medium=medium,
        lora_name=fields.get("lora_name"),
        extra_keys=extra_keys,
        group_idx=group_idx,
        kv_cache_spec_kind=fields.get("kv_cache_spec_kind"),
        kv_cache_spec_sliding_window=window,
    )


def _hashes(value: Any, where: str) -> tuple[int, ...]:
    if type(value) is not tuple:
        raise VllmKvDecodeError(f"{where} must be an array of hashes, got {value!r:.80}")
    return tuple(_hash(item, where) for item in value)


def _hash(value: Any, where: str) -> int:
    """A block hash as an opaque u64 key (see the module docstring)."""
    if type(value) is int:
        if 0 <= value < _U64:
            return value
        if -(2**63) <= value < 0:
            # vLLM's old `builtin` hashing (Python's hash()): the same 64 bits, read unsigned.
            return value & _MASK
    elif type(value) is bytes and value:
        return int.from_bytes(value[-8:], "big")
    raise VllmKvDecodeError(
        f"{where}: a block hash must be a 64-bit int or non-empty bytes, got {value!r:.80}"
    )


def _check_optional_int(value: Any, where: str) -> None:
    if value is not None and type(value) is not int:
        raise VllmKvDecodeError(f"{where} must be an int or nil, got {value!r:.80}")


# -- payload encoding ---------------------------------------------------------------------------


def encode_kv_batch(batch: VllmKvBatch, *, layout: KvBatchLayout = "map") -> bytes:
    """Encode a batch byte for byte as vLLM does: ``layout="map"`` as vLLM 0.26+ (0.32 measured),
    ``"array"`` as vLLM up to 0.25.

    As vLLM's ``omit_defaults`` does, ``data_parallel_rank`` and the trailing optional event
    fields (``extra_keys`` onwards) are left off when ``None``; ``unknown_event_types`` is not
    encoded. Returns the payload frame. Raises ``ValueError`` for an unknown ``layout`` and
    ``TypeError`` for an object that is not a vLLM event.
    """
    if layout == "map":
        events = [_event_map(event) for event in batch.events]
    elif layout == "array":
        events = [_event_array(event) for event in batch.events]
    else:
        raise ValueError(f"layout must be 'map' or 'array', got {layout!r}")
    body: list[Any] = [batch.ts, events]
    if batch.data_parallel_rank is not None:
        body.append(batch.data_parallel_rank)
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def _event_map(event: VllmKvEvent) -> dict[str, Any]:
    if type(event) is VllmBlockStored:
        out: dict[str, Any] = {"type": "BlockStored"}
        for index, name in enumerate(_STORED_FIELDS):
            value = getattr(event, name)
            # Declared without a default in vLLM (up to lora_name): always written.
            if index < 7 or value is not None:
                out[name] = value
        return out
    if type(event) is VllmBlockRemoved:
        out = {"type": "BlockRemoved", "block_hashes": event.block_hashes, "medium": event.medium}
        if event.group_idx is not None:
            out["group_idx"] = event.group_idx
        return out
    if type(event) is VllmAllBlocksCleared:
        return {"type": "AllBlocksCleared"}
    raise TypeError(f"not a vLLM KV event: {event!r}")


def _event_array(event: VllmKvEvent) -> list[Any]:
    if type(event) is VllmBlockStored:
        values = [getattr(event, name) for name in _STORED_FIELDS]
        keep = 7  # the fields vLLM declares without a default
    elif type(event) is VllmBlockRemoved:
        values = [event.block_hashes, event.medium, event.group_idx]
        keep = 2
    elif type(event) is VllmAllBlocksCleared:
        return ["AllBlocksCleared"]
    else:
        raise TypeError(f"not a vLLM KV event: {event!r}")
    while len(values) > keep and values[-1] is None:
        values.pop()
    return [type(event).__name__.removeprefix("Vllm"), *values]


# -- frames -------------------------------------------------------------------------------------


def _seq_frame(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


def _read_seq(frame: bytes, where: str) -> int:
    if len(frame) != 8:
        raise VllmKvDecodeError(
            f"{where}: the sequence frame must be 8 bytes (u64 big-endian), got {len(frame)}"
        )
    return int.from_bytes(frame, "big")


def kv_message_frames(topic: bytes, seq: int, payload: bytes) -> list[bytes]:
    """The frames of one live message, as a vLLM PUB sends them: ``[topic, seq, payload]``."""
    return [topic, _seq_frame(seq), payload]


def parse_kv_message(frames: Sequence[bytes]) -> VllmKvMessage:
    """Read one live message ``[topic, seq u64 BE, payload]`` (the payload is not decoded).

    Raises :class:`VllmKvDecodeError` for a frame count other than 3 or a ``seq`` frame that is
    not 8 bytes.
    """
    if len(frames) != 3:
        raise VllmKvDecodeError(
            f"a live vLLM KV event message has 3 frames [topic, seq, payload], got {len(frames)}"
        )
    topic, seq, payload = frames
    return VllmKvMessage(topic=bytes(topic), seq=_read_seq(seq, "live message"), payload=payload)


def replay_request_frames(start_seq: int) -> list[bytes]:
    """What a DEALER sends to ask vLLM's replay ROUTER for every batch from ``start_seq`` on."""
    return [b"", _seq_frame(start_seq)]


def parse_replay_request(frames: Sequence[bytes]) -> int:
    """The start sequence of a replay request as a ROUTER receives it, after the identity frame
    (``[b"", seq]``). Raises :class:`VllmKvDecodeError` for any other shape (vLLM drops those)."""
    if len(frames) != 2 or frames[0] != b"":
        raise VllmKvDecodeError(
            f"a replay request is [b'', seq u64 BE] after the identity, got {len(frames)} frames"
        )
    return _read_seq(frames[1], "replay request")


def replay_reply_frames(seq: int, payload: bytes, *, topic: bytes | None) -> list[bytes]:
    """One replay reply as a ROUTER sends it after the client's identity frame:
    ``[b"", topic, seq, payload]`` (vLLM 0.26+), or ``[b"", seq, payload]`` with ``topic=None``
    (up to 0.25)."""
    head = [b""] if topic is None else [b"", topic]
    return [*head, _seq_frame(seq), payload]


def replay_end_frames(*, topic_frame: bool = True) -> list[bytes]:
    """The end-of-replay marker after the identity frame: ``[b"", b"", ff x 8, b""]`` (vLLM
    0.26+), or ``[b"", ff x 8, b""]`` with ``topic_frame=False`` (up to 0.25)."""
    return replay_reply_frames(REPLAY_END_SEQ, b"", topic=b"" if topic_frame else None)


def parse_replay_reply(frames: Sequence[bytes]) -> VllmKvMessage | None:
    """Read one replay reply as a DEALER receives it, in either layout.

    Returns the message, or ``None`` for the end marker (an empty payload). Raises
    :class:`VllmKvDecodeError` unless the frames are ``[b"", seq, payload]`` or
    ``[b"", topic, seq, payload]``.
    """
    if len(frames) not in (3, 4) or frames[0] != b"":
        raise VllmKvDecodeError(
            "a replay reply is [b'', seq, payload] or [b'', topic, seq, payload], got "
            f"{len(frames)} frames" + ("" if not frames or frames[0] == b"" else " (no delimiter)")
        )
    topic = bytes(frames[1]) if len(frames) == 4 else None
    seq = _read_seq(frames[-2], "replay reply")
    payload = frames[-1]
    if not payload:
        return None
    return VllmKvMessage(topic=topic, seq=seq, payload=payload)


def kv_topic(engine_id: int) -> bytes:
    """The topic an engine's publisher must use: ``b"kv@<engine_id>"`` (its vLLM ``"topic"``)."""
    return f"kv@{engine_id}".encode()
