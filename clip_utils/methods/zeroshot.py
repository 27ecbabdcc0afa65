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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from clip_utils import config, prompts
from clip_utils.data import Dataset
from clip_utils.errors import InvalidValue
from clip_utils.figures.predictions import plot_prompt_comparison
from clip_utils.lab import Lab
from clip_utils.model.heads import ClipClassifier, zeroshot_head
from clip_utils.registry import Method, register
from clip_utils.results.evaluation import save_evaluation
from clip_utils.results.layout import check_results_folder, figures_dir

# The saved results' helpers, importable from here: Task1.ipynb reads zero-shot through this one module.
from clip_utils.results.prompt_sets import (  # noqa: F401
    COMPARISON_FIGURE,
    SET_ORDER,
    figure_prefix,
    figures,
    headline,
    output_dir,
    prompt_table,
    results_table,
    saved_results,
    summarise,
)
from clip_utils.runtime import distributed
from clip_utils.runtime.options import name_list

METHOD = "zeroshot"
def run_zeroshot(
    lab: Lab, dataset: Dataset | str, prompt_sets: list[str] | str = prompts.ALL, split: str = "test"
) -> dict[str, dict]:
    """Evaluate zero-shot CLIP on a split under prompt sets and write their results.

    Args:
        lab: the run context (`clip_utils.lab.Lab`): model, data and results folders, device.
        dataset: the dataset (a name is resolved by the lab: this is an entry point).
        prompt_sets: set names, `all` or `auto` among them (see `prompts.resolve`).
        split: `test`, or `val` (written to `output_dir(..., split="val")`; `auto` then
            selects on the split it is scored on).

    Returns:
        `{set name: metrics.json content}`. `seconds` is the set's own time (text encoding
        and scoring); `feature_seconds` and `peak_vram_mb` are those of the shared image
        encoding, also when this run read it from the cache (`features_from_cache`);
        `auto` adds `selected_set` and `val_top1` (every set's validation top-1).
    """
    dataset = lab.resolve(dataset)
    check_results_folder(lab.results_dir, dataset)
    names = prompts.resolve(prompt_sets, dataset.spec, lab.domain, descriptions=lab.descriptions is not None)
    sets = lab.prompt_sets(dataset)  # before any image is encoded: a bad descriptions file stops here
    feats = lab.features(dataset, split)
    # The image side is zero-shot's GPU work (weights plus a batch of activations); the
    # text side is a few thousand short prompts. The encoding's peak is the method's memory
    # cost, recorded with the feature cache so a run that reads the cache reports it too.
    encoding = feats.encoding
    scale, bias = lab.clip().logit_scale, lab.logit_bias
    classes = list(dataset.class_names)
    results = {}
    for name in names:
        start = time.perf_counter()
        extra: dict = {}
        chosen = name
        if name == prompts.AUTO:
            chosen, val_top1 = lab.choose_prompt_set(dataset)
            extra = {"selected_set": chosen, "selected_on": "val", "val_top1": val_top1}
        logits = prompts.zeroshot_logits(feats.embeddings, lab.text_classifier(dataset, chosen), scale, bias)
        info = {
            "dataset": dataset.name, **dataset.record(), "split": split, "method": METHOD, "model": str(lab.model),
            "class_names_source": lab.class_naming,
            "prompt_set": name, "templates": sets[chosen], **extra, "logit_scale": scale,
            "logit_bias": bias, "probabilities": lab.clip().backbone.probabilities,
            "seconds": time.perf_counter() - start, "feature_seconds": encoding.get("seconds"),
            "features_from_cache": encoding.get("from_cache"), "peak_vram_mb": encoding.get("peak_vram_mb"),
            "peak_reserved_mb": encoding.get("peak_reserved_mb"), "world_size": distributed.world_size(),
        }
        # Under torchrun: rank 0 writes, the others wait and get the same metrics.
        results[name] = distributed.on_main(save_evaluation,
            output_dir(lab.results_dir, dataset, name, split),
            logits=logits, labels=feats.labels, paths=feats.paths, class_names=classes, info=info,
            figure_prefix=figure_prefix(dataset, name, split), results_dir=lab.results_dir,
        )
    distributed.on_main(lambda: plot_prompt_comparison(prompt_table(lab.results_dir, lab.model),
                                                       path=figures_dir(lab.results_dir) / COMPARISON_FIGURE))
    return results


def load_classifier(lab: Lab, dataset: Dataset | str, prompt_set: str = prompts.AUTO) -> ClipClassifier:
    """Zero-shot CLIP as a `ClipClassifier` (the lab's model, a prompt set's text classifier as head).

    Args:
        lab: the run context; its text classifiers are built once and shared with `run_zeroshot`.
        dataset: whose classes (a name is resolved by the lab).
        prompt_set: a set of `prompts.prompt_sets(dataset)`, or `auto` (chosen on validation).
    """
    dataset = lab.resolve(dataset)
    sets = lab.prompt_sets(dataset)
    if prompt_set == prompts.AUTO:
        prompt_set = lab.choose_prompt_set(dataset)[0]
    elif prompt_set not in sets:
        raise InvalidValue(f"unknown prompt set {prompt_set!r}: choose from {', '.join([*sets, prompts.AUTO])}")
    clip = lab.clip()
    # The model's own logits (SigLIP's bias included), so its probabilities are the family's:
    # a softmax over classes for CLIP, a sigmoid per class for SigLIP.
    head = zeroshot_head(lab.text_classifier(dataset, prompt_set), clip.logit_scale, clip.logit_bias)
    vision, projection = clip.backbone.image_parts(clip.model)
    return ClipClassifier(vision, projection, head.to(lab.device), clip.backbone.probabilities).eval()  # head float32


# ---------------------------------------------------------------------------- the registered method

@dataclass(frozen=True)
class ZeroshotSettings:
    """What `zeroshot` evaluates: prompt sets (`all`, `auto` among them) on a split."""

    prompt_sets: tuple[str, ...] = (prompts.ALL,)
    split: str = "test"


def _add_arguments(parser) -> None:
    parser.add_argument("--prompts", type=name_list, default=[prompts.ALL],
                        help="comma list of prompt sets (default, domain, diverse, domain_ensemble, clip = CLIP's "
                             "own where published, waffle = WaffleCLIP's random descriptors, descriptions = the "
                             "--descriptions file, auto = best of them on the validation split) or 'all' "
                             "(default: all)")
    parser.add_argument("--eval-split", dest="eval_split", default="test", choices=("val", "test"),
                        help="the split to evaluate (default: test)")


def _settings(args) -> ZeroshotSettings:
    return ZeroshotSettings(tuple(getattr(args, "prompts", None) or (prompts.ALL,)), getattr(args, "eval_split", "test"))


def _run(lab: Lab, dataset: Dataset | str, settings: ZeroshotSettings, *, shots: int | None = None, seed: int | None = None,
         resume: bool = False, callbacks: Sequence = ()) -> dict[str, dict]:
    return run_zeroshot(lab, dataset, list(settings.prompt_sets), split=settings.split)


def _print_result(results: Mapping[str, Mapping], lab: Lab, args) -> None:
    print(f"{'prompt set':<16} {'top-1':>7} {'top-5':>7} {'per-class':>9}  results")
    for name, m in results.items():
        chosen = f" (chose {m['selected_set']} on val)" if "selected_set" in m else ""
        print(f"{name:<16} {m['top1']:7.2%} {m['top5']:7.2%} {m['mean_per_class']:9.2%}  "
              f"{output_dir(lab.results_dir, m['dataset_folder'], name, m['split'])}{chosen}")


def _load_classifier(lab: Lab, dataset: Dataset | str, *, shots: int | None = None, seed: int | None = None,
                     prompt_set: str = prompts.AUTO) -> ClipClassifier:
    return load_classifier(lab, dataset, prompt_set)


register(Method(
    name=METHOD, label="zero-shot", command="zeroshot", folder="zeroshot", order=0,
    description="zero-shot evaluation under prompt sets",
    trained=False, uses_text_classifier=True, new_classes="text", reference=True, distributed=True,
    batch_size=config.INFERENCE_BATCH_SIZE, add_arguments=_add_arguments, settings=_settings, run=_run,
    load_classifier=_load_classifier, has_checkpoint=lambda folder: True, print_result=_print_result,
))
