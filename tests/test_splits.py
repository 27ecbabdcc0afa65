"""Zhou et al.'s split files: reading, every refusal in one line, fetching without the network, the kit's file."""

from __future__ import annotations

import hashlib
import io
import json
import urllib.error
from collections import Counter

import pytest

from clip_utils.data import splits
from clip_utils.data.splits import (
    ZHOU_SPLITS,
    SplitFile,
    ZhouSplit,
    fetch_split_file,
    read_split_file,
    write_split_file,
)
from clip_utils.errors import InvalidValue, MissingFile

GOOD = {
    "train": [["a/a_1.jpg", 0, "alpha"], ["a/a_2.jpg", 0, "alpha"], ["b/b_1.jpg", 1, "beta"]],
    "val": [["a/a_3.jpg", 0, "alpha"], ["b/b_2.jpg", 1, "beta"]],
    "test": [["b/b_3.jpg", 1, "beta"]],
}


@pytest.fixture
def images(tmp_path):
    """An image root holding every image GOOD lists (empty files: only existence is checked)."""
    root = tmp_path / "images"
    for split in GOOD.values():
        for rel, _, _ in split:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).touch()
    return root


def _file(tmp_path, content) -> object:
    path = tmp_path / "split_zhou_Test.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _one_line(err: Exception, *parts: str) -> str:
    message = str(err)
    assert "\n" not in message
    for part in parts:
        assert part in message
    return message


def test_a_valid_file_reads_back_with_absolute_paths_labels_names_and_its_sha256(tmp_path, images):
    path = write_split_file(tmp_path / "split.json", {s: [tuple(e) for e in GOOD[s]] for s in GOOD})
    read = read_split_file(path, images, n_classes=2, sizes=(3, 2, 1))
    assert isinstance(read, SplitFile) and read.path == path
    assert read.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert read.samples == {s: [(str(images / rel), label) for rel, label, _ in GOOD[s]] for s in GOOD}
    assert read.names == ("alpha", "beta")
    assert read.sizes() == (3, 2, 1)
    assert json.loads(path.read_text()) == GOOD  # the published format, round-tripped


def _edit(split: str, index: int, entry) -> dict:
    content = json.loads(json.dumps(GOOD))
    content[split][index] = entry
    return content


@pytest.mark.parametrize(("content", "says"), [
    ("{not json", "not valid JSON"),
    ([], "exactly the keys train, val, test"),
    ({"train": [], "val": []}, "exactly the keys train, val, test"),
    ({**GOOD, "extra": []}, "exactly the keys train, val, test"),
    ({**GOOD, "val": {}}, "val is dict, not a list"),
    (_edit("train", 0, ["a/a_1.jpg", "0", "alpha"]), "train entry 0 is"),
    (_edit("train", 0, ["a/a_1.jpg", 0]), "not [image path, label, class name]"),
    (_edit("val", 1, ["b/b_2.jpg", True, "beta"]), "val entry 1 is"),
    (_edit("test", 0, ["b/b_3.jpg", 2, "gamma"]), "label 2, outside 0..1"),
    (_edit("test", 0, ["b/b_3.jpg", -1, "beta"]), "label -1, outside 0..1"),
    (_edit("val", 0, ["a/a_3.jpg", 0, "Alpha"]), "label 0 is called both 'alpha' and 'Alpha'"),
    (_edit("train", 2, ["b/b_1.jpg", 0, "alpha"]), "1 of 2 classes have no training image (labels 1)"),
    (_edit("train", 1, ["a/a_1.jpg", 0, "alpha"]), "image a/a_1.jpg is listed twice in train"),
    (_edit("test", 0, ["b/b_1.jpg", 1, "beta"]), "image b/b_1.jpg is listed in both train and test"),
    (_edit("test", 0, ["/etc/b_3.jpg", 1, "beta"]), "not a path inside the image folder"),
    (_edit("test", 0, ["../b_3.jpg", 1, "beta"]), "not a path inside the image folder"),
])
def test_each_structural_fault_is_one_invalid_value_line_naming_the_file_and_the_way_out(tmp_path, images, content,
                                                                                          says):
    path = _file(tmp_path, content)
    with pytest.raises(InvalidValue) as err:
        read_split_file(path, images, n_classes=2)
    _one_line(err.value, str(path), says, "--split-file")


def test_other_sizes_than_the_published_ones_are_refused(tmp_path, images):
    path = _file(tmp_path, GOOD)
    with pytest.raises(InvalidValue) as err:
        read_split_file(path, images, n_classes=2, sizes=(4093, 1633, 2463))
    _one_line(err.value, str(path), "3/2/1", "4093/1633/2463", "--split-file")


def test_missing_images_are_one_missing_file_line_with_the_first_and_the_count(tmp_path, images):
    path = _file(tmp_path, GOOD)
    (images / "b" / "b_1.jpg").unlink()
    (images / "b" / "b_3.jpg").unlink()
    with pytest.raises(MissingFile) as err:
        read_split_file(path, images, n_classes=2)
    _one_line(err.value, str(path), str(images), "2 of the 6 images", "first: b/b_1.jpg", "must be in that folder")
    assert len(read_split_file(path, images, n_classes=2, check_files=False).samples["test"]) == 1
    with pytest.raises(MissingFile):
        read_split_file(path, tmp_path / "nowhere", n_classes=2)


def test_a_missing_split_file_or_a_folder_in_its_place_is_refused(tmp_path, images):
    with pytest.raises(MissingFile) as err:
        read_split_file(tmp_path / "absent.json", images, n_classes=2)
    _one_line(err.value, "absent.json", "--split-file")
    with pytest.raises(InvalidValue) as err:
        read_split_file(images, images, n_classes=2)
    _one_line(err.value, str(images), "not a regular file")


@pytest.fixture
def no_network(monkeypatch):
    """Any network use fails the test: the tests never touch the network."""
    def refuse(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(splits, "reachable", refuse)
    monkeypatch.setattr(splits.urllib.request, "urlopen", refuse)


SPLIT = ZhouSplit("split_zhou_Test.json", "test/images", "https://drive.google.com/uc?export=download&id=TEST")


def test_fetch_returns_a_present_file_without_the_network(tmp_path, no_network):
    (tmp_path / SPLIT.file).write_text(json.dumps(GOOD))
    assert fetch_split_file(SPLIT, tmp_path) == tmp_path / SPLIT.file


def test_fetch_without_a_known_address_says_to_give_the_file(tmp_path, no_network):
    with pytest.raises(MissingFile) as err:
        fetch_split_file(ZhouSplit("split_zhou_Test.json", "test/images"), tmp_path)
    _one_line(err.value, "no published address", str(tmp_path), "--split-file")


def test_fetch_offline_is_one_missing_file_line(tmp_path, no_network, monkeypatch):
    monkeypatch.setattr(splits, "reachable", lambda url: (False, "Name or service not known"))
    with pytest.raises(MissingFile) as err:
        fetch_split_file(SPLIT, tmp_path)
    _one_line(err.value, f"cannot download {SPLIT.url} (Name or service not known)", str(tmp_path), "--split-file")
    assert not list(tmp_path.iterdir())


class _Response(io.BytesIO):
    pass


@pytest.mark.parametrize(("answer", "says"), [
    (urllib.error.URLError("timed out"), "(timed out)"),
    (urllib.error.HTTPError(SPLIT.url, 403, "Forbidden", {}, None), "(HTTP 403 Forbidden)"),
    (b"<!DOCTYPE html><html>Google Drive - quota exceeded</html>", "no JSON object"),
])
def test_a_failing_download_is_one_missing_file_line_and_leaves_nothing(tmp_path, no_network, monkeypatch, answer,
                                                                        says):
    def urlopen(url, timeout):
        assert url == SPLIT.url and timeout
        if isinstance(answer, Exception):
            raise answer
        return _Response(answer)

    monkeypatch.setattr(splits, "reachable", lambda url: (True, ""))
    monkeypatch.setattr(splits.urllib.request, "urlopen", urlopen)
    with pytest.raises(MissingFile) as err:
        fetch_split_file(SPLIT, tmp_path)
    _one_line(err.value, f"cannot download {SPLIT.url}", says, "--split-file")
    assert not list(tmp_path.iterdir())


def test_a_download_is_saved_in_place(tmp_path, no_network, monkeypatch):
    body = json.dumps(GOOD).encode()
    monkeypatch.setattr(splits, "reachable", lambda url: (True, ""))
    monkeypatch.setattr(splits.urllib.request, "urlopen", lambda url, timeout: _Response(body))
    path = fetch_split_file(SPLIT, tmp_path / "sub")
    assert path == tmp_path / "sub" / SPLIT.file and path.read_bytes() == body
    assert [p.name for p in path.parent.iterdir()] == [SPLIT.file]  # no temporary file left


def test_the_published_splits_are_declared_for_our_dataset_names():
    assert set(ZHOU_SPLITS) == {"flowers102", "pets", "dtd", "food101", "eurosat", "stanford_cars"}
    for split in ZHOU_SPLITS.values():
        assert split.file.startswith("split_zhou_") and split.file.endswith(".json")
        assert split.url.startswith("https://drive.google.com/uc?export=download&id=")
        assert split.sizes is None or (len(split.sizes) == 3 and min(split.sizes) > 0)
    assert ZHOU_SPLITS["flowers102"].sizes == (4093, 1633, 2463)


def test_write_split_file_takes_exactly_train_val_test(tmp_path):
    with pytest.raises(InvalidValue):
        write_split_file(tmp_path / "x.json", {"train": [], "test": []})


def test_the_kits_flowers102_split_has_the_published_sizes_and_16_shots_per_class(tmp_path):
    from clip_utils import testkit
    from clip_utils.testkit.splits import write_flowers102_split

    testkit.make_flowers102(tmp_path, size=(8, 8))
    path = write_flowers102_split(tmp_path)
    zhou = ZHOU_SPLITS["flowers102"]
    assert path == tmp_path / "flowers-102" / zhou.file
    read = read_split_file(path, tmp_path / zhou.image_dir, n_classes=102, sizes=(4093, 1633, 2463))
    train = Counter(label for _, label in read.samples["train"])
    assert len(train) == 102 and min(train.values()) >= 16
    assert read.names[0] == "pink primrose"
    for split in ("val", "test"):
        assert len({label for _, label in read.samples[split]}) == 102
    first = path.read_bytes()
    assert write_flowers102_split(tmp_path).read_bytes() == first  # deterministic
    assert write_flowers102_split(tmp_path, seed=1).read_bytes() != first
