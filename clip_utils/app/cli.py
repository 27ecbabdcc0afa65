"""Command line: the notebooks' pipeline, headless.

    python -m clip_utils zeroshot --dataset flowers102 --prompts all
    python -m clip_utils zeroshot --dataset cub200 --descriptions cub.json --prompts descriptions,waffle,auto
    python -m clip_utils probe    --dataset cub200 --solver adamw --epochs 20
    python -m clip_utils lora     --dataset flowers102 --rank 8 --alpha 16
    python -m clip_utils lora     --dataset flowers102 --preset clip-lora     # both encoders, CLIP-LoRA
    python -m clip_utils probe    --dataset flowers102 --shots 4 --seed 1      # few-shot: 4 images per class
    python -m clip_utils tip-adapter --dataset cub200 --shots 16 --seed 1       # any registered method
    python -m clip_utils coop     --dataset cub200 --shots 16 --seed 1          # prompt learning
    python -m clip_utils fewshot  --dataset cub200 --methods all --shots 1,2,4,8,16 --seeds 1,2,3
    python -m clip_utils fewshot  --dataset flowers102 --split coop --shots 16   # Zhou et al.'s split
    python -m clip_utils base2new --dataset flowers102 --split coop --methods coop,clip_adapter --shots 16
    python -m clip_utils predict  my_photo/flower.png --dataset flowers102 --method lora
    python -m clip_utils predict  my_photo/*.jpg --dataset cub200 --method all   # side by side
    python -m clip_utils export   --dataset cub200 --method lora --out cub-lora
    python -m clip_utils predict  my_photo/bird.jpg --classifier cub-lora      # no dataset needed
    python -m clip_utils report
    torchrun --standalone --nproc_per_node 4 -m clip_utils lora --dataset flowers102   # 4 GPUs, one job

Every command has `--help`; each registered method is a command (`clip_utils.registry`).
Bad arguments end in a usage error (exit code 2), and the errors users can fix
(`errors.UserError`: missing model or dataset, unreadable photo, mismatched checkpoint, a
results folder that cannot be written) end in one line naming the problem (exit code 1);
anything else keeps its traceback. SIGTERM stops a run like Ctrl-C (exit 143).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shlex
import signal
import sys
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from clip_utils import config, prompts, registry
from clip_utils.app import sweep
from clip_utils.app.base2new import can_score, check_can_score, run_base2new
from clip_utils.app.export import export_classifier, predict_exported
from clip_utils.app.photos import (
    checkpoint_missing,
    compare_photos,
    format_comparison,
    format_predictions,
    predict_photos,
)
from clip_utils.app.report import make_report
from clip_utils.config import SPLIT_SOURCES
from clip_utils.data import DATASETS, dataset_spec
from clip_utils.data.classnames import NAMINGS
from clip_utils.data.imagefolder import PREFIX
from clip_utils.errors import UserError
from clip_utils.lab import Lab, check_device, default_device
from clip_utils.model.training import RESUME_FILE
from clip_utils.registry import Method
from clip_utils.results import fewshot
from clip_utils.runtime import distributed
from clip_utils.runtime.files import check_writable, kept_on_failure, run_lock
from clip_utils.runtime.options import Given, given, ints, name_list, non_negative_int, positive_int, positive_ints

EPILOG = "Results layout and options: README.md and DESIGN.md."
ALL_METHODS = "all"  # `predict --method all`, `fewshot --methods all`: every method


def _device(text: str) -> str:
    try:
        check_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _dataset(text: str) -> str:
    # The name's form only; an image folder's contents are checked when it loads (exit 1).
    if text == PREFIX or (text.startswith(PREFIX) and not text[len(PREFIX):].strip()):
        raise argparse.ArgumentTypeError(f"{PREFIX} needs the folder: {PREFIX}PATH (PATH holding one folder per class)")
    if text in DATASETS or text.startswith(PREFIX):
        return text
    raise argparse.ArgumentTypeError(f"unknown dataset {text!r}: choose one of {', '.join(DATASETS)}, "
                                     f"or {PREFIX}PATH for your own folder of class folders")


def _split_source(text: str) -> str:
    if text in SPLIT_SOURCES:
        return text
    hint = "; to evaluate one split use zeroshot --eval-split val|test" if text in ("train", "val", "test") else ""
    raise argparse.ArgumentTypeError(f"--split is where train/val/test come from: choose {' or '.join(SPLIT_SOURCES)}, "
                                     f"not {text!r}{hint}")


def _common(parser: argparse.ArgumentParser, batch_size: int, dataset_required: bool = True) -> None:
    g = parser.add_argument_group("common options")
    g.add_argument("--dataset", required=dataset_required, type=_dataset, metavar="DATASET",
                   help=f"{', '.join(DATASETS)}, or {PREFIX}PATH (your own class folders; see README)")
    g.add_argument("--domain", default=None, metavar="PHRASE",
                   help="what an image-folder dataset's images show, for the domain prompts "
                        "(e.g. 'a type of mushroom'; default: its classes.json, else none)")
    g.add_argument("--model", default=os.environ.get("CLIP_MODEL", config.DEFAULT_MODEL),
                   help="Hugging Face CLIP id or local folder (default: %(default)s)")
    g.add_argument("--data-root", default=os.environ.get("CLIP_DATA_ROOT", "data"),
                   help="dataset root (default: %(default)s)")
    g.add_argument("--results-dir", default=os.environ.get("CLIP_RESULTS_DIR", "results"),
                   help="results root (default: %(default)s)")
    g.add_argument("--device", type=_device, default=os.environ.get("CLIP_DEVICE") or None,
                   help="cuda, cpu, ... (default: cuda when available)")
    # String defaults go through `type` at parse time, so a bad CLIP_* value is a usage error.
    g.add_argument("--batch-size", type=positive_int, default=os.environ.get("CLIP_BATCH_SIZE", str(batch_size)),
                   help="images per batch (default: $CLIP_BATCH_SIZE or %(default)s)")
    g.add_argument("--seed", type=int, default=0,
                   help="random seed: training order and augmentation, and with --shots the sample drawn "
                        "(default: %(default)s)")
    g.add_argument("--workers", type=non_negative_int, default=None,
                   help="file reader threads (default: cores - 1)")
    g.add_argument("--no-download", dest="download", action="store_false",
                   help="never download: fail when a dataset is missing")
    g.add_argument("--split", type=_split_source, metavar="{" + ",".join(SPLIT_SOURCES) + "}",
                   default=os.environ.get("CLIP_SPLIT") or SPLIT_SOURCES[0],
                   help="where train/val/test come from: official (the dataset's own) or coop (Zhou et al.'s "
                        "split_zhou_*.json, CoOp's and Tip-Adapter's; fetched on first use; results in "
                        "<dataset>-coop/) (default: $CLIP_SPLIT or %(default)s)")
    g.add_argument("--split-file", type=Path, default=None, metavar="PATH",
                   help="a split_zhou_*.json file for --split coop, instead of the published one")
    g.add_argument("--class-names", choices=NAMINGS, default=os.environ.get("CLIP_CLASS_NAMES") or config.CLASS_NAMING,
                   help="class names in prompts and results: curated (CLIP's class lists, CUB's proper bird "
                        "names) or original (the datasets' own) (default: %(default)s)")


DESCRIPTIONS_HELP = ('a CuPL/DCLIP descriptions file, {"class name": ["description", ...]}: adds the descriptions '
                     'prompt set (matched to the curated or original class names, any case)')


def _sweep_arguments(parser: argparse.ArgumentParser, trained: tuple[Method, ...]) -> None:
    """The options a command over several methods and seeds shares (fewshot, base2new)."""
    parser.add_argument("--seeds", type=ints, default=",".join(map(str, config.FEWSHOT_SEEDS)),
                        help="comma list of seeds, one sample each; they replace --seed (default: %(default)s)")
    parser.add_argument("--epochs", type=positive_int, default=os.environ.get("CLIP_EPOCHS") or None,
                        help="epochs of every method that trains over epochs (default: $CLIP_EPOCHS, else each "
                             "method's own)")
    for m in trained:
        m.add_sweep_arguments(parser)
    _common(parser, config.LORA.batch_size)


def _methods_help(methods: tuple[Method, ...]) -> str:
    return ", ".join(m.command for m in methods)


def build_parser(defaults: Mapping[str, Mapping] | None = None) -> argparse.ArgumentParser:
    """The command line, built from the method registry when called: a command per method.

    Args:
        defaults: `{command: {option dest: default}}` replacing a command's defaults (what a
            method's `parser_defaults` returned, e.g. for a preset); explicit options still win.
    """
    # `clip-lab` once installed (the console script), else how the README spells it.
    prog = "clip-lab" if Path(sys.argv[0]).name == "clip-lab" else "python -m clip_utils"
    parser = argparse.ArgumentParser(
        prog=prog, description="Adapt CLIP to fine-grained classification.", epilog=EPILOG
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for m in registry.methods():
        p = sub.add_parser(m.command, help=m.description, description=m.description, epilog=EPILOG)
        if m.uses_text_classifier or m.reference:
            p.add_argument("--descriptions", default=None, metavar="FILE", help=DESCRIPTIONS_HELP)
        m.add_arguments(p)
        _common(p, m.batch_size)
        p.set_defaults(handler=functools.partial(cmd_method, m), **(defaults or {}).get(m.command, {}))

    trained = registry.trained()
    p = sub.add_parser("fewshot", help="few-shot sweep: methods x shots x seeds, table and figures", epilog=EPILOG,
                       description="Fit what is missing of K-shot runs (K images per class from train, "
                                   f"min(K, {config.FEWSHOT_VAL_SHOTS}) per class from val, one sample per seed, the "
                                   "same sample for every method; finished runs are reused), then write "
                                   "results/<dataset>/fewshot.csv, fewshot_summary.csv (mean and std over seeds) and "
                                   "results/figures/<dataset>_fewshot.png and <dataset>_fewshot_cost.png.")
    # String defaults go through `type` at parse time, like the CLIP_* ones.
    p.add_argument("--methods", type=name_list,
                   default=",".join(registry.get(m).command for m in config.FEWSHOT_METHODS),
                   help=f"comma list of {_methods_help(trained)}, or {ALL_METHODS} (default: %(default)s)")
    p.add_argument("--shots", type=positive_ints, default=",".join(map(str, config.FEWSHOT_SHOTS)), action=Given,
                   help="comma list of images per class; a K some class cannot fill is an error (default: "
                        "%(default)s, without the K the dataset's smallest class cannot fill)")
    _sweep_arguments(p, trained)
    p.set_defaults(handler=cmd_fewshot)

    p = sub.add_parser("base2new", help="base-to-new protocol: fit on half the classes, test on both halves",
                       epilog=EPILOG,
                       description="CoCoOp's protocol: base = the first half of the classes (ceil(n/2)), new = the "
                                   "rest. Each method fits K shots per base class per seed (reusing finished runs in "
                                   "results/<dataset>-base/), is tested on base test images among base classes and on "
                                   "new test images among new classes (by its own classifier, or the zero-shot "
                                   "fallback, or n/a), then writes results/<dataset>/base2new.csv (mean, std and "
                                   "harmonic mean), base2new_runs.csv and results/figures/<dataset>_base2new.png.")
    p.add_argument("--methods", type=name_list,
                   default=",".join(registry.get(m).command for m in config.BASE2NEW_METHODS),
                   help=f"comma list of {_methods_help(trained)}, or {ALL_METHODS}; zero-shot is always the "
                        f"reference row (default: %(default)s)")
    p.add_argument("--shots", type=positive_int, default=config.BASE2NEW_SHOTS,
                   help="training images per base class (default: %(default)s)")
    _sweep_arguments(p, trained)
    p.set_defaults(handler=cmd_base2new)

    p = sub.add_parser("predict", help="top-k classes for your own photos", epilog=EPILOG)
    p.add_argument("photos", nargs="+", metavar="PHOTO", help="image files")
    reference = registry.reference()
    # None: the reference (zero-shot), unless --classifier (which brings its own, so --method is refused with it).
    p.add_argument("--method", default=None, choices=(*registry.choices(), ALL_METHODS),
                   help=f"which classifier (those that fit need a finished run), or {ALL_METHODS} of them side by "
                        f"side, skipping those not fitted yet (default: {reference.command})")
    p.add_argument("--classifier", default=None, metavar="DIR",
                   help="a folder written by `export`: predict with it, no --dataset (or --method) needed")
    p.add_argument("--top-k", type=positive_int, default=config.TOP_K, help="classes to show (default: %(default)s)")
    p.add_argument("--prompts", default=config.PHOTO_PROMPT_SET,
                   help=f"prompt set of {reference.label}: default, domain, diverse, domain_ensemble, clip, waffle, "
                        "descriptions (with --descriptions) or auto (default: %(default)s)")
    p.add_argument("--descriptions", default=None, metavar="FILE", help=DESCRIPTIONS_HELP)
    p.add_argument("--json", action="store_true",
                   help='print JSON instead of a table (with --method all: {"photo", "methods": {method: '
                        '{"top_k"} or {"error"}}} per photo)')
    _common(p, config.INFERENCE_BATCH_SIZE, dataset_required=False)
    p.set_defaults(handler=cmd_predict, makes_results=False)

    exporters = tuple(m for m in registry.methods() if m.export is not None)
    p = sub.add_parser("export", help="write a trained classifier to one folder usable with plain transformers",
                       epilog=EPILOG)
    p.add_argument("--method", required=True, choices=registry.choices(exporters),
                   help="the fitted classifier to export (a linear head on the image embedding; LoRA is merged "
                        "into the model's weights)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the folder to write (an earlier export there is replaced; anything else is refused)")
    _common(p, config.INFERENCE_BATCH_SIZE)
    p.set_defaults(handler=cmd_export, makes_results=False)

    p = sub.add_parser("report", help="redraw every figure and summary.csv from saved results", epilog=EPILOG)
    p.add_argument("--results-dir", default=os.environ.get("CLIP_RESULTS_DIR", "results"),
                   help="results root (default: %(default)s)")
    p.set_defaults(handler=cmd_report, makes_results=False)
    return parser


def _lab(args) -> Lab:
    # The probe trains on cached features and encodes them at --encode-batch-size; the other
    # commands' one batch size is also their encoding batch (LoRA encodes nothing frozen).
    encode = getattr(args, "encode_batch_size", args.batch_size)
    return Lab(model=args.model, data_root=args.data_root, results_dir=args.results_dir, device=args.device,
               batch_size=args.batch_size, encode_batch_size=encode, seed=args.seed, download=args.download,
               num_workers=args.workers, class_naming=args.class_names, domain=args.domain,
               descriptions=getattr(args, "descriptions", None), split_source=args.split, split_file=args.split_file)


def _print_run(metrics: dict, lab: Lab, args) -> None:
    """One line for a fitted run: its test accuracy, how it was selected, and where it went."""
    m = registry.get(metrics["method"])
    folder = fewshot.run_dir(lab.results_dir, metrics["dataset_folder"], m.name, metrics.get("shots"), metrics["seed"])
    if metrics.get("C") is not None:
        how = f"C={metrics['C']:.3g} chosen on validation"
    elif metrics.get("best_epoch") is not None and metrics.get("epochs"):
        how = f"best epoch {metrics['best_epoch']}/{metrics['epochs']}"
    else:
        how = ", ".join(f"{k}={v:.3g}" for k, v in (metrics.get("hyperparameters") or {}).items()) or "no training"
    data = f"{metrics['shots']}-shot, seed {metrics['seed']}, " if metrics.get("shots") else ""
    print(f"{metrics['dataset_folder']} {m.name}: test top-1 {metrics['top1']:.2%}, top-5 {metrics['top5']:.2%}, "
          f"mean per class {metrics['mean_per_class']:.2%} ({data}{how}, "
          f"{metrics['trainable_params']:,} trainable parameters) -> {folder}")


def cmd_method(method: Method, args) -> None:
    """A method's own command: read its settings, run it (one run per folder at a time), say what it did."""
    lab = _lab(args)
    shots = getattr(args, "shots", None)
    dataset = lab.resolve(args.dataset)  # a missing image folder is said before its results folder is made
    folder = args.run_folder = fewshot.run_dir(lab.results_dir, dataset, method.name, shots, args.seed)
    # one run per folder at a time; a run that fails gives the folder back as it was (rank 0
    # alone: under torchrun only it writes the folder)
    guard = contextlib.ExitStack()
    if distributed.is_main():
        guard.enter_context(run_lock(folder))
        guard.enter_context(kept_on_failure(folder))
    with guard:
        result = method.run(lab, dataset, method.settings(args), shots=shots, seed=args.seed,
                            resume=getattr(args, "resume", False))
    if distributed.is_main():  # under torchrun: printed once
        (method.print_result or _print_run)(result, lab, args)


def cmd_fewshot(args) -> None:
    lab = _lab(args)
    shots = args.shots if "shots" in given(args) else None  # None: the default grid the dataset can fill
    result = sweep.run_fewshot(lab, lab.resolve(args.dataset), args.methods, shots, args.seeds, args=args)
    print(sweep.summary_table(result.summary).to_string(index=False))
    print(f"{len(result.trained)} runs fitted, {len(result.reused)} reused")
    for path in result.files:
        print(path)


def cmd_base2new(args) -> None:
    lab = _lab(args)
    result = run_base2new(lab, lab.resolve(args.dataset), args.methods, args.shots, args.seeds, args=args)
    def cell(mean: float | None, std: float | None) -> str:
        return "n/a" if mean is None else f"{mean:.1f}" + (f" ± {std:.1f}" if std is not None else "")

    print(f"top-1 %, {args.shots} shots per base class; zero-shot: the {result.prompt_set} prompt set on both halves")
    print(f"{'method':<16}  {'base':>12}  {'new':>12}  {'HM':>6}  new classes scored by")
    for r in result.summary:
        hm = "n/a" if r["hm"] is None else f"{r['hm']:.1f}"
        how = {"own": "its own classifier", "n/a": "none (cannot name them)",
               "zero-shot": "the zero-shot fallback (its run's prompt set)"}[r["new_source"]]
        print(f"{r['label']:<16}  {cell(r['base'], r['base_std']):>12}  {cell(r['new'], r['new_std']):>12}  "
              f"{hm:>6}  {how}")
    for path in result.files:
        print(path)


def cmd_predict(args) -> int:
    if args.classifier:
        results = predict_exported(args.classifier, args.photos, top_k=args.top_k, device=args.device)
        print(json.dumps(results, indent=1) if args.json else format_predictions(results))
        return 1 if any("error" in r for r in results) else 0
    if args.method == ALL_METHODS:
        return _predict_all(args)
    lab = _lab(args)
    results = predict_photos(lab, args.photos, lab.resolve(args.dataset), method=args.method, top_k=args.top_k,
                             prompt_set=args.prompts)
    print(json.dumps(results, indent=1) if args.json else format_predictions(results))
    return 1 if any("error" in r for r in results) else 0


def _predict_all(args) -> int:
    lab = _lab(args)
    dataset = lab.resolve(args.dataset)
    results = compare_photos(lab, args.photos, dataset, top_k=args.top_k, prompt_set=args.prompts)
    print(json.dumps(results, indent=1) if args.json else format_comparison(results))
    read = next((r["methods"] for r in results if "methods" in r), None)
    if read is None:  # no photo could be read: no model was loaded, each photo's error is above
        return 1
    # A method's error is the same for every photo: say it once, after the tables.
    errors = {name: entry["error"] for name, entry in read.items() if "error" in entry}
    if len(errors) == len(read):
        print(f"error: no method can predict for {dataset.folder}: {'; '.join(errors.values())}", file=sys.stderr)
        return 1
    # Not trained yet is a skip; a checkpoint that is there but cannot be used is a failure.
    untrained = {name: why for name, why in errors.items() if checkpoint_missing(lab, dataset, name)}
    if untrained:
        labels = ", ".join(registry.get(name).label for name in untrained)
        print(f"warning: skipped, not trained for {dataset.folder}: {labels} (train one with python -m clip_utils "
              f"METHOD {shlex.join(dataset.command_args)} and the same --model, --data-root and --results-dir as here)",
              file=sys.stderr)
    for name in errors.keys() - untrained.keys():
        print(f"error: {registry.get(name).label}: {errors[name]}", file=sys.stderr)
    return 1 if len(untrained) < len(errors) or any("error" in r for r in results) else 0


def cmd_export(args) -> None:
    lab = _lab(args)
    dataset = lab.resolve(args.dataset)
    folder = export_classifier(lab, dataset, args.method, args.out)
    print(f"{dataset.folder} {registry.get(args.method).label} classifier -> {folder} "
          f"(the model's own from_pretrained, head.safetensors, classes.json; usage in {folder / 'README.md'})")


def cmd_report(args) -> None:
    for path in make_report(args.results_dir):
        print(path)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # Our own warnings are advice for the user: one line, like the errors. Libraries' keep
    # their usual form (file and line help whoever reports them upstream).
    if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parents[1]):
        print(f"warning: {message}", file=file or sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), end="", file=file or sys.stderr)


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The subcommand's parser, so a usage error shows that command's usage line."""
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices[command]


def _method_of(args) -> Method | None:
    """The method whose own command this is (None: fewshot, predict, export, report)."""
    handler = getattr(args, "handler", None)
    return handler.args[0] if isinstance(handler, functools.partial) else None


def _check_arguments(parser: argparse.ArgumentParser, args) -> None:
    """Usage errors that need more than one argument to see, found before anything loads."""
    parser = _command_parser(parser, args.command)
    method = _method_of(args)
    reference = registry.reference()
    if args.command == "predict":
        if args.classifier and (args.dataset or args.method or args.descriptions):
            parser.error("--classifier brings its own model and classes: leave out --dataset, --method and "
                         "--descriptions")
        if not args.classifier and not args.dataset:
            parser.error("the following arguments are required: --dataset (or --classifier DIR)")
        args.method = args.method or reference.command
    if getattr(args, "domain", None) and not (args.dataset or "").startswith(PREFIX):
        parser.error(f"--domain is for {PREFIX}PATH datasets; registered ones such as {args.dataset} declare "
                     f"their prompts")
    if distributed.launched():
        if method is None or not method.distributed:
            runs = ", ".join(m.command for m in registry.methods() if m.distributed)
            parser.error(f"{args.command} runs in one process: start it without torchrun (torchrun runs {runs})")
        device = torch.device(args.device) if args.device else None
        if device is not None and device.type == "cuda" and device.index is not None:
            parser.error(f"--device {args.device}: under torchrun each process takes cuda:LOCAL_RANK; pass --device cuda")
    try:
        if args.command in ("fewshot", "base2new"):
            if args.methods == [ALL_METHODS]:
                args.methods = [m.name for m in registry.trained() if args.command == "fewshot" or can_score(m)]
            chosen = sweep.check_methods(args.methods)
            for m in chosen:
                m.check_arguments(args)
            if args.command == "base2new":
                check_can_score(chosen)
        if method is not None:
            method.check_arguments(args)
        # An image folder's sets depend on its classes.json: they are checked when it loads.
        uses_prompts = method is not None and (method.uses_text_classifier or method.reference)
        if args.command == "predict" and not args.classifier and args.method in (*reference.names, ALL_METHODS):
            uses_prompts = True
        if uses_prompts and args.dataset in DATASETS and isinstance(getattr(args, "prompts", None), (str, list)):
            prompts.resolve(args.prompts, dataset_spec(args.dataset), descriptions=bool(args.descriptions))
    except UserError as err:
        parser.error(str(err))


def _kept_after_interrupt(args) -> str:
    """What an interrupted command leaves behind, and how to go on."""
    if args.command in ("fewshot", "base2new"):
        return "completed results files are kept (rerun to reuse the finished runs)"
    method = _method_of(args)
    if method is None or not method.trained:
        return "completed results files are kept"
    if not method.epochs:
        return "nothing of this run was kept: rerun the same command"
    folder = getattr(args, "run_folder", None)
    if folder is not None and (folder / RESUME_FILE).is_file():
        return "the last completed epoch's checkpoint and curves are kept (rerun with --resume)"
    return "no epoch had finished, so there is nothing to resume: rerun the same command to start again"


def _parse(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    method = _method_of(args)
    extra = method.parser_defaults(args) if method is not None else None
    if extra:  # e.g. a preset: parsed again with its defaults, so explicit options still win
        parser = build_parser({method.command: extra})
        args = parser.parse_args(argv)
    return parser, args


class Terminated(BaseException):
    """SIGTERM arrived (what a batch scheduler sends before it kills a job); like KeyboardInterrupt,
    not an `Exception`, so no handler for failures takes it for one (nor restores an earlier run)."""


def _terminate(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    parser, args = _parse(argv)
    _check_arguments(parser, args)
    # SIGTERM stops the run like Ctrl-C: at the next Python instruction, every file written
    # so far complete (writes are atomic), and says what can be resumed.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        with warnings.catch_warnings():  # restores the previous display when main returns
            warnings.showwarning = _show_warning
            # before any slow work: a folder we cannot write to (predict and export only read
            # results, and report says when there are none: none of them makes the folder)
            if getattr(args, "makes_results", True):
                check_writable(args.results_dir)
            if distributed.launched():  # torchrun: join the other processes, on this rank's device
                args.device = distributed.setup(args.device or default_device())
            code = args.handler(args) or 0
            distributed.teardown(wait=True)  # every rank got here: leave the group together
            return code
    except distributed.RankZeroFailed:
        return 1  # rank 0 has said what failed
    except KeyboardInterrupt:
        if distributed.is_main():  # under torchrun every process gets the Ctrl-C: say it once
            print(f"interrupted: {_kept_after_interrupt(args)}", file=sys.stderr)
        return 130
    except Terminated:
        if distributed.is_main():
            print(f"terminated (SIGTERM): {_kept_after_interrupt(args)}", file=sys.stderr)
        return 143
    except torch.OutOfMemoryError as err:
        # Training turns its own OOM into a TrainingError; what lands here is encoding or prediction.
        option, size = (("--encode-batch-size", args.encode_batch_size) if hasattr(args, "encode_batch_size")
                        else ("--batch-size", getattr(args, "batch_size", 2)))
        print(f"error: CUDA out of memory at {option} {size} "
              f"({str(err).splitlines()[0]}); try {option} {max(1, size // 2)}", file=sys.stderr)
        return 1
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        distributed.teardown()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
