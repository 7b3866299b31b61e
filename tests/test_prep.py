"""bavq-prep: shards from an image folder, a CIFAR batch and an HF dataset; bad input; resume; verify."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import time
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from bavq.prep import main


def _run(*args: str) -> int:
    return main([*args, "--no-progress"] if args and args[0] != "verify" else list(args))


def _read_tars(folder, split="train") -> dict[str, dict[str, dict[str, bytes]]]:
    """{shard name: {key: {ext: bytes}}} read with plain tarfile."""
    shards = {}
    for path in sorted(folder.glob(f"{split}-*.tar")):
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        shards[path.name] = samples
    return shards


@pytest.fixture
def image_folder(tmp_path):
    """12 good images in two classes (JPEG of several sizes, one PNG) + a truncated JPEG, a zero-byte file
    and a text file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    good = {}
    for i in range(12):
        cls = ("cat", "dog")[i % 2]
        (root / cls).mkdir(parents=True, exist_ok=True)
        path = root / cls / (f"{i:02d}.png" if i == 5 else f"{i:02d}.jpg")
        Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(path)
        good[path.read_bytes()] = cls
    whole = (root / "cat" / "00.jpg").read_bytes()
    (root / "dog" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "dog" / "empty.jpg").write_bytes(b"")
    (root / "readme.txt").write_text("not an image")
    return root, good


def test_image_folder_every_good_image_once_and_bad_ones_counted(image_folder, tmp_path):
    root, good = image_folder
    out = tmp_path / "shards"
    assert _run("--source", "image_folder", "--input", str(root), "--output", str(out),
                "--samples_per_shard", "4", "--workers", "2", "--val_fraction", "0") == 0
    shards = _read_tars(out)
    assert list(shards) == [f"train-{i:06d}.tar" for i in range(4)]  # 15 files planned -> 4 shards
    images = Counter(s.get("jpg", s.get("png")) for samples in shards.values() for s in samples.values())
    assert images == Counter(list(good))  # original bytes, each good image exactly once
    classes = ["cat", "dog"]
    for samples in shards.values():
        for sample in samples.values():
            image = sample.get("jpg", sample.get("png"))
            assert classes[int(sample["cls"])] == good[image]
    keys = [k for samples in shards.values() for k in samples]
    assert len(set(keys)) == 12 and all(len(k) == 9 and k.isdigit() for k in keys)

    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {name: len(samples) for name, samples in shards.items()}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 12 and manifest["bad_count"] == 3 and manifest["classes"] == classes
    assert sorted(b["path"].rsplit("/", 1)[1] for b in manifest["bad"]) == ["empty.jpg", "readme.txt", "truncated.jpg"]
    assert manifest["splits"]["train"]["pattern"] == "train-{000000..000003}.tar"

    dataset = wds.WebDataset(str(out / "train-{000000..000003}.tar"), shardshuffle=False).decode("pil")
    decoded = list(dataset)
    assert len(decoded) == 12 and all(isinstance(s.get("jpg", s.get("png")), Image.Image) for s in decoded)
    assert _run("verify", str(out)) == 0


def test_rerun_after_deleting_the_last_shard_rewrites_only_that_shard(image_folder, tmp_path):
    root, _ = image_folder
    out = tmp_path / "shards"
    args = ["--source", "image_folder", "--input", str(root), "--output", str(out), "--samples_per_shard", "4",
            "--val_fraction", "0", "--workers", "0"]
    assert _run(*args) == 0
    names = sorted(p.name for p in out.glob("train-*.tar"))
    before = {n: (out / n).stat() for n in names}
    last_bytes = (out / names[-1]).read_bytes()
    (out / names[-1]).unlink()
    (out / "sizes.json").unlink()
    (out / f".{names[0]}.123.tmp").write_bytes(b"partial junk of a killed run")
    time.sleep(0.05)
    assert _run(*args) == 0
    for name in names[:-1]:
        after = (out / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before[name].st_ino, before[name].st_mtime_ns)
    assert (out / names[-1]).read_bytes() == last_bytes  # rewritten, and reproducibly so
    assert sum(json.loads((out / "sizes.json").read_text()).values()) == 12
    changed = [*args[:-2], "--workers", "0", "--samples_per_shard", "5"]
    assert _run(*changed) == 2  # other options on the same output refuse to mix


def test_resize_center_crop_and_format(image_folder, tmp_path):
    root, _ = image_folder
    out = tmp_path / "shards"
    assert _run("--source", "image_folder", "--input", str(root), "--output", str(out), "--resize", "16",
                "--format", "webp", "--workers", "0", "--val_fraction", "0") == 0
    samples = [s for shard in _read_tars(out).values() for s in shard.values()]
    assert len(samples) == 12
    for sample in samples:
        image = Image.open(io.BytesIO(sample["webp"]))
        assert image.format == "WEBP" and image.size == (16, 16)
    assert json.loads((out / "manifest.json").read_text())["resize"]["shorter_side"] == 16


def test_fake_cifar_batch_train_and_test_splits(tmp_path):
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    arrays = {}
    for name, n in (("data_batch_1", 10), ("test_batch", 4)):
        arrays[name] = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": arrays[name], "labels": [0] * n}, fh)
    out = tmp_path / "shards"
    assert _run("--source", "cifar10", "--input", str(tmp_path / "cifar"), "--output", str(out),
                "--samples_per_shard", "3", "--no-download", "--no-shuffle") == 0
    train, val = _read_tars(out, "train"), _read_tars(out, "val")
    assert len(train) == 4 and len(val) == 2
    first = np.asarray(Image.open(io.BytesIO(train["train-000000.tar"]["000000000"]["png"])))
    assert np.array_equal(first, arrays["data_batch_1"][0].reshape(3, 32, 32).transpose(1, 2, 0))  # lossless
    val_keys = sorted(k for shard in val.values() for k in shard)
    assert val_keys == [f"{i:09d}" for i in range(10, 14)]  # global keys continue after the training items
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(v for k, v in sizes.items() if k.startswith("val")) == 4


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_dataset_saved_to_disk(tmp_path, streaming):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)) for _ in range(9)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    ds = datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(9)]}, features=features)
    datasets.DatasetDict({"train": ds, "test": ds.select([0, 1])}).save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "shards"
    args = ["--source", "hf", "--input", str(tmp_path / "hf"), "--output", str(out), "--samples_per_shard", "4",
            "--workers", "1", "--no-shuffle"] + (["--streaming"] if streaming else [])
    assert _run(*args) == 0
    train = [s for shard in _read_tars(out).values() for s in shard.values()]
    assert [int(s["cls"]) for s in train] == [i % 3 for i in range(9)]
    stored = [ds.cast_column("image", datasets.Image(decode=False))[i]["image"]["bytes"] for i in range(9)]
    assert [s["png"] for s in train] == stored  # PNG bytes passed through untouched
    assert sorted(k for shard in _read_tars(out, "val").values() for k in shard) == ["000000009", "000000010"]
    assert json.loads((out / "manifest.json").read_text())["classes"] == ["a", "b", "c"]


def test_missing_or_empty_source_is_one_line_and_exit_2(tmp_path, capsys):
    assert _run("--source", "image_folder", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bavq-prep: error:") and "nope" in err and "\n" not in err
    (tmp_path / "empty").mkdir()
    assert _run("--source", "image_folder", "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o")) == 2
    assert "holds no images" in capsys.readouterr().err
    assert _run("--source", "cifar10", "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o"),
                "--no-download") == 2
    assert "CIFAR-10 not found" in capsys.readouterr().err
    assert _run("verify", str(tmp_path / "missing-{000000..000001}.tar")) == 2
    assert _run("--source", "bogus", "--output", str(tmp_path / "o")) == 2


def test_verify_reports_corrupt_members_and_size_mismatches(tmp_path, capsys):
    good = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(good, format="PNG")
    with wds.TarWriter(str(tmp_path / "x-000000.tar")) as tar:
        tar.write({"__key__": "000000000", "png": good.getvalue()})
        tar.write({"__key__": "000000001", "jpg": b"\xff\xd8 definitely not a jpeg"})
    (tmp_path / "sizes.json").write_text(json.dumps({"x-000000.tar": 3}))
    assert _run("verify", str(tmp_path / "x-000000.tar")) == 1
    out = capsys.readouterr().out
    assert "1 corrupt" in out and "sizes.json says 3" in out and "2 samples" in out


def test_parts_of_an_array_job_add_up_to_a_single_run(image_folder, tmp_path):
    root, _ = image_folder
    common = ["--source", "image_folder", "--input", str(root), "--samples_per_shard", "4", "--workers", "0"]
    assert _run(*common, "--output", str(tmp_path / "whole")) == 0
    for part in ("0", "1"):
        assert not (tmp_path / "parts" / "sizes.json").exists()
        assert _run(*common, "--output", str(tmp_path / "parts"), "--part", part, "--num_parts", "2") == 0
    for name in ("sizes.json", "train-000000.tar", "train-000003.tar"):
        assert (tmp_path / "parts" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
