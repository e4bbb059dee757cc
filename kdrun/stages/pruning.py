"""Magnitude pruning of the distilled student (``student.prune.*``, mode=offline).

Global L1-unstructured pruning (``torch.nn.utils.prune.global_unstructured``) of the ``weight`` of every
convolution and linear layer: the weights of smallest absolute value across all of them are set to 0 (biases,
BatchNorm and embeddings are kept). ``student.prune.amount`` is the final sparsity: the fraction of those
weights that are 0, exact up to rounding to a whole weight.

Two schedules (``student.prune.schedule``):

* ``gradual``: a second student, trained like the KD student (same initial weights, seed, recipe and teacher),
  is pruned before each epoch to the sparsity of Zhu & Gupta's (2017) cubic schedule, with ``s_i = 0`` and one
  step per epoch from epoch ``start`` to epoch ``end`` (:func:`sparsity_at`). Weights pruned once stay pruned.
  Its best-on-val checkpoint is chosen among the epochs trained at the full amount, so it has that sparsity.
* ``oneshot``: the distilled student's best checkpoint, pruned once to the amount, then fine-tuned with the same
  KD loss and teacher for ``finetune_epochs`` (learning rate ``finetune_lr``, default ``optim.lr / 10``).

The pruned student is saved with the pruning made permanent (``prune.remove``: plain weights with zeros, no
``weight_orig`` / ``weight_mask``) as ``checkpoints/student_pruned_{best,last}.pt`` and reported beside the
unpruned student and the baseline (``summary.json`` ``student_pruned``; a row of the results table).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import prune

from kdrun.console import pct
from kdrun.results import PrunedStudentResult
from kdrun.train.hooks import Hook

log = logging.getLogger("kdrun")
STAGE = "student_pruned"


def sparsity_at(epoch: int, amount: float, start: int, end: int) -> float:
    """The sparsity epoch ``epoch`` (1-based) trains at: 0 before ``start``, ``amount`` from ``end`` on, and in
    between Zhu & Gupta's cubic ramp ``amount · (1 − (1 − k/n)³)`` with ``k = epoch − start + 1`` of
    ``n = end − start + 1`` steps (fast pruning early, while the network can still recover, slower later)."""
    if epoch < start:
        return 0.0
    if epoch >= end:
        return amount
    k, n = epoch - start + 1, end - start + 1
    return amount * (1.0 - (1.0 - k / n) ** 3)


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, "weight")`` of every convolution and linear layer of ``model``."""
    kinds = (nn.modules.conv._ConvNd, nn.Linear)
    return [(m, "weight") for m in model.modules() if isinstance(m, kinds) and getattr(m, "weight", None) is not None]


def _mask(module: nn.Module) -> torch.Tensor:
    mask = getattr(module, "weight_mask", None)
    return mask if mask is not None else (module.weight != 0)


def sparsity(model: nn.Module) -> dict:
    """The achieved sparsity over the prunable weights: ``{"zeros", "total", "sparsity"}`` (pruned entries of a
    model still under pruning, zero weights of one whose pruning was made permanent)."""
    layers = prunable(model)
    total = sum(m.weight.numel() for m, _ in layers)
    zeros = sum(int((_mask(m) == 0).sum()) for m, _ in layers)
    return {"zeros": zeros, "total": total, "sparsity": round(zeros / total, 6) if total else 0.0}


def prune_to(model: nn.Module, target: float) -> int:
    """Raise the global sparsity of ``model``'s prunable weights to ``target`` (never lowers it); return how many
    weights this call pruned. The smallest remaining weights by absolute value go first; the count is
    ``round(target · total) − already pruned``, so the result is exact up to one weight."""
    layers = prunable(model)
    state = sparsity(model)
    new = round(target * state["total"]) - state["zeros"]
    if not layers or new <= 0:
        return 0
    prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=int(new))
    return int(new)


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold the pruning masks into the weights (``prune.remove``): plain ``weight`` tensors with zeros."""
    for module, name in prunable(model):
        if prune.is_pruned(module) and hasattr(module, f"{name}_orig"):
            prune.remove(module, name)
    return model


class GradualPruning(Hook):
    """Before each epoch: prune ``model`` up to :func:`sparsity_at`; after each epoch at the full amount, keep its
    weights when its validation accuracy is the best so far (``best_state``, ``best_epoch``): the checkpoint
    of a gradually pruned student must have the sparsity asked for, which an earlier epoch does not."""

    def __init__(self, amount: float, start: int, end: int):
        self.amount, self.start, self.end = amount, start, end
        self.model: Optional[nn.Module] = None
        self.best_state: Optional[dict] = None
        self.best_epoch, self.best_val, self.steps = 0, None, []

    def before_epoch(self, epoch: int, model: nn.Module) -> None:
        self.model = model
        target = sparsity_at(epoch, self.amount, self.start, self.end)
        if prune_to(model, target):
            self.steps.append({"epoch": epoch, "sparsity": sparsity(model)["sparsity"]})
            log.info(f"{STAGE}: sparsity {100 * self.steps[-1]['sparsity']:.1f}% before epoch {epoch}")

    def after_epoch(self, record: dict) -> None:
        if self.model is None or record["epoch"] < self.end:
            return
        val = record["val/acc"]
        if self.best_state is None or val is None or (self.best_val is not None and val > self.best_val):
            self.best_state = copy.deepcopy({k: v.detach() for k, v in self.model.state_dict().items()})
            self.best_epoch, self.best_val = record["epoch"], val


def pruned_student(ctx, data, loss, teacher=None, student: Optional[nn.Module] = None) -> PrunedStudentResult:
    """The ``student.prune`` stage: a gradually pruned second student, or ``student`` (the distilled one, best
    checkpoint) pruned once and fine-tuned. ``teacher``: the KD student's teacher source (None for loss=ce).

    Consumes ``student.prune.*`` and what :func:`kdrun.stages.student.distil` consumes. Writes
    ``checkpoints/student_pruned_{best,last}.pt`` (pruning permanent) and its epochs to ``metrics.jsonl``
    (stage ``student_pruned``). It keeps no resume checkpoint: a resumed run trains this stage again."""
    from kdrun.records import JsonlWriter
    from kdrun.stages.common import EpochLogger, TrimMetrics, evaluate, n_params, recipe_student
    from kdrun.stages.student import prepare_student
    from kdrun.train.loop import fit

    cfg, spec = ctx.cfg, ctx.cfg.student.prune
    recipe = recipe_student(cfg)
    writer = JsonlWriter(ctx.out_dir / "metrics.jsonl", stage=STAGE)
    TrimMetrics(writer.path, STAGE).after_resume(0)  # a resumed run trains this stage again: one line per epoch
    extra: dict = {}
    if spec.schedule == "gradual":
        model, _ = prepare_student(ctx, data, seed=recipe.seed)  # the KD student's initial weights
        start, end = spec.ramp(recipe.epochs)
        hook = GradualPruning(spec.amount, start, end)
        log.info(f"{STAGE} {cfg.student.name}: {recipe.epochs} epochs of KD, sparsity raised to {spec.amount:g} "
                 f"from epoch {start} to {end} (cubic schedule)")
        result = fit(model, data, recipe, loss, teacher=teacher, progress=ctx.progress, desc=STAGE,
                     hooks=[EpochLogger(STAGE, recipe.epochs, writer), hook])
        best_state, best_epoch, epochs = hook.best_state or result.last_state, hook.best_epoch, recipe.epochs
        extra = dict(start=start, end=end, steps=hook.steps)
    else:
        model = copy.deepcopy(student)
        prune_to(model, spec.amount)
        extra["test_acc_before_finetune"] = evaluate(model, data, ctx)["test_acc"]
        lr = spec.finetune_lr if spec.finetune_lr is not None else cfg.optim.lr / 10
        log.info(f"{STAGE} {cfg.student.name}: pruned once to {spec.amount:g} (test "
                 f"{pct(extra['test_acc_before_finetune'])}), fine-tuned for {spec.finetune_epochs} epochs at lr {lr:g}")
        best_state = result = None
        epochs, best_epoch = spec.finetune_epochs, 0
        if epochs:
            tune = dataclasses.replace(recipe, epochs=epochs, optim=dataclasses.replace(cfg.optim, lr=lr))
            result = fit(model, data, tune, loss, teacher=teacher, progress=ctx.progress, desc=STAGE,
                         hooks=[EpochLogger(STAGE, epochs, writer)])
            best_state, best_epoch = result.best_state, result.best_epoch
        extra["finetune_lr"] = lr
    scores = _save(ctx, data, model, best_state, result.last_state if result else None, best_epoch)
    achieved = sparsity(model)
    info = PrunedStudentResult(name=cfg.student.name, schedule=spec.schedule, amount=spec.amount,
                               sparsity=achieved["sparsity"], zeros=achieved["zeros"], prunable=achieved["total"],
                               params=n_params(model), nonzero_params=n_params(model) - achieved["zeros"],
                               epochs=epochs, best_epoch=best_epoch, **scores, **extra)
    log.info(f"{STAGE}: sparsity {100 * info.sparsity:.1f}% of {info.prunable:,} conv/linear weights, "
             f"val {pct(info.val_acc_best)}  test {pct(info.test_acc_best)}")
    return info


def _save(ctx, data, model: nn.Module, best_state: Optional[dict], last_state: Optional[dict],
          best_epoch: int) -> dict:
    """Save the last and best checkpoints with the pruning made permanent; leave ``model`` at the best one
    (permanent) and return the accuracies of both."""
    from kdrun.models.checkpoint import checkpoint_dict
    from kdrun.records import save_torch
    from kdrun.stages.common import evaluate

    cfg = ctx.cfg
    meta = {"name": cfg.student.name, "args": dict(cfg.student.args), "num_classes": data.num_classes,
            "in_channels": data.channels, "image_size": data.image_size, "best_epoch": best_epoch, "stage": STAGE,
            "prune": dataclasses.asdict(cfg.student.prune)}
    scores = {}
    current = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for which, state in (("last", last_state or current), ("best", best_state or current)):
        model.load_state_dict(state)
        plain = make_permanent(copy.deepcopy(model)).state_dict()
        save_torch(ctx.out_dir / "checkpoints" / f"{STAGE}_{which}.pt",
                   {**checkpoint_dict(plain, {**meta, "checkpoint": which}), "config": ctx.cfg_dict})
        scores.update({f"{split}_{which}": acc for split, acc in evaluate(model, data, ctx).items()})
    make_permanent(model)
    return scores
