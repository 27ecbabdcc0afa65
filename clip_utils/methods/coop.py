"""CoOp: Context Optimization, learned prompt context in front of every class name.

Paper: K. Zhou, J. Yang, C. C. Loy, Z. Liu, "Learning to Prompt for Vision-Language Models",
IJCV 2022 (arXiv:2109.01134). Published code: https://github.com/KaiyangZhou/CoOp
(`trainers/coop.py`, configs `configs/trainers/CoOp/rn50_ep50.yaml`, `..._ep100`, `..._ep200`,
runs `scripts/coop/main.sh`), on Dassl.

Model (the published unified context, class token at the end):

    prompt_c = [start] v_1 ... v_M  <tokens of class name c> . [end]    (word embeddings)
    t_c = normalize(TextEncoder(prompt_c))        the FROZEN text tower, from embeddings
    logits(f) = s * f @ [t_1 ... t_C]'            f: the frozen, cached, L2-normalised image embedding

The M context vectors `v` (shape `(M, W)`, W the text tower's width) are shared by every
class and are the only thing learned: they enter the text tower through the family's
`Backbone.text_from_embeddings` hook, and their gradient is taken with `torch.autograd.grad`
on them alone, so no other parameter ever gets a `.grad`. Initialisation: N(0, 0.02^2)
(`CTX_STD`), M = `N_CTX` = 16; or `ctx_init="a photo of a"`: the phrase's own token
embeddings, M = its token count (the paper's M=4 variant on OpenAI CLIP's tokenizer), so that
before any step the classifier is exactly zero-shot CLIP with the template "a photo of a {}.".

Schedule (module constants; the published configs plus Dassl's defaults): SGD lr `LR` = 0.002,
momentum 0.9, weight decay 5e-4, batch `BATCH_SIZE` = 32; the learning rate of epoch e is
`WARMUP_LR` = 1e-5 for e < `WARMUP_EPOCHS` = 1, then `0.5 * LR * (1 + cos(pi * (e - 1) / E))`
(Dassl's constant warm-up before a cosine over E epochs, stepped per epoch). E depends on the
shots as `scripts/coop/main.sh` is run in the README: 50 epochs at 1 shot, 100 at 2 and 4, 200
at 8 and 16 (`epochs_for`; more than 16 shots and full data: 200). Batches follow Dassl's
training loader: a random permutation per epoch, `N // 32` full batches (the remainder
dropped) when N >= 32, else one batch of all N. The text features of every class are computed
once per step, in one batched pass of the text tower; on CUDA under bf16 autocast.

Model selection: the LAST epoch, as published (Dassl `TEST.FINAL_MODEL = "last_step"`; the
evaluation scripts load the final epoch). `select="val"` (a `fit` argument, not a CLI option)
keeps the epoch of best validation accuracy instead.

What is saved: `CoOpHead`, the final normalised class text features `(C, D)` (times the logit
scale in `linear_head()`, so `export` and `predict` need no text tower), plus the learned
context `(M, W)` for reuse: `classifier_for_names(lab, context, names)` builds the classifier
for any class names (the base-to-new protocol), which is why `new_classes` is "text".

Departures from the published code:
- Cached, L2-normalised image features of the un-augmented images (the image side is
  frozen, so only the augmentation is lost): the published loader draws a fresh
  random-resized crop and flip of each support image every step.
- Text tower in fp32 weights (bf16 autocast on CUDA, plain fp32 on CPU); the published
  runs keep CLIP in fp16 (`TRAINER.COOP.PREC = "fp16"`).
- The class prompt is tokenised as the family's zero-shot prompts are (`Backbone.text_kwargs`:
  CLIP padded to the longest prompt, SigLIP to 64), with "X" placeholders for the context as
  the published `PromptLearner` does; where a tokenizer merges tokens across the context's end
  or splits "X" (the kit's tiny SigLIP and XLM-R tokenizers), the prompt is assembled from its
  parts instead ([start], M slots, the name's tokens, [end]), so it is then not token-for-token
  the zero-shot prompt; class names are the lab's (curated) names, not the
  published `classname.replace("_", " ")` of the dataset's folder names.
- Unified context only: no class-specific context (`CSC`) and no middle/front class token
  position (`CLASS_TOKEN_POSITION`), which the paper reports as variants.
- Validation accuracy is recorded per epoch (curves), never used unless `select="val"`.
- Private `torch.Generator(seed)` for the context's initialisation and the shuffles.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from clip_utils.data import Dataset
from clip_utils.errors import InvalidValue
from clip_utils.lab import Lab
from clip_utils.methods.cached import (
    CachedSettings,
    Option,
    export_linear,
    has_checkpoint,
    load_cached,
    recorded,
    renamed_scores,
    run_cached,
)
from clip_utils.methods.common import RunData
from clip_utils.model.feature_fit import FeatureData, Fitted, dassl_lr
from clip_utils.registry import Method, register
from clip_utils.runtime.options import add_sample_options, positive_float, positive_int

METHOD = "coop"

# Published schedule (configs/trainers/CoOp/rn50_ep{50,100,200}.yaml + Dassl defaults).
N_CTX = 16  # TRAINER.COOP.N_CTX in scripts/coop/main.sh's runs
CTX_STD = 0.02  # nn.init.normal_(ctx_vectors, std=0.02)
LR = 0.002
MOMENTUM = 0.9  # Dassl OPTIM.MOMENTUM
WEIGHT_DECAY = 5e-4  # Dassl OPTIM.WEIGHT_DECAY
BATCH_SIZE = 32
WARMUP_EPOCHS = 1
WARMUP_LR = 1e-5
EPOCHS_BY_SHOTS = ((1, 50), (4, 100), (16, 200))  # up to K shots: E epochs (1: 50, 2-4: 100, 8-16: 200)
FULL_EPOCHS = 200  # full data: the 16-shot schedule
PLACEHOLDER = "X"  # the published prompt_prefix "X X ... X"
# The prompt set of the zero-shot classifier a run records beside it (`zs_val_acc`): one template,
# "a photo of a {}.", the phrase `--ctx-init "a photo of a"` starts from.
REFERENCE_PROMPTS = "default"


def epochs_for(shots: int | None) -> int:
    """The published number of epochs for K shots (None: full data, the 16-shot schedule)."""
    if shots is None:
        return FULL_EPOCHS
    return next((e for k, e in EPOCHS_BY_SHOTS if shots <= k), FULL_EPOCHS)


def _assembled(tokenizer, class_names: Sequence[str], n_ctx: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`{"input_ids", "attention_mask", "lead"}` of `[start] <n_ctx slots> name. [end]`, padded as
    `kwargs` (the family's `text_kwargs`) pads, the name cut where the prompt would be too long."""
    probe = tokenizer("a", return_special_tokens_mask=True)
    first = probe["special_tokens_mask"].index(0)
    last = len(probe["special_tokens_mask"]) - probe["special_tokens_mask"][::-1].index(0)
    start, end, slot = probe["input_ids"][:first], probe["input_ids"][last:], probe["input_ids"][first]
    limit = int(kwargs["max_length"])
    rows = []
    for name in class_names:
        body = tokenizer(f"{name}.", add_special_tokens=False)["input_ids"]
        body = body[:max(0, limit - len(start) - n_ctx - len(end))]
        rows.append([*start, *([slot] * n_ctx), *body, *end])
    if len(start) + n_ctx + len(end) > limit:
        raise InvalidValue(f"coop: {n_ctx} context tokens do not fit the text tower's {limit} positions")
    length = limit if kwargs.get("padding") == "max_length" else max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "lead": len(start)}


class PromptText:
    """The frozen text tower fed class prompts with a learned context in front of the name.

    Holds the model, the word embeddings of every class prompt `(C, L, W)` (the context's
    positions to be replaced), their attention mask and pooling positions. No parameters of
    its own: `features(context)` is differentiable in `context` alone.

    Attributes:
        n_ctx: M, the context length.
        width: W, the word embedding width.
        init: `(M, W)` the phrase's word embeddings when built with `ctx_init`, else None.
    """

    def __init__(self, model, tokenizer, backbone, class_names: Sequence[str], *, n_ctx: int | None = None,
                 ctx_init: str | None = None, device: str | torch.device = "cpu"):
        if backbone.text_from_embeddings is None:
            raise InvalidValue(f"coop needs a text tower that takes token embeddings; {backbone.label} has none")
        if not class_names:
            raise InvalidValue("coop: no class names to build prompts for")
        self.model, self.backbone, self.device = model, backbone, torch.device(device)
        if ctx_init is not None:
            phrase = " ".join(ctx_init.replace("_", " ").split())
            prefix_ids = tokenizer(phrase, add_special_tokens=False)["input_ids"]
            if not prefix_ids:
                raise InvalidValue(f"coop: --ctx-init {ctx_init!r} has no tokens")
            if n_ctx is not None and n_ctx != len(prefix_ids):
                raise InvalidValue(f"coop: --n-ctx {n_ctx} differs from the {len(prefix_ids)} tokens of --ctx-init "
                                   f"{ctx_init!r} (leave --n-ctx out: the phrase sets it)")
        else:
            n_ctx = N_CTX if n_ctx is None else int(n_ctx)
            if n_ctx < 1:
                raise InvalidValue(f"coop: --n-ctx must be at least 1, not {n_ctx}")
            phrase = " ".join([PLACEHOLDER] * n_ctx)
            prefix_ids = tokenizer(phrase, add_special_tokens=False)["input_ids"]
        phrase_ids = list(prefix_ids)
        kwargs = backbone.text_kwargs(model)
        tokens = tokenizer([f"{phrase} {name}." for name in class_names], return_tensors="pt",
                           return_special_tokens_mask=True, **kwargs)
        special = tokens["special_tokens_mask"][0].tolist()
        self.lead = next((i for i, s in enumerate(special) if not s), 0)  # the start token(s) before the context
        ids = tokens["input_ids"]
        if ((ctx_init is None and len(prefix_ids) != n_ctx) or ids.shape[1] < self.lead + len(prefix_ids)
                or not (ids[:, self.lead:self.lead + len(prefix_ids)] == torch.tensor(prefix_ids)).all()):
            # A tokenizer that merges across the phrase's end (or splits "X"): the prompt is put
            # together from its parts, [start] context name. [end], as the published code means it.
            n = len(prefix_ids) if ctx_init is not None else n_ctx
            tokens = _assembled(tokenizer, class_names, n, kwargs)
            ids = tokens["input_ids"]
            self.lead = tokens["lead"]
            prefix_ids = ids[0, self.lead:self.lead + n].tolist()
        self.n_ctx = len(prefix_ids)
        mask = tokens.get("attention_mask")  # passed on exactly when the tokenizer gives one, as zero-shot does
        self.attention_mask = None if mask is None else mask.to(self.device)
        self.positions = backbone.pool_positions(model, ids).to(self.device)
        embedding = backbone.token_embedding(model)
        with torch.no_grad():
            words = embedding(ids.to(embedding.weight.device)).float().to(self.device)  # (C, L, W)
        self.prefix = words[:, :self.lead]
        self.suffix = words[:, self.lead + self.n_ctx:]
        self.width = int(words.shape[-1])
        self.init = None
        if ctx_init is not None:
            with torch.no_grad():
                phrase_words = embedding(torch.tensor(phrase_ids, device=embedding.weight.device))
            self.init = phrase_words.float().to(self.device)
        self.n_classes = len(class_names)

    @classmethod
    def from_lab(cls, lab: Lab, class_names: Sequence[str], *, n_ctx: int | None = None,
                 ctx_init: str | None = None, train: bool = False) -> PromptText:
        """The lab's text tower for these class names. `train`: on CUDA a float32 copy of the
        model (its inference model there is fp16), trained under bf16 autocast."""
        clip = lab.clip()
        if train and next(clip.model.parameters()).dtype != torch.float32:
            model = lab.model_copy(lab.device).model.eval()
        else:
            model = clip.model
        return cls(model, clip.tokenizer, clip.backbone, class_names, n_ctx=n_ctx, ctx_init=ctx_init,
                   device=lab.device)

    def initial_context(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """`(M, W)` float32: the phrase's embeddings, else N(0, CTX_STD^2) drawn on the CPU."""
        if self.init is not None:
            return self.init.clone()
        return (torch.randn(self.n_ctx, self.width, generator=generator) * CTX_STD).to(self.device)

    def features(self, context: torch.Tensor) -> torch.Tensor:
        """`(C, D)` the L2-normalised text features of every class prompt with this context,
        in one batched pass of the text tower (bf16 autocast on CUDA)."""
        if tuple(context.shape) != (self.n_ctx, self.width):
            raise InvalidValue(f"coop: a context of shape {tuple(context.shape)} does not fit this text tower's "
                               f"({self.n_ctx}, {self.width})")
        ctx = context.to(self.device, torch.float32).unsqueeze(0).expand(self.n_classes, -1, -1)
        embeds = torch.cat([self.prefix, ctx, self.suffix], dim=1)
        dtype = next(self.model.parameters()).dtype
        # bf16 autocast over fp32 weights on CUDA; an fp16 inference model runs as it is
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    and dtype == torch.float32 else contextlib.nullcontext())
        with autocast:
            out = self.backbone.text_from_embeddings(self.model, embeds.to(dtype), self.attention_mask, self.positions)
        return F.normalize(out.float(), dim=-1)


class CoOpHead(nn.Module):
    """`s * f @ T'` with T the final normalised class text features of the learned prompts.

    Buffers:
        text: `(C, D)` the class text features (unit rows).
        context: `(M, W)` the learned context vectors, kept for reuse (`classifier_for_names`).
    """

    def __init__(self, n_classes: int, dim: int, n_ctx: int, width: int, logit_scale: float = 100.0):
        super().__init__()
        self.n_classes, self.dim = int(n_classes), int(dim)
        self.n_ctx, self.width = int(n_ctx), int(width)
        self.logit_scale = float(logit_scale)
        self.register_buffer("text", torch.zeros(self.n_classes, self.dim))
        self.register_buffer("context", torch.zeros(self.n_ctx, self.width))

    def config(self) -> dict[str, Any]:
        return {"n_classes": self.n_classes, "dim": self.dim, "n_ctx": self.n_ctx, "width": self.width,
                "logit_scale": self.logit_scale}

    def linear_head(self) -> nn.Linear:
        """The same logits as one linear layer: `f (s T)'`, no bias."""
        head = nn.Linear(self.dim, self.n_classes)
        with torch.no_grad():
            head.weight.copy_(self.logit_scale * self.text)
            head.bias.zero_()
        return head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * (features @ self.text.t())


def _head(text: PromptText, context: torch.Tensor, logit_scale: float) -> CoOpHead:
    with torch.no_grad():
        features = text.features(context.detach())
    head = CoOpHead(features.shape[0], features.shape[1], text.n_ctx, text.width, logit_scale)
    with torch.no_grad():
        head.text.copy_(features.cpu())
        head.context.copy_(context.detach().float().cpu())
    return head.to(text.device).eval()


def classifier_for_names(lab: Lab, context: torch.Tensor, class_names: Sequence[str]) -> CoOpHead:
    """The CoOp classifier of a learned context for any class names (also ones it never trained on).

    Args:
        lab: the run context (its model: the one the context was learned with).
        context: `(M, W)` a learned context (`CoOpHead.context` of a saved run).
        class_names: the names to score, in label order.

    Returns:
        A `CoOpHead` on the lab's device scoring `(B, D)` normalised image features against
        `[learned context] name.` for each name.
    """
    text = PromptText.from_lab(lab, class_names, n_ctx=int(context.shape[0]))
    return _head(text, context, lab.logit_scale)


def fit(data: FeatureData, *, text: PromptText, shots: int | None = None, epochs: int | None = None, lr: float = LR,
        momentum: float = MOMENTUM, weight_decay: float = WEIGHT_DECAY, batch_size: int = BATCH_SIZE,
        warmup_epochs: int = WARMUP_EPOCHS, warmup_lr: float = WARMUP_LR, select: str = "last",
        seed: int = 0) -> Fitted:
    """Learn the context on the support features.

    Args:
        data: the cached features (support trains; val is scored every epoch; `text` is the
            zero-shot reference recorded as `zs_val_acc`).
        text: the frozen text tower with the class prompts (`PromptText`).
        shots: K of the run (None: full data), for the published epochs (`epochs_for`).
        epochs: None: the published number for `shots`; 0: no step (the initial context).
        lr, momentum, weight_decay, batch_size, warmup_epochs, warmup_lr: the schedule.
        select: "last" (published) or "val" (the epoch of best val accuracy, first on ties).
        seed: seeds the private generator (initial context, shuffles).

    Returns:
        `Fitted` with a `CoOpHead`; curves one dict per epoch (`epoch` 1..E, `train_loss` =
        mean batch CE, `val_loss`, `val_acc`, `lr`, `seconds` since the start of `fit`).
    """
    if select not in ("last", "val"):
        raise ValueError(f"select must be 'last' or 'val', not {select!r}")
    start = time.perf_counter()
    epochs = epochs_for(shots) if epochs is None else int(epochs)
    gen = torch.Generator().manual_seed(int(seed))
    s = float(data.logit_scale)
    support, labels = data.support.float().to(text.device), data.support_labels.to(text.device)
    val_x, val_y = data.val.float().to(text.device), data.val_labels.to(text.device)
    n = support.shape[0]
    initial = text.initial_context(gen)
    context = nn.Parameter(initial.clone())
    optim = torch.optim.SGD([context], lr=lr, momentum=momentum, weight_decay=weight_decay)
    n_batches = n // batch_size if n >= batch_size else 1  # Dassl: drop_last only with a full batch

    def scored(features: torch.Tensor) -> tuple[float, float]:
        logits = s * val_x @ features.t()
        return F.cross_entropy(logits, val_y).item(), (logits.argmax(-1) == val_y).float().mean().item()

    zs_val_acc = scored(data.text.float().to(text.device))[1]
    with torch.no_grad():
        init_val_acc = scored(text.features(context))[1]
    best_acc, best_epoch, best_state = init_val_acc, 0, context.detach().clone()
    curves: list[dict[str, float]] = []
    for epoch in range(epochs):
        rate = dassl_lr(epoch, lr, epochs, warmup_epochs, warmup_lr)
        for group in optim.param_groups:
            group["lr"] = rate
        perm = torch.randperm(n, generator=gen).to(text.device)
        loss_sum = torch.zeros((), device=text.device)
        for b in range(n_batches):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            loss = F.cross_entropy(s * support[idx] @ text.features(context).t(), labels[idx])
            # The gradient of the context alone: no frozen weight ever gets a .grad.
            (context.grad,) = torch.autograd.grad(loss, [context])
            optim.step()
            loss_sum += loss.detach()
        with torch.no_grad():
            val_loss, val_acc = scored(text.features(context))
        curves.append({"epoch": epoch + 1, "train_loss": (loss_sum / n_batches).item(), "val_loss": val_loss,
                       "val_acc": val_acc, "lr": rate, "seconds": time.perf_counter() - start})
        if select == "val" and val_acc > best_acc:
            best_acc, best_epoch, best_state = val_acc, epoch + 1, context.detach().clone()
    if select == "val":
        chosen, chosen_acc, final = best_epoch, best_acc, best_state
    else:
        chosen, chosen_acc, final = epochs, (curves[-1]["val_acc"] if curves else init_val_acc), context.detach()
    module = _head(text, final, s)
    info: dict[str, Any] = {
        "selection": "last epoch (as published)" if select == "last" else "best val accuracy",
        "best_epoch": int(chosen), "n_ctx": text.n_ctx, "ctx_init": "phrase" if text.init is not None else "random",
        "zs_val_acc": zs_val_acc, "init_val_acc": init_val_acc, "val_acc": chosen_acc,
        "context_change": float((final - initial).norm()),
        "batches_per_epoch": int(n_batches), "seconds": time.perf_counter() - start,
    }
    return Fitted(module=module, config=module.config(), info=info, curves=curves, learned=module.context.numel())


# ----------------------------------------------------------------------------- the method's declaration

PROMPT_OPTIONS = ("n_ctx", "ctx_init")  # read when the text tower is built, not by `fit`
OPTIONS = (
    Option("ctx_init", str, 'start the context from this phrase\'s word embeddings, e.g. "a photo of a" '
                            "(its token count sets --n-ctx; default: random, N(0, 0.02))"),
    Option("n_ctx", positive_int, f"context length M (default: the published {N_CTX})"),
    Option("epochs", positive_int, "epochs (default: the published 50 at 1 shot, 100 at 2-4, 200 at 8 and more, "
                                   "and with full data)"),
    Option("lr", positive_float, f"SGD learning rate (default: the published {LR})"),
)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sample_options(parser)
    group = parser.add_argument_group("CoOp")
    for o in OPTIONS:
        group.add_argument(f"--{o.name.replace('_', '-')}", dest=o.name, type=o.type, default=None, help=o.help)


def _settings(args: argparse.Namespace) -> CachedSettings:
    fixed = {o.name: getattr(args, o.name) for o in OPTIONS if getattr(args, o.name, None) is not None}
    return CachedSettings(REFERENCE_PROMPTS, fixed)


def _run(lab: Lab, dataset: Dataset | str, settings: CachedSettings, *, shots: int | None = None, seed: int | None = None,
         resume: bool = False, callbacks: tuple = ()) -> dict:
    seed = lab.seed if seed is None else seed
    options = dict(settings.options)
    prompt = {k: options.pop(k) for k in PROMPT_OPTIONS if k in options}

    def prepare(lab: Lab, dataset: Dataset, data: RunData) -> dict[str, Any]:
        text = PromptText.from_lab(lab, list(dataset.class_names), train=True, **prompt)
        return {"text": text, "shots": data.shots}

    def bound(data: FeatureData, **extra: Any) -> Fitted:
        return fit(data, seed=seed, **options, **extra)

    return run_cached(lab, dataset, METHOD, bound, settings, shots=shots, seed=seed, prepare=prepare)


def _load_classifier(lab: Lab, dataset: Dataset | str, **kwargs: Any):
    return load_cached(lab, dataset, METHOD, CoOpHead, **kwargs)


def _export(lab: Lab, dataset: Dataset):
    return export_linear(lab, dataset, method=METHOD, build=CoOpHead)


def _new_text(lab: Lab, module: nn.Module, new: Dataset, run: Mapping[str, Any]) -> torch.Tensor:
    # the learned context in front of the new class names, through the frozen text tower
    return classifier_for_names(lab, module.context.float(), list(new.class_names)).text


register(Method(
    name=METHOD, label="CoOp", command="coop", folder=METHOD, order=37,
    description="CoOp: learned prompt context before each class name, through the frozen text tower (last epoch)",
    trained=True, epochs=True, uses_text_classifier=False, new_classes="text",
    add_arguments=_add_arguments, settings=_settings, run=_run, recorded=recorded, load_classifier=_load_classifier,
    has_checkpoint=has_checkpoint, export=_export,
    score_new=functools.partial(renamed_scores, method=METHOD, build=CoOpHead, text_for=_new_text),
))
