"""``mode=semi``: semi-supervised distillation, where only part of train keeps its labels.

A stratified, seeded labelled subset (``mode.labeled_fraction`` or ``mode.labels_per_class``; seeded by
``dataset.split_seed``) keeps its labels; the rest of train is the unlabelled pool, whose labels are
replaced by ``-1`` before the student sees the data (any code that read them would fail). The teacher and
the CE baseline are trained on the labelled part only, tiled to the size of train so that an epoch is as
many optimizer steps for them as for the student (a baseline with 10x fewer steps would flatter KD). The
student sees batches drawn from labelled and
unlabelled images together and minimises

    L = mean over the batch of  (1-alpha)·CE(y, s) + alpha·T²·KL(softmax(t/T) ‖ softmax(s/T))   (labelled)
                                unlabeled_weight · [target term]                           (unlabelled)

where the target term is the KD term alone (``unlabeled_target=soft``) or CE on the teacher's argmax where
its probability is ``>= confidence`` (``hard``; images below the threshold contribute 0, FixMatch-style).
A per-sample mean keeps the gradient scale of offline KD whatever the labelled share (a sum of two
stream means would double it, which diverged on Fashion-MNIST at the default learning rate).
With ``mode.iterations=k > 1`` each round's student becomes the next round's frozen teacher (self-training
à la Noisy Student: with ``dataset.augment.*`` on and ``teacher.cache=on`` the teacher sees clean images and
the student augmented ones). A teacher ensemble (``teacher.ensemble*``, :mod:`kdrun.stages.ensemble`) teaches
round 1 as one teacher does, each member trained on the labelled part.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from kdrun.data.dataset import Data, with_train
from kdrun.data.sources import stratified
from kdrun.errors import ConfigError
from kdrun.losses.base import DistillationLoss, kd_term
from kdrun.results import LabelSplit, Row
from kdrun.schema import ModeConfig
from kdrun.stages import (
    RunContext,
    baseline_model,
    distil,
    ensemble_targets,
    obtain_ensemble,
    obtain_teacher,
    teacher_targets,
)
from kdrun.teacher.sources import LiveTeacher

log = logging.getLogger("kdrun")
UNLABELED = -1


def labeled_indices(y: np.ndarray, mode: ModeConfig, seed: int, num_classes: int) -> np.ndarray:
    """Sorted indices of the labelled subset of a train split with labels ``y`` (stratified, seeded)."""
    if mode.labels_per_class is not None:
        rng = np.random.default_rng(seed)
        picked = []
        for c in range(num_classes):
            members = np.flatnonzero(y == c)
            if len(members) < mode.labels_per_class:
                raise ConfigError("mode.labels_per_class", f"class {c} has only {len(members)} train images, "
                                                           f"fewer than {mode.labels_per_class}")
            picked.append(rng.permutation(members)[:mode.labels_per_class])
        return np.sort(np.concatenate(picked))
    n = int(round(mode.labeled_fraction * len(y)))
    if n >= len(y):
        return np.arange(len(y))
    if n < num_classes:
        raise ConfigError("mode.labeled_fraction", f"{mode.labeled_fraction} of {len(y)} train images is {n} "
                                                   f"labels, fewer than the {num_classes} classes")
    picked, _ = stratified(len(y), y, n, seed, "mode.labeled_fraction")
    missing = sorted(set(range(num_classes)) - set(y[picked].tolist()))
    if missing:
        raise ConfigError("mode.labeled_fraction", f"too few labels: classes {missing} get no labelled image")
    return picked


def split_labels(data: Data, mode: ModeConfig, seed: int) -> tuple[Data, Data, LabelSplit]:
    """``(labelled, pool, split)``: train cut to the labelled part, train whole with the pool's labels hidden,
    and how many images each part has."""
    y = data.train.y.cpu().numpy()
    lab = labeled_indices(y, mode, seed, data.num_classes)
    tag = {"semi": {"labeled_fraction": mode.labeled_fraction, "labels_per_class": mode.labels_per_class,
                    "seed": seed, "n_labeled": int(len(lab))}}
    # tiled to the size of train: teacher and baseline take as many optimizer steps per epoch as the student
    repeats = max(1, int(round(len(y) / len(lab))))
    tag["semi"]["tiled"] = repeats
    labeled = with_train(data, torch.as_tensor(np.tile(lab, repeats)), tag)
    hidden = torch.full_like(data.train.y, UNLABELED)
    lab_t = torch.as_tensor(lab, device=data.train.y.device)
    hidden[lab_t] = data.train.y[lab_t]
    pool = with_train(data, torch.arange(len(data.train)), tag, y=hidden)
    return labeled, pool, LabelSplit(labeled=int(len(lab)), unlabeled=int(len(y) - len(lab)),
                                     labeled_fraction_actual=round(len(lab) / len(y), 6))


class SemiSupervisedLoss(torch.nn.Module):
    """The per-sample loss above, with the contract of :mod:`kdrun.losses.base` (``forward(s, t, y)``).

    Reported parts: ``ce`` = mean CE on the labelled images, ``kd`` = mean of the unlabelled stream's term.
    """

    needs_teacher = True

    def __init__(self, base: DistillationLoss, mode: ModeConfig):
        super().__init__()
        self.base, self.T, self.alpha = base, base.T, base.alpha
        self.target, self.confidence, self.weight = mode.unlabeled_target, mode.confidence, mode.unlabeled_weight

    def forward(self, s: torch.Tensor, t: Optional[torch.Tensor], y: torch.Tensor, student_features=None,
                teacher_features=None) -> tuple[torch.Tensor, dict]:
        lab = y != UNLABELED
        n, n_lab = len(y), int(lab.sum())
        zero = s.float().sum() * 0
        # per-sample terms, summed per stream, divided by the batch size: the loss is a per-sample mean
        ce = F.cross_entropy(s[lab].float(), y[lab], reduction="sum") if n_lab else zero
        kd = kd_term(s[lab], t[lab], self.T) * n_lab if n_lab and self.alpha > 0 else zero
        unl = ~lab
        if n_lab == n:
            pool = zero
        elif self.target == "soft":
            pool = kd_term(s[unl], t[unl], self.T) * (n - n_lab)
        else:
            conf, pseudo = F.softmax(t[unl].detach().float(), dim=1).max(dim=1)
            keep = conf >= self.confidence
            pool = F.cross_entropy(s[unl][keep].float(), pseudo[keep], reduction="sum") if keep.any() else zero
        loss = ((1 - self.alpha) * ce + self.alpha * kd + self.weight * pool) / n
        return loss, {"ce": ce / max(n_lab, 1), "kd": pool / max(n - n_lab, 1)}

    def formula(self) -> str:
        a, T = self.alpha, self.T
        num = lambda v: f"{v:g}"
        lab = f"{num(round(1 - a, 6))}·CE" + (f" + {num(a)}·{num(T * T)}·KL(T={num(T)})" if a > 0 else "")
        pool = (f"{num(T * T)}·KL(T={num(T)})" if self.target == "soft"
                else f"CE(argmax t) if p_t >= {num(self.confidence)}")
        return f"L = mean over batch of: labelled {lab} | unlabelled {num(self.weight)}·{pool}"


def semi(ctx: RunContext, data: Data, loss: DistillationLoss) -> None:
    """Teacher and baseline on the labelled part; then ``mode.iterations`` rounds of students on all of train.

    Adds ``semi`` (the label split) and, with ``mode.iterations > 1``, ``rounds`` (the earlier students) to
    the summary; ``loss.formula`` becomes the semi-supervised loss (``loss.labelled_formula``: the configured one).
    """
    cfg, result = ctx.cfg, ctx.result
    labeled, pool, split_info = split_labels(data, cfg.mode, cfg.dataset.split_seed)
    result.semi, result.rows = split_info, []
    log.info(f"semi-supervised: {split_info.labeled} labelled, {split_info.unlabeled} unlabelled train images "
             f"(labels hidden); unlabelled target: {cfg.mode.unlabeled_target}")
    ensemble = bool(cfg.teacher.members())  # teacher.ensemble: every member trained on the labelled part
    teacher, result.teacher = obtain_ensemble(ctx, labeled, loss.T) if ensemble else obtain_teacher(ctx, labeled)
    result.rows = list(result.rows or [])  # an ensemble's members first, then the rounds
    if cfg.baseline:
        result.baseline = baseline_model(ctx, labeled)[1]
        result.baseline.note = "CE on the labelled part"
    semi_loss = SemiSupervisedLoss(loss, cfg.mode)
    log.info(f"semi-supervised loss: {semi_loss.formula()}")
    result.loss = {"formula": semi_loss.formula(), "labelled_formula": loss.formula()}
    for round_ in range(1, cfg.mode.iterations + 1):
        last = round_ == cfg.mode.iterations
        stage = "student" if last else f"round{round_}"
        # round 1: the trained teacher (logit cache as configured); later rounds: the previous student, live
        if round_ > 1:
            source = LiveTeacher(teacher)
        else:
            source = ensemble_targets(ctx, pool, teacher, loss) if ensemble else \
                teacher_targets(ctx, pool, teacher, result.teacher)
        teacher, info = distil(ctx, pool, semi_loss, stage=stage, seed=cfg.seed + round_ - 1, teacher=source)
        if not last:
            result.rows.append(Row(f"student, round {round_}", info.name, info.val_acc, info.test_acc,
                                   f"teaches round {round_ + 1}"))
            result.rounds = [*(result.rounds or []), info]
        else:
            result.student = info
    result.student_role = "student, semi-KD" + (f" (round {cfg.mode.iterations})" if cfg.mode.iterations > 1 else "")
