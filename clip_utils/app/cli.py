"""Command line: the notebooks' pipeline, headless.

    python -m clip_utils zeroshot --dataset flowers102 --prompts all
    python -m clip_utils zeroshot --dataset cub200 --descriptions cub.json --prompts descriptions,waffle,auto
    python -m clip_utils probe    --dataset cub200 --epochs 20
    python -m clip_utils lora     --dataset flowers102 --rank 8 --alpha 16
    python -m clip_utils lora     --dataset flowers102 --preset clip-lora     # both encoders, CLIP-LoRA
    python -m clip_utils probe    --dataset flowers102 --shots 4 --seed 1      # few-shot: 4 images per class
    python -m clip_utils fewshot  --dataset flowers102 --methods probe,lora --shots 1,2,4,8,16 --seeds 1,2,3
    python -m clip_utils predict  my_photo/flower.png --dataset flowers102 --method lora
    python -m clip_utils predict  my_photo/*.jpg --dataset cub200 --method all   # side by side
    python -m clip_utils export   --dataset cub200 --method lora --out cub-lora
    python -m clip_utils predict  my_photo/bird.jpg --classifier cub-lora      # no dataset needed
    python -m clip_utils report
    torchrun --standalone --nproc_per_node 4 -m clip_utils lora --dataset flowers102   # 4 GPUs, one job

Every command has `--help`. Bad arguments end in a usage error (exit code 2), and the
errors users can fix (missing model or dataset, unreadable photo, mismatched checkpoint)
end in one line naming the problem (exit code 1), not a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from clip_utils import config

from clip_utils.runtime import distributed

from clip_utils.results import fewshot

from clip_utils import prompts

from clip_utils.app import sweep
from clip_utils.results.checkpoints import CheckpointError
from clip_utils.data.classnames import NAMINGS
from clip_utils.config import LoraSettings, TrainConfig
from clip_utils.data import DATASETS, DatasetNotFoundError, UnreadableImageError, dataset_spec
from clip_utils.app.export import EXPORTABLE, export_classifier, predict_exported
from clip_utils.data.imagefolder import PREFIX
from clip_utils.lab import Lab, check_device, default_device
from clip_utils.methods.lora import clip_lora_preset, run_lora
from clip_utils.registry import CHOICES, METHODS
from clip_utils.registry import method as method_named
from clip_utils.model.clip import ModelUnavailableError
from clip_utils.app.photos import checkpoint_missing, compare_photos, format_comparison, format_predictions, predict_photos
from clip_utils.methods.probe import run_probe
from clip_utils.app.report import make_report
from clip_utils.model.training import RESUME_FILE, TrainingError
from clip_utils.methods.zeroshot import output_dir, run_zeroshot

EPILOG = "Results layout and options: README.md and DESIGN.md."
DISTRIBUTED_COMMANDS = ("zeroshot", "probe", "lora")  # what runs under torchrun (README: several GPUs)
ALL_METHODS = "all"  # `predict --method all`: every method side by side


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _checked(parse, ok, expected: str):
    """An argparse `type` that parses with `parse` and insists on `ok(value)`."""

    def convert(text: str):
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return convert


_positive_int = _checked(_whole, lambda v: v >= 1, "a positive number")
_positive_float = _checked(_number, lambda v: v > 0, "a positive number")
_non_negative_int = _checked(_whole, lambda v: v >= 0, "zero or more")
_non_negative_float = _checked(_number, lambda v: v >= 0, "zero or more")
_fraction = _checked(_number, lambda v: 0 <= v < 1, "a number in [0, 1)")


def _positive_ints(text: str) -> list[int]:
    return [_positive_int(item) for item in _name_list(text)]


def _ints(text: str) -> list[int]:
    return [_whole(item) for item in _name_list(text)]


def _name_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


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


class _Given(argparse.Action):
    """Stores the option's value and notes in `args.given` that the command line set it, for an
    option that only some settings use (a default cannot tell "not given" from "given as the default")."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", frozenset()) | {self.dest}


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
    g.add_argument("--batch-size", type=_positive_int, default=os.environ.get("CLIP_BATCH_SIZE", str(batch_size)),
                   help="images per batch (default: $CLIP_BATCH_SIZE or %(default)s)")
    g.add_argument("--seed", type=int, default=0,
                   help="random seed: training order and augmentation, and with --shots the sample drawn "
                        "(default: %(default)s)")
    g.add_argument("--workers", type=_non_negative_int, default=None,
                   help="file reader threads (default: cores - 1)")
    g.add_argument("--no-download", dest="download", action="store_false",
                   help="never download: fail when a dataset is missing")
    g.add_argument("--class-names", choices=NAMINGS, default=os.environ.get("CLIP_CLASS_NAMES") or config.CLASS_NAMING,
                   help="class names in prompts and results: curated (CLIP's class lists, CUB's proper bird "
                        "names) or original (the datasets' own) (default: %(default)s)")


def _training(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=_positive_int, default=os.environ.get("CLIP_EPOCHS", str(defaults.epochs)),
                   help="epochs (default: $CLIP_EPOCHS or %(default)s)")
    g.add_argument("--lr", type=_positive_float, default=defaults.lr,
                   help="peak learning rate (default: %(default)s)")
    g.add_argument("--weight-decay", type=_non_negative_float, default=defaults.weight_decay,
                   help="AdamW weight decay (default: %(default)s)")
    g.add_argument("--resume", action="store_true", help="continue from the last completed epoch")
    g.add_argument("--shots", type=_positive_int, default=None, metavar="K",
                   help=f"few-shot: train on K images per class drawn with --seed, validate on min(K, "
                        f"{config.FEWSHOT_VAL_SHOTS}) per class; results in <method>/shots_K/seed_S/ "
                        f"(default: every image)")


DESCRIPTIONS_HELP = ('a CuPL/DCLIP descriptions file, {"class name": ["description", ...]}: adds the descriptions '
                     'prompt set (matched to the curated or original class names, any case)')


def build_parser(preset: str | None = None) -> argparse.ArgumentParser:
    """The command line; `preset` (`lora --preset NAME`) makes that preset's values the lora defaults.

    Args:
        preset: a key of `config.LORA_PRESETS`, or None.
    """
    # `clip-lab` once installed (the console script), else how the README spells it.
    prog = "clip-lab" if Path(sys.argv[0]).name == "clip-lab" else "python -m clip_utils"
    parser = argparse.ArgumentParser(
        prog=prog, description="Adapt CLIP to fine-grained classification.", epilog=EPILOG
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("zeroshot", help="zero-shot evaluation under prompt sets", epilog=EPILOG)
    p.add_argument("--prompts", type=_name_list, default=["all"],
                   help="comma list of prompt sets (default, domain, diverse, domain_ensemble, clip = CLIP's "
                        "own where published, waffle = WaffleCLIP's random descriptors, descriptions = the "
                        "--descriptions file, auto = best of them on the validation split) or 'all' (default: all)")
    p.add_argument("--descriptions", default=None, metavar="FILE", help=DESCRIPTIONS_HELP)
    p.add_argument("--split", default="test", choices=("val", "test"), help="split to evaluate (default: test)")
    _common(p, config.INFERENCE_BATCH_SIZE)

    p = sub.add_parser("probe", help="linear probe on the frozen vision encoder", epilog=EPILOG)
    _training(p, config.PROBE)
    p.add_argument("--solver", choices=config.SOLVERS, default=config.PROBE_SOLVER,
                   help="lbfgs: the CLIP paper's L-BFGS logistic regression, C swept on validation and refit on "
                        "train + val (not with --shots; no epochs or learning rate); adamw: the training loop "
                        "with the training options (default: %(default)s)")
    p.add_argument("--augment", action="store_true", default=config.PROBE.augment,
                   help="train on augmented images (slower: no cached features; needs --solver adamw)")
    p.add_argument("--encode-batch-size", type=_positive_int, default=config.ENCODE_BATCH_SIZE,
                   help="images per forward pass when encoding the frozen features (default: %(default)s)")
    _common(p, config.PROBE.batch_size)

    p = sub.add_parser("lora", help="LoRA fine-tuning of the vision encoder, the text encoder or both",
                       epilog=EPILOG)
    train, lora = config.LORA_PRESETS[preset] if preset else (config.LORA, config.LORA_SETTINGS)
    _training(p, train)
    if preset:  # the preset's iteration count depends on the dataset: worked out in cmd_lora
        p.set_defaults(epochs=os.environ.get("CLIP_EPOCHS"))
    g = p.add_argument_group("LoRA")
    g.add_argument("--head-lr", type=_positive_float, default=train.head_lr, action=_Given,
                   help="the head's learning rate with --encoders vision (its own parameter group, in the probe's "
                        "units; the head starts from the probe of the same shots and seed when one is saved) "
                        "(default: %(default)s)")
    g.add_argument("--preset", choices=tuple(config.LORA_PRESETS), default=None,
                   help="clip-lora: CLIP-LoRA's published settings (q,k,v of both encoders, r=2, alpha=1, "
                        "dropout 0.25, lr 2e-4, batch 32, no warm-up, its 500 iterations per shot as epochs, "
                        "see README); options given explicitly override it")
    g.add_argument("--encoders", choices=config.ENCODERS, default=lora.encoders,
                   help="towers to adapt: vision (a linear head on the adapted image embeddings), text or both "
                        "(CLIP's own classifier, the class prompts re-encoded at every step) (default: %(default)s)")
    g.add_argument("--rank", type=_positive_int, default=lora.rank, help="LoRA rank r (default: %(default)s)")
    g.add_argument("--alpha", type=_positive_float, default=lora.alpha, help="LoRA alpha (default: %(default)s)")
    g.add_argument("--dropout", type=_fraction, default=lora.dropout, help="LoRA dropout (default: %(default)s)")
    g.add_argument("--targets", type=_name_list, default=list(lora.targets),
                   help=f"comma list of layers to adapt in each adapted tower: {', '.join(config.TARGETS)} "
                        f"(default: {','.join(lora.targets)})")
    g.add_argument("--grad-checkpointing", action="store_true", default=lora.grad_checkpointing,
                   help="recompute activations in the backward pass: far less memory, about 25%% slower")
    g.add_argument("--no-augment", dest="augment", action="store_false", default=train.augment,
                   help="train without image augmentation")
    _common(p, train.batch_size)

    p = sub.add_parser("fewshot", help="few-shot sweep: methods x shots x seeds, table and figure", epilog=EPILOG,
                       description="Train what is missing of K-shot runs (K images per class from train, "
                                   f"min(K, {config.FEWSHOT_VAL_SHOTS}) per class from val, one sample per seed; "
                                   "finished runs are reused), then write results/<dataset>/fewshot.csv, "
                                   "fewshot_summary.csv (mean and std over seeds) and "
                                   "results/figures/<dataset>_fewshot.png.")
    # String defaults go through `type` at parse time, like the CLIP_* ones.
    p.add_argument("--methods", type=_name_list, default=",".join(METHODS[m].command for m in config.FEWSHOT_METHODS),
                   help="comma list: probe, lora (default: %(default)s)")
    p.add_argument("--shots", type=_positive_ints, default=",".join(map(str, config.FEWSHOT_SHOTS)),
                   help="comma list of images per class (default: %(default)s)")
    p.add_argument("--seeds", type=_ints, default=",".join(map(str, config.FEWSHOT_SEEDS)),
                   help="comma list of seeds, one sample each (default: %(default)s)")
    p.add_argument("--epochs", type=_positive_int, default=os.environ.get("CLIP_EPOCHS") or None,
                   help=f"epochs of both methods (default: $CLIP_EPOCHS, else the probe's {config.PROBE.epochs} "
                        f"with --solver adamw, LoRA's {config.LORA.epochs})")
    p.add_argument("--solver", choices=config.SOLVERS, default=config.PROBE_SOLVER,
                   help="the probe's solver (default: %(default)s)")
    _common(p, config.LORA.batch_size)

    p = sub.add_parser("predict", help="top-k classes for your own photos", epilog=EPILOG)
    p.add_argument("photos", nargs="+", metavar="PHOTO", help="image files")
    # None: zeroshot, unless --classifier (which brings its own, so --method is refused with it).
    p.add_argument("--method", default=None, choices=(*CHOICES, ALL_METHODS),
                   help="which classifier (probe and lora need a trained run), or all of them side by side, "
                        "skipping those not trained yet (default: zeroshot)")
    p.add_argument("--classifier", default=None, metavar="DIR",
                   help="a folder written by `export`: predict with it, no --dataset (or --method) needed")
    p.add_argument("--top-k", type=_positive_int, default=config.TOP_K, help="classes to show (default: %(default)s)")
    p.add_argument("--prompts", default=config.PHOTO_PROMPT_SET,
                   help="prompt set for zero-shot: default, domain, diverse, domain_ensemble, waffle, descriptions "
                        "(with --descriptions) or auto (default: %(default)s)")
    p.add_argument("--descriptions", default=None, metavar="FILE", help=DESCRIPTIONS_HELP)
    p.add_argument("--json", action="store_true",
                   help='print JSON instead of a table (with --method all: {"photo", "methods": {method: '
                        '{"top_k"} or {"error"}}} per photo)')
    _common(p, config.INFERENCE_BATCH_SIZE, dataset_required=False)

    p = sub.add_parser("export", help="write a trained classifier to one folder usable with plain transformers",
                       epilog=EPILOG)
    p.add_argument("--method", required=True, choices=tuple(method_named(m).command for m in EXPORTABLE),
                   help="the trained classifier to export (LoRA is merged into the model's weights)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the folder to write (an earlier export there is replaced; anything else is refused)")
    _common(p, config.INFERENCE_BATCH_SIZE)

    p = sub.add_parser("report", help="redraw every figure and summary.csv from saved results", epilog=EPILOG)
    p.add_argument("--results-dir", default=os.environ.get("CLIP_RESULTS_DIR", "results"),
                   help="results root (default: %(default)s)")
    return parser


def _lab(args) -> Lab:
    # The probe trains on cached features and encodes them at --encode-batch-size; the other
    # commands' one batch size is also their encoding batch (LoRA encodes nothing frozen).
    encode = getattr(args, "encode_batch_size", args.batch_size)
    return Lab(model=args.model, data_root=args.data_root, results_dir=args.results_dir, device=args.device,
               batch_size=args.batch_size, encode_batch_size=encode, seed=args.seed, download=args.download,
               num_workers=args.workers, class_naming=args.class_names, domain=args.domain,
               descriptions=getattr(args, "descriptions", None))


def cmd_zeroshot(args) -> None:
    lab = _lab(args)
    results = run_zeroshot(lab, args.dataset, args.prompts, split=args.split)
    if not distributed.is_main():  # under torchrun: printed once
        return
    print(f"{'prompt set':<16} {'top-1':>7} {'top-5':>7} {'per-class':>9}  results")
    for name, m in results.items():
        chosen = f" (chose {m['selected_set']} on val)" if "selected_set" in m else ""
        print(f"{name:<16} {m['top1']:7.2%} {m['top5']:7.2%} {m['mean_per_class']:9.2%}  "
              f"{output_dir(lab.results_dir, args.dataset, name, args.split)}{chosen}")


def _print_run(metrics: dict, folder) -> None:
    if not distributed.is_main():  # under torchrun: printed once
        return
    how = (f"C={metrics['C']:.3g} chosen on validation" if metrics.get("solver") == "lbfgs"
           else f"best epoch {metrics['best_epoch']}/{metrics['epochs']}")
    data = f"{metrics['shots']}-shot, seed {metrics['seed']}, " if metrics.get("shots") else ""
    print(f"{metrics['dataset']} {metrics['method']}: test top-1 {metrics['top1']:.2%}, top-5 {metrics['top5']:.2%}, "
          f"mean per class {metrics['mean_per_class']:.2%} ({data}{how}, "
          f"{metrics['trainable_params']:,} trainable parameters) -> {folder}")


def _config(args, defaults: TrainConfig) -> TrainConfig:
    return replace(defaults, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, augment=args.augment,
                   batch_size=args.batch_size, seed=args.seed)


def cmd_probe(args) -> None:
    metrics = run_probe(_lab(args), args.dataset, _config(args, config.PROBE), resume=args.resume,
                        callbacks=distributed.crash_hooks(), shots=args.shots, solver=args.solver)
    _print_run(metrics, fewshot.run_dir(args.results_dir, args.dataset, "linear_probe", args.shots, args.seed))


def cmd_lora(args) -> None:
    lab = _lab(args)
    train = config.LORA_PRESETS[args.preset][0] if args.preset else config.LORA
    if args.epochs is None:  # a preset without --epochs: its iteration count for this dataset
        args.epochs = clip_lora_preset(lab, args.dataset, shots=args.shots, seed=args.seed)[0].epochs
        print(f"--preset {args.preset}: {args.epochs} epochs (CLIP-LoRA's 500 iterations per training image per "
              f"class, at most 8000, at batch {train.batch_size})")
    cfg = replace(_config(args, train), head_lr=args.head_lr)
    lora = LoraSettings(rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=tuple(args.targets),
                        grad_checkpointing=args.grad_checkpointing, encoders=args.encoders)
    metrics = run_lora(lab, args.dataset, cfg, lora, resume=args.resume, callbacks=distributed.crash_hooks(),
                       shots=args.shots)
    _print_run(metrics, fewshot.run_dir(args.results_dir, args.dataset, "lora", args.shots, args.seed))


def cmd_fewshot(args) -> None:
    epochs = {} if args.epochs is None else {"epochs": args.epochs}
    result = sweep.run_fewshot(
        _lab(args), args.dataset, args.methods, args.shots, args.seeds,
        probe_cfg=replace(config.PROBE, batch_size=args.batch_size, **epochs),
        lora_cfg=replace(config.LORA, batch_size=args.batch_size, **epochs), solver=args.solver)
    print(sweep.summary_table(result.summary).to_string(index=False))
    print(f"{len(result.trained)} runs trained, {len(result.reused)} reused")
    for path in result.files:
        print(path)


def cmd_predict(args) -> int:
    if args.classifier:
        results = predict_exported(args.classifier, args.photos, top_k=args.top_k, device=args.device)
        print(json.dumps(results, indent=1) if args.json else format_predictions(results))
        return 1 if any("error" in r for r in results) else 0
    if args.method == ALL_METHODS:
        return _predict_all(args)
    results = predict_photos(_lab(args), args.photos, args.dataset, method=args.method, top_k=args.top_k,
                             prompt_set=args.prompts)
    print(json.dumps(results, indent=1) if args.json else format_predictions(results))
    return 1 if any("error" in r for r in results) else 0


def _predict_all(args) -> int:
    lab = _lab(args)
    results = compare_photos(lab, args.photos, args.dataset, top_k=args.top_k, prompt_set=args.prompts)
    print(json.dumps(results, indent=1) if args.json else format_comparison(results))
    read = next((r["methods"] for r in results if "methods" in r), None)
    if read is None:  # no photo could be read: no model was loaded, each photo's error is above
        return 1
    # A method's error is the same for every photo: say it once, after the tables.
    errors = {name: entry["error"] for name, entry in read.items() if "error" in entry}
    if len(errors) == len(read):
        print(f"error: no method can predict for {args.dataset}: {'; '.join(errors.values())}", file=sys.stderr)
        return 1
    # Not trained yet is a skip; a checkpoint that is there but cannot be used is a failure.
    untrained = {name: why for name, why in errors.items() if checkpoint_missing(lab, args.dataset, name)}
    if untrained:
        print("warning: skipped " + "; ".join(f"{METHODS[name].label} ({why})" for name, why in untrained.items())
              + " (with the same --model, --data-root and --results-dir as here)", file=sys.stderr)
    for name in errors.keys() - untrained.keys():
        print(f"error: {METHODS[name].label}: {errors[name]}", file=sys.stderr)
    return 1 if len(untrained) < len(errors) or any("error" in r for r in results) else 0


def cmd_export(args) -> None:
    folder = export_classifier(_lab(args), args.dataset, args.method, args.out)
    print(f"{args.dataset} {method_named(args.method).label} classifier -> {folder} "
          f"(CLIPModel.from_pretrained, head.safetensors, classes.json; usage in {folder / 'README.md'})")


def cmd_report(args) -> None:
    for path in make_report(args.results_dir):
        print(path)


# Errors a user can act on: one line, no traceback.
USER_ERRORS = (DatasetNotFoundError, UnreadableImageError, ModelUnavailableError, CheckpointError, TrainingError,
               FileNotFoundError, FileExistsError, ValueError)


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


def _check_arguments(parser: argparse.ArgumentParser, args) -> None:
    """Usage errors that need more than one argument to see, found before anything loads."""
    parser = _command_parser(parser, args.command)
    if args.command == "predict":
        if args.classifier and (args.dataset or args.method or args.descriptions):
            parser.error("--classifier brings its own model and classes: leave out --dataset, --method and "
                         "--descriptions")
        if not args.classifier and not args.dataset:
            parser.error("the following arguments are required: --dataset (or --classifier DIR)")
        args.method = args.method or "zeroshot"
    if getattr(args, "domain", None) and not (args.dataset or "").startswith(PREFIX):
        parser.error(f"--domain is for {PREFIX}PATH datasets; registered ones such as {args.dataset} declare "
                     f"their prompts")
    if distributed.launched():
        if args.command not in DISTRIBUTED_COMMANDS:
            parser.error(f"{args.command} runs in one process: start it without torchrun "
                         f"(torchrun runs {', '.join(DISTRIBUTED_COMMANDS)})")
        device = torch.device(args.device) if args.device else None
        if device is not None and device.type == "cuda" and device.index is not None:
            parser.error(f"--device {args.device}: under torchrun each process takes cuda:LOCAL_RANK; pass --device cuda")
    try:
        if args.command == "fewshot":
            sweep.check_methods(args.methods)
        if args.command == "lora":
            LoraSettings(rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=tuple(args.targets),
                         encoders=args.encoders)
    except ValueError as err:
        parser.error(str(err))
    if args.command == "lora" and "head_lr" in getattr(args, "given", ()) and args.encoders != "vision":
        parser.error(f"--head-lr is the rate of the linear head that --encoders vision trains; --encoders "
                     f"{args.encoders} trains no head (CLIP's own classifier): leave --head-lr out")
    if args.command in ("probe", "fewshot") and args.solver == "lbfgs" and getattr(args, "augment", False):
        parser.error("--augment trains through the encoder with the training loop: add --solver adamw")
    # An image folder's sets depend on its classes.json: they are checked when it loads.
    zeroshot_prompts = args.command == "zeroshot" or (
        args.command == "predict" and not args.classifier and args.method in ("zeroshot", ALL_METHODS))
    if zeroshot_prompts and args.dataset in DATASETS:
        try:
            prompts.resolve(args.prompts, dataset_spec(args.dataset), descriptions=bool(args.descriptions))
        except ValueError as err:
            parser.error(f"--prompts: {err}")


def _kept_after_interrupt(args) -> str:
    """What an interrupted command leaves behind, and how to go on."""
    if args.command == "fewshot":
        return "completed results files are kept (rerun to reuse the finished runs)"
    if args.command not in ("probe", "lora"):
        return "completed results files are kept"
    folder = fewshot.run_dir(args.results_dir, args.dataset, args.command, args.shots, args.seed)
    if (folder / RESUME_FILE).is_file():
        return "the last completed epoch's checkpoint and curves are kept (rerun with --resume)"
    return "no epoch had finished, so there is nothing to resume: rerun the same command to start again"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "preset", None):  # parsed again with the preset's defaults: explicit options still win
        parser = build_parser(args.preset)
        args = parser.parse_args(argv)
    _check_arguments(parser, args)
    handler = globals()[f"cmd_{args.command}"]
    try:
        with warnings.catch_warnings():  # restores the previous display when main returns
            warnings.showwarning = _show_warning
            if distributed.launched():  # torchrun: join the other processes, on this rank's device
                args.device = distributed.setup(args.device or default_device())
            code = handler(args) or 0
            distributed.teardown(wait=True)  # every rank got here: leave the group together
            return code
    except distributed.RankZeroFailed:
        return 1  # rank 0 has said what failed
    except KeyboardInterrupt:
        if distributed.is_main():  # under torchrun every process gets the Ctrl-C: say it once
            print(f"interrupted: {_kept_after_interrupt(args)}", file=sys.stderr)
        return 130
    except torch.OutOfMemoryError as err:
        # Training turns its own OOM into a TrainingError; what lands here is encoding or prediction.
        option, size = (("--encode-batch-size", args.encode_batch_size) if hasattr(args, "encode_batch_size")
                        else ("--batch-size", getattr(args, "batch_size", 2)))
        print(f"error: CUDA out of memory at {option} {size} "
              f"({str(err).splitlines()[0]}); try {option} {max(1, size // 2)}", file=sys.stderr)
        return 1
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        distributed.teardown()
