"""``reviewkd``: knowledge review (Chen et al., CVPR 2021), as mdistiller's ``ReviewKD`` (its CIFAR-100 defaults).

Each student level learns from the teacher's level at the same depth *and* the deeper ones: the student's levels
are fused deep to shallow by learned attention-based fusion (ABF) modules, and each fused map is compared with the
teacher's map of its level by the hierarchical context loss (HCL). With ``f_s^i``, ``f_t^i`` the student's and the
teacher's level ``i`` (shallow to deep; the last one the embedding as an (N, C, 1, 1) map)::

    x_i = conv1_i(f_s^i)                                   1x1 conv + BN to m = min(max_mid_channels, C_s^last)
    r_n = x_n;  r_i = a_0 · x_i + a_1 · up(r_{i+1})        i < n; (a_0, a_1) = sigmoid(1x1 conv([x_i, up(r_{i+1})]))
    g_i = conv2_i(resize(r_i to the teacher's H_i × W_i))  3x3 conv + BN to the teacher's C_t^i
    hcl(g, f) = (mse(g, f) + Σ_{l < H} 2^-k · mse(pool_l(g), pool_l(f))) / (1 + Σ 2^-k)
    L = (1 − alpha)·CE + alpha·T²·KL + beta · min(epoch / warmup, 1) · Σ_i hcl(g_i, f_t^i)

``up`` and ``resize``: nearest-neighbour interpolation; the residual ``r_i`` is kept at the teacher's size of its
level, as in the reference. ``pool_l``: adaptive average pooling to l × l for each pyramid level ``l`` of
``levels`` ([4, 2, 1]) smaller than the map (``l < min(H, W)``; the k-th level used weighs 2^-k), so small maps
use the levels that fit: a 4 × 4 map pools to 2 and 1, a 2 × 2 map to 1, the 1 × 1 embedding to none.

Default layers: every stage's output plus the embedding (the classifier's input), on both models: mdistiller's
``feats[1:]`` and ``pooled_feat``. The ABF modules are learned with the student; their shapes come from one
batch's features (:meth:`ReviewKDLoss.setup`). Defaults: mdistiller's ``REVIEWKD`` (CE weight 1, weight 1,
warm-up 20 epochs, mid channels at most 512).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import ConfigError
from kdrun.losses.feature import FeatureLoss
from kdrun.losses.options import FEATURES, FeatureLossConfig
from kdrun.models.layers import default_feature_layers
from kdrun.registry import register_loss
from kdrun.schema.checks import check_min

LEVELS = [4, 2, 1]  # HCL's pyramid of mdistiller's hcl_loss (never mutated: a default)


def warmup_within_training(cfg) -> Optional[str]:
    """A warm-up longer than training never gives the review term its full weight."""
    warmup, epochs = cfg.loss.warmup, cfg.trainer.epochs
    if warmup <= epochs:
        return None
    return (f"loss.warmup={warmup} > trainer.epochs={epochs}: the review term's weight min(epoch/{warmup}, 1) never "
            f"passes {epochs}/{warmup} = {epochs / warmup:.2f}; set loss.warmup <= trainer.epochs (0: no warm-up)")


@register_loss("reviewkd", "Knowledge review (Chen et al. 2021): CE + beta·min(epoch/warmup, 1)·Σ HCL(ABF-fused "
                           "student levels, teacher levels)",
               target="kdrun.losses.methods.reviewkd.ReviewKDLoss", needs=FEATURES, warnings=(warmup_within_training,))
@dataclass
class ReviewKDLossConfig(FeatureLossConfig):
    """loss=reviewkd: L = (1-alpha)·CE + alpha·T²·KL + beta·min(epoch/warmup, 1)·Σ_levels hcl(ABF(f_s), f_t)."""

    name: str = "reviewkd"
    beta: float = 1.0          # weight of the review term (>= 0); mdistiller's REVIEWKD_WEIGHT on CIFAR-100
    warmup: int = 20           # epochs over which the review term ramps as min(epoch/warmup, 1) (0 = no warm-up)
    # HCL's pyramid: pooled sizes (>= 1), each used only where smaller than the map's height and width
    levels: List[int] = field(default_factory=lambda: list(LEVELS))
    max_mid_channels: int = 512  # ABF's fusion width: min(max_mid_channels, the student embedding's channels)

    def __post_init__(self):
        super().__post_init__()
        check_min("loss.warmup", self.warmup, 0)
        check_min("loss.max_mid_channels", self.max_mid_channels, 1)
        if not all(isinstance(n, int) and n >= 1 for n in self.levels):
            raise ConfigError("loss.levels", f"must be a list of pooled sizes >= 1 (e.g. [4, 2, 1]), got "
                                             f"{list(self.levels)!r}")


class ABF(nn.Module):
    """Attention-based fusion of one student level: ``conv1`` (1x1 conv + BN to the fusion width), fused with the
    deeper levels' residual by two per-position sigmoid weights (``fuse``; not on the deepest level), resized to the
    teacher's map size, then ``conv2`` (3x3 conv + BN to the teacher's channels). Returns (output, residual)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor],
                out_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, size=tuple(x.shape[-2:]), mode="nearest")
            a = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * a[:, :1] + residual * a[:, 1:]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


def as_map(f: torch.Tensor) -> torch.Tensor:
    """A (N, C) embedding as an (N, C, 1, 1) map; maps unchanged."""
    return f[:, :, None, None] if f.dim() == 2 else f


def hcl(fs: torch.Tensor, ft: torch.Tensor, levels: Sequence[int] = LEVELS) -> torch.Tensor:
    """The hierarchical context loss of one level: MSE of the maps and of their ``l × l`` average pools for each
    ``l`` in ``levels`` smaller than the map, the k-th of them weighted 2^-k, normalised by the weights' sum."""
    loss, weight, total = F.mse_loss(fs, ft), 1.0, 1.0
    for size in levels:
        if size >= min(fs.shape[-2:]):
            continue
        weight /= 2
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
        total += weight
    return loss / total


class ReviewKDLoss(FeatureLoss):
    """Knowledge review over the student's stages and embedding fused by learned ABF modules, plus the KD term."""

    name = "reviewkd"
    role = "stages"

    def __init__(self, T: float = ReviewKDLossConfig.T, alpha: float = ReviewKDLossConfig.alpha,
                 beta: float = ReviewKDLossConfig.beta, warmup: int = ReviewKDLossConfig.warmup,
                 levels: Sequence[int] = LEVELS, max_mid_channels: int = ReviewKDLossConfig.max_mid_channels,
                 student_layers: Optional[Sequence[str]] = None, teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(T=T, alpha=alpha, beta=beta, student_layers=student_layers, teacher_layers=teacher_layers)
        self.warmup, self.levels, self.max_mid_channels = int(warmup), [int(n) for n in levels], int(max_mid_channels)
        self.abfs = nn.ModuleList()  # one per level, shallow to deep (built in setup)
        warm = f"min(epoch/{self.warmup}, 1)·" if self.warmup > 0 else ""
        self.term_name = f"{warm}Σ_levels HCL(ABF(f_s), f_t)(levels={self.levels})"

    def _defaults(self, model: nn.Module, key: str) -> list[str]:
        """Every stage's output and the embedding; a model without conv stages is refused."""
        found = default_feature_layers(model, key)
        if not found["stages"] or not found["embedding"]:
            raise ConfigError(key, f"loss=reviewkd fuses (N, C, H, W) stage outputs and the embedding, and "
                                   f"{type(model).__name__} has no conv stages: use conv models, or name the layers "
                                   f"in loss.student_layers and loss.teacher_layers (`kdrun --list layers`)")
        return [*found["stages"], found["embedding"]]

    def fits(self, fs, ft) -> bool:
        """Two maps, or (N, C) vectors taken as 1 × 1 maps (the ABF resizes the student's to the teacher's size)."""
        return isinstance(fs, torch.Tensor) and isinstance(ft, torch.Tensor) and fs.dim() in (2, 4) \
            and ft.dim() in (2, 4)

    def check_pair(self, sn: str, tn: str, fs: torch.Tensor, ft: torch.Tensor) -> None:
        if not self.fits(fs, ft):
            raise self.mismatch(sn, tn, fs, ft, "needs (N, C, H, W) maps or (N, C) vectors on both sides")

    def setup(self, student_features, teacher_features, names=None) -> None:
        """Check the pairs and build one fresh ABF per level from the features' channel counts."""
        super().setup(student_features, teacher_features, names)
        mid = min(self.max_mid_channels, student_features[-1].shape[1])
        n = len(student_features)
        self.abfs = nn.ModuleList(
            ABF(fs.shape[1], mid, ft.shape[1], fuse=i < n - 1).to(fs.device)
            for i, (fs, ft) in enumerate(zip(student_features, teacher_features)))
        self.train()

    def warm(self) -> float:
        return min(self.epoch / self.warmup, 1.0) if self.warmup > 0 else 1.0

    def review(self, student_features, teacher_features) -> torch.Tensor:
        """``Σ_levels hcl(g_i, f_t^i)``: the student's levels fused deep to shallow, each against its teacher level."""
        if len(self.abfs) != len(student_features):
            raise RuntimeError(f"loss=reviewkd has {len(self.abfs)} ABF modules for {len(student_features)} levels: "
                               f"call loss.setup(student_features, teacher_features) first")
        teacher = [as_map(ft.detach().float()) for ft in teacher_features]
        residual, fused = None, []
        for abf, fs, ft in reversed(list(zip(self.abfs, student_features, teacher))):
            out, residual = abf(as_map(fs.float()), residual, ft.shape[-2:])
            fused.insert(0, out)
        return sum(hcl(g, ft, self.levels) for g, ft in zip(fused, teacher))

    def feature_term(self, student_features, teacher_features) -> torch.Tensor:
        return self.warm() * self.review(student_features, teacher_features)

