"""A split file in Zhou et al.'s format for the kit's synthetic Flowers102.

The published `split_zhou_OxfordFlowers.json` cannot be downloaded offline, so the kit writes
its own with the same construction CoOp used (per class: round(50%) train, round(20%) val,
the rest test). On the real label file that gives exactly the published 4,093 / 1,633 / 2,463,
so code that checks the published sizes runs unchanged on the kit; which images fall where
differs from the published file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clip_utils.data.benchmarks import flowers102_class_names
from clip_utils.data.images import SPLITS
from clip_utils.data.splits import ZHOU_SPLITS, write_split_file

# Every class must allow a 16-shot draw from train (the largest K of the few-shot tables).
MIN_TRAIN_PER_CLASS = 16


def write_flowers102_split(data_root: Path, seed: int = 0, path: Path | None = None) -> Path:
    """Write `<data_root>/flowers-102/split_zhou_OxfordFlowers.json` for the kit's Flowers102.

    Args:
        data_root: the root `testkit.make_flowers102` wrote into (its `flowers-102/` holds
            `imagelabels.mat` and `jpg/`).
        seed: which images of each class go to train, val and test (the same seed, the same file).
        path: write it there instead (a file for `--split-file`).

    Returns:
        The split file's path.

    Raises:
        RuntimeError: the sizes differ from the published ones, or a class gets fewer than 16
            training images (the label file is not the real one).
    """
    from scipy.io import loadmat

    zhou = ZHOU_SPLITS["flowers102"]
    base = Path(data_root) / "flowers-102"
    labels = loadmat(base / "imagelabels.mat")["labels"][0].astype(int) - 1
    names = flowers102_class_names()[: int(labels.max()) + 1]
    rng = np.random.default_rng(seed)
    parts: dict[str, list[tuple[int, int]]] = {s: [] for s in SPLITS}
    for label in range(len(names)):
        images = rng.permutation(np.flatnonzero(labels == label) + 1)  # 1-based image numbers
        # Python's round (half to even), as CoOp's OxfordFlowers.read_data: the published sizes
        # come out of exactly this rounding.
        n_train, n_val = round(len(images) * 0.5), round(len(images) * 0.2)
        if n_train < MIN_TRAIN_PER_CLASS:
            raise RuntimeError(f"class {label} has {len(images)} images: too few for {MIN_TRAIN_PER_CLASS} shots")
        for split, chosen in zip(SPLITS, np.split(images, [n_train, n_train + n_val]), strict=True):
            parts[split] += [(int(i), label) for i in chosen]
    found = tuple(len(parts[s]) for s in SPLITS)
    if found != zhou.sizes:
        raise RuntimeError(f"the kit's Flowers102 split has sizes {found}, not the published {zhou.sizes}")
    samples = {s: [(f"image_{i:05d}.jpg", label, names[label]) for i, label in sorted(parts[s])] for s in SPLITS}
    return write_split_file(path or base / zhou.file, samples)
