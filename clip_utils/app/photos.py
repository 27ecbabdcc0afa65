"""Your own photos: robust loading and top-k predictions with any of the three classifiers.

    results = predict_photos(lab, ["my_photo/flower.png", "IMG_2041.HEIC"], "flowers102")
    print(format_predictions(results))
    # my_photo/flower.png
    #    1. pink primrose          41.2%  ...
    # IMG_2041.HEIC
    #    error: cannot read IMG_2041.HEIC: not an image file Pillow can open ...

Photos arrive as people take them, so `load_photo` turns every readable file into the RGB
picture a person sees:

- EXIF orientation is applied (phones store portrait shots sideways plus a rotate tag);
- transparency (RGBA, LA, palette with a transparent colour) is composited on white, as a
  viewer shows it, instead of exposing whatever colour hides under alpha = 0;
- 16-bit and 32-bit greyscale (`I;16`, `I`, `F`) are scaled to 8 bits by their bit depth
  rather than clipped (clipping turns a 16-bit photo white);
- greyscale, palette, CMYK, YCbCr and LAB go through Pillow's own conversions;
- large photos: JPEGs are decoded at a reduced scale (`Image.draft`, DCT scaling) that
  still leaves at least `DECODE_SIZE` pixels a side, so a 50-megapixel phone photo costs a
  fraction of its full-size memory; the model only sees a 224-pixel crop anyway. An image
  over Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS` twice over, about
  179 megapixels by default) is refused, not decoded: its header may lie, and decoding it
  could take gigabytes. Raise that limit yourself if you trust the file.

Anything else (a missing path, a folder, a file that is not an image, a truncated file) is
a `PhotoError` naming the file and the way out. `predict_photos` records it for that photo
and goes on with the others. `open_photo` decodes bytes the same way (an uploaded file:
`open_photo(io.BytesIO(data), "IMG_2041.jpg")`).

`compare_photos` puts every method side by side (`predict --method all`, the explorer);
a method without a checkpoint gets an error entry saying which command trains it:

    results = compare_photos(lab, ["my_photo/bird.jpg"], "cub200")
    print(format_comparison(results))
"""

from __future__ import annotations

import io
import os
import re
import shlex
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import torch
from PIL import Image

from clip_utils import config, registry
from clip_utils.data import Dataset, results_name
from clip_utils.data.images import decode_image
from clip_utils.errors import InvalidValue, UserError
from clip_utils.figures.predictions import plot_photo_predictions
from clip_utils.lab import Lab
from clip_utils.model.heads import ClipClassifier, probabilities
from clip_utils.results import fewshot
from clip_utils.runtime.progress import bar

DECODE_SIZE = 1024


class PhotoError(InvalidValue):
    """A photo that cannot be used; the message names the file and what to do."""


def load_photo(path: str | Path) -> Image.Image:
    """Open a photo as an upright RGB image, or raise a `PhotoError` that says why not.

    Args:
        path: image file (JPEG, PNG, WebP, TIFF, BMP, GIF: whatever Pillow reads).

    Raises:
        PhotoError: missing path, folder, not an image, truncated or corrupt file, or an
            image over Pillow's decompression-bomb limit.
    """
    path = Path(path)
    if not path.exists():
        raise PhotoError(f"photo not found: {path} (check the path; relative paths start at {os.getcwd()})")
    if path.is_dir():
        raise PhotoError(f"{path} is a folder, not a photo: pass the image files inside it (e.g. {path}/*.jpg)")
    return open_photo(path, path)


def open_photo(source: str | Path | BinaryIO, name: str | Path) -> Image.Image:
    """Decode a photo from a file or a binary file object (an upload) as an upright RGB image.

    Args:
        source: an existing image file, or a binary file-like object (`io.BytesIO(data)`).
        name: how messages name the photo (its path, or the uploaded file's name).

    Raises:
        PhotoError: an empty file, not an image, truncated or corrupt data, unreadable file,
            or an image over Pillow's decompression-bomb limit.
    """
    if _is_empty(source):  # Pillow would call it "not an image"; it is nothing at all
        raise PhotoError(f"{name} is empty (0 bytes): nothing to read; copy or upload the photo again")
    try:
        return decode_image(source, name, photo=True, draft=DECODE_SIZE)
    except UserError as err:  # the data layer's decoder: one reason per failure, naming the photo
        raise PhotoError(str(err)) from err


def _is_empty(source: str | Path | BinaryIO) -> bool:
    """Whether a file or a seekable file object holds no bytes at all (False when it cannot tell)."""
    try:
        if isinstance(source, (str, Path)):
            info = os.stat(source)  # a pipe or device reports 0 bytes too: not "empty" (decode_image says what it is)
            return stat.S_ISREG(info.st_mode) and info.st_size == 0
        here = source.tell()
        end = source.seek(0, io.SEEK_END)
        source.seek(here)
        return end == 0
    except (OSError, AttributeError, ValueError):
        return False


def list_photos(folder: str | Path) -> list[Path]:
    """The files in a photo folder, sorted, hidden files skipped (`load_photo` judges the rest).

    Args:
        folder: e.g. `my_photo`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PhotoError(f"photo folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def classifier_for(lab: Lab, dataset: Dataset | str, method: str | None = None,
                   prompt_set: str = config.PHOTO_PROMPT_SET) -> ClipClassifier:
    """The `ClipClassifier` (vision tower + head, eval mode, on `lab.device`) of a method.

    Args:
        lab: the run context.
        dataset: the dataset (a name is resolved by the lab).
        method: a registered method (None: the reference, zero-shot, with `prompt_set`); a
            method that fits loads its finished run from the results folder.
        prompt_set: the zero-shot prompt set, `auto` included.
    """
    m = registry.reference() if method is None else registry.get(method)
    return m.load_classifier(lab, lab.resolve(dataset), prompt_set=prompt_set)


def train_command(lab: Lab, dataset: Dataset, method: str, paths: bool = True) -> str:
    """The command that trains `method` on `dataset`, ready to paste into a terminal.

    Args:
        lab: the run context.
        dataset: the resolved dataset.
        method: a registered method.
        paths: carry the lab's model, data root and results folder (a notebook's, which the
            CLI's defaults need not match); False: the bare command (the CLI, whose user
            typed those options and is told to keep them).
    """
    words = ["python", "-m", "clip_utils", registry.get(method).command, *dataset.command_args]
    if paths:
        words += ["--model", str(lab.model), "--data-root", str(lab.data_root), "--results-dir", str(lab.results_dir)]
    return shlex.join(words)


def checkpoint_missing(lab: Lab, dataset: Dataset, method: str, paths: bool = False) -> str | None:
    """Why `method` cannot predict on `dataset` yet (no finished checkpoint), or None when it can.

    Only looks for the files (no model is loaded): a checkpoint that is there but damaged or
    made for another run is refused later, by `classifier_for`.

    Args:
        lab: the run context (its results folder).
        dataset: the resolved dataset.
        method: a registered method (one that fits nothing always can).
        paths: the command that trains it carries the lab's paths (`train_command`).
    """
    m = registry.get(method)
    if not m.trained or m.has_checkpoint(fewshot.run_dir(lab.results_dir, dataset, m.name)):
        return None
    return f"no {m.label} checkpoint for {dataset.folder}: train it with {train_command(lab, dataset, method, paths)}"


def open_photos(photos: Sequence[str | Path]) -> tuple[dict[int, Image.Image], list[dict]]:
    """Every photo opened before any model loads, so a list of unreadable files is answered
    in milliseconds: `({index: image}, [{"photo"} or {"photo", "error"} per photo])`.

    Args:
        photos: image files.
    """
    images: dict[int, Image.Image] = {}
    results: list[dict] = []
    for i, photo in enumerate(photos):
        try:
            images[i] = load_photo(photo)
            results.append({"photo": str(photo)})
        except PhotoError as err:
            results.append({"photo": str(photo), "error": str(err)})
    return images, results


def probability_kind(classifier) -> str:
    """`softmax` or `sigmoid`: what a classifier's probabilities are (`ClipClassifier.probabilities`)."""
    return getattr(classifier, "probabilities", "softmax")


@torch.inference_mode()
def top_classes(lab: Lab, classifier: ClipClassifier, image: Image.Image, names: Sequence[str],
                top_k: int) -> list[dict]:
    """The `top_k` most likely classes of one loaded photo under one classifier.

    Args:
        lab: the run context (preprocessing, device).
        classifier: what `classifier_for` returned.
        image: an RGB photo (`load_photo`, `open_photo`).
        names: the dataset's class names in label order.
        top_k: classes to return (clamped to the number of classes).

    Returns:
        `[{"label": int, "name": str, "prob": float}, ...]`, most likely first; `prob` is of
        the classifier's kind (`classifier.probabilities`): a softmax over classes, or
        SigLIP zero-shot's sigmoid per class (which need not sum to 1).
    """
    dtype = classifier.encoder_dtype  # the encoder's (fp16 on CUDA)
    pixels = lab.preprocess.transform()(image).unsqueeze(0).to(lab.device, dtype)
    probs = probabilities(classifier(pixels), probability_kind(classifier))[0].cpu()
    top = probs.topk(min(top_k, len(names)))
    return [{"label": int(j), "name": names[int(j)], "prob": float(p)}
            for p, j in zip(top.values, top.indices, strict=True)]


@torch.inference_mode()
def predict_photos(
    lab: Lab,
    photos: Sequence[str | Path],
    dataset: Dataset | str,
    method: str | None = None,
    top_k: int = config.TOP_K,
    prompt_set: str = config.PHOTO_PROMPT_SET,
) -> list[dict]:
    """Top-k classes of each photo; a photo that cannot be read gets an error entry instead.

    Every photo is opened before any model is loaded, so a list of unreadable files is
    answered in milliseconds.

    Args:
        lab: the run context.
        photos: image files.
        dataset: whose classes to predict (a name is resolved by the lab).
        method: a registered method (None: the reference, zero-shot).
        top_k: classes per photo (clamped to the number of classes).
        prompt_set: zero-shot prompt set (`default`, `domain`, `diverse`, `domain_ensemble`, `auto`).

    Returns:
        One dict per photo, in order: `{"photo": path, "probabilities": "softmax" or "sigmoid",
        "top_k": [{"label": int, "name": str, "prob": float}, ...]}` (most likely first) or
        `{"photo": path, "error": message}`. `probabilities` says what `prob` is: a softmax
        over classes, or (SigLIP zero-shot) a sigmoid per class.
    """
    if top_k < 1:
        raise InvalidValue(f"top_k must be at least 1, got {top_k}")
    dataset = lab.resolve(dataset)
    names = list(dataset.class_names)
    images, results = open_photos(photos)
    if not images:
        return results
    classifier = classifier_for(lab, dataset, method, prompt_set)
    for i, image in bar(images.items(), desc="predicting photos", unit="photo", total=len(images)):
        results[i]["probabilities"] = probability_kind(classifier)
        results[i]["top_k"] = top_classes(lab, classifier, image, names, top_k)
    return results


def compare_photos(
    lab: Lab,
    photos: Sequence[str | Path],
    dataset: Dataset | str,
    methods: Sequence[str] | None = None,
    top_k: int = config.TOP_K,
    prompt_set: str = config.PHOTO_PROMPT_SET,
) -> list[dict]:
    """Top-k classes of each photo under several methods; what cannot run gets an error entry.

    Photos are opened before any model is loaded; then one method's classifier at a time
    (LoRA's holds its own model copy) predicts every photo.

    Args:
        lab: the run context.
        photos: image files.
        dataset: whose classes to predict (a name is resolved by the lab).
        methods: method names (default: every registered method).
        top_k: classes per photo and method.
        prompt_set: zero-shot prompt set.

    Returns:
        One dict per photo: `{"photo": path, "methods": {method: {"probabilities": kind,
        "top_k": [...]} or {"error": message}}}` (canonical method names; `probabilities` as
        in `predict_photos`, per method: a method with no checkpoint, or a
        damaged one, has the error), or `{"photo": path, "error": message}` for a photo
        that could not be read.
    """
    if top_k < 1:
        raise InvalidValue(f"top_k must be at least 1, got {top_k}")
    dataset = lab.resolve(dataset)
    names = list(dataset.class_names)
    images, results = open_photos(photos)
    for i in images:
        results[i]["methods"] = {}
    for name in dict.fromkeys(registry.get(m).name for m in (methods or [m.name for m in registry.methods()])):
        if not images:
            break
        reason, classifier = checkpoint_missing(lab, dataset, name), None
        if reason is None:
            try:
                classifier = classifier_for(lab, dataset, name, prompt_set)
            except UserError as err:
                reason = str(err)
        for i, image in images.items():
            results[i]["methods"][name] = ({"error": reason} if classifier is None
                                           else {"probabilities": probability_kind(classifier),
                                                 "top_k": top_classes(lab, classifier, image, names, top_k)})
        del classifier  # free LoRA's model copy before the next method loads
    return results


def format_predictions(results: Sequence[dict]) -> str:
    """A readable table of `predict_photos` results: per photo, its top-k or its error.

    Args:
        results: what `predict_photos` returned.
    """
    lines = []
    for r in results:
        lines.append(str(r["photo"]))
        if "error" in r:
            lines.append(f"   error: {r['error']}")
            continue
        width = max(len(t["name"]) for t in r["top_k"])
        lines += [f"  {i:>2}. {t['name']:<{width}}  {100 * t['prob']:5.1f}%" for i, t in enumerate(r["top_k"], 1)]
    return "\n".join(lines)


def format_comparison(results: Sequence[dict]) -> str:
    """`compare_photos` results as one table per photo, a column per method that predicted.

    Methods with an error entry are left out (the caller says why once, not per photo).

    Args:
        results: what `compare_photos` returned.
    """
    lines = []
    for r in results:
        lines.append(str(r["photo"]))
        if "error" in r:
            lines.append(f"   error: {r['error']}")
            continue
        tops = {registry.get(m).label: e["top_k"] for m, e in r["methods"].items() if "top_k" in e}
        if not tops:
            lines.append("   no method could predict")
            continue
        widths = {label: max(len(label), *(len(t["name"]) + 7 for t in top)) for label, top in tops.items()}
        lines.append(("      " + "   ".join(f"{label:<{widths[label]}}" for label in tops)).rstrip())
        for rank in range(max(len(top) for top in tops.values())):
            cells = [f"{top[rank]['name']:<{widths[label] - 7}} {100 * top[rank]['prob']:5.1f}%" if rank < len(top)
                     else " " * widths[label] for label, top in tops.items()]
            lines.append(f"  {rank + 1:>2}. " + "   ".join(cells).rstrip())
    return "\n".join(lines)


def photo_figures(results: Sequence[dict], dataset: Dataset | str, method: str | None = None,
                  folder: str | Path | None = None) -> list:
    """Each readable photo beside its top-k bar chart (the notebooks' custom-photo sections).

    Args:
        results: what `predict_photos` returned (error entries are skipped).
        dataset: whose classes were predicted (a `Dataset`, or a registered name or `imagefolder:PATH`).
        method: the method that predicted them (a registered name; None: the reference, zero-shot).
        folder: save the figures there as `photo_<file name>_<dataset>_<method>.png`: the dataset
            by its results folder's name, the method by its canonical name, as every other
            results file (None: do not save). The file name keeps its extension (`bird_jpg`),
            so `bird.jpg` and `bird.png` do not collide.

    Returns:
        The matplotlib Figures, in order.
    """
    entry = registry.reference() if method is None else registry.get(method)
    where = dataset.folder if isinstance(dataset, Dataset) else results_name(dataset)
    figures = []
    for r in results:
        if "error" in r:
            continue
        name = Path(r["photo"]).name
        slug = re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_")
        path = Path(folder) / f"photo_{slug}_{where}_{entry.name}.png" if folder is not None else None
        title = f"{name} ({where}, {entry.label})"
        figures.append(plot_photo_predictions(load_photo(r["photo"]), r["top_k"], title, path=path))
    return figures
