"""Datasets: digits split, mnist1d generation + cache, IDX and CIFAR parsing on tiny synthetic files."""
import gzip
import pickle
import random
import re
import struct

import numpy as np
import pytest
import torch

from lts_core.datasets import DATASETS, DatasetError, DatasetSplit, load_dataset

IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# ----------------------------------------------------------------------------- digits

def test_digits_split_and_standardization():
    d = load_dataset("digits", seed=0)
    assert isinstance(d, DatasetSplit) and d.name == "digits"
    assert d.in_shape == (64,) and d.n_classes == 10
    assert d.x_train.shape == (1437, 64) and d.x_test.shape == (360, 64)  # sklearn: 1797 -> 80/20 stratified
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert set(d.y_train.tolist()) == set(range(10)) == set(d.y_test.tolist())
    assert d.x_train.mean(0).abs().max() < 1e-5  # per-feature standardized with train statistics
    std = d.x_train.std(0, unbiased=False)
    assert torch.all(((std - 1).abs() < 1e-4) | (std < 1e-6))  # constant border pixels stay 0
    assert torch.isfinite(d.x_test).all()


def test_digits_deterministic_per_seed():
    a, b, c = load_dataset("digits", seed=3), load_dataset("digits", seed=3), load_dataset("digits", seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)


def test_subsetting_is_deterministic_and_nested():
    full = load_dataset("digits")
    a = load_dataset("digits", max_train=100, max_test=50, seed=0)
    b = load_dataset("digits", max_train=100, max_test=50, seed=0)
    assert a.x_train.shape == (100, 64) and a.y_test.shape == (50,)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert torch.equal(load_dataset("digits", max_test=50).y_test, a.y_test)  # test subset ignores max_train
    assert load_dataset("digits", max_train=10_000).x_train.shape == full.x_train.shape
    with pytest.raises(DatasetError, match="max_train"):
        load_dataset("digits", max_train=0)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'.*digits.*cifar10") as e:
        load_dataset("imagenet")
    assert isinstance(e.value, ValueError)
    assert DATASETS == ("digits", "mnist1d", "mnist1d-seq", "mnist", "fashion-mnist", "cifar10", "cifar100")


# ----------------------------------------------------------------------------- mnist1d

def test_mnist1d_generated_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHOFF_DATA", str(tmp_path))
    random.seed(123)
    np.random.seed(123)
    before = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    d = load_dataset("mnist1d")
    assert (random.random(), np.random.rand()) == before  # generation does not clobber global RNG state
    cache = tmp_path / "datasets" / "mnist1d.npz"
    assert cache.is_file() and not list(cache.parent.glob("*.tmp"))
    assert d.in_shape == (1, 40) and d.n_classes == 10
    assert d.x_train.shape == (4000, 1, 40) and d.x_test.shape == (1000, 1, 40)
    assert d.y_train.shape == (4000,) and set(d.y_train.tolist()) == set(range(10))
    assert abs(d.x_train.mean().item()) < 1e-4 and abs(d.x_train.std().item() - 1) < 1e-3

    mtime = cache.stat().st_mtime_ns
    d2 = load_dataset("mnist1d")  # served from the cache: same tensors, file untouched
    assert cache.stat().st_mtime_ns == mtime
    assert torch.equal(d.x_train, d2.x_train) and torch.equal(d.y_test, d2.y_test)

    import mnist1d.data  # corrupt or stale (other generation args) cache is regenerated, not fatal
    real_args = mnist1d.data.get_dataset_args
    monkeypatch.setattr(mnist1d.data, "get_dataset_args",
                        lambda as_dict=False: _with(real_args(as_dict), num_samples=200))  # small = fast
    cache.write_bytes(b"garbage")
    d3 = load_dataset("mnist1d", max_train=64, max_test=32)
    assert d3.x_train.shape == (64, 1, 40) and d3.x_test.shape == (32, 1, 40)
    assert np.load(cache)["x"].shape == (160, 40)


def test_mnist1d_seq_is_the_same_signals_as_token_sequences(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHOFF_DATA", str(tmp_path))
    import mnist1d.data
    real_args = mnist1d.data.get_dataset_args
    monkeypatch.setattr(mnist1d.data, "get_dataset_args",
                        lambda as_dict=False: _with(real_args(as_dict), num_samples=200))  # small = fast
    flat, seq = load_dataset("mnist1d"), load_dataset("mnist1d-seq")
    assert seq.in_shape == (10, 4) and seq.n_classes == 10 and seq.x_train.shape == (160, 10, 4)
    # token t holds samples 4t … 4t+3 of the signal, standardised with the same scalar statistics
    assert torch.equal(seq.x_train.reshape(-1, 40), flat.x_train.reshape(-1, 40))
    assert torch.equal(seq.y_test, flat.y_test)


def _with(args, **kw):
    if isinstance(args, dict):
        return {**args, **kw}
    for k, v in kw.items():
        setattr(args, k, v)
    return args


# ----------------------------------------------------------------------------- mnist / fashion-mnist (IDX)

def idx_bytes(arr: np.ndarray, magic=None) -> bytes:
    arr = np.asarray(arr, np.uint8)
    magic = 0x0800 + arr.ndim if magic is None else magic
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx(folder, n_train=5, n_test=3, gz=False, size=28):
    rng = np.random.default_rng(0)
    arrays = {IDX[0]: rng.integers(0, 256, (n_train, size, size)), IDX[1]: np.arange(n_train) % 10,
              IDX[2]: rng.integers(0, 256, (n_test, size, size)), IDX[3]: (np.arange(n_test) + 3) % 10}
    folder.mkdir(parents=True, exist_ok=True)
    for fname, arr in arrays.items():
        data = idx_bytes(arr)
        if gz:
            (folder / (fname + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / fname).write_bytes(data)
    return {k: np.asarray(v, np.uint8) for k, v in arrays.items()}


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_load_values(tmp_path, gz, name):
    raw = write_idx(tmp_path, gz=gz)
    d = load_dataset(name, root=tmp_path)
    assert d.name == name and d.in_shape == (1, 28, 28) and d.n_classes == 10
    assert d.x_train.shape == (5, 1, 28, 28) and d.x_test.shape == (3, 1, 28, 28)
    assert d.y_train.tolist() == [0, 1, 2, 3, 4] and d.y_test.tolist() == [3, 4, 5]
    x = raw[IDX[0]].astype(np.float64) / 255  # scaled to [0, 1] then one scalar mean/std of train
    expect = (x - x.mean()) / x.std()
    np.testing.assert_allclose(d.x_train[:, 0].numpy(), expect, atol=1e-5)
    xt = raw[IDX[2]].astype(np.float64) / 255
    np.testing.assert_allclose(d.x_test[:, 0].numpy(), (xt - x.mean()) / x.std(), atol=1e-5)


def test_idx_missing_root_and_file(tmp_path):
    with pytest.raises(DatasetError, match="mnist: needs root"):
        load_dataset("mnist")
    write_idx(tmp_path)
    (tmp_path / IDX[3]).unlink()
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", root=tmp_path)
    assert str(e.value) == f"mnist: expected file '{IDX[3]}' (or .gz) in {tmp_path} — not found"


def test_idx_truncated_and_bad_magic(tmp_path):
    write_idx(tmp_path)
    f = tmp_path / IDX[0]
    good = f.read_bytes()
    f.write_bytes(good[:-10])
    with pytest.raises(DatasetError, match=f"'{IDX[0]}' in .*wrong length"):
        load_dataset("mnist", root=tmp_path)
    f.write_bytes(good[:6])
    with pytest.raises(DatasetError, match=f"'{IDX[0]}' in .*truncated header"):
        load_dataset("mnist", root=tmp_path)
    f.write_bytes(idx_bytes(np.zeros((5, 28, 28)), magic=0x0801))
    with pytest.raises(DatasetError, match=f"'{IDX[0]}' in {re.escape(str(tmp_path))}.*bad magic number 0x00000801"):
        load_dataset("mnist", root=tmp_path)
    f.write_bytes(good)
    (tmp_path / IDX[1]).write_bytes(idx_bytes(np.arange(4)))  # 4 labels for 5 images
    with pytest.raises(DatasetError, match=f"'{IDX[1]}'.*4 labels for 5 images"):
        load_dataset("mnist", root=tmp_path)


def test_idx_corrupt_gzip(tmp_path):
    write_idx(tmp_path, gz=True)
    (tmp_path / (IDX[2] + ".gz")).write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match=f"'{IDX[2]}.gz' in .*unreadable"):
        load_dataset("fashion-mnist", root=tmp_path)


# ----------------------------------------------------------------------------- cifar10

def cifar_arrays(n=4):
    rng = np.random.default_rng(1)
    train = [(rng.integers(0, 256, (n, 3072), dtype=np.uint8), [(i + b) % 10 for i in range(n)]) for b in range(5)]
    test = (rng.integers(0, 256, (n, 3072), dtype=np.uint8), [9 - i for i in range(n)])
    return train, test


def write_cifar_py(folder):
    train, test = cifar_arrays()
    folder.mkdir(parents=True)
    for i, (x, y) in enumerate(train + [test]):
        name = f"data_batch_{i + 1}" if i < 5 else "test_batch"
        with open(folder / name, "wb") as f:  # protocol 2, like the official (python 2) files
            pickle.dump({b"batch_label": b"x", b"labels": y, b"data": x}, f, protocol=2)
    return train, test


def write_cifar_bin(folder):
    train, test = cifar_arrays()
    folder.mkdir(parents=True)
    for i, (x, y) in enumerate(train + [test]):
        name = f"data_batch_{i + 1}.bin" if i < 5 else "test_batch.bin"
        rec = np.concatenate([np.asarray(y, np.uint8)[:, None], x], axis=1)
        (folder / name).write_bytes(rec.tobytes())
    return train, test


@pytest.mark.parametrize("kind", ["py", "bin"])
@pytest.mark.parametrize("point_at_subfolder", [False, True])
def test_cifar_python_and_binary(tmp_path, kind, point_at_subfolder):
    sub = tmp_path / f"cifar-10-batches-{kind}"
    train, test = (write_cifar_py if kind == "py" else write_cifar_bin)(sub)
    d = load_dataset("cifar10", root=sub if point_at_subfolder else tmp_path)
    assert d.in_shape == (3, 32, 32) and d.n_classes == 10
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32)
    assert d.y_train.tolist() == [lab for _, y in train for lab in y] and d.y_test.tolist() == [9, 8, 7, 6]
    assert d.x_train.mean((0, 2, 3)).abs().max() < 1e-5  # per-channel standardized
    assert (d.x_train.std((0, 2, 3), unbiased=False) - 1).abs().max() < 1e-4
    # row layout: 1024 R, 1024 G, 1024 B, each row-major 32x32 -> order is preserved by reshape
    x = np.concatenate([b[0] for b in train]).reshape(-1, 3, 32, 32) / 255.0
    m, s = x.mean((0, 2, 3), keepdims=True), x.std((0, 2, 3), keepdims=True)
    np.testing.assert_allclose(d.x_train.numpy(), (x - m) / s, atol=1e-4)


def test_cifar_same_data_both_formats(tmp_path):
    write_cifar_py(tmp_path / "a" / "cifar-10-batches-py")
    write_cifar_bin(tmp_path / "b" / "cifar-10-batches-bin")
    a, b = load_dataset("cifar10", root=tmp_path / "a"), load_dataset("cifar10", root=tmp_path / "b")
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)


def test_cifar_errors(tmp_path):
    with pytest.raises(DatasetError, match="cifar10: needs root"):
        load_dataset("cifar10")
    with pytest.raises(DatasetError, match="cifar-10-batches-py.*not found"):
        load_dataset("cifar10", root=tmp_path)
    sub = tmp_path / "cifar-10-batches-py"
    write_cifar_py(sub)
    (sub / "data_batch_3").unlink()
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10", root=tmp_path)
    assert str(e.value) == f"cifar10: expected file 'data_batch_3' in {sub} — not found"
    (sub / "data_batch_3").write_bytes((sub / "data_batch_2").read_bytes()[:100])  # truncated pickle
    with pytest.raises(DatasetError, match="'data_batch_3' in .*malformed python batch"):
        load_dataset("cifar10", root=sub)


def test_cifar_refuses_arbitrary_pickles(tmp_path):
    sub = tmp_path / "cifar-10-batches-py"
    write_cifar_py(sub)
    (sub / "test_batch").write_bytes(pickle.dumps({b"data": print, b"labels": []}))
    with pytest.raises(DatasetError, match="'test_batch'.*refusing to load builtins.print"):
        load_dataset("cifar10", root=tmp_path)


def write_cifar100(folder, kind, n_train=6, n_test=3):
    """CIFAR-100's layout: python pickles 'train'/'test' with fine and coarse labels, or binary records
    <coarse><fine><3072 pixels>."""
    rng = np.random.default_rng(2)
    parts = {"train": (rng.integers(0, 256, (n_train, 3072), dtype=np.uint8), [(99 - 7 * i) % 100 for i in range(n_train)]),
             "test": (rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), [5 * i % 100 for i in range(n_test)])}
    folder.mkdir(parents=True)
    for name, (x, fine) in parts.items():
        coarse = [f // 5 for f in fine]
        if kind == "py":
            with open(folder / name, "wb") as f:
                pickle.dump({b"filenames": [b"a"] * len(x), b"fine_labels": fine, b"coarse_labels": coarse,
                             b"data": x}, f, protocol=2)
        else:
            rec = np.concatenate([np.asarray(coarse, np.uint8)[:, None], np.asarray(fine, np.uint8)[:, None], x], 1)
            (folder / f"{name}.bin").write_bytes(rec.tobytes())
    return parts


@pytest.mark.parametrize("kind", ["py", "bin"])
def test_cifar100_python_and_binary(tmp_path, kind):
    sub = tmp_path / ("cifar-100-python" if kind == "py" else "cifar-100-binary")
    parts = write_cifar100(sub, kind)
    for root in (tmp_path, sub):
        d = load_dataset("cifar100", root=root)
        assert d.name == "cifar100" and d.n_classes == 100 and d.in_shape == (3, 32, 32)
        assert d.y_train.tolist() == parts["train"][1] and d.y_test.tolist() == [0, 5, 10]   # fine labels
        x = parts["train"][0].reshape(-1, 3, 32, 32) / 255.0
        m, s = x.mean((0, 2, 3), keepdims=True), x.std((0, 2, 3), keepdims=True)
        np.testing.assert_allclose(d.x_train.numpy(), (x - m) / s, atol=1e-4)


def test_cifar100_errors(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar100", root=tmp_path)
    assert str(e.value) == (f"cifar100: expected 'cifar-100-python/train, test' or 'cifar-100-binary/train.bin, "
                            f"test.bin' in {tmp_path} — not found")
    sub = tmp_path / "cifar-100-binary"
    write_cifar100(sub, "bin")
    (sub / "test.bin").write_bytes(b"\x00" * 3073)
    with pytest.raises(DatasetError, match="'test.bin' in .* wrong length: 3073 bytes is not a multiple of 3074"):
        load_dataset("cifar100", root=tmp_path)
    rec = np.zeros((1, 3074), np.uint8)
    rec[0, 1] = 100                                    # fine label out of range
    (sub / "test.bin").write_bytes(rec.tobytes())
    with pytest.raises(DatasetError, match="'test.bin'.*labels must be integers in 0..99"):
        load_dataset("cifar100", root=tmp_path)


def test_cifar_binary_wrong_length(tmp_path):
    sub = tmp_path / "cifar-10-batches-bin"
    write_cifar_bin(sub)
    (sub / "test_batch.bin").write_bytes(b"\x00" * 3000)
    with pytest.raises(DatasetError, match=f"'test_batch.bin' in {re.escape(str(sub))} — wrong length: 3000 bytes"):
        load_dataset("cifar10", root=tmp_path)
