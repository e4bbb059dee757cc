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
* ``oneshot``: the distilled student (its checkpoint under ``trainer.select``), pruned once to the amount, then
  fine-tuned with the same KD loss and teacher for ``finetune_epochs`` (learning rate ``finetune_lr``, default
  ``optim.lr / 10``).

The stage resumes like ``distil`` (``checkpoints/student_pruned_resume.pt``, ``trainer.checkpoint_every``): the
gradual schedule's hook keeps its masks, steps and best epoch in that checkpoint, so a resumed run continues
where it stopped, to the same weights bit for bit on CPU (the oneshot schedule's pruned model is rebuilt from the
distilled student, then its fine-tuning continues).

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
from kdrun.train.builtin_hooks import copy_state
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
    of a gradually pruned student must have the sparsity asked for, which an earlier epoch does not.

    Its state (:meth:`state_dict`: steps, best epoch, and the model's masks) resumes the schedule; ``model`` is the
    model it prunes, needed to resume (else the one :meth:`before_epoch` is handed)."""

    def __init__(self, amount: float, start: int, end: int, model: Optional[nn.Module] = None):
        self.amount, self.start, self.end = amount, start, end
        self.model = model
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
            self.best_state = copy_state(self.model)
            self.best_epoch, self.best_val = record["epoch"], val

    def state_dict(self) -> dict:
        """Steps, best epoch and its weights, and per pruned layer (its index in :func:`prunable`) the mask and the
        masked weight as the last forward left it (the next pruning step ranks weights by it)."""
        layers = prunable(self.model) if self.model is not None else []
        pruned = {str(i): m for i, (m, _) in enumerate(layers) if prune.is_pruned(m) and hasattr(m, "weight_mask")}
        return {"steps": self.steps, "best_state": self.best_state or {}, "best_epoch": self.best_epoch,
                "best_val": self.best_val, "masks": {i: m.weight_mask.clone() for i, m in pruned.items()},
                "weights": {i: m.weight.detach().clone() for i, m in pruned.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Prune the (fresh) model with the saved masks, so its weights can be loaded; restore the rest."""
        device = next(iter(self.model.state_dict().values())).device
        for i, (module, name) in enumerate(prunable(self.model)):
            if str(i) in state["masks"]:
                prune.custom_from_mask(module, name, state["masks"][str(i)].to(device))
                setattr(module, name, state["weights"][str(i)].to(device))
        self.steps, self.best_epoch, self.best_val = state["steps"], state["best_epoch"], state["best_val"]
        self.best_state = {k: v.to(device) for k, v in state["best_state"].items()} or None


def pruned_student(ctx, data, loss, teacher=None, student: Optional[nn.Module] = None) -> PrunedStudentResult:
    """The ``student.prune`` stage: a gradually pruned second student, or ``student`` (the distilled one, the
    checkpoint ``trainer.select`` names) pruned once and fine-tuned. ``teacher``: the KD student's teacher source
    (None for loss=ce).

    Consumes ``student.prune.*`` and what :func:`kdrun.stages.student.distil` consumes. Writes
    ``checkpoints/student_pruned_{best,last}.pt`` (pruning permanent) and its epochs to ``metrics.jsonl``
    (stage ``student_pruned``); keeps ``checkpoints/student_pruned_resume.pt`` (``trainer.checkpoint_every``; not for
    the gradual schedule with ``trainer.devices > 1``), which a resumed run continues from."""
    from kdrun.records import JsonlWriter
    from kdrun.stages.common import EpochLogger, TrimMetrics, evaluate, n_params, recipe_student, stage_checkpoint
    from kdrun.stages.student import prepare_student
    from kdrun.train.loop import fit

    cfg, spec = ctx.cfg, ctx.cfg.student.prune
    recipe = recipe_student(cfg)
    writer = JsonlWriter(ctx.out_dir / "metrics.jsonl", stage=STAGE)
    every = cfg.trainer.checkpoint_every
    if spec.schedule == "gradual" and recipe.devices > 1:  # its hook prunes rank 0's model alone: the other ranks
        every = 0                                            # could not load those weights; trained again on resume
    checkpoint = stage_checkpoint(ctx, STAGE, every, teacher is not None)
    trim = TrimMetrics(writer.path, STAGE)  # on resume: the lines of epochs after the checkpoint go
    trim.start(checkpoint)
    extra: dict = {}
    if spec.schedule == "gradual":
        model, _ = prepare_student(ctx, data, seed=recipe.seed)  # the KD student's initial weights
        start, end = spec.ramp(recipe.epochs)
        hook = GradualPruning(spec.amount, start, end, model=model)
        log.info(f"{STAGE} {cfg.student.name}: {recipe.epochs} epochs of KD, sparsity raised to {spec.amount:g} "
                 f"from epoch {start} to {end} (cubic schedule)")
        result = fit(model, data, recipe, loss, teacher=teacher, progress=ctx.progress, desc=STAGE,
                     hooks=[EpochLogger(STAGE, recipe.epochs, writer), trim, hook], checkpoint=checkpoint)
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
                         hooks=[EpochLogger(STAGE, epochs, writer), trim], checkpoint=checkpoint)
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
