"""Memory format and inference chunk size on this machine: what ``trainer.channels_last=auto`` and
:func:`kdrun.train.infer.cpu_chunk` rest on.

For each model (registry names; random inputs of the shape its dataset gives it), interleaved ``--rounds`` times:

* a training step (forward, cross-entropy, backward, SGD step) at ``--batch`` rows, NCHW vs NHWC weights;
* inference per 10k images in NHWC at chunk sizes 32 ... 1024, and at the chunk ``cpu_chunk`` picks.

    python benchmarks/memory_format.py                      # cnn (Fashion-MNIST shape) and CIFAR nets
    python benchmarks/memory_format.py --models cnn --threads 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kdrun.models import build_model
from kdrun.train.infer import cpu_chunk

SHAPES = {"cnn": (1, 28, 10, {"hidden": 256, "dropout": 0.25, "channels": 32})}  # else CIFAR-100: 3x32x32
CHUNKS = (32, 64, 128, 256, 512, 1024)


def model(name: str, fmt: torch.memory_format) -> tuple[torch.nn.Module, int, int, int]:
    c, s, k, args = SHAPES.get(name, (3, 32, 100, {}))
    torch.manual_seed(0)
    return build_model(name, num_classes=k, in_channels=c, image_size=s, args=args).to(memory_format=fmt), c, s, k


def train_ms(name: str, fmt: torch.memory_format, batch: int, steps: int) -> float:
    net, c, s, k = model(name, fmt)
    x, y = torch.randn(batch, c, s, s), torch.randint(0, k, (batch,))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()

    def step():
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1000


@torch.no_grad()
def infer_s_per_10k(net: torch.nn.Module, x: torch.Tensor, chunk: int) -> float:
    net(x[:chunk])
    start = time.perf_counter()
    for part in x.split(chunk):
        net(part)
    return (time.perf_counter() - start) / len(x) * 10_000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="cnn,resnet8x4,wrn_16_2,resnet20,vgg8,mobilenet_v2_cifar")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--images", type=int, default=2048, help="inference images per measurement")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for name in args.models.split(","):
        rows = {"train_nchw_ms": [], "train_nhwc_ms": [], **{f"infer_{c}": [] for c in CHUNKS}, "infer_auto": []}
        net, c, s, _ = model(name, torch.channels_last)
        net.eval()
        x = torch.randn(args.images, c, s, s)
        auto = cpu_chunk(net, x[:1], 1024)
        for _ in range(args.rounds):
            rows["train_nchw_ms"].append(train_ms(name, torch.contiguous_format, args.batch, args.steps))
            rows["train_nhwc_ms"].append(train_ms(name, torch.channels_last, args.batch, args.steps))
            net.eval()
            for chunk in CHUNKS:
                rows[f"infer_{chunk}"].append(infer_s_per_10k(net, x, chunk))
            rows["infer_auto"].append(infer_s_per_10k(net, x, auto))
        med = {key: round(statistics.median(v), 3) for key, v in rows.items()}
        nchw_infer = model(name, torch.contiguous_format)[0].eval()
        med["infer_nchw_1024"] = round(infer_s_per_10k(nchw_infer, x, 1024), 3)
        med["auto_chunk"] = auto
        results[name] = med
        print(f"{name:20s} train step {med['train_nchw_ms']:7.1f} ms NCHW, {med['train_nhwc_ms']:7.1f} ms NHWC "
              f"({med['train_nchw_ms'] / med['train_nhwc_ms']:.2f}x) | inference s/10k: NCHW@1024 "
              f"{med['infer_nchw_1024']:.2f}, NHWC " + " ".join(f"@{c} {med[f'infer_{c}']:.2f}" for c in CHUNKS)
              + f", auto @{auto} {med['infer_auto']:.2f} ({med['infer_nchw_1024'] / med['infer_auto']:.2f}x)",
              flush=True)
    print("RESULT " + json.dumps({"threads": torch.get_num_threads(), "batch": args.batch, "models": results}))


if __name__ == "__main__":
    main()
