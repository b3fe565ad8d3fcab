"""What an engine's ``GET /v1/models`` says it serves: its base model and its LoRA adapters.

vLLM lists each adapter it serves (``--lora-modules name=path``, or one loaded at run time) as
a card of its own whose ``parent`` is the base model; GAIE's model-server protocol requires a
model server to serve such an adapter when a request's ``model`` names it.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["adapters_in", "model_cards"]


def model_cards(status: int, raw: bytes) -> list[dict[str, Any]]:
    """The cards (``data``) of a ``/v1/models`` answer; none when it is not a 200 with a JSON
    list of objects each with a string ``id``, however malformed. Pure."""
    if status != 200:
        return []
    try:
        cards = json.loads(raw).get("data", [])
    except (ValueError, AttributeError, RecursionError):
        # RecursionError: a body nested about a thousand levels deep, as malformed as any.
        return []
    if type(cards) is not list:
        return []
    return [c for c in cards if type(c) is dict and type(c.get("id")) is str]


def adapters_in(cards: list[dict[str, Any]], base: str | None) -> frozenset[str]:
    """The LoRA adapters among ``cards``: those with a string ``parent`` (vLLM's mark of an
    adapter), other than ``base`` itself. Pure."""
    return frozenset(c["id"] for c in cards if type(c.get("parent")) is str and c["id"] != base)
