"""Inference and the device side of training: the run's device, autocast, memory formats (NHWC for conv
nets), batched prediction in cache-sized chunks on CPU, top-1 accuracy."""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import nn

from kdrun.data.dataset import Data
from kdrun.errors import ConfigError


def resolve_device(spec: str) -> torch.device:
    """``trainer.device``: auto picks CUDA when present; asking for CUDA without one is an error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.device", f"{spec} requested but no CUDA device is available; use auto or cpu")
    return torch.device(spec)


def autocast(device: torch.device, precision: str):
    """Autocast context for ``trainer.precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("trainer.precision", "fp16 needs a CUDA device; use bf16 or fp32 on cpu")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def predict(model: nn.Module, data: Data, split: str, batch_size: int, precision: str = "fp32",
            channels_last: str = "auto") -> torch.Tensor:
    """Logits of ``model`` (in eval mode) on a whole split, as float32. ``channels_last`` (``trainer.*``): a conv
    net is put in NHWC first (:func:`model_format`)."""
    model.eval()
    device = data.train.y.device
    model.to(memory_format=model_format(model, preferred_format(channels_last, device)))
    outs, chunk = [], None
    with autocast(device, precision):
        for x, *_ in data.batches(split, batch_size):
            chunk = chunk or (cpu_chunk(model, x[:1], batch_size) if device.type == "cpu" else batch_size)
            outs.extend(model(part).float() for part in x.split(chunk))
    return torch.cat(outs) if outs else torch.empty(0, data.num_classes, device=device)


CPU_CHUNK_BYTES = 8 * 2 ** 20  # the largest activation of a CPU inference chunk stays within this (cache-sized)


@torch.no_grad()
def cpu_chunk(model: nn.Module, sample: torch.Tensor, cap: int) -> int:
    """Rows per forward pass for inference on CPU, at most ``cap`` (``trainer.eval_batch_size``).

    A conv net's big batches are slower per image on CPU once its activations outgrow the caches (on 2 cores:
    cnn on 28x28 3 s per 60k images at 128 rows, 9.5 s at 512; resnet8x4 on 32x32 1.7x slower at 1024 rows than
    at 64; ``benchmarks/memory_format.py``). The chunk is the largest power of two whose largest single
    activation (measured on one ``sample`` row) fits ``CPU_CHUNK_BYTES``, at least 16. Speed only: rows get
    the same logits up to float rounding."""
    sizes = []
    hook = lambda module, inputs, out: sizes.append(out.numel() * out.element_size()) \
        if isinstance(out, torch.Tensor) else None
    handles = [m.register_forward_hook(hook) for m in model.modules() if not any(m.children())]
    try:
        model(sample)
    finally:
        for handle in handles:
            handle.remove()
    per_row = max(sizes, default=1)
    rows = 1 << max(4, int(math.log2(max(1, CPU_CHUNK_BYTES // per_row))))
    return max(1, min(cap, rows))


def accuracy(model: nn.Module, data: Data, split: str, batch_size: int, precision: str = "fp32",
             channels_last: str = "auto") -> Optional[float]:
    """Top-1 accuracy in percent on ``split``; None when the split is empty."""
    if len(data.split(split)) == 0:
        return None
    return top1(predict(model, data, split, batch_size, precision, channels_last), data.split(split).y)


def top1(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent of ``scores`` (logits or probabilities) against ``labels``."""
    return round(100.0 * (scores.argmax(1) == labels).float().mean().item(), 4)


def preferred_format(setting: str, device: torch.device) -> torch.memory_format:
    """``trainer.channels_last``: NHWC (``torch.channels_last``) for conv nets with ``true``, and with ``auto`` on
    CPU and CUDA, where oneDNN's and cuDNN's NHWC kernels are the faster ones (on 2 CPU cores 1.2-3x for the
    registry's conv nets, ``benchmarks/memory_format.py``); contiguous NCHW with ``false`` (and ``auto``
    elsewhere). Apply it to a model through :func:`model_format`."""
    setting = str(setting).lower()
    on = setting == "true" or (setting == "auto" and device.type in ("cpu", "cuda"))
    return torch.channels_last if on else torch.contiguous_format


def model_format(model: nn.Module, preferred: torch.memory_format) -> torch.memory_format:
    """``preferred`` for a model with 2-d convolutions, contiguous otherwise (NHWC buys an mlp nothing and would
    cost its input a copy). Speed only: a conv net's outputs differ by float rounding between the two."""
    if preferred == torch.channels_last and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return torch.channels_last
    return torch.contiguous_format
