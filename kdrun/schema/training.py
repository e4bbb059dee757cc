"""Schemas of the student's optimizer, schedule, trainer and the stores."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from kdrun.errors import ConfigError
from kdrun.schema.checks import check_choice, check_dir_path, check_positive, check_range

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "none")
PRECISIONS = ("fp32", "bf16", "fp16")
SELECTIONS = ("best", "last")


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9      # SGD momentum; Adam's beta1 for adamw
    weight_decay: float = 5e-4
    nesterov: bool = False

    def check(self, key: str) -> None:
        check_choice(f"{key}.name", self.name, OPTIMIZERS)
        check_range(f"{key}.lr", self.lr, 0.0, float("inf"), lo_open=True)
        check_range(f"{key}.momentum", self.momentum, 0.0, 1.0, hi_open=True)
        check_range(f"{key}.weight_decay", self.weight_decay, 0.0, float("inf"))


@dataclass
class SchedConfig:
    name: str = "cosine"
    step_size: int = 10        # step: epochs between decays
    gamma: float = 0.1         # step: decay factor
    milestones: Optional[List[int]] = None  # step: decay at these epochs (e.g. [150, 180, 210]) instead of every
    #                                         step_size epochs: the lr is lr·gamma^k from epoch m_k + 1 on
    warmup_epochs: int = 0     # linear warm-up epochs (any schedule)

    def check(self, key: str) -> None:
        check_choice(f"{key}.name", self.name, SCHEDULES)
        if self.step_size < 1:
            raise ConfigError(f"{key}.step_size", f"must be >= 1, got {self.step_size}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"{key}.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        check_positive(f"{key}.gamma", self.gamma)
        if self.milestones is not None:
            ms = list(self.milestones)
            if any(m < 1 for m in ms) or ms != sorted(set(ms)):
                raise ConfigError(f"{key}.milestones", f"must be increasing epochs >= 1, got {ms}")
            if self.name != "step":
                raise ConfigError(f"{key}.milestones", f"only sched=step decays at milestones, got sched={self.name}")


@dataclass
class TrainerConfig:
    epochs: int = 30
    batch_size: int = 128      # training batch; a last batch of one sample joins the one before (BatchNorm cannot
    #                            normalise one sample in train mode; small data keeps every sample every epoch)
    eval_batch_size: int = 1024
    device: str = "auto"       # auto | cpu | cuda | cuda:N
    precision: str = "fp32"    # fp32 | bf16 | fp16
    num_threads: Optional[int] = None  # torch CPU threads (>= 1); null = torch's default
    progress: str = "auto"     # auto | true | false
    compile: bool = False      # torch.compile the student's and live teacher's forward (pays off on GPUs)
    channels_last: str = "auto"  # auto (on for CPU and CUDA) | true | false: NHWC memory format for conv nets
    checkpoint_every: int = 1  # epochs between a student stage's resume checkpoints (checkpoints/<stage>_resume.pt,
    #                            also after the last epoch and on SIGINT/SIGTERM); 0: none, `kdrun resume=` restarts it
    devices: int = 1           # data-parallel ranks for one training (DDP, spawned inside the job; kdrun.train.distributed):
    #                            the batch_size is the global batch, split over the ranks; one GPU per rank on CUDA
    #                            (nccl), processes on CPU (gloo); not part of store keys
    select: str = "best"       # which checkpoint of a student stage is THE model: best (highest val accuracy; the
    #                            last epoch without a val split) | last (the last epoch). It is exported, teaches a
    #                            later stage, and gives test_acc and Δ vs baseline (the CE baseline under the same
    #                            rule); both checkpoints are always saved and reported. Not part of store keys

    def __post_init__(self):
        for key in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"trainer.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.devices < 1:
            raise ConfigError("trainer.devices", f"must be >= 1, got {self.devices}")
        if self.checkpoint_every < 0:
            raise ConfigError("trainer.checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError("trainer.device", f"unknown device {self.device!r}; choose auto, cpu, cuda or cuda:N")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError("trainer.num_threads", f"must be >= 1 or null (torch's default), got {self.num_threads}")
        check_choice("trainer.precision", self.precision, PRECISIONS)
        check_choice("trainer.select", self.select, SELECTIONS)
        if self.devices > 1 and self.device != "cpu":
            check_gpus(self.device, self.devices)
        check_choice("trainer.progress", str(self.progress).lower(), ("auto", "true", "false"))
        check_choice("trainer.channels_last", str(self.channels_last).lower(), ("auto", "true", "false"))


def check_gpus(device: str, devices: int) -> None:
    """``trainer.devices`` GPUs from ``trainer.device`` on must exist (auto without CUDA: CPU ranks)."""
    import torch

    if not torch.cuda.is_available():
        return  # auto: CPU ranks; cuda: trainer.device's own error when the run starts
    suffix = device.partition(":")[2]
    first = int(suffix) if suffix.isdigit() else 0
    if first + devices > torch.cuda.device_count():
        raise ConfigError("trainer.devices", f"{devices} ranks from cuda:{first} need {first + devices} GPUs, found "
                                             f"{torch.cuda.device_count()}; use at most "
                                             f"{max(1, torch.cuda.device_count() - first)}")


@dataclass
class StoreConfig:
    teachers: str = "outputs/teachers"    # content-addressed store of trained teachers (a read-only one is
    baselines: str = "outputs/baselines"  # ... and of CE-only baseline students       used as it is: kdrun.store)

    def __post_init__(self):
        check_dir_path("store.teachers", self.teachers, read_only_ok=True)
        check_dir_path("store.baselines", self.baselines, read_only_ok=True)
