"""Dataset loaders on the synthetic kit: splits, labels, names and bad input."""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter

import pytest
import torch

from clip_utils import data
from clip_utils.data import DatasetNotFoundError, UnreadableImageError, cub, load_dataset
from clip_utils.data import images as imagelist


@pytest.mark.parametrize("split,size", [("train", 1020), ("val", 1020), ("test", 6149)])
def test_flowers102_official_split(kit, split, size):
    ds = load_dataset("flowers102", kit["data"], split)
    assert len(ds) == size
    labels = Counter(ds.targets)
    assert min(labels) == 0 and max(labels) == 101
    if split != "test":  # the official train and val splits hold 10 images per class
        assert set(labels.values()) == {10}


def test_flowers102_class_names_follow_cat_to_name(kit):
    ds = load_dataset("flowers102", kit["data"], "val")
    assert len(ds.classes) == 102
    assert ds.classes[0] == "pink primrose"  # key "1"
    assert ds.classes[101] == "blackberry lily"  # key "102"


def test_splits_are_disjoint(kit):
    for name in ("flowers102", "cub200"):  # the kit's; the other benchmarks: test_benchmarks.py
        paths = {s: {p for p, _ in load_dataset(name, kit["data"], s).samples} for s in data.SPLITS}
        assert not paths["train"] & paths["val"]
        assert not paths["train"] & paths["test"]
        assert not paths["val"] & paths["test"]


def test_cub_parsing_and_stratified_val(kit):
    train = load_dataset("cub200", kit["data"], "train")
    val = load_dataset("cub200", kit["data"], "val")
    test = load_dataset("cub200", kit["data"], "test")
    n_classes = len(train.classes)
    assert train.classes[0] == "Black footed Albatross"
    assert train.classes[1] == "Laysan Albatross"
    # the kit writes 6 official-train and 3 official-test images per class
    assert len(test) == 3 * n_classes
    assert len(train) + len(val) == 6 * n_classes
    assert set(Counter(val.targets)) == set(range(n_classes))  # every class in val
    assert max(Counter(val.targets).values()) - min(Counter(val.targets).values()) <= 1
    again = load_dataset("cub200", kit["data"], "val")
    assert again.samples == val.samples  # seed-fixed


def test_cub_real_class_list_names():
    names = [cub.cub_class_name(line.split()[1]) for line in
             cub.BUNDLED_CUB_CLASSES.read_text().splitlines()]
    assert len(names) == 200
    assert names[0] == "Black footed Albatross" and names[-1] == "Common Yellowthroat"


def test_transform_is_applied(kit):
    ds = load_dataset("cub200", kit["data"], "test", transform=lambda im: torch.tensor(im.size))
    image, label = ds[0]
    assert image.tolist() == [44, 36] and label == 0


def test_unknown_names_are_refused(kit):
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        load_dataset("cifar", kit["data"], "test")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_dataset("cub200", kit["data"], "dev")


@pytest.mark.parametrize("name,folder", [("flowers102", "flowers-102"), ("cub200", "CUB_200_2011")])
def test_missing_dataset_names_folder_and_download(tmp_path, name, folder):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(name, tmp_path, "test")
    assert str(tmp_path / folder) in str(err.value)
    assert "download" in str(err.value)


@pytest.mark.parametrize("name", ["flowers102", "cub200"])
def test_download_offline_fails_fast_and_clearly(tmp_path, name, monkeypatch):
    monkeypatch.setattr(imagelist, "reachable", lambda url: (False, "no route to host"))
    with pytest.raises(DatasetNotFoundError, match="unreachable.*no route to host"):
        load_dataset(name, tmp_path, "test", download=True)


def test_checksum_mismatch_removes_partial_archive(tmp_path):
    archive = tmp_path / "CUB_200_2011.tgz"
    archive.write_bytes(b"half a download")
    with pytest.raises(OSError, match="checksum mismatch.*removed"):
        cub.verify_archive(archive, cub.CUB_MD5)
    assert not archive.exists()


def test_good_archive_is_extracted_without_network(tmp_path, kit, monkeypatch):
    import tarfile

    archive = tmp_path / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(kit["data"] / "CUB_200_2011", arcname="CUB_200_2011")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(imagelist, "reachable", lambda url: pytest.fail("must not touch the network"))
    base = cub.download_cub200(tmp_path, md5=md5)
    assert (base / "images.txt").is_file()


def test_unreadable_image_names_the_file(kit, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(kit["data"] / "CUB_200_2011", root / "CUB_200_2011")
    ds = load_dataset("cub200", root, "test")
    bad = ds.samples[0][0]
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8 not really a jpeg")
    with pytest.raises(UnreadableImageError, match=bad.split("/")[-1]) as err:
        ds[0]
    assert "object at 0x" not in str(err.value) and str(err.value).endswith("re-download the dataset or remove the file")


def test_class_names_need_no_images_and_no_download(tmp_path, kit, monkeypatch):
    monkeypatch.setattr(imagelist, "reachable", lambda url: pytest.fail("must not touch the network"))
    assert data.class_names("cub200", tmp_path, "original")[0] == "Black footed Albatross"  # bundled official list
    assert len(data.class_names("cub200", tmp_path)) == 200
    assert data.class_names("cub200", kit["data"], "original") == load_dataset("cub200", kit["data"], "test").classes
    assert data.class_names("flowers102", tmp_path)[0] == "pink primrose"


def test_curated_names_are_the_anchors_and_the_birds_proper_names(tmp_path):
    flowers, cub = data.class_names("flowers102", tmp_path), data.class_names("cub200", tmp_path)
    original = data.class_names("flowers102", tmp_path, "original")
    assert (original[77], flowers[77]) == ("lotus lotus", "lotus")  # CLIP's list, behind the published 79.2%
    assert (original[92], flowers[92]) == ("ball moss", "air plant")
    assert sum(a != b for a, b in zip(original, flowers, strict=True)) == 4
    assert (cub[0], cub[8], cub[21]) == ("Black-footed Albatross", "Brewer's Blackbird", "Chuck-will's-widow")
    assert "Black-and-white Warbler" in cub and "Arctic Tern" in cub and "Le Conte's Sparrow" in cub
    assert len(set(cub)) == 200 and not any("_" in name for name in cub)
    with pytest.raises(ValueError, match="curated or original"):
        data.class_names("cub200", tmp_path, "fancy")


def test_incomplete_extraction_is_never_taken_for_a_dataset(tmp_path, kit):
    import tarfile

    archive = tmp_path / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(kit["data"] / "CUB_200_2011", arcname="CUB_200_2011")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    (tmp_path / "CUB_200_2011" / "images").mkdir(parents=True)  # left by an interrupted extraction
    with pytest.raises(DatasetNotFoundError, match="incomplete.*remove it"):
        cub.download_cub200(tmp_path, md5=md5)
    shutil.rmtree(tmp_path / "CUB_200_2011")
    base = cub.download_cub200(tmp_path, md5=md5)
    assert (base / "images.txt").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left
