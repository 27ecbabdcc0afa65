"""Command line: the notebooks' pipeline, headless.

    python -m clip_utils zeroshot --dataset flowers102 --prompts all
    python -m clip_utils probe    --dataset cub200 --epochs 20
    python -m clip_utils lora     --dataset flowers102 --rank 8 --alpha 16
    python -m clip_utils predict  my_photo/flower.png --dataset flowers102 --method lora
    python -m clip_utils report

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
from pathlib import Path

from .data import DATASETS

EPILOG = "Results layout and options: README.md and DESIGN.md."


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


def _name_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _common(parser: argparse.ArgumentParser, dataset: bool = True) -> None:
    g = parser.add_argument_group("common options")
    if dataset:
        g.add_argument("--dataset", required=True, choices=DATASETS, help="dataset to use")
    g.add_argument("--model", default=os.environ.get("CLIP_MODEL", "openai/clip-vit-large-patch14"),
                   help="Hugging Face CLIP id or local folder (default: %(default)s)")
    g.add_argument("--data-root", default=os.environ.get("CLIP_DATA_ROOT", "data"),
                   help="dataset root (default: %(default)s)")
    g.add_argument("--results-dir", default=os.environ.get("CLIP_RESULTS_DIR", "results"),
                   help="results root (default: %(default)s)")
    g.add_argument("--device", default=os.environ.get("CLIP_DEVICE"),
                   help="cuda, cpu, ... (default: cuda when available)")
    # String defaults go through `type` at parse time, so a bad CLIP_* value is a usage error.
    g.add_argument("--batch-size", type=_positive_int, default=os.environ.get("CLIP_BATCH_SIZE", "128"),
                   help="images per batch (default: $CLIP_BATCH_SIZE or %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    g.add_argument("--workers", type=_non_negative_int, default=None,
                   help="file reader threads (default: cores - 1)")
    g.add_argument("--no-download", dest="download", action="store_false",
                   help="never download: fail when a dataset is missing")


def _training(parser: argparse.ArgumentParser, epochs: int, lr: float) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=_positive_int, default=os.environ.get("CLIP_EPOCHS", str(epochs)),
                   help="epochs (default: $CLIP_EPOCHS or %(default)s)")
    g.add_argument("--lr", type=_positive_float, default=lr, help="peak learning rate (default: %(default)s)")
    g.add_argument("--weight-decay", type=_non_negative_float, default=0.01,
                   help="AdamW weight decay (default: %(default)s)")
    g.add_argument("--resume", action="store_true", help="continue from the last completed epoch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clip_utils", description="Adapt CLIP to fine-grained classification.", epilog=EPILOG
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("zeroshot", help="zero-shot evaluation under prompt sets", epilog=EPILOG)
    p.add_argument("--prompts", type=_name_list, default=["all"],
                   help="comma list of prompt sets (default, domain, diverse, domain_ensemble, auto = best "
                        "of them on the validation split) or 'all' (default: all)")
    p.add_argument("--split", default="test", choices=("val", "test"), help="split to evaluate (default: test)")
    _common(p)

    p = sub.add_parser("probe", help="linear probe on the frozen vision encoder", epilog=EPILOG)
    _training(p, epochs=30, lr=5e-3)
    p.add_argument("--augment", action="store_true",
                   help="train on augmented images (slower: no cached features)")
    p.add_argument("--encode-batch-size", type=_positive_int, default=128,
                   help="images per forward pass when encoding the frozen features (default: %(default)s)")
    _common(p)
    # Training batches: 32 gives ~1000 steps over 30 Flowers102 epochs (encoding is still fast).
    p.set_defaults(batch_size=os.environ.get("CLIP_BATCH_SIZE", "32"))

    p = sub.add_parser("lora", help="LoRA fine-tuning of the vision encoder", epilog=EPILOG)
    _training(p, epochs=10, lr=5e-4)
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=_positive_int, default=8, help="LoRA rank r (default: %(default)s)")
    g.add_argument("--alpha", type=_positive_float, default=16, help="LoRA alpha (default: %(default)s)")
    g.add_argument("--dropout", type=_fraction, default=0.1, help="LoRA dropout (default: %(default)s)")
    g.add_argument("--targets", type=_name_list, default=["q_proj", "v_proj"],
                   help="comma list of modules to adapt (default: q_proj,v_proj)")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: far less memory, about 25%% slower")
    g.add_argument("--no-augment", dest="augment", action="store_false", help="train without image augmentation")
    _common(p)
    # Batch 32: about 9 GB peak for ViT-L/14 in bf16 (3 GB with --grad-checkpointing).
    p.set_defaults(batch_size=os.environ.get("CLIP_BATCH_SIZE", "32"))

    p = sub.add_parser("predict", help="top-k classes for your own photos", epilog=EPILOG)
    p.add_argument("photos", nargs="+", metavar="PHOTO", help="image files")
    p.add_argument("--method", default="zeroshot", choices=("zeroshot", "probe", "lora"),
                   help="which classifier (probe and lora need a trained run; default: zeroshot)")
    p.add_argument("--top-k", type=_positive_int, default=5, help="classes to show (default: %(default)s)")
    p.add_argument("--prompts", default="diverse",
                   help="prompt set for zero-shot: default, domain, diverse, domain_ensemble or auto "
                        "(default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _common(p)

    p = sub.add_parser("report", help="redraw every figure and summary.csv from saved results", epilog=EPILOG)
    p.add_argument("--results-dir", default=os.environ.get("CLIP_RESULTS_DIR", "results"),
                   help="results root (default: %(default)s)")
    return parser


def _lab(args):
    from .lab import Lab

    # The probe trains on cached features and encodes them at --encode-batch-size; the other
    # commands' one batch size is also their encoding batch (LoRA encodes nothing frozen).
    encode = getattr(args, "encode_batch_size", args.batch_size)
    return Lab(model=args.model, data_root=args.data_root, results_dir=args.results_dir, device=args.device,
               batch_size=args.batch_size, encode_batch_size=encode, seed=args.seed, download=args.download,
               num_workers=args.workers)


def cmd_zeroshot(args) -> None:
    from .zeroshot import output_dir, run_zeroshot

    lab = _lab(args)
    results = run_zeroshot(lab, args.dataset, args.prompts, split=args.split)
    print(f"{'prompt set':<16} {'top-1':>7} {'top-5':>7} {'per-class':>9}  results")
    for name, m in results.items():
        chosen = f" (chose {m['selected_set']} on val)" if "selected_set" in m else ""
        print(f"{name:<16} {m['top1']:7.2%} {m['top5']:7.2%} {m['mean_per_class']:9.2%}  "
              f"{output_dir(lab.results_dir, args.dataset, name, args.split)}{chosen}")


def _print_run(metrics: dict, folder) -> None:
    print(f"{metrics['dataset']} {metrics['method']}: test top-1 {metrics['top1']:.2%}, top-5 {metrics['top5']:.2%}, "
          f"mean per class {metrics['mean_per_class']:.2%} (best epoch {metrics['best_epoch']}/{metrics['epochs']}, "
          f"{metrics['trainable_params']:,} trainable parameters) -> {folder}")


def cmd_probe(args) -> None:
    from .results import method_dir
    from .train import TrainConfig, run_probe

    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, augment=args.augment)
    metrics = run_probe(_lab(args), args.dataset, cfg, resume=args.resume)
    _print_run(metrics, method_dir(args.results_dir, args.dataset, "linear_probe"))


def cmd_lora(args) -> None:
    from .lora import LoraSettings, run_lora
    from .results import method_dir
    from .train import TrainConfig

    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, augment=args.augment)
    lora = LoraSettings(rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=tuple(args.targets),
                        grad_checkpointing=args.grad_checkpointing)
    metrics = run_lora(_lab(args), args.dataset, cfg, lora, resume=args.resume)
    _print_run(metrics, method_dir(args.results_dir, args.dataset, "lora"))


def cmd_predict(args) -> int:
    from .photos import format_predictions, predict_photos

    results = predict_photos(_lab(args), args.photos, args.dataset, method=args.method, top_k=args.top_k,
                             prompt_set=args.prompts)
    print(json.dumps(results, indent=1) if args.json else format_predictions(results))
    return 1 if all("error" in r for r in results) else 0


def cmd_report(args) -> None:
    from .report import make_report

    for path in make_report(args.results_dir):
        print(path)


# Errors a user can act on: one line, no traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from .data import DatasetNotFoundError, UnreadableImageError
    from .models import ModelUnavailableError

    errors: list[type[BaseException]] = [DatasetNotFoundError, UnreadableImageError, ModelUnavailableError,
                                         FileNotFoundError, ValueError]
    try:
        from .train import TrainingError

        errors.append(TrainingError)
    except ImportError:
        pass
    return tuple(errors)


def torch_oom() -> type[BaseException]:
    """CUDA's out-of-memory error (training turns it into a `TrainingError`; this catches the rest)."""
    import torch

    return torch.OutOfMemoryError


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # Our own warnings are advice for the user: one line, like the errors. Libraries' keep
    # their usual form (file and line help whoever reports them upstream).
    if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent):
        print(f"warning: {message}", file=file or sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), end="", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = globals()[f"cmd_{args.command}"]
    try:
        with warnings.catch_warnings():  # restores the previous display when main returns
            warnings.showwarning = _show_warning
            return handler(args) or 0
    except KeyboardInterrupt:
        kept = (" the last completed epoch's checkpoint and curves are kept (rerun with --resume)"
                if args.command in ("probe", "lora") else " completed results files are kept")
        print(f"interrupted:{kept}", file=sys.stderr)
        return 130
    except torch_oom() as err:
        # Training turns its own OOM into a TrainingError; what lands here is encoding or prediction.
        option, size = (("--encode-batch-size", args.encode_batch_size) if hasattr(args, "encode_batch_size")
                        else ("--batch-size", getattr(args, "batch_size", 2)))
        print(f"error: CUDA out of memory at {option} {size} "
              f"({str(err).splitlines()[0]}); try {option} {max(1, size // 2)}", file=sys.stderr)
        return 1
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
