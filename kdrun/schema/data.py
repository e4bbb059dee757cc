"""Schema of the ``dataset`` node: the built-in datasets' keys plus a ``_target_``'s arguments."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from kdrun import registry
from kdrun.errors import ConfigError
from kdrun.schema.checks import check_choice, check_min, check_positive, check_range

MIX_MODES = ("batch", "elem")


@dataclass
class AugmentConfig:
    """Training augmentation: crop and flip per image, then mixup / CutMix across the batch (timm's ``Mixup``
    names and semantics; :mod:`kdrun.data.mixing`). An image is mixed with its partner in the batch, the one at
    the mirrored position (i <-> B-1-i, as timm); its label becomes ``λ·y + (1-λ)·y_partner``."""

    crop_padding: int = 0     # random crop after zero-padding this many pixels per side (0 = off)
    hflip: bool = False       # random horizontal flip with p = 0.5
    mixup_alpha: float = 0.0  # mixup (Zhang et al. 2018): λ ~ Beta(α, α), image λ·x + (1-λ)·x_partner (0 = off)
    cutmix_alpha: float = 0.0  # CutMix (Yun et al. 2019): λ ~ Beta(α, α), a box of ~(1-λ) of the image pasted
    #                            from the partner, λ then corrected to the box's clipped area (0 = off)
    mix_prob: float = 1.0     # probability that a batch (mix_mode=elem: an image) is mixed at all
    switch_prob: float = 0.5  # both on: probability of CutMix instead of mixup
    mix_mode: str = "batch"   # batch: one λ (and box) per batch, timm's default | elem: one per image

    def __post_init__(self):
        check_min("dataset.augment.crop_padding", self.crop_padding, 0)
        check_range("dataset.augment.mixup_alpha", self.mixup_alpha, 0.0, math.inf, hi_open=True)
        check_range("dataset.augment.cutmix_alpha", self.cutmix_alpha, 0.0, math.inf, hi_open=True)
        check_range("dataset.augment.mix_prob", self.mix_prob, 0.0, 1.0)
        check_range("dataset.augment.switch_prob", self.switch_prob, 0.0, 1.0)
        check_choice("dataset.augment.mix_mode", self.mix_mode, MIX_MODES)

    @property
    def mixes(self) -> bool:
        """Whether training batches are mixed (mixup or CutMix on, with a chance > 0)."""
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0

    @property
    def mix_key(self) -> str:
        """The key that turns mixing on, for messages: ``dataset.augment.mixup_alpha`` (or ``cutmix_alpha``)."""
        return f"dataset.augment.{'mixup_alpha' if self.mixup_alpha > 0 else 'cutmix_alpha'}"


@dataclass
class DatasetConfig:
    name: Optional[str] = "digits"
    root: Optional[str] = None        # folder of torchvision-format files (or of your image folders)
    idx_dir: Optional[str] = None     # folder with raw IDX (.gz) files, read when root has none
    download: bool = False            # let torchvision download missing files into root
    val_fraction: float = 0.1         # share of train carved out (stratified, split_seed) for model selection
    test_fraction: float = 0.2        # only for data without an official test split (digits)
    split_seed: int = 0
    train_subset: Optional[int] = None  # keep only this many train images (stratified): quick runs
    mean: Optional[List[float]] = None  # per-channel normalisation; null = computed on the train split
    std: Optional[List[float]] = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    image_size: Optional[int] = None  # imagefolder: resize to this; fake: generated size
    channels: Optional[int] = None    # fake only
    num_classes: Optional[int] = None  # fake only
    train_size: Optional[int] = None  # fake only
    stream: str = "auto"              # imagefolder, torch Datasets: auto (stream when too big for memory) | true | false
    num_workers: int = 2              # imagefolder, torch Datasets: DataLoader workers that decode images
    target: Optional[str] = None      # `_target_` in YAML: pkg.module.Callable returning the splits (README)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # other keys: keyword args of the dataset callable

    def __post_init__(self):
        self._check_source()
        if self.name == "imagefolder" and self.root in (None, "", "???"):
            raise ConfigError("dataset.root", "dataset=imagefolder needs dataset.root=/path with train/ and val/ folders")
        check_range("dataset.val_fraction", self.val_fraction, 0.0, 1.0, hi_open=True)
        check_range("dataset.test_fraction", self.test_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
        if self.split_seed < 0:
            raise ConfigError("dataset.split_seed", f"must be >= 0, got {self.split_seed}")
        if self.train_subset is not None and self.train_subset < 1:
            raise ConfigError("dataset.train_subset", f"must be >= 1 or null, got {self.train_subset}")
        check_choice("dataset.stream", str(self.stream).lower(), ("auto", "true", "false"))
        if self.num_workers < 0:
            raise ConfigError("dataset.num_workers", f"must be >= 0, got {self.num_workers}")
        if (self.mean is None) != (self.std is None):
            raise ConfigError("dataset.mean", "set both dataset.mean and dataset.std, or neither")
        for i, m in enumerate(self.mean or []):
            check_range(f"dataset.mean[{i}]", m, float("-inf"), float("inf"))
        for i, s in enumerate(self.std or []):
            check_positive(f"dataset.std[{i}]", s)

    def _check_source(self):
        """A registered name or a ``_target_``; extra keys must be arguments the callable accepts."""
        if self.target:
            fn = registry.import_target(self.target, "dataset._target_")
            self.name = self.name or self.target.replace(":", ".").rsplit(".", 1)[-1]
        elif not self.name:
            raise ConfigError("dataset.name", "set a dataset name (`kdrun --list datasets`) or a _target_")
        else:
            fn = registry.get("dataset", self.name, "dataset").obj
        for arg in self.kwargs:
            if not registry.accepts(fn, arg):
                raise ConfigError(f"dataset.{arg}", f"unknown config key; {self.target or self.name} takes no "
                                                    f"argument {arg!r}")
