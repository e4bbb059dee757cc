"""mixup and CutMix across a training batch, with timm's semantics (``timm/data/mixup.py``, ``Mixup``).

Each image ``i`` of a batch of ``B`` is mixed with its partner ``B-1-i`` (the batch reversed, as timm does):

* mixup (Zhang et al. 2018): ``x_i = λ·x_i + (1-λ)·x_partner``, ``λ ~ Beta(mixup_alpha, mixup_alpha)``;
* CutMix (Yun et al. 2019): ``λ ~ Beta(cutmix_alpha, cutmix_alpha)``; a box of ``int(H·√(1-λ)) x int(W·√(1-λ))``
  centred on a uniform pixel, clipped to the image, is pasted from the partner, and ``λ`` becomes
  ``1 - box area / (H·W)`` (timm's ``correct_lam``: the label matches the pixels).

A batch (``mix_mode=batch``: one λ for all, timm's default) or each image (``elem``) is mixed with probability
``mix_prob``; with both on, CutMix is chosen with probability ``switch_prob``. The label of a mixed image is
``λ·onehot(y) + (1-λ)·onehot(y_partner)`` (:meth:`Mix.targets`), so CE on it is ``λ·CE(y) + (1-λ)·CE(y_partner)``.

The random numbers come from the training generator, drawn like the crop and flip views (one int64 seeds a
NumPy generator per batch), so a seeded run, and a resumed one, mixes exactly the same batches. Mixing never
draws when it is off: runs without it are unchanged. Consumes ``dataset.augment.{mixup_alpha, cutmix_alpha,
mix_prob, switch_prob, mix_mode}``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

from kdrun.schema import AugmentConfig


class MixDraw(NamedTuple):
    """The random choices of one batch's mix, one row per image (``[B]`` CPU tensors)."""

    lam: torch.Tensor     # float64: the weight of the image's own label (1 = not mixed), CutMix's corrected
    cutmix: torch.Tensor  # bool: a box pasted (True) or a blend (False)
    box: torch.Tensor     # int64 [B, 4]: CutMix's (y_lo, y_hi, x_lo, x_hi), rows y_lo:y_hi, columns x_lo:x_hi


class Mix(NamedTuple):
    """How a batch's images were mixed, per image: what its label is made of (a per-sample field of
    :class:`kdrun.data.dataset.Batch`)."""

    partner_y: torch.Tensor  # [B] the label of the image mixed in
    lam: torch.Tensor        # [B] float32: the weight of the image's own label

    def targets(self, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        """``[B, num_classes]`` label probabilities: ``λ·onehot(y) + (1-λ)·onehot(partner_y)``."""
        lam = self.lam.to(y.device)[:, None]
        own = torch.nn.functional.one_hot(y, num_classes).float()
        other = torch.nn.functional.one_hot(self.partner_y, num_classes).float()
        return lam * own + (1 - lam) * other

    def rows(self, lo: int, hi: int) -> "Mix":
        return Mix(self.partner_y[lo:hi], self.lam[lo:hi])


def partners(n: int) -> torch.Tensor:
    """The partner of each of ``n`` images: ``n-1-i`` (the batch reversed)."""
    return torch.arange(n - 1, -1, -1)


def cutmix_box(h: int, w: int, lam: float, cy: int, cx: int) -> tuple[tuple[int, int, int, int], float]:
    """timm's ``rand_bbox`` + ``correct_lam`` for centre ``(cy, cx)``: the box ``(y_lo, y_hi, x_lo, x_hi)`` and
    ``λ = 1 - area / (h·w)``."""
    ratio = np.sqrt(1 - lam)
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    yl, yh = int(np.clip(cy - cut_h // 2, 0, h)), int(np.clip(cy + cut_h // 2, 0, h))
    xl, xh = int(np.clip(cx - cut_w // 2, 0, w)), int(np.clip(cx + cut_w // 2, 0, w))
    return (yl, yh, xl, xh), 1.0 - (yh - yl) * (xh - xl) / float(h * w)


def draw_mix(aug: AugmentConfig, n: int, h: int, w: int, generator: Optional[torch.Generator]) -> MixDraw:
    """The mix of a batch of ``n`` images of ``h x w``: one int64 drawn from ``generator`` seeds NumPy, which
    draws as timm's ``_params_per_batch`` / ``_params_per_elem`` (mixed?, CutMix?, λ), then each box's centre."""
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    rng = np.random.default_rng(seed)
    rows = 1 if aug.mix_mode == "batch" else n
    mixed = rng.random(rows) < aug.mix_prob
    if aug.mixup_alpha > 0 and aug.cutmix_alpha > 0:
        cut = rng.random(rows) < aug.switch_prob
    else:
        cut = np.full(rows, aug.cutmix_alpha > 0)
    beta = lambda a: rng.beta(a, a, rows) if a > 0 else np.ones(rows)  # noqa: E731
    lam_cut, lam_mix = beta(aug.cutmix_alpha), beta(aug.mixup_alpha)
    lam = np.where(cut, lam_cut, lam_mix)
    lam, cut = np.where(mixed, lam, 1.0), cut & mixed
    boxes = np.zeros((rows, 4), dtype=np.int64)
    centres = np.stack([rng.integers(0, h, rows), rng.integers(0, w, rows)], axis=1)
    for r in np.flatnonzero(cut):
        boxes[r], lam[r] = cutmix_box(h, w, float(lam[r]), int(centres[r, 0]), int(centres[r, 1]))
    draw = MixDraw(torch.from_numpy(lam), torch.from_numpy(cut), torch.from_numpy(boxes))
    return draw if rows == n else MixDraw(*(t.expand(n, *t.shape[1:]) for t in draw))


def apply_mix(x: torch.Tensor, draw: MixDraw) -> torch.Tensor:
    """``x`` (``[B, C, H, W]``) mixed as ``draw`` says, in one batched op: each image is ``m·x + (1-m)·x_partner``
    with ``m`` = λ everywhere (mixup), 0 in the box and 1 outside it (CutMix), 1 (not mixed)."""
    n, _, h, w = x.shape
    dev = x.device
    lam, cut, box = (t.to(dev) for t in draw)
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
    inside = ((rows[None, :, None] >= box[:, 0, None, None]) & (rows[None, :, None] < box[:, 1, None, None])
              & (cols[None, None, :] >= box[:, 2, None, None]) & (cols[None, None, :] < box[:, 3, None, None]))
    keep = torch.where(cut[:, None, None], (~inside).to(x.dtype), lam.to(x.dtype)[:, None, None].expand(n, h, w))
    keep = keep[:, None]
    other = x[partners(n).to(dev)]
    return torch.where(keep == 1, x, torch.where(keep == 0, other, keep * x + (1 - keep) * other))


def mix_batch(x: torch.Tensor, y: torch.Tensor, aug: AugmentConfig,
              generator: Optional[torch.Generator]) -> tuple[torch.Tensor, Mix]:
    """Draw and apply a batch's mix (:func:`draw_mix`, :func:`apply_mix`): the mixed images and their :class:`Mix`."""
    draw = draw_mix(aug, len(x), x.shape[-2], x.shape[-1], generator)
    return apply_mix(x, draw), Mix(y[partners(len(y)).to(y.device)], draw.lam.float().to(y.device))
