"""Keeping the last tile's activations against recomputing them: training steps of ResNet-18
(width 64, frozen BN) through StreamingModel with ``keep_activations=True`` (the default) and
``False``, and torch's own step, alternating in one process on one compiled program::

    python -m benchmarks.keep_activations 1024:1024 1024:256 [--rounds 3] [--keep-tiles N]

Each SIZE:TILE is one configuration. ``--keep-stride S[,S...]`` adds, for each S, a program
compiled with ``keep_stride=S`` (every tile keeps its activations at cumulative stride S or
more). ``--grid-end none`` adds a program compiled with ``grid_end=None`` (the whole grid;
the default ``"auto"`` ends it early where that raises the planned peak by at most 10 %), or
``--grid-end NAME`` one ended at that tensor. ``--keep-tiles N`` adds a program
compiled with ``keep_tiles=N`` (N tiles keep their activations; ``all`` for every tile) to the
alternation. Prints one JSON line per round; the medians, ratios and the memory plan's peak of
each setting go to ``benchmarks/results/keep_activations.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import warnings
from pathlib import Path

import torch

from benchmarks.streaming import _export, resnet_setup, timed_step
from streamc.compiler import compile as compile_program
from streamc.passes.memory import plan_program
from streamc.policy import RuntimePolicy
from streamc.runtime.module import StreamingModel

RESULTS = Path(__file__).parent / "results"


def measure(size: int, tile: int, rounds: int, keep_tiles: str | None = None,
            keep_strides: tuple[int, ...] = (), grid_end: str | None = None) -> dict:
    module, program, x, label = resnet_setup(size, tile)

    def run_of(compiled, keep_activations: bool = True):
        sm = StreamingModel(compiled, threads=2, progress=False,
                            keep_activations=keep_activations)
        sm.load_state_dict(module.state_dict(), strict=False)
        return sm, torch.optim.SGD(sm.parameters(), lr=1e-4)

    def compiled_with(**options):
        return compile_program(_export("2d", module), tile, image=(size, size),
                               with_memory_plan=False, **options)

    runs = {f"keep={keep}": run_of(program, keep) for keep in (True, False)}
    more = None
    if keep_tiles is not None:
        count = len(program.tiles) if keep_tiles == "all" else int(keep_tiles)
        more = compiled_with(keep_tiles=count)
        runs[f"keep_tiles={count}"] = run_of(more)
    deep = {stride: compiled_with(keep_stride=stride) for stride in keep_strides}
    for stride, compiled in deep.items():
        runs[f"keep_stride={stride}"] = run_of(compiled)
    ended = None
    if grid_end is not None:
        ended = compiled_with(grid_end=None if grid_end == "none" else grid_end)
        runs[f"grid_end={grid_end}"] = run_of(ended)
    runs["torch"] = (module, torch.optim.SGD(module.parameters(), lr=1e-4))

    def step(name: str) -> float:
        return timed_step(*runs[name], x, label)

    for name in runs:  # warm-up: builds the sessions
        step(name)
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):  # the order rotates: no setting always runs after torch's step
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(step(name))
        print(json.dumps({"size": size, "tile": tile, "round": r,
                          **{n: round(t[-1], 3) for n, t in times.items()}}), flush=True)
    medians = {n: round(statistics.median(t), 3) for n, t in times.items()}
    plans = {f"keep={keep}": plan_program(program, policy=RuntimePolicy(keep_activations=keep),
                                          optimizer_copies=0) for keep in (True, False)}
    extra = {}
    for stride, p in deep.items():
        name = f"keep_stride={stride}"
        plans[name] = plan_program(p, optimizer_copies=0)
        extra[name] = {"over_recompute": round(medians[name] / medians["keep=False"], 3),
                       "over_default": round(medians[name] / medians["keep=True"], 3),
                       "over_torch": round(medians[name] / medians["torch"], 3),
                       "flops_overhead": round(p.meta.flops.overhead, 4),
                       "kept_units": len(p.meta.kept)}
    if ended is not None:
        name = f"grid_end={grid_end}"
        plans[name] = plan_program(ended, optimizer_copies=0)
        extra[name] = {"ends_after": list(ended.meta.grid_end) or None,
                       "over_default": round(medians[name] / medians["keep=True"], 3),
                       "over_torch": round(medians[name] / medians["torch"], 3),
                       "flops_overhead": round(ended.meta.flops.overhead, 4)}
    if more is not None:
        name = f"keep_tiles={more.meta.kept_tiles}"
        plans[name] = plan_program(more, optimizer_copies=0)
        extra |= {"more_kept": [list(u) for u in more.meta.kept],
                 "more_over_recompute": round(medians[name] / medians["keep=False"], 3),
                 "more_over_torch": round(medians[name] / medians["torch"], 3),
                 "more_flops_overhead": round(more.meta.flops.overhead, 4)}
    return {
        "size": size, "tile": tile, "grid": list(program.meta.grid), "tiles": len(program.tiles),
        "default_ends_after": list(program.meta.grid_end) or None,
        "kept": [list(u) for u in program.meta.kept], "median_s": medians,
        "kept_over_recompute": round(medians["keep=True"] / medians["keep=False"], 3),
        "kept_over_torch": round(medians["keep=True"] / medians["torch"], 3),
        "plan_peak_mib": {k: round(p.peak / 2**20, 1) for k, p in plans.items()},
        "flops_overhead": round(program.meta.flops.overhead, 4), **extra,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="SIZE:TILE")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep-tiles", default=None,
                        help="also a program whose N tiles keep their activations (or 'all')")
    parser.add_argument("--keep-stride", default="",
                        help="also programs compiled with keep_stride=S, comma-separated")
    parser.add_argument("--grid-end", default=None,
                        help="also a program compiled with this grid_end (none or a tensor)")
    parser.add_argument("--out", default=str(RESULTS / "keep_activations.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    results = []
    for config in args.configs:
        size, tile = (int(v) for v in config.split(":"))
        strides = tuple(int(s) for s in args.keep_stride.split(",") if s)
        results.append(measure(size, tile, args.rounds, args.keep_tiles, strides,
                               args.grid_end))
        print(json.dumps(results[-1]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    Path(args.out).write_text(json.dumps({
        "command": "python -m benchmarks.keep_activations " + " ".join(args.configs)
                   + f" --rounds {args.rounds}"
                   + (f" --keep-tiles {args.keep_tiles}" if args.keep_tiles else "")
                   + (f" --keep-stride {args.keep_stride}" if args.keep_stride else "")
                   + (f" --grid-end {args.grid_end}" if args.grid_end else ""),
        "commit": commit, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
