"""kdrun/data/: splits, batching, augmentation, uint8 conversion, the IDX reader and data-not-found errors."""
from __future__ import annotations

import gzip
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF_DIR, THREADS
from omegaconf import OmegaConf

from kdrun.data.dataset import Split, augment_batch, batch_sizes, load_data, to_unit_float
from kdrun.data.sources import read_idx
from kdrun.errors import KdrunError
from kdrun.schema import AugmentConfig, DatasetConfig

torch.set_num_threads(THREADS)
CPU = torch.device("cpu")
FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def dataset_cfg(name: str, **overrides) -> DatasetConfig:
    """conf/dataset/<name>.yaml validated through the schema, with ``overrides`` applied (like the CLI)."""
    node = OmegaConf.merge(OmegaConf.structured(DatasetConfig), OmegaConf.load(CONF_DIR / "dataset" / f"{name}.yaml"))
    for key, value in overrides.items():
        OmegaConf.update(node, key, value, merge=False)
    return OmegaConf.to_object(node)


def sample_keys(split: Split) -> Counter:
    """Each sample as (pixel bytes, label), counted: identifies samples across splits."""
    x = split.x.cpu().numpy()
    return Counter((x[i].tobytes(), int(split.y[i])) for i in range(len(split)))


@pytest.fixture(scope="module")
def digits():
    return load_data(dataset_cfg("digits"), CPU)


# --- splits ---------------------------------------------------------------------------------------------

def test_digits_split_sizes_and_shapes(digits):
    sizes = [len(digits.train), len(digits.val), len(digits.test)]
    assert sum(sizes) == 1797
    assert len(digits.test) == round(0.2 * 1797)
    assert len(digits.val) == round(0.15 * (1797 - len(digits.test)))
    assert digits.num_classes == 10
    assert (digits.channels, digits.image_size) == (1, 8)
    assert digits.train.x.shape[1:] == (1, 8, 8) and digits.train.y.dtype == torch.int64


def test_digits_splits_partition_the_data_set(digits):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    everything = Counter((images[i].tobytes(), int(bunch.target[i])) for i in range(len(images)))
    parts = [sample_keys(digits.train), sample_keys(digits.val), sample_keys(digits.test)]
    assert parts[0] + parts[1] + parts[2] == everything  # every image used exactly once
    for a in range(3):
        for b in range(a + 1, 3):
            assert not (set(parts[a]) & set(parts[b])), "splits overlap"


def test_digits_splits_are_stratified(digits):
    total = torch.bincount(torch.cat([digits.train.y, digits.val.y, digits.test.y]), minlength=10).double()
    for split in (digits.val, digits.test):
        counts = torch.bincount(split.y, minlength=10).double()
        assert (counts > 0).all(), "a class is missing"
        expected = total * len(split) / total.sum()
        assert ((counts - expected).abs() <= 2).all(), (counts, expected)


def test_same_seed_same_split_other_seed_other_split(digits):
    again = load_data(dataset_cfg("digits"), CPU)
    for name in ("train", "val", "test"):
        assert torch.equal(digits.split(name).x, again.split(name).x)
        assert torch.equal(digits.split(name).y, again.split(name).y)
    assert digits.identity == again.identity
    other = load_data(dataset_cfg("digits", split_seed=1), CPU)
    assert [len(other.train), len(other.val), len(other.test)] == [len(digits.train), len(digits.val), len(digits.test)]
    assert sample_keys(other.test) != sample_keys(digits.test)
    assert sample_keys(other.val) != sample_keys(digits.val)
    assert other.identity["fingerprint"] != digits.identity["fingerprint"]


def test_normalisation_computed_on_train(digits):
    x = digits.train.x.float()
    torch.testing.assert_close(digits.mean.flatten(), x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(digits.std.flatten(), x.std(dim=(0, 2, 3)))
    batch = torch.cat([xb for xb, *_ in digits.batches("train", 4096)])
    assert abs(batch.mean().item()) < 1e-4 and abs(batch.std().item() - 1) < 1e-3


def test_fake_data_shapes():
    data = load_data(dataset_cfg("fake"), CPU)
    assert (len(data.train), len(data.val), len(data.test)) == (192, 64, 128)
    assert data.train.x.shape == (192, 1, 8, 8) and data.train.x.dtype == torch.float32
    assert data.num_classes == 4 and (data.channels, data.image_size) == (1, 8)
    assert float(data.train.x.min()) >= 0 and float(data.train.x.max()) <= 1
    rgb = load_data(dataset_cfg("fake", channels=3, image_size=16, num_classes=7, train_size=70), CPU)
    assert rgb.train.x.shape[1:] == (3, 16, 16) and rgb.num_classes == 7
    assert len(rgb.train) + len(rgb.val) == 70 and len(rgb.test) == 35
    assert rgb.mean.shape == (1, 3, 1, 1)


def test_train_subset_is_stratified():
    data = load_data(dataset_cfg("digits", train_subset=200, val_fraction=0.25), CPU)
    assert len(data.train) + len(data.val) == 200
    assert len(data.val) == 50
    assert (torch.bincount(data.train.y, minlength=10) > 0).all()
    assert len(data.test) == round(0.2 * 1797)  # the test split is untouched


def test_zero_val_fraction_gives_empty_val():
    data = load_data(dataset_cfg("fake", val_fraction=0.0), CPU)
    assert len(data.val) == 0 and len(data.train) == 256
    assert list(data.batches("val", 32)) == []


# --- batches ---------------------------------------------------------------------------------------------

def test_batches_cover_every_index_once_per_epoch(digits):
    n = len(digits.train)
    g = torch.Generator().manual_seed(0)
    epochs = []
    for _ in range(2):
        idx = [b[2] for b in digits.batches("train", 100, shuffle=True, generator=g)]
        assert all(len(i) == 100 for i in idx[:-1]) and len(idx[-1]) == n - 100 * (len(idx) - 1)
        flat = torch.cat(idx)
        assert sorted(flat.tolist()) == list(range(n))
        epochs.append(flat)
    assert not torch.equal(epochs[0], torch.arange(n)), "shuffle=True did not shuffle"
    assert not torch.equal(epochs[0], epochs[1]), "two epochs in the same order"


@pytest.mark.parametrize("n, sizes", [(65, [32, 33]), (64, [32, 32]), (66, [32, 32, 2]), (33, [33]), (1, [1])])
def test_a_last_training_batch_of_one_sample_joins_the_one_before(n, sizes):
    """BatchNorm in train mode cannot take a batch of one; only n ≡ 1 (mod batch_size) changes, the order never."""
    assert batch_sizes(n, 32, merge_single=True) == sizes
    if n < 4:  # too few for the fake data's four classes
        return
    data = load_data(dataset_cfg("fake", train_size=n, val_fraction=0.0), CPU)
    plain = list(data.batches("train", 32, shuffle=True, generator=torch.Generator().manual_seed(0)))
    merged = list(data.batches("train", 32, shuffle=True, generator=torch.Generator().manual_seed(0),
                               merge_single=True))
    assert [len(b.idx) for b in merged] == sizes
    assert torch.equal(torch.cat([b.idx for b in plain]), torch.cat([b.idx for b in merged]))


def test_batches_without_shuffle_are_in_order(digits):
    flat = torch.cat([b.idx for b in digits.batches("test", 64)])
    assert torch.equal(flat, torch.arange(len(digits.test)))


def test_batches_are_reproducible_with_a_seeded_generator(digits):
    def epoch(seed):
        g = torch.Generator().manual_seed(seed)
        return [(b.x, b.y, b.idx) for b in digits.batches("train", 128, shuffle=True, generator=g)]
    a, b, c = epoch(3), epoch(3), epoch(4)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) and torch.equal(p[2], q[2]) for p, q in zip(a, b))
    assert not torch.equal(torch.cat([p[2] for p in a]), torch.cat([p[2] for p in c]))


def test_batches_return_the_indexed_samples_normalised(digits):
    g = torch.Generator().manual_seed(1)
    x, y, idx, *_ = next(digits.batches("train", 50, shuffle=True, generator=g))
    assert torch.equal(y, digits.train.y[idx])
    expected = (digits.train.x[idx].float() - digits.mean) / digits.std
    torch.testing.assert_close(x, expected)


# --- augmentation -----------------------------------------------------------------------------------------

def asymmetric_images(n: int, c: int = 1, h: int = 6, w: int = 7) -> torch.Tensor:
    """Images whose every pixel differs from its mirror image (a left-to-right ramp, distinct per sample)."""
    ramp = torch.arange(w, dtype=torch.float32).expand(h, w)
    rows = torch.arange(h, dtype=torch.float32)[:, None] * 0.01
    return torch.stack([(ramp + rows + 100 * i).expand(c, h, w) for i in range(n)]) + 1


def test_augment_identity_when_off():
    x = asymmetric_images(8, c=3)
    out = augment_batch(x, AugmentConfig(crop_padding=0, hflip=False), torch.Generator().manual_seed(0))
    assert torch.equal(out, x)


def test_random_crop_keeps_shape_and_takes_a_padded_window():
    x = asymmetric_images(16, c=2)
    p = 2
    out = augment_batch(x, AugmentConfig(crop_padding=p, hflip=False), torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    h, w = x.shape[-2:]
    shifts = set()
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                if torch.equal(out[i], padded[i, :, dy:dy + h, dx:dx + w])]
        assert hits, f"sample {i} is no window of its padded image"
        shifts.add(hits[0])
    assert len(shifts) > 1, "every sample got the same crop"


def test_random_crop_is_reproducible():
    x = asymmetric_images(8)
    aug = AugmentConfig(crop_padding=3, hflip=True)
    a = augment_batch(x, aug, torch.Generator().manual_seed(5))
    b = augment_batch(x, aug, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_hflip_flips_about_half():
    n = 400
    x = asymmetric_images(n)
    out = augment_batch(x, AugmentConfig(crop_padding=0, hflip=True), torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(out[i], x[i].flip(-1)) for i in range(n)])
    unchanged = torch.tensor([torch.equal(out[i], x[i]) for i in range(n)])
    assert bool((flipped ^ unchanged).all()), "a sample is neither itself nor its mirror image"
    assert 0.35 * n < int(flipped.sum()) < 0.65 * n


def test_augment_only_on_request():
    data = load_data(dataset_cfg("fake", **{"augment.hflip": True, "augment.crop_padding": 2}), CPU)
    plain = torch.cat([x for x, *_ in data.batches("train", 64)])
    again = torch.cat([x for x, *_ in data.batches("train", 64, generator=torch.Generator().manual_seed(0))])
    augmented = torch.cat([x for x, *_ in data.batches("train", 64, augment=True,
                                                          generator=torch.Generator().manual_seed(0))])
    assert torch.equal(plain, again)
    assert not torch.equal(plain, augmented)


# --- uint8 images: exactly torchvision's ToTensor + Normalize -------------------------------------------------

def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` (uint8) as an IDX file, gzipped when the name ends with .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(payload)
    return path


def fashion_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[:, :4] = 0          # dark border, like Fashion-MNIST
    images[0] = 255            # and the extremes
    images[1] = 0
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


@pytest.fixture
def fake_fmnist_idx(tmp_path):
    idx = tmp_path / "idx"
    idx.mkdir()
    train_x, train_y = fashion_like(40, 0)
    test_x, test_y = fashion_like(20, 1)
    write_idx(idx / "train-images-idx3-ubyte.gz", train_x)
    write_idx(idx / "train-labels-idx1-ubyte.gz", train_y)
    write_idx(idx / "t10k-images-idx3-ubyte.gz", test_x)
    write_idx(idx / "t10k-labels-idx1-ubyte", test_y)  # an uncompressed one too
    return idx, (train_x, train_y, test_x, test_y)


def test_read_idx_gz_and_plain(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    got = read_idx(write_idx(tmp_path / "images-idx3-ubyte.gz", images))
    assert got.shape == (3, 4, 5) and got.dtype == np.uint8
    assert got.flags.writeable  # torch.as_tensor must not wrap read-only memory (UserWarning, undefined behaviour)
    assert np.array_equal(got, images)
    assert np.array_equal(read_idx(write_idx(tmp_path / "labels-idx1-ubyte.gz", labels)), labels)
    assert np.array_equal(read_idx(write_idx(tmp_path / "plain-idx3-ubyte", images)), images)


def test_uint8_conversion_matches_torchvision_bit_for_bit(tmp_path, fake_fmnist_idx):
    from PIL import Image
    from torchvision import transforms

    idx, (train_x, train_y, test_x, test_y) = fake_fmnist_idx
    cfg = dataset_cfg("fashion_mnist", root=str(tmp_path / "no-torchvision-files"), idx_dir=str(idx), val_fraction=0.0)
    data = load_data(cfg, CPU)
    assert data.train.x.dtype == torch.uint8  # kept as bytes in memory
    assert data.train.x.shape == (40, 1, 28, 28) and data.test.x.shape == (20, 1, 28, 28)
    assert torch.equal(data.train.y, torch.as_tensor(train_y, dtype=torch.int64))
    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))])
    for split, raw in (("train", train_x), ("test", test_x)):
        ours = torch.cat([x for x, *_ in data.batches(split, 16)])
        theirs = torch.stack([reference(Image.fromarray(img)) for img in raw])
        assert ours.dtype == theirs.dtype == torch.float32
        assert torch.equal(ours, theirs), f"{split}: max diff {(ours - theirs).abs().max()}"
    assert data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"  # the IDX files' too
    unit = to_unit_float(data.train.x[:3])
    assert torch.equal(unit, torch.stack([transforms.ToTensor()(Image.fromarray(img)) for img in train_x[:3]]))


def test_missing_fashion_mnist_tells_how_to_get_it(tmp_path):
    cfg = dataset_cfg("fashion_mnist", root=str(tmp_path / "none"), idx_dir=str(tmp_path / "none"))
    with pytest.raises(KdrunError) as err:
        load_data(cfg, CPU)
    message = str(err.value)
    assert "\n" not in message
    assert "dataset.download=true" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path / "none") in message


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST_SYSTEM_DIR.is_dir(), reason="no Fashion-MNIST IDX files in /usr/share/datasets")
def test_fashion_mnist_from_system_idx_files(tmp_path):
    cfg = dataset_cfg("fashion_mnist", root=str(tmp_path / "empty"), idx_dir=str(FMNIST_SYSTEM_DIR),
                      train_subset=1000)
    data = load_data(cfg, CPU)
    assert data.train.x.shape[1:] == (1, 28, 28) and data.train.x.dtype == torch.uint8
    assert data.test.x.shape == (10000, 1, 28, 28)
    assert len(data.train) + len(data.val) == 1000 and len(data.val) == 100
    assert data.num_classes == 10
    assert set(torch.unique(data.train.y).tolist()) == set(range(10))
    torch.testing.assert_close(data.mean.flatten(), torch.tensor([0.2860]))


def _write_image_folder(root, classes=3, per_class=8, size=12):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", per_class // 2)):
        for k in range(classes):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(60 + 60 * k, 30, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_imagefolder_streaming_matches_in_memory(tmp_path):
    """dataset.stream=true decodes the same pixels batch by batch as the in-memory path does once."""
    from kdrun.data.dataset import LazyImages

    root = _write_image_folder(tmp_path / "images")
    common = dict(name="imagefolder", root=str(root), image_size=8, val_fraction=0.25, num_workers=0,
                  mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    memory = load_data(DatasetConfig(stream="false", **common), torch.device("cpu"))
    streamed = load_data(DatasetConfig(stream="true", **common), torch.device("cpu"))
    assert isinstance(streamed.train.x, LazyImages) and not isinstance(memory.train.x, LazyImages)
    assert (memory.channels, memory.image_size, memory.num_classes) == (3, 8, 3)
    assert memory.class_names == streamed.class_names == ["class0", "class1", "class2"]  # the folder names
    drop = lambda identity: {k: v for k, v in identity.items() if k != "fingerprint"}  # pixels vs file list
    assert drop(memory.identity) == drop(streamed.identity)
    for split in ("train", "val", "test"):
        a = list(memory.batches(split, 5))
        b = list(streamed.batches(split, 5))
        assert len(a) == len(b) > 0
        for (xa, ya, ia, *_), (xb, yb, ib, *_) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
    idx = torch.tensor([3, 0, 5])
    assert torch.equal(memory.inputs("train", idx), streamed.inputs("train", idx))


# --- a user's data: finite pixels -------------------------------------------------------------------------

def _user_splits(bad_split: str, bad_index: int, value: float, as_tensor: bool) -> dict:
    rng = np.random.default_rng(0)
    splits = {name: (rng.random((n, 1, 4, 4), dtype=np.float32), np.arange(n) % 2)
              for name, n in (("train", 40), ("val", 10), ("test", 12))}
    splits[bad_split][0][bad_index, 0, 1, 2] = value
    return {k: (torch.from_numpy(x), torch.from_numpy(y)) if as_tensor else (x, y) for k, (x, y) in splits.items()}


@pytest.mark.parametrize("bad_split, bad_index, value, as_tensor", [
    ("train", 17, float("nan"), False), ("val", 3, float("inf"), True), ("test", 11, -float("inf"), False)])
def test_non_finite_pixels_of_a_user_dataset_are_refused(bad_split, bad_index, value, as_tensor):
    """NaN would train a NaN teacher (blamed on the learning rate), inf a silently "completed" run."""
    from kdrun.data.splits import check_splits
    from kdrun.errors import InputError

    with pytest.raises(InputError) as err:
        check_splits(_user_splits(bad_split, bad_index, value, as_tensor), "mydata.splits", "dataset._target_")
    assert str(err.value).startswith(f"mydata.splits['{bad_split}']: x[{bad_index}] holds NaN or inf")
    assert "\n" not in str(err.value)
    check_splits(_user_splits(bad_split, bad_index, 1e30, as_tensor), "mydata.splits", "dataset._target_")  # finite


@pytest.mark.parametrize("stream", ["false", "true"])
def test_non_finite_pixels_of_a_torch_dataset_are_refused(tmp_path, monkeypatch, stream):
    """A map-style Dataset read into memory at load, or streamed (each item checked as a worker reads it)."""
    (tmp_path / "nandata.py").write_text(
        "import torch\n"
        "class Items(torch.utils.data.Dataset):\n"
        "    def __init__(self, n, bad):\n"
        "        self.x, self.targets = torch.rand(n, 1, 4, 4), [i % 2 for i in range(n)]\n"
        "        self.x[bad, 0, 0, 0] = float('nan')\n"
        "    def __len__(self):\n"
        "        return len(self.targets)\n"
        "    def __getitem__(self, i):\n"
        "        return self.x[i], self.targets[i]\n"
        "def splits():\n"
        "    return {'train': Items(40, 7), 'test': Items(10, 0)}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from kdrun.errors import InputError

    cfg = DatasetConfig(target="nandata.splits", stream=stream, num_workers=0, mean=[0.5], std=[0.25])
    with pytest.raises(InputError, match=r"^nandata.splits\['train'\]: (x\[7\]|item 7) holds NaN or inf"):
        data = load_data(cfg, CPU)
        for split in ("train", "val"):  # item 7 is in one of them
            list(data.batches(split, 8))


# --- a user's data: what it is passed, its errors, its class names ----------------------------------------

USER_DATA = """
import numpy as np
import torch

SEEN = {}

def _splits(n=40, k=2):
    x = np.random.default_rng(0).random((n, 1, 4, 4), dtype=np.float32)
    return {"train": (x, np.arange(n) % k), "test": (x[:10], np.arange(10) % k)}

def load(root="/data/x", split_seed=7, download=True, n=40):
    SEEN.update(root=root, split_seed=split_seed, download=download, n=n)
    return _splits(n)

def needs_seed(split_seed):
    SEEN.update(split_seed=split_seed)
    return _splits()

def missing_file(root="/no/such/dir/x.npz"):
    return np.load(root)

def named(n=40):
    return {**_splits(n, 3), "classes": ["cat", "dog", "owl"]}

def fashion_mnist():  # a user's function that happens to share a built-in's name: it names no classes
    return _splits(100, 10)

def wrong_count():
    return {**_splits(40, 3), "classes": ["cat", "dog"]}

def not_a_list():
    return {**_splits(40, 3), "classes": 3}

class Items(torch.utils.data.Dataset):
    classes = ["left", "right"]

    def __init__(self, n, broken=False):
        self.n, self.broken = n, broken

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.broken and i == 3:
            raise KeyError("no item 3 on disk")
        return torch.full((1, 4, 4), float(i % 2)), i % 2

def torch_dataset():
    return {"train": Items(20), "test": Items(6)}

def broken_dataset():
    return {"train": Items(20, broken=True), "test": Items(6)}
"""


@pytest.fixture
def userdata(tmp_path, monkeypatch):
    """A module ``userdata`` of dataset callables, importable for the test."""
    import importlib
    import sys

    (tmp_path / "userdata.py").write_text(USER_DATA)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("userdata", None)
    return importlib.import_module("userdata")


def user_cfg(target: str, **keys) -> DatasetConfig:
    """The ``dataset`` node of a user's YAML (``_target_`` plus ``keys``) as the schema makes it."""
    from kdrun.schema import open_node

    node = {**{k: v for k, v in OmegaConf.to_container(OmegaConf.structured(DatasetConfig)).items()
               if k not in ("target", "kwargs")}, "name": None, "_target_": target, **keys}
    return open_node(DatasetConfig, node, "dataset")


def test_kdrun_keys_reach_a_user_dataset_only_when_set(userdata):
    """kdrun's own dataset.* keys left at kdrun's defaults (root: null, split_seed: 0, download: false) keep the
    function's defaults; set ones are passed; a required one gets kdrun's value."""
    from kdrun.data.splits import call_dataset

    call_dataset(user_cfg("userdata.load"))
    assert userdata.SEEN == {"root": "/data/x", "split_seed": 7, "download": True, "n": 40}
    call_dataset(user_cfg("userdata.load", root="/elsewhere", split_seed=3, n=30))
    assert userdata.SEEN == {"root": "/elsewhere", "split_seed": 3, "download": True, "n": 30}
    call_dataset(user_cfg("userdata.needs_seed"))
    assert userdata.SEEN["split_seed"] == 0


def test_an_error_in_a_user_dataset_is_one_line_naming_it(userdata):
    from kdrun.data.splits import call_dataset
    from kdrun.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        call_dataset(user_cfg("userdata.missing_file"))
    assert err.value.key == "dataset._target_" and "\n" not in str(err.value)
    assert str(err.value).startswith("dataset._target_: userdata.missing_file() raised FileNotFoundError: ")
    assert "/no/such/dir/x.npz" in str(err.value)
    assert isinstance(err.value.__cause__, FileNotFoundError)  # the traceback the run's log gets
    with pytest.raises(ConfigError) as err:
        call_dataset(user_cfg("userdata.broken_dataset", stream="false"))
    assert str(err.value) == ("dataset._target_: userdata.broken_dataset['train']: reading its items raised "
                              "KeyError: 'no item 3 on disk'")


def test_class_names_come_from_the_loaded_dataset(userdata):
    """A mapping's ``classes`` or a torch Dataset's ``classes`` attribute; never a built-in's names by a name match."""
    from kdrun.errors import ConfigError

    named = load_data(user_cfg("userdata.named"), CPU)
    assert named.class_names == ["cat", "dog", "owl"] and named.num_classes == 3
    assert load_data(user_cfg("userdata.torch_dataset", num_workers=0), CPU).class_names == ["left", "right"]
    borrowed = load_data(user_cfg("userdata.fashion_mnist"), CPU)
    assert borrowed.num_classes == 10 and borrowed.class_names is None
    with pytest.raises(ConfigError, match=r"^dataset._target_: userdata.wrong_count: 2 class names for 3 classes"):
        load_data(user_cfg("userdata.wrong_count"), CPU)
    with pytest.raises(ConfigError, match=r"^dataset._target_: userdata.not_a_list: classes must be a list"):
        load_data(user_cfg("userdata.not_a_list"), CPU)
