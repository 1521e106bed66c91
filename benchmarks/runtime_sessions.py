"""Weights as graph inputs vs as initializers (docs/architecture.md, the runtime), on a ResNet-18.

Runs a ResNet-18-shaped torch model (``zoo.resnet18``: BasicBlocks [2, 2, 2, 2], widths 64-512,
frozen BatchNorm) exported to ONNX and compiled for one image size, and times, per weight mode of
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
import os
import resource
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamc.compiler import compile as compile_program  # noqa: E402
from streamc.export import export_torch  # noqa: E402
from streamc.runtime.module import StreamingModel  # noqa: E402
from zoo import randomize_batchnorm, resnet18  # noqa: E402


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
    net = resnet18(classes=10, width=args.width)
    randomize_batchnorm(net, seed=1, weight="uniform")
    net.eval()
    start = time.perf_counter()
    proto = export_torch(net, (1, 3, args.size, args.size), dynamic=False)
    program = compile_program(proto, tile=args.tile, image=(args.size, args.size),
                              with_flops=False)
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
        pool = model._runtime.interpreter(model.device).backend.pool

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
