"""The Migration actor: decides whether a broken stream continues on another worker."""

from __future__ import annotations

from typing import Any

import attrs

from ._messages import MigrationPlan, MigrationRefused, StreamBroke
from ._runtime import Actor


class MigrationActor(Actor):
    """Folds the tokens generated so far into the prompt, lowers ``max_tokens`` (and
    ``min_tokens``) by as many, drops an engine-run chat once tokens were generated (the
    continuation goes on as token ids), and excludes every worker that broke the request, at most
    ``limit`` times per request; refuses once ``max_seq_len`` is exceeded."""

    name = "migration"

    def __init__(self, limit: int, max_seq_len: int | None) -> None:
        self._limit = limit
        self._max_seq_len = max_seq_len
        #: Counters since this incarnation started.
        self.migrated = 0
        self.refused = 0

    async def handle(self, message: Any) -> Any:
        if type(message) is StreamBroke:
            return self._decide(message)
        raise TypeError(f"the migration actor does not handle {message!r}")

    def _decide(self, message: StreamBroke) -> MigrationPlan | MigrationRefused:
        original = message.original
        generated = message.generated
        if message.migrations_done >= self._limit:
            self.refused += 1
            return MigrationRefused(
                f"migration_limit={self._limit} reached after {message.migrations_done} "
                "migration(s)"
            )
        length = len(original.token_ids) + len(generated)
        if self._max_seq_len is not None and length > self._max_seq_len:
            self.refused += 1
            return MigrationRefused(
                f"prompt + generated = {length} tokens exceeds migration_max_seq_len="
                f"{self._max_seq_len}"
            )
        max_tokens = original.max_tokens
        request = attrs.evolve(
            original,
            token_ids=original.token_ids + generated,
            max_tokens=None if max_tokens is None else max_tokens - len(generated),
            min_tokens=max(0, original.min_tokens - len(generated)),
            prefill_result=None,
            # A chat the engine ran cannot be re-sent with its answer so far folded in: the
            # continuation goes on as token ids (docs/engines.md). Nothing generated yet: the
            # same chat again.
            chat=original.chat if not generated else None,
        )
        self.migrated += 1
        return MigrationPlan(
            request=request,
            attempt=message.migrations_done + 1,
            exclude=message.exclude | {message.worker_id},
            folded_tokens=len(generated),
        )
