"""CUB-200-2011: the official archive layout, parsed here (torchvision has no loader for it).

    <root>/CUB_200_2011/images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/

Test is the official 5794 test images; validation is a stratified, seed-fixed 10% of the
official 5994 training images, the rest is train. The archive is downloaded from Caltech's
data repository and MD5-verified before extraction.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path

from clip_utils.data.classnames import check_naming, cub_proper_name
from clip_utils.data.images import DatasetNotFoundError, DatasetSpec, require_network
from clip_utils.prompts.templates import DOMAIN_ENSEMBLES

CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
CUB_MD5 = "97eceeb196236b17998738112f37df78"
CUB_DIR = "CUB_200_2011"
BUNDLED_CUB_CLASSES = Path(__file__).resolve().parents[1] / "assets" / "classes.txt"
# Share of the official CUB training images held out (stratified) for validation.
CUB_VAL_FRACTION = 0.1
CUB_VAL_SEED = 0


def cub_names(root: Path, naming: str) -> list[str]:
    """CUB class names from the dataset's classes.txt when on disk, else the bundled official list.

    Args:
        root: dataset root.
        naming: `curated` (the birds' proper names) or `original` (folder words).
    """
    curated = check_naming(naming) == "curated"
    local = Path(root) / CUB_DIR / "classes.txt"
    folders = [row[1] for row in _read_table(local if local.is_file() else BUNDLED_CUB_CLASSES)]
    return [cub_proper_name(f) if curated else cub_class_name(f) for f in folders]




def _read_table(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise DatasetNotFoundError(f"CUB-200-2011 file missing: {path}")
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def cub_class_name(folder_name: str) -> str:
    """`001.Black_footed_Albatross` -> `Black footed Albatross`."""
    return folder_name.split(".", 1)[-1].replace("_", " ")


def download_cub200(root: str | Path, url: str = CUB_URL, md5: str = CUB_MD5) -> Path:
    """Download and extract the official CUB-200-2011 archive into `root`.

    The archive is verified against its MD5 before extraction; a mismatching (partial or
    corrupt) archive is deleted so that the next attempt starts clean.

    Args:
        root: dataset root; the archive extracts to `<root>/CUB_200_2011/`.
        url: archive address.
        md5: expected MD5 of the archive.
    """
    from torchvision.datasets.utils import check_integrity, download_url

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "CUB_200_2011.tgz"
    if not check_integrity(str(archive), md5):
        archive.unlink(missing_ok=True)
        require_network(url, "CUB-200-2011", root / CUB_DIR)
        try:
            download_url(url, str(root), filename=archive.name)
        except Exception as err:  # urllib / socket errors come in many types
            archive.unlink(missing_ok=True)
            raise DatasetNotFoundError(
                f"could not download CUB-200-2011 from {url} ({err}). Check the network, or "
                f"download the archive by hand and extract it so that {root / CUB_DIR} exists."
            ) from err
    verify_archive(archive, md5)
    target = root / CUB_DIR
    if target.exists():
        raise DatasetNotFoundError(
            f"{target} exists but is incomplete (no images.txt): remove it and run again to extract "
            f"the verified archive {archive}."
        )
    # Extract beside the target and rename at the end: an interrupted extraction must never
    # look like a complete dataset (images.txt comes early in the archive).
    with tempfile.TemporaryDirectory(prefix=".extracting-", dir=root) as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        os.replace(Path(tmp) / CUB_DIR, target)
    return target


def verify_archive(archive: Path, md5: str) -> None:
    """Raise when `archive` does not match `md5`, deleting it so it is never reused.

    Args:
        archive: the downloaded file.
        md5: expected MD5.
    """
    from torchvision.datasets.utils import check_integrity

    if not check_integrity(str(archive), md5):
        archive.unlink(missing_ok=True)
        raise OSError(
            f"checksum mismatch for {archive} (expected MD5 {md5}): the partial or corrupt "
            f"file was removed; run the download again."
        )


def _cub_val_indices(labels: list[int], fraction: float, seed: int) -> set[int]:
    from sklearn.model_selection import train_test_split

    indices = list(range(len(labels)))
    n_val = max(round(len(labels) * fraction), len(set(labels)))
    _, val = train_test_split(indices, test_size=n_val, stratify=labels, random_state=seed)
    return set(val)


def _load_cub200(root: Path, split: str, download: bool) -> tuple[list[tuple[str, int]], list[str]]:
    base = root / CUB_DIR
    if not (base / "images.txt").is_file():
        if not download:
            raise DatasetNotFoundError(
                f"CUB-200-2011 not found: expected {base}/images.txt (the official "
                f"CUB_200_2011.tgz extracted into {root}). Any command downloads it unless given "
                f"--no-download (e.g. `python -m clip_utils zeroshot --dataset cub200`), as do "
                f"load_dataset(..., download=True) and `make run`; for an offline try-out use `make demo`."
            )
        download_cub200(root)
    classes = [cub_class_name(row[1]) for row in _read_table(base / "classes.txt")]
    paths = {row[0]: row[1] for row in _read_table(base / "images.txt")}
    labels = {row[0]: int(row[1]) - 1 for row in _read_table(base / "image_class_labels.txt")}
    is_train = {row[0]: row[1] == "1" for row in _read_table(base / "train_test_split.txt")}
    ids = sorted(paths, key=int)

    def sample(i: str) -> tuple[str, int]:
        return str(base / "images" / paths[i]), labels[i]

    if split == "test":
        return [sample(i) for i in ids if not is_train[i]], classes
    train_ids = [i for i in ids if is_train[i]]
    val = _cub_val_indices([labels[i] for i in train_ids], CUB_VAL_FRACTION, CUB_VAL_SEED)
    keep = (lambda k: k in val) if split == "val" else (lambda k: k not in val)
    return [sample(i) for k, i in enumerate(train_ids) if keep(k)], classes


CUB200 = DatasetSpec(
    name="cub200", title="CUB-200-2011", load=_load_cub200, names=cub_names, domain="a type of bird",
    domain_ensemble=DOMAIN_ENSEMBLES["bird"],
    splits="official test (5794); val: a stratified, seeded 10% of the official train (5994), the rest train",
)
