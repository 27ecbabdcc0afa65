"""Notebook parameters from `CLIP_*` environment variables, parsed strictly.

    EPOCHS = env_int("CLIP_EPOCHS", 10)
    DATASETS = env_list("CLIP_DATASETS", "flowers102,cub200")
    RESUME = env_flag("CLIP_RESUME")
    SHOTS = env_ints("CLIP_FEWSHOT_SHOTS", (1, 2))     # `none` gives (): the section is skipped

The notebooks' `parameters` cells read their overrides through these, so `make demo`, the
tests and users drive the same notebooks. A value that does not parse stops the notebook
in its first cell with the variable's name, instead of running on a silent misreading
(`CLIP_RESUME=true` read as false would restart, and delete, an interrupted run).
Unset or empty variables give the default.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from clip_utils.errors import InvalidValue

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


class ParameterError(InvalidValue):
    """An environment override that does not parse; names the variable and what it accepts."""


def _raw(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def env_str(name: str, default: str) -> str:
    """`$name`, or `default` when unset or empty.

    Args:
        name: environment variable.
        default: value when unset.
    """
    return _raw(name) or default


def _number(name: str, default, parse, ok, expected: str):
    raw = _raw(name)
    if raw is None:
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise ParameterError(f"{name}={raw!r}: expected {expected}") from None
    if not ok(value):
        raise ParameterError(f"{name}={raw!r}: expected {expected}")
    return value


def env_int(name: str, default: int, minimum: int = 1) -> int:
    """`$name` as a whole number of at least `minimum`.

    Args:
        name: environment variable.
        default: value when unset.
        minimum: smallest accepted value.
    """
    return _number(name, default, int, lambda v: v >= minimum, f"a whole number of at least {minimum}")


def env_float(name: str, default: float) -> float:
    """`$name` as a positive number (learning rates, LoRA alpha).

    Args:
        name: environment variable.
        default: value when unset.
    """
    return _number(name, default, float, lambda v: v > 0, "a positive number")


def env_list(name: str, default: str) -> list[str]:
    """`$name` as a comma-separated list; spaces around items are dropped.

    Args:
        name: environment variable.
        default: comma-separated value when unset.
    """
    raw = _raw(name) or default
    items = [item.strip() for item in raw.split(",") if item.strip()]
    if not items:
        raise ParameterError(f"{name}={raw!r}: expected a comma-separated list")
    return items


def env_ints(name: str, default: Sequence[int], minimum: int = 1) -> tuple[int, ...]:
    """`$name` as a comma-separated list of whole numbers of at least `minimum`; `none` is the empty list.

    Unset or empty gives the default, as everywhere; `none` (or `off`) says "none of them",
    which turns off what the list drives (Task2's few-shot section).

    Args:
        name: environment variable.
        default: value when unset.
        minimum: smallest accepted value.
    """
    raw = _raw(name)
    if raw is None:
        return tuple(default)
    if raw.lower() in ("none", "off"):
        return ()
    try:
        values = tuple(int(item) for item in env_list(name, ""))
    except ValueError:
        values = ()
    if not values or any(v < minimum for v in values):
        raise ParameterError(f"{name}={raw!r}: expected a comma-separated list of whole numbers of at least "
                             f"{minimum}, or none")
    return values


def env_flag(name: str, default: bool = False) -> bool:
    """`$name` as a yes/no switch: 1/true/yes/on or 0/false/no/off, any case.

    Args:
        name: environment variable.
        default: value when unset.
    """
    raw = _raw(name)
    if raw is None:
        return default
    if raw.lower() in TRUE:
        return True
    if raw.lower() in FALSE:
        return False
    raise ParameterError(f"{name}={raw!r}: expected one of {', '.join(TRUE + FALSE)}")
