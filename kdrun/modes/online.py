"""``mode=online``: deep mutual learning (Zhang et al., CVPR 2018): K peers, the same or different architectures,
trained together from scratch; no pre-trained teacher. Peer k minimises

    L_k = (1-alpha)·CE(y, s_k) + alpha·T²·KL(mean_{j≠k} softmax(s_j/T) ‖ softmax(s_k/T))

(with ``loss=kd``; the configured logit loss in general, its teacher distribution being the others' mean,
detached). The peers are one :class:`Cohort` trained by :func:`kdrun.train.loop.fit` on ``Σ_k L_k``: with detached
targets each ``L_k`` reaches only peer k's weights, so one optimizer over all peers steps each peer as its own
optimizer with the same hyper-parameters would, and resume checkpoints, signals and data-parallel ranks come from
the loop. Peer k (1-based) is built with seed ``seed + k - 1``: peer 1 is the student and starts from the CE
baseline's weights. Each peer's best-on-val epoch is kept on its own (:class:`PeerScores`); the loop's ``val/acc``
(and the student's learning curve) is peer 1's. ``trainer.select`` picks, for every peer, the checkpoint its
figures, the peers' mean and the ensemble use, as for any student.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch
from torch import nn

from kdrun.console import pct
from kdrun.data.dataset import Data
from kdrun.losses.base import DistillationLoss
from kdrun.models.checkpoint import checkpoint_dict
from kdrun.outputs.metrics import Prediction, agreement
from kdrun.records import save_torch
from kdrun.results import RULES, Row, StudentResult, other_rule
from kdrun.stages import (
    EpochLogger,
    RunContext,
    TrimMetrics,
    build,
    n_params,
    obtain_baseline,
    prepare_student,
    recipe_student,
)
from kdrun.stages.common import score_checkpoints, stage_checkpoint
from kdrun.teacher.ensemble import ensemble_logits
from kdrun.train.builtin_hooks import copy_state
from kdrun.train.hooks import Hook
from kdrun.train.infer import accuracy
from kdrun.train.loop import Recipe, fit

log = logging.getLogger("kdrun")


class Cohort(nn.Module):
    """The peers as one model: in train mode its forward returns every peer's logits stacked on a last axis,
    ``[B, C, K]`` (batch and classes where one model's logits have them: the loop reads the number of classes from
    ``shape[1]``); in eval mode peer 1's (the student's), so the loop's validation accuracy and best epoch are the
    student's."""

    def __init__(self, peers: list[nn.Module]):
        super().__init__()
        self.peers = nn.ModuleList(peers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return torch.stack([peer(x) for peer in self.peers], dim=-1)
        return self.peers[0](x)


def others_target(logits: torch.Tensor, k: int, T: float) -> torch.Tensor:
    """Logits whose ``softmax(·/T)`` is the mean of ``softmax(s_j/T)`` over the peers ``j ≠ k`` of ``logits``
    (``[B, C, K]``): the teacher ensemble's ``prob`` combination of the other peers (``T·log`` of that mean, in log
    space), detached."""
    with torch.no_grad():
        return ensemble_logits([logits[..., j].detach() for j in range(logits.shape[-1]) if j != k], "prob", T)


class MutualLoss(nn.Module):
    """``Σ_k loss(s_k, others_target(k), y)`` over a :class:`Cohort`'s stacked logits; ``loss`` is a logit loss
    that reads its teacher only through ``softmax(t/T)`` (kd, soft_ce, dkd, dist) or its argmax (hard). Parts:
    ``ce`` and ``kd``, the peers' means; ``peer<k>``, peer k's ``L_k``."""

    def __init__(self, loss: DistillationLoss, peers: int):
        super().__init__()
        self.loss, self.peers = loss, peers
        self.name, self.T, self.alpha = loss.name, loss.T, loss.alpha
        self.extra_parts = tuple(f"peer{k}" for k in range(1, peers + 1))

    needs_teacher = False  # the targets are the peers' own outputs: fit runs no teacher source

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.loss, "set_epoch"):  # dkd's warm-up
            self.loss.set_epoch(epoch)

    def forward(self, logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], labels: torch.Tensor,
                **_) -> tuple[torch.Tensor, dict]:
        values, ce, kd = [], [], []
        for k in range(logits.shape[-1]):
            value, parts = self.loss(logits[..., k], others_target(logits, k, self.T), labels)
            values.append(value)
            ce.append(parts["ce"])
            kd.append(parts["kd"])
        parts = {"ce": torch.stack(ce).mean(), "kd": torch.stack(kd).mean(),
                 **{name: v for name, v in zip(self.extra_parts, values)}}
        return torch.stack(values).sum(), parts

    def formula(self) -> str:
        own = self.loss.formula().removeprefix("L = ")
        return (f"L = Σ_k L_k over {self.peers} peers, L_k = {own} with t = the other peers' mean softmax(s_j/T), "
                f"detached")


class PeerScores(Hook):
    """After each epoch: every peer's val accuracy (``val/acc_peer<k>`` in the epoch's record; peer 1's is the loop's
    ``val/acc``) and the weights of each peer's own best epoch (every epoch's without a val split: the last)."""

    def __init__(self, cohort: Cohort, data: Data, recipe: Recipe):
        self.cohort, self.data, self.recipe = cohort, data, recipe
        k = len(cohort.peers)
        self.best_states: list[dict] = [{} for _ in range(k)]
        self.best_epochs: list[int] = [0] * k
        self.best_val_accs: list[Optional[float]] = [None] * k

    def after_epoch(self, record: dict) -> None:
        r = self.recipe
        accs = [record["val/acc"], *(accuracy(peer, self.data, "val", r.eval_batch_size, r.precision,
                                              r.channels_last) for peer in self.cohort.peers[1:])]
        for k, (peer, acc) in enumerate(zip(self.cohort.peers, accs)):
            record[f"val/acc_peer{k + 1}"] = acc
            if acc is None or self.best_val_accs[k] is None or acc > self.best_val_accs[k]:
                self.best_states[k], self.best_epochs[k], self.best_val_accs[k] = copy_state(peer), record["epoch"], acc

    def state_dict(self) -> dict:
        return {"best_states": self.best_states, "best_epochs": self.best_epochs, "best_val_accs": self.best_val_accs}

    def load_state_dict(self, state: dict) -> None:
        device = self.data.train.y.device
        self.best_states = [{n: v.to(device) for n, v in s.items()} for s in state["best_states"]]
        self.best_epochs, self.best_val_accs = list(state["best_epochs"]), list(state["best_val_accs"])


def online(ctx: RunContext, data: Data, loss: DistillationLoss) -> None:
    """The CE baseline (peer 1's model alone), then the cohort trained with the mutual loss; adds ``peers`` (each
    peer's result; peer 1 is ``student``), ``peers_mean`` and ``ensemble`` (the peers' mean softmax) to the summary.

    Consumes ``mode.peers`` / ``mode.num_peers``, ``student.*``, ``trainer.*``, ``optim.*``, ``sched.*``, ``seed``."""
    cfg, result = ctx.cfg, ctx.result
    configs = cfg.mode.peer_configs(cfg.student)
    if cfg.baseline:
        result.baseline = dataclasses.replace(obtain_baseline(ctx, data), note="peer 1's model trained alone (CE)")
    recipe = recipe_student(cfg)
    first, init = prepare_student(ctx, data, seed=recipe.seed)
    peers = [first, *(build(c, data, f"mode.peers[{k}]", ctx.device, recipe.seed + k)
                      for k, c in enumerate(configs[1:], 1))]
    cohort, mutual = Cohort(peers), MutualLoss(loss, len(peers))
    result.loss = {"formula": mutual.formula()}
    log.info(f"online: {len(peers)} peers ({', '.join(f'{c.name} {n_params(p):,} params' for c, p in zip(configs, peers))})"
             f", {recipe.epochs} epochs, {mutual.formula()}")
    checkpoint = stage_checkpoint(ctx, "student", cfg.trainer.checkpoint_every, False)
    trim = TrimMetrics(ctx.metrics.path, "student")
    trim.start(checkpoint)
    scores = PeerScores(cohort, data, recipe)
    fitted = fit(cohort, data, recipe, mutual, progress=ctx.progress, desc="student", checkpoint=checkpoint,
                 hooks=[scores, EpochLogger("student", recipe.epochs, ctx.metrics, *ctx.writers("student")), trim])
    infos = [_peer_result(ctx, data, k, c, peer, scores, fitted.last_state, recipe, init)
             for k, (c, peer) in enumerate(zip(configs, peers), 1)]
    _agreements(ctx, infos)
    result.peers, result.student = infos, infos[0]
    result.student_role = "peer 1 = student, online"
    _summarise(ctx, data, infos, peers)


def _peer_result(ctx: RunContext, data: Data, k: int, model_cfg, peer: nn.Module, scores: PeerScores,
                 cohort_last: dict, recipe: Recipe, init: dict) -> StudentResult:
    """Save peer ``k``'s best and last weights (``checkpoints/student_*.pt`` for peer 1, ``peer<k>_*.pt`` for the
    others), score them, and keep the logits of the one ``trainer.select`` names for the report (role ``student`` /
    ``peer<k>``); ``peer`` is left holding that checkpoint (the ensemble row scores it)."""
    stage = "student" if k == 1 else f"peer{k}"
    prefix = f"peers.{k - 1}."
    last = {n.removeprefix(prefix): v for n, v in cohort_last.items() if n.startswith(prefix)}
    meta = {"name": model_cfg.name, "args": dict(model_cfg.args), "num_classes": data.num_classes,
            "in_channels": data.channels, "image_size": data.image_size, "best_epoch": scores.best_epochs[k - 1],
            "peer": k}
    node = {"name": model_cfg.name, "args": dict(model_cfg.args)} if not model_cfg.target else \
        {"_target_": model_cfg.target, **model_cfg.kwargs}
    config = ctx.cfg_dict if k == 1 else {**ctx.cfg_dict, "student": node}  # load_student rebuilds the peer
    select, states = ctx.cfg.trainer.select, {"last": last, "best": scores.best_states[k - 1]}

    def save_and_load(which: str) -> None:
        save_torch(ctx.out_dir / "checkpoints" / f"{stage}_{which}.pt",
                   {**checkpoint_dict(states[which], {**meta, "checkpoint": which, "stage": stage}), "config": config})
        peer.load_state_dict(states[which])
    out = score_checkpoints(peer, data, ctx, stage, save_and_load)  # the peer left holding the selected one
    peer.eval()
    info = StudentResult(name=model_cfg.name, args=dict(model_cfg.args), params=n_params(peer), epochs=recipe.epochs,
                         best_epoch=scores.best_epochs[k - 1], seed=recipe.seed + k - 1, init=init, peer=k,
                         select=select, **out)
    log.info(f"peer {k} {model_cfg.name}: best epoch {info.best_epoch}, {select} checkpoint: val {pct(info.val_acc)}  "
             f"test {pct(info.test_acc)}")
    return info


def _agreements(ctx: RunContext, infos: list[StudentResult]) -> None:
    """Each peer's top-1 agreement (and KL) with the ensemble (mean softmax) of the other peers, from the logits of
    the checkpoints ``trainer.select`` names, on test (else val): how far mutual learning made the peers one function."""
    preds = ctx.result.predictions
    roles = ["student", *(f"peer{k}" for k in range(2, len(infos) + 1))]
    if any(r not in preds for r in roles):
        return
    for k, info in enumerate(infos):
        others = [preds[r] for j, r in enumerate(roles) if j != k]
        mean = ensemble_logits([p.logits for p in others], "prob")  # log of the mean softmax, as a teacher ensemble's
        ensemble = Prediction(others[0].split, mean, others[0].labels)
        found = agreement(ensemble, preds[roles[k]])
        info.agreement = {**found, "with": "other peers"} if found else None


def _summarise(ctx: RunContext, data: Data, infos: list[StudentResult], peers: list[nn.Module]) -> None:
    """The table's rows (peers 2..K, the peers' mean, their ensemble) and ``peers_mean`` / ``ensemble``."""
    from kdrun.modes.selfdistill import ensemble_accuracy

    result = ctx.result
    mean = {}
    for split in ("val", "test"):
        accs = [getattr(i, f"{split}_acc") for i in infos]
        mean[f"{split}_acc"] = None if None in accs else round(sum(accs) / len(accs), 4)
    result.peers_mean = mean
    result.ensemble = ensemble_accuracy(peers, data, ctx)
    result.rows = [Row(f"peer {i.peer}, online", i.name, i.val_acc, i.test_acc, _note(i))
                   for i in infos[1:]]
    names = "+".join(i.name for i in infos)
    result.rows += [Row(f"mean of {len(infos)} peers", names, **mean, note=f"each at its {_RULE[ctx.cfg.trainer.select]}"),
                    Row(f"ensemble of {len(infos)} peers", names, **result.ensemble, note="mean softmax")]
    log.info(f"online: peers' mean val {pct(mean['val_acc'])}  test {pct(mean['test_acc'])}; ensemble val "
             f"{pct(result.ensemble['val_acc'])}  test {pct(result.ensemble['test_acc'])}")


_RULE = {"best": "best-on-val epoch", "last": "last epoch"}


def _note(info: StudentResult) -> str:
    top1 = (info.agreement or {}).get("top1")
    agrees = "" if top1 is None else f"; agrees with other peers {top1:.2f} %"
    other = other_rule(info.select)  # the checkpoint the row's figures are not
    return f"{RULES[other]}: {pct(getattr(info, f'test_acc_{other}'), '')}{agrees}"
