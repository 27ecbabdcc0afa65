"""The package's shape: imports point one way, an immutable Lab, one place for defaults, installable."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

import clip_utils
from clip_utils import config
from clip_utils.app import sweep
from clip_utils.app.cli import build_parser
from clip_utils.lab import Lab
from clip_utils.methods import lora, probe
from clip_utils.runtime import progress

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(clip_utils.__file__).resolve().parent


# The layers, lowest first. A module may import from its own layer and the ones below it,
# never from above (function-local imports included): `report` cannot reach `lora` through
# `sweep`, and the training loop knows nothing of datasets, labs or methods.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("config", "errors", "registry", "metrics"),  # building blocks: they import only `errors`
    ("runtime",),   # process concerns: env parameters, progress, torchrun, network, atomic files
    ("prompts",),   # templates and prompt sets, the text classifier
    ("data",),      # datasets, splits, class names, images
    ("model",),     # loading, preprocessing, encoding, feature cache, heads, the training loop
    ("figures",),   # drawing
    ("results",),   # the results folder, checkpoints, evaluation files, few-shot runs
    ("lab",),       # the run context
    ("methods",),   # one module per method, registered
    ("testkit",),   # the offline kit (tiny models, synthetic datasets)
    ("app", "__main__"),  # CLI, notebooks runner, photos, explorer, export, sweep, report, bench
)


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer of LAYERS")


def module_name(file: Path, package: Path) -> str:
    parts = file.relative_to(package).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([PACKAGE.name, *base, *([node.module] if node.module else [])])


def import_graph(package: Path) -> dict[str, set[str]]:
    """`{module: package modules it imports}` (dotted, relative to the package), every import
    statement counted, function bodies included."""
    modules = {module_name(f, package) for f in package.rglob("*.py")} - {""}
    graph: dict[str, set[str]] = {}
    for file in sorted(package.rglob("*.py")):
        name = module_name(file, package)
        if not name:
            continue
        deps: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = _resolve(node, name, file.name == "__init__.py")
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                if target.startswith(f"{package.name}."):
                    dotted = target[len(package.name) + 1:]
                    # the longest prefix that is a module: `data.images.open_rgb` -> `data.images`
                    while dotted and dotted not in modules:
                        dotted = dotted.rpartition(".")[0]
                    if dotted and dotted != name:
                        deps.add(dotted)
        graph[name] = deps
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """`a -> b` for every import of a module from a higher layer."""
    return [f"{a} -> {b}" for a, deps in sorted(graph.items()) for b in sorted(deps) if layer_of(b) > layer_of(a)]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as `[a, b, ..., a]`, or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_layer_check_finds_a_planted_upward_import(tmp_path):
    package = tmp_path / PACKAGE.name
    (package / "model").mkdir(parents=True)
    (package / "app").mkdir()
    for init in (package / "__init__.py", package / "model" / "__init__.py", package / "app" / "__init__.py"):
        init.write_text("")
    (package / "app" / "report.py").write_text(f"from {PACKAGE.name}.model import training\n")
    # planted: the training loop reaching up into the app, inside a function
    (package / "model" / "training.py").write_text(f"def fit():\n    from {PACKAGE.name}.app.report import x\n")
    assert upward_imports(import_graph(package)) == ["model.training -> app.report"]


def test_imports_point_down_the_layers_even_inside_functions():
    graph = import_graph(PACKAGE)
    assert {"lab", "model.training", "methods.probe", "methods.lora", "app.cli", "results.checkpoints"} <= set(graph)
    assert upward_imports(graph) == []
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_foundation_imports_nothing_of_the_package_but_its_errors():
    graph = import_graph(PACKAGE)
    for name in LAYERS[0]:
        assert graph[name] <= {"errors"}, f"{name} imports {graph[name]}"


def test_the_package_tree_is_the_layers():
    tops = {module_name(f, PACKAGE).split(".")[0] for f in PACKAGE.rglob("*.py")} - {""}
    assert tops == {name for layer in LAYERS for name in layer}


def test_a_lab_is_immutable(kit, tmp_path):
    lab = Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=tmp_path, device="cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        lab.model = "openai/clip-vit-base-patch32"
    assert lab.replace(batch_size=7).batch_size == 7 and lab.batch_size != 7


def test_labs_with_different_models_never_share_features_or_text_classifiers(kit, tmp_path):
    from clip_utils.testkit import make_tiny_clip

    other_model = make_tiny_clip(tmp_path / "other-model", seed=1)
    a = Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=tmp_path / "r", device="cpu", num_workers=0,
            download=False)
    b = a.replace(model=str(other_model))  # same results folder and feature cache folder
    fa, fb = a.features("cub200", "val"), b.features("cub200", "val")
    assert not fb.encoding["from_cache"]  # b encoded with its own model instead of reading a's cache
    assert not fa.embeddings.allclose(fb.embeddings)
    assert len(list(a.cache_dir.glob("cub200-val-*.safetensors"))) == 2
    assert not a.text_classifier("cub200", "domain").allclose(b.text_classifier("cub200", "domain"))
    assert a.clip() is not b.clip() and a.clip() is a.clip()


def _parameters(notebook: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIP_")}
    cell = next(c for c in nbformat.read(ROOT / notebook, as_version=4).cells
                if "parameters" in c.metadata.get("tags", []))
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        scope: dict = {}
        exec(cell.source, scope)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return scope


def _cli_defaults(command: str, *extra: str) -> dict:
    env = {k: os.environ.pop(k) for k in ("CLIP_EPOCHS", "CLIP_BATCH_SIZE") if k in os.environ}
    try:
        return vars(build_parser().parse_args([command, *extra, "--dataset", "flowers102"]))
    finally:
        os.environ.update(env)


def test_the_cli_notebooks_and_api_train_and_predict_with_the_same_defaults():
    cli_probe, cli_lora = _cli_defaults("probe"), _cli_defaults("lora")
    cli_predict = _cli_defaults("predict", "photo.jpg")
    task1, task2 = _parameters("Task1.ipynb"), _parameters("Task2.ipynb")
    for cfg, cli, epochs, lr in ((config.PROBE, cli_probe, "PROBE_EPOCHS", "PROBE_LR"),
                                 (config.LORA, cli_lora, "LORA_EPOCHS", "LORA_LR")):
        assert (cli["epochs"], cli["lr"], cli["weight_decay"], cli["augment"], cli["batch_size"]) == (
            cfg.epochs, cfg.lr, cfg.weight_decay, cfg.augment, cfg.batch_size)
        assert (task2[epochs], task2[lr], task2["BATCH_SIZE"]) == (cfg.epochs, cfg.lr, cfg.batch_size)
    settings = config.LORA_SETTINGS
    assert (cli_lora["rank"], cli_lora["alpha"], cli_lora["dropout"], tuple(cli_lora["targets"]),
            cli_lora["encoders"]) == (settings.rank, settings.alpha, settings.dropout, settings.targets,
                                      settings.encoders)
    assert (task2["LORA_RANK"], task2["LORA_ALPHA"], task2["LORA_DROPOUT"], task2["LORA_TARGETS"]) == (
        settings.rank, settings.alpha, settings.dropout, settings.targets)
    assert cli_predict["prompts"] == task1["PHOTO_PROMPT_SET"] == task2["PHOTO_PROMPT_SET"] == config.PHOTO_PROMPT_SET
    assert cli_predict["top_k"] == task1["TOP_K"] == task2["TOP_K"] == config.TOP_K
    assert inspect.signature(probe.run_probe).parameters["cfg"].default is config.PROBE
    assert inspect.signature(lora.run_lora).parameters["cfg"].default is config.LORA
    assert inspect.signature(lora.run_lora).parameters["lora"].default is config.LORA_SETTINGS
    # the probe's solver, LoRA's head rate and the few-shot protocol's grid
    assert cli_probe["solver"] == task2["PROBE_SOLVER"] == config.PROBE_SOLVER
    assert inspect.signature(probe.run_probe).parameters["solver"].default == config.PROBE_SOLVER
    assert cli_lora["head_lr"] == task2["LORA_HEAD_LR"] == config.LORA.head_lr
    cli_fewshot = _cli_defaults("fewshot")
    assert (tuple(cli_fewshot["shots"]), tuple(cli_fewshot["seeds"]), cli_fewshot["solver"]) == (
        config.FEWSHOT_SHOTS, config.FEWSHOT_SEEDS, config.PROBE_SOLVER)
    defaults = inspect.signature(sweep.run_fewshot).parameters
    # None: config.FEWSHOT_SHOTS less the K a class cannot fill, as the CLI's default (test_fewshot runs both)
    assert (defaults["shots"].default, defaults["seeds"].default) == (None, config.FEWSHOT_SEEDS)
    assert (task2["FEWSHOT_SHOTS"], task2["FEWSHOT_SEEDS"]) == (config.NOTEBOOK_FEWSHOT_SHOTS,
                                                                config.NOTEBOOK_FEWSHOT_SEEDS)


def test_the_packaged_class_names_are_the_seed_layouts_file():
    assert json.loads((PACKAGE / "assets" / "cat_to_name.json").read_text()) == json.loads(
        (ROOT / "cat_to_name.json").read_text())


def test_the_installed_package_works_from_any_folder(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(PACKAGE, source / "clip_utils", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(target), str(source)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    helped = subprocess.run([str(target / "bin" / "clip-lab"), "--help"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: clip-lab") and "zeroshot" in helped.stdout
    code = ("import clip_utils; from clip_utils.data import class_names; "
            "print(clip_utils.__file__); print(class_names('flowers102')[0])")
    run = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    where, first = run.stdout.splitlines()
    assert Path(where).is_relative_to(target) and first == "pink primrose"


def test_tqdm_disable_hides_every_bar(monkeypatch, capsys):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert list(progress.bar(range(3), desc="x")) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_a_bar_in_a_log_prints_a_few_lines_not_carriage_returns(monkeypatch, capsys):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    for _ in progress.bar(range(5000), desc="long pass", unit="img"):
        pass
    err = capsys.readouterr().err  # captured: not a terminal, as in CI or under nohup
    assert "\r" not in err
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 3 and "5000/5000" in lines[-1]


def _method_name_uses(package: Path) -> list[str]:
    """`file: what` for every import of a method's module and every string literal equal to a
    method's name or command, outside that method's own module, the registry, config and the
    test kit."""
    from clip_utils import registry

    allowed = {"registry", "config"}
    graph = import_graph(package)
    found = []
    for file in sorted(package.rglob("*.py")):
        name = module_name(file, package)
        if name in allowed or name.split(".")[0] == "testkit":
            continue
        tree = ast.parse(file.read_text())
        imported = set(graph.get(name, ()))
        for m in registry.methods():
            own = m.module == f"{package.name}.{name}"
            if own:
                continue
            if m.module.removeprefix(f"{package.name}.") in imported:
                found.append(f"{name}: imports {m.module}")
            literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
            for word in sorted({m.name, m.command} & literals):
                found.append(f"{name}: the string {word!r} ({m.label})")
    return found


def test_no_module_names_a_method_but_its_own():
    assert _method_name_uses(PACKAGE) == []


def test_the_method_name_check_finds_a_planted_name(tmp_path):
    package = tmp_path / PACKAGE.name
    (package / "app").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "app" / "__init__.py").write_text("")
    (package / "app" / "report.py").write_text('def rows(m):\n    return m == "lora"\n')
    assert _method_name_uses(package) == ["app.report: the string 'lora' (LoRA)"]
