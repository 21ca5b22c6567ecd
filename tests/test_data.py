"""specreg.data: every loader on tiny files in its real on-disk format, the shared spec keys, and batching."""
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from specreg import data

FASHION_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    """Tests look only where they say: no $SPECREG_DATA unless a test sets it."""
    monkeypatch.delenv("SPECREG_DATA", raising=False)


def write_idx(path: Path, array: np.ndarray, compress=True):
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist(folder: Path, n_train=30, n_test=10, compress=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test)[::-1] % 10,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        write_idx(folder / (stem + ".gz" if compress else stem), array, compress)
    return arrays


def write_pickle(path: Path, entry: dict):
    with open(path, "wb") as f:
        pickle.dump(entry, f)


def write_cifar10(root: Path, per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    parts = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": list(rng.integers(0, 10, per_batch)), "batch_label": name}
        write_pickle(folder / name, entry)
        parts.append(entry)
    write_pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return parts


def test_digits_split_is_stratified_and_seeded():
    a = data.load({"name": "digits", "seed": 0})
    assert a.x_train.shape == (1437, 1, 8, 8) and a.x_test.shape == (360, 1, 8, 8)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert 0 <= a.x_train.min() and a.x_train.max() == 1
    assert torch.bincount(a.y_test).min() >= 35  # stratified: every digit about 36 times
    assert (a.num_classes, a.input_shape, a.augment) == (10, (1, 8, 8), None)
    assert torch.equal(a.x_test, data.load({"name": "digits", "seed": 0}).x_test)
    assert not torch.equal(a.x_test, data.load({"name": "digits", "seed": 1}).x_test)


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_files(tmp_path, compress):
    arrays = write_mnist(tmp_path / "mnist", compress=compress)
    d = data.load({"name": "mnist", "root": str(tmp_path), "download": False})
    assert d.x_train.shape == (30, 1, 28, 28) and d.x_test.shape == (10, 1, 28, 28)
    assert torch.equal(d.x_train[:, 0] * 255, torch.tensor(arrays["train-images-idx3-ubyte"], dtype=torch.float32))
    assert d.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert (d.num_classes, d.input_shape, d.augment) == (10, (1, 28, 28), None)


def test_fashion_mnist_from_specreg_data_and_torchvision_layout(tmp_path, monkeypatch):
    write_mnist(tmp_path / "env" / "fashion-mnist", n_train=12)
    monkeypatch.setenv("SPECREG_DATA", str(tmp_path / "env"))
    assert len(data.load({"name": "fashion_mnist", "root": str(tmp_path / "empty")}).x_train) == 12
    write_mnist(tmp_path / "root" / "FashionMNIST" / "raw", n_train=14)  # where torchvision downloads to
    assert len(data.load({"name": "fashion_mnist", "root": str(tmp_path / "root")}).x_train) == 14


@pytest.mark.skipif(not FASHION_DEBIAN.is_dir(), reason="Debian fashion-mnist package not installed")
def test_real_fashion_mnist_debian(tmp_path):
    d = data.load({"name": "fashion_mnist", "root": str(tmp_path), "download": False})
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert d.x_train.min() == 0 and d.x_train.max() == 1
    assert torch.bincount(d.y_train).tolist() == [6000] * 10


def test_cifar10_pickled_batches(tmp_path):
    parts = write_cifar10(tmp_path)
    d = data.load({"name": "cifar10", "root": str(tmp_path), "download": False})
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32)
    first = torch.tensor(parts[0]["data"][0].reshape(3, 32, 32), dtype=torch.float32) / 255
    assert torch.equal(d.x_train[0], first)
    assert d.y_train.tolist() == [int(y) for p in parts[:5] for y in p["labels"]]
    assert d.y_test.tolist() == [int(y) for y in parts[5]["labels"]]
    assert (d.num_classes, d.augment) == (10, "crop-flip")
    assert data.load({"name": "cifar10", "root": str(tmp_path), "download": False, "augment": None}).augment is None


def test_torchvision_rejects_copies_that_fail_its_md5(tmp_path):
    """Why the CIFAR batches are unpickled by specreg.data itself."""
    import torchvision

    write_cifar10(tmp_path)
    with pytest.raises(RuntimeError):
        torchvision.datasets.CIFAR10(str(tmp_path), download=False)


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar100" / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", 6), ("test", 3)):
        write_pickle(folder / name, {"data": np.full((n, 3072), 7, np.uint8), "fine_labels": list(range(90, 90 + n)),
                                     "coarse_labels": [0] * n})
    write_pickle(folder / "meta", {"fine_label_names": [str(i) for i in range(100)]})
    d = data.load({"name": "cifar100", "root": str(tmp_path), "download": False})
    assert d.y_train.tolist() == list(range(90, 96)) and d.num_classes == 100
    assert torch.allclose(d.x_test, torch.full((3, 3, 32, 32), 7 / 255))


@pytest.mark.parametrize("layout", ["NHW", "NHWC1", "NHWC3", "NCHW", "float"])
def test_npz_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    channels = 3 if layout in ("NHWC3", "NCHW", "float") else 1
    nchw = rng.integers(0, 256, (8, channels, 5, 6), dtype=np.uint8)
    stored = {"NHW": nchw[:, 0], "NHWC1": nchw.transpose(0, 2, 3, 1), "NHWC3": nchw.transpose(0, 2, 3, 1),
              "NCHW": nchw, "float": nchw / 255}[layout]
    path = tmp_path / "set.npz"
    np.savez(path, x_train=stored, y_train=np.arange(8) % 4, x_test=stored[:3], y_test=np.array([[3], [2], [1]]))
    d = data.load({"name": "npz", "path": str(path)})
    assert d.input_shape == (channels, 5, 6) and d.num_classes == 4
    assert torch.allclose(d.x_train, torch.tensor(nchw, dtype=torch.float32) / 255)
    assert d.y_test.tolist() == [3, 2, 1]


def test_npz_relative_path_under_specreg_data_and_bad_range(tmp_path, monkeypatch):
    x = np.full((2, 4, 4), 2.0)
    np.savez(tmp_path / "bad.npz", x_train=x, y_train=[0, 1], x_test=x, y_test=[0, 1])
    monkeypatch.setenv("SPECREG_DATA", str(tmp_path))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        data.load({"name": "npz", "path": "bad.npz"})
    np.savez(tmp_path / "partial.npz", x_train=x)
    with pytest.raises(ValueError, match="missing"):
        data.load({"name": "npz", "path": "partial.npz"})


def test_imagefolder_pngs(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = {}
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                image = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
                Image.fromarray(image).save(tmp_path / split / cls / f"{i}.png")
                pixels[split, cls, i] = image
    (tmp_path / "test" / "cat").rename(tmp_path / "test" / "zzz_cat")  # a test class missing from train
    with pytest.raises(ValueError, match="zzz_cat"):
        data.load({"name": "imagefolder", "path": str(tmp_path)})
    (tmp_path / "test" / "zzz_cat").rename(tmp_path / "test" / "cat")
    d = data.load({"name": "imagefolder", "path": str(tmp_path)})
    assert d.x_train.shape == (6, 3, 10, 12) and d.num_classes == 2
    assert d.y_train.tolist() == [0, 0, 0, 1, 1, 1] and d.y_test.tolist() == [0, 0, 1, 1]
    expected = torch.tensor(pixels["test", "dog", 1]).permute(2, 0, 1).float() / 255
    assert torch.equal(d.x_test[3], expected)
    assert data.load({"name": "imagefolder", "path": str(tmp_path), "image_size": 8}).input_shape == (3, 8, 8)


def test_imagefolder_sizes_must_agree(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        for i, size in enumerate([(4, 4), (5, 4)]):
            Image.new("L", size).save(tmp_path / split / "a" / f"{i}.png")
    with pytest.raises(ValueError, match="image_size"):
        data.load({"name": "imagefolder", "path": str(tmp_path)})
    assert data.load({"name": "imagefolder", "path": str(tmp_path), "image_size": [3, 6]}).input_shape == (3, 3, 6)


@pytest.mark.parametrize("name", ["synthetic-xor", "synthetic-sin"])
def test_synthetic(name):
    d = data.load({"name": name, "n_train": 500, "n_test": 200, "seed": 3})
    assert d.x_train.shape == (500, 2) and d.input_shape == (2,) and d.num_classes == 2
    x, y = d.x_train[:, 0], d.x_train[:, 1]
    rule = (x > 0.5) ^ (y > 0.5) if name == "synthetic-xor" else y > 0.5 + 0.25 * torch.sin(2 * torch.pi * x)
    assert torch.equal(d.y_train, rule.long())
    assert 0.3 < d.y_train.float().mean() < 0.7
    again = data.load({"name": name, "n_train": 100, "n_test": 200, "seed": 3})
    assert torch.equal(again.x_train, d.x_train[:100]) and torch.equal(again.x_test, d.x_test)
    assert not torch.equal(data.load({"name": name, "seed": 4}).x_train[:500], d.x_train)


def test_classes_reindex_and_subsets():
    full = data.load({"name": "digits"})
    d = data.load({"name": "digits", "classes": [7, 2], "train_subset": 50, "test_subset": 20})
    assert d.num_classes == 2 and d.classes == (7, 2) and full.classes == tuple(range(10))
    assert len(d.x_train) == 50 and len(d.x_test) == 20
    kept = (full.y_train == 7) | (full.y_train == 2)
    assert torch.equal(d.x_train, full.x_train[kept][:50])
    assert torch.equal(d.y_train, (full.y_train[kept][:50] == 2).long())
    with pytest.raises(ValueError, match="classes"):
        data.load({"name": "digits", "classes": [1, 10]})


def test_spec_errors():
    with pytest.raises(ValueError, match=r"\['colour', 'root'\]"):
        data.load({"name": "digits", "root": "/x", "colour": 1})
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        data.load({"name": "nope"})
    with pytest.raises(ValueError, match="data.path"):
        data.load({"name": "npz"})


def test_not_found_names_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECREG_DATA", str(tmp_path / "env"))
    with pytest.raises(data.DatasetNotFound) as caught:
        data.load({"name": "mnist", "root": str(tmp_path / "root"), "download": False})
    message = str(caught.value)
    for place in [tmp_path / "root", tmp_path / "root" / "mnist", tmp_path / "root" / "MNIST" / "raw",
                  tmp_path / "env", tmp_path / "env" / "mnist", tmp_path / "env" / "MNIST" / "raw"]:
        assert str(place) in caught.value.looked and str(place) in message
    assert "download is false" in message and isinstance(caught.value, ValueError)

    import torchvision

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(data.DatasetNotFound, match=r"cifar-10-batches-py.*download into .* failed \(OSError: no net"):
        data.load({"name": "cifar10", "root": str(tmp_path / "root")})
    with pytest.raises(data.DatasetNotFound, match="missing.npz"):
        data.load({"name": "npz", "path": str(tmp_path / "missing.npz")})


def test_cached_arrays_are_not_modified_through_data(tmp_path):
    np.savez(tmp_path / "f.npz", x_train=np.full((2, 4, 4), 0.5), y_train=[0, 1], x_test=np.zeros((1, 4, 4)), y_test=[1])
    write_mnist(tmp_path / "mnist")
    for spec in ({"name": "npz", "path": str(tmp_path / "f.npz")},
                 {"name": "mnist", "root": str(tmp_path), "download": False}):
        first = data.load(spec)
        expected = first.x_train.clone()
        first.x_train.zero_()
        assert torch.equal(data.load(spec).x_train, expected)


@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_cover_each_index_once(drop_last):
    x, y = torch.arange(103.0)[:, None], torch.arange(103)
    out = list(data.batches(x, y, 10, torch.Generator().manual_seed(0), drop_last=drop_last))
    assert [len(b) for _, b in out] == [10] * 10 + ([] if drop_last else [3])
    seen = torch.cat([b for _, b in out])
    assert torch.equal(torch.cat([a[:, 0] for a, _ in out]).long(), seen)
    assert len(set(seen.tolist())) == len(seen) == (100 if drop_last else 103)
    assert seen.tolist() != sorted(seen.tolist())
    plain = torch.cat([b for _, b in data.batches(x, y, 10, shuffle=False)])
    assert torch.equal(plain, y)


def test_batches_deterministic_for_a_seed():
    x, y = torch.rand(50, 3, 8, 8), torch.arange(50)

    def epoch(seed):
        return list(data.batches(x, y, 16, torch.Generator().manual_seed(seed), augment="crop-flip"))

    a, b, c = epoch(5), epoch(5), epoch(6)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not torch.equal(a[0][1], c[0][1])


def test_crop_flip_is_a_padded_crop_or_its_mirror():
    x = torch.rand(64, 3, 8, 8)
    out = data.crop_flip(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    assert not torch.equal(out, x)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flips = 0
    for i in range(len(x)):
        windows = padded[i].unfold(1, 8, 1).unfold(2, 8, 1)  # 3×9×9×8×8: every crop position
        crops = windows.permute(1, 2, 0, 3, 4).reshape(81, 3, 8, 8)
        plain = (crops == out[i]).flatten(1).all(1).any()
        mirrored = (crops.flip(-1) == out[i]).flatten(1).all(1).any()
        assert plain or mirrored
        flips += int(mirrored and not plain)
    assert 15 < flips < 49  # about half the samples are mirrored


def test_unknown_augment():
    with pytest.raises(ValueError, match="rotate"):
        next(data.batches(torch.zeros(4, 1, 2, 2), torch.zeros(4), 2, augment="rotate"))
    with pytest.raises(ValueError, match="augment"):
        data.load({"name": "digits", "augment": "rotate"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_on_cuda_with_cpu_generator():
    x, y = torch.rand(40, 3, 8, 8, device="cuda"), torch.arange(40, device="cuda")
    out = list(data.batches(x, y, 16, torch.Generator().manual_seed(0), augment="crop-flip"))
    assert all(xb.is_cuda and yb.is_cuda for xb, yb in out)
    assert sorted(torch.cat([yb for _, yb in out]).tolist()) == list(range(40))
    d = data.load({"name": "digits", "train_subset": 10}, device="cuda")
    assert d.x_train.is_cuda and d.y_test.is_cuda


@pytest.mark.parametrize("name", ["digits", "synthetic-xor", "synthetic-sin", "mnist", "fashion_mnist", "cifar10"])
def test_the_registry_facts_are_what_the_loader_returns(tmp_path, name):
    """input_shape and num_classes, which the config checks a model against before loading, are right."""
    spec = {"name": name}
    if name == "cifar10":
        write_cifar10(tmp_path)
    elif name in ("mnist", "fashion_mnist"):
        write_mnist(tmp_path / name)
    if name in ("mnist", "fashion_mnist", "cifar10"):
        spec.update(root=str(tmp_path), download=False)
    d = data.load(spec)
    entry = data.DATASETS[name]
    assert (tuple(d.input_shape), d.num_classes) == (entry.input_shape, entry.num_classes)
