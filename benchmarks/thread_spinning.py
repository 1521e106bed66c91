"""ORT's intra-op threads spinning or sleeping between parallel sections: training steps of
ResNet-18 (width 64, frozen BN) through StreamingModel with each ``RuntimeOptions.spin_threads``
setting, and torch's own step, alternating in one process on one compiled program::

    python -m benchmarks.thread_spinning 1024:256 1024:1024 [--rounds 3] [--threads 2]

Each SIZE:TILE is one configuration, run in a process of its own (ORT's shared arena is sized
by the first program of a process); the order of the three alternates between rounds. Prints
one JSON line per round; the medians and ratios go to
``benchmarks/results/thread_spinning.json`` (``--out``). Every session has its own ORT
thread pool, so the setting decides whether the pools of the sessions not running (and
torch's) take cores from the one that is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from benchmarks.streaming import resnet_setup, timed_step
from streamc.runtime.module import StreamingModel

RESULTS = Path(__file__).parent / "results"
SPIN = ("run", "always", "never")


def streaming_model(program, module, threads: int, spin: str) -> StreamingModel:
    sm = StreamingModel(program, threads=threads, progress=False)
    # StreamingModel takes no RuntimeOptions; set the one knob before any session exists.
    sm._runtime.options = dataclasses.replace(sm._runtime.options, spin_threads=spin)
    sm.load_state_dict(module.state_dict(), strict=False)
    return sm


def measure(size: int, tile: int, rounds: int, threads: int) -> dict:
    module, program, x, label = resnet_setup(size, tile, threads)
    runs = {}
    for spin in SPIN:
        sm = streaming_model(program, module, threads, spin)
        runs[spin] = (sm, torch.optim.SGD(sm.parameters(), lr=1e-4))
    runs["torch"] = (module, torch.optim.SGD(module.parameters(), lr=1e-4))
    for name in runs:  # warm-up: builds the sessions
        timed_step(*runs[name], x, label)
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed_step(*runs[name], x, label))
        print(json.dumps({"size": size, "tile": tile, "round": r,
                          **{n: round(t[-1], 3) for n, t in times.items()}}), flush=True)
    medians = {n: round(statistics.median(t), 3) for n, t in times.items()}
    return {
        "size": size, "tile": tile, "tiles": len(program.tiles),
        "sessions": len(program.graphs), "times_s": times, "median_s": medians,
        "over_always": {s: round(medians[s] / medians["always"], 3) for s in SPIN},
        "over_torch": {s: round(medians[s] / medians["torch"], 3) for s in SPIN},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", help="SIZE:TILE, e.g. 1024:256")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch and ORT threads")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "thread_spinning.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.child:
        size, tile = (int(v) for v in args.configs[0].split(":"))
        print(json.dumps(measure(size, tile, args.rounds, args.threads)), flush=True)
        return
    results = []
    for config in args.configs:
        child = subprocess.run([sys.executable, "-m", "benchmarks.thread_spinning", config,
                                "--child", "--rounds", str(args.rounds), "--threads",
                                str(args.threads)], capture_output=True, text=True, check=True)
        lines = child.stdout.strip().splitlines()
        print("\n".join(lines[:-1]), flush=True)
        results.append(json.loads(lines[-1]))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "times_s"}), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    Path(args.out).write_text(json.dumps({
        "command": "python -m benchmarks.thread_spinning " + " ".join(
            args.configs + ["--rounds", str(args.rounds), "--threads", str(args.threads)]),
        "commit": commit, "cpus": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
