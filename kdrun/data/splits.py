"""The dataset contract: call a dataset (built-in, plugin or ``_target_``) and check what it returns.

A dataset is a callable returning a mapping with ``train`` and optionally ``val`` and ``test``. Each split is

- ``(x, y)``: tensors or numpy arrays; ``x`` is ``N×C×H×W`` (or ``N×H×W``, one channel), uint8 in 0..255 or
  float in [0, 1] (NaN or inf is refused at load, naming the split and the first bad image); ``y`` integer
  labels in ``[0, num_classes)``; or
- a map-style ``torch.utils.data.Dataset`` whose items are ``(image tensor C×H×W, label)``: read once into
  memory when it fits (``dataset.stream=auto``, or ``false``), else streamed every epoch by
  ``dataset.num_workers`` DataLoader workers (``dataset.stream=true`` forces it; labels are read from its
  ``targets`` attribute when it has one, else by one pass over the items).

Optional ``num_classes`` in the mapping (at most twice the number of distinct labels in the splits: a class
no split holds is never learned nor measured); otherwise the larger of ``max(label) + 1`` and ``len(classes)``.
Optional ``classes``: the class names in label order (the reports show them); without it, the train split's
``classes`` attribute when it is a torch Dataset that has one as torchvision's have, else the class indices. The
train split must not be empty; an empty test split is allowed: the run then has no test metrics (``test_acc``
null) and says so in a warning. A missing ``val`` is carved from ``train`` (``dataset.val_fraction``); a missing
``test`` is a stratified ``dataset.test_fraction`` of train.

What the callable is passed (:func:`dataset_kwargs`): every key of its YAML that is not one of kdrun's
``dataset.*`` keys, and each of kdrun's keys its signature names only when set (not null, and changed from
kdrun's default or required by the callable); otherwise the callable's own default applies. An exception raised
in the callable is one :class:`~kdrun.errors.ConfigError` line naming it (the traceback goes to the run's log).
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Mapping, Optional

import numpy as np

from kdrun import registry
from kdrun.data.sources import MAX_IN_MEMORY_BYTES, LazyImages, check_fits, stratified
from kdrun.errors import ConfigError, InputError, KdrunError
from kdrun.schema import DatasetConfig

SPLITS = ("train", "val", "test")
NOT_PASSED = ("name", "target", "kwargs", "augment")  # kdrun's keys that are never a dataset callable's argument
log = logging.getLogger("kdrun")


def call_dataset(cfg) -> dict:
    """``{"train": (x, y), "test": (x, y), ["val": (x, y)], "num_classes", "class_names", "source",
    "source_sha256"}`` (``class_names``: None when the dataset names no classes)."""
    if cfg.target:
        fn, what, key, source = registry.import_target(cfg.target, "dataset._target_"), cfg.target, \
            "dataset._target_", "target"
    else:
        entry = registry.get("dataset", cfg.name, "dataset")
        fn, what, key, source = entry.obj, f"dataset={cfg.name}", "dataset", entry.source
    kwargs = dataset_kwargs(fn, cfg)
    try:
        out = fn(**kwargs)
    except KdrunError:
        raise
    except Exception as exc:  # noqa: BLE001 - the dataset's code: one line naming it (the traceback: the run's log)
        raise ConfigError(key, f"{what}({', '.join(kwargs)}) raised {raised(exc)}") from exc
    splits = check_splits(out, what, key, stream=str(cfg.stream).lower(), workers=cfg.num_workers)
    if "test" not in splits:
        x, y = splits["train"]
        n_test = int(round(cfg.test_fraction * len(y)))
        test_idx, train_idx = stratified(len(y), y, n_test, cfg.split_seed, "dataset.test_fraction")
        splits["train"], splits["test"] = (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])
    return {**splits, "source": source, "source_sha256": registry.source_hash(fn) if source != "kdrun" else None}


def raised(exc: BaseException) -> str:
    """``TypeName: first line of the message`` of an exception raised by a user's code."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def dataset_kwargs(fn, cfg) -> dict:
    """The keyword arguments a dataset callable ``fn`` gets from the ``dataset`` node ``cfg``: its own keys
    (``cfg.kwargs``: the node's keys kdrun does not know, checked against the signature at validation) and each
    of kdrun's ``dataset.*`` keys that its signature names, when that key is set: not null, and either changed
    from kdrun's default or required by ``fn`` (no default of its own). So ``def load(root="/data/x")`` keeps
    ``/data/x`` until ``dataset.root`` is set, and ``def load(split_seed=7)`` its 7 until ``dataset.split_seed`` is."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        params = []
    defaults = registry.config_defaults(DatasetConfig)
    kwargs = {}
    for p in params:
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) or p.name not in defaults or p.name in NOT_PASSED:
            continue
        value = getattr(cfg, p.name)
        if value is not None and (value != defaults[p.name] or p.default is p.empty):
            kwargs[p.name] = value
    return {**kwargs, **cfg.kwargs}


def check_splits(out: Any, what: str, key: str, stream: str = "auto", workers: int = 0) -> dict:
    """Validate and normalise a dataset callable's return value (see the module docstring)."""
    if not isinstance(out, Mapping) or "train" not in out:
        got = f"a mapping with keys {sorted(map(str, out))}" if isinstance(out, Mapping) else f"a {type(out).__name__}"
        raise ConfigError(key, f"{what} returned {got}; expected a mapping with 'train' and optionally "
                               f"'val' / 'test', each (x, y) or a torch Dataset")
    unknown = [k for k in out if k not in (*SPLITS, "num_classes", "classes")]
    if unknown:
        raise ConfigError(key, f"{what} returned unknown key {unknown[0]!r}; expected train, val, test, num_classes, "
                               f"classes")
    names = out.get("classes")
    if names is None:  # a torch Dataset's own class names (torchvision's datasets have them)
        names = getattr(out["train"], "classes", None)
        names = list(names) if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names) else None
    elif isinstance(names, (str, bytes)) or not isinstance(names, (list, tuple)):
        raise ConfigError(key, f"{what}: classes must be a list of class names, got a {type(names).__name__}")
    splits = {name: _split(out[name], f"{what}['{name}']", key, stream, workers)
              for name in SPLITS if out.get(name) is not None}
    for name, (x, _) in splits.items():
        check_finite(x, f"{what}['{name}']")
    shapes = {name: tuple(x.shape[1:]) for name, (x, _) in splits.items()}
    if len(set(shapes.values())) > 1:
        raise ConfigError(key, f"{what}: splits have different image shapes {shapes}")
    if not len(splits["train"][1]):
        sizes = ", ".join(f"{name} {len(y)}" for name, (_, y) in splits.items())
        raise ConfigError(key, f"{what}['train'] is empty ({sizes} images); a run needs training images")
    top = max(int(y.max()) for _, y in splits.values() if len(y))
    num_classes = int(out.get("num_classes") or max(top + 1, len(names) if names is not None else 0))
    _check_num_classes(num_classes, [y for _, y in splits.values()], what)
    for name, (_, y) in splits.items():
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ConfigError(key, f"{what}['{name}'] has labels in [{int(y.min())}, {int(y.max())}], outside "
                                   f"[0, {num_classes}) (num_classes={num_classes})")
    splits["num_classes"] = num_classes
    splits["class_names"] = _class_names(names, num_classes, what, key)
    return splits


def _check_num_classes(num_classes: int, labels: list, what: str) -> None:
    """Refuse a declared ``num_classes`` most of whose classes no split holds (e.g. 1e9 for four labels): every
    class costs the models an output, and a class never seen is never learned nor measured. At least half of the
    declared classes must occur."""
    seen = len(np.unique(np.concatenate([np.asarray(y) for y in labels])))
    if num_classes > 2 * seen:
        raise ConfigError("dataset.num_classes", f"{what} declares {num_classes} classes but its labels name only "
                                                 f"{seen}; at least half the classes must occur: declare at most "
                                                 f"{2 * seen}, or leave num_classes out (max label + 1)")


def _class_names(names: Any, num_classes: int, what: str, key: str) -> Optional[list[str]]:
    """``names`` (a dataset's ``classes``, a list) checked: one distinct name per class, in label order; None: none."""
    if names is None:
        return None
    names = [str(n) for n in names]
    if len(names) != num_classes:
        raise ConfigError(key, f"{what}: {len(names)} class names for {num_classes} classes; classes must name "
                               f"every class, in label order")
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ConfigError(key, f"{what}: class name {twice!r} is given twice; class names must be distinct")
    return names


def _split(part: Any, what: str, key: str, stream: str, workers: int) -> tuple[Any, np.ndarray]:
    import torch

    if isinstance(part, torch.utils.data.Dataset):
        return _from_dataset(part, what, key, stream, workers)
    if not isinstance(part, (tuple, list)) or len(part) != 2:
        raise ConfigError(key, f"{what} is a {type(part).__name__}; expected (x, y) or a torch Dataset")
    x, y = part
    if isinstance(x, LazyImages):
        return x, np.asarray(y, dtype=np.int64)
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ConfigError(key, f"{what}: x has shape {x.shape}; expected N×C×H×W or N×H×W")
    if y.ndim != 1 or len(y) != len(x) or not (np.issubdtype(y.dtype, np.integer) or _integral(y)):
        raise ConfigError(key, f"{what}: y must be {len(x)} integer labels, got shape {y.shape} dtype {y.dtype}")
    if x.dtype != np.uint8:
        x = x.astype(np.float32)
    return np.ascontiguousarray(x), y.astype(np.int64)


def check_finite(x: Any, what: str, chunk: int = 4096) -> None:
    """Refuse float images holding NaN or inf, naming the first bad one: one float64 sum (exact: finite
    float32 values cannot overflow it), then a chunked search only when it is not finite."""
    if isinstance(x, LazyImages) or x.dtype == np.uint8 or np.isfinite(np.sum(x, dtype=np.float64)):
        return
    for start in range(0, len(x), chunk):
        part = x[start:start + chunk]
        bad = np.flatnonzero(~np.isfinite(part.reshape(len(part), -1)).all(axis=1))
        if len(bad):
            raise InputError(f"{what}: x[{start + int(bad[0])}] holds NaN or inf pixel values; "
                             f"images must be finite (uint8 0..255 or float in [0, 1])")


def _integral(y: np.ndarray) -> bool:
    return np.issubdtype(y.dtype, np.floating) and bool(np.all(np.mod(y, 1) == 0))


def _from_dataset(ds, what: str, key: str, stream: str, workers: int) -> tuple[Any, np.ndarray]:
    """A map-style Dataset: read once into arrays when it fits (and ``stream`` is not true), else streamed. An
    exception raised by its code (``len``, an item) is one line naming the split."""
    try:
        return _read_dataset(ds, what, key, stream, workers)
    except KdrunError:
        raise
    except Exception as exc:  # noqa: BLE001 - the dataset's code
        raise ConfigError(key, f"{what}: reading its items raised {raised(exc)}") from exc


def _read_dataset(ds, what: str, key: str, stream: str, workers: int) -> tuple[Any, np.ndarray]:
    import torch

    n = len(ds)
    if n == 0:
        raise ConfigError(key, f"{what} is an empty Dataset")
    first = ds[0]
    if not isinstance(first, (tuple, list)) or len(first) < 2 or not isinstance(first[0], torch.Tensor):
        raise ConfigError(key, f"{what}: items must be (image tensor, label), got {type(first).__name__}")
    img = first[0] if first[0].dim() == 3 else first[0][None]
    dtype = np.uint8 if img.dtype == torch.uint8 else np.float32
    nbytes = n * img.numel() * np.dtype(dtype).itemsize
    if stream == "true" or (stream == "auto" and nbytes > MAX_IN_MEMORY_BYTES):
        targets = getattr(ds, "targets", None)
        y = np.asarray(targets if targets is not None else [int(ds[i][1]) for i in range(n)], dtype=np.int64)
        log.info(f"{what}: streaming {n} images ({nbytes / 2**30:.1f} GiB) with {workers} DataLoader workers")
        return LazyDataset(ds, np.arange(n), tuple(img.shape), workers, what), y
    check_fits(nbytes, torch.device("cpu"), what)
    x = np.empty((n, *img.shape), dtype=dtype)
    y = np.empty(n, dtype=np.int64)
    for i in range(n):
        image, label = ds[i][:2]
        image = image if image.dim() == 3 else image[None]
        if tuple(image.shape) != tuple(img.shape):
            raise ConfigError(key, f"{what}: item {i} has shape {tuple(image.shape)}, item 0 {tuple(img.shape)}; "
                                   f"resize them to one size")
        x[i], y[i] = image.numpy(), int(label)
    return x, y


class LazyDataset(LazyImages):
    """A user's map-style Dataset read on demand: the streaming path of :class:`kdrun.data.sources.LazyImages`
    (same batching and DataLoader workers), with ``paths`` holding item indices instead of file names."""

    def __init__(self, dataset, indices: np.ndarray, shape: tuple, workers: int, what: str = "dataset"):
        self.dataset, self.paths, self.size, self.workers = dataset, np.asarray(indices), shape[-1], workers
        self.what = what  # names the split in errors
        self.item_shape = tuple(shape)
        self.shape = (len(self.paths), *shape)
        self.nbytes = 0

    def __getitem__(self, idx) -> "LazyDataset":
        return LazyDataset(self.dataset, self.paths[idx], self.item_shape, self.workers, self.what)

    def tobytes(self) -> bytes:  # the dataset fingerprint: which dataset, which items, in which order
        return f"{type(self.dataset).__module__}.{type(self.dataset).__qualname__}:{len(self.dataset)}:".encode() \
            + self.paths.astype(np.int64).tobytes()

    def load(self, i: int):
        image = self.dataset[int(self.paths[i])][0]
        if image.is_floating_point() and not bool(image.isfinite().all()):
            raise InputError(f"{self.what}: item {int(self.paths[i])} holds NaN or inf pixel values; "
                             f"images must be finite (uint8 0..255 or float in [0, 1])")
        return image if image.dim() == 3 else image[None]
