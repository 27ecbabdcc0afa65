"""A trained classifier as one folder that needs nothing from this repository: `export`.

    python -m clip_utils export --dataset cub200 --method lora --out cub-lora
    python -m clip_utils predict my_photo/bird.jpg --classifier cub-lora      # no dataset needed
    folder = export_classifier(lab, "cub200", "lora", "cub-lora")
    classifier, info = load_exported("cub-lora")                              # a ClipClassifier again

The folder is a Hugging Face checkpoint of the base model's family plus a head:

    config.json, model.safetensors      the model, LoRA merged into its weights (peft's
                                        `merge_and_unload`), loaded with the family's own class:
                                        `CLIPModel`, `SiglipModel` or `MetaClip2Model.from_pretrained(folder)`
    preprocessor_config.json, tokenizer files    its processor (`CLIPProcessor`, `SiglipProcessor`)
    head.safetensors                    `weight` (C x D) and `bias` (C): logits = head applied to
                                        the L2-normalised image embedding (CLIP, MetaCLIP 2: the
                                        projected pooled output; SigLIP: the pooled output)
    classes.json                        class names in label order, the family, the probability
                                        kind (`softmax`: the heads are trained with cross-entropy),
                                        and where the classifier came from
    README.md                           a plain transformers usage snippet (`USAGE`, the family's classes)

LoRA is merged in float32 on the CPU, whichever device trained it, so the saved weights are
the adapted weights `W + (alpha / r) B A` rounded once; the exported model in float32 gives
the unmerged model's logits to float tolerance. A text-adapted run (`lora --encoders text|both`)
has its text tower merged too: the exported text tower is the one the head's class embeddings
came from. For the linear probe the model is the base CLIP itself.

Writing is all or nothing: the folder is assembled beside `out` and swapped in. An existing
`out` is replaced only when it is an earlier export (it has `classes.json` marked by this
module) or empty; anything else is refused, so a typo cannot wipe a folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from clip_utils import __version__, registry
from clip_utils.app.photos import open_photos, top_classes
from clip_utils.config import TOP_K
from clip_utils.data import Dataset
from clip_utils.errors import InvalidValue, MissingFile, Refused, UserError
from clip_utils.lab import Lab
from clip_utils.model.backbones import Backbone
from clip_utils.model.clip import check_weights, load_clip
from clip_utils.model.heads import ClipClassifier, visual_projection
from clip_utils.registry import Method
from clip_utils.results.checkpoints import read_head, save_head
from clip_utils.results.layout import method_dir
from clip_utils.runtime.files import atomic_folder, read_json, regular_file
from clip_utils.runtime.progress import quiet_loading

INFO_FILE = "classes.json"
HEAD_FILE = "head.safetensors"
MARK = "clip-lab export"

USAGE = '''\
import json, torch
from PIL import Image
from safetensors.torch import load_file
from transformers import {model_class}, {processor_class}

folder = "{folder}"
model, processor = {model_class}.from_pretrained(folder).eval(), {processor_class}.from_pretrained(folder)
head, classes = load_file(f"{{folder}}/head.safetensors"), json.load(open(f"{{folder}}/classes.json"))["classes"]
pixels = processor(images=Image.open("photo.jpg").convert("RGB"), return_tensors="pt")["pixel_values"]
with torch.no_grad():
    embedding = {embedding}
    logits = torch.nn.functional.normalize(embedding, dim=-1) @ head["weight"].T + head["bias"]
print(classes[logits.argmax(-1).item()], f"{{logits.softmax(-1).max().item():.1%}}")
'''

# The image embedding the head takes, per family: the projected pooled output, or SigLIP's pooled output.
EMBEDDING = {
    True: "model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)",
    False: "model.vision_model(pixel_values=pixels).pooler_output",
}


def usage(backbone: Backbone, folder: str = ".", projected: bool = True) -> str:
    """The README's usage snippet for an exported folder of this family.

    Args:
        backbone: the base model's family (its model and processor classes).
        folder: the folder the snippet loads.
        projected: whether the model has an image projection (all but SigLIP).
    """
    return USAGE.format(folder=folder, model_class=backbone.model_class, processor_class=backbone.processor_class,
                        embedding=EMBEDDING[projected])


def exportable(method: str) -> Method:
    """The registered method called `method`, if it can be exported.

    Raises:
        ValueError: no such method, or one whose classifier is not a linear head on the image embedding.
    """
    m = registry.get(method)
    if m.export is None:
        can = ", ".join(x.command for x in registry.methods() if x.export is not None)
        raise InvalidValue(f"{m.label} cannot be exported (its classifier is not a linear head on the image "
                         f"embedding): export takes {can}")
    return m


def _check_target(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise Refused(f"{out} exists and is not a folder: choose another --out")
    marked = out / INFO_FILE
    try:
        ours = marked.is_file() and json.loads(marked.read_text()).get("exported_by", "").startswith(MARK)
    except (ValueError, AttributeError):
        ours = False
    if any(out.iterdir()) and not ours:
        raise Refused(f"{out} exists and is not an exported classifier: choose another --out, or remove it")


def export_classifier(lab: Lab, dataset: Dataset | str, method: str, out: str | Path) -> Path:
    """Write a trained classifier (model, processor, head, class names, README) to one folder.

    Args:
        lab: the run context (base model, results folder with the trained run).
        dataset: the dataset the classifier was trained on (a name is resolved by the lab).
        method: `probe` (`linear_probe`) or `lora`.
        out: the folder to write (replaced when it is an earlier export).

    Returns:
        The folder.

    Raises:
        FileNotFoundError: the method was not trained for this dataset yet.
        CheckpointError: its checkpoint is damaged or made for something else.
        FileExistsError: `out` is something other than an earlier export.
    """
    m = exportable(method)
    dataset, out = lab.resolve(dataset), Path(out).expanduser()
    _check_target(out)
    clip, head, meta, adapted = m.export(lab, dataset)
    metrics_file = method_dir(lab.results_dir, dataset, m.name) / "metrics.json"
    metrics = read_json(metrics_file) if metrics_file.is_file() else {}
    projected = visual_projection(clip.model) is not None
    embedding = "visual_projection(vision_model(pixel_values).pooler_output)" if projected else \
        "vision_model(pixel_values).pooler_output"
    info = {
        "exported_by": f"{MARK} {__version__}", "classes": list(dataset.class_names),
        "original_names": list(dataset.original_names), "dataset": dataset.name, **dataset.record(),
        "method": m.name,
        "base_model": lab.model, "encoders": adapted,
        "backbone": clip.backbone.name, "model_class": clip.backbone.model_class,
        "processor_class": clip.backbone.processor_class,
        "epoch": meta.epoch, "test_top1": metrics.get("top1"),
        "logits": f"normalize({embedding}) @ weight.T + bias",
        # The exported heads are trained with cross-entropy: a softmax over classes, whatever the family.
        "probabilities": "softmax",
    }
    with atomic_folder(out) as tmp:
        with quiet_loading():  # transformers' `Writing model shards` bar, for one shard
            clip.model.save_pretrained(tmp)
        clip.processor.save_pretrained(tmp)
        save_head(tmp / HEAD_FILE, head, meta)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
        (tmp / "README.md").write_text(_readme(info, usage(clip.backbone, ".", projected)))
    return out


def _readme(info: dict, snippet: str) -> str:
    adapted = {"vision": "LoRA on the vision tower, merged", "text": "LoRA on the text tower, merged",
               "both": "LoRA on both towers, merged"}.get(info["encoders"] or "", "the base model, unchanged")
    top1 = f"{info['test_top1']:.2%}" if isinstance(info.get("test_top1"), float) else "not recorded"
    return (
        f"# {info['dataset']} classifier ({info['method']})\n\n"
        f"An image classifier for the {len(info['classes'])} classes of `{info['dataset']}`, exported by "
        f"clip-lab from `{info['base_model']}` ({info['model_class']}; {adapted}; best epoch {info['epoch']}; "
        f"test top-1 {top1}).\n"
        f"It needs `torch`, `transformers`, `safetensors` and `pillow`, nothing else:\n\n"
        f"```python\n{snippet}```\n\n"
        f"`classes.json` lists the class names in label order; `head.safetensors` holds `weight` (classes x "
        f"embedding) and `bias`, applied to the L2-normalised image embedding.\n"
    )


def load_exported(folder: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> tuple[ClipClassifier, dict]:
    """An exported folder as a `ClipClassifier` (eval mode), and its `classes.json`.

    Args:
        folder: what `export_classifier` wrote.
        device: where the model goes.
        dtype: the encoder's dtype (None: as saved, float32); the head stays float32.

    Raises:
        FileNotFoundError: not an exported classifier (no classes.json or head).
    """
    folder = Path(folder).expanduser()
    if not (folder / INFO_FILE).exists() or not (folder / HEAD_FILE).exists():
        raise MissingFile(f"{folder} is not an exported classifier (no {INFO_FILE} and {HEAD_FILE}): make "
                                f"one with `python -m clip_utils export --dataset DATASET --method probe|lora "
                                f"--out {folder}`")
    reexport = (f"re-export it with `python -m clip_utils export --dataset DATASET --method probe|lora "
                f"--out {folder}`")
    try:
        info = read_json(regular_file(folder / INFO_FILE, "exported classes file"))
        if not isinstance(info, dict):
            raise InvalidValue(f"{folder / INFO_FILE} holds a JSON {type(info).__name__}, not the classes object")
        head, _ = read_head(regular_file(folder / HEAD_FILE, "exported head file"))
        check_weights(folder)  # a model cut short, or saved as a pickle, is refused before any weight is read
    except UserError as err:  # each names the file; the way out of a damaged export is to export again
        raise InvalidValue(f"{str(err).partition(': delete')[0].partition('; delete')[0]}: {reexport}") from None
    if head.out_features != len(info.get("classes", ())):
        raise InvalidValue(f"{folder}: the head has {head.out_features} outputs but {INFO_FILE} names "
                         f"{len(info.get('classes', ()))} classes")
    clip = load_clip(folder, device, dtype=dtype)  # with the family's own class, read from config.json
    return ClipClassifier(*clip.backbone.image_parts(clip.model), head.float().to(device),
                          info.get("probabilities", "softmax")).eval(), info


@torch.inference_mode()
def predict_exported(folder: str | Path, photos: Sequence[str | Path], top_k: int = TOP_K,
                     device: str | None = None) -> list[dict]:
    """Top-k classes of each photo under an exported classifier (as `photos.predict_photos`).

    Args:
        folder: what `export_classifier` wrote.
        photos: image files (all opened before the model loads).
        top_k: classes per photo.
        device: `cuda`, `cpu`, ... (None: cuda when available).

    Returns:
        `{"photo", "probabilities", "top_k": [{"label", "name", "prob"}, ...]}` or `{"photo", "error"}`
        per photo (`probabilities`: `softmax`, the exported heads' kind).
    """
    if top_k < 1:
        raise InvalidValue(f"top_k must be at least 1, got {top_k}")
    lab = Lab(model=str(Path(folder).expanduser()), device=device)  # the folder's preprocessing and the device
    images, results = open_photos(photos)
    if images:
        classifier, info = load_exported(folder, lab.device)
        for i, image in images.items():
            results[i]["probabilities"] = classifier.probabilities
            results[i]["top_k"] = top_classes(lab, classifier, image, info["classes"], top_k)
    return results
