"""What a mock worker answers in: `MOCK_TEXT` and `mock_token_pool`.

A `MockEngine` given ``token_pool=mock_token_pool(tokenizer)`` generates only ids of that
tokenizer's words, so a frontend with the same tokenizer turns its answers into (shuffled)
English. ``interlock serve`` does this for its in-process workers, ``interlock worker
--tokenizer`` for a worker in another process.
"""

from __future__ import annotations

from ...processing import Tokenizer

#: Text whose tokens the mock workers generate, so that a mock answers in (shuffled) words.
MOCK_TEXT = (
    " The quick brown fox jumps over the lazy dog while a small bird sings in the tall green "
    "tree, and the river runs slowly past the old stone bridge toward the quiet sea. People "
    "walk along the road, talk about the weather, and share bread, tea and stories."
)


def mock_token_pool(tokenizer: Tokenizer) -> list[int]:
    """The ids the mock workers draw from: the tokens of `MOCK_TEXT`, plus each end-of-sequence
    id once, so that answers end by themselves now and then (``ignore_eos`` turns that off).

    Never blocks; raises only what ``tokenizer.encode`` raises."""
    pool = list(dict.fromkeys(tokenizer.encode(MOCK_TEXT)))
    return pool + [t for t in tokenizer.eos_token_ids if t not in pool]
