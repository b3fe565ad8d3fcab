"""`Preprocessor`: the tokenizer and chat template a frontend turns prompts into tokens with."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict, Unpack

import attrs

from ..kv._hashing import PackedTokenIds
from ..processing import (
    ByteTokenizer,
    ChatTemplate,
    HFTokenizer,
    Tokenizer,
    load_chat_template,
)
from ..processing._byte_tokenizer import tokenizer_from_spec


class ChatOptions(TypedDict, total=False):
    """`Preprocessor.render_chat`'s keywords, which `Preprocessor.encode_chat` passes on."""

    tools: Sequence[Mapping[str, object]] | None
    add_generation_prompt: bool
    template_kwargs: Mapping[str, Any] | None


#: Prompt tokens decoded along with an answer (the incremental detokenizer uses as many).
_CONTEXT_TOKENS = 5
#: Prompt endings whose text `Preprocessor.decode_completion` keeps (then it starts over).
_CONTEXTS_KEPT = 1024


@attrs.frozen
class Preprocessor:
    """Tokenizer + chat template. Synchronous; no I/O after loading.

    `Preprocessor.default` needs no files (the built-in byte-level tokenizer and ChatML);
    `Preprocessor.load` reads a Hugging Face ``tokenizer.json`` or model directory.
    """

    tokenizer: Tokenizer
    chat_template: ChatTemplate
    #: Where the tokenizer came from, for the startup banner.
    source: str = "<built-in byte tokenizer>"
    #: The text of the prompt's last few tokens, by tokens: a chat prompt ends with the same
    #: few (the assistant turn's opening), so it is decoded once, not on every answer.
    _context_text: dict[tuple[int, ...], str] = attrs.field(
        factory=dict, init=False, repr=False, eq=False
    )

    @property
    def makes_u32_ids(self) -> bool:
        """Whether every id this preprocessor returns is an int in the u32 range by
        construction: interlock's own preprocessor over its byte tokenizer or a Hugging Face
        one (whose ids are Rust u32s), not a subclass or another tokenizer, whose ids are
        checked like a client's."""
        return type(self) is Preprocessor and type(self.tokenizer) in (ByteTokenizer, HFTokenizer)

    @property
    def packs_ids(self) -> bool:
        """Whether `encode_text_packed` works: interlock's own
        preprocessor over the built-in byte tokenizer (not a subclass, whose encoding may
        differ)."""
        return type(self) is Preprocessor and type(self.tokenizer) is ByteTokenizer

    @classmethod
    def default(cls) -> Preprocessor:
        """The built-in byte-level tokenizer with its ChatML template."""
        tokenizer = ByteTokenizer()
        return cls(tokenizer, tokenizer.chat_template)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, chat_template: str | os.PathLike[str] | None = None
    ) -> Preprocessor:
        """Load a tokenizer (a ``tokenizer.json``, ``.json.gz`` or model directory, or
        ``builtin``: `tokenizer_from_spec`) and its chat template: ``chat_template`` when given
        (a ``.jinja`` file, a ``tokenizer_config.json`` or a directory), else the tokenizer's
        own (next to its files; the byte tokenizer's is ChatML), else the built-in ChatML.

        Raises:
            TokenizerError, ChatTemplateError: the files are missing or invalid (the message
                names the path).
        """
        tokenizer = tokenizer_from_spec(path)
        template = (
            load_chat_template(chat_template)
            if chat_template is not None
            else tokenizer.chat_template or ChatTemplate.chatml()
        )
        if type(tokenizer) is ByteTokenizer:
            return cls(tokenizer, template)  # named as `default` names it
        return cls(tokenizer, template, source=os.fspath(path))

    def render_chat(
        self,
        messages: Sequence[Mapping[str, object]],
        *,
        tools: Sequence[Mapping[str, object]] | None = None,
        add_generation_prompt: bool = True,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt's text: ``messages`` rendered with the chat template.

        Raises:
            ChatMessageError: a message has the wrong shape (``field`` names it).
            ChatTemplateError: the template rejected the conversation.
        """
        return self.chat_template.render(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            **(template_kwargs or {}),
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, object]], **options: Unpack[ChatOptions]
    ) -> list[int]:
        """`render_chat`'s prompt (``options``: its keywords), tokenized.

        Raises:
            ChatMessageError, ChatTemplateError: as `render_chat`.
            TokenizerError: the text cannot be encoded (a lone surrogate).
        """
        # The template writes the special tokens itself (Hugging Face's convention).
        return self.tokenizer.encode(
            self.render_chat(messages, **options), add_special_tokens=False
        )

    def encode_text_packed(self, text: str) -> PackedTokenIds:
        """The ids `encode_text` returns, packed (no int object per id); for a chat,
        `render_chat`'s text (the byte tokenizer adds no special tokens, so these are
        `encode_chat`'s ids). Only when `packs_ids`.

        Raises:
            TokenizerError: as `encode_text`.
            TypeError: the tokenizer cannot pack (not `packs_ids`).
        """
        return PackedTokenIds(self._byte_tokenizer().encode_u32(text))

    def _byte_tokenizer(self) -> ByteTokenizer:
        tokenizer = self.tokenizer
        if type(tokenizer) is not ByteTokenizer:
            raise TypeError(f"{tokenizer!r} cannot pack ids: only the built-in byte tokenizer does")
        return tokenizer

    def decode_completion(self, prompt_ids: Sequence[int], generated: Sequence[int]) -> str:
        """The text of ``generated`` as it reads after the prompt, in one decode: what the
        incremental detokenizer's pieces add up to (the last few prompt tokens are decoded
        along, so the first token keeps the spacing it has after the prompt).

        Raises:
            TokenizerError: an id outside the vocabulary.
        """
        if not generated:
            return ""
        context = tuple(prompt_ids[-_CONTEXT_TOKENS:])
        decode = self.tokenizer.decode
        known = self._context_text
        prefix = known.get(context)
        if prefix is None:
            prefix = decode(context) if context else ""
            if len(known) >= _CONTEXTS_KEPT:
                known.clear()
            known[context] = prefix
        full = decode([*context, *generated])
        if full.startswith(prefix):
            return full[len(prefix) :]
        return decode(list(generated))

    def encode_text(self, text: str) -> list[int]:
        """Tokenize a raw prompt, with the tokenizer's own BOS/EOS handling."""
        return self.tokenizer.encode(text, add_special_tokens=True)
