"""Baked against fed forward weights: training steps of ResNet-18 (width 64, frozen BN) through
StreamingModel with ``weights="auto"`` (forward sessions rebuilt with the weights baked in after
every optimizer step) and ``weights="inputs"`` (sessions built once, weights fed), alternating
A B A B in one process on one compiled program::

    python -m benchmarks.weights_policy SIZE TILE [ROUNDS]

Prints one JSON line per round and a summary (median seconds per step of each, and the ratio).
"""

from __future__ import annotations

import json
import statistics
import sys
import warnings

import torch

from benchmarks.streaming import _export, make_image, make_model, timed_step
from streamc.compiler import compile as compile_program
from streamc.runtime.module import StreamingModel


def main() -> None:
    size, tile = int(sys.argv[1]), int(sys.argv[2])
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    module = make_model("2d", 64)
    program = compile_program(_export("2d", module), tile, image=(size, size), with_flops=False)
    x = torch.from_numpy(make_image("2d", size))
    label = torch.tensor([1])
    models = {}
    for mode in ("auto", "inputs"):
        sm = StreamingModel(program, threads=2, progress=False, weights=mode)
        sm.load_state_dict(module.state_dict(), strict=False)
        opt = torch.optim.SGD(sm.parameters(), lr=1e-4)
        models[mode] = (sm, opt)

    def step(mode: str) -> float:
        return timed_step(*models[mode], x, label)

    for mode in models:  # warm-up: builds the fed sessions
        step(mode)
    times: dict[str, list[float]] = {m: [] for m in models}
    for r in range(rounds):
        for mode in models:
            times[mode].append(step(mode))
        print(json.dumps({"round": r, **{m: round(t[-1], 3) for m, t in times.items()}}))
    medians = {m: statistics.median(t) for m, t in times.items()}
    print(json.dumps({"size": size, "tile": tile, "tiles": len(program.tiles),
                      "classes": len(program.classes), "median_s": medians,
                      "inputs_over_auto": round(medians["inputs"] / medians["auto"], 3)}))


if __name__ == "__main__":
    main()
