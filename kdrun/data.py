"""Datasets as device-resident tensors, with seeded splits and batched augmentation.

Every supported dataset fits in memory: it is decoded once into ``[N, C, H, W]`` tensors (uint8 for
8-bit images, float32 in [0, 1] otherwise) on the run's device. Batches are index slices of a seeded
permutation; normalisation, random crop and flip are batched tensor ops. No per-sample Python runs in
the training loop and no DataLoader workers are needed.

Consumes ``dataset.*`` (see ``conf/dataset/*.yaml``).
"""
from __future__ import annotations

import gzip
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from kdrun.errors import ConfigError, KdrunError
from kdrun.schema import AugmentConfig, DatasetConfig

log = logging.getLogger(__name__)
MAX_IN_MEMORY_BYTES = 16 * 2**30  # refuse to decode more than this into memory


@dataclass
class Split:
    x: torch.Tensor  # [N, C, H, W], uint8 (0..255) or float32 (0..1)
    y: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Data:
    """Train / val / test splits plus what a model needs to know about them."""

    train: Split
    val: Split  # may be empty (val_fraction=0): model selection then keeps the last epoch
    test: Split
    num_classes: int
    mean: torch.Tensor  # [1, C, 1, 1]
    std: torch.Tensor
    augment: AugmentConfig
    identity: dict = field(default_factory=dict)  # what makes this data this data (store keys)

    @property
    def channels(self) -> int:
        return self.train.x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.x.shape[-1]

    def split(self, name: str) -> Split:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False,
                generator: Optional[torch.Generator] = None,
                augment: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y, idx)``: normalised float batches, labels and their indices in the split."""
        part = self.split(split)
        n = len(part)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(part.y.device)
        chunks = [order[start:start + batch_size] for start in range(0, n, batch_size)]
        if isinstance(part.x, LazyImages):  # streaming: DataLoader workers decode the next batches meanwhile
            raws = (raw.to(part.y.device, non_blocking=True) for raw in part.x.stream(chunks))
        else:
            raws = (part.x[idx] for idx in chunks)
        for idx, raw in zip(chunks, raws):
            yield self._prepare(raw, augment, generator), part.y[idx], idx

    def inputs(self, split: str, idx: torch.Tensor, *, augment: bool = False,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The normalised float images ``idx`` of ``split`` (augmented in one batched op if asked)."""
        x = self.split(split).x
        raw = x.fetch(idx.cpu()).to(idx.device) if isinstance(x, LazyImages) else x[idx]
        return self._prepare(raw, augment, generator)

    def _prepare(self, raw: torch.Tensor, augment: bool, generator: Optional[torch.Generator]) -> torch.Tensor:
        x = to_unit_float(raw)
        if augment:
            x = augment_batch(x, self.augment, generator)
        return (x - self.mean) / self.std


class LazyImages:
    """Image files decoded on demand (the streaming path for image folders too large for memory).

    Quacks like the ``[N, C, H, W]`` uint8 arrays of the in-memory path where :func:`load_data` needs it
    (``len``, ``shape``, ``nbytes``, fancy indexing); batches are decoded by DataLoader workers.
    """

    def __init__(self, paths: np.ndarray, size: int, workers: int):
        self.paths, self.size, self.workers = np.asarray(paths), size, workers
        self.shape = (len(self.paths), 3, size, size)
        self.nbytes = 0  # nothing is held in memory

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx) -> "LazyImages":
        return LazyImages(self.paths[idx], self.size, self.workers)

    def tobytes(self) -> bytes:  # for the dataset fingerprint: which files, in which order
        return "\n".join(self.paths.tolist()).encode()

    def load(self, i: int) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms.v2.functional import pil_to_tensor, resize

        with Image.open(self.paths[i]) as img:
            return resize(pil_to_tensor(img.convert("RGB")), [self.size, self.size], antialias=True)

    def fetch(self, idx) -> torch.Tensor:
        return torch.stack([self.load(int(i)) for i in idx])

    def stream(self, chunks: list) -> Iterator[torch.Tensor]:
        from torch.utils.data import DataLoader

        batches = [c.cpu().tolist() for c in chunks]
        yield from DataLoader(_Files(self), batch_sampler=batches, num_workers=self.workers,
                              persistent_workers=False, pin_memory=torch.cuda.is_available())


class _Files(torch.utils.data.Dataset):
    def __init__(self, images: LazyImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images.load(i)


def to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images to float in [0, 1] exactly as torchvision's ToTensor does; floats unchanged."""
    return x.float().div(255) if x.dtype == torch.uint8 else x.float()


def augment_batch(x: torch.Tensor, aug: AugmentConfig, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Random crop after zero padding, then random horizontal flip, per sample, in one batched op each."""
    n, _, h, w = x.shape
    p = aug.crop_padding
    if p > 0:
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # [n, h, 1]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # [n, 1, w]
        batch = torch.arange(n, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if aug.hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x.contiguous()


_LAST: dict = {}  # the last dataset loaded in this process: jobs of a Hydra sweep share one process


def load_data(cfg: DatasetConfig, device: torch.device) -> Data:
    """Load dataset ``cfg.name`` (memoised for the next job of a sweep: tensors are never modified)."""
    key = (repr(cfg), str(device))
    if key not in _LAST:
        _LAST.clear()
        _LAST[key] = _load_data(cfg, device)
    return _LAST[key]


def _load_data(cfg: DatasetConfig, device: torch.device) -> Data:
    """Load dataset ``cfg.name``, carve a stratified val split from train, put it all on ``device``."""
    train_x, train_y, test_x, test_y = _LOADERS[cfg.name](cfg)
    if cfg.train_subset is not None and cfg.train_subset < len(train_y):
        keep, _ = _stratified(len(train_y), train_y, cfg.train_subset, cfg.split_seed, "dataset.train_subset")
        train_x, train_y = train_x[keep], train_y[keep]
    n_val = int(round(cfg.val_fraction * len(train_y)))
    if n_val > 0:
        val_idx, train_idx = _stratified(len(train_y), train_y, n_val, cfg.split_seed, "dataset.val_fraction")
    else:
        val_idx, train_idx = np.array([], dtype=np.int64), np.arange(len(train_y))
    _check_fits(train_x.nbytes + test_x.nbytes, device, cfg.name)
    on = lambda x: x if isinstance(x, LazyImages) else torch.as_tensor(x).to(device)
    to = lambda x, y: Split(on(x), torch.as_tensor(y, dtype=torch.int64).to(device))
    train, val, test = to(train_x[train_idx], train_y[train_idx]), to(train_x[val_idx], train_y[val_idx]), to(test_x, test_y)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    mean, std = _normalisation(cfg, train)
    identity = {
        "name": cfg.name, "sizes": [len(train), len(val), len(test)], "shape": list(train.x.shape[1:]),
        "num_classes": num_classes, "val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed,
        "train_subset": cfg.train_subset, "mean": [round(v, 6) for v in mean.flatten().tolist()],
        "std": [round(v, 6) for v in std.flatten().tolist()],
        "augment": {"crop_padding": cfg.augment.crop_padding, "hflip": cfg.augment.hflip},
        "fingerprint": _fingerprint(train_x[train_idx], train_y[train_idx], test_x, test_y),
    }
    return Data(train, val, test, num_classes, mean.to(device), std.to(device), cfg.augment, identity)


def _check_fits(nbytes: int, device: torch.device, name: str) -> None:
    """Stop with a clear message when the decoded data cannot live on ``device`` (rather than crash later)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        limit, where = free * 0.8, f"{device} ({free / 2**30:.1f} GiB free)"
    else:
        limit, where = MAX_IN_MEMORY_BYTES, f"memory (kdrun's limit {MAX_IN_MEMORY_BYTES / 2**30:.0f} GiB)"
    if nbytes > limit:
        raise KdrunError(f"dataset={name}: {nbytes / 2**30:.1f} GiB of images do not fit in {where}; "
                         f"use trainer.device=cpu, a smaller dataset.image_size or dataset.train_subset")


def _stratified(n: int, y: np.ndarray, size: int, seed: int, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices (picked, rest), ``size`` picked stratified by label with ``seed``."""
    from sklearn.model_selection import train_test_split

    try:
        picked, rest = train_test_split(np.arange(n), train_size=size, stratify=y, random_state=seed)
    except ValueError as exc:  # e.g. fewer samples than classes
        raise ConfigError(key, f"cannot make a stratified split of {n} images: {exc}") from None
    return np.sort(picked), np.sort(rest)


def _normalisation(cfg: DatasetConfig, train: Split) -> tuple[torch.Tensor, torch.Tensor]:
    channels = train.x.shape[1]
    if cfg.mean is None:
        if isinstance(train.x, LazyImages):
            raise ConfigError("dataset.mean", "a streamed dataset needs dataset.mean and dataset.std")
        x = to_unit_float(train.x)
        mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    else:
        if len(cfg.mean) not in (1, channels) or len(cfg.std) not in (1, channels):
            raise ConfigError("dataset.mean", f"needs 1 or {channels} values (one per channel), got {len(cfg.mean)}")
        mean = torch.tensor(cfg.mean, dtype=torch.float32).expand(channels)
        std = torch.tensor(cfg.std, dtype=torch.float32).expand(channels)
    return mean.reshape(1, -1, 1, 1).cpu(), std.reshape(1, -1, 1, 1).cpu()


def _fingerprint(*arrays: np.ndarray) -> str:
    digest = hashlib.sha1()
    for a in arrays:
        digest.update(a.tobytes() if isinstance(a, LazyImages) else np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()[:16]


# --- loaders: each returns numpy (train_x [N,C,H,W], train_y, test_x, test_y) -------------------------

def _digits(cfg: DatasetConfig):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]  # 0..16 grey levels -> [0, 1]
    y = bunch.target.astype(np.int64)
    n_test = int(round(cfg.test_fraction * len(y)))
    test_idx, train_idx = _stratified(len(y), y, n_test, cfg.split_seed, "dataset.test_fraction")
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally .gz), the format of MNIST and Fashion-MNIST."""
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as handle:
        raw = handle.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    # a writable buffer: torch warns about (and must not share) the read-only memory of a bytes object
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _mnist_family(cfg: DatasetConfig, cls_name: str, debian_pkg: Optional[str]):
    import torchvision.datasets as tvd

    root = Path(cfg.root or "data")
    try:
        train = getattr(tvd, cls_name)(str(root), train=True, download=cfg.download)
        test = getattr(tvd, cls_name)(str(root), train=False, download=cfg.download)
        tx, ty, vx, vy = train.data.numpy(), train.targets.numpy(), test.data.numpy(), test.targets.numpy()
    except RuntimeError as exc:
        if cfg.download:
            raise KdrunError(f"dataset={cfg.name}: download into {root} failed ({exc})") from None
        files = _find_idx(cfg.idx_dir)
        if files is None:
            hint = f"; or `apt-get install {debian_pkg}` (IDX files in {cfg.idx_dir})" if debian_pkg else ""
            raise KdrunError(
                f"dataset={cfg.name}: no {cls_name} files under dataset.root={root} (torchvision layout "
                f"{root}/{cls_name}/raw){' nor in dataset.idx_dir=' + str(cfg.idx_dir) if cfg.idx_dir else ''}. "
                f"Pass dataset.download=true to fetch them with torchvision{hint}") from None
        tx, ty, vx, vy = (_read_idx(f) for f in files)
    return tx[:, None], ty.astype(np.int64), vx[:, None], vy.astype(np.int64)


def _find_idx(idx_dir: Optional[str]) -> Optional[list[Path]]:
    if not idx_dir:
        return None
    found = []
    for name in _MNIST_FILES:
        candidates = [Path(idx_dir) / (name + ".gz"), Path(idx_dir) / name]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found


def _cifar(cfg: DatasetConfig, cls_name: str):
    import torchvision.datasets as tvd

    root = Path(cfg.root or "data")
    try:
        train = getattr(tvd, cls_name)(str(root), train=True, download=cfg.download)
        test = getattr(tvd, cls_name)(str(root), train=False, download=cfg.download)
    except RuntimeError as exc:
        raise KdrunError(
            f"dataset={cfg.name}: no {cls_name} files under dataset.root={root} ({exc}). "
            f"Pass dataset.download=true to fetch them with torchvision, or copy the extracted "
            f"python-version archive into {root}") from None
    chw = lambda a: np.ascontiguousarray(a.transpose(0, 3, 1, 2))
    return chw(train.data), np.array(train.targets), chw(test.data), np.array(test.targets)


def _imagefolder(cfg: DatasetConfig):
    """root/train, root/val (and root/test) class folders. Decoded into memory once when they fit and
    ``dataset.stream`` is not true; else streamed from disk by ``dataset.num_workers`` DataLoader workers."""
    from torchvision.datasets import ImageFolder

    root, size = Path(cfg.root), cfg.image_size or 32
    missing = [d for d in ("train", "val") if not (root / d).is_dir()]
    if missing:
        raise ConfigError("dataset.root", f"{root} has no {' or '.join(missing)}/ folder of class sub-folders")
    folders = {name: ImageFolder(str(root / name)) for name in ("train", "val", "test") if (root / name).is_dir()}
    if folders["train"].classes != folders["val"].classes:
        raise ConfigError("dataset.root", f"train/ and val/ of {root} have different class folders")
    files = lambda *names: (np.array([p for n in names for p, _ in folders[n].samples]),
                            np.array([t for n in names for _, t in folders[n].samples], dtype=np.int64))
    # a val/ next to test/ joins train (val_fraction of it is carved out again); else val/ is the test set
    (tp, ty), (vp, vy) = (files("train", "val"), files("test")) if "test" in folders else (files("train"), files("val"))
    stream = str(cfg.stream).lower()
    too_big = (len(tp) + len(vp)) * 3 * size * size > MAX_IN_MEMORY_BYTES
    if stream == "true" or (stream == "auto" and too_big):
        log.info(f"dataset=imagefolder: streaming {len(tp) + len(vp)} images from disk "
                 f"({cfg.num_workers} DataLoader workers)")
        return LazyImages(tp, size, cfg.num_workers), ty, LazyImages(vp, size, cfg.num_workers), vy
    _check_fits((len(tp) + len(vp)) * 3 * size * size, torch.device("cpu"), "imagefolder")
    decode = lambda paths: torch.cat([b for b in LazyImages(paths, size, cfg.num_workers).stream(
        list(torch.arange(len(paths)).split(256)))]).numpy() if len(paths) else np.zeros((0, 3, size, size), np.uint8)
    return decode(tp), ty, decode(vp), vy


def _fake(cfg: DatasetConfig):
    rng = np.random.default_rng(cfg.split_seed)
    c, s, k, n = cfg.channels or 1, cfg.image_size or 8, cfg.num_classes or 4, cfg.train_size or 256
    prototypes = rng.normal(0.0, 1.0, size=(k, c, s, s)).astype(np.float32)

    def make(m):
        y = np.arange(m) % k
        x = prototypes[y] + rng.normal(0.0, 1.5, size=(m, c, s, s)).astype(np.float32)
        return ((np.tanh(x) + 1) / 2).astype(np.float32), y.astype(np.int64)

    return (*make(n), *make(max(n // 2, k)))


_LOADERS = {
    "digits": _digits,
    "fashion_mnist": lambda cfg: _mnist_family(cfg, "FashionMNIST", "dataset-fashion-mnist"),
    "mnist": lambda cfg: _mnist_family(cfg, "MNIST", None),
    "cifar10": lambda cfg: _cifar(cfg, "CIFAR10"),
    "cifar100": lambda cfg: _cifar(cfg, "CIFAR100"),
    "imagefolder": _imagefolder,
    "fake": _fake,
}
