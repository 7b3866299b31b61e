"""Map-style data: sources, transforms, the exact rank/epoch/resume rule, the held-out reader."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from _builders import eval_loader, train_stream
from PIL import Image

from bavq.config import ConfigError, load_config
from bavq.data.sources import holdout_split, load_fashion_mnist, read_idx
from bavq.data.transforms import ImageTransform, generator_for


def _cfg(*overrides: str):
    return load_config(None, ["train.max_steps=1", "data.num_workers=0", "data.download=false", *overrides])


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fmnist_root(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(1, 256, (40, 28, 28)))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(1, 256, (9, 28, 28)))
    return tmp_path


@pytest.fixture
def cifar_root(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("data_batch_1", 30), ("test_batch", 7)):
        data = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": data, "labels": list(range(n))}, fh)
    return tmp_path


def test_transform_shapes_range_and_seeded_randomness():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    center = ImageTransform(32, 3)(image)
    assert center.shape == (3, 32, 32) and center.dtype == torch.float32
    assert -1.0 <= center.min() and center.max() <= 1.0
    aug = ImageTransform(32, 1, train=True, crop_scale=0.3, flip=True)
    a, b = aug(image, generator_for(1, 2, 3)), aug(image, generator_for(1, 2, 3))
    assert a.shape == (1, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, aug(image, generator_for(1, 2, 4)))
    gray = torch.full((1, 32, 32), 255, dtype=torch.uint8)
    assert torch.equal(ImageTransform(32, 3)(gray), torch.ones(3, 32, 32))


def test_holdout_split_is_deterministic_disjoint_and_complete():
    train, val = holdout_split(100, 0.1)
    assert len(val) == 10 and sorted(train + val) == list(range(100))
    assert holdout_split(100, 0.1) == (train, val) and val != list(range(90, 100))


def test_fashion_mnist_from_idx_is_padded_with_background(fmnist_root):
    raw = load_fashion_mnist(str(fmnist_root))
    assert raw["train"].shape == (40, 28, 28) and raw["val"].shape == (9, 28, 28)
    assert np.array_equal(read_idx(fmnist_root / "t10k-images-idx3-ubyte.gz"), raw["val"])
    cfg = _cfg("data.source=fashion_mnist", f"data.root={fmnist_root}", "train.batch_size=40", "train.seed=3")
    batch = next(train_stream(cfg, 0, 1).iterate())
    assert batch.shape == (40, 3, 32, 32)
    assert torch.all(batch[:, :, :2, :] == -1) and torch.all(batch[:, :, :, -2:] == -1)  # background border
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    expected = torch.from_numpy(raw["train"][perm[0].item()]).float() / 127.5 - 1
    assert torch.allclose(batch[0, 1, 2:30, 2:30], expected)
    gray = _cfg("data.source=fashion_mnist", f"data.root={fmnist_root}", "data.channels=1", "model.in_channels=1",
                "train.batch_size=8", "data.train_limit=16")
    stream = train_stream(gray, 0, 1)
    assert stream.num_samples == 16 and next(stream.iterate()).shape == (8, 1, 32, 32)


def test_missing_fashion_mnist_is_a_one_line_config_error(tmp_path):
    cfg = _cfg("data.source=fashion_mnist", f"data.root={tmp_path}")
    with pytest.raises(ConfigError) as err:
        train_stream(cfg, 0, 1)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path) in message and "apt-get install -y dataset-fashion-mnist" in message


def test_cifar_batches_and_test_split(cifar_root):
    cfg = _cfg("data.source=cifar10", f"data.root={cifar_root}", "train.batch_size=10", "eval.batch_size=4")
    stream = train_stream(cfg, 0, 1)
    assert stream.num_samples == 30 and stream.batches_per_epoch == 3
    keys = [k for _, ks in eval_loader(cfg, 0, 1) for k in ks]
    assert keys == [f"val/{i:09d}" for i in range(7)]  # CIFAR-10's own test_batch is the held-out split
    with open(cifar_root / "cifar-10-batches-py" / "test_batch", "rb") as fh:
        first = np.asarray(pickle.load(fh)["data"][0], dtype=np.uint8).reshape(3, 32, 32)
    images, _ = next(iter(eval_loader(cfg, 0, 1)))
    assert torch.allclose(images[0], torch.from_numpy(first).float() / 127.5 - 1)


@pytest.mark.parametrize("augment", [False, True])
def test_two_ranks_concatenate_to_the_one_process_batch(cifar_root, augment):
    extra = ["data.random_flip=true", "data.random_crop_scale=0.5"] if augment else []
    base = ["data.source=cifar10", f"data.root={cifar_root}", "train.seed=7", *extra]
    one = train_stream(_cfg(*base, "train.batch_size=8"), 0, 1)
    ranks = [train_stream(_cfg(*base, "train.batch_size=4", "data.num_workers=2"), r, 2) for r in (0, 1)]
    assert one.batches_per_epoch == ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == 3
    steps = 7  # crosses two epoch boundaries (and the dropped remainder of 6 images)
    expected = [b for _, b in zip(range(steps), one.iterate())]
    got = [list(zip(range(steps), s.iterate())) for s in ranks]
    for step in range(steps):
        assert torch.equal(torch.cat([got[0][step][1], got[1][step][1]]), expected[step])


def test_iterate_resumes_exactly_without_loading_skipped_images(cifar_root):
    cfg = _cfg("data.source=cifar10", f"data.root={cifar_root}", "train.batch_size=4", "data.random_flip=true")
    stream = train_stream(cfg, 1, 2)
    reference = [b for _, b in zip(range(9), stream.iterate())]
    loads = []
    original = stream.split.load
    stream.split.load = lambda i: loads.append(i) or original(i)
    resumed = [b for _, b in zip(range(4), stream.iterate(5))]
    assert all(torch.equal(a, b) for a, b in zip(resumed, reference[5:]))
    assert len(loads) == 4 * 4  # only the images of the four batches served


def test_eval_reader_sees_every_held_out_image_once(fmnist_root):
    cfg = _cfg("data.source=fashion_mnist", f"data.root={fmnist_root}", "eval.batch_size=2", "data.num_workers=2")
    per_rank = [[k for _, ks in eval_loader(cfg, r, 3) for k in ks] for r in range(3)]
    everything = sorted(k for keys in per_rank for k in keys)
    assert everything == [f"val/{i:09d}" for i in range(9)]
    limited = _cfg("data.source=fashion_mnist", f"data.root={fmnist_root}", "data.val_limit=5")
    assert sum(len(ks) for _, ks in eval_loader(limited, 0, 1)) == 5


def _folder(root, n: int, corrupt: bool):
    rng = np.random.default_rng(2)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(root / f"c{i % 2}/{i:02d}.jpg")
    if corrupt:
        (root / "c0" / "bad.jpg").write_bytes((root / "c0/00.jpg").read_bytes()[:60])


def test_image_folder_corrupt_images_are_replaced_and_counted(tmp_path):
    _folder(tmp_path / "train", 9, corrupt=True)
    _folder(tmp_path / "val", 3, corrupt=False)
    cfg = _cfg("data.source=image_folder", f"data.root={tmp_path}", "train.batch_size=5", "data.image_size=16")
    stream = train_stream(cfg, 0, 1)
    assert stream.num_samples == 10 and stream.batches_per_epoch == 2
    batches = [b for _, b in zip(range(4), stream.iterate())]
    assert all(b.shape == (5, 3, 16, 16) for b in batches)
    assert stream.skipped == 2  # the truncated JPEG came up once in each of the two epochs
    keys = [k for _, ks in eval_loader(cfg, 0, 1) for k in ks]
    assert keys == [f"val/{i:09d}" for i in range(3)]  # root/val is the held-out split


def test_hf_dataset_from_disk_with_holdout_and_test_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)) for _ in range(20)]
    ds = datasets.Dataset.from_dict({"img": images}).cast_column("img", datasets.Image())
    ds.save_to_disk(str(tmp_path / "single"))
    cfg = _cfg("data.source=hf", f"data.hf_name={tmp_path / 'single'}", "data.hf_image_key=img",
               "data.val_fraction=0.25", "train.batch_size=5", "data.image_size=8")
    stream = train_stream(cfg, 0, 1)
    assert stream.num_samples == 15 and next(stream.iterate()).shape == (5, 3, 8, 8)
    _, val = holdout_split(20, 0.25)
    assert [k for _, ks in eval_loader(cfg, 0, 1) for k in ks] == [f"val/{i:09d}" for i in val]
    datasets.DatasetDict({"train": ds, "test": ds.select(range(4))}).save_to_disk(str(tmp_path / "dict"))
    cfg = _cfg("data.source=hf", f"data.hf_name={tmp_path / 'dict'}", "data.hf_image_key=img", "train.batch_size=5")
    assert train_stream(cfg, 0, 1).num_samples == 20
    assert sum(len(ks) for _, ks in eval_loader(cfg, 0, 1)) == 4


def test_training_set_smaller_than_a_global_batch_is_a_config_error(cifar_root):
    cfg = _cfg("data.source=cifar10", f"data.root={cifar_root}", "train.batch_size=16")
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        train_stream(cfg, 0, 2)
