"""Speed benchmark: the textbook CLIP pipeline, ours, and the model alone, side by side.

    python -m clip_utils.app.bench                # ViT-L/14 (random weights), 2000 JPEGs, CUDA
    python -m clip_utils.app.bench --small        # a few seconds on CPU (what CI runs)
    python -m clip_utils.app.bench --json out.json

Needs no download: the ViT-L/14 architecture comes from a config kept in the repository
(clip_utils/assets/clip-vit-large-patch14) with random weights (speed does not depend on
the weight values), and the images are generated JPEGs of Flowers102's size (500 px short
side, 60-80 kB). Three pipelines are timed on the same files:

- textbook: `CLIPProcessor` on PIL images in the main process, fp32 model, batch 32 (for
  the linear probe: scikit-learn's L-BFGS logistic regression, as in the CLIP paper);
- ours: what the notebooks and CLI run (on CUDA: file bytes read ahead by threads, nvJPEG
  decode and resize on the GPU, fp16 weights for inference, bf16 autocast for training);
- model alone: the same model on ready-made tensors already on the device, the ceiling.

Sections: zero-shot (image encoding plus every prompt set's classifier from one pass over
the images), the linear probe (end to end, once features exist), and LoRA training steps
(images per second and peak VRAM, with and without gradient checkpointing). The zero-shot
section also times our input path alone (read, decode, resize; no model): when "ours" falls
short of the model alone, that row says whether the input or the overlap is to blame.

Two more sections time the few-shot methods fitted on cached features: `fits`, seconds for
one fit of each at 16 shots on Flowers102-sized generated features (102 classes, 1,632
support features, D=768), and `sweep`, the whole `fewshot` of all of them (shots 1-16,
seeds 1-3) on the test kit's hard image folder with its tiny CLIP.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from clip_utils import registry
from clip_utils.config import FEWSHOT_VAL_SHOTS, LoraSettings, TrainConfig
from clip_utils.data import dataset_spec
from clip_utils.model.feature_fit import FeatureData
from clip_utils.model.features import encode_paths
from clip_utils.model.heads import ClipClassifier, image_embeddings
from clip_utils.model.inputs import iter_labelled_batches, iter_pixel_batches
from clip_utils.model.lora import add_lora
from clip_utils.model.preprocess import Preprocess
from clip_utils.model.training import TrainJob, fit, permuted_batches
from clip_utils.model.vram import VramProbe
from clip_utils.prompts import build_text_classifier, prompt_sets
from clip_utils.testkit import char_tokenizer

ASSET = Path(__file__).resolve().parents[1] / "assets" / "clip-vit-large-patch14"


@dataclass
class Row:
    """One timed measurement of the table."""

    section: str
    pipeline: str
    images: int
    seconds: float
    peak_vram_mb: float | None = None
    note: str = ""

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")


def make_jpegs(folder: str | Path, n: int, short_side: int = 500, seed: int = 0) -> list[str]:
    """Write `n` photo-like JPEGs (smooth colour fields plus sensor-like noise).

    At 500 px and quality 88 they weigh 60-80 kB, like Flowers102's, so decode cost is real.

    Args:
        folder: output folder.
        n: number of images.
        short_side: shortest edge in pixels.
        seed: random seed.
    """
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = short_side, int(short_side * rng.uniform(1.0, 1.5))
        low = rng.integers(0, 256, (h // 50 + 2, w // 50 + 2, 3)).astype(np.uint8)
        pixels = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.float32)
        pixels += rng.normal(0, 6, pixels.shape)
        path = folder / f"bench_{i:05d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=88)
        paths.append(str(path))
    return paths


def bench_model(small: bool):
    """`(CLIPModel with random weights, CLIPProcessor)`: ViT-L/14, or a small ViT for CPU runs.

    Args:
        small: a 2-layer, 64-wide ViT with ViT-L/14's preprocessing (224 px input).
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    config = CLIPConfig.from_pretrained(ASSET)
    if small:
        config.vision_config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, patch_size=32))
        config.text_config.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2))
        config.projection_dim = 32
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor.from_pretrained(ASSET), tokenizer=char_tokenizer())
    return model, processor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(section: str, pipeline: str, images: int, device: torch.device, work: Callable[[], object],
           note: str = "") -> Row:
    with VramProbe(device, label=pipeline) as probe:
        work()
    return Row(section, pipeline, images, probe.seconds or 0.0, probe.peak_allocated_mb, note)


# --------------------------------------------------------------------------- zero-shot


def textbook_pixels(processor, paths: list[str], device: torch.device, batch_size: int = 32):
    """Pixel batches the way most CLIP notebooks make them: PIL and the HF processor in the
    main process."""
    from PIL import Image

    for start in range(0, len(paths), batch_size):
        images = [Image.open(p).convert("RGB") for p in paths[start : start + batch_size]]
        yield processor(images=images, return_tensors="pt")["pixel_values"].to(device)


@torch.inference_mode()
def textbook_encode(model, processor, paths: list[str], device: torch.device, batch_size: int = 32) -> torch.Tensor:
    """The textbook zero-shot image side: `textbook_pixels`, fp32 model, results to the host per batch."""
    return torch.cat([image_embeddings(model, pixels).float().cpu()
                      for pixels in textbook_pixels(processor, paths, device, batch_size)])


@torch.inference_mode()
def model_alone(model, pre: Preprocess, device: torch.device, n: int, batch_size: int) -> None:
    """Forward passes on ready tensors already on the device: the ceiling for any input path."""
    dtype = next(model.parameters()).dtype
    pixels = torch.randn(batch_size, 3, *pre.crop, device=device, dtype=dtype)
    for _ in range(0, n, batch_size):
        image_embeddings(model, pixels)
    _sync(device)


def bench_zeroshot(model, processor, paths: list[str], device: torch.device, batch_size: int,
                   workers: int | None) -> list[Row]:
    """Textbook vs ours vs model alone for zero-shot evaluation under every prompt set."""
    pre = Preprocess.from_processor(processor)
    n = len(paths)
    class_names = [f"flower number {i}" for i in range(102)]
    rows = []

    model.float()
    textbook_encode(model, processor, paths[:32], device)  # warm-up
    rows.append(_timed("zero-shot", "textbook (HF processor, fp32, batch 32)", n, device,
                       lambda: textbook_encode(model, processor, paths, device)))

    model.to(torch.float16 if device.type == "cuda" else torch.float32)
    sets = prompt_sets(dataset_spec("flowers102"))

    def ours() -> None:
        feats = encode_paths(model, paths, pre, device, batch_size=batch_size, num_workers=workers, desc=None)
        for templates in sets.values():  # every prompt set reuses the one pass over the images
            classifier = build_text_classifier(model, processor.tokenizer, class_names, templates, device,
                                               batch_size=256, progress=False)
            (feats.to(classifier) @ classifier).argmax(1)

    def ours_images() -> None:
        encode_paths(model, paths, pre, device, batch_size=batch_size, num_workers=workers, desc=None)

    def input_alone() -> None:
        dtype = next(model.parameters()).dtype
        for _ in iter_pixel_batches(paths, pre, device, dtype, batch_size, num_workers=workers):
            pass
        _sync(device)

    encode_paths(model, paths[: batch_size * 2], pre, device, batch_size=batch_size, num_workers=workers, desc=None)
    rows.append(_timed("zero-shot", f"ours, input path alone (batch {batch_size})", n, device, input_alone,
                       note="read, decode, resize, normalise; no model"))
    rows.append(_timed("zero-shot", f"ours, images only (batch {batch_size})", n, device, ours_images))
    rows.append(_timed("zero-shot", f"ours + {len(sets)} prompt sets' text", n, device, ours,
                       note="what a zero-shot evaluation under every prompt set costs end to end"))
    model_alone(model, pre, device, batch_size * 2, batch_size)  # warm-up
    full_batches = -(-n // batch_size) * batch_size  # what model_alone really pushes through
    rows.append(_timed("zero-shot", f"model alone (batch {batch_size})", full_batches, device,
                       lambda: model_alone(model, pre, device, n, batch_size)))
    return rows


# --------------------------------------------------------------------------- LoRA


def _lora_classifier(model, n_classes: int, grad_checkpointing: bool):
    vision = add_lora(model.vision_model, LoraSettings(grad_checkpointing=grad_checkpointing))
    head = torch.nn.Linear(model.visual_projection.out_features, n_classes)
    return ClipClassifier(vision, model.visual_projection.requires_grad_(False), head).to(model.device)


def lora_steps(classifier, batches, device: torch.device, steps: int, bf16: bool = True) -> int:
    """AdamW train steps over `(pixels, labels)` batches; returns images seen.

    Args:
        classifier: the model to train (its parameters with `requires_grad`).
        batches: `(pixels, labels)` pairs on the device.
        device: where training runs.
        steps: at most this many batches.
        bf16: bf16 autocast on CUDA, as `model.training.fit` runs (False: plain fp32, the textbook).
    """
    params = [p for p in classifier.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    classifier.train()
    seen = 0
    for _, (pixels, labels) in zip(range(steps), batches, strict=False):  # at most `steps` batches
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(classifier(pixels), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen += pixels.shape[0]
    _sync(device)
    return seen


def _lora_rows(classifier, processor, paths: list[str], device: torch.device, batch_size: int,
               workers: int | None, suffix: str, with_ours: bool) -> list[Row]:
    """Model-alone steps on one ready batch, then (optionally) the textbook pipeline and one
    epoch of our real loop."""
    pre = Preprocess.from_processor(processor)
    steps = max(2, len(paths) // batch_size)
    fixed = (torch.randn(batch_size, 3, *pre.crop, device=device), (torch.arange(batch_size) % 102).to(device))
    lora_steps(classifier, iter([fixed, fixed]), device, 2)  # warm-up
    rows = [_timed("LoRA train", f"model alone (batch {batch_size}{suffix})", steps * batch_size, device,
                   lambda: lora_steps(classifier, iter(lambda: fixed, None), device, steps))]
    if with_ours:
        labels = torch.arange(len(paths)) % 102
        rows.insert(0, _timed(
            "LoRA train", f"textbook (HF processor, fp32, batch {batch_size})", steps * batch_size, device,
            lambda: lora_steps(classifier, zip(textbook_pixels(processor, paths, device, batch_size),
                                               labels.to(device).split(batch_size), strict=True), device,
                               steps, bf16=False)))

        def batches(order: torch.Tensor | None, augment: bool, n: int):
            return iter_labelled_batches(paths[:n], labels[:n], pre, device, torch.float32, batch_size,
                                         order=order, augment=augment, num_workers=workers)

        def ours() -> None:
            # The real loop (`model.training.fit`), as `run_lora` drives it: shuffled, augmented batches
            # decoded on the fly, schedule, loss checks, a validation pass and the epoch's files.
            with tempfile.TemporaryDirectory() as out:
                job = TrainJob(
                    name="bench LoRA", model=classifier,
                    train_batches=lambda epoch, gen: batches(torch.randperm(len(paths), generator=gen), True,
                                                             len(paths)),
                    val_batches=lambda: batches(None, False, batch_size),
                    steps_per_epoch=math.ceil(len(paths) / batch_size), save_best=lambda epoch: None,
                    out_dir=Path(out), device=device, batch_size=batch_size, progress=False,
                )
                fit(job, TrainConfig(epochs=1, lr=1e-4, seed=0, batch_size=batch_size))

        rows.append(_timed("LoRA train", f"ours (batch {batch_size}, augmented, train.fit)", len(paths), device, ours,
                           note=f"includes one validation pass over {batch_size} images"))
    return rows


def bench_lora(model, processor, paths: list[str], device: torch.device, batch_size: int,
               workers: int | None) -> list[Row]:
    """LoRA training: ready tensors (model alone) vs ours (the real loop, images decoded and
    augmented on the fly), then model alone with gradient checkpointing."""
    rows = []
    for ckpt in (False, True):
        classifier = _lora_classifier(copy.deepcopy(model).float(), 102, grad_checkpointing=ckpt)
        rows += _lora_rows(classifier, processor, paths, device, batch_size, workers,
                           suffix=" + grad checkpointing" if ckpt else "", with_ours=not ckpt)
        del classifier  # free one copy before building the next
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- linear probe


def bench_probe(dim: int, n_train: int, n_val: int, n_classes: int, device: torch.device, epochs: int) -> list[Row]:
    """The linear probe once features exist: every epoch's training and validation, checkpoints
    and curves written, as `run_probe` does for Flowers102 (1020 train / 1020 val images)."""
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(n_train + n_val, dim, generator=g), dim=-1).to(device)
    labels = (torch.arange(n_train + n_val) % n_classes).to(device)
    cfg = TrainConfig(epochs=epochs, batch_size=32, seed=0)

    def run() -> None:
        head = torch.nn.Linear(dim, n_classes).to(device)
        with tempfile.TemporaryDirectory() as out:
            job = TrainJob(
                name="bench probe", model=head,
                train_batches=lambda epoch, gen: permuted_batches(feats[:n_train], labels[:n_train], 32, gen),
                val_batches=lambda: permuted_batches(feats[n_train:], labels[n_train:], 1024),
                steps_per_epoch=math.ceil(n_train / 32),
                save_best=lambda epoch: torch.save(head.state_dict(), Path(out) / "head.pt"),
                out_dir=Path(out), device=device, batch_size=32, progress=False,
            )
            fit(job, cfg)

    def textbook() -> None:
        from sklearn.linear_model import LogisticRegression

        x, y = feats[:n_train].cpu().numpy(), labels[:n_train].cpu().numpy()
        probe = LogisticRegression(max_iter=1000).fit(x, y)
        probe.score(feats[n_train:].cpu().numpy(), labels[n_train:].cpu().numpy())

    # Both rows count one trained probe (n_train images), so their ratio is a ratio of times.
    return [
        _timed("linear probe", "textbook (scikit-learn L-BFGS, CPU)", n_train, device, textbook,
               note="logistic regression on the same features, as in the CLIP paper"),
        _timed("linear probe", f"ours, {epochs} epochs on cached features", n_train, device, run,
               note=f"{n_train} train / {n_val} val features, {n_classes} classes"),
    ]


def fewshot_features(n_classes: int, shots: int, val_shots: int, dim: int, device: torch.device,
                     seed: int = 0) -> FeatureData:
    """Generated L2-normalised features of a K-shot run's size: class prototypes, a text
    classifier near them (zero-shot informative, not perfect) and images around them."""
    g = torch.Generator().manual_seed(seed)
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    protos = unit(torch.randn(n_classes, dim, generator=g))
    text = unit(protos + 0.06 * torch.randn(n_classes, dim, generator=g))

    def images(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n_classes).repeat_interleave(per_class)
        return unit(protos[labels] + 0.045 * torch.randn(len(labels), dim, generator=g)).to(device), labels.to(device)

    support, support_labels = images(shots)
    val, val_labels = images(val_shots)
    return FeatureData(support, support_labels, val, val_labels, text.to(device), logit_scale=100.0)


def bench_fits(device: torch.device, n_classes: int = 102, shots: int = 16, dim: int = 768) -> list[Row]:
    """Seconds to fit each method registered with a feature-level `fit`, at K-shot on
    Flowers102-sized generated features (102 classes, 16 shots: 1,632 support features)."""
    data = fewshot_features(n_classes, shots, min(shots, FEWSHOT_VAL_SHOTS), dim, device)
    rows = []
    for m in registry.methods():
        if m.fit is None:
            continue
        kind = "training-free" if not m.epochs else "trained, its published schedule"
        rows.append(_timed("few-shot fits", m.label, len(data.support_labels), device, lambda m=m: m.fit(data, seed=0),
                           note=f"{kind}; {n_classes} classes x {shots} shots, D={dim}"))
    return rows


def bench_sweep_on_kit(device: torch.device, shots: tuple[int, ...] = (1, 2, 4, 8, 16),
                       seeds: tuple[int, ...] = (1, 2, 3)) -> list[Row]:
    """The whole few-shot sweep of every method fitted on cached features, on the test kit's
    hard image folder (10 classes, 16 training images each) with its tiny CLIP."""
    from clip_utils.app.sweep import run_fewshot
    from clip_utils.lab import Lab
    from clip_utils.testkit import make_hard_imagefolder, make_tiny_clip

    methods = [m.name for m in registry.methods() if m.fit is not None]
    with tempfile.TemporaryDirectory() as tmp:
        model, folder = make_tiny_clip(Path(tmp) / "model"), make_hard_imagefolder(Path(tmp) / "hard")
        lab = Lab(model=str(model), data_root=tmp, results_dir=Path(tmp) / "results", device=str(device))
        runs = len(methods) * len(shots) * len(seeds)
        row = _timed("few-shot sweep", f"fewshot --methods <{len(methods)}> on the kit", runs, device,
                     lambda: run_fewshot(lab, f"imagefolder:{folder}", methods, shots, seeds),
                     note=f"{runs} runs (shots {','.join(map(str, shots))} x seeds {','.join(map(str, seeds))}), "
                          f"encoding and zero-shot included; 'img/s' is runs/s")
    return [row]


# --------------------------------------------------------------------------- table


def format_table(rows: list[Row]) -> str:
    """A text table with images per second and ratios to the textbook and model-alone rows."""
    lines = [f"{'section':<13} {'pipeline':<46} {'seconds':>8} {'img/s':>9} {'vs textbook':>11} {'vs model':>9} "
             f"{'peak MB':>9}"]
    for section in dict.fromkeys(r.section for r in rows):
        group = [r for r in rows if r.section == section]
        textbook = next((r for r in group if r.pipeline.startswith("textbook")), None)
        alone = next((r for r in group if r.pipeline.startswith("model alone") and "checkpointing" not in r.pipeline),
                     None)
        for r in group:
            vs_t = f"{r.images_per_s / textbook.images_per_s:.2f}x" if textbook else ""
            vs_m = f"{r.images_per_s / alone.images_per_s:.2f}x" if alone else ""
            mb = f"{r.peak_vram_mb:,.0f}" if r.peak_vram_mb is not None else "-"
            lines.append(f"{section:<13} {r.pipeline:<46} {r.seconds:>8.2f} {r.images_per_s:>9.1f} {vs_t:>11} "
                         f"{vs_m:>9} {mb:>9}")
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    """Card, library versions and host, printed with every table."""
    import transformers

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    return {"device": card, "torch": torch.__version__, "transformers": transformers.__version__,
            "cpus": os.cpu_count()}


SECTIONS = ("zero-shot", "linear-probe", "lora-train", "fits", "sweep")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clip_utils.app.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="small ViT and few images: a CPU smoke run")
    parser.add_argument("--images", type=int, help="generated JPEGs (default: 2000, or 64 with --small)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch for LoRA and the textbook run (default: 32)")
    parser.add_argument("--eval-batch-size", type=int, default=256, help="batch for our zero-shot encoding")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=None, help="file reader threads (default: cores - 1)")
    parser.add_argument("--sections", default=None,
                        help=f"comma list of {', '.join(SECTIONS)} (default: all; with --small all but sweep)")
    parser.add_argument("--json", help="also write the rows and environment to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    n = args.images or (64 if args.small else 2000)
    sections = set(args.sections.split(",") if args.sections else SECTIONS[:-1] if args.small else SECTIONS)
    env = environment(device)
    print(f"benchmark on {env['device']} | torch {env['torch']} | transformers {env['transformers']} | "
          f"{'small ViT (smoke run)' if args.small else 'ViT-L/14 architecture, random weights'} | {n} JPEGs")
    model, processor = bench_model(args.small)
    model.to(device)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        paths = make_jpegs(tmp, n)
        print(f"generated {n} JPEGs in {time.perf_counter() - start:.1f} s "
              f"(mean {np.mean([Path(p).stat().st_size for p in paths]) / 1e3:.0f} kB)")
        if "zero-shot" in sections:
            rows += bench_zeroshot(model, processor, paths, device, args.eval_batch_size, args.workers)
        if "linear-probe" in sections:
            rows += bench_probe(model.config.projection_dim, 1020, 1020, 102, device, epochs=30)
        if "lora-train" in sections:
            rows += bench_lora(model, processor, paths, device, args.batch_size, args.workers)
    if "fits" in sections:  # --small: the same fits on 10 classes of 64-dim features, for a smoke run
        rows += bench_fits(device, n_classes=10, dim=64) if args.small else bench_fits(device)
    if "sweep" in sections:
        rows += bench_sweep_on_kit(device)
    print(format_table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        table = [asdict(r) | {"images_per_s": r.images_per_s} for r in rows]
        Path(args.json).write_text(json.dumps({"environment": env, "rows": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
