"""LoRA fine-tuning of CLIP's vision encoder with peft, on the shared training loop.

    metrics = run_lora(lab, "flowers102")                     # config.LORA, config.LORA_SETTINGS
    metrics = run_lora(lab, "flowers102", cfg, LoraSettings(rank=4, alpha=8), resume=True)
    metrics = run_lora(lab, "flowers102", replace(cfg, seed=1), shots=4)   # lora/shots_4/seed_1/
    classifier = load_classifier(lab, "flowers102")           # the best epoch, for predictions

A fresh CLIP is loaded on the CPU (the lab's model is fp16 on CUDA and shared with
zero-shot and the probe, so it must not receive adapters), and only its vision side moves
to the GPU: frozen base weights in bf16 on CUDA (fp32 on the CPU), adapters and head fp32.
The lab's model is then freed, so training memory, and its reported peak, hold LoRA's model
alone.

The head (LP-FT). It starts from the linear probe trained on the same images (same
dataset, model, class list, shots and seed: `runs.probe_head`) when that run has finished,
else from the lab's `domain` text classifier; metrics.json says which (`head_init`). It
trains in the probe's units (`heads.StandardizedHead` with the mean and scale of the
frozen encoder's cached training embeddings, `heads.head_units`), in its own parameter
group at `cfg.head_lr` while the adapters train at `cfg.lr`: in raw units, at the adapters'
rate, a head barely moves, and LoRA, which contains the probe, would end below it. The
checkpoint holds the equivalent raw-unit head, like the probe's. peft wraps
only `model.vision_model`, so the targets (`q_proj`, `v_proj` by default) are adapted in
the vision encoder alone. Training runs in bf16 autocast on CUDA (the head in fp32), on
augmented images decoded where the model runs (`inputs.iter_labelled_batches`: nvJPEG
and GPU resizing on CUDA). The best epoch's adapter is saved with `save_pretrained` into
`results/<dataset>/lora/adapter/` beside `head.safetensors`, and test evaluation reloads
both through `load_classifier`, exactly as `predict --method lora` does.

Trainable parameters. peft adds `A` (r x d_in) and `B` (d_out x r) to each adapted linear
layer, so each contributes `r * (d_in + d_out)`; the head adds `D * C + C`. For ViT-L/14
with r=8 on q_proj and v_proj: 24 layers x 2 x 8 x (1024 + 1024) = 786,432, plus the head.
`lora_trainable_params` computes this from the config, and `run_lora` checks it against the
model's actual parameters.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import config, distributed, fewshot
from .checkpoints import (
    ADAPTER_DIR,
    HEAD_FILE,
    CheckpointError,
    check_adapter,
    check_head,
    head_info,
    missing_checkpoint,
    read_head,
    save_adapter,
    save_head,
)
from .config import LoraSettings, TrainConfig
from .data import canonical_name, results_name
from .evaluation import save_evaluation
from .heads import ClipClassifier, StandardizedHead, count_parameters, head_units
from .inputs import iter_labelled_batches
from .lab import Lab, inference_dtype
from .models import load_clip
from .preprocess import Preprocess
from .runs import RunData, freeing_memory_on_failure, probe_head, resolved, run_data, run_info, zeroshot_init_head
from .train import EpochCallback, FitResult, TrainJob, epoch_seed, fit, predict
from .vram import VramProbe

METHOD = "lora"


def linear_shapes(vision_config) -> dict[str, tuple[int, int]]:
    """`(d_in, d_out)` of each linear layer name in one CLIP vision encoder layer.

    Args:
        vision_config: a `CLIPVisionConfig` (hidden_size, intermediate_size).
    """
    hidden, mlp = vision_config.hidden_size, vision_config.intermediate_size
    return {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
            "out_proj": (hidden, hidden), "fc1": (hidden, mlp), "fc2": (mlp, hidden)}


@contextlib.contextmanager
def quiet_peft():
    """Silence a FutureWarning peft triggers on every adapter it builds or loads.

    peft 0.21 probes `model.is_gradient_checkpointing`, which transformers 5 deprecates;
    the warning is about peft's code, not the user's, and there is nothing to act on.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def lora_trainable_params(vision_config, settings: LoraSettings, n_classes: int, embed_dim: int) -> int:
    """Exact trainable parameter count of a LoRA run: adapters plus head.

    Each adapted layer gains `A` (r x d_in) and `B` (d_out x r): `r * (d_in + d_out)`.

    Args:
        vision_config: the `CLIPVisionConfig`.
        settings: rank and targets.
        n_classes: head outputs.
        embed_dim: head inputs (CLIP's projection dimension).
    """
    shapes = linear_shapes(vision_config)
    per_layer = sum(settings.rank * sum(shapes[t]) for t in settings.targets)
    return vision_config.num_hidden_layers * per_layer + embed_dim * n_classes + n_classes


def add_lora(vision: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap a CLIP vision encoder with peft LoRA adapters (base weights frozen).

    Args:
        vision: `CLIPModel.vision_model`.
        settings: rank, alpha, dropout, targets, gradient checkpointing.
    """
    from peft import LoraConfig, get_peft_model

    if settings.grad_checkpointing:
        # Non-reentrant checkpointing lets gradients reach the adapters even though the frozen
        # embeddings' outputs do not require grad (the reentrant variant would drop them).
        enable = getattr(vision, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            vision.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.targets), bias="none")
    with quiet_peft():
        return get_peft_model(vision, config)


@dataclass
class _Trained:
    result: FitResult
    trainable: int
    total: int
    pre: Preprocess


def _train(lab: Lab, dataset: str, data: RunData, splits: dict, head: StandardizedHead, cfg: TrainConfig,
           lora: LoraSettings, resume: bool, callbacks: Sequence[EpochCallback], head_init: str) -> _Trained:
    """Build the LoRA classifier on `head` and run the shared loop; the training copy is freed
    on return."""
    device = torch.device(lab.device)
    out = data.folder
    class_names = lab.label_map(dataset)
    # Loaded on the CPU, and only the vision side moves to the GPU: the text tower (a quarter
    # of ViT-L/14's CLIP) has no part in training (the head comes from the lab's classifier).
    # peft's mixed-precision recipe: frozen base weights in bf16 on CUDA (half the memory, no
    # fp32 -> bf16 re-cast under autocast at every step), adapters upcast to fp32 by peft
    # (`autocast_adapter_dtype`), the head fp32. The CPU keeps fp32: bf16 is slow there.
    base_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    clip = load_clip(lab.model, "cpu", dtype=base_dtype)
    model = clip.model
    model.requires_grad_(False)
    model.vision_model.to(device)
    model.visual_projection.to(device)
    # peft draws the adapters' A matrices from torch's global generator: seeded, so a run
    # does not depend on what the process drew before (a notebook's earlier cells).
    torch.manual_seed(epoch_seed(cfg.seed or 0, 0))
    vision = add_lora(model.vision_model, lora)
    classifier = ClipClassifier(vision, model.visual_projection, head)  # the text tower is left behind
    expected = lora_trainable_params(model.config.vision_config, lora, len(class_names), head.in_features)
    trainable, total = count_parameters(classifier)
    if trainable != expected:  # the count in metrics.json must be exact
        raise RuntimeError(f"LoRA trainable parameters: model has {trainable}, config gives {expected}")
    pre = clip.preprocess
    info = dict(dataset=dataset, method=METHOD, model=lab.model, class_names=class_names, embed_dim=head.in_features)

    def batches(split: str, order: torch.Tensor | None = None, augment: bool = False,
                desc: str | None = None) -> Iterable:
        ds = splits[split]
        return iter_labelled_batches([p for p, _ in ds.samples], torch.tensor(ds.targets), pre, device,
                                     base_dtype, cfg.batch_size, order=order, augment=augment,
                                     num_workers=lab.num_workers, desc=desc)

    def save_best(epoch: int) -> None:
        meta = head_info(**info, epoch=epoch)
        save_adapter(out / ADAPTER_DIR, vision, meta)
        save_head(out / HEAD_FILE, head.folded(), meta)

    head_params = list(head.parameters())
    adapters = [p for p in classifier.parameters() if p.requires_grad and all(p is not h for h in head_params)]
    n_train = len(splits["train"])
    # Under torchrun each rank decodes and trains on its share of every global batch; index
    # n_train is the padding slot of those shares (distributed.rank_order).
    train_paths, train_labels = distributed.padded([p for p, _ in splits["train"].samples],
                                                   torch.tensor(splits["train"].targets))

    def train_batches(epoch: int, generator: torch.Generator) -> Iterable:
        order, per_rank = distributed.rank_order(torch.randperm(n_train, generator=generator), cfg.batch_size)
        return iter_labelled_batches(train_paths, train_labels, pre, device, base_dtype, per_rank, order=order,
                                     augment=cfg.augment, num_workers=lab.num_workers)

    job = TrainJob(
        name=f"{dataset} LoRA", model=classifier,
        train_batches=train_batches,
        val_batches=lambda: batches("val", desc=f"validating {dataset} LoRA"),
        steps_per_epoch=math.ceil(n_train / cfg.batch_size), save_best=save_best,
        checkpoints=(HEAD_FILE, ADAPTER_DIR), out_dir=out, device=device, batch_size=cfg.batch_size,
        oom_hint=" or add --grad-checkpointing (LoraSettings(grad_checkpointing=True))",
        fingerprint={"dataset": dataset, "model": lab.model, "method": METHOD, "class_naming": lab.class_naming,
                     "domain": lab.domain, "n_train": n_train, "shots": data.shots, "head_init": head_init,
                     "head_units": "standard x 768/D",
                     "sample": fewshot.sample_digest([p for s in ("train", "val") for p, _ in splits[s].samples]),
                     **{f"lora_{k}": v for k, v in asdict(lora).items() if k != "grad_checkpointing"}},
        # The adapters first (the curves' lr is theirs), then the head at its own rate.
        param_groups=[{"params": adapters}, {"params": head_params, "lr": cfg.head_lr or cfg.lr}],
    )
    return _Trained(fit(job, cfg, resume=resume, callbacks=callbacks), trainable, total, pre)


def _probe_head_on_cpu(lab: Lab, dataset: str, data: RunData) -> nn.Linear | None:
    head = probe_head(lab, dataset, data)
    return None if head is None else head.cpu()


def run_lora(lab: Lab, dataset: str, cfg: TrainConfig = config.LORA, lora: LoraSettings = config.LORA_SETTINGS,
             resume: bool = False, callbacks: Sequence[EpochCallback] = (), *, shots: int | None = None) -> dict:
    """Fine-tune the vision encoder with LoRA, evaluate the best epoch on test, save everything.

    Writes `results/<dataset>/lora/` (a few-shot run: `.../shots_<K>/seed_<S>/`, with
    samples.json): metrics.json, predictions.csv, curves.json, head.safetensors, adapter/
    (peft), classification_report.txt, resume.pt, and the test figures (a few-shot run's in
    its own `figures/`).

    Args:
        lab: the run context (model, data, results folder, device, seed).
        dataset: `flowers102` or `cub200`.
        cfg: hyper-parameters (default: `config.LORA`, as the CLI and Task2.ipynb;
            `augment=False` trains on centre crops; `head_lr` is the head's rate). `cfg.seed`
            (else the lab's) also draws a few-shot sample.
        lora: adapter settings (default: `config.LORA_SETTINGS`).
        resume: continue an interrupted run from its last completed epoch.
        callbacks: called as `callback(epoch, curve_entry)` after each epoch.
        shots: train on this many images per class, validate on min(shots, 4) per class
            (None: every image). The head starts from the probe of the same shots and seed.

    Returns:
        The metrics.json content (with `shots`, `seed`, `head_init`, `n_train`, `n_val`).
    """
    start = time.perf_counter()
    dataset = canonical_name(dataset)
    fewshot.check_shots(shots)
    cfg = resolved(cfg, lab)
    device = torch.device(lab.device)
    data = run_data(lab, dataset, METHOD, shots, cfg.seed)
    out = data.folder
    splits = {s: data.split(lab.dataset(dataset, s), s) for s in ("train", "val", "test")}
    class_names = lab.class_names(dataset)
    # The probe's head is in the results folder: rank 0 reads it and sends it (on the CPU) to
    # every rank, so all ranks build the same head and agree on head_init.
    start_head = distributed.on_main(_probe_head_on_cpu, lab, dataset, data)
    if start_head is not None:
        start_head = start_head.to(device)
    head_init = "linear_probe" if start_head is not None else "zeroshot"
    if start_head is None:
        start_head = zeroshot_init_head(lab, dataset)  # the zero-shot start, from the lab's model
    # The probe's units: the frozen encoder's training embeddings (cached; the probe's own).
    mean, scale = head_units(lab.features(dataset, "train").subset(data.train).embeddings.to(device))
    head = StandardizedHead(start_head, mean, scale)
    # Then the lab's inference model (fp16 ViT-L/14 on CUDA) is not needed: free it, so LoRA
    # has that memory and its peak is its own.
    lab.unload()
    with VramProbe(device, label=f"{dataset} LoRA") as vram:
        trained = freeing_memory_on_failure(_train, lab, dataset, data, splits, head, cfg, lora, resume, callbacks,
                                            head_init)
    result, trainable, total, pre = trained.result, trained.trainable, trained.total, trained.pre

    lora_config = {"lora_" + k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(lora).items()}
    extra = {"head_init": head_init, "n_train": len(splits["train"]), "n_val": len(splits["val"])}

    def evaluate() -> dict:  # on rank 0 alone: it reads the checkpoint and writes the results
        best = load_classifier(lab, dataset, shots, cfg.seed)
        dtype = best.visual_projection.weight.dtype
        test = splits["test"]
        test_batches = iter_labelled_batches([p for p, _ in test.samples], torch.tensor(test.targets), pre, device,
                                             dtype, cfg.batch_size, num_workers=lab.num_workers,
                                             desc=f"testing {dataset} LoRA")
        # The reloaded classifier is already in the inference dtype (fp16 on CUDA): no autocast,
        # which would recast its fp16 weights to bf16 and lose precision.
        logits, labels = predict(best, test_batches, device, autocast=False)
        run = run_info(lab, dataset, METHOD, cfg, result, trainable=trainable, total=total,
                       peak_vram_mb=vram.peak_allocated_mb, peak_reserved_mb=vram.peak_reserved_mb,
                       seconds=time.perf_counter() - start, extra_config=lora_config, data=data)
        # A few-shot run keeps its figures in its own folder: results/figures stays one set per method.
        return save_evaluation(out, logits=logits, labels=labels, paths=[p for p, _ in test.samples],
                               class_names=class_names, info=run | extra,
                               figure_prefix=f"{results_name(dataset)}_{METHOD}",
                               results_dir=lab.results_dir if shots is None else out)

    return distributed.on_main(evaluate)


def load_classifier(lab: Lab, dataset: str, shots: int | None = None, seed: int | None = None) -> ClipClassifier:
    """The trained LoRA classifier of a dataset, ready for prediction: a `ClipClassifier` in eval mode.

    A fresh copy of the vision encoder (in the lab's inference dtype) gets the saved adapter:
    attaching it to the lab's shared model would change zero-shot predictions made later in
    the same process.

    Args:
        lab: the run context (model, results folder, device).
        dataset: dataset name.
        shots: the few-shot run's images per class (None: the full-data run).
        seed: the few-shot run's seed (None: the lab's).

    Raises:
        FileNotFoundError: not trained yet (the message names the command to run).
        CheckpointError: damaged, or trained for another dataset, class list or model.
    """
    from peft import PeftModel

    dataset = canonical_name(dataset)
    seed = lab.seed if seed is None else seed
    folder = fewshot.run_dir(lab.results_dir, dataset, METHOD, shots, seed)
    paths = {"head": folder / HEAD_FILE, "adapter": folder / ADAPTER_DIR}
    if not paths["head"].is_file():
        raise missing_checkpoint(paths["head"], dataset, METHOD, shots, seed)
    if not (paths["adapter"] / "adapter_config.json").is_file():
        raise missing_checkpoint(paths["adapter"], dataset, METHOD, shots, seed)
    head, info = read_head(paths["head"])
    clip = load_clip(lab.model, lab.device, dtype=inference_dtype(lab.device))
    check_head(info, head_info(dataset=dataset, method=METHOD, model=lab.model, class_names=lab.label_map(dataset),
                               embed_dim=clip.embed_dim), paths["head"])
    check_adapter(paths["adapter"], info)
    try:
        with quiet_peft():
            vision = PeftModel.from_pretrained(clip.model.vision_model, str(paths["adapter"])).to(lab.device)
    except Exception as err:  # a cut-short or edited adapter file: peft and safetensors raise many types
        raise CheckpointError(
            f"the LoRA adapter in {paths['adapter']} is damaged ({str(err).splitlines()[0]}): delete it and retrain "
            f"with `python -m clip_utils lora --dataset {dataset}`"
        ) from err
    # The head stays float32 beside an fp16 encoder: ClipClassifier casts the embedding up.
    return ClipClassifier(vision, clip.model.visual_projection, head.float().to(lab.device)).eval()
