"""Zero-shot classification: text classifier per prompt set, one matmul per set, results files.

    lab = Lab(model="openai/clip-vit-large-patch14")
    results = run_zeroshot(lab, "flowers102", ["all"])     # {prompt_set: metrics}
    results["domain"]["top1"], results["auto"]["selected_set"]

The image side is the expensive half and does not depend on the prompts, so the test
images are encoded once (`lab.features`, cached on disk) and each prompt set costs one text
encoding and one `(N, D) @ (D, C)` product. Per set, `save_evaluation` writes
`results/<dataset>/zeroshot/<set>/metrics.json` (with the exact `templates`: the template
list, or for a per-class set such as `descriptions` `{class name: its prompts}`),
`predictions.csv`, the classification report and the confusion / sample figures (a `val`
run goes to `.../<set>/val/` instead, leaving the test results alone); the run
ends by redrawing `results/figures/zeroshot_prompt_sets.png` from every metrics.json present,
so the chart compares datasets evaluated in separate runs too.

`auto` scores every concrete set on the validation split and uses the best on test: the
one prompt-set result that was not chosen by looking at the test labels.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from clip_utils.runtime import distributed

from clip_utils import prompts
from clip_utils.data import canonical_name, dataset_spec, results_name
from clip_utils.results.evaluation import figure_paths, save_evaluation
from clip_utils.model.heads import ClipClassifier, zeroshot_head
from clip_utils.lab import Lab
from clip_utils.figures.predictions import plot_prompt_comparison
from clip_utils.runtime.files import read_json
from clip_utils.results.layout import check_results_folder, dataset_folders, figures_dir, method_dir

METHOD = "zeroshot"
# How tables list the prompt sets of any dataset (each dataset has some of them).
SET_ORDER = ("default", "domain", "diverse", "domain_ensemble", "clip", prompts.WAFFLE, prompts.DESCRIPTIONS)

COMPARISON_FIGURE = "zeroshot_prompt_sets.png"


def output_dir(results_dir: str | Path, dataset: str, prompt_set: str, split: str = "test") -> Path:
    """Where one prompt set's results go: `<results>/<dataset>/zeroshot/<set>/`.

    A validation-split run goes one level deeper (`.../<set>/val/`) so that it never
    overwrites the test results the contract, the tables and the charts refer to.

    Args:
        results_dir: the results root.
        dataset: the dataset.
        prompt_set: the prompt set.
        split: the evaluated split.
    """
    folder = method_dir(results_dir, dataset, "zeroshot", prompt_set)
    return folder if split == "test" else folder / split


def figures(results_dir: str | Path, dataset: str, prompt_set: str, split: str = "test") -> dict[str, Path]:
    """The confusion and sample figures of one dataset and prompt set: `{"confusion", "samples"}`.

    Args:
        results_dir: the results root.
        dataset: the dataset.
        prompt_set: the prompt set.
        split: the evaluated split.
    """
    return figure_paths(results_dir, _figure_prefix(dataset, prompt_set, split))


def _figure_prefix(dataset: str, prompt_set: str, split: str) -> str:
    return f"{results_name(dataset)}_zeroshot_{prompt_set}" + ("" if split == "test" else f"_{split}")


def predict(features: torch.Tensor, classifier: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Zero-shot logits: scaled cosine similarity of image and class embeddings.

    Args:
        features: `(N, D)` L2-normalised image embeddings.
        classifier: `(D, C)` L2-normalised class embeddings (`build_text_classifier`).
        logit_scale: CLIP's temperature, `model.logit_scale.exp()` (100 for OpenAI CLIP).

    Returns:
        `(N, C)` float32 logits; their softmax is CLIP's class probability.
    """
    if features.shape[1] != classifier.shape[0]:
        raise ValueError(f"image embeddings of size {features.shape[1]} do not match text embeddings "
                         f"of size {classifier.shape[0]}: were they made by the same model?")
    return logit_scale * (features.float() @ classifier.float())


def select_prompt_set(
    features: torch.Tensor, labels: torch.Tensor, classifiers: Mapping[str, torch.Tensor], scale: float
) -> tuple[str, dict[str, float]]:
    """The prompt set with the best top-1 on a (validation) split.

    Args:
        features: `(N, D)` image embeddings of the selection split.
        labels: `(N,)` their labels.
        classifiers: `{set name: (D, C) classifier}`, in preference order for ties.
        scale: the logit scale.

    Returns:
        `(best name, {name: top-1 accuracy})`.
    """
    if not classifiers:
        raise ValueError("no prompt sets to choose from")
    scores = {name: float((predict(features, w, scale).argmax(1) == labels).float().mean())
              for name, w in classifiers.items()}
    return max(scores, key=scores.get), scores  # max keeps the first of equal scores


def choose_on_val(lab: Lab, dataset: str) -> tuple[str, dict[str, float]]:
    """`auto`: every prompt set of `dataset` scored on the validation split's (cached) image
    features with the lab's text classifiers; returns `select_prompt_set`'s answer.

    Args:
        lab: the run context.
        dataset: the dataset.
    """
    val = lab.features(dataset, "val")
    classifiers = {name: lab.text_classifier(dataset, name) for name in lab.prompt_sets(dataset)}
    return select_prompt_set(val.embeddings, val.labels, classifiers, lab.clip().logit_scale)


def run_zeroshot(
    lab: Lab, dataset: str, prompt_sets: list[str] | str = prompts.ALL, split: str = "test"
) -> dict[str, dict]:
    """Evaluate zero-shot CLIP on a split under prompt sets and write their results.

    Args:
        lab: the run context (`clip_utils.lab.Lab`): model, data and results folders, device.
        dataset: `flowers102` or `cub200`.
        prompt_sets: set names, `all` or `auto` among them (see `prompts.resolve`).
        split: `test`, or `val` (written to `output_dir(..., split="val")`; `auto` then
            selects on the split it is scored on).

    Returns:
        `{set name: metrics.json content}`. `seconds` is the set's own time (text encoding
        and scoring); `feature_seconds` and `peak_vram_mb` are those of the shared image
        encoding, also when this run read it from the cache (`features_from_cache`);
        `auto` adds `selected_set` and `val_top1` (every set's validation top-1).
    """
    dataset = canonical_name(dataset)
    check_results_folder(lab.results_dir, dataset)
    names = prompts.resolve(prompt_sets, dataset_spec(dataset), lab.domain, descriptions=lab.descriptions is not None)
    sets = lab.prompt_sets(dataset)  # before any image is encoded: a bad descriptions file stops here
    feats = lab.features(dataset, split)
    # The image side is zero-shot's GPU work (weights plus a batch of activations); the
    # text side is a few thousand short prompts. The encoding's peak is the method's memory
    # cost, recorded with the feature cache so a run that reads the cache reports it too.
    encoding = feats.encoding
    scale = lab.clip().logit_scale
    classes = lab.class_names(dataset)
    results = {}
    for name in names:
        start = time.perf_counter()
        extra: dict = {}
        chosen = name
        if name == prompts.AUTO:
            chosen, val_top1 = choose_on_val(lab, dataset)
            extra = {"selected_set": chosen, "selected_on": "val", "val_top1": val_top1}
        logits = predict(feats.embeddings, lab.text_classifier(dataset, chosen), scale)
        info = {
            "dataset": dataset, "split": split, "method": METHOD, "model": str(lab.model),
            "class_names_source": lab.class_naming,
            "prompt_set": name, "templates": sets[chosen], **extra, "logit_scale": scale,
            "seconds": time.perf_counter() - start, "feature_seconds": encoding.get("seconds"),
            "features_from_cache": encoding.get("from_cache"), "peak_vram_mb": encoding.get("peak_vram_mb"),
            "peak_reserved_mb": encoding.get("peak_reserved_mb"), "world_size": distributed.world_size(),
        }
        # Under torchrun: rank 0 writes, the others wait and get the same metrics.
        results[name] = distributed.on_main(save_evaluation,
            output_dir(lab.results_dir, dataset, name, split),
            logits=logits, labels=feats.labels, paths=feats.paths, class_names=classes, info=info,
            figure_prefix=_figure_prefix(dataset, name, split), results_dir=lab.results_dir,
        )
    distributed.on_main(lambda: plot_prompt_comparison(prompt_table(lab.results_dir, lab.model),
                                                       path=figures_dir(lab.results_dir) / COMPARISON_FIGURE))
    return results


def load_classifier(lab: Lab, dataset: str, prompt_set: str = prompts.AUTO) -> ClipClassifier:
    """Zero-shot CLIP as a `ClipClassifier` (the lab's model, a prompt set's text classifier as head).

    Args:
        lab: the run context; its text classifiers are built once and shared with `run_zeroshot`.
        dataset: whose classes.
        prompt_set: a set of `prompts.prompt_sets(dataset)`, or `auto` (chosen on validation).
    """
    dataset = canonical_name(dataset)
    sets = lab.prompt_sets(dataset)
    if prompt_set == prompts.AUTO:
        prompt_set = choose_on_val(lab, dataset)[0]
    elif prompt_set not in sets:
        raise ValueError(f"unknown prompt set {prompt_set!r}: choose from {', '.join([*sets, prompts.AUTO])}")
    clip = lab.clip()
    head = zeroshot_head(lab.text_classifier(dataset, prompt_set), clip.logit_scale).to(lab.device)  # float32
    return ClipClassifier(clip.model.vision_model, clip.model.visual_projection, head).eval()


def saved_results(results_dir: str | Path, model: str | None = None) -> dict[str, dict[str, dict]]:
    """Every zero-shot metrics.json under `results_dir`: `{dataset folder: {prompt_set: metrics}}`.

    Args:
        results_dir: the results root.
        model: keep only the runs of this model (None: every run, whatever its model).
    """
    out: dict[str, dict[str, dict]] = {}
    for folder in dataset_folders(results_dir):
        dataset, folder = folder.name, folder / "zeroshot"
        known = [*SET_ORDER, prompts.AUTO]
        found = sorted(folder.glob("*/metrics.json"), key=lambda p: (
            known.index(p.parent.name) if p.parent.name in known else len(known), p.parent.name))
        runs = {p.parent.name: read_json(p) for p in found}
        runs = {name: m for name, m in runs.items() if model is None or m.get("model") == model}
        if runs:
            out[dataset] = runs
    return out


def prompt_table(results_dir: str | Path, model: str | None = None) -> dict[str, dict[str, float]]:
    """Top-1 per dataset and prompt set from the saved results (input of the comparison chart).

    Args:
        results_dir: the results root.
        model: only this model's runs (None: all; several models then warn, see `results_table`).
    """
    saved = _one_model(saved_results(results_dir, model))
    return {ds: {name: m["top1"] for name, m in sets.items()} for ds, sets in saved.items()}


def _one_model(saved: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    models = sorted({str(m.get("model")) for sets in saved.values() for m in sets.values()})
    if len(models) > 1:
        warnings.warn(f"the saved zero-shot results come from {len(models)} models ({', '.join(models)}): "
                      f"keep each model in its own --results-dir (in Python: pass model= to keep one)", stacklevel=3)
    return saved


def results_table(results_dir: str | Path, model: str | None = None):
    """The saved zero-shot results as a pandas DataFrame, one row per dataset and prompt set.

    Args:
        results_dir: the results root.
        model: only this model's runs (None: every run; a `model` column appears, with a
            warning, when they come from several models).
    """
    import pandas as pd

    saved = _one_model(saved_results(results_dir, model))
    rows = [
        {"dataset": ds, "prompt_set": name, "templates": prompts.prompts_per_class(m["templates"]),
         "selected_set": m.get("selected_set", ""), "n": m["n"], "top1 %": 100 * m["top1"],
         "top5 %": 100 * m["top5"], "mean per class %": 100 * m["mean_per_class"], "model": m.get("model")}
        for ds, sets in saved.items() for name, m in sets.items()
    ]
    table = pd.DataFrame(rows)
    if not table.empty and table["model"].nunique() <= 1:
        table = table.drop(columns=["model"])
    return table.round(2)


# The set that stands for zero-shot in reports and comparisons: `auto` was chosen on the
# validation split; the others are fixed in advance. Never "the best on test", which would
# choose by looking at the test labels.
HEADLINE_ORDER = (prompts.AUTO, "domain", "default")


def headline(sets: Iterable[str]) -> str:
    """The prompt set to report for a dataset: `auto`, else `domain`, else `default`, else the first.

    Args:
        sets: the prompt sets run (e.g. the keys of `run_zeroshot`'s result).
    """
    names = list(sets)
    if not names:
        raise ValueError("no zero-shot results")
    return next((name for name in HEADLINE_ORDER if name in names), names[0])


def summarise(results: Mapping[str, Mapping[str, Mapping]]) -> dict:
    """The numbers worth keeping from `{dataset: run_zeroshot(...)}`, for task1_summary.json.

    Args:
        results: `{dataset: {set name: metrics}}`.
    """
    keep = ("n", "top1", "top5", "mean_per_class", "selected_set", "seconds")
    return {ds: {name: {k: m[k] for k in keep if k in m} | {"templates": prompts.prompts_per_class(m["templates"])}
                 for name, m in sets.items()} for ds, sets in results.items()}
