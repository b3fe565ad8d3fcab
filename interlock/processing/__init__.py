"""Preprocessing and postprocessing of text: synchronous, no I/O after loading.

- ``Tokenizer`` (protocol), ``HFTokenizer`` (``load_tokenizer``) and ``ByteTokenizer`` (built-in).
- ``ChatTemplate`` (``load_chat_template``, ``ChatTemplate.chatml()``): messages -> prompt text.
- ``IncrementalDetokenizer``: generated token ids -> text, piece by piece.
- ``StopStringMatcher``: cuts streamed text at the first stop string.
- ``tokenizer_fingerprint``: tells tokenizers apart (checked in the worker handshake).
"""

from __future__ import annotations

from ._byte_tokenizer import ByteTokenizer
from ._chat_template import CHATML_TEMPLATE, ChatTemplate, load_chat_template
from ._detokenizer import IncrementalDetokenizer
from ._errors import ChatMessageError, ChatTemplateError, TokenizerError
from ._fingerprint import tokenizer_fingerprint
from ._stop import StopStringMatcher
from ._tokenizer import HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
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
]
