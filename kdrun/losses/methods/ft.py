"""``ft``: factor transfer (Kim, Park & Kwak, NeurIPS 2018), as RepDistiller's ``FactorTransfer``.

The teacher's deepest feature map is compressed into a *factor* by a paraphraser (a conv auto-encoder trained
first, on the teacher alone, to reconstruct the map); a translator learned with the student maps the student's
map to a factor of the same shape, and the student is taught to match the teacher's factor. With ``f`` a factor
map (N, C, H, W)::

    φ(f) = normalize(mean_c f², flattened)                        (N, H·W), L2 per sample (RepDistiller's p1 = 2)
    ft = mean |φ(translator(f_s)) − φ(paraphraser.encoder(f_t))|   L1 distance (p2 = 1), mean over batch and H·W
    L = (1 − alpha)·CE(y, s) + alpha·T²·KL(softmax(t/T) ‖ softmax(s/T)) + beta·ft

Both maps of a pair are average-pooled to the smaller size first. The paraphraser (3 conv + 3 transposed conv,
3x3, LeakyReLU(0.1), no BatchNorm; the factor has ``int(rate·C_t)`` channels) is pre-trained for ``init_epochs``
on the teacher's map with MSE reconstruction and SGD (``init_lr``, momentum 0.9, weight decay 5e-4), in
:meth:`FTLoss.prepare` before the student trains, then frozen. The translator (3 conv 3x3 + BatchNorm +
LeakyReLU(0.1), to ``int(rate·C_t)`` channels) trains with the student. Default layer: the deepest stage's output
(RepDistiller's ``feat[-2]``); the loss needs (N, C, H, W) maps. ``beta`` 200 is RepDistiller's CIFAR-100 weight
(``-a 0 -b 200``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import ConfigError
from kdrun.losses.feature import FeatureLoss, _shape, pool_pair
from kdrun.losses.hooks import FeatureHooks
from kdrun.losses.options import FEATURES, FeatureLossConfig
from kdrun.registry import register_loss
from kdrun.schema.checks import check_min, check_range

log = logging.getLogger("kdrun")
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4  # RepDistiller's pre-training optimizer (helper/pretrain.py)


def teacher_before_the_student(cfg) -> None:
    """ft: the paraphraser learns from the teacher before the student trains; a snapshot teacher comes later."""
    if getattr(cfg.mode, "method", None) == "snapshot":
        raise ConfigError("mode.method", "loss=ft pre-trains its paraphraser on the teacher before the student "
                                         "trains, and mode.method=snapshot has no teacher then: use "
                                         "mode.method=born_again or mode=offline")


@register_loss("ft", "Factor transfer (Kim et al. 2018): CE + beta·mean |φ(translator(s)) − φ(paraphraser(t))|",
               target="kdrun.losses.methods.ft.FTLoss", needs=FEATURES, rules=(teacher_before_the_student,))
@dataclass
class FTLossConfig(FeatureLossConfig):
    """loss=ft: L = (1-alpha)·CE + alpha·T²·KL + beta·mean |φ(translator(f_s)) − φ(paraphraser(f_t))|."""

    name: str = "ft"
    beta: float = 200.0     # weight of the factor term (>= 0); RepDistiller's CIFAR-100 weight
    rate: float = 0.5       # paraphrase rate k in (0, 1]: the factor has int(k·C_t) channels
    init_epochs: int = 30   # epochs of the paraphraser's pre-training on the teacher (>= 1)
    init_lr: float = 0.01   # SGD learning rate of that pre-training (> 0)

    def __post_init__(self):
        super().__post_init__()
        check_range("loss.rate", self.rate, 0.0, 1.0, lo_open=True)
        check_min("loss.init_epochs", self.init_epochs, 1)
        check_range("loss.init_lr", self.init_lr, 0.0, float("inf"), lo_open=True, hi_open=True)


def _block(c_in: int, c_out: int, conv=nn.Conv2d, bn: bool = False) -> list[nn.Module]:
    return [conv(c_in, c_out, 3, 1, 1), *([nn.BatchNorm2d(c_out)] if bn else []), nn.LeakyReLU(0.1, inplace=True)]


class Paraphraser(nn.Module):
    """The teacher's auto-encoder: ``encoder`` (C -> C -> k·C -> k·C) gives the factor, ``decoder`` the map back."""

    def __init__(self, channels: int, rate: float = FTLossConfig.rate):
        super().__init__()
        k = int(channels * rate)
        self.encoder = nn.Sequential(*_block(channels, channels), *_block(channels, k), *_block(k, k))
        self.decoder = nn.Sequential(*_block(k, k, nn.ConvTranspose2d), *_block(k, channels, nn.ConvTranspose2d),
                                     *_block(channels, channels, nn.ConvTranspose2d))

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The factor and the reconstruction of ``f``."""
        factor = self.encoder(f)
        return factor, self.decoder(factor)


class Translator(nn.Module):
    """The student's encoder to the teacher's factor channels (C_s -> C_s -> k·C_t -> k·C_t, with BatchNorm)."""

    def __init__(self, channels: int, teacher_channels: int, rate: float = FTLossConfig.rate):
        super().__init__()
        k = int(teacher_channels * rate)
        self.encoder = nn.Sequential(*_block(channels, channels, bn=True), *_block(channels, k, bn=True),
                                     *_block(k, k, bn=True))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.encoder(f)


def factor(f: torch.Tensor) -> torch.Tensor:
    """φ(f): the channel mean of f², flattened to (N, H·W) and L2-normalised per sample."""
    return F.normalize(f.float().pow(2).mean(1).flatten(1), dim=1)


def ft_term(factor_s: torch.Tensor, factor_t: torch.Tensor) -> torch.Tensor:
    """``mean |φ(factor_s) − φ(factor_t)|`` of one pair of factors, pooled to the smaller size (teacher detached)."""
    factor_s, factor_t = pool_pair(factor_s, factor_t.detach())
    return (factor(factor_s) - factor(factor_t)).abs().mean()


class FTLoss(FeatureLoss):
    """Factor transfer over one or more layer pairs (default: the deepest stage), plus the KD term. A frozen
    paraphraser per pair, pre-trained on the teacher in :meth:`prepare`; a translator per pair, built in
    :meth:`setup` and trained with the student."""

    name = "ft"
    role = "last_stage"

    def __init__(self, T: float = FTLossConfig.T, alpha: float = FTLossConfig.alpha, beta: float = FTLossConfig.beta,
                 rate: float = FTLossConfig.rate, init_epochs: int = FTLossConfig.init_epochs,
                 init_lr: float = FTLossConfig.init_lr, student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(T=T, alpha=alpha, beta=beta, student_layers=student_layers, teacher_layers=teacher_layers)
        self.rate, self.init_epochs, self.init_lr = float(rate), int(init_epochs), float(init_lr)
        self.paraphrasers = nn.ModuleList()
        self.translators = nn.ModuleList()
        self.term_name = "Σ_pairs mean |φ(translator(f_s)) − φ(paraphraser(f_t))|"

    def check_pair(self, sn: str, tn: str, fs: torch.Tensor, ft: torch.Tensor) -> None:
        super().check_pair(sn, tn, fs, ft)
        if int(ft.shape[1] * self.rate) < 1:
            raise ConfigError("loss.rate", f"loss=ft: teacher layer {tn!r} {_shape(ft)} has {ft.shape[1]} channels, "
                                           f"times loss.rate={self.rate} leaves no factor channel: raise loss.rate")

    def setup(self, student_features, teacher_features, names=None) -> None:
        """Check the pairs and build one fresh translator per pair (a new student gets new translators)."""
        super().setup(student_features, teacher_features, names)
        self.translators = nn.ModuleList(Translator(fs.shape[1], ft.shape[1], self.rate).to(fs.device)
                                         for fs, ft in zip(student_features, teacher_features))
        self.train()

    def prepare(self, teacher: nn.Module, data, prep) -> None:
        """Pre-train one paraphraser per teacher layer to reconstruct it (or reuse the one ``prep`` keeps), then
        freeze it. ``prep``: the student stage's :class:`kdrun.stages.student.Preparation`."""
        names = self.teacher_layers or self._defaults(teacher, "loss.teacher_layers")
        x = data.inputs("train", torch.arange(min(2, len(data.train)), device=data.train.y.device))
        with torch.no_grad(), FeatureHooks(teacher, names, key="loss.teacher_layers") as feats:
            teacher(x)
        shapes = [feats[n] for n in names]
        for name, f in zip(names, shapes):
            if f.dim() != 4:
                raise ConfigError("loss.teacher_layers", f"loss=ft paraphrases (N, C, H, W) maps; teacher layer "
                                                         f"{name!r} gives {_shape(f)}: use a conv teacher or name a "
                                                         f"conv layer")
        key = {"layers": names, "rate": self.rate, "init_epochs": self.init_epochs, "init_lr": self.init_lr,
               "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "batch_size": prep.batch_size, "seed": prep.seed,
               "data": data.identity}
        with torch.random.fork_rng(devices=[]):  # the run's random numbers do not depend on it
            torch.manual_seed(prep.seed)
            paraphrasers = nn.ModuleList(Paraphraser(f.shape[1], self.rate) for f in shapes).to(x.device)
        state, how = prep.keep("paraphraser", key, lambda: self._pretrain(paraphrasers, teacher, names, data, prep))
        paraphrasers.load_state_dict(state)
        self.paraphrasers = paraphrasers.requires_grad_(False)
        log.info(f"loss=ft: paraphraser of teacher layer{'s' if len(names) > 1 else ''} {', '.join(names)} "
                 f"({sum(p.numel() for p in paraphrasers.parameters()):,} params, frozen): {how}")

    def _pretrain(self, paraphrasers: nn.ModuleList, teacher: nn.Module, names: list[str], data, prep) -> dict:
        """RepDistiller's init stage: SGD on MSE(decoder(encoder(f_t)), f_t) for ``init_epochs``; returns the
        weights and the mean reconstruction loss of each epoch (``meta.reconstruction``)."""
        with torch.random.fork_rng(devices=[]):  # the student's random numbers do not depend on it being trained
            torch.manual_seed(prep.seed)
            generator = torch.Generator().manual_seed(prep.seed)
            opt = torch.optim.SGD(paraphrasers.parameters(), lr=self.init_lr, momentum=MOMENTUM,
                                  weight_decay=WEIGHT_DECAY)
            paraphrasers.train()
            history = []
            for epoch in range(1, self.init_epochs + 1):
                start, total = time.perf_counter(), 0.0
                for batch in data.batches("train", prep.batch_size, shuffle=True, generator=generator, augment=True,
                                          merge_single=True):
                    with torch.no_grad(), FeatureHooks(teacher, names, key="loss.teacher_layers") as feats:
                        teacher(batch.x)
                    loss = sum(F.mse_loss(p(feats[n].float())[1], feats[n].float()) for p, n in zip(paraphrasers, names))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total = total + loss.detach() * len(batch.y)  # read once an epoch: no sync per step
                history.append(float(total) / len(data.train))
                if epoch in (1, self.init_epochs) or epoch % 10 == 0:  # a few lines, not one per epoch
                    log.info(f"ft paraphraser epoch {epoch:>3}/{self.init_epochs}  reconstruction MSE "
                             f"{history[-1]:.4f}  {time.perf_counter() - start:.2f}s")
        return {"model": paraphrasers.state_dict(), "meta": {"role": "paraphraser", "reconstruction": history}}

    def feature_term(self, student_features, teacher_features) -> torch.Tensor:
        if len(self.paraphrasers) != len(teacher_features) or len(self.translators) != len(student_features):
            raise RuntimeError(f"loss=ft has {len(self.paraphrasers)} paraphrasers and {len(self.translators)} "
                               f"translators for {len(student_features)} layer pairs: call loss.prepare(teacher, "
                               f"data, prep) and loss.setup(student_features, teacher_features) first")
        total = 0
        for para, trans, fs, ft in zip(self.paraphrasers, self.translators, student_features, teacher_features):
            with torch.no_grad():
                factor_t = para.encoder(ft.detach().float())
            total = total + ft_term(trans(fs.float()), factor_t)
        return total
