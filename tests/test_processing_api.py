"""The public surface of interlock.processing: an accidental export or removal fails here."""

from __future__ import annotations

import interlock.processing as processing

PUBLIC = {
    "CHATML_TEMPLATE",
    "ByteTokenizer",
    "ChatMessageError",
    "ChatTemplate",
    "ChatTemplateError",
    "HFTokenizer",
    "IncrementalDetokenizer",
    "StopStringMatcher",
    "Tokenizer",
    "TokenizerError",
    "load_chat_template",
    "load_tokenizer",
    "tokenizer_fingerprint",
}


def test_public_names_are_exactly_the_documented_ones() -> None:
    assert set(processing.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(processing, name) is not None


def test_public_names_live_in_private_modules() -> None:
    for name in PUBLIC - {"CHATML_TEMPLATE"}:
        module = getattr(processing, name).__module__
        assert module.startswith("interlock.processing._"), (name, module)


def test_public_names_have_docstrings() -> None:
    for name in PUBLIC - {"CHATML_TEMPLATE"}:
        assert getattr(processing, name).__doc__, name
