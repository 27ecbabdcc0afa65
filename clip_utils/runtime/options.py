"""Command-line option types and groups that the CLI and the methods' own options share.

Each type raises `argparse.ArgumentTypeError`, so a bad value is a usage error (exit 2)
that names the option; numbers that are not finite are refused here, at parsing.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from typing import Any

from clip_utils import config
from clip_utils.config import TrainConfig


def whole(text: str) -> int:
    """An integer."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def number(text: str) -> float:
    """A finite real number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def checked(parse: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse `type` that parses with `parse` and insists on `ok(value)`."""

    def convert(text: str):
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return convert


positive_int = checked(whole, lambda v: v >= 1, "a positive number")
positive_float = checked(number, lambda v: v > 0, "a positive number")
non_negative_int = checked(whole, lambda v: v >= 0, "zero or more")
non_negative_float = checked(number, lambda v: v >= 0, "zero or more")
fraction = checked(number, lambda v: 0 <= v < 1, "a number in [0, 1)")


def name_list(text: str) -> list[str]:
    """A comma-separated list of names."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of positive integers."""
    return [positive_int(item) for item in name_list(text)]


def ints(text: str) -> list[int]:
    """A comma-separated list of integers."""
    return [whole(item) for item in name_list(text)]


class Given(argparse.Action):
    """Stores the option's value and notes in `args.given` that the command line set it, for an
    option that only some settings use (a default cannot tell "not given" from "given as the default")."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", frozenset()) | {self.dest}


def given(args: argparse.Namespace) -> frozenset[str]:
    """The options of `args` that the command line set explicitly (`Given` options only)."""
    return getattr(args, "given", frozenset())


def add_training_options(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """`--epochs --lr --weight-decay --resume` of a method that trains over epochs."""
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int, default=os.environ.get("CLIP_EPOCHS", str(defaults.epochs)),
                   action=Given, help="epochs (default: $CLIP_EPOCHS or %(default)s)")
    g.add_argument("--lr", type=positive_float, default=defaults.lr, action=Given,
                   help="peak learning rate (default: %(default)s)")
    g.add_argument("--weight-decay", type=non_negative_float, default=defaults.weight_decay, action=Given,
                   help="AdamW weight decay (default: %(default)s)")
    g.add_argument("--resume", action="store_true", help="continue from the last completed epoch")


def add_sample_options(parser: argparse.ArgumentParser) -> None:
    """`--shots K` of a method that fits on labelled images (`--seed` is a common option)."""
    parser.add_argument("--shots", type=positive_int, default=None, metavar="K",
                        help=f"few-shot: fit on K images per class drawn with --seed, validate on min(K, "
                             f"{config.FEWSHOT_VAL_SHOTS}) per class; results in <method>/shots_K/seed_S/ "
                             f"(default: every image)")


def add_prompt_option(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    """`--prompts SET` of a method that builds on the zero-shot text classifier."""
    parser.add_argument("--prompts", default=default, metavar="SET",
                        help="the prompt set of the zero-shot text classifier it builds on: default, domain, "
                             "diverse, domain_ensemble, clip, waffle, descriptions (with --descriptions), or auto "
                             "= the best on the run's validation images (default: %(default)s)")
