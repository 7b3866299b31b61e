"""Readers of the raw sources: Fashion-MNIST (IDX), CIFAR-10 (python pickles), image folders, HF datasets.

Each source gives a training and a held-out split. Sources with their own test split use it
(Fashion-MNIST t10k, CIFAR-10 test_batch, an image folder's ``val/``, an HF ``validation``/``test``
split); the others hold out a deterministic ``val_fraction`` (:func:`holdout_split`, also used by
``bavq-prep`` so shards and map-style runs agree). Both the map-style loaders and the shard
writer read through this module. Missing data is a one-line :class:`ConfigError` that says where
we looked and how to get the data.
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from bavq.config import ConfigError, DataConfig
from bavq.paths import first_missing, remove_created

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)  # Debian's dataset-fashion-mnist
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
HOLDOUT_SEED = 20240601  # fixed: the held-out split must not move when train.seed changes
VAL_DIR_NAMES = ("val", "validation", "test")


def default_root(source: str) -> Path:
    """Where downloads go when data.root is empty."""
    return Path(os.environ.get("BAVQ_DATA", Path.home() / ".cache" / "bavq")) / source


# ----------------------------------------------------------------------------- splits
def holdout_split(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic (train, held-out) index lists, each sorted; held-out has ceil(n * fraction)."""
    n_val = min(n - 1, max(1, int(np.ceil(n * fraction)))) if n > 1 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(HOLDOUT_SEED)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def _limit(indices: list[int], limit: int) -> list[int]:
    return indices[:limit] if limit > 0 else indices


# ----------------------------------------------------------------------------- Fashion-MNIST
def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a numpy array of its declared shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ConfigError(f"'{path}' is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ConfigError(f"'{path}' is truncated ({array.size} bytes for shape {shape})")
    return array.reshape(shape).copy()  # writable (frombuffer views are read-only)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for sub in ("", "FashionMNIST/raw", "raw"):
        for suffix in ("", ".gz"):
            path = folder / sub / f"{stem}{suffix}"
            if path.is_file():
                return path
    return None


@functools.lru_cache(maxsize=2)  # evaluations rebuild their loader; do not re-read the files each time
def load_fashion_mnist(root: str = "", download: bool = False, root_hint: str = "data.root=FOLDER"
                       ) -> dict[str, np.ndarray]:
    """{"train": (60000, 28, 28), "val": (10000, 28, 28)} uint8 from root, Debian's files or a download."""
    folders = [Path(root)] if root else [Path(d) for d in FASHION_MNIST_DIRS] + [default_root("fashion_mnist")]
    for folder in folders:
        train, test = _find_idx(folder, "train-images-idx3-ubyte"), _find_idx(folder, "t10k-images-idx3-ubyte")
        if train and test:
            return {"train": read_idx(train), "val": read_idx(test)}
    if download:
        target = Path(root) if root else default_root("fashion_mnist")
        created = first_missing(target)
        try:
            from torchvision.datasets import FashionMNIST

            for train in (True, False):
                FashionMNIST(str(target), train=train, download=True)
            return load_fashion_mnist(str(target), False, root_hint)
        except Exception as exc:  # noqa: BLE001 - network errors come in many types
            remove_created(created)  # a failed download leaves no empty folder behind
            reason = f"download failed ({str(exc).splitlines()[0][:120]})"
    else:
        reason = "data.download is false"
    where = ", ".join(str(f) for f in folders)
    raise ConfigError(f"Fashion-MNIST not found in {where} and {reason}; install it with "
                      f"`apt-get install -y dataset-fashion-mnist` or set {root_hint} with the IDX files")


# ----------------------------------------------------------------------------- CIFAR-10
def _cifar_folder(root: Path) -> Path | None:
    for folder in (root / "cifar-10-batches-py", root):
        if (folder / "data_batch_1").is_file() and (folder / "test_batch").is_file():
            return folder
    return None


def read_cifar_batch(path: str | Path) -> np.ndarray:
    """One CIFAR-10 python batch file -> (N, 32, 32, 3) uint8."""
    with open(path, "rb") as fh:
        entry = pickle.load(fh, encoding="latin1")
    data = np.asarray(entry["data"], dtype=np.uint8)
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


@functools.lru_cache(maxsize=2)
def load_cifar10(root: str = "", download: bool = False, root_hint: str = "data.root=FOLDER"
                 ) -> dict[str, np.ndarray]:
    """{"train": (50000, 32, 32, 3), "val": (10000, 32, 32, 3)} uint8 from the torchvision layout."""
    base = Path(root) if root else default_root("cifar10")
    folder = _cifar_folder(base)
    reason = "data.download is false"
    if folder is None and download:
        created = first_missing(base)
        try:
            from torchvision.datasets import CIFAR10

            CIFAR10(str(base), train=True, download=True)
            folder = _cifar_folder(base)
        except Exception as exc:  # noqa: BLE001
            reason = f"download failed ({str(exc).splitlines()[0][:120]})"
        if folder is None:
            remove_created(created)  # a failed download leaves no empty folder behind
    if folder is None:
        where = "" if root else " (the default: $BAVQ_DATA/cifar10, BAVQ_DATA defaulting to ~/.cache/bavq)"
        raise ConfigError(f"CIFAR-10 not found in {base}{where} (expected cifar-10-batches-py/data_batch_1..5 "
                          f"and test_batch) and {reason}; set {root_hint} or allow downloads where online")
    batches = sorted(folder.glob("data_batch_*"))
    train = np.concatenate([read_cifar_batch(p) for p in batches])
    return {"train": train, "val": read_cifar_batch(folder / "test_batch")}


# ----------------------------------------------------------------------------- image folders
@dataclass
class FolderListing:
    """Relative file paths per split (sorted) and the class names (first directory level)."""

    root: Path
    splits: dict[str, list[str]]  # split -> paths relative to root
    classes: list[str] = field(default_factory=list)
    _index: dict[str, int] | None = field(default=None, repr=False)

    def label(self, relpath: str) -> int | None:
        """Class index of a file (its first directory below the split folder), None for loose files."""
        parts = Path(relpath).parts[1:] if self.has_split_dirs else Path(relpath).parts
        if len(parts) < 2:
            return None
        if self._index is None:
            self._index = {name: i for i, name in enumerate(self.classes)}
        return self._index.get(parts[0])

    @property
    def has_split_dirs(self) -> bool:
        return "val" in self.splits


def _walk(folder: Path, base: Path, images_only: bool) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or (images_only and not name.lower().endswith(IMAGE_EXTENSIONS)):
                continue
            found.append(Path(dirpath, name).relative_to(base).as_posix())
    return sorted(found)


def list_image_folder(root: str | Path, images_only: bool = True) -> FolderListing:
    """List an image folder. ``root/train`` + ``root/val`` become the two splits, else all is train.

    ``images_only=False`` lists every non-hidden file, so the shard writer can count non-images as bad.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"image folder '{root}' does not exist")
    val_dir = next((root / d for d in VAL_DIR_NAMES if (root / d).is_dir()), None)
    if (root / "train").is_dir() and val_dir is not None:
        splits = {"train": _walk(root / "train", root, images_only), "val": _walk(val_dir, root, images_only)}
        class_root = root / "train"
    else:
        splits = {"train": _walk(root, root, images_only)}
        class_root = root
    classes = sorted(d.name for d in class_root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not splits["train"]:
        raise ConfigError(f"image folder '{root}' holds no images")
    return FolderListing(root, splits, classes)


# ----------------------------------------------------------------------------- HF datasets
def load_hf(name: str, image_key: str = "image", streaming: bool = False) -> dict[str, Any]:
    """{"train": dataset, "val": dataset or None} from a ``load_from_disk`` folder or a hub name.

    The image column is cast to undecoded bytes so readers can skip corrupt images themselves
    and writers can keep the original bytes.
    """
    import datasets

    try:
        if Path(name).is_dir():
            loaded = datasets.load_from_disk(name)
            if streaming:
                loaded = _to_iterable(loaded)
        else:
            loaded = datasets.load_dataset(name, streaming=streaming)
    except Exception as exc:  # noqa: BLE001 - hub, network and format errors come in many types
        raise ConfigError(f"HF dataset '{name}' could not be loaded: {str(exc).splitlines()[0][:200]}") from None
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        train_name = "train" if "train" in loaded else next(iter(loaded))
        val_name = next((s for s in ("validation", "val", "test") if s in loaded and s != train_name), None)
        splits = {"train": loaded[train_name], "val": loaded[val_name] if val_name else None}
    else:
        splits = {"train": loaded, "val": None}
    for key, split in splits.items():
        if split is None:
            continue
        columns = split.column_names  # None for some streamed datasets: checked when rows arrive
        if columns is not None and image_key not in columns:
            raise ConfigError(f"HF dataset '{name}' has no column '{image_key}' (columns: {columns}); "
                              "set data.hf_image_key")
        if split.features is not None and isinstance(split.features.get(image_key), datasets.Image):
            splits[key] = split.cast_column(image_key, datasets.Image(decode=False))
    return splits


def _to_iterable(loaded):
    if hasattr(loaded, "to_iterable_dataset"):
        return loaded.to_iterable_dataset()
    import datasets

    return datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in loaded.items()})


def hf_image_bytes(value) -> bytes:
    """Encoded image bytes of one HF image cell ({"bytes", "path"} when undecoded, or a PIL image)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            return Path(value["path"]).read_bytes()
        raise ValueError("empty image cell")
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise ValueError(f"unsupported image cell of type {type(value).__name__}")


def decode_image(data: bytes) -> Image.Image:
    """Fully decode encoded image bytes (truncated or corrupt data raises here, not later)."""
    if not data:
        raise ValueError("empty file")
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# ----------------------------------------------------------------------------- map-style splits
class MapSplit:
    """One split of a source for map-style reading: ``load(i)`` gives image ``i`` of the split.

    ``indices`` are positions in the underlying source; keys are ``"{split}/{index:09d}"``.
    """

    def __init__(self, split: str, indices: list[int], loader: Callable[[int], Any]):
        self.split, self.indices, self._loader = split, list(indices), loader

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int):
        """PIL image or uint8 (C, H, W) tensor of item ``i``; raises on unreadable data."""
        return self._loader(self.indices[i])

    def key(self, i: int) -> str:
        return f"{self.split}/{self.indices[i]:09d}"


def _array_loader(images: torch.Tensor) -> Callable[[int], torch.Tensor]:
    return images.__getitem__


class _FileLoader:
    def __init__(self, root: Path, paths: list[str]):
        self.root, self.paths = root, paths

    def __call__(self, index: int) -> Image.Image:
        return decode_image((self.root / self.paths[index]).read_bytes())


class _HFLoader:
    def __init__(self, dataset, image_key: str):
        self.dataset, self.image_key = dataset, image_key

    def __call__(self, index: int) -> Image.Image:
        return decode_image(hf_image_bytes(self.dataset[index][self.image_key]))


def _pad_fashion_mnist(images: np.ndarray) -> torch.Tensor:
    # 28 -> 32 with background (0, i.e. -1 after scaling) so 4x down-sampling gives 8x8 codes
    tensor = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)  # (N, 1, 28, 28)
    return torch.nn.functional.pad(tensor, (2, 2, 2, 2), value=0)


def _splits_with_holdout(n_train: int, n_val: int | None, cfg: DataConfig):
    """(train indices, val indices, val comes from the train pool)."""
    if n_val is None:
        train, val = holdout_split(n_train, cfg.val_fraction)
        return _limit(train, cfg.train_limit), _limit(val, cfg.val_limit), True
    return _limit(list(range(n_train)), cfg.train_limit), _limit(list(range(n_val)), cfg.val_limit), False


def load_map_splits(cfg: DataConfig) -> tuple[MapSplit, MapSplit]:
    """(train, held-out) map-style splits of a non-shard source, limits applied."""
    if cfg.source in ("fashion_mnist", "cifar10"):
        if cfg.source == "fashion_mnist":
            arrays = {k: _pad_fashion_mnist(v) for k, v in load_fashion_mnist(cfg.root, cfg.download).items()}
        else:
            arrays = {k: torch.from_numpy(v).permute(0, 3, 1, 2).contiguous()
                      for k, v in load_cifar10(cfg.root, cfg.download).items()}
        train, val, _ = _splits_with_holdout(len(arrays["train"]), len(arrays["val"]), cfg)
        return (MapSplit("train", train, _array_loader(arrays["train"])),
                MapSplit("val", val, _array_loader(arrays["val"])))
    if cfg.source == "image_folder":
        listing = list_image_folder(cfg.root)
        paths = listing.splits
        n_val = len(paths["val"]) if "val" in paths else None
        train, val, pooled = _splits_with_holdout(len(paths["train"]), n_val, cfg)
        val_paths = paths["train"] if pooled else paths["val"]
        return (MapSplit("train", train, _FileLoader(listing.root, paths["train"])),
                MapSplit("val", val, _FileLoader(listing.root, val_paths)))
    if cfg.source == "hf":
        splits = load_hf(cfg.hf_name, cfg.hf_image_key)
        n_val = len(splits["val"]) if splits["val"] is not None else None
        train, val, pooled = _splits_with_holdout(len(splits["train"]), n_val, cfg)
        val_set = splits["train"] if pooled else splits["val"]
        return (MapSplit("train", train, _HFLoader(splits["train"], cfg.hf_image_key)),
                MapSplit("val", val, _HFLoader(val_set, cfg.hf_image_key)))
    raise ConfigError(f"config key 'data.source': '{cfg.source}' is not a map-style source")
