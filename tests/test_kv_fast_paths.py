"""The KV ingest's fast paths agree with the slow ones they stand in for, on any input:

* msgspec's decoding of a vLLM batch equals the careful decoder's whenever msgspec accepts the
  payload, and never accepts what the careful decoder rejects; `decode_kv_batch` raises nothing
  but `VllmKvDecodeError`, however deep the payload nests;
* `KvIndexer`'s bulk store and removal (runs of `_BULK_BLOCKS` or more, as columns) leave the
  same index as the same blocks applied one by one;
* `KvMirror`'s bulk branch (a run of new blocks published as one `StoredBlocks`) publishes the
  same blocks, parents and removals as the same batch split into one-block events.
"""

from __future__ import annotations

from typing import Any

import attrs
import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interlock.engines.openai._kv_mirror import KvMirror
from interlock.kv import (
    KvCleared,
    KvEvent,
    KvIndexer,
    KvRemoved,
    KvStored,
    StoredBlocks,
)
from interlock.kv._indexer import _BULK_BLOCKS
from interlock.wire import (
    KvBatchDecoder,
    VllmAllBlocksCleared,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmKvBatch,
    VllmKvDecodeError,
    VllmKvEvent,
    _vllm,
    decode_kv_batch,
    encode_kv_batch,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))

# -- decoding: msgspec's path against the careful one --------------------------------------------

_I64 = st.integers(-(2**63), 2**64 - 1)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    _I64,
    st.floats(allow_nan=False),
    st.text(max_size=3),
    st.binary(max_size=9),
)
_any = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=2)
    ),
    max_leaves=6,
)


def _maybe(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), values, _any)


_stored_map = st.fixed_dictionaries(
    {
        "type": st.just("BlockStored"),
        "block_hashes": st.one_of(st.lists(st.one_of(_I64, _any), max_size=3), _any),
        "parent_block_hash": _maybe(_I64),
        "token_ids": st.one_of(st.lists(st.integers(-1, 2**32), max_size=4), _any),
        "block_size": st.one_of(st.integers(-1, 4), _any),
    },
    optional={
        "lora_id": _maybe(_I64),
        "medium": _maybe(st.text(max_size=3)),
        "lora_name": _maybe(st.text(max_size=3)),
        "extra_keys": _maybe(st.lists(_any, max_size=3)),
        "group_idx": _maybe(_I64),
        "kv_cache_spec_kind": _maybe(st.text(max_size=3)),
        "kv_cache_spec_sliding_window": _maybe(_I64),
        "added_later": _any,
    },
)
_removed_map = st.fixed_dictionaries(
    {
        "type": st.just("BlockRemoved"),
        "block_hashes": st.lists(st.one_of(_I64, _any), max_size=3),
    },
    optional={"medium": _maybe(st.sampled_from(["GPU", "CPU"])), "group_idx": _maybe(_I64)},
)
_event_map = st.one_of(
    _stored_map,
    _removed_map,
    _removed_map,  # runs of removals, to merge
    st.fixed_dictionaries({"type": st.just("AllBlocksCleared")}, optional={"x": _any}),
)
_FIELDS = {
    "BlockStored": _vllm._STORED_FIELDS,
    "BlockRemoved": _vllm._REMOVED_FIELDS,
    "AllBlocksCleared": (),
}


def _as_array(event: dict[str, Any], extra: list[Any], cut: int) -> list[Any]:
    values = [event["type"], *(event.get(name) for name in _FIELDS[event["type"]]), *extra]
    return values[:cut] if cut else values


_event_array = st.builds(_as_array, _event_map, st.lists(_any, max_size=2), st.integers(0, 14))
_batch = st.tuples(
    st.one_of(st.floats(allow_nan=False), st.integers(-5, 5), _any),
    st.one_of(st.lists(_event_map, max_size=6), st.lists(_event_array, max_size=6)),
    st.one_of(st.none(), st.integers(-3, 3), _any),
    st.integers(2, 4),
)


def _fast(payload: bytes, merge_removals: bool) -> VllmKvBatch | None:
    """What msgspec's path makes of ``payload`` (``None`` when it does not take it)."""
    for decoder in (_vllm._MAP_DECODER, _vllm._ARRAY_DECODER):
        try:
            return _vllm._from_fast(decoder.decode(payload), merge_removals)
        except Exception:  # not the fast path's: the careful path's then
            continue
    return None


def _careful(payload: bytes, merge_removals: bool) -> VllmKvBatch:
    batch = _vllm._decode_checked(payload)
    if merge_removals:
        batch = attrs.evolve(batch, events=_vllm._merge_removed(batch.events))
    return batch


@FUZZ
@given(_batch, st.booleans())
def test_msgspec_decodes_as_the_careful_path_and_never_accepts_what_it_rejects(
    batch: tuple[Any, list[Any], Any, int], merge_removals: bool
) -> None:
    ts, events, rank, length = batch
    payload = msgpack.packb([ts, events, rank, "extra"][:length], use_bin_type=True)
    fast = _fast(payload, merge_removals)
    try:
        careful = _careful(payload, merge_removals)
    except VllmKvDecodeError:
        assert fast is None
        with pytest.raises(VllmKvDecodeError):
            decode_kv_batch(payload, merge_removals=merge_removals)
        return
    if fast is not None:
        assert fast == careful
    assert decode_kv_batch(payload, merge_removals=merge_removals) == careful


@pytest.mark.parametrize("depth", [10, 500, 900])
def test_extra_keys_nested_deeper_than_the_recursion_limit_decode_as_the_careful_path(
    depth: int,
) -> None:
    # A few hundred bytes: [1.0, [{BlockStored ... "extra_keys": [[[...[0]...]]]}], 0]
    event = {
        "type": "BlockStored",
        "block_hashes": [1],
        "parent_block_hash": None,
        "token_ids": [1, 2],
        "block_size": 2,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }
    # Packed by hand around the nested extra_keys: msgpack's own packer refuses to nest this deep.
    fields = b"".join(msgpack.packb(key) + msgpack.packb(value) for key, value in event.items())
    extra_keys = msgpack.packb("extra_keys") + b"\x91" * depth + b"\x00"
    payload = b"\x93" + msgpack.packb(1.0) + b"\x91\x89" + fields + extra_keys + b"\x00"
    assert len(payload) < 1_100
    assert decode_kv_batch(payload) == _careful(payload, False)


def test_a_payload_nested_past_msgpacks_limit_is_a_decode_error() -> None:
    with pytest.raises(VllmKvDecodeError, match="not valid msgpack"):
        decode_kv_batch(b"\x92\xcb" + b"\x00" * 8 + b"\x91" * 100_000 + b"\x00")


def test_a_decoder_remembers_its_engines_layout_and_decodes_both() -> None:
    batch = VllmKvBatch(1.0, [VllmBlockRemoved([1, 2], "GPU", 0)], 0)
    decoder = KvBatchDecoder()
    for layout in ("array", "array", "map", "array"):
        assert decoder.decode(encode_kv_batch(batch, layout=layout)) == batch  # type: ignore[arg-type]


def test_removals_merge_alike_on_both_paths_in_one_pass() -> None:
    # Bytes hashes take the careful path; ints the fast one.
    count = 20_000
    for hashes in ([i.to_bytes(32, "big") for i in range(count)], list(range(count))):
        events = [
            {"type": "BlockRemoved", "block_hashes": [h], "medium": "GPU", "group_idx": 0}
            for h in hashes
        ]
        events.insert(count // 2, {"type": "BlockRemoved", "block_hashes": [7], "medium": "CPU"})
        batch = decode_kv_batch(msgpack.packb([1.0, events, 0]), merge_removals=True)
        assert batch.events == (
            VllmBlockRemoved(range(count // 2), "GPU", 0),
            VllmBlockRemoved([7], "CPU", None),
            VllmBlockRemoved(range(count // 2, count), "GPU", 0),
        )


# -- the indexer: bulk store and removal against block by block ----------------------------------


def _one_by_one(event: KvEvent, next_id: int) -> list[KvEvent]:
    """``event`` as the indexer's per-block paths take it: blocks as objects, one removal each."""
    if type(event) is KvStored:
        return [KvStored(event.worker_id, next_id, event.parent_hash, tuple(event.blocks))]
    if type(event) is KvRemoved:
        return [
            KvRemoved(event.worker_id, next_id + index, [block_hash])
            for index, block_hash in enumerate(event.block_hashes)
        ] or [KvRemoved(event.worker_id, next_id, [])]
    return [KvCleared(event.worker_id, next_id)]


def _index_state(index: KvIndexer) -> tuple[Any, ...]:
    workers = sorted(index.workers)
    return (
        {worker: index.snapshot(worker) for worker in workers},
        {worker: index.tree_size(worker) for worker in workers},
        index.node_count,
    )


@FUZZ
@given(st.data())
def test_bulk_store_and_removal_index_what_block_by_block_does(data: st.DataObject) -> None:
    bulk, each = KvIndexer(), KvIndexer()
    held: dict[int, list[int]] = {1: [], 2: []}
    event_ids = {1: 0, 2: 0}
    each_ids = {1: 0, 2: 0}
    fresh = iter(range(1000, 10**6))
    for _ in range(data.draw(st.integers(1, 10))):
        worker = data.draw(st.sampled_from([1, 2]))
        kind = data.draw(st.sampled_from(["store", "store", "remove", "remove", "clear"]))
        event: KvEvent
        if kind == "store":
            parent = data.draw(st.one_of(st.none(), st.sampled_from(held[worker] or [None])))
            count = data.draw(st.sampled_from([1, 3, _BULK_BLOCKS - 1, _BULK_BLOCKS, 40]))
            # Some runs reuse ids the worker holds (or repeat one): those take the slow path.
            reuse = held[worker] and data.draw(st.booleans())
            ids = [
                data.draw(st.sampled_from(held[worker]))
                if reuse and data.draw(st.integers(0, 9)) == 0
                else next(fresh)
                for _ in range(count)
            ]
            tokens = data.draw(st.lists(st.integers(0, 2), min_size=count, max_size=count))
            event = KvStored(worker, event_ids[worker], parent, StoredBlocks(ids, tokens))
            held[worker] = list(dict.fromkeys(held[worker] + ids))
        elif kind == "remove":
            gone = data.draw(
                st.lists(st.sampled_from([*held[worker], 999_999]), min_size=0, max_size=40)
            )
            event = KvRemoved(worker, event_ids[worker], gone)
            held[worker] = [h for h in held[worker] if h not in set(gone)]
        else:
            event = KvCleared(worker, event_ids[worker])
            held[worker] = []
        event_ids[worker] += 1
        bulk.apply(event)
        singles = _one_by_one(event, each_ids[worker])
        each_ids[worker] += len(singles)
        for single in singles:
            each.apply(single)
        assert _index_state(bulk) == _index_state(each)
        for worker_id in (1, 2):
            for path in bulk.snapshot(worker_id).values():
                if path:
                    assert bulk.find_matches(path).scores == each.find_matches(path).scores


# -- the mirror: a batch against the same blocks one event each ----------------------------------

BLOCK = 2


def _split(event: VllmKvEvent) -> list[VllmKvEvent]:
    """A BlockStored of n blocks as n BlockStored of one block, each the child of the last."""
    if (
        type(event) is not VllmBlockStored
        or not event.block_hashes
        or len(event.token_ids) != BLOCK * len(event.block_hashes)
    ):
        return [event]
    parents = (event.parent_block_hash, *event.block_hashes[:-1])
    return [
        attrs.evolve(
            event,
            block_hashes=[block_hash],
            parent_block_hash=parent,
            token_ids=event.token_ids[BLOCK * index : BLOCK * (index + 1)],
        )
        for index, (block_hash, parent) in enumerate(zip(event.block_hashes, parents, strict=True))
    ]


def _per_block(published: list[KvEvent]) -> list[tuple[Any, ...]]:
    """What the published events say, one entry per block stored or removed."""
    out: list[tuple[Any, ...]] = []
    for event in published:
        if type(event) is KvStored:
            parent = event.parent_hash
            for block in event.blocks:
                out.append(("stored", parent, block.block_hash, block.tokens_hash))
                parent = block.block_hash
        elif type(event) is KvRemoved:
            out.extend(("removed", block_hash) for block_hash in event.block_hashes)
        else:
            out.append(("cleared",))
    return out


_ids = st.integers(0, 20)


@st.composite
def _vllm_event(draw: st.DrawFn) -> VllmKvEvent:
    kind = draw(st.sampled_from(["stored", "stored", "removed", "removed", "cleared"]))
    if kind == "removed":
        return VllmBlockRemoved(
            draw(st.lists(_ids, max_size=4)), draw(st.sampled_from(["GPU", "CPU"]))
        )
    if kind == "cleared":
        return VllmAllBlocksCleared()
    # Repeated ids inside one event too: a vLLM that sends them must not get a bulk run. A LoRA
    # block's id hashes its adapter in, so it never names a base model's block.
    lora_id = draw(st.sampled_from([None, None, None, 3]))
    hashes = draw(st.lists(_ids if lora_id is None else st.integers(100, 120), max_size=20))
    # The blocks' tokens, or one too many; each 0 or 1, so that blocks' tokens often repeat.
    # Drawn as one bytes value: a list drawn token by token (and longer than the event kept)
    # was most of this test's time.
    size = BLOCK * len(hashes) + draw(st.sampled_from([0, 0, 0, 1]))
    tokens = [byte & 1 for byte in draw(st.binary(min_size=size, max_size=size))]
    return VllmBlockStored(
        hashes,
        draw(st.one_of(st.none(), _ids)),
        tokens,
        BLOCK,
        medium=draw(st.sampled_from(["GPU", "GPU", "CPU", None])),
        lora_id=lora_id,
    )


@FUZZ
@given(st.lists(st.lists(_vllm_event(), max_size=6), min_size=1, max_size=6))
def test_the_mirror_publishes_a_batch_as_it_would_its_blocks_one_event_each(
    batches: list[list[VllmKvEvent]],
) -> None:
    seen: dict[str, list[KvEvent]] = {"batched": [], "split": []}
    indexes = {"batched": KvIndexer(), "split": KvIndexer()}

    def publisher(name: str) -> Any:
        def publish(event: KvEvent) -> None:
            seen[name].append(event)
            indexes[name].apply(event)

        return publish

    batched = KvMirror(1, BLOCK, publisher("batched"))
    split = KvMirror(1, BLOCK, publisher("split"))
    split_seq = 0
    for seq, events in enumerate(batches):
        batched.on_batch(seq, _through_the_wire(events))
        for event in events:
            # A run hanging off a parent the mirror lacks is dropped whole (an orphan): its
            # blocks one by one would hang off each other instead.
            parent = getattr(event, "parent_block_hash", None)
            whole = parent is not None and parent not in split.blocks()
            for single in [event] if whole else _split(event):
                split.on_batch(split_seq, _through_the_wire([single]))
                split_seq += 1
        assert list(batched.blocks().items()) == list(split.blocks().items())
        assert _per_block(seen["batched"]) == _per_block(seen["split"])
        assert _index_state(indexes["batched"]) == _index_state(indexes["split"])


def _through_the_wire(events: list[VllmKvEvent]) -> VllmKvBatch:
    payload = encode_kv_batch(VllmKvBatch(1.0, events, 0))
    return decode_kv_batch(payload, merge_removals=True)
