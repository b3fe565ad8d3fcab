"""Chat templates: Hugging Face-style Jinja templates rendered in a sandbox."""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Final, NoReturn, final

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.parser import Parser
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from ._errors import ChatTemplateError
from ._messages import kind, validate_messages, validate_tools

__all__ = ["CHATML_TEMPLATE", "ChatTemplate", "load_chat_template"]

# Classic ChatML, extended with the Hermes/Qwen tool format so tools and tool calls are rendered
# rather than silently dropped. Without tools it renders exactly the old Hugging Face ChatML
# default: "<|im_start|>{role}\n{content}<|im_end|>\n" per message.
CHATML_TEMPLATE: Final = """\
{%- set ns = namespace(system_done=false) %}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
        {%- set ns.system_done = true %}
    {%- endif %}
    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and ' }}
    {{- 'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n' }}
    {{- '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if not (loop.first and ns.system_done) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content }}
        {%- for tool_call in message.tool_calls or [] %}
            {%- if not loop.first or message.content %}
                {{- '\\n' }}
            {%- endif %}
            {%- set call = {'name': tool_call.function.name,
                            'arguments': tool_call.function.arguments} %}
            {{- '<tool_call>\\n' + call | tojson + '\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Helpers the template relies on; a caller's template kwarg must not replace them.
_RESERVED_KWARGS: Final = frozenset({"raise_exception", "strftime_now", "namespace"})
# jinja2 names the source of a template built from a string "<template>"; traceback frames with
# that file name are lines of the chat template.
_TEMPLATE_FILENAME: Final = "<template>"


class _TemplateRaised(Exception):
    """The template called ``raise_exception``; carries the template's own message."""


def _raise_exception(message: object) -> NoReturn:
    raise _TemplateRaised(str(message))


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Hugging Face replaces jinja2's tojson, which HTML-escapes "<", ">", "&" and "'"; templates
    # are written against HF's version, so prompts would change if we kept jinja2's.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _GenerationTag(jinja2.ext.Extension):
    """Accept HF's ``{% generation %}...{% endgeneration %}`` markers and render their body.

    Hugging Face uses the markers to build assistant-token masks for training; serving only needs
    the text, but templates that contain them must still compile.
    """

    tags = {"generation"}  # noqa: RUF012 - jinja2's Extension API defines this as a class set

    def parse(self, parser: Parser) -> nodes.Node | list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


#: The attributes of a dict: ``message.items`` is the method, ``message.role`` the key.
_DICT_ATTRIBUTES: Final = frozenset(dir(dict))
#: The str methods a template may call as they are: all but the private ones, and the two
#: (``format``, ``format_map``) the sandbox wraps.
_STR_METHODS: Final = frozenset(
    name for name in dir(str) if not name.startswith("_") and name not in ("format", "format_map")
)


#: Values of a plain type: no method to wrap, nothing to mutate.
_PLAIN: Final = frozenset({bool, int, float, str, type(None)})
_MISSING: Final = object()
#: The type of a bound method of a built-in type, such as ``"text".startswith``.
_BUILTIN_METHOD: Final = type("".startswith)


class _ChatEnvironment(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, with its most frequent attribute lookups (a message's
    field, a str method such as ``content.startswith``, ``loop.index0``, a namespace's flag)
    answered directly: the same values the sandbox's checks arrive at, without them (half of
    a chat template's render)."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        kind = type(obj)
        if kind is dict and attribute not in _DICT_ATTRIBUTES:
            # The sandbox tries the attribute (a dict has no other), then the key.
            try:
                return obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        if kind is str and attribute in _STR_METHODS:
            # Safe: not private, not internal, str is immutable, not a format method.
            return getattr(obj, attribute)
        if (kind is LoopContext or kind is Namespace) and attribute[:1] != "_":
            value = getattr(obj, attribute, _MISSING)
            if type(value) in _PLAIN:
                return value
        return super().getattr(obj, attribute)

    def call(
        # jinja2's names: the dunders keep them from clashing with a caller's kwargs.
        __self,
        __context: Context,
        __obj: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        # A str method `getattr` gave out (``message.content.startswith(...)``, a template's
        # most frequent call), called as the sandbox's and the context's checks would call
        # it: safe (see `getattr`), no jinja2 pass-argument marker to honour, the loop and
        # block variables the compiler passes dropped. Those checks cost one failed attribute
        # lookup (an exception) each, twice per call.
        if (
            type(__obj) is _BUILTIN_METHOD
            and type(__obj.__self__) is str
            and __obj.__name__ in _STR_METHODS
        ):
            kwargs.pop("_block_vars", None)
            kwargs.pop("_loop_vars", None)
            return __obj(*args, **kwargs)
        return super().call(__context, __obj, *args, **kwargs)


def _make_environment() -> ImmutableSandboxedEnvironment:
    # The same settings as transformers' _compile_jinja_template, so a template renders here
    # exactly as it does for `tokenizer.apply_chat_template`.
    env = _ChatEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENVIRONMENT: Final = _make_environment()


def _template_line(exc: BaseException) -> int | None:
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return exc.lineno
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == _TEMPLATE_FILENAME:
            line = frame.lineno
    return line


@final
class ChatTemplate:
    """A compiled chat template that turns a list of chat messages into prompt text.

    The template runs in jinja2's ``ImmutableSandboxedEnvironment`` with Hugging Face's
    conventions: ``trim_blocks`` and ``lstrip_blocks``, the variables ``messages``, ``tools``,
    ``add_generation_prompt``, ``bos_token`` and ``eos_token`` (when known), any extra template
    kwargs (e.g. ``enable_thinking``), the helpers ``raise_exception`` and ``strftime_now``, and a
    ``tojson`` filter that does not escape non-ASCII text or HTML characters. As in HF, an undefined
    variable renders as empty text; using one in a way that needs a value is an error.

    Raises:
        ChatTemplateError: at construction, if the source does not compile.
    """

    __slots__ = ("_chatml", "_compiled", "bos_token", "eos_token", "name", "source")

    def __init__(
        self,
        source: str,
        *,
        name: str = "<string>",
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        self.source: Final = source
        self.name: Final = name
        self.bos_token: Final = bos_token
        self.eos_token: Final = eos_token
        # The built-in ChatML renders a conversation without tools as plain concatenation
        # (`_render_plain_chatml`), ~10x cheaper than running it in the sandbox.
        self._chatml = source == CHATML_TEMPLATE
        try:
            self._compiled = _ENVIRONMENT.from_string(source)
            # A plain dict, not jinja2's ChainMap over the environment's globals: every render
            # copies the globals into its context, and a dict copies at C speed.
            self._compiled.globals = dict(self._compiled.globals)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(
                f"chat template {name} does not compile: {exc} (template line "
                f"{_template_line(exc)}); fix the template or configure another one"
            ) from exc

    @classmethod
    def chatml(cls, *, eos_token: str | None = "<|im_end|>") -> ChatTemplate:
        """Return the built-in ChatML template (see ``CHATML_TEMPLATE``)."""
        return cls(CHATML_TEMPLATE, name="<built-in ChatML>", eos_token=eos_token)

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r}, {len(self.source)} chars)"

    def render(
        self,
        messages: Sequence[Mapping[str, object]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, object]] | None = None,
        **template_kwargs: object,
    ) -> str:
        """Render ``messages`` (OpenAI chat format) to prompt text.

        Messages are validated and normalised first: ``content`` that is a list of text parts is
        joined with newlines (as vLLM does for text-only models), an assistant's missing or null
        ``content`` becomes ``""``, and tool-call ``arguments`` given as a JSON string are parsed
        into an object, which is what Hugging Face templates expect. The caller's objects are not
        modified.

        ``add_generation_prompt`` defaults to True (the OpenAI server default; HF's default is
        False): the prompt ends with the opening of an assistant turn.

        Returns:
            The prompt text, special tokens included as text.

        Raises:
            ChatMessageError: a message, or ``tools``, has the wrong shape; ``field`` names it.
            ChatTemplateError: the template rejected the conversation or failed while rendering,
                or a template kwarg would replace one of the template helpers.
        """
        clean_messages = validate_messages(messages)
        clean_tools = validate_tools(tools)
        shadowed = _RESERVED_KWARGS.intersection(template_kwargs)
        if shadowed:
            raise ChatTemplateError(
                f"template kwarg {sorted(shadowed)[0]!r} would replace a helper that chat "
                "templates call; rename or drop it"
            )
        if self._chatml and not clean_tools:
            text = _render_plain_chatml(clean_messages, add_generation_prompt)
            if text is not None:
                return text
        context: dict[str, object] = {}
        if self.bos_token is not None:
            context["bos_token"] = self.bos_token
        if self.eos_token is not None:
            context["eos_token"] = self.eos_token
        context.update(template_kwargs)
        context["messages"] = clean_messages
        context["tools"] = clean_tools
        context["add_generation_prompt"] = add_generation_prompt
        try:
            return self._compiled.render(context)
        except _TemplateRaised as exc:
            raise ChatTemplateError(
                f"chat template {self.name} rejected the conversation: {exc}"
            ) from exc
        # The template is foreign code: whatever it raises must reach the caller as a typed
        # error about the template, not as an arbitrary exception from deep inside jinja2.
        except Exception as exc:
            raise ChatTemplateError(
                f"chat template {self.name} failed at template line {_template_line(exc)}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc


def _render_plain_chatml(
    messages: list[dict[str, object]], add_generation_prompt: object
) -> str | None:
    """What `CHATML_TEMPLATE` renders for ``messages`` when ``tools`` is empty, byte for byte
    (its ``tools`` branch and system flag unused, every message gets its turn), or None when
    the template must run: a tool call, or a value that is not exactly a str or bool (a str
    subclass may concatenate differently; jinja2 would judge another object's truth)."""
    if type(add_generation_prompt) is not bool:
        return None
    parts = []
    for message in messages:
        role = message["role"]
        content = message["content"]
        if type(role) is not str or type(content) is not str or message.get("tool_calls"):
            return None
        parts.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def load_chat_template(path: str | os.PathLike[str], *, name: str = "default") -> ChatTemplate:
    """Load the chat template of a Hugging Face model or tokenizer.

    ``path`` is a ``*.jinja`` file, a ``tokenizer_config.json``, or a model directory; in a
    directory ``chat_template.jinja`` wins over the ``chat_template`` key of
    ``tokenizer_config.json``, as in recent transformers. When the config holds several named
    templates, ``name`` picks one. ``bos_token``/``eos_token`` come from the directory's
    ``tokenizer_config.json`` when there is one.

    Returns:
        The compiled template.

    Raises:
        ChatTemplateError: the path does not exist, holds no chat template (the message names
            what was looked for), cannot be read or parsed, or the template does not compile.
    """
    path = Path(path)
    if path.is_dir():
        config_path = path / "tokenizer_config.json"
        config = _read_config(config_path) if config_path.is_file() else {}
        template = _find_template(path, config, config_path, name=name)
        if template is None:
            raise ChatTemplateError(
                f"{path}: no chat template found; looked for chat_template.jinja and the "
                "'chat_template' key of tokenizer_config.json. Configure a template explicitly "
                "or use the built-in ChatML one"
            )
        return template
    if not path.is_file():
        raise ChatTemplateError(f"{path}: no such file or directory; expected a chat template")
    if path.suffix == ".jinja":
        sibling = path.parent / "tokenizer_config.json"
        config = _read_config(sibling) if sibling.is_file() else {}
        return _template_from_source(_read_text(path), str(path), config)
    config = _read_config(path)
    template = _template_from_config(config, path, name=name)
    if template is None:
        raise ChatTemplateError(f"{path}: has no 'chat_template' key")
    return template


def _find_template(
    directory: Path, config: Mapping[str, Any], config_path: Path, *, name: str = "default"
) -> ChatTemplate | None:
    """Return the directory's chat template, or None when it has none (see load_chat_template)."""
    jinja_path = directory / "chat_template.jinja"
    if jinja_path.is_file():
        return _template_from_source(_read_text(jinja_path), str(jinja_path), config)
    return _template_from_config(config, config_path, name=name)


def _template_from_config(
    config: Mapping[str, Any], config_path: Path, *, name: str
) -> ChatTemplate | None:
    source = config.get("chat_template")
    if source is None:
        return None
    if isinstance(source, list):
        # transformers' multi-template form: [{"name": "default", "template": "..."}, ...]
        named = {
            entry.get("name"): entry.get("template")
            for entry in source
            if isinstance(entry, Mapping)
        }
        if name not in named:
            raise ChatTemplateError(
                f"{config_path}: no chat template named {name!r}; it has "
                f"{', '.join(repr(n) for n in named)}"
            )
        source = named[name]
        where = f"{config_path} [{name}]"
    else:
        where = str(config_path)
    if not isinstance(source, str):
        raise ChatTemplateError(f"{where}: chat_template is {kind(source)}, expected a string")
    return _template_from_source(source, where, config)


def _template_from_source(source: str, where: str, config: Mapping[str, Any]) -> ChatTemplate:
    return ChatTemplate(
        source,
        name=where,
        bos_token=_special_token_text(config.get("bos_token")),
        eos_token=_special_token_text(config.get("eos_token")),
    )


def _special_token_text(value: object) -> str | None:
    """The text of a special token as written in tokenizer_config.json (str or AddedToken dict)."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ChatTemplateError(f"{path}: cannot read the chat template: {exc}") from exc


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChatTemplateError(f"{path}: cannot read tokenizer config: {exc}") from exc
    if not isinstance(config, dict):
        raise ChatTemplateError(f"{path}: expected a JSON object, got {kind(config)}")
    return config
