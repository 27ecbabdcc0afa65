"""Execute the project notebooks headless: `make run`, `make demo` and the tests use this.

    python -m clip_utils.app.notebooks Task1.ipynb Task2.ipynb --out results/notebooks
    python -m clip_utils.app.notebooks --demo          # tiny model + synthetic data, offline

Each notebook reads its parameters from `CLIP_*` environment variables (see DESIGN.md), so
the very same notebooks run on ViT-L/14 and real data or on the offline test kit. The
executed copy is saved even when a cell fails, so the output up to the failure is never
lost, and the failure is reported as one readable line instead of a kernel traceback.
A notebook runs here as it runs in JupyterLab: the same progress bars (a widget while a pass
runs, its final line as text after) and no widget state saved in the file, which JupyterLab
does not save either; what the executed copy shows is what a person's saved notebook shows
(the photo explorer leaves a static image of its view beside its controls). A demo run sets
`CLIP_DEMO=1`, so every figure it draws carries a demo mark, and ends by saying where its
notebooks are and how to point the CLI at the demo kit.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from clip_utils.runtime.files import atomic_path
from clip_utils.runtime.progress import quiet_loading
from clip_utils.testkit import make_kit

# The repository checkout this runner belongs to: where the notebooks, data/ and results/ live.
PROJECT_ROOT = Path(__file__).resolve().parents[2]

NOTEBOOKS = ("Task1.ipynb", "Task2.ipynb")
DEMO_NOTICE = "DEMO: tiny random-weight CLIP on synthetic images; the numbers mean nothing."


class NotebookFailed(RuntimeError):
    """A cell raised; the message carries the notebook, the error and the saved copy."""


def execute_notebook(
    path: str | Path,
    out_path: str | Path,
    env: Mapping[str, str] | None = None,
    timeout: int | None = None,
    banner: str | None = None,
) -> None:
    """Run a notebook top to bottom in a fresh kernel and save the executed copy.

    Args:
        path: the notebook to run (it runs with its own folder as working directory).
        out_path: where the executed notebook is written, also on failure.
        env: environment variables added to this process's for the kernel.
        timeout: per-cell timeout in seconds (None: no limit).
        banner: markdown put above the first cell of the executed copy (e.g. a demo warning).

    Raises:
        NotebookFailed: a cell raised; the executed copy up to that cell is saved.
    """
    import nbformat
    from jupyter_client import KernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path, out_path = Path(path), Path(out_path)
    nb = nbformat.read(path, as_version=4)
    if banner:
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(banner))
    with tempfile.TemporaryDirectory(prefix="clip-kernel-") as sockets:
        # Unix sockets in a private folder: local-only, and no warning about unencrypted TCP.
        ipc = {"transport": "ipc", "ip": str(Path(sockets) / "kernel")} if os.name == "posix" else {}
        km = KernelManager(kernel_name="python3", **ipc)
        # No widget state in the file, as JupyterLab saves it: a widget output then reads as it
        # will for a person (the tests check that only the explorer's controls are widgets).
        client = NotebookClient(nb, km=km, timeout=timeout, store_widget_state=False,
                                resources={"metadata": {"path": str(path.parent)}})
        try:
            client.execute(env={**os.environ, **(env or {})})
        except CellExecutionError as err:
            raise NotebookFailed(
                f"{path.name} stopped with {err.ename}: {err.evalue}\n"
                f"(the executed notebook up to that cell is saved as {out_path})"
            ) from err
        finally:
            if km.has_kernel:  # nbclient leaves a kernel it was handed running
                km.shutdown_kernel(now=True)
            with atomic_path(out_path) as tmp:
                nbformat.write(nb, tmp)


def demo_env(folder: str | Path) -> dict[str, str]:
    """Environment for a demo run on the test kit in `folder` (built when missing).

    Args:
        folder: where the kit (`kit/`) and the demo results (`results/`) go.
    """
    folder = Path(folder).resolve()
    kit = folder / "kit"
    if not (kit / "KIT.json").is_file():
        print(f"building the offline demo kit (tiny CLIP + synthetic datasets) in {kit} ...")
        with quiet_loading():  # no `Writing model shards` bar for a model of a few kilobytes
            make_kit(kit)
    return {
        "CLIP_MODEL": str(kit / "model"),
        "CLIP_DATA_ROOT": str(kit / "data"),
        "CLIP_RESULTS_DIR": str(folder / "results"),
        "CLIP_EPOCHS": os.environ.get("CLIP_EPOCHS", "3"),
        "CLIP_BATCH_SIZE": os.environ.get("CLIP_BATCH_SIZE", "64"),
        # The kit's CLIP has random weights, so LoRA starts from a meaningless zero-shot head
        # and needs a far higher learning rate than ViT-L/14 to show learning in 3 epochs.
        "CLIP_LORA_LR": os.environ.get("CLIP_LORA_LR", "2e-2"),
        "HF_HUB_OFFLINE": "1",
        "CLIP_DEMO": "1",  # figures.predictions.new_figure marks every figure as a demo
    }


def demo_epilogue(env: Mapping[str, str], notebooks_dir: str | Path) -> str:
    """What `--demo` prints last: where the executed notebooks are, and the commands that use
    the demo kit from the CLI and from Python.

    Args:
        env: the demo environment (`demo_env`, paths absolute).
        notebooks_dir: where the executed notebooks were written.
    """
    model, data, results = env["CLIP_MODEL"], env["CLIP_DATA_ROOT"], env["CLIP_RESULTS_DIR"]
    paths = " ".join(f"{option} {shlex.quote(_shown(path))}" for option, path in (
        ("--model", model), ("--data-root", data), ("--results-dir", results)))
    python = shlex.quote(_shown(sys.executable))  # the venv's python that ran the demo
    return "\n".join([
        f"executed demo notebooks: {_shown(notebooks_dir)}/ (open them in Jupyter)",
        f"demo results and figures: {_shown(results)}/",
        "the CLI on the demo kit (the same options work for probe, lora, fewshot, predict and export;",
        "CLIP_DEMO=1 marks its figures as a demo):",
        f"  CLIP_DEMO=1 {python} -m clip_utils zeroshot --dataset flowers102 {paths}",
        "the Python API on the demo kit:",
        f"  from clip_utils.lab import Lab; lab = Lab(model={_shown(model)!r}, data_root={_shown(data)!r}, "
        f"results_dir={_shown(results)!r})",
    ])


def _shown(path: str | Path) -> str:
    """`path` relative to the current folder when it lies below it (shorter to copy), else absolute."""
    path = Path(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _absolute_paths(env: dict[str, str]) -> dict[str, str]:
    """`env` with the data, results and local model paths made absolute.

    Kernels run in their notebook's folder, this runner in the caller's: a relative path
    given from another folder would otherwise put the results there and the executed
    notebooks here. Given paths are taken from the caller's folder; unset ones are the
    project's own `data/` and `results/`, wherever the command is run from.
    """
    def value(name: str) -> str:
        return env.get(name) or os.environ.get(name, "").strip()

    fixed = {name: str(Path(value(name)).resolve() if value(name) else PROJECT_ROOT / default)
             for name, default in (("CLIP_RESULTS_DIR", "results"), ("CLIP_DATA_ROOT", "data"))}
    model = value("CLIP_MODEL")
    if model and Path(model).exists():  # a local folder, not a hub id
        fixed["CLIP_MODEL"] = str(Path(model).resolve())
    return {**env, **fixed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clip_utils.app.notebooks", description="Execute the project notebooks headless."
    )
    parser.add_argument("notebooks", nargs="*", help=f"notebooks to run (default: {' '.join(NOTEBOOKS)})")
    parser.add_argument("--out", help="folder for the executed notebooks (default: <results>/notebooks)")
    parser.add_argument(
        "--demo", metavar="FOLDER", nargs="?", const="results/demo",
        help="run offline on the tiny model and synthetic data (default folder: results/demo)",
    )
    args = parser.parse_args(argv)
    env = _absolute_paths(demo_env(args.demo) if args.demo else {})
    results = Path(env["CLIP_RESULTS_DIR"])
    out = Path(args.out) if args.out else results / "notebooks"
    notebooks = [Path(n) for n in args.notebooks] or [PROJECT_ROOT / n for n in NOTEBOOKS]
    banner = None
    if args.demo:
        print(DEMO_NOTICE)
        banner = f"> **{DEMO_NOTICE}** Run `make run` for the real model and datasets."
    for nb in notebooks:
        if not nb.is_file():
            parser.error(f"notebook not found: {nb}")
        start = time.perf_counter()
        print(f"running {nb.name} ...", flush=True)
        try:
            execute_notebook(nb, out / nb.name, env, banner=banner)
        except NotebookFailed as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"  done in {time.perf_counter() - start:.0f} s -> {out / nb.name}")
    print(f"results: {results}")
    if args.demo:
        print(demo_epilogue(env, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
