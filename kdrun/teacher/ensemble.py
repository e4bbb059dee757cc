"""A teacher ensemble (``teacher.ensemble`` / ``teacher.ensemble_seeds``): K frozen teachers whose logits z_k are
combined into one target (``teacher.combine``):

* ``prob`` (default): the mean of the members' distributions at the loss's temperature T,
  p_ens = (1/K) sum_k softmax(z_k / T). The KD loss takes logits and applies softmax(· / T) itself, so it is fed
  T · log p_ens: softmax(T · log p_ens / T) = p_ens / sum_c p_ens(c) = p_ens exactly. Computed in log space
  (logsumexp of the members' log-softmax), so no probability underflows to log 0.
* ``logit``: the mean of the logits, mean_k z_k (a product of experts: softmax(mean_k z_k / T) is proportional
  to prod_k softmax(z_k / T)^(1/K)).

:class:`EnsembleSource` combines the batch logits of one :class:`kdrun.train.hooks.TeacherSource` per member, each
with its own logit or view cache (shared with single-teacher runs of that member and with every ensemble it is
in); :class:`EnsembleTeacher` is the ensemble as one module, for evaluation: its output at T = 1,
log (1/K) sum_k softmax(z_k), is the classic ensemble whose accuracy and agreement are reported.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.data.dataset import Batch, Data
from kdrun.train.hooks import TeacherSource

COMBINES = ("prob", "logit")


def ensemble_logits(logits: list[torch.Tensor], combine: str, T: float = 1.0) -> torch.Tensor:
    """The members' ``logits`` (each ``[B, C]``) combined by ``combine`` at temperature ``T`` (float32): ``prob``
    gives T · log mean_k softmax(z_k / T), ``logit`` gives mean_k z_k (``T`` unused)."""
    z = torch.stack([x.float() for x in logits])
    if combine == "logit":
        return z.mean(dim=0)
    if combine != "prob":
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    log_p = torch.logsumexp(F.log_softmax(z / T, dim=-1), dim=0) - math.log(len(logits))
    return T * log_p


class EnsembleTeacher(nn.Module):
    """Frozen ``teachers`` as one model whose output is :func:`ensemble_logits` at T = 1 (the ensemble evaluated)."""

    def __init__(self, teachers: list[nn.Module], combine: str):
        super().__init__()
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        self.teachers, self.combine = nn.ModuleList(teachers), combine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ensemble_logits([t(x) for t in self.teachers], self.combine)


class EnsembleSource(TeacherSource):
    """The members' sources (live, logit cache, view cache), each asked for the batch; their logits combined at
    the loss's ``T`` (:func:`ensemble_logits`). Every member's per-epoch check runs; its state is kept per member."""

    def __init__(self, members: list[TeacherSource], combine: str, T: float):
        self.members, self.combine, self.T = members, combine, T

    def prepare(self, needs_teacher: bool, memory_format: torch.memory_format, compile: bool) -> None:
        for member in self.members:
            member.prepare(needs_teacher, memory_format, compile)

    def before_epoch(self, epoch: int, model: nn.Module) -> bool:
        return all([member.before_epoch(epoch, model) for member in self.members])  # every member's check runs

    def logits(self, batch: Batch) -> Optional[torch.Tensor]:
        parts = [member.logits(batch) for member in self.members]
        if any(z is None for z in parts):
            return None
        return ensemble_logits(parts, self.combine, self.T)

    def after_fit(self) -> None:
        for member in self.members:
            member.after_fit()

    def state_dict(self) -> dict:
        return {f"{k}.{name}": value for k, member in enumerate(self.members)
                for name, value in member.state_dict().items()}

    def load_state_dict(self, state: dict, model: nn.Module) -> None:
        for k, member in enumerate(self.members):
            own = {name.removeprefix(f"{k}."): value for name, value in state.items() if name.startswith(f"{k}.")}
            member.load_state_dict(own, model)

    def to_rank(self) -> tuple[tuple, tuple[torch.Tensor, ...]]:
        """Each member as it crosses itself (its class, spec and how many of the shared tensors are its own)."""
        specs, shared = [], []
        for member in self.members:
            spec, tensors = member.to_rank()
            specs.append((type(member), spec, len(tensors)))
            shared.extend(tensors)
        return (specs, self.combine, self.T), tuple(shared)

    @classmethod
    def from_rank(cls, spec: tuple, shared: tuple[torch.Tensor, ...], data: Data) -> "EnsembleSource":
        specs, combine, T = spec
        members, at = [], 0
        for member_cls, member_spec, n in specs:
            members.append(member_cls.from_rank(member_spec, shared[at:at + n], data))
            at += n
        return cls(members, combine, T)
