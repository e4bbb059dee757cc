"""``mode=merge``: teachers trained on class subsets (or all on the same classes), merged into one student.

Teacher k is trained on the images of its classes S_k only (``mode.class_splits``), relabelled 0..|S_k|-1,
and kept in the teacher store like any teacher: its key holds the data identity, which names S_k, so each
subset has its own entry and a rerun reuses it. Teachers on the same class list get seeds ``teacher.seed``,
``teacher.seed + 1``, ... (else they would be one and the same model). The merged teacher is the mixture

    q(c | x) = sum_k  w_k(x) · p_k(c | x)          (p_k(c | x) = 0 for c not in S_k;  sum_k w_k(x) = 1)

with p_k = softmax of teacher k's logits over its own classes, so q is a distribution over the union of the
classes. ``mode.combine`` picks the weights:

* ``confidence`` (disjoint splits that cover every class, the default): w_k(x) = exp(E_k(x)) / sum_j exp(E_j(x))
  with E_k(x) = logsumexp_c z_k(c | x), teacher k's negative free energy (z_k: its logits), the energy score
  of out-of-distribution detection: large when x looks like one of *its* classes. With disjoint splits each
  class has one teacher, so q(c|x) = w_k(x) p_k(c|x) = exp(z(c|x)) / sum_c' exp(z(c'|x)): the softmax of all
  teachers' logits side by side. It relies on the teachers' logits being on comparable scales (same
  architecture and recipe, so they are in practice; softmax alone does not fix a teacher's logit offset).
* ``maxprob`` (same splits as ``confidence``): m_k(x) = max_c p_k(c | x) in place of exp(E_k(x)), i.e.
  w_k(x) = m_k(x) / sum_j m_j(x). Scale-free, but a teacher trained on a few classes is often just as sure
  of an image it has never seen a class of, so the weights stay near 1/K (measured: README, "mode=merge").
* ``mean`` (every split lists all classes): w_k = 1/K, the plain ensemble average of probabilities.
* ``weighted`` (every split lists all classes): w_k = a_k / sum_j a_j, a_k = teacher k's validation accuracy.

:class:`MergedTeacher` returns log q (computed in log space, so no probability underflows to log 0). The KD
loss treats its output as logits: softmax(log q / T) = q^(1/T) / sum_c q(c)^(1/T), the merged distribution
sharpened (T < 1) or softened (T > 1); at T = 1 it is q itself. No labels are used for the transfer
(``loss.alpha=1`` in ``conf/mode/merge.yaml``). Consumes ``mode.class_splits``, ``mode.combine``,
``teacher.*`` and what the offline stages consume.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.console import pct
from kdrun.data.dataset import Data, with_classes
from kdrun.errors import ConfigError
from kdrun.losses.base import DistillationLoss
from kdrun.results import MergedTeacherResult, Row, SubsetTeacher
from kdrun.stages import RunContext, evaluate, obtain_baseline, obtain_teacher, teacher_targets, train_student

log = logging.getLogger("kdrun")
RULES = ("confidence", "maxprob", "mean", "weighted")
DISJOINT = ("confidence", "maxprob")  # rules for disjoint class lists; the others need identical lists
KEY = "mode.class_splits"


def resolve_splits(class_splits: Optional[list], num_classes: int, combine: str) -> list[list[int]]:
    """The teachers' class lists, checked against the dataset; raises :class:`ConfigError` naming the key.

    ``null`` means two halves of the classes (``confidence`` / ``maxprob``) or two teachers on all classes
    (``mean`` / ``weighted``).
    """
    every = list(range(num_classes))
    if class_splits is None:
        half = num_classes // 2
        return [every[:half], every[half:]] if combine in DISJOINT else [every, every]
    splits = [[int(c) for c in s] for s in class_splits]
    for s in splits:
        if len(set(s)) != len(s):
            raise ConfigError(KEY, f"class list {s} names a class twice")
        if lacking := sorted(c for c in s if c >= num_classes):
            raise ConfigError(KEY, f"classes {lacking} are not in the dataset (its classes: 0..{num_classes - 1})")
    if combine in DISJOINT:
        seen: dict[int, int] = {}
        for k, s in enumerate(splits):
            if len(s) < 2:
                raise ConfigError(KEY, f"class list {s} has one class: a teacher needs >= 2 to have a confidence")
            for c in s:
                if c in seen:
                    raise ConfigError(KEY, f"class {c} is in lists {seen[c] + 1} and {k + 1}: combine={combine} "
                                           f"needs disjoint lists (same classes: use mode.combine=mean|weighted)")
                seen[c] = k
        if missing := sorted(set(every) - set(seen)):
            raise ConfigError(KEY, f"classes {missing} are in no list: the lists must cover all {num_classes} "
                                   f"classes of the dataset")
    else:
        for s in splits:
            if set(s) != set(every):
                raise ConfigError(KEY, f"combine={combine} needs every list to name all {num_classes} classes; "
                                       f"{s} lacks {sorted(set(every) - set(s))}")
    return splits


def teacher_seeds(splits: list[list[int]], seed: int) -> list[int]:
    """``seed`` for the first teacher on a class list, ``seed + 1`` for the second on the same list, ..."""
    seen: list[frozenset] = []
    out = []
    for s in splits:
        out.append(seed + seen.count(frozenset(s)))
        seen.append(frozenset(s))
    return out


class MergedTeacher(nn.Module):
    """Frozen teachers on class lists ``splits``, merged into log-probabilities over ``num_classes`` classes.

    ``prior`` (fixed weights, one per teacher) is used by ``mean`` and ``weighted``; ``confidence`` and
    ``maxprob`` compute their weights per sample. Class lists, rule name and prior are buffers, so a hash of
    the state dict (the teacher-logit cache key) changes with any of them.
    """

    def __init__(self, teachers: list[nn.Module], splits: list[list[int]], num_classes: int, combine: str,
                 prior: Optional[list[float]] = None):
        super().__init__()
        if combine not in RULES:
            raise ValueError(f"combine must be one of {RULES}, got {combine!r}")
        self.teachers = nn.ModuleList(teachers)
        self.sizes, self.num_classes, self.combine = [len(s) for s in splits], num_classes, combine
        prior = torch.full((len(teachers),), 1.0) if prior is None else torch.as_tensor(prior, dtype=torch.float32)
        self.register_buffer("class_index", torch.as_tensor([c for s in splits for c in s], dtype=torch.int64))
        self.register_buffer("rule", torch.tensor(list(combine.encode()), dtype=torch.uint8))
        self.register_buffer("log_prior", torch.log(prior / prior.sum()))

    def log_weights(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """log w_k(x), shape [K, B]: normalised energies or max-probabilities, or the fixed prior."""
        if self.combine == "confidence":
            score = torch.stack([torch.logsumexp(z, dim=1) for z in logits])
        elif self.combine == "maxprob":
            score = torch.stack([F.log_softmax(z, dim=1).max(dim=1).values for z in logits])
        else:
            return self.log_prior.unsqueeze(1).expand(len(logits), logits[0].shape[0])
        return score - torch.logsumexp(score, dim=0, keepdim=True)

    def combine_logits(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """log q(c|x) = logsumexp_k (log w_k(x) + log p_k(c|x)), with log p_k = -inf outside S_k."""
        logits = [z.float() for z in logits]
        log_w = self.log_weights(logits)
        batch = logits[0].shape[0]
        terms = logits[0].new_full((len(logits), batch, self.num_classes), float("-inf"))
        for k, (z, idx) in enumerate(zip(logits, torch.split(self.class_index, self.sizes))):
            terms[k][:, idx] = F.log_softmax(z, dim=1) + log_w[k].unsqueeze(1)
        return torch.logsumexp(terms, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine_logits([t(x) for t in self.teachers])


def obtain_teachers(ctx: RunContext, data: Data,
                    splits: list[list[int]]) -> tuple[list[nn.Module], list[SubsetTeacher]]:
    """Teacher k from the store, trained on ``with_classes(data, splits[k])`` on a miss; evaluated there."""
    models, infos = [], []
    every = list(range(data.num_classes))
    for k, (classes, seed) in enumerate(zip(splits, teacher_seeds(splits, ctx.cfg.teacher.seed))):
        own = data if classes == every else with_classes(data, classes, tag={"by": "classes"})
        cfg = dataclasses.replace(ctx.cfg, teacher=dataclasses.replace(ctx.cfg.teacher, seed=seed))
        log.info(f"teacher {k + 1}/{len(splits)}: classes {classes}, seed {seed}, "
                 f"{len(own.train)} train images")
        model, info = obtain_teacher(dataclasses.replace(ctx, cfg=cfg), own)
        models.append(model)
        infos.append(SubsetTeacher(index=k + 1, classes=classes, seed=seed, teacher=info))
    return models, infos


def prior_weights(combine: str, infos: list[SubsetTeacher]) -> Optional[list[float]]:
    """Fixed teacher weights: validation accuracies for ``weighted`` (equal if a teacher has none)."""
    if combine != "weighted":
        return None
    accs = [info.teacher.val_acc for info in infos]
    if any(a is None or a <= 0 for a in accs):
        log.warning("combine=weighted: a teacher has no validation accuracy (dataset.val_fraction=0?); "
                    "weighing the teachers equally")
        return [1.0] * len(infos)
    return [float(a) for a in accs]


def _span(classes: list[int]) -> str:
    contiguous = classes == list(range(classes[0], classes[0] + len(classes)))
    return f"{classes[0]}-{classes[-1]}" if contiguous and len(classes) > 2 else ",".join(map(str, classes))


def merge(ctx: RunContext, data: Data, loss: DistillationLoss) -> None:
    """Teachers per class list, their merged teacher on all classes, the CE baseline, the distilled student.

    Adds ``teachers`` (one entry per class list) to the summary; ``teacher`` is the merged teacher.
    """
    cfg, result = ctx.cfg, ctx.result
    if not loss.needs_teacher:  # loss=ce: the student alone is the baseline
        result.student = train_student(ctx, data, loss)
        return
    if cfg.teacher.ckpt:
        raise ConfigError("teacher.ckpt", "not used by mode=merge: each teacher is trained on its class list "
                                          "and kept in the teacher store")
    combine = cfg.mode.combine
    splits = resolve_splits(cfg.mode.class_splits, data.num_classes, combine)
    teachers, subsets = obtain_teachers(ctx, data, splits)
    result.teachers = subsets
    result.rows = [Row(f"teacher {t.index}, classes {_span(t.classes)}", t.teacher.name, t.teacher.val_acc,
                       t.teacher.test_acc, f"own {len(t.classes)} classes; {t.teacher.note}", of_teacher=True)
                   for t in subsets]
    prior = prior_weights(combine, subsets)
    merged = MergedTeacher(teachers, splits, data.num_classes, combine, prior).to(ctx.device).eval()
    weights = None if prior is None else [round(w, 4) for w in merged.log_prior.exp().tolist()]
    info = MergedTeacherResult(name=f"merged {len(teachers)}x{cfg.teacher.name} ({combine})", combine=combine,
                               class_splits=splits, weights=weights, source="store",
                               reused=all(t.teacher.reused for t in subsets), **evaluate(merged, data, ctx, "teacher"))
    log.info(f"merged teacher ({combine}, {len(teachers)} teachers) on all {data.num_classes} classes: "
             f"val {pct(info.val_acc)}  test {pct(info.test_acc)}")
    result.teacher, result.student_role = info, "student, merged KD"
    source = teacher_targets(ctx, data, merged, info)
    if cfg.baseline:
        result.baseline = obtain_baseline(ctx, data)
    result.student = train_student(ctx, data, loss, source)
