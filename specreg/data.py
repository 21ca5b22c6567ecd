"""Datasets as tensors on the training device, and index-slicing batches with on-device augmentation.

`load(spec, device)` looks the spec's `name` up in `DATASETS`; a loader returns numpy `Arrays` and `load`
applies the keys every dataset shares (`classes`, `train_subset`, `test_subset`, `augment`, `seed`),
converts to float32 pixels in [0, 1] and moves everything to the device. Add a dataset by writing a loader
`fn(spec) -> Arrays` and decorating it with `@register(name, keys=...)`, with the facts known before loading
(`input_shape`, `num_classes`, `flippable`) where they are fixed: the config checks a model and placement
against them, and SSL's default views flip only flippable images.

File datasets are looked for in the spec's `root` (default `~/.cache/specreg`), then `$SPECREG_DATA`, then
system folders (the Debian `fashion-mnist` package), and only then downloaded with torchvision into `root`.
"""
from __future__ import annotations

import functools
import gzip
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_ROOT = "~/.cache/specreg"
COMMON_KEYS = frozenset({"name", "classes", "train_subset", "test_subset", "seed", "augment"})


class DatasetNotFound(ValueError):
    """The dataset is in none of the places looked and could not be downloaded; `.looked` lists them."""

    def __init__(self, name: str, looked: list[str]):
        self.name, self.looked = name, looked
        super().__init__(f"dataset {name!r} not found; looked in: " + "; ".join(looked))

    def __reduce__(self):  # so that it survives pickling (a Ray worker sends it to the driver)
        return type(self), (self.name, self.looked)


@dataclass
class Data:
    """A loaded dataset: images N×C×H×W (or points N×D) as float32 in [0, 1], int64 labels, on one device."""

    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = field(repr=False)
    y_test: torch.Tensor = field(repr=False)
    num_classes: int
    input_shape: tuple
    name: str
    augment: str | None = None
    classes: tuple = ()  # original label of each class index (differs from range(k) after `classes` filtering)


class Arrays(NamedTuple):
    """What a loader returns: x as N×C×H×W or N×D, uint8 (0–255) or float32 (0–1); integer labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


@dataclass(frozen=True)
class Dataset:
    loader: Callable[[dict], Arrays]
    keys: frozenset  # spec keys this loader reads, beyond COMMON_KEYS
    augment: str | None  # default training augmentation
    input_shape: tuple | None = None  # known before loading (None: depends on the files, e.g. npz)
    num_classes: int | None = None  # known before loading (ignoring `classes`)
    flippable: bool = False  # a horizontal flip keeps the label (SSL's default views flip these)


DATASETS: dict[str, Dataset] = {}


def register(name: str, keys=(), augment: str | None = None, input_shape: tuple | None = None,
             num_classes: int | None = None, flippable: bool = False):
    """Decorator adding a loader to `DATASETS` under `name`, with the facts known before loading."""

    def add(fn):
        DATASETS[name] = Dataset(fn, frozenset(keys), augment, input_shape, num_classes, flippable)
        return fn

    return add


def dataset_options(name: str) -> frozenset:
    """The spec keys dataset `name` reads: COMMON_KEYS and its loader's own."""
    return COMMON_KEYS | DATASETS[name].keys


def load(spec: dict, device="cpu") -> Data:
    """Load the dataset a spec names, apply the shared keys, and put it on `device`."""
    name = spec.get("name")
    if name not in DATASETS:
        raise ValueError(f"data.name: unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    dataset = DATASETS[name]
    allowed = COMMON_KEYS | dataset.keys
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"data: unknown key(s) {unknown} for dataset {name!r}; allowed: {sorted(allowed)}")
    augment = spec.get("augment", dataset.augment)
    _augmentation(augment)

    x_train, y_train, x_test, y_test, num_classes = dataset.loader(spec)
    classes = tuple(range(num_classes))
    if spec.get("classes") is not None:
        classes = tuple(int(c) for c in spec["classes"])
        if len(set(classes)) != len(classes) or not all(0 <= c < num_classes for c in classes):
            raise ValueError(f"data.classes: {list(classes)} must be distinct labels in 0..{num_classes - 1}")
        x_train, y_train = _select(x_train, y_train, classes, num_classes)
        x_test, y_test = _select(x_test, y_test, classes, num_classes)
    x_train, y_train = x_train[: spec.get("train_subset")], y_train[: spec.get("train_subset")]
    x_test, y_test = x_test[: spec.get("test_subset")], y_test[: spec.get("test_subset")]
    return Data(_pixels(x_train, device), _labels(y_train, device), _pixels(x_test, device),
                _labels(y_test, device), num_classes=len(classes), input_shape=tuple(x_train.shape[1:]),
                name=name, augment=augment, classes=classes)


def _select(x, y, classes, num_classes):
    """Keep the examples of `classes` and re-index their labels 0..k-1 in the given order."""
    lookup = np.full(num_classes, -1)
    lookup[list(classes)] = np.arange(len(classes))
    new = lookup[y]
    keep = new >= 0
    return x[keep], new[keep]


def _pixels(x: np.ndarray, device) -> torch.Tensor:
    """uint8 → /255 after the (4× smaller) transfer; float is copied so the cached arrays stay untouched."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device).float().div_(255) if x.dtype == np.uint8 else t.to(device, torch.float32, copy=True)


def _labels(y: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(y, dtype=np.int64).copy()).to(device)


# ---------------------------------------------------------------------------------------- finding files

def _cached(fn):
    """Memoise a reader by (path, mtime, size, args) so repeated trials in one process parse files once."""
    memo = functools.lru_cache(maxsize=16)(lambda path, stamp, *args: fn(Path(path), *args))

    @functools.wraps(fn)
    def reader(path, *args):
        stat = os.stat(path)
        return memo(str(path), (stat.st_mtime_ns, stat.st_size), *args)

    return reader


def _search_dirs(spec: dict, subdirs=()) -> list[Path]:
    """`root` then `$SPECREG_DATA`, each itself and with each of `subdirs` appended."""
    bases = [Path(spec.get("root", DEFAULT_ROOT)).expanduser()]
    if os.environ.get("SPECREG_DATA"):
        bases.append(Path(os.environ["SPECREG_DATA"]).expanduser())
    return [base / sub for base in bases for sub in ("", *subdirs)]


def _search_paths(path) -> list[Path]:
    """A user path as given, then (if relative) under `$SPECREG_DATA`."""
    path = Path(path).expanduser()
    env = os.environ.get("SPECREG_DATA")
    return [path] + ([Path(env).expanduser() / path] if env and not path.is_absolute() else [])


def _locate(name: str, places: list[Path], find: Callable, download: tuple | None = None):
    """First `find(place)` that is not None; otherwise run `download = (root, thunk)` and look again.
    A thunk of None means downloading is switched off. Raises DatasetNotFound listing every place."""
    for place in places:
        if (found := find(place)) is not None:
            return found
    looked = [str(p) for p in places]
    if download is not None:
        root, thunk = download
        if thunk is None:
            looked.append(f"no download into {root} (data.download is false)")
        else:
            try:
                thunk()
            except Exception as error:  # noqa: BLE001 - any download failure ends in DatasetNotFound
                looked.append(f"torchvision download into {root} failed ({type(error).__name__}: {error})")
            else:
                for place in places:
                    if (found := find(place)) is not None:
                        return found
                looked.append(f"torchvision download into {root} (files still missing)")
    raise DatasetNotFound(name, looked)


def _torchvision_download(spec: dict, class_name: str) -> tuple:
    """(root, thunk downloading the torchvision dataset `class_name` into root, or None if switched off)."""
    root = Path(spec.get("root", DEFAULT_ROOT)).expanduser()

    def thunk():
        import torchvision

        getattr(torchvision.datasets, class_name)(str(root), train=False, download=True)

    return root, thunk if spec.get("download", True) else None


# ---------------------------------------------------------------------------------------- loaders

@register("digits", keys=("test_fraction",), input_shape=(1, 8, 8), num_classes=10)
def _digits(spec: dict) -> Arrays:
    """scikit-learn's 8×8 digits (0–16 → [0, 1]), split stratified with `seed` (default 20% test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images[:, None] / 16).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=spec.get("test_fraction", 0.2), stratify=digits.target,
        random_state=spec.get("seed", 0))
    return Arrays(x_train, y_train, x_test, y_test, 10)


# torchvision's MNIST classes read only uncompressed files under `root/<Class>/raw`, so they cannot use a
# folder of .gz files (the Debian package) without copying it; a ten-line IDX reader reads any of them.
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte")
_IDX_SOURCES = {  # name: (subfolders of root / $SPECREG_DATA, system folders, torchvision class)
    "mnist": (("mnist", "MNIST/raw"), (), "MNIST"),
    "fashion_mnist": (("fashion_mnist", "fashion-mnist", "FashionMNIST/raw"),
                      ("/usr/share/datasets/fashion-mnist",), "FashionMNIST"),
}


@_cached
def _read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (gzipped or not): big-endian header, then the payload."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        raw = f.read()
    if raw[:3] != b"\0\0\x08":
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = np.frombuffer(raw, ">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def _idx_files(folder: Path):
    """The four IDX files in `folder` (each .gz or plain), or None if any is missing."""
    files = []
    for stem in _IDX_FILES:
        candidates = [folder / f"{stem}.gz", folder / stem]
        files.append(next((p for p in candidates if p.is_file()), None))
    return None if None in files else files


def _locate_idx(spec: dict):
    subdirs, system, class_name = _IDX_SOURCES[spec["name"]]
    places = _search_dirs(spec, subdirs) + [Path(p) for p in system]
    return _locate(spec["name"], places, _idx_files, _torchvision_download(spec, class_name))


def check_available(spec: dict) -> None:
    """Raise DatasetNotFound unless a downloadable dataset (MNIST, Fashion-MNIST, CIFAR) is on disk or can
    be downloaded now (it is then downloaded), without reading it: for a driver that checks before it
    starts trials. Other datasets are not checked here."""
    if spec["name"] in _CIFAR_SOURCES:
        _locate_cifar(spec)
    elif spec["name"] in _IDX_SOURCES:
        _locate_idx(spec)


@register("mnist", keys=("root", "download"), input_shape=(1, 28, 28), num_classes=10)
@register("fashion_mnist", keys=("root", "download"), input_shape=(1, 28, 28), num_classes=10, flippable=True)
def _idx_dataset(spec: dict) -> Arrays:
    """MNIST / Fashion-MNIST from IDX files, 1×28×28."""
    files = _locate_idx(spec)
    x_train, y_train, x_test, y_test = (_read_idx(p) for p in files)
    return Arrays(x_train[:, None], y_train, x_test[:, None], y_test, 10)


# torchvision's CIFAR classes check the md5 of every batch file and refuse any other copy (and tests'
# tiny files), so the pickled batches are read here; torchvision only downloads.
_CIFAR_SOURCES = {  # name: (folder, train files, test files, label key, classes, torchvision class)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "labels", 10, "CIFAR10"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100, "CIFAR100"),
}


@_cached
def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    return entry["data"].reshape(-1, 3, 32, 32), np.asarray(entry[label_key])


def _locate_cifar(spec: dict) -> Path:
    folder, train_files, test_files, _, _, class_name = _CIFAR_SOURCES[spec["name"]]

    def find(place: Path):
        return place if all((place / f).is_file() for f in train_files + test_files) else None

    places = _search_dirs(spec, (folder, f"{spec['name']}/{folder}"))
    return _locate(spec["name"], places, find, _torchvision_download(spec, class_name))


@register("cifar10", keys=("root", "download"), augment="crop-flip", input_shape=(3, 32, 32), num_classes=10,
          flippable=True)
@register("cifar100", keys=("root", "download"), augment="crop-flip", input_shape=(3, 32, 32), num_classes=100,
          flippable=True)
def _cifar(spec: dict) -> Arrays:
    """CIFAR-10 / CIFAR-100 (fine labels) from the python pickle batches, 3×32×32."""
    folder, train_files, test_files, label_key, num_classes, class_name = _CIFAR_SOURCES[spec["name"]]
    found = _locate_cifar(spec)

    def read(files):
        parts = [_read_cifar_batch(found / f, label_key) for f in files]
        return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])

    return Arrays(*read(train_files), *read(test_files), num_classes)


@register("npz", keys=("path",))
def _npz(spec: dict) -> Arrays:
    """A .npz with x_train, y_train, x_test, y_test (the Keras convention): images N×H×W, N×H×W×C
    (trailing dim 1 or 3) or N×C×H×W, or points N×D; uint8 0–255 or float 0–1."""
    if "path" not in spec:
        raise ValueError("data.path: required for dataset 'npz'")
    path = _locate("npz", _search_paths(spec["path"]), lambda p: p if p.is_file() else None)
    return _read_npz(path)


@_cached
def _read_npz(path: Path) -> Arrays:
    with np.load(path, allow_pickle=False) as f:
        missing = sorted({"x_train", "y_train", "x_test", "y_test"} - set(f.files))
        if missing:
            raise ValueError(f"{path}: missing array(s) {missing}")
        x_train, x_test = (_as_pixels(f[k], f"{path}:{k}") for k in ("x_train", "x_test"))
        y_train, y_test = (f[k].reshape(-1).astype(np.int64) for k in ("y_train", "y_test"))
    return Arrays(x_train, y_train, x_test, y_test, int(max(y_train.max(), y_test.max())) + 1)


def _as_pixels(x: np.ndarray, what: str) -> np.ndarray:
    """N×C×H×W (or N×D) uint8 or float32 from any of the layouts and ranges `_npz` accepts."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim not in (2, 4):
        raise ValueError(f"{what}: expected 2, 3 or 4 dimensions, got shape {x.shape}")
    low, high = x.min(), x.max()
    if np.issubdtype(x.dtype, np.integer) and 0 <= low and high <= 255:
        return x.astype(np.uint8, order="C")
    if np.issubdtype(x.dtype, np.floating) and 0 <= low and high <= 1:
        return x.astype(np.float32, order="C")
    raise ValueError(f"{what}: pixels must be integers in 0..255 or floats in [0, 1], "
                     f"got {x.dtype} in [{low}, {high}]")


@register("imagefolder", keys=("path", "image_size"), flippable=True)
def _imagefolder(spec: dict) -> Arrays:
    """torchvision ImageFolder trees `path/train/<class>/*` and `path/test/<class>/*` (RGB), decoded once;
    `image_size` (int or [h, w]) resizes. Class indices follow the sorted train folder names."""
    if "path" not in spec:
        raise ValueError("data.path: required for dataset 'imagefolder'")

    def find(place: Path):
        return place if (place / "train").is_dir() and (place / "test").is_dir() else None

    found = _locate("imagefolder", _search_paths(spec["path"]), find)
    size = spec.get("image_size")
    return _read_imagefolder(found, (size, size) if isinstance(size, int) else size and tuple(size))


@_cached
def _read_imagefolder(path: Path, size: tuple | None) -> Arrays:
    """Decode every image once (cached by the top folder's mtime: edits deep inside need a new process)."""
    from torchvision import datasets, transforms

    steps = [transforms.PILToTensor()] if size is None else [transforms.Resize(size), transforms.PILToTensor()]
    transform = transforms.Compose(steps)
    train = datasets.ImageFolder(path / "train", transform=transform)
    test = datasets.ImageFolder(path / "test", transform=transform)
    if not set(test.classes) <= set(train.classes):
        raise ValueError(f"{path}: test classes {sorted(set(test.classes) - set(train.classes))} not in train")

    def stack(folder):
        images, labels = zip(*folder)
        if len({im.shape for im in images}) > 1:
            raise ValueError(f"{folder.root}: images differ in size; set data.image_size")
        labels = [train.class_to_idx[folder.classes[t]] for t in labels]
        return torch.stack(images).numpy(), np.asarray(labels)

    return Arrays(*stack(train), *stack(test), len(train.classes))


_BOUNDARIES = {  # the paper's 2-D toy problems: the label of a point p in [0, 1]²
    "synthetic-xor": lambda p: (p[:, 0] > 0.5) ^ (p[:, 1] > 0.5),
    "synthetic-sin": lambda p: p[:, 1] > 0.5 + 0.25 * np.sin(2 * np.pi * p[:, 0]),
}


@register("synthetic-xor", keys=("n_train", "n_test"), input_shape=(2,), num_classes=2)
@register("synthetic-sin", keys=("n_train", "n_test"), input_shape=(2,), num_classes=2)
def _synthetic(spec: dict) -> Arrays:
    """Points uniform in [0, 1]² labelled by a fixed boundary; train and test drawn from independent seeded
    streams, so the test set does not depend on `n_train`."""
    train_seed, test_seed = np.random.SeedSequence(spec.get("seed", 0)).spawn(2)
    label = _BOUNDARIES[spec["name"]]

    def draw(seed, n):
        points = np.random.default_rng(seed).random((n, 2), dtype=np.float32)
        return points, label(points).astype(np.int64)

    return Arrays(*draw(train_seed, spec.get("n_train", 1000)), *draw(test_seed, spec.get("n_test", 1000)), 2)


# ---------------------------------------------------------------------------------------- batching

def _device_of(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, padding: int = 4) -> torch.Tensor:
    """Random crop from the zero-padded batch and random horizontal flip, per sample, in one gather on
    x's device; random numbers come from `generator` (drawn on its device, then moved)."""
    n, c, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, n, 1), generator=generator, device=_device_of(generator))
    flip = torch.rand(n, 1, generator=generator, device=_device_of(generator)) < 0.5
    dy, dx, flip = offsets[0].to(x.device), offsets[1].to(x.device), flip.to(x.device)
    cols = torch.arange(w, device=x.device)
    rows = dy + torch.arange(h, device=x.device)  # n×h
    cols = dx + torch.where(flip, cols.flip(0), cols)  # n×w, reversed for flipped samples
    padded = F.pad(x, (padding,) * 4)
    samples = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[samples, channels, rows[:, None, :, None], cols[:, None, None, :]]


AUGMENTATIONS = {"crop-flip": crop_flip}


def _augmentation(name: str | None) -> Callable | None:
    if name is not None and name not in AUGMENTATIONS:
        raise ValueError(f"data.augment: unknown {name!r}; choose from {sorted(AUGMENTATIONS)} or null")
    return AUGMENTATIONS.get(name)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator | None = None,
            shuffle: bool = True, augment: str | None = None, drop_last: bool = False
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (xb, yb) on x's device: one permutation per call (drawn with `generator`, which may be a CPU
    generator for CUDA data) and index slicing; `augment` names an entry of `AUGMENTATIONS`."""
    transform = _augmentation(augment)
    n = len(x)
    order = torch.randperm(n, generator=generator, device=_device_of(generator)).to(x.device) if shuffle else None
    end = n - n % batch_size if drop_last else n
    for start in range(0, end, batch_size):
        index = order[start:start + batch_size] if shuffle else slice(start, start + batch_size)
        xb, yb = x[index], y[index]
        yield (transform(xb, generator) if transform is not None else xb), yb
