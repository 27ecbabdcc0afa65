"""The three methods, named once: what results, checkpoints, reports, photos and the CLI call them.

    from clip_utils.registry import method
    method("probe").folder        # "linear_probe" (the CLI's alias resolves)
    method("lora").label          # "LoRA", in figures and tables

Each method's code lives in its own module (`zeroshot`, `probe`, `lora`, peers with the same
shape: a `run_*` function that trains or evaluates and writes results, and a classifier
for prediction). This table holds everything else the rest of the package needs to know
about a method, so adding one is one module and one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One method's names.

    Attributes:
        name: canonical name, recorded as `method` in metrics.json and checkpoints.
        folder: its results folder under `results/<dataset>/`.
        label: how figures and tables name it.
        command: the CLI command that produces its results.
        trained: whether it trains (and so has curves and a checkpoint).
        aliases: other names accepted on input (`--method probe`).
    """

    name: str
    folder: str
    label: str
    command: str
    trained: bool
    aliases: tuple[str, ...] = ()


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("zeroshot", folder="zeroshot", label="zero-shot", command="zeroshot", trained=False),
        Method("linear_probe", folder="linear_probe", label="linear probe", command="probe", trained=True,
               aliases=("probe",)),
        Method("lora", folder="lora", label="LoRA", command="lora", trained=True),
    )
}
# The names a user may type (`predict --method ...`): one per method, the CLI's command name.
CHOICES: tuple[str, ...] = tuple(m.command for m in METHODS.values())
TRAINED: tuple[str, ...] = tuple(name for name, m in METHODS.items() if m.trained)


def method(name: str) -> Method:
    """The method called `name` (canonical name or alias).

    Args:
        name: e.g. `zeroshot`, `linear_probe`, `probe` or `lora`.

    Raises:
        ValueError: no such method; the message lists the choices.
    """
    for m in METHODS.values():
        if name == m.name or name in m.aliases:
            return m
    raise ValueError(f"unknown method {name!r}: choose one of {', '.join(CHOICES)}")
