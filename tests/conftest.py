"""Shared test configuration: hypothesis profiles.

`.ci/run` selects the ``ci`` profile (derandomized, bounded); ``dev`` explores more locally.
"""

from __future__ import annotations

import os
import sys

import pytest
import trio
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=40,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# Bytecode is written (to the __pycache__ folders .gitignore leaves out) even where
# PYTHONDONTWRITEBYTECODE is set, as in CI's environment: without it each of the hundreds of
# `python -m interlock` processes the suite starts compiled interlock from source again, and
# pytest rewrote every test module's assertions on every run.
if sys.dont_write_bytecode:
    sys.dont_write_bytecode = False
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


@pytest.fixture(autouse=True)
def _deterministic_trio_scheduling() -> None:
    """Seed trio's scheduler, so the order tasks run in is the same on every run.

    Importing hypothesis makes trio sort each batch of runnable tasks and shuffle it with its
    own generator (`trio._core._run._r`); hypothesis seeds that generator inside `@given`
    examples, and this seeds it for every other test too.
    """
    trio._core._run._r.seed(20261127)
