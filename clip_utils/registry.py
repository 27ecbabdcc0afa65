"""Methods as registered plug-ins: each method module declares itself once, everything else asks here.

    from clip_utils import registry
    registry.get("probe").folder               # "linear_probe" (aliases and CLI commands resolve)
    [m.label for m in registry.methods()]      # every method, in presentation order
    registry.trained()                         # the ones that fit on labelled images

A method is one module of `clip_utils.methods` that ends with

    register(Method(name="tip_adapter", label="Tip-Adapter", command="tip-adapter", ...))

and nothing else in the package names it: the CLI builds a command per method, `predict`,
the photo explorer, the few-shot sweep, `report`, the figures, `export` and the notebooks
iterate over `methods()`. The registry imports the `methods` package the first time it is
asked (`_discover`), as timm's `list_models` sees every module its `models` package imports:
that one import is how plug-ins are found, so this module stays a building block that
every layer may use.

What a method declares (`Method`): its names and results folder; what it is (trains or not,
builds on the zero-shot text classifier, names classes it never trained on, is the reference
row); what it adds to the command line and how its settings are read from it; how it runs,
loads a trained classifier, tells a finished checkpoint and exports; and which methods'
runs of the same sample it starts from (`requires`), so a sweep runs those first.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from clip_utils.errors import InvalidValue

# How a method scores classes it did not train on (the base-to-new protocol's question):
# "text" (its classifier is built from class names: any name works), "fallback" (it holds
# class-specific parts; new classes fall back to the zero-shot classifier), "closed" (a
# closed-set head: it cannot).
NewClasses = Literal["text", "fallback", "closed"]


def _none(*_args: Any, **_kwargs: Any) -> None:
    return None


def _no_options(args: Any) -> None:
    return None


@dataclass(frozen=True)
class Method:
    """One method's declaration.

    Attributes:
        name: canonical name, recorded as `method` in metrics.json and checkpoints.
        label: how figures and tables name it.
        command: its CLI command (`python -m clip_utils COMMAND`); also accepted as a name.
        folder: its results folder under `results/<dataset>/`.
        description: one line for `--help`.
        order: position in tables, figures and `--help` (lower first).
        aliases: other names accepted on input.
        trained: it fits on labelled images: a checkpoint per run, `--shots/--seed`, sweeps.
        epochs: it trains over epochs (curves.json, `--resume`); training-free fits do not.
        uses_text_classifier: it builds on the zero-shot text classifier (and takes `--prompts`).
        new_classes: how it scores classes it did not train on (`NewClasses`): the base-to-new
            protocol (`app.base2new`) scores new classes by `score_new` ("text"), by the
            zero-shot classifier ("fallback"), or not at all ("closed").
        reference: the reference row of tables and figures (zero-shot).
        distributed: it runs under torchrun.
        requires: methods whose finished run of the same sample it starts from when present;
            a sweep runs them first.
        batch_size: its command's default `--batch-size`.
        add_arguments: `add_arguments(parser)` adds its own command's options.
        add_sweep_arguments: `add_sweep_arguments(parser)` adds options to `fewshot` and `base2new`.
        check_arguments: `check_arguments(args)` raises `errors.InvalidValue` for a combination
            of options that cannot work (a usage error), before anything loads.
        parser_defaults: `parser_defaults(args) -> dict | None`: defaults that depend on
            another option (a preset); the command line is parsed again with them.
        settings: `settings(args)` reads its run settings from parsed options (its own
            command's, or `fewshot`'s, where options it lacks keep their defaults).
        run: `run(lab, dataset, settings, *, shots, seed, resume, callbacks) -> metrics`
            trains or evaluates and writes the results (zero-shot: `{prompt_set: metrics}`);
            `seed` (None: the settings') also draws a few-shot sample.
        recorded: `recorded(lab, settings, seed) -> dict`: metrics.json fields a finished run
            with these settings has (a sweep reuses such a run).
        load_classifier: `load_classifier(lab, dataset, *, shots, seed, prompt_set)` returns a
            `model.heads.ClipClassifier` for prediction.
        has_checkpoint: `has_checkpoint(folder) -> bool`: the run folder holds a finished
            checkpoint (files only: damage is found when it loads).
        export: `export(lab, dataset) -> (Clip, head, HeadInfo, adapted)`: the float32 model
            and the linear head on its normalised image embedding that an exported folder
            holds, and which towers' weights differ from the base model (None: unchanged);
            None: the method cannot be exported.
        print_result: `print_result(result, lab, args)` prints what its command ran (None: the
            CLI's one-line summary of a trained run).
        score_new: `score_new(lab, trained_on, new, *, shots, seed, run) -> (N, C) logits`: a
            finished run on `trained_on` (its metrics.json content: `run`) scoring the test
            images of another class set `new` among `new`'s classes; declared by the "text"
            methods that can name classes they never trained on (None: the protocol says the
            method's new-class scoring is not implemented).
        fit: `fit(FeatureData, *, seed, **options) -> Fitted` for a method fitted on cached
            features (`model.feature_fit`); the benchmark times it. None: not such a method.
        module: the module that registered it (set by `register`).
    """

    name: str
    label: str
    command: str
    folder: str
    description: str
    order: float
    run: Callable[..., Any]
    load_classifier: Callable[..., Any]
    aliases: tuple[str, ...] = ()
    trained: bool = True
    epochs: bool = False
    uses_text_classifier: bool = False
    new_classes: NewClasses = "closed"
    reference: bool = False
    distributed: bool = False
    requires: tuple[str, ...] = ()
    batch_size: int = 128
    add_arguments: Callable[[Any], None] = _none
    add_sweep_arguments: Callable[[Any], None] = _none
    check_arguments: Callable[[Any], None] = _none
    parser_defaults: Callable[[Any], dict | None] = _no_options
    settings: Callable[[Any], Any] = _no_options
    recorded: Callable[..., dict] = lambda lab, settings, seed: {}
    has_checkpoint: Callable[[Path], bool] = lambda folder: (folder / "metrics.json").is_file()
    export: Callable[..., Any] | None = None
    print_result: Callable[..., None] | None = None
    score_new: Callable[..., Any] | None = None
    fit: Callable[..., Any] | None = None
    module: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        """Every name this method answers to."""
        return tuple(dict.fromkeys((self.name, self.command, *self.aliases)))


_REGISTRY: dict[str, Method] = {}
_discovered = False


def register(method: Method) -> Method:
    """Add a method (the last line of its module). Returns it, so a module can keep it.

    Raises:
        ValueError: one of its names is another method's.
    """
    taken = {n: m.name for m in _REGISTRY.values() if m.name != method.name for n in m.names}
    clash = [n for n in method.names if n in taken]
    if clash:
        raise ValueError(f"method {method.name!r}: the name {clash[0]!r} is already {taken[clash[0]]!r}'s")
    # note: the caller's module is the method's own (each method module registers itself)
    method = replace(method, module=method.module or sys._getframe(1).f_globals.get("__name__", ""))
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (tests register toy methods and remove them again)."""
    _REGISTRY.pop(get(name).name)


def _discover() -> None:
    """Import the `methods` package once: each of its modules registers itself."""
    global _discovered
    if not _discovered:
        importlib.import_module(f"{__package__}.methods")
        _discovered = True  # after: a failed import is tried again, and says why, next time


def methods() -> tuple[Method, ...]:
    """Every registered method, in presentation order."""
    _discover()
    return tuple(sorted(_REGISTRY.values(), key=lambda m: (m.order, m.name)))


def trained() -> tuple[Method, ...]:
    """The methods that fit on labelled images (few-shot runs, checkpoints, sweeps)."""
    return tuple(m for m in methods() if m.trained)


def reference() -> Method:
    """The reference method of tables and figures (zero-shot)."""
    return next(m for m in methods() if m.reference)


def get(name: str) -> Method:
    """The method called `name` (canonical name, CLI command or alias).

    Raises:
        InvalidValue: no such method; the message lists the choices.
    """
    for m in methods():
        if name in m.names:
            return m
    raise InvalidValue(f"unknown method {name!r}: choose one of {', '.join(choices())}")


def choices(methods_: Sequence[Method] | None = None) -> tuple[str, ...]:
    """The names a user types for methods (their CLI commands)."""
    return tuple(m.command for m in (methods() if methods_ is None else methods_))
