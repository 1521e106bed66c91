"""Weights as graph inputs vs as initializers (DESIGN section 7), on a ResNet-18.

Runs a ResNet-18-shaped torch model (BasicBlocks [2, 2, 2, 2], widths 64-512, frozen BatchNorm)
exported to ONNX and compiled for one image size, and times, per weight mode of
:class:`~streamc.runtime.module.StreamingModel` (``inputs``, ``initializers`` and ``auto``: see
:mod:`streamc.runtime.sessions`):

- ``forward``: a no-grad forward with unchanged weights (sessions reused in both modes);
- ``forward+rebuild``: a no-grad forward right after the weights changed (the initializers mode
  rebuilds the forward sessions first);
- ``train step``: forward, cross-entropy, backward, Adam step (the initializers mode rebuilds
  every session once per step, the auto mode the forward ones);

and the same on torch on the full image for scale: the best wall and CPU seconds of
``--repeats`` runs after one warm-up. Usage::

    python benchmarks/runtime_sessions.py                  # 512x512, one tile
    python benchmarks/runtime_sessions.py --threads 1      # CPU seconds = work, on a busy machine
    python benchmarks/runtime_sessions.py --size 1024 --tile 768   # 9 tiles
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamc.compiler import compile as compile_program  # noqa: E402
from streamc.runtime.module import StreamingModel  # noqa: E402


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """torchvision's ResNet-18 layout (without torchvision)."""

    def __init__(self, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(3, w[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], w[0]
        for k, cout in enumerate(w):
            stride = 1 if k == 0 else 2
            layers.append(nn.Sequential(Block(cin, cout, stride), Block(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(w[3], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def randomise_bn(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics (and no de-duplicated initializers in the export)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def export(model: nn.Module, size: int) -> onnx.ModelProto:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, 3, size, size),), f, dynamo=False,
                          opset_version=17, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.EVAL, input_names=["image"],
                          output_names=["logits"])
    return onnx.load_model_from_string(f.getvalue())


def cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads (ORT's included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn, repeats: int) -> tuple[float, float]:
    """(best wall seconds, best CPU seconds) of ``fn`` over ``repeats`` runs after a warm-up.

    On a machine shared with other work the wall time of a run varies severalfold; the best run
    is the closest to the uncontended time. Process CPU time does not count the time the
    process waits for a core, so with ``--threads 1`` (no thread pool spinning while waiting
    for its peers) it measures the work itself.
    """
    fn()  # warm-up
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), cpu_seconds()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(cpu_seconds() - cpu)
    return min(walls), min(cpus)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and ORT threads (default: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    net = ResNet18(args.width)
    randomise_bn(net)
    net.eval()
    start = time.perf_counter()
    program = compile_program(export(net, args.size), tile=args.tile,
                              image=(args.size, args.size), with_flops=False)
    print(f"ResNet-18 (width {args.width}) at {args.size}x{args.size}, tile {args.tile}: "
          f"{len(program.tiles)} tiles, {len(program.classes)} shape classes, compiled in "
          f"{time.perf_counter() - start:.1f} s; torch threads {torch.get_num_threads()}")
    load = os.getloadavg()[0]
    x = torch.randn(1, 3, args.size, args.size)
    target = torch.tensor([3])
    rows = []

    ref_opt = torch.optim.Adam(net.parameters(), lr=1e-4)

    def torch_forward() -> None:
        with torch.no_grad():
            net(x)

    def torch_step() -> None:
        ref_opt.zero_grad()
        F.cross_entropy(net(x), target).backward()
        ref_opt.step()

    rows.append(("torch, full image", timed(torch_forward, args.repeats), None,
                 timed(torch_step, args.repeats), None))

    for mode in ("inputs", "initializers", "auto"):
        model = StreamingModel(program, weights=mode)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        pool = model._runtime.engine(model.device).pool

        def forward(model: StreamingModel = model) -> None:
            with torch.no_grad():
                model(x)

        def forward_after_change(model: StreamingModel = model) -> None:
            with torch.no_grad():
                model.onnx_parameters["fc.bias"].add_(1e-6)
                model(x)

        def step(model: StreamingModel = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad()
            F.cross_entropy(model(x), target).backward()
            opt.step()

        fwd = timed(forward, args.repeats)
        fwd_rebuild = timed(forward_after_change, args.repeats)
        builds_before = pool.builds
        train = timed(step, args.repeats)
        builds_per_step = (pool.builds - builds_before) / (args.repeats + 1)
        rows.append((f"streamc, weights={mode}", fwd, fwd_rebuild, train, builds_per_step))

    def fmt(t: tuple[float, float] | None) -> str:
        return f"{'-':>16s}" if t is None else f"{t[0]:6.3f}s ({t[1]:6.3f})"

    print(f"best of {args.repeats}: wall seconds (CPU seconds); load average before: {load:.1f}, "
          f"after: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'':30s} {'forward':>16s} {'fwd+rebuild':>16s} {'train step':>16s} "
          f"{'sessions built/step':>20s}")
    for name, fwd, fwd_rebuild, train, builds in rows:
        b = f"{builds:20.0f}" if builds is not None else f"{'-':>20s}"
        print(f"{name:30s} {fmt(fwd)} {fmt(fwd_rebuild)} {fmt(train)} {b}")
    inputs, inits = rows[1], rows[2]
    for k, what in ((0, "wall"), (1, "CPU")):
        print(f"initializers vs inputs ({what}): forward {inputs[1][k] / inits[1][k]:.2f}x, "
              f"forward with rebuild {inputs[2][k] / inits[2][k]:.2f}x, "
              f"train step {inputs[3][k] / inits[3][k]:.2f}x faster")

if __name__ == "__main__":
    main()
