"""Loading the application's own code named on a command line: ``module:attribute``."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from ._errors import ConfigError
from ._pipeline import SelectionPolicyFactory


def import_policy_factory(target: str, *, what: str) -> SelectionPolicyFactory:
    """Import the selection-policy factory ``target`` names (``module:attribute``; the attribute
    may be dotted). ``what`` starts every error message (the flag or item being read).

    Imports the module, running its code; the factory is not called.

    Raises:
        ConfigError: ``target`` is not an import path, the module does not import (or raises
            as it does), or it has no such attribute.
    """
    module_name, _, attribute = target.partition(":")
    if not (_dotted_name(module_name) and _dotted_name(attribute)):
        raise ConfigError(
            f"{what}: {target!r} is not module:attribute (a Python import path, a colon and "
            "the name of a factory in that module, e.g. my_policies:make_policy)"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise ConfigError(
                f"{what}: there is no module {module_name!r} to import (no module named "
                f"{missing!r}); run from the directory that holds it, or add that directory "
                "to PYTHONPATH"
            ) from None
        raise ConfigError(
            f"{what}: importing {module_name!r} failed: {exc} (a module it imports is "
            "missing; install it)"
        ) from exc
    except Exception as exc:
        # Importing runs the module's code, which may raise anything: name it, do not crash.
        raise ConfigError(
            f"{what}: importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    found: Any = module
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise ConfigError(
                f"{what}: module {module_name!r} has no attribute {attribute!r}; name a "
                "factory defined there (a callable taking the PipelineConfig and returning a "
                "SelectionPolicy)"
            ) from None
    factory: SelectionPolicyFactory = found
    return factory


def import_from_working_directory() -> None:
    """Let modules in the current directory import, as under ``python -m``, when a program
    runs as an installed command (whose ``sys.path`` starts with its script's directory)."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _dotted_name(text: str) -> bool:
    return all(part.isidentifier() for part in text.split("."))
