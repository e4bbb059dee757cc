"""``ab``: activation-boundary distillation (Heo et al., AAAI 2019), as RepDistiller's ``ABLoss`` + ``Connector``.

The student learns where the teacher's neurons switch on, not their values: for each of the n layer pairs
(shallow to deep), ``s_i = connector_i(f_s)`` the student's pre-activation mapped to the teacher's shape and
``t_i`` the teacher's pre-activation, with margin ``m``::

    ab_i = Σ_elements (s_i + m)²·[s_i > −m]·[t_i ≤ 0] + (s_i − m)²·[s_i ≤ m]·[t_i > 0]
    ab = 3/1000 · Σ_i 2^(i − n + 1)·ab_i / B            (the deepest pair weighs 1, each shallower one half)
    epochs 1..init_epochs (the init phase):  L = beta·ab   (student layers up to the deepest pair + connectors)
    later epochs:                            L = (1 − alpha)·CE + alpha·T²·KL   (ab logged, not trained)

RepDistiller trains ``ab`` alone for ``--init_epochs 30`` (``helper/pretrain.py``, its own SGD at a constant
learning rate) before 240 epochs whose ``loss_kd`` is 0; here the init phase is the run's first ``init_epochs``
epochs, on the run's optimizer and schedule. Its beta 1 (``-b 1``) is the init phase's unweighted sum.

Layers: RepDistiller's ``feat[1:-1]`` with ``preact=True``, the stage outputs before their last ReLU. kdrun
reads them where the model has them (:func:`preactivation_layers`): a resnet block's final ReLU's input (the
block calls its ``relu`` last on ``out + identity``), the cnn's BatchNorm outputs, the wide-resnet and vgg stage
outputs (already before any ReLU). On other models it reads the stage outputs, after their ReLU, and logs that
the margin then acts on post-ReLU values. A connector (RepDistiller's ``Connector``/``ConvReg`` without ReLU) is
the identity where channels and height agree, else a conv (3x3 stride 2 to halve, transposed 4x4 stride 2 to
double, (1 + ΔH)x(1 + ΔW) to shrink) + BatchNorm, learned with the student.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from kdrun.errors import ConfigError
from kdrun.losses.base import _num
from kdrun.losses.feature import FeatureLoss
from kdrun.losses.options import FEATURES, FeatureLossConfig
from kdrun.registry import register_loss
from kdrun.schema.checks import check_min, check_range

log = logging.getLogger("kdrun")


def init_before_the_end(cfg) -> None:
    """ab: the init phase ends before training does (the main phase is what trains the classifier)."""
    if cfg.loss.init_epochs >= cfg.trainer.epochs:
        raise ConfigError("loss.init_epochs", f"must be < trainer.epochs ({cfg.trainer.epochs}), got "
                                              f"{cfg.loss.init_epochs}")


@register_loss("ab", "Activation boundaries (Heo et al. 2019): beta·AB(connector(s), t) in the init epochs, then CE",
               target="kdrun.losses.methods.ab.ABLoss", needs=FEATURES, rules=(init_before_the_end,))
@dataclass
class ABLossConfig(FeatureLossConfig):
    """loss=ab: L = beta·3/1000·Σ_i 2^(i-n+1)·AB_m(connector(s_i), t_i)/B in epochs 1..init_epochs, then
    (1-alpha)·CE + alpha·T²·KL (Heo et al. 2019)."""

    name: str = "ab"
    beta: float = 1.0      # weight of the AB term in the init phase (>= 0); RepDistiller's -b 1 (its unweighted sum)
    margin: float = 1.0    # m: the boundary margin, in pre-activation units (>= 0); RepDistiller's ABLoss default
    init_epochs: int = 1   # first epochs trained on beta·AB alone (>= 1, < trainer.epochs); RepDistiller: 30 of 270

    def __post_init__(self):
        super().__post_init__()
        check_range("loss.margin", self.margin, 0.0, float("inf"), hi_open=True)
        check_min("loss.init_epochs", self.init_epochs, 1)


def ab_term(source: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """``Σ (s + m)²·[s > −m, t ≤ 0] + (s − m)²·[s ≤ m, t > 0]`` over every element: the student's
    pre-activation ``source`` pushed past the margin on the side of the teacher's ``target`` (summed, not averaged)."""
    off = ((source > -margin) & (target <= 0)).float()
    on = ((source <= margin) & (target > 0)).float()
    return ((source + margin).pow(2) * off + (source - margin).pow(2) * on).sum()


def _resnet_preact(model: nn.Module, stages: Sequence[str]) -> list[str]:
    """Each stage's last block's ``relu`` input: the block calls it last, on ``out + identity`` (the hook keeps
    the last call)."""
    modules = dict(model.named_modules())
    names = []
    for stage in stages:
        last = list(modules[stage].named_children())[-1][0]
        names.append(f"{stage}.{last}.relu:input")
    return names


_PREACT = {  # model class -> its stages' pre-activation layers, given the stage names
    "kdrun.models.nets.CifarResNet": _resnet_preact,
    "torchvision.models.resnet.ResNet": _resnet_preact,
    "kdrun.models.nets.SimpleCnn": lambda model, stages: ["features.1", "features.5"],  # each block's BN output
    "kdrun.models.nets.WideResNet": lambda model, stages: list(stages),  # pre-activation blocks end at the add
    "kdrun.models.cifar.CifarVgg": lambda model, stages: list(stages),  # each block ends at its BN
}


def preactivation_layers(model: nn.Module, stages: Sequence[str]) -> Optional[list[str]]:
    """The pre-activation counterparts of ``model``'s default ``stages`` (RepDistiller's ``preact=True``), or None
    where kdrun does not know them for the model's class (a class may declare ``kdrun_feature_layers["preact"]``)."""
    declared = getattr(model, "kdrun_feature_layers", None)
    if isinstance(declared, dict) and declared.get("preact"):
        return list(declared["preact"])
    find = _PREACT.get(f"{type(model).__module__}.{type(model).__qualname__}")
    return find(model, stages) if find else None


def _kind(student: Sequence[int], teacher: Sequence[int]) -> Optional[str]:
    """Which connector joins a (c, h, w) student map to a (c, h, w) teacher map (RepDistiller's ``Connector`` and
    ``ConvReg`` rule), or None where none gives the teacher's shape."""
    (c_s, h_s, w_s), (c_t, h_t, w_t) = student, teacher
    if c_s == c_t and h_s == h_t:
        return "identity" if w_s == w_t else None
    if h_s == 2 * h_t:
        return "halve" if (w_s - 1) // 2 + 1 == w_t else None
    if h_s * 2 == h_t:
        return "double" if w_s * 2 == w_t else None
    return "shrink" if h_s >= h_t and w_s >= w_t else None


def connector(fs: torch.Tensor, ft: torch.Tensor) -> Optional[nn.Module]:
    """The learned map from the student's map ``fs`` to the teacher's ``ft`` shape: the identity where channels
    and height agree, else conv (3x3 stride 2, transposed 4x4 stride 2, or (1 + ΔH)x(1 + ΔW)) + BatchNorm, no
    ReLU; None where the shapes cannot be connected."""
    kind = _kind(fs.shape[1:], ft.shape[1:])
    (c_s, h_s, w_s), (c_t, h_t, w_t) = fs.shape[1:], ft.shape[1:]
    if kind is None or kind == "identity":
        return None if kind is None else nn.Identity()
    if kind == "halve":
        conv = nn.Conv2d(c_s, c_t, kernel_size=3, stride=2, padding=1)
    elif kind == "double":
        conv = nn.ConvTranspose2d(c_s, c_t, kernel_size=4, stride=2, padding=1)
    else:
        conv = nn.Conv2d(c_s, c_t, kernel_size=(1 + h_s - h_t, 1 + w_s - w_t))
    return nn.Sequential(conv, nn.BatchNorm2d(c_t)).to(fs.device)


class ABLoss(FeatureLoss):
    """Activation-boundary transfer over the stages' pre-activations through learned connectors, trained in the
    first ``init_epochs``; afterwards CE (+ the KD term), the AB term only logged."""

    name = "ab"
    role = "stages"
    init_only = True

    def __init__(self, T: float = ABLossConfig.T, alpha: float = ABLossConfig.alpha, beta: float = ABLossConfig.beta,
                 margin: float = ABLossConfig.margin, init_epochs: int = ABLossConfig.init_epochs,
                 student_layers: Optional[Sequence[str]] = None, teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(T=T, alpha=alpha, beta=beta, student_layers=student_layers, teacher_layers=teacher_layers)
        self.margin = float(margin)
        self.init_epochs = self.hint_epochs = int(init_epochs)  # FeatureLoss trains the term alone in hint_epochs
        self.connectors = nn.ModuleList()
        self.term_name = f"AB(connector(s), t; m={_num(self.margin)})"

    def _defaults(self, model: nn.Module, key: str) -> list[str]:
        stages = super()._defaults(model, key)  # refuses a model without (N, C, H, W) stages, e.g. an mlp
        preact = preactivation_layers(model, stages)
        if preact is None:
            log.warning(f"loss=ab: kdrun knows no pre-activation layers of {type(model).__name__}: it reads the stage "
                        f"outputs {stages}, after their ReLU, so the margin acts on post-ReLU values (set "
                        f"loss.student_layers / loss.teacher_layers to pre-ReLU modules to follow RepDistiller)")
            return stages
        return preact

    def fits(self, fs, ft) -> bool:
        """Two maps a connector can join (RepDistiller's ``ConvReg`` rule)."""
        return super().fits(fs, ft) and _kind(fs.shape[1:], ft.shape[1:]) is not None

    def setup(self, student_features, teacher_features, names=None) -> None:
        """Check the pairs and build one fresh connector per pair (a new student gets new connectors)."""
        super().setup(student_features, teacher_features, names)
        connectors = []
        for (sn, tn), fs, ft in zip(self.pairs, student_features, teacher_features):
            module = connector(fs, ft)
            if module is None:
                raise self.mismatch(sn, tn, fs, ft, "no connector maps the student's height to the teacher's "
                                                    "(equal, half or double, or larger in both height and width)")
            connectors.append(module)
        self.connectors = nn.ModuleList(connectors)
        self.train()

    def feature_term(self, student_features, teacher_features) -> torch.Tensor:
        if len(self.connectors) != len(student_features):
            raise RuntimeError(f"loss=ab has {len(self.connectors)} connectors for {len(student_features)} layer "
                               f"pairs: call loss.setup(student_features, teacher_features) first")
        n, batch = len(student_features), student_features[0].shape[0]
        total = 0
        for i, (conn, fs, ft) in enumerate(zip(self.connectors, student_features, teacher_features)):
            total = total + 2.0 ** (i - n + 1) * ab_term(conn(fs.float()), ft.detach().float(), self.margin)
        return total / batch * 3 / 1000
