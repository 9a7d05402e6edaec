"""Rules on config values, declared once, beside each field of the schema (the config sections of `config/sections.py` and of each stage).

    precision: str = one_of("bf16", ("bf16", "fp32"))
    batch_size: int = at_least(32, 1)

Each helper returns a `dataclasses.field` whose metadata holds the rule. A rule is called with the
value and returns what is wrong with it, as the end of a message ("use one of 'bf16', 'fp32';
did you mean 'fp32'?"), or None. `config/tree.py` checks every field of every section as it loads and
prefixes the key and the value: `train.precision = 'fp64': use one of 'bf16', 'fp32'; did you mean
'fp32'?`. Relations between fields (image size and patch size, heads and widths) are a section's
`relations()` method, beside its fields.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

Rule = Callable[[Any], "str | None"]


def nearest(value: str, choices: Sequence[str]) -> str:
    """'; did you mean 'x'?' for the closest choice, or '' when none is close."""
    near = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else ""


def listing(choices: Sequence[str]) -> str:
    return ", ".join(repr(c) for c in choices)


@dataclass(frozen=True)
class OneOf:
    choices: tuple[str, ...]

    def __call__(self, value: str) -> str | None:
        if value in self.choices:
            return None
        return f"use one of {listing(self.choices)}{nearest(value, self.choices)}"


@dataclass(frozen=True)
class Range:
    """low ≤ value (< high when `high_open`, else ≤ high); `low_open`: low < value. NaN fails."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '≥'} {self.low}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low}, {self.high}{right}"

    def __call__(self, value: float) -> str | None:
        return None if self.holds(value) else f"use a value {self.describe()}"


@dataclass(frozen=True)
class Each:
    """A list whose items each satisfy `item` (a Range or OneOf); `distinct`, `non_empty`,
    `ordered` (non-decreasing) as asked."""

    item: Range | OneOf
    non_empty: bool = False
    distinct: bool = False
    ordered: bool = False

    def __call__(self, values: tuple) -> str | None:
        what = (f"values from {listing(self.item.choices)}" if isinstance(self.item, OneOf)
                else f"values {self.item.describe()}")
        text = (f"use a {'non-empty ' if self.non_empty else ''}list of "
                f"{'distinct ' if self.distinct else ''}{what}{', smallest first' if self.ordered else ''}")
        if self.non_empty and not values:
            return text
        for value in values:
            problem = self.item(value)
            if problem is not None:
                hint = nearest(value, self.item.choices) if isinstance(self.item, OneOf) else ""
                return f"{value!r} is not allowed; {text}{hint}"
        if self.distinct and len(set(values)) != len(values):
            return text
        if self.ordered and list(values) != sorted(values):
            return text
        return None


@dataclass(frozen=True)
class ResumeRef:
    """'auto', 'never' or the path of a training checkpoint (checked when the run starts)."""

    def __call__(self, value: str) -> str | None:
        if value in ("auto", "never") or "/" in value or value.endswith(".pt"):
            return None
        return f"use 'auto', 'never' or the path of a ckpt-*.pt file{nearest(value, ('auto', 'never'))}"


TRACKING_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks")


@dataclass(frozen=True)
class UrlRef:
    """'' or a URL whose scheme is one of `schemes`; `example` is shown when the scheme is missing."""

    schemes: tuple[str, ...]
    empty_means: str
    example: str

    def __call__(self, value: str) -> str | None:
        if not value:
            return None
        scheme, sep, rest = value.partition("://")
        if sep and scheme in self.schemes and rest.strip("/"):
            return None
        if not sep:
            return (f"not a URL; give one with a scheme of {listing(self.schemes)} (e.g. {self.example}), "
                    f"or leave it empty ({self.empty_means})")
        return (f"unknown scheme {scheme!r}; use one of {listing(self.schemes)}"
                f"{nearest(scheme, self.schemes)}")


@dataclass(frozen=True)
class NonEmpty:
    def __call__(self, value: str) -> str | None:
        return None if value.strip() else "must not be empty"


def ruled(default: Any, rule: Rule, *, mid_run: bool | None = None) -> Any:
    """A dataclass field with `default` whose values must pass `rule`. `mid_run`: whether a resumed
    run may change it (None: as its section's `MID_RUN` says; see resume.py)."""
    metadata = {"rule": rule} if mid_run is None else {"rule": rule, "mid_run": mid_run}
    return dataclasses.field(default=default, metadata=metadata)


def one_of(default: str, choices: Sequence[str]) -> Any:
    return ruled(default, OneOf(tuple(choices)))


def at_least(default: float, low: float) -> Any:
    return ruled(default, Range(low))


def above(default: float, low: float) -> Any:
    return ruled(default, Range(low, low_open=True))


def between(default: float, low: float, high: float, *, high_open: bool = False,
            low_open: bool = False) -> Any:
    return ruled(default, Range(low, high, low_open=low_open, high_open=high_open))


def each(default: tuple, item: Range | OneOf, **how: bool) -> Any:
    return ruled(default, Each(item, **how))


def problem_of(field: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with `value` for `field` by the field's rule; None when it passes or has none."""
    rule = field.metadata.get("rule")
    return None if rule is None else rule(value)
