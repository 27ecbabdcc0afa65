"""Offline test kit: a tiny CLIP and synthetic datasets in the real on-disk layouts.

    python -m clip_utils.testkit demo_kit                  # writes demo_kit/{model,data}
    python -m clip_utils.testkit info_kit --informative    # writes info_kit/{model,birds}

Used by the tests and by `make demo`, so the whole pipeline runs without network or GPU.

- The tiny CLIP is a real `CLIPModel` folder (config, weights, a character-level BPE
  tokenizer, an image processor) loaded with `from_pretrained`, exactly like
  `openai/clip-vit-large-patch14`, only with random weights and 32-pixel inputs.
- Flowers102 reuses the real `imagelabels.mat` and `setid.mat` (torchvision verifies their
  checksums), so torchvision parses it exactly as the real dataset: 1020/1020/6149 images.
- CUB-200-2011 follows the official archive layout with the real class list.
- `make_informative_kit` pairs a briefly pretrained tiny CLIP with an image folder on which
  its zero-shot is informative but imperfect (about 45%, chance 8%, a linear probe 95%), for
  methods that start from the zero-shot classifier and must be seen to improve on it.
- The other torchvision benchmarks (Pets, FGVC Aircraft, DTD, Food-101, EuroSAT, Stanford
  Cars) are in `testkit_benchmarks`, built on demand rather than into every kit.

Every image's colours are fixed by its class (two colour patches per class, plus per-image
noise and jitter), so a classifier trained on them can really learn and a test can tell
learning from chance.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

ASSETS = Path(__file__).resolve().parents[1] / "assets"
FLOWERS_FILES = ("imagelabels.mat", "setid.mat")
TINY_IMAGE_SIZE = 32


def _byte_chars() -> list[str]:
    # CLIP's byte-level BPE maps every byte to a printable unicode character; a vocabulary
    # of all 256 of them (plus end-of-word forms) with no merges is a character tokenizer.
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def char_tokenizer():
    """A CLIP tokenizer over single characters (no merges): works offline, needs no vocab file."""
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    chars = _byte_chars()
    tokens = specials + chars + [c + "</w>" for c in chars]
    return CLIPTokenizer(vocab={tok: i for i, tok in enumerate(tokens)}, merges=[])


def make_tiny_clip(folder: str | Path, image_size: int = TINY_IMAGE_SIZE, seed: int = 0) -> Path:
    """Write a tiny random-weight CLIP (model, tokenizer, processor) to `folder`.

    Args:
        folder: output folder, loadable with `CLIPModel.from_pretrained`.
        image_size: input resolution of the vision tower (the processor crops to it).
        seed: weight initialisation seed.
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = char_tokenizer()
    vocab = tokenizer.get_vocab()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)

    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 8,
        },
        projection_dim=16,
        # A random text tower makes the zero-shot head (which both trained methods start
        # from) a random prior; at CLIP's initial temperature (exp(2.66) = 14) that prior
        # outweighs the few steps a test or the demo can afford, so the kit uses 1.
        logit_scale_init_value=0.0,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- other families

# Text settings of the released configs: SigLIP's cards pad to 64 tokens, on the right (its text
# tower reads the last position); MetaCLIP 2 pads to the longest prompt, on the right, in CLIP's
# 77-token context.
SIGLIP_TEXT_LENGTH = 64
METACLIP_2_TEXT_LENGTH = 77
SIGLIP_TOKENIZERS = ("gemma", "sentencepiece")


def _kit_words() -> list[str]:
    """The text a kit tokenizer is trained on: the kit's class names and the prompt templates'
    words (a few hundred words), plus every printable character so nothing is unknown."""
    import string

    from clip_utils.prompts.templates import DEFAULT, DIVERSE, domain_template

    flowers = list(json.loads((ASSETS / "cat_to_name.json").read_text()).values())
    birds = [line.split()[1].split(".", 1)[1].replace("_", " ")
             for line in (ASSETS / "classes.txt").read_text().splitlines()]
    templates = [*DEFAULT, *DIVERSE, domain_template("a type of flower"), domain_template("a type of bird")]
    lines = [t.replace("{}", name) for name in flowers + birds for t in templates[:2]] + templates
    return lines + [" ".join(string.ascii_letters + string.digits + string.punctuation)]


def _train_sentencepiece(model_type: str, vocab_size: int, **specials) -> bytes:
    """A tiny sentencepiece model trained on `_kit_words()` (milliseconds; no normaliser rules,
    which would add a 200 kB character map to a model of a few kilobytes)."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_kit_words()), model_writer=model, vocab_size=vocab_size,
                                   model_type=model_type, character_coverage=1.0, normalization_rule_name="identity",
                                   hard_vocab_limit=False, minloglevel=2, num_threads=1, **specials)
    return model.getvalue()


def _pieces(model: bytes) -> list[tuple[str, float]]:
    """`(piece, score)` of every id of a sentencepiece model (read without protobuf)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model)
    return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]


def siglip_sentencepiece_tokenizer(folder: str | Path):
    """SigLIP's own `SiglipTokenizer` on a tiny sentencepiece model (T5's layout: pad 0, eos 1,
    unk 2), as google/siglip-* ship it. transformers requires protobuf for this class."""
    from transformers import SiglipTokenizer

    vocab_file = Path(folder) / "spiece.model"
    vocab_file.parent.mkdir(parents=True, exist_ok=True)
    vocab_file.write_bytes(_train_sentencepiece("unigram", 200, pad_id=0, eos_id=1, unk_id=2, bos_id=-1))
    return SiglipTokenizer(str(vocab_file), model_max_length=SIGLIP_TEXT_LENGTH)


def gemma_tokenizer():
    """A tiny `GemmaTokenizer` (tokenizers backend: a BPE with Gemma's special ids, pad 0, eos 1,
    bos 2, unk 3, mask 4), as SigLIP 2's fixed-resolution checkpoints ship it, right-padded to 64."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    trainer_tok = Tokenizer(BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    trainer_tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer_tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    trainer_tok.train_from_iterator(_kit_words(), BpeTrainer(vocab_size=300, special_tokens=specials,
                                                            show_progress=False))
    model = json.loads(trainer_tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return GemmaTokenizer(vocab=model["vocab"], merges=merges, padding_side="right",
                          model_max_length=SIGLIP_TEXT_LENGTH)


def xlm_roberta_tokenizer():
    """A tiny `XLMRobertaTokenizer` (MetaCLIP 2's class): a sentencepiece unigram model in
    fairseq's layout (<s> 0, <pad> 1, </s> 2, <unk> 3, <mask> last), as XLM-R's conversion lays it."""
    from transformers import XLMRobertaTokenizer

    pieces = _pieces(_train_sentencepiece("unigram", 200, unk_id=0, bos_id=1, eos_id=2, pad_id=-1))
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces[3:], ("<mask>", 0.0)]
    return XLMRobertaTokenizer(vocab=vocab, model_max_length=METACLIP_2_TEXT_LENGTH)


def _tiny_towers(image_size: int) -> tuple[dict, dict]:
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    vision = {**text, "image_size": image_size, "patch_size": 8}
    return text, vision


def make_tiny_siglip(folder: str | Path, image_size: int = TINY_IMAGE_SIZE, seed: int = 0,
                     tokenizer: str = "gemma") -> Path:
    """Write a tiny random-weight SigLIP (`SiglipModel`, `SiglipProcessor`) to `folder`.

    The released configs' text settings: 64 positions, prompts padded to 64 on the right.
    The image processor squashes to a square with no crop, mean and std 0.5, as SigLIP's.

    Args:
        folder: output folder, loadable with `SiglipModel.from_pretrained`.
        image_size: input resolution of the vision tower.
        seed: weight initialisation seed.
        tokenizer: `gemma` (SigLIP 2 fixed-resolution's tokenizer, tokenizers backend) or
            `sentencepiece` (SigLIP's `SiglipTokenizer`; transformers needs protobuf for it).
    """
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    if tokenizer not in SIGLIP_TOKENIZERS:
        raise ValueError(f"tokenizer {tokenizer!r}: choose from {', '.join(SIGLIP_TOKENIZERS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = gemma_tokenizer() if tokenizer == "gemma" else siglip_sentencepiece_tokenizer(folder / "_spm")
    image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size}, resample=3,
                                           image_mean=[0.5] * 3, image_std=[0.5] * 3)
    SiglipProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)
    shutil.rmtree(folder / "_spm", ignore_errors=True)
    text, vision = _tiny_towers(image_size)
    config = SiglipConfig(
        text_config={**text, "vocab_size": len(tok), "max_position_embeddings": SIGLIP_TEXT_LENGTH,
                     "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
                     "bos_token_id": tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id},
        vision_config=vision,
    )
    torch.manual_seed(seed)
    model = SiglipModel(config)
    with torch.no_grad():
        # As the tiny CLIP: a temperature of 1 keeps the random zero-shot prior weak. The bias
        # is SigLIP's own part of the logits (released models: about -10), here -1.
        model.logit_scale.fill_(0.0)
        model.logit_bias.fill_(-1.0)
    model.save_pretrained(folder)
    return folder


def make_tiny_metaclip2(folder: str | Path, image_size: int = TINY_IMAGE_SIZE, seed: int = 0) -> Path:
    """Write a tiny random-weight MetaCLIP 2 (`MetaClip2Model`, `CLIPProcessor` with an
    `XLMRobertaTokenizer`, as facebook/metaclip-2-worldwide-* ship it) to `folder`.

    Args:
        folder: output folder, loadable with `MetaClip2Model.from_pretrained`.
        image_size: input resolution of the vision tower (the processor crops to it).
        seed: weight initialisation seed.
    """
    import torch
    from transformers import CLIPImageProcessor, CLIPProcessor, MetaClip2Config, MetaClip2Model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = xlm_roberta_tokenizer()
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)
    text, vision = _tiny_towers(image_size)
    config = MetaClip2Config(
        text_config={**text, "vocab_size": len(tok), "max_position_embeddings": METACLIP_2_TEXT_LENGTH,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.pad_token_id},
        vision_config=vision, projection_dim=16, logit_scale_init_value=0.0,
    )
    torch.manual_seed(seed)
    MetaClip2Model(config).save_pretrained(folder)
    return folder


def class_colours(n_classes: int, seed: int) -> np.ndarray:
    """`(n_classes, 2, 3)` RGB colours, two per class, for `class_image`.

    Args:
        n_classes: how many classes.
        seed: the colours' seed (each synthetic dataset has its own).
    """
    return np.random.default_rng(seed).integers(0, 256, size=(n_classes, 2, 3))


def class_image(label: int, index: int, size: tuple[int, int], colours: np.ndarray,
                noise: float = 12.0) -> Image.Image:
    """A synthetic photo of class `label`: two class colours split at a jittered edge, plus noise.

    Args:
        label: class index (row of `colours`).
        index: image index, seeds the per-image noise.
        size: `(width, height)`.
        colours: `(n_classes, 2, 3)` RGB colours per class.
        noise: standard deviation of the per-pixel noise.
    """
    rng = np.random.default_rng(index)
    width, height = size
    edge = int(width * rng.uniform(0.35, 0.65))
    pixels = np.empty((height, width, 3), dtype=np.float32)
    pixels[:, :edge] = colours[label, 0]
    pixels[:, edge:] = colours[label, 1]
    pixels += rng.normal(0, noise, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def make_flowers102(root: str | Path, size: tuple[int, int] = (48, 40), seed: int = 1) -> Path:
    """Write a synthetic Flowers102 under `<root>/flowers-102/` with the real split files.

    Args:
        root: dataset root (what `load_dataset` takes).
        size: `(width, height)` of every generated image.
        seed: seed of the class colours.
    """
    from scipy.io import loadmat

    base = Path(root) / "flowers-102"
    (base / "jpg").mkdir(parents=True, exist_ok=True)
    for name in FLOWERS_FILES:
        shutil.copyfile(ASSETS / name, base / name)
    labels = loadmat(base / "imagelabels.mat")["labels"][0] - 1
    colours = class_colours(102, seed)
    for i, label in enumerate(labels, start=1):
        class_image(int(label), i, size, colours).save(base / "jpg" / f"image_{i:05d}.jpg", quality=90)
    return base


def make_cub200(
    root: str | Path,
    n_classes: int = 200,
    train_per_class: int = 6,
    test_per_class: int = 3,
    size: tuple[int, int] = (44, 36),
    seed: int = 2,
) -> Path:
    """Write a synthetic CUB-200-2011 in the official layout under `<root>/CUB_200_2011/`.

    Args:
        root: dataset root (what `load_dataset` takes).
        n_classes: how many of the real 200 classes to use (the first ones).
        train_per_class: images per class marked as training in train_test_split.txt.
        test_per_class: images per class marked as test.
        size: `(width, height)` of every generated image.
        seed: seed of the class colours.
    """
    base = Path(root) / "CUB_200_2011"
    folders = [line.split()[1] for line in (ASSETS / "classes.txt").read_text().splitlines()][:n_classes]
    colours = class_colours(len(folders), seed)
    images, labels, split = [], [], []
    image_id = 0
    for label, folder in enumerate(folders):
        (base / "images" / folder).mkdir(parents=True, exist_ok=True)
        for k in range(train_per_class + test_per_class):
            image_id += 1
            rel = f"{folder}/{folder.split('.', 1)[1]}_{k:04d}_{image_id}.jpg"
            class_image(label, image_id, size, colours).save(base / "images" / rel, quality=90)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {label + 1}")
            split.append(f"{image_id} {int(k < train_per_class)}")
    (base / "classes.txt").write_text("".join(f"{i + 1} {f}\n" for i, f in enumerate(folders)))
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split) + "\n")
    return base


def make_imagefolder(
    folder: str | Path,
    layout: str = "flat",
    n_classes: int = 5,
    per_class: int = 12,
    size: tuple[int, int] = (40, 36),
    seed: int = 3,
) -> Path:
    """Write a user's image folder (`--dataset imagefolder:PATH`) with class-coded images.

    Args:
        folder: the dataset folder to create.
        layout: `flat` (`<class>/*.jpg`), `splits` (`train/`, `val/`, `test/`, each with class
            folders: half, a quarter and a quarter of `per_class`) or `train-test` (no `val/`).
        n_classes: classes, named `class_00`, `class-01`, ... (underscores and hyphens both).
        per_class: images per class.
        size: `(width, height)` of every image.
        seed: seed of the class colours.
    """
    folder = Path(folder)
    colours = class_colours(n_classes, seed)
    names = [f"class{'_' if k % 2 == 0 else '-'}{k:02d}" for k in range(n_classes)]
    quarter = max(1, per_class // 4)
    shares = {"flat": {"": per_class}, "splits": {"train": per_class - 2 * quarter, "val": quarter, "test": quarter},
              "train-test": {"train": per_class - quarter, "test": quarter}}[layout]
    index = 0
    for label, name in enumerate(names):
        for split, count in shares.items():
            target = folder / split / name
            target.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                index += 1
                class_image(label, index, size, colours).save(target / f"img_{k:03d}.jpg", quality=90)
    return folder


def _hard_image(label: int, index: int, size: tuple[int, int], colours: np.ndarray, spread: float, noise: float,
                rng: np.random.Generator) -> Image.Image:
    # `make_hard_imagefolder`'s images: close class colours, a per-image brightness shift, heavy noise.
    shifted = colours + rng.normal(0, spread / 2)  # the whole image brighter or darker
    return class_image(label, index, size, shifted, noise=noise)


def make_hard_imagefolder(
    folder: str | Path,
    n_classes: int = 10,
    counts: tuple[int, int, int] = (16, 8, 40),
    spread: float = 24.0,
    noise: float = 48.0,
    size: tuple[int, int] = (40, 36),
    seed: int = 5,
) -> Path:
    """Write an image folder (`train/`, `val/`, `test/` layout) that no method gets fully right.

    The kit's other sets are class-coded colours a linear probe separates perfectly, so
    comparing methods on them says nothing. Here the classes' colours lie close together
    (within `spread` of one grey) under heavy pixel noise and a per-image brightness shift,
    so the tiny CLIP's features overlap between classes: zero-shot is chance, a probe is
    far above it and below 100%.

    Args:
        folder: the dataset folder to create.
        n_classes: classes, named `class_00`, ...
        counts: images per class in train, val and test.
        spread: how far (in RGB units) class colours lie from mid-grey.
        noise: standard deviation of the per-pixel noise.
        size: `(width, height)` of every image.
        seed: seed of the class colours and brightness shifts.
    """
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    colours = 128 + rng.uniform(-spread, spread, size=(n_classes, 2, 3))
    index = 0
    for split, count in zip(("train", "val", "test"), counts, strict=True):
        for label in range(n_classes):
            target = folder / split / f"class_{label:02d}"
            target.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                index += 1
                _hard_image(label, 10_000 * seed + index, size, colours, spread, noise, rng).save(
                    target / f"img_{k:03d}.jpg", quality=90)
    return folder


INFORMATIVE_PROMPT = "a photo of a {}."


def make_informative_kit(
    folder: str | Path,
    n_classes: int = 12,
    known: int | None = None,
    counts: tuple[int, int, int] = (16, 8, 32),
    steps: int = 200,
    spread: float = 40.0,
    noise: float = 48.0,
    size: tuple[int, int] = (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE),
    temperature: float = 10.0,
    seed: int = 7,
) -> dict[str, Path]:
    """A tiny CLIP and an image folder on which its zero-shot is informative but imperfect.

    On the other kit sets the tiny CLIP is random, so zero-shot is chance and a few-shot
    method that starts from the text classifier cannot show it improves on one. Here the
    tiny CLIP is pretrained for a few seconds (CLIP's contrastive loss, `a photo of a {}.`
    captions) on other images drawn like the dataset's (`make_hard_imagefolder`'s close,
    noisy colours), and only of `known` of the classes: it has never read the other names.
    Zero-shot is then mostly right on the known classes and mostly wrong on the others,
    while the pretrained image features separate every class. With the defaults (12
    classes, 6 known) zero-shot top-1 is 44% (chance 8%) and an L-BFGS probe on the 16
    training images per class 95% (seeds 1 to 3: 54-58% and 95-100%). Methods that start
    from the zero-shot classifier thus have room to show they improve on it.

    Writes `<folder>/model` (a `CLIPModel` folder with its processor, `logit_scale` =
    log(`temperature`)), `<folder>/birds` (`imagefolder:` layout: `train/`, `val/`, `test/`
    with a folder per class, named after the first CUB species, `Black_footed_Albatross`,
    ...; a `classes.json` gives the `domain` phrase) and `<folder>/KIT.json`. Deterministic
    (fixed seeds, one torch thread while training), offline, a few seconds on one core.

    Args:
        folder: output folder.
        n_classes: classes (at most 200: CUB's names).
        known: classes the CLIP is pretrained on (default half): every other class in
            CUB's order (the 1st, 3rd, ...), then the others.
        counts: images per class in train, val and test (train: enough for 16 shots).
        steps: pretraining steps (each two images of every known class).
        spread: how far (in RGB units) class colours lie from mid-grey.
        noise: standard deviation of the per-pixel noise.
        size: `(width, height)` of every image (the tiny CLIP's input size: no resizing).
        temperature: `exp(logit_scale)`, during pretraining and saved.
        seed: seed of the weights, colours, images and pretraining.

    Returns:
        `{"model": model folder, "dataset": image folder}`; the dataset is
        `f"imagefolder:{paths['dataset']}"`.
    """
    import torch
    import torch.nn.functional as F
    from transformers import CLIPModel, CLIPProcessor

    from clip_utils.data.imagefolder import CLASSES_FILE, folder_class_name
    from clip_utils.model.heads import image_embeddings
    from clip_utils.prompts import text_embeddings

    folder = Path(folder)
    known = n_classes // 2 if known is None else known
    folders = [line.split()[1].split(".", 1)[1] for line in (ASSETS / "classes.txt").read_text().splitlines()]
    if not 2 <= n_classes <= len(folders) or not 1 <= known <= n_classes:
        raise ValueError(f"need 2 <= n_classes <= {len(folders)} and 1 <= known <= n_classes, "
                         f"got {n_classes} and {known}")
    folders = folders[:n_classes]
    rng = np.random.default_rng(seed)
    colours = 128 + rng.uniform(-spread, spread, size=(n_classes, 2, 3))

    dataset = folder / "birds"
    index = 1_000_000 * seed
    for split, count in zip(("train", "val", "test"), counts, strict=True):
        for label, name in enumerate(folders):
            target = dataset / split / name
            target.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                index += 1
                _hard_image(label, index, size, colours, spread, noise, rng).save(
                    target / f"img_{k:03d}.jpg", quality=90)
    (dataset / CLASSES_FILE).write_text(json.dumps({"domain": "a type of bird"}, indent=1) + "\n")

    # Pretraining data: other images of the known classes (other indices, so other noise),
    # each captioned with its class's prompt.
    model_dir = make_tiny_clip(folder / "model", image_size=min(size), seed=seed)
    processor = CLIPProcessor.from_pretrained(model_dir)
    model = CLIPModel.from_pretrained(model_dir)
    taught = [*range(0, n_classes, 2), *range(1, n_classes, 2)][:known]
    pool_size = 40
    index = 1_000_000 * seed + 500_000
    pool_rng = np.random.default_rng([seed, 1])
    pool = [_hard_image(label, index + i, size, colours, spread, noise, pool_rng)
            for label in taught for i in range(pool_size)]
    pixels = processor(images=pool, return_tensors="pt")["pixel_values"]
    pixels = pixels.view(known, pool_size, *pixels.shape[1:])
    tokens = processor.tokenizer([INFORMATIVE_PROMPT.format(folder_class_name(folders[c])) for c in taught],
                                 padding=True, return_tensors="pt")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same sums, so the same weights, whatever the thread count
    try:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            model.logit_scale.fill_(float(np.log(temperature)))
        model.logit_scale.requires_grad_(False)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
        targets = torch.arange(known)
        groups = 2
        for _ in range(steps):
            picks = torch.randint(0, pool_size, (groups, known), generator=generator)
            images = pixels[targets, picks].flatten(0, 1)  # (groups * known, 3, H, W): one of each class per group
            image_emb = image_embeddings(model, images)
            text_emb = F.normalize(text_embeddings(model, tokens["input_ids"], tokens["attention_mask"]), dim=-1)
            logits = temperature * image_emb.view(groups, known, -1) @ text_emb.T  # (groups, image, text)
            loss = (F.cross_entropy(logits.flatten(0, 1), targets.repeat(groups))
                    + F.cross_entropy(logits.transpose(1, 2).flatten(0, 1), targets.repeat(groups))) / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.logit_scale.requires_grad_(True)
    model.save_pretrained(model_dir)

    paths = {"model": model_dir, "dataset": dataset}
    (folder / "KIT.json").write_text(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
    return paths


def make_kit(folder: str | Path, cub_classes: int = 200) -> dict[str, Path]:
    """Build the whole kit: `<folder>/model` (tiny CLIP) and `<folder>/data` (both datasets, and
    Flowers102's split file in Zhou et al.'s format, so `--split coop` works offline).

    Args:
        folder: output folder.
        cub_classes: classes in the synthetic CUB.
    """
    from clip_utils.testkit.splits import write_flowers102_split

    folder = Path(folder)
    paths = {"model": make_tiny_clip(folder / "model"), "data": folder / "data"}
    make_flowers102(paths["data"])
    write_flowers102_split(paths["data"])
    make_cub200(paths["data"], n_classes=cub_classes)
    (folder / "KIT.json").write_text(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="output folder (model/ and data/ are written inside)")
    parser.add_argument("--cub-classes", type=int, default=200, help="classes in the synthetic CUB")
    parser.add_argument("--informative", action="store_true",
                        help="write the informative kit instead (make_informative_kit: a pretrained tiny CLIP in "
                             "model/ and an image folder, birds/, on which its zero-shot is informative)")
    args = parser.parse_args(argv)
    if args.informative:
        paths = make_informative_kit(args.folder)
        print(f"tiny CLIP: {paths['model']}\ndataset:   imagefolder:{paths['dataset']}")
        return
    paths = make_kit(args.folder, args.cub_classes)
    print(f"tiny CLIP: {paths['model']}\ndatasets:  {paths['data']}")


if __name__ == "__main__":
    main()
