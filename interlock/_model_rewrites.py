"""`ModelRewrites`: GAIE/llm-d's InferenceModelRewrite rules, from ``[[model_rewrites]]``.

A rule sends requests naming one of its ``matches`` (every model when it has none: the
generic rule) to one of its ``targets``, drawn by weight: a target's share is its weight over
the rule's total. As llm-d's picker does: the rule is looked up by the model the request's body
names; an exact match beats the generic rule; the draw is a whole number below the total,
and the first target whose running sum of weights exceeds it is the one. A weight of 0 keeps a
target in the file and out of the draw (a drained canary).

One file holds the rules, so what GAIE settles by age or list order (two resources naming
one model, a second generic rule) is refused here instead: such a rule would never apply.

Which targets exist is left to each request (`interlock.http._frontend.Frontend`): LoRA
adapters come and go with the engines that list them, so a target not served now is a 404
for the requests drawn to it, as a client naming it would get, not a configuration error.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Mapping, Sequence
from typing import Any, Final, NoReturn

import attrs

from ._errors import ConfigError, did_you_mean
from .wire import ModelRewriteDecision

#: The TOML array of tables holding the rules (``[[model_rewrites]]``), and the knob name
#: their errors carry.
MODEL_REWRITES_TABLE: Final = "model_rewrites"
#: The largest weight a target may have (the CRD's maximum).
MAX_WEIGHT: Final = 1_000_000
#: Invalid rules, each what is wrong and a one-line TOML example (an array of inline tables,
#: the same as ``[[model_rewrites]]`` tables): the configuration reference shows each with
#: the message it gets, and the test suite checks that every one is refused.
INVALID_RULES: Final = (
    ("no name", 'model_rewrites = [{ targets = [{ model_rewrite = "a" }] }]'),
    (
        "two rules of one name",
        'model_rewrites = [{ name = "r", matches = ["x"], targets = [{ model_rewrite = "a" }] }, '
        '{ name = "r", matches = ["y"], targets = [{ model_rewrite = "b" }] }]',
    ),
    (
        "an unknown key",
        'model_rewrites = [{ name = "r", match = ["x"], targets = [{ model_rewrite = "a" }] }]',
    ),
    ("no targets", 'model_rewrites = [{ name = "r", matches = ["x"], targets = [] }]'),
    (
        "a negative weight",
        'model_rewrites = [{ name = "r", targets = [{ model_rewrite = "a", weight = -1 }] }]',
    ),
    (
        "weights on some targets only",
        'model_rewrites = [{ name = "r", targets = [{ model_rewrite = "a", weight = 2 }, '
        '{ model_rewrite = "b" }] }]',
    ),
    (
        "weights all 0",
        'model_rewrites = [{ name = "r", targets = [{ model_rewrite = "a", weight = 0 }] }]',
    ),
    (
        "a target twice in a rule",
        'model_rewrites = [{ name = "r", targets = [{ model_rewrite = "a" }, '
        '{ model_rewrite = "a" }] }]',
    ),
    (
        "a model two rules match",
        'model_rewrites = [{ name = "r", matches = ["x"], targets = [{ model_rewrite = "a" }] }, '
        '{ name = "s", matches = ["x"], targets = [{ model_rewrite = "b" }] }]',
    ),
    (
        "two generic rules",
        'model_rewrites = [{ name = "r", targets = [{ model_rewrite = "a" }] }, '
        '{ name = "s", targets = [{ model_rewrite = "b" }] }]',
    ),
)
_RULE_KEYS: Final = ("name", "matches", "targets")
_TARGET_KEYS: Final = ("model_rewrite", "weight")


@attrs.frozen
class ModelRewriteTarget:
    """Where a rule sends a share of its requests: the model ``model_rewrite`` (the base
    model or a LoRA adapter), ``weight`` of the rule's total."""

    model_rewrite: str
    weight: int


@attrs.frozen
class ModelRewriteRule:
    """One rule: requests naming one of ``matches`` (any model when empty) go to one of
    ``targets``, drawn by weight. Build it with `ModelRewrites.from_table`, which checks it."""

    name: str
    matches: tuple[str, ...]
    targets: tuple[ModelRewriteTarget, ...]
    #: The running sums of the targets' weights (the last is the total): the draw's lookup.
    _bounds: tuple[int, ...] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        sums = tuple(itertools.accumulate(t.weight for t in self.targets))
        object.__setattr__(self, "_bounds", sums)

    @property
    def total_weight(self) -> int:
        return self._bounds[-1]

    def choose(self, rng: random.Random) -> ModelRewriteTarget:
        """The target for one request: a draw below the total weight, and the first target
        whose running sum exceeds it (a weight-0 target never does). Takes one draw from
        ``rng``."""
        draw = rng.randrange(self._bounds[-1])
        return self.targets[bisect.bisect_right(self._bounds, draw)]


@attrs.frozen
class ModelRewrites:
    """The rules, looked up by the model a request names (`rule_for`, `choose`).

    Raises:
        ConfigError: two rules of one name, a rule naming a model twice in its matches, a
            model matched by two rules, or two generic rules (either way, only the first
            would ever apply).
    """

    rules: tuple[ModelRewriteRule, ...] = ()
    _exact: Mapping[str, ModelRewriteRule] = attrs.field(init=False, repr=False, eq=False)
    _generic: ModelRewriteRule | None = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        # The lookups are built here only, and building them is what finds the rules that
        # would never apply, a model a rule names twice and a name two rules have
        # (`from_table` adds the file to the message).
        exact: dict[str, ModelRewriteRule] = {}
        generic: ModelRewriteRule | None = None
        names: set[str] = set()
        for rule in self.rules:
            at = f"[[{MODEL_REWRITES_TABLE}]] {rule.name!r}"
            if rule.name in names:
                # First: two copies of one rule would otherwise be told they match one model.
                _fail(f"{at}: another rule has this name; give each rule its own")
            names.add(rule.name)
            if not rule.matches:
                if generic is not None:
                    _fail(
                        f"{at}: a second rule without matches (the generic rule, for every "
                        f"model); {generic.name!r} is one already, and only the first would "
                        "ever apply: merge their targets into one rule"
                    )
                generic = rule
            if len(set(rule.matches)) != len(rule.matches):
                # Checked before the loop below, which would blame the rule on itself.
                twice = next(m for m in rule.matches if rule.matches.count(m) > 1)
                _fail(f"{at}: matches names {twice!r} twice; name it once")
            for model in rule.matches:
                first = exact.get(model)
                if first is not None:
                    _fail(
                        f"{at}: matches {model!r}, which the rule {first.name!r} matches "
                        "already; only the first would ever apply: name each model in one rule"
                    )
                exact[model] = rule
        object.__setattr__(self, "_exact", exact)
        object.__setattr__(self, "_generic", generic)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def rule_for(self, model: str) -> ModelRewriteRule | None:
        """The rule for requests naming ``model``: the one matching it exactly, else the
        generic one, else None. Pure."""
        rule = self._exact.get(model)
        return self._generic if rule is None else rule

    def choose(self, model: str, rng: random.Random) -> ModelRewriteDecision | None:
        """Where a request naming ``model`` goes (one draw from ``rng``), or None when no
        rule matches it."""
        rule = self.rule_for(model)
        if rule is None:
            return None
        target = rule.choose(rng)
        return ModelRewriteDecision(
            rule=rule.name,
            model=model,
            target=target.model_rewrite,
            weight=target.weight,
            total_weight=rule.total_weight,
        )

    def label_names(self) -> frozenset[str]:
        """Every model name the rules spell out (their matches and targets): the names a
        metric may label by; a name a client made up falls under ``other``."""
        names = {m for rule in self.rules for m in rule.matches}
        names.update(t.model_rewrite for rule in self.rules for t in rule.targets)
        return frozenset(names)

    @classmethod
    def from_table(cls, table: Any, where: str = "") -> ModelRewrites:
        """The rules of a ``[[model_rewrites]]`` array (each a table with ``name``,
        ``matches`` and ``targets``), checked. ``where`` prefixes errors (the file's path).

        Raises:
            ConfigError: naming the rule and the key: a value of the wrong type, an unknown
                key, a missing or repeated name, no targets, a negative weight or one above
                `MAX_WEIGHT`, weights on some targets only, weights all 0, a target named
                twice in a rule, a model matched by two rules, or two generic rules.
        """
        prefix = f"{where}: " if where else ""
        top = f"{prefix}[[{MODEL_REWRITES_TABLE}]]"
        if not isinstance(table, list) or not all(isinstance(r, dict) for r in table):
            _fail(
                f"{top} must be an array of tables, one per rule ([[{MODEL_REWRITES_TABLE}]] "
                f"name = ..., matches = [...], targets = [...]), got {table!r}"
            )
        rules = [_rule(entry, f"{top} #{index + 1}") for index, entry in enumerate(table)]
        try:
            return cls(tuple(rules))
        except ConfigError as exc:
            raise ConfigError(f"{prefix}{exc}", knobs=exc.knobs) from None


def _fail(message: str) -> NoReturn:
    raise ConfigError(message, knobs=(MODEL_REWRITES_TABLE,))


def _unknown(entry: Mapping[str, Any], keys: Sequence[str], at: str) -> None:
    for key in entry:
        if key not in keys:
            _fail(
                f"{at}: unknown key {key!r}{did_you_mean(key, keys)} (the keys are "
                f"{', '.join(keys)})"
            )


def _name(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and value == value.strip()


def _rule(entry: Mapping[str, Any], at: str) -> ModelRewriteRule:
    name = entry.get("name")
    if not _name(name):
        _fail(
            f"{at}: name must be a non-empty string without spaces around it, got {name!r}; "
            "name each rule: the name labels its metric and its transition records"
        )
    at = f"{at.rsplit(' #', 1)[0]} {name!r}"
    _unknown(entry, _RULE_KEYS, at)
    matches = entry.get("matches", [])
    if not isinstance(matches, list) or not all(_name(m) for m in matches):
        _fail(
            f"{at}: matches must be a list of model names (non-empty strings), or empty for "
            f"every model, got {matches!r}"
        )
    targets = entry.get("targets")
    if not isinstance(targets, list) or not targets:
        _fail(
            f"{at}: targets must be a non-empty array of tables "
            f'({{ model_rewrite = "NAME", weight = N }}), got {targets!r}'
        )
    return ModelRewriteRule(name, tuple(matches), _targets(targets, at))


def _targets(targets: list[Any], at: str) -> tuple[ModelRewriteTarget, ...]:
    weighted = [isinstance(t, dict) and "weight" in t for t in targets]
    if any(weighted) and not all(weighted):
        _fail(
            f"{at}: some targets have a weight and some do not; give every target a weight, "
            "or none (then they share the requests equally)"
        )
    found: list[ModelRewriteTarget] = []
    for index, target in enumerate(targets):
        here = f"{at} targets[{index}]"
        if not isinstance(target, dict):
            _fail(
                f'{here} must be a table ({{ model_rewrite = "NAME", weight = N }}), got {target!r}'
            )
        _unknown(target, _TARGET_KEYS, here)
        model = target.get("model_rewrite")
        if not _name(model):
            _fail(
                f"{here}: model_rewrite must name the model to send the requests to (the base "
                f"model or a LoRA adapter), got {model!r}"
            )
        weight = target.get("weight", 1)
        if type(weight) is not int or not 0 <= weight <= MAX_WEIGHT:
            _fail(
                f"{here}: weight must be a whole number from 0 (never chosen) to {MAX_WEIGHT}, "
                f"got {weight!r}"
            )
        if any(t.model_rewrite == model for t in found):
            _fail(f"{here}: {model!r} is a target twice; name it once, with the weights summed")
        found.append(ModelRewriteTarget(model, weight))
    if not any(t.weight for t in found):
        _fail(
            f"{at}: every target's weight is 0, so no request could go anywhere; give one "
            "target a positive weight, or remove the rule"
        )
    return tuple(found)
