"""Where images come from: the built-in datasets, registered like a plugin's, plus the streaming image source
for folders too large for memory.

Every dataset callable follows the contract of a user's dataset (see :func:`kdrun.data.splits.call_dataset`): it
takes keyword arguments (filled from the ``dataset.*`` keys of the same name) and returns a mapping with
``train`` and optionally ``val`` / ``test``, each ``(x, y)``, and ``classes`` (class names) where the classes
have names other than their index. The built-ins return numpy ``x [N,C,H,W]`` (uint8 or float32 in [0, 1]) or a
:class:`LazyImages`.

Loaders say what to do when files are missing (torchvision download, the Debian package); they never
download unless ``dataset.download=true``. Importing this module imports no torch (each loader imports what it
uses), so that validating a config does not (:mod:`kdrun.schema.data` looks its dataset up).
"""
from __future__ import annotations

import gzip
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np

from kdrun.data.images import scan_folders, to_rgb
from kdrun.errors import ConfigError, InputError, KdrunError
from kdrun.registry import register_dataset

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
MAX_IN_MEMORY_BYTES = 16 * 2**30  # refuse to decode more than this into memory


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
        import torch
        from PIL import Image
        from torchvision.transforms.v2.functional import resize

        path = str(self.paths[i])
        try:
            with Image.open(path) as img:
                rgb = to_rgb(img, path)
        except OSError as exc:  # UnidentifiedImageError included
            raise InputError(f"{path}: cannot be read as an image ({exc})") from None
        return resize(torch.from_numpy(rgb).permute(2, 0, 1), [self.size, self.size], antialias=True)

    def fetch(self, idx) -> torch.Tensor:
        import torch

        return torch.stack([self.load(int(i)) for i in idx])

    def decode_all(self, batch_size: int = 256) -> np.ndarray:
        """Every image, decoded once by the DataLoader workers, as a uint8 ``[N, 3, H, W]`` array."""
        if len(self) == 0:
            return np.zeros((0, 3, self.size, self.size), np.uint8)
        import torch

        return torch.cat(list(self.stream(list(torch.arange(len(self)).split(batch_size))))).numpy()

    def stream(self, chunks: list) -> Iterator[torch.Tensor]:
        import torch
        from torch.utils.data import DataLoader

        batches = [c.cpu().tolist() for c in chunks]
        loader = iter(DataLoader(_Files(self), batch_sampler=batches, num_workers=self.workers,
                                 persistent_workers=False, pin_memory=torch.cuda.is_available()))
        try:
            yield from loader
        except InputError as exc:  # a worker's: DataLoader re-raises it with the worker's traceback in its message
            if "Original Traceback" not in str(exc):
                raise
            raise InputError(str(exc).strip().splitlines()[-1].split(": ", 1)[-1]) from None
        finally:  # workers stopped now: left to the garbage collector (an error, a stopped epoch), stopping them
            #       waited 5 s (torch's MP_STATUS_CHECK_INTERVAL) each time
            if (shutdown := getattr(loader, "_shutdown_workers", None)) is not None:
                shutdown()


class _Files:
    """The map-style dataset of :meth:`LazyImages.stream`'s DataLoader: image ``i`` decoded in a worker."""

    def __init__(self, images: LazyImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images.load(i)


def check_fits(nbytes: int, device: torch.device, name: str) -> None:
    """Stop with a clear message when the decoded data cannot live on ``device`` (rather than crash later)."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        limit, where = free * 0.8, f"{device} ({free / 2**30:.1f} GiB free)"
    else:
        limit, where = MAX_IN_MEMORY_BYTES, f"memory (kdrun's limit {MAX_IN_MEMORY_BYTES / 2**30:.0f} GiB)"
    if nbytes > limit:
        raise InputError(f"dataset={name}: {nbytes / 2**30:.1f} GiB of images do not fit in {where}; "
                         f"use trainer.device=cpu, a smaller dataset.image_size or dataset.train_subset")


def stratified(n: int, y: np.ndarray, size: int, seed: int, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices (picked, rest), ``size`` picked stratified by label with ``seed``."""
    from sklearn.model_selection import train_test_split

    try:
        picked, rest = train_test_split(np.arange(n), train_size=size, stratify=y, random_state=seed)
    except ValueError as exc:  # e.g. fewer samples than classes
        raise ConfigError(key, f"cannot make a stratified split of {n} images: {exc}") from None
    return np.sort(picked), np.sort(rest)


@register_dataset("digits", "scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes): no download")
def digits(test_fraction: float = 0.2, split_seed: int = 0) -> dict:
    """No official test split: a stratified ``test_fraction`` is held out (seeded by ``split_seed``)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]  # 0..16 grey levels -> [0, 1]
    y = bunch.target.astype(np.int64)
    n_test = int(round(test_fraction * len(y)))
    test_idx, train_idx = stratified(len(y), y, n_test, split_seed, "dataset.test_fraction")
    return {"train": (x[train_idx], y[train_idx]), "test": (x[test_idx], y[test_idx])}


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]  # torchvision's FashionMNIST.classes, also for the IDX files
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally .gz), the format of MNIST and Fashion-MNIST."""
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as handle:
        raw = handle.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    # a writable buffer: torch warns about (and must not share) the read-only memory of a bytes object
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _mnist_family(name: str, root: Optional[str], idx_dir: Optional[str], download: bool, cls_name: str,
                  debian_pkg: Optional[str]) -> dict:
    import torchvision.datasets as tvd

    root = Path(root or "data")
    try:
        train = getattr(tvd, cls_name)(str(root), train=True, download=download)
        test = getattr(tvd, cls_name)(str(root), train=False, download=download)
        tx, ty, vx, vy = train.data.numpy(), train.targets.numpy(), test.data.numpy(), test.targets.numpy()
    except RuntimeError as exc:
        if download:
            raise KdrunError(f"dataset={name}: download into {root} failed ({exc})") from None
        files = _find_idx(idx_dir)
        if files is None:
            hint = f"; or `apt-get install {debian_pkg}` (IDX files in {idx_dir})" if debian_pkg else ""
            raise InputError(
                f"dataset={name}: no {cls_name} files under dataset.root={root} (torchvision layout "
                f"{root}/{cls_name}/raw){' nor in dataset.idx_dir=' + str(idx_dir) if idx_dir else ''}. "
                f"Pass dataset.download=true to fetch them with torchvision{hint}") from None
        tx, ty, vx, vy = (read_idx(f) for f in files)
    out = {"train": (tx[:, None], ty.astype(np.int64)), "test": (vx[:, None], vy.astype(np.int64))}
    return {**out, "classes": FASHION_CLASSES} if name == "fashion_mnist" else out  # MNIST's names are its indices


@register_dataset("fashion_mnist", "Fashion-MNIST (60k/10k, 28x28 grey): torchvision layout or Debian's IDX files")
def fashion_mnist(root: Optional[str] = None, idx_dir: Optional[str] = None, download: bool = False) -> dict:
    return _mnist_family("fashion_mnist", root, idx_dir, download, "FashionMNIST", "dataset-fashion-mnist")


@register_dataset("mnist", "MNIST (60k/10k, 28x28 grey): torchvision layout under dataset.root")
def mnist(root: Optional[str] = None, idx_dir: Optional[str] = None, download: bool = False) -> dict:
    return _mnist_family("mnist", root, idx_dir, download, "MNIST", None)


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


def _cifar(name: str, root: Optional[str], download: bool, cls_name: str) -> dict:
    import torchvision.datasets as tvd

    root = Path(root or "data")
    try:
        train = getattr(tvd, cls_name)(str(root), train=True, download=download)
        test = getattr(tvd, cls_name)(str(root), train=False, download=download)
    except RuntimeError as exc:
        raise InputError(
            f"dataset={name}: no {cls_name} files under dataset.root={root} ({exc}). "
            f"Pass dataset.download=true to fetch them with torchvision, or copy the extracted "
            f"python-version archive into {root}") from None
    chw = lambda a: np.ascontiguousarray(a.transpose(0, 3, 1, 2))
    return {"train": (chw(train.data), np.array(train.targets)), "test": (chw(test.data), np.array(test.targets)),
            "classes": list(train.classes)}


@register_dataset("cifar10", "CIFAR-10 (50k/10k, 32x32 colour): torchvision layout under dataset.root")
def cifar10(root: Optional[str] = None, download: bool = False) -> dict:
    return _cifar("cifar10", root, download, "CIFAR10")


@register_dataset("cifar100", "CIFAR-100 (50k/10k, 32x32 colour, 100 classes): torchvision layout under dataset.root")
def cifar100(root: Optional[str] = None, download: bool = False) -> dict:
    return _cifar("cifar100", root, download, "CIFAR100")


@register_dataset("imagefolder", "Your own images: root/train/<class>/ (val is carved from it), root/val/<class>/ "
                                 "(the test split, unless root/test/ exists)")
def imagefolder(root: str, image_size: Optional[int] = 32, stream: str = "auto", num_workers: int = 2) -> dict:
    """root/train, root/val (and root/test) class folders (found and labelled by :func:`kdrun.data.images.scan_folders`:
    train's class names define the labels and are returned as ``classes``). val/ is the test split (with a test/,
    val/ joins train instead); the validation split is carved from train. Decoded into memory once when they fit
    and ``dataset.stream`` is not true; else streamed from disk by ``dataset.num_workers`` DataLoader workers."""
    root, size = Path(root), image_size or 32
    missing = [d for d in ("train", "val") if not (root / d).is_dir()]
    if missing:
        raise ConfigError("dataset.root", f"{root} has no {' or '.join(missing)}/ folder of class sub-folders")
    found = scan_folders(root, tuple(name for name in ("train", "val", "test") if (root / name).is_dir()))
    files = lambda *names: (np.concatenate([found[n][0] for n in names]), np.concatenate([found[n][1] for n in names]))
    # a val/ next to test/ joins train (val_fraction of it is carved out again); else val/ is the test set
    (tp, ty), (vp, vy) = (files("train", "val"), files("test")) if "test" in found else (files("train"), files("val"))
    train, test = LazyImages(tp, size, num_workers), LazyImages(vp, size, num_workers)
    stream, nbytes, k = str(stream).lower(), (len(tp) + len(vp)) * 3 * size * size, len(found["classes"])
    if stream == "true" or (stream == "auto" and nbytes > MAX_IN_MEMORY_BYTES):
        log.info(f"dataset=imagefolder: streaming {len(tp) + len(vp)} images from disk "
                 f"({num_workers} DataLoader workers)")
        return {"train": (train, ty), "test": (test, vy), "num_classes": k, "classes": found["classes"]}
    import torch

    check_fits(nbytes, torch.device("cpu"), "imagefolder")  # before decoding anything
    return {"train": (train.decode_all(), ty), "test": (test.decode_all(), vy), "num_classes": k,
            "classes": found["classes"]}


@register_dataset("fake", "Random learnable tensors (class prototypes plus noise): for tests and smoke runs")
def fake(channels: Optional[int] = 1, image_size: Optional[int] = 8, num_classes: Optional[int] = 4,
         train_size: Optional[int] = 256, split_seed: int = 0) -> dict:
    rng = np.random.default_rng(split_seed)
    c, s, k, n = channels or 1, image_size or 8, num_classes or 4, train_size or 256
    if k > n:  # labels are arange(n) % k: classes beyond n would hold no image (and 1e9 of them no memory)
        raise ConfigError("dataset.num_classes", f"{k} classes for dataset.train_size={n} images: every class needs "
                                                 f"a train image; set num_classes <= train_size")
    prototypes = rng.normal(0.0, 1.0, size=(k, c, s, s)).astype(np.float32)

    def make(m):
        y = np.arange(m) % k
        x = prototypes[y] + rng.normal(0.0, 1.5, size=(m, c, s, s)).astype(np.float32)
        return ((np.tanh(x) + 1) / 2).astype(np.float32), y.astype(np.int64)

    return {"train": make(n), "test": make(max(n // 2, k))}

