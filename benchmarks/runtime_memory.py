"""Memory of streamed training: resident memory (RSS) step by step over many training steps.

Trains the CNN of ``examples/train_synthetic.py`` through
:class:`~streamc.runtime.module.StreamingModel` on ``--size``² images (default 2048², tile 512)
for ``--steps`` Adam steps and prints the process's RSS (``/proc/self/status``: VmRSS, and the
peak VmHWM) after every step. Memory must stay flat: after the first steps (sessions built,
allocator pools warm), no step may hold more than the warm steps did. Also printed: what torch
would hold for the same network on the full image (the activations its autograd keeps), for
scale. Usage::

    python benchmarks/runtime_memory.py                      # 2048x2048, 20 steps
    python benchmarks/runtime_memory.py --size 4096 --steps 5 --weights inputs
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from train_synthetic import CheckerNet, calibrate_batchnorm, make_batch  # noqa: E402

from streamc.compiler import compile as compile_program  # noqa: E402
from streamc.export import export_torch  # noqa: E402
from streamc.runtime.module import StreamingModel  # noqa: E402


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM...) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def torch_activation_mib(net: torch.nn.Module, size: int) -> float:
    """Bytes of the activations torch's autograd would keep on a full image (estimated from a
    256² run: activation memory is proportional to the image area)."""
    probe = 256
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    x = torch.zeros(1, 1, probe, probe)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x).sum()
    return sum(saved) * (size / probe) ** 2 / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="steps before the flatness check")
    parser.add_argument("--weights", choices=["initializers", "inputs"], default="initializers")
    parser.add_argument("--tolerance-mib", type=float, default=16.0)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = CheckerNet()
    calibrate_batchnorm(net, rng)
    program = compile_program(export_torch(net, (1, 1, args.size, args.size), dynamic=False),
                              tile=args.tile, image=(args.size, args.size), with_flops=False)
    model = StreamingModel(program, weights=args.weights)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = [make_batch(args.size, 1, rng) for _ in range(2)]
    image_mib = images[0][0].numel() * 4 / 2**20
    print(f"{args.size}x{args.size} image ({image_mib:.0f} MiB float32), tile {args.tile}: "
          f"{len(program.tiles)} tiles, {len(program.classes)} classes, weights={args.weights}")
    print(f"torch on the full image would keep ~{torch_activation_mib(net, args.size):.0f} MiB "
          "of activations for backward")
    baseline = status_mib("VmRSS")
    print(f"RSS before training: {baseline:.0f} MiB")
    rss = []
    for step in range(args.steps):
        started = time.perf_counter()
        x, y = images[step % len(images)]
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        del loss
        gc.collect()
        rss.append(status_mib("VmRSS"))
        print(f"step {step + 1:3d}: RSS {rss[-1]:7.1f} MiB  peak {status_mib('VmHWM'):7.1f} MiB  "
              f"({time.perf_counter() - started:.1f} s)", flush=True)
    warm = rss[args.warmup:]
    growth = max(warm) - warm[0]
    first, last = np.mean(warm[: max(1, len(warm) // 3)]), np.mean(warm[-max(1, len(warm) // 3):])
    print(f"after warm-up: RSS {min(warm):.1f}..{max(warm):.1f} MiB; largest rise over step "
          f"{args.warmup + 1}: {growth:.1f} MiB; mean of last third minus first third: "
          f"{last - first:+.1f} MiB")
    flat = growth <= args.tolerance_mib
    print("memory flat" if flat else f"MEMORY GROWS by more than {args.tolerance_mib} MiB")
    sys.exit(0 if flat else 1)


if __name__ == "__main__":
    main()
