"""Datasets as device-resident tensors, with seeded splits and batched augmentation.

A dataset that fits in memory is decoded once into ``[N, C, H, W]`` tensors (uint8 for 8-bit images,
float32 in [0, 1] otherwise) on the run's device. Batches are index slices of a seeded permutation;
normalisation, random crop and flip are batched tensor ops: no per-sample Python in the training loop.
Random crop and flip form a finite set of views of each image: a batch's augmentation is drawn as one view
id per sample (:func:`draw_views`) and applied from those ids (:func:`apply_views`); each :class:`Batch` carries
its view ids, for teacher sources that cache per view (:mod:`kdrun.teacher.view_cache`). mixup and CutMix then mix
the batch (:mod:`kdrun.data.mixing`), and the batch says how (``Batch.mix``: its labels become probabilities).
Image folders too large for memory are streamed (:class:`kdrun.data.sources.LazyImages`) and then go through
the same batched normalisation and augmentation. Where images come from is :mod:`kdrun.data.sources`.

Consumes ``dataset.*`` (see ``conf/dataset/*.yaml``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from kdrun.data.mixing import Mix, mix_batch
from kdrun.data.sources import LazyImages, check_fits, stratified
from kdrun.data.splits import call_dataset
from kdrun.errors import ConfigError, InputError
from kdrun.memo import MEMO
from kdrun.schema import AugmentConfig, DatasetConfig


@dataclass
class Split:
    x: torch.Tensor  # [N, C, H, W], uint8 (0..255) or float32 (0..1)
    y: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return len(self.y)


class Batch(NamedTuple):
    """One batch of a split, as :meth:`Data.batches` yields it (a tuple: ``x, y, idx, views, mix = batch``)."""

    x: torch.Tensor                # [B, C, H, W] normalised float images (augmented when asked)
    y: torch.Tensor                # [B] labels (of each image's own sample: see ``mix``)
    idx: torch.Tensor              # [B] their indices in the split
    views: Optional[torch.Tensor]  # [B] the view id each image is shown as (:func:`draw_views`); None: not augmented
    mix: Optional[Mix] = None      # mixup / CutMix (:mod:`kdrun.data.mixing`): what each image's label is made of

    def rows(self, lo: int, hi: int) -> "Batch":
        """Samples ``lo:hi`` of the batch (every per-sample field cut alike)."""
        cut = lambda t: None if t is None else t.rows(lo, hi) if isinstance(t, Mix) else t[lo:hi]  # noqa: E731
        return Batch(*(cut(field) for field in self))

    def targets(self, num_classes: int) -> torch.Tensor:
        """What the loss is trained on: ``y`` (class ids), or ``[B, num_classes]`` probabilities for a mixed batch
        (:meth:`kdrun.data.mixing.Mix.targets`; CE on them is ``λ·CE(y) + (1-λ)·CE(y_partner)``)."""
        return self.y if self.mix is None else self.mix.targets(self.y, num_classes)


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
    class_names: Optional[list[str]] = None  # in label order, as the dataset gives them (None: it names none)
    warnings: list = field(default_factory=list)  # what the config asked of the data in vain (run's warnings)

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
                augment: bool = False, merge_single: bool = False) -> Iterator[Batch]:
        """Yield :class:`Batch` ``(x, y, idx, views, mix)``: normalised float images (augmented with ``augment``),
        labels, their indices in the split, the view ids they are shown as (None when not augmented) and, under
        mixup / CutMix (``augment``), how each image was mixed (:mod:`kdrun.data.mixing`; else None).

        ``merge_single`` (training): a last batch of one sample joins the one before (:func:`batch_sizes`)."""
        part = self.split(split)
        n = len(part)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(part.y.device)
        bounds = itertools.accumulate(batch_sizes(n, batch_size, merge_single), initial=0)
        chunks = [order[lo:hi] for lo, hi in itertools.pairwise(bounds)]
        if isinstance(part.x, LazyImages):  # streaming: DataLoader workers decode the next batches meanwhile
            raws = (raw.to(part.y.device, non_blocking=True) for raw in part.x.stream(chunks))
        else:
            raws = (part.x[idx] for idx in chunks)
        for idx, raw in zip(chunks, raws):
            views = self._draw(augment, len(idx), generator)
            x, y, mix = self._prepare(raw, views), part.y[idx], None
            if augment and self.augment.mixes:  # after the views, from the same generator (kdrun.data.mixing)
                x, mix = mix_batch(x, y, self.augment, generator)
            yield Batch(x, y, idx, views, mix)

    def inputs(self, split: str, idx: torch.Tensor, *, augment: bool = False,
               generator: Optional[torch.Generator] = None, views: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The normalised float images ``idx`` of ``split`` (augmented in one batched op if asked, or shown as the
        given view ids ``views``, one per image: :func:`apply_views`)."""
        x = self.split(split).x
        raw = x.fetch(idx.cpu()).to(idx.device) if isinstance(x, LazyImages) else x[idx]
        return self._prepare(raw, views if views is not None else self._draw(augment, len(idx), generator))

    def _draw(self, augment: bool, n: int, generator: Optional[torch.Generator]) -> Optional[torch.Tensor]:
        """View ids of a batch of ``n`` (:func:`draw_views`), or None when it is not augmented."""
        return draw_views(self.augment, n, generator) if augment and num_views(self.augment) > 1 else None

    def _prepare(self, raw: torch.Tensor, views: Optional[torch.Tensor]) -> torch.Tensor:
        x = to_unit_float(raw)
        if views is not None:
            x = apply_views(x, self.augment, views)
        return (x - self.mean) / self.std


def batch_sizes(n: int, batch_size: int, merge_single: bool = False) -> list[int]:
    """The sizes of the batches of ``n`` samples: ``batch_size`` each, the last one smaller. With ``merge_single``
    a last batch of one sample is merged into the one before (of ``batch_size + 1``): BatchNorm in train mode
    cannot normalise a single sample ("Expected more than 1 value per channel"), and for small data merging
    keeps every sample in every epoch, where dropping it would not. Only ``n`` ≡ 1 (mod ``batch_size``) changes."""
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    if merge_single and len(sizes) > 1 and sizes[-1] == 1:
        sizes[-2:] = [sizes[-2] + 1]
    return sizes


def augment_identity(aug: AugmentConfig) -> dict:
    """The augmentation's part of a data identity (store and cache keys); the mixing keys only when it mixes, so
    the keys of runs without mixup / CutMix stay as they were."""
    mixing = ("mixup_alpha", "cutmix_alpha", "mix_prob", "switch_prob", "mix_mode") if aug.mixes else ()
    return {"crop_padding": aug.crop_padding, "hflip": aug.hflip, **{k: getattr(aug, k) for k in mixing}}


def to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images to float in [0, 1] exactly as torchvision's ToTensor does; floats unchanged."""
    return x.float().div(255) if x.dtype == torch.uint8 else x.float()


def augment_batch(x: torch.Tensor, aug: AugmentConfig, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Random crop after zero padding, then random horizontal flip, per sample: :func:`draw_views` from
    ``generator``, then :func:`apply_views` (one batched op)."""
    return apply_views(x, aug, draw_views(aug, len(x), generator).to(x.device))


def num_views(aug: AugmentConfig) -> int:
    """How many distinct views of an image the augmentation draws from: (2p+1)^2 crop offsets x 2 flips."""
    return (2 * aug.crop_padding + 1) ** 2 * (2 if aug.hflip else 1)


def finite_views(aug: AugmentConfig) -> Optional[int]:
    """:func:`num_views` when every random choice of ``aug`` is one of those finite views, else None.

    An augmentation option other than crop and flip set away from its default (one this module does not
    enumerate) makes the set of views unknown: None, so no cache is keyed by view ids that do not name them.
    mixup / CutMix make every batch a fresh mix of two images: None."""
    if aug.mixes:
        return None
    known = {"crop_padding", "hflip", "mixup_alpha", "cutmix_alpha", "mix_prob", "switch_prob", "mix_mode"}
    for f in dataclasses.fields(aug):
        if f.name not in known and getattr(aug, f.name) != _default(f):
            return None
    return num_views(aug)


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def draw_views(aug: AugmentConfig, n: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One view id per sample, int64 ``[n]`` on the CPU: crop offsets ``dy``, ``dx`` in ``[0, 2p]`` and a flip bit,
    encoded as ``(dy * (2p+1) + dx) * F + flip`` (``F`` = 2 with ``hflip``, else 1).

    Draws the random numbers in a fixed order (``dy``, then ``dx``, then the flips), the order augmentation has
    always used, so a seeded run augments exactly as before."""
    side = 2 * aug.crop_padding + 1
    zeros = torch.zeros(n, dtype=torch.int64)
    dy = torch.randint(0, side, (n,), generator=generator) if aug.crop_padding > 0 else zeros
    dx = torch.randint(0, side, (n,), generator=generator) if aug.crop_padding > 0 else zeros
    flip = (torch.rand(n, generator=generator) < 0.5).long() if aug.hflip else zeros
    return (dy * side + dx) * (2 if aug.hflip else 1) + flip


def decode_views(aug: AugmentConfig, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dy, dx, flip)`` of view ids (:func:`draw_views`' encoding)."""
    side, flips = 2 * aug.crop_padding + 1, 2 if aug.hflip else 1
    crop, flip = views.div(flips, rounding_mode="floor"), views.remainder(flips).bool()
    return crop.div(side, rounding_mode="floor"), crop.remainder(side), flip


def apply_views(x: torch.Tensor, aug: AugmentConfig, views: torch.Tensor) -> torch.Tensor:
    """View ``views[i]`` of image ``x[i]``: the ``h x w`` window at offset ``(dy, dx)`` of the image zero-padded by
    ``p`` on each side, mirrored left-right if its flip bit is set. One gather for the whole batch: each output
    pixel's position in its padded image, with the flip folded into the column index."""
    n, c, h, w = x.shape
    p = aug.crop_padding
    dy, dx, flip = decode_views(aug, views.to(x.device))
    padded = F.pad(x, (p, p, p, p)) if p > 0 else x
    cols = torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + dx[:, None]  # [n, w]
    rows = (dy[:, None] + torch.arange(h, device=x.device)) * (w + 2 * p)  # [n, h]: row starts in the padded image
    index = (rows[:, :, None] + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    return padded.reshape(n, c, -1).gather(2, index).reshape(n, c, h, w)


def load_data(cfg: DatasetConfig, device: torch.device) -> Data:
    """Load dataset ``cfg.name``, remembered for the next job of a sweep (:data:`kdrun.memo.MEMO`: the last one
    loaded in this process; its tensors are never modified)."""
    return MEMO.dataset.get((repr(cfg), str(device)), lambda: _load_data(cfg, device))


def _load_data(cfg: DatasetConfig, device: torch.device) -> Data:
    """Load the dataset, carve a stratified val split from train when it has none, put it all on ``device``."""
    splits = call_dataset(cfg)
    train_x, train_y = splits["train"]
    test_x, test_y = splits["test"]
    warnings = []
    if cfg.train_subset is not None and cfg.train_subset < len(train_y):
        keep, _ = stratified(len(train_y), train_y, cfg.train_subset, cfg.split_seed, "dataset.train_subset")
        train_x, train_y = train_x[keep], train_y[keep]
    elif cfg.train_subset is not None and cfg.train_subset > len(train_y):
        warnings.append(f"dataset.train_subset={cfg.train_subset}: not used (the train split of {cfg.name} holds "
                        f"{len(train_y):,} images, all kept)")
    if "val" in splits:  # the dataset's own validation split
        (val_x, val_y), train_idx = splits["val"], np.arange(len(train_y))
    else:
        n_val = int(round(cfg.val_fraction * len(train_y)))
        if n_val > 0:
            val_idx, train_idx = stratified(len(train_y), train_y, n_val, cfg.split_seed, "dataset.val_fraction")
        else:
            val_idx, train_idx = np.array([], dtype=np.int64), np.arange(len(train_y))
        val_x, val_y = train_x[val_idx], train_y[val_idx]
    check_fits(train_x.nbytes + val_x.nbytes + test_x.nbytes, device, cfg.name)
    on = lambda x: x if isinstance(x, LazyImages) else torch.as_tensor(x).to(device)
    to = lambda x, y: Split(on(x), torch.as_tensor(y, dtype=torch.int64).to(device))
    train, val, test = to(train_x[train_idx], train_y[train_idx]), to(val_x, val_y), to(test_x, test_y)
    num_classes = splits["num_classes"]
    present = int(torch.unique(train.y).numel())
    if num_classes < 2 or present < 2:  # nothing to learn: every model would be "perfect" from the start
        raise InputError(f"dataset={cfg.name}: the train split holds {present} class(es) of {num_classes}; "
                         f"classification needs at least 2")
    mean, std = _normalisation(cfg, train)
    identity = {
        "name": cfg.name, "sizes": [len(train), len(val), len(test)], "shape": list(train.x.shape[1:]),
        "num_classes": num_classes, "val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed,
        "train_subset": cfg.train_subset, "mean": [round(v, 6) for v in mean.flatten().tolist()],
        "std": [round(v, 6) for v in std.flatten().tolist()],
        "augment": augment_identity(cfg.augment),
        "fingerprint": _fingerprint(train_x[train_idx], train_y[train_idx], test_x, test_y,
                                    *((val_x, val_y) if "val" in splits else ())),
    }
    if cfg.target or splits["source"] != "kdrun":  # a user's dataset code: its changes must change the identity
        identity["source"] = {"target": cfg.target, "kwargs": dict(cfg.kwargs), "sha256": splits["source_sha256"]}
    return Data(train, val, test, num_classes, mean.to(device), std.to(device), cfg.augment, identity,
                splits["class_names"], warnings)


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


def _take(split: Split, idx: torch.Tensor, y: Optional[torch.Tensor] = None) -> Split:
    idx = idx.to(split.y.device)
    x = split.x[idx.cpu().numpy()] if isinstance(split.x, LazyImages) else split.x[idx]
    return Split(x, split.y[idx] if y is None else y)


def with_train(data: Data, idx: torch.Tensor, tag: dict, y: Optional[torch.Tensor] = None) -> Data:
    """``data`` with its train split cut to ``idx`` (labels ``y`` if given); val and test unchanged.

    ``tag`` describes the subset and joins the identity, so stores and caches keep subsets apart.
    """
    return dataclasses.replace(data, train=_take(data.train, idx, y), identity={**data.identity, "subset": tag})


def with_classes(data: Data, classes: list[int], tag: dict) -> Data:
    """Every split restricted to ``classes``, relabelled 0..len(classes)-1 in that order (a sub-task)."""
    lookup = torch.full((data.num_classes,), -1, dtype=torch.int64)
    lookup[torch.as_tensor(classes)] = torch.arange(len(classes))

    def restrict(split: Split) -> Split:
        keep = torch.nonzero(torch.isin(split.y.cpu(), torch.as_tensor(classes))).flatten()
        return _take(split, keep, lookup[split.y.cpu()[keep]].to(split.y.device))
    names = None if data.class_names is None else [data.class_names[c] for c in classes]
    return dataclasses.replace(data, train=restrict(data.train), val=restrict(data.val), test=restrict(data.test),
                               num_classes=len(classes), identity={**data.identity, "classes": list(classes),
                                                                   "subset": tag}, class_names=names)
