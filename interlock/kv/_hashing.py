"""Block and sequence hashing: the KV-hashing contract shared with engines and other routers.

**Contract** (reference/dynamo.md section 2.2): xxh3_64 with seed 1337 over the little-endian
``u32`` bytes of each *full* block of token ids; a partial trailing block is never hashed.
Changing a byte here silently drops every cache hit to zero, so the test vectors are pinned in
tests/test_kv_hashing.py.

**Salted blocks.** An engine caches a LoRA adapter's blocks, and a request's ``cache_salt``
blocks, apart from the base model's for the same tokens (vLLM mixes the adapter name and the salt
into its block hashes: ``extra_keys``). The router keys them apart too: a request's salt
(`kv_salt`, from the adapter name and the cache salt) replaces block 0's hash by
``xxh3_64(le_u64(salt) || le_u64(block0), seed=1337)``, and every later block hangs under it in
the prefix tree, so a salted prompt matches only blocks stored with the same salt. Unsalted
requests (``salt=None``) hash exactly as the contract says.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from typing import Any, SupportsIndex, final, overload

import xxhash

__all__ = [
    "XXH3_SEED",
    "PackedTokenIds",
    "U32TokenIds",
    "compute_block_hashes",
    "compute_sequence_hashes",
    "iter_block_hashes",
    "known_u32",
    "kv_salt",
    "salt_block",
    "trust_u32",
    "u32_words",
]

XXH3_SEED = 1337
"""The seed of every hash in this module (Dynamo's ``XXH3_SEED``)."""

# C only promises `unsigned int` is at least 16 bits; pick whichever array typecode is exactly 32
# bits so that `tobytes()` is the contract's u32 layout on every platform.
_U32 = next(code for code in ("I", "L") if array(code).itemsize == 4)
_BIG_ENDIAN = sys.byteorder == "big"
_U32_BYTES = 4
_pack_pair = struct.Struct("<QQ").pack
_xxh3 = xxhash.xxh3_64_intdigest


#: The token ids last converted by `u32_words` (a tuple: immutable) and their words. A prompt
#: is converted where it is validated (`PreprocessedRequest`) and again where it is hashed (the
#: router); for a 100k-token prompt each conversion costs ~0.5 ms, so the second one reuses the
#: first. One slot: it keeps the last prompt alive, nothing more.
_last_words: tuple[tuple[int, ...], array[int]] | None = None
_MEMO_MIN = 1024


def u32_words(token_ids: Sequence[int]) -> array[int]:
    """The token ids as an array of native unsigned 32-bit words (one C-level conversion, which
    checks every id's type and range). The same tuple as the last call's returns the same array:
    callers must not change it.

    Raises:
        OverflowError: an id is outside the u32 range.
        TypeError: an id is not an integer.
    """
    global _last_words
    last = _last_words
    if last is not None and last[0] is token_ids:
        return last[1]
    if type(token_ids) is PackedTokenIds:
        words = array(_U32, token_ids.data)
        if _BIG_ENDIAN:
            words.byteswap()
        return words
    words = array(_U32, token_ids)
    # Short ones are cheap to convert again and must not evict a long prompt (a request's
    # other id fields, often empty, are checked between the prompt and its hashing).
    if isinstance(token_ids, tuple) and len(token_ids) >= _MEMO_MIN:
        _last_words = (token_ids, words)
    return words


class U32TokenIds(tuple[int, ...]):
    """Token ids that are ints in the u32 range because the code that made them says so (a
    tokenizer's output; `trust_u32`). A validator skips converting them only to check them,
    and `iter_block_hashes` converts only the blocks it hashes. A plain tuple in every other
    respect (equality, hashing, the wire)."""

    __slots__ = ()


@final
class PackedTokenIds(Sequence[int]):
    """Token ids held as the bytes the hashing contract hashes (little-endian u32 words, 4
    bytes an id) instead of a tuple (a pointer an id, 8 bytes, and an int object for an id
    above 256): a 100,000-token prompt is one 400 kB ``bytes``, made, hashed and freed without
    a tuple of 100,000 pointers to build and convert back (`ByteTokenizer.encode_u32`).
    Vouched for as `U32TokenIds` are (`known_u32`): the validators skip them, and the hashing
    reads their blocks' bytes as they are.

    Read-only and tuple-like: ``len``, indexing and iteration give the ids as ints, a slice is
    a tuple, ``+`` makes a tuple, and it is equal to (and hashes as) the tuple of the same ids.
    The bytes are ``data``.

    Raises:
        ValueError: ``data`` is not a whole number of 4-byte words.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        if len(data) % _U32_BYTES:
            raise ValueError(
                f"packed token ids are 4 bytes each; got {len(data)} bytes, not a multiple of 4"
            )
        self.data: bytes = data

    def _words(self) -> Sequence[int]:
        """The ids as native words, without a copy where the host is little-endian."""
        if _BIG_ENDIAN:
            words = array(_U32, self.data)
            words.byteswap()
            return words
        return memoryview(self.data).cast(_U32)

    def __len__(self) -> int:
        return len(self.data) // _U32_BYTES

    @overload
    def __getitem__(self, index: SupportsIndex) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[int, ...]: ...
    def __getitem__(self, index: SupportsIndex | slice) -> int | tuple[int, ...]:
        if isinstance(index, slice):
            return tuple(self._words()[index])
        return self._words()[index]

    def __iter__(self) -> Iterator[int]:
        return iter(self._words())

    def __eq__(self, other: object) -> bool:
        if type(other) is PackedTokenIds:
            return self.data == other.data
        if isinstance(other, tuple):
            return len(other) == len(self) and tuple(self._words()) == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self._words()))

    def __add__(self, other: Iterable[int]) -> tuple[int, ...]:
        return (*self._words(), *other)

    def __radd__(self, other: Iterable[int]) -> tuple[int, ...]:
        return (*other, *self._words())

    def __repr__(self) -> str:
        head = ", ".join(map(str, self._words()[:8]))
        more = ", ..." if len(self) > 8 else ""
        return f"PackedTokenIds({len(self)} ids: {head}{more})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (PackedTokenIds, (self.data,))


def trust_u32(token_ids: Sequence[int]) -> U32TokenIds:
    """``token_ids`` as `U32TokenIds`: the caller vouches that every id is an int in the u32
    range (a tokenizer made them). Never raises; vouching for anything else makes the router
    hash garbage or fail later, so only tokenizer output belongs here."""
    return U32TokenIds(token_ids)


def known_u32(token_ids: Sequence[int]) -> bool:
    """Whether ``token_ids`` were vouched for (`trust_u32`, or `PackedTokenIds`)."""
    kind = type(token_ids)
    return kind is U32TokenIds or kind is PackedTokenIds


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")


def _block_bytes(token_ids: Sequence[int], block_size: int) -> tuple[bytes, int, int]:
    """The prompt's little-endian u32 bytes, the bytes per block and the end of the last full
    block (the checks and errors of `compute_block_hashes`)."""
    _check_block_size(block_size)
    if type(token_ids) is PackedTokenIds:
        stride = block_size * _U32_BYTES
        return token_ids.data, stride, len(token_ids) // block_size * stride
    try:
        # One C-level conversion of the whole prompt: it both validates the u32 range and
        # produces the bytes, which is most of the cost for long prompts.
        words = u32_words(token_ids)
    except OverflowError as exc:
        bad = next((t for t in token_ids if isinstance(t, int) and not 0 <= t < 2**32), None)
        raise ValueError(
            f"token_ids must be unsigned 32-bit integers (0 <= id < 2**32); found {bad!r}: "
            "the KV hash contract hashes each id as 4 little-endian bytes"
        ) from exc
    except TypeError as exc:
        raise TypeError(f"token_ids must be a sequence of integers: {exc}") from exc
    if _BIG_ENDIAN:
        words = array(_U32, words)  # a copy: the memoized array stays native
        words.byteswap()
    stride = block_size * _U32_BYTES
    return words.tobytes(), stride, len(words) // block_size * stride


def kv_salt(lora_name: str | None = None, cache_salt: str | None = None) -> int | None:
    """The salt of a request's blocks: None for the base model without a cache salt (the
    contract's hashes), else a u64 from the LoRA adapter's name and the cache salt, each
    tagged and length-prefixed so that no adapter name is mistaken for a salt or one pair for
    another."""
    if lora_name is None and cache_salt is None:
        return None
    parts: list[bytes] = []
    for tag, value in ((b"L", lora_name), (b"S", cache_salt)):
        if value is not None:
            raw = value.encode("utf-8")
            parts.append(tag + len(raw).to_bytes(4, "little") + raw)
    return _xxh3(b"".join(parts), XXH3_SEED)


def salt_hex(salt: int) -> str:
    """How records name a salt (`kv_salt`'s u64 as 16 hex digits): which blocks a request's
    overlap was looked up under, never the cache salt itself, which a tenant may keep secret."""
    return f"{salt:016x}"


def salt_block(block_hash: int, salt: int) -> int:
    """Block 0's hash under ``salt`` (see the module's docstring)."""
    return _xxh3(_pack_pair(salt, block_hash), XXH3_SEED)


def compute_block_hashes(
    token_ids: Sequence[int], block_size: int, salt: int | None = None
) -> list[int]:
    """Hash each full block of ``token_ids`` (the router's ``LocalBlockHash``, a ``tokens_hash``).

    Returns one unsigned 64-bit hash per full block, ``len(token_ids) // block_size`` in all; the
    tokens after the last full block are ignored. A ``salt`` (`kv_salt`) changes block 0's hash
    only. Raises ``ValueError`` if ``block_size`` is not a positive integer or a token id does
    not fit in ``u32``, and ``TypeError`` if a token id is not an integer.
    """
    data, stride, end = _block_bytes(token_ids, block_size)
    # Slicing bytes (a 64-256 byte copy) measured slightly faster than memoryview slices here.
    hashes = [_xxh3(data[i : i + stride], XXH3_SEED) for i in range(0, end, stride)]
    if salt is not None and hashes:
        hashes[0] = salt_block(hashes[0], salt)
    return hashes


def iter_block_hashes(
    token_ids: Sequence[int], block_size: int, salt: int | None = None
) -> Iterator[int]:
    """The hashes `compute_block_hashes` returns, computed as they are consumed: a prefix
    lookup that stops at the first block no worker holds hashes no further (a new 100k-token
    prompt: one block, not 6,250). Raises as `compute_block_hashes` does, before the first
    hash is asked for."""
    hashes = _iter_block_hashes(token_ids, block_size)
    if salt is None:
        return hashes
    # Block 0 now, the rest chained in C: a generator re-yielding them measured 5 % slower.
    first = next(hashes, None)
    if first is None:
        return hashes
    return chain((salt_block(first, salt),), hashes)


def _iter_block_hashes(token_ids: Sequence[int], block_size: int) -> Iterator[int]:
    if type(token_ids) is PackedTokenIds:
        # The contract's bytes already: each block is hashed where it lies.
        data, stride, end = _block_bytes(token_ids, block_size)
        return _hashes_of(data, stride, end)
    last = _last_words
    if known_u32(token_ids) and (last is None or last[0] is not token_ids):
        # Nothing to check: convert only the blocks hashed, in chunks of 1, 2, 4, ... blocks
        # (a new prompt's lookup asks for one block; a long match converts at most twice what
        # it hashes, in few conversions).
        _check_block_size(block_size)
        return _hashes_in_chunks(token_ids, block_size)
    data, stride, end = _block_bytes(token_ids, block_size)
    return _hashes_of(data, stride, end)


def _hashes_of(data: bytes, stride: int, end: int) -> Iterator[int]:
    for i in range(0, end, stride):
        yield _xxh3(data[i : i + stride], XXH3_SEED)


def _hashes_in_chunks(token_ids: Sequence[int], block_size: int) -> Iterator[int]:
    stride = block_size * _U32_BYTES
    blocks = len(token_ids) // block_size
    start = 0
    chunk = 1
    while start < blocks:
        stop = min(blocks, start + chunk)
        words = array(_U32, token_ids[start * block_size : stop * block_size])
        if _BIG_ENDIAN:
            words.byteswap()
        data = words.tobytes()
        yield from _hashes_of(data, stride, len(data))
        start = stop
        chunk *= 2


def compute_sequence_hashes(block_hashes: Sequence[int]) -> list[int]:
    """Chain block hashes into sequence hashes, each identifying a whole prefix.

    Returns a list as long as ``block_hashes``: ``seq[0] = block[0]`` and
    ``seq[i] = xxh3_64(le_u64(seq[i-1]) || le_u64(block[i]), seed=1337)``. Raises ``ValueError`` if
    a block hash is not an unsigned 64-bit integer.
    """
    if not block_hashes:
        return []
    out: list[int] = []
    append = out.append
    try:
        prev = block_hashes[0]
        # Validate the first hash the same way the packed ones are validated below.
        _pack_pair(prev, 0)
        append(prev)
        for block in block_hashes[1:]:
            prev = _xxh3(_pack_pair(prev, block), XXH3_SEED)
            append(prev)
    except struct.error as exc:
        raise ValueError(
            f"block_hashes must be unsigned 64-bit integers (0 <= h < 2**64): {exc}"
        ) from exc
    return out
