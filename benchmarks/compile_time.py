"""Compile time and FLOP overhead of the tiling compiler on ResNet-18 and ResNet-50 layouts.

    python -m benchmarks.compile_time            # 8192² image, tile 2048
    python -m benchmarks.compile_time --image 4096 --tile 1024

Reports, per model: analysis seconds; compile seconds without the memory plan (median of
--repeat runs; wall clock and this process's CPU time, which a busy shared machine inflates
less), by default (``grid_end="auto"``, which plans the cuts it weighs) and with the whole grid
(``grid_end=None``), alternating; CPU seconds of the memory plan on its own
(``plan_program``) and of the conventional plan (``plan_conventional`` of the analysis);
tiles, shape classes, and the forward/backward FLOP overhead of the tiled program over the
untiled prefix.
Writes benchmarks/results/compile_time.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import streamc
from streamc.compiler import compile as compile_program
from streamc.export import export_torch
from streamc.passes.memory import plan_conventional, plan_program
from zoo import randomize_batchnorm, resnet18, resnet50

RESULTS = Path(__file__).parent / "results"


def measure(name: str, model, image: int, tile: int, repeat: int) -> dict:
    times, cpu_times, analysis_times, plan_times, conventional_times = [], [], [], [], []
    whole_times = []
    program = None
    for _ in range(repeat):
        start = time.perf_counter()
        analysis = streamc.analyze(model, (image, image))
        analysis_times.append(time.perf_counter() - start)
        start, cpu_start = time.perf_counter(), time.process_time()
        program = compile_program(model, tile, image=(image, image), with_memory_plan=False)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        start = time.perf_counter()
        compile_program(model, tile, image=(image, image), with_memory_plan=False, grid_end=None)
        whole_times.append(time.perf_counter() - start)
        cpu_start = time.process_time()
        conventional = plan_conventional(analysis)
        conventional_times.append(time.process_time() - cpu_start)
        cpu_start = time.process_time()
        plan_program(program, conventional)
        plan_times.append(time.process_time() - cpu_start)
    flops = program.meta.flops
    return {
        "model": name,
        "image": image,
        "tile": tile,
        "nodes": len(model.graph.node),
        "analysis_s": round(statistics.median(analysis_times), 3),
        "compile_s": round(statistics.median(times), 3),
        "compile_cpu_s": round(statistics.median(cpu_times), 3),
        "compile_whole_grid_s": round(statistics.median(whole_times), 3),
        "grid_end": list(program.meta.grid_end) or None,
        "memory_plan_cpu_s": round(statistics.median(plan_times), 3),
        "conventional_plan_cpu_s": round(statistics.median(conventional_times), 3),
        "tiles": len(program.tiles),
        "grid": list(program.meta.grid),
        "classes": len(program.classes),
        "forward_overhead": flops.forward_overhead,
        "backward_overhead": flops.backward_overhead,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=int, default=8192)
    parser.add_argument("--tile", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "compile_time.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    for name, factory in (("resnet18", resnet18), ("resnet50", resnet50)):
        # BatchNorm randomised so that the exporter keeps every parameter distinct; exported at
        # 224² with dynamic H and W, compiled for --image.
        model = export_torch(randomize_batchnorm(factory()), (1, 3, 224, 224))
        rows.append(measure(name, model, args.image, args.tile, args.repeat))
        r = rows[-1]
        print(f"{name:9} {r['nodes']:4} nodes  image {args.image}²  tile {args.tile}: "
              f"analysis {r['analysis_s']:.2f} s, compile {r['compile_s']:.2f} s "
              f"(whole grid {r['compile_whole_grid_s']:.2f} s) "
              f"({r['compile_cpu_s']:.2f} s CPU; memory plan {r['memory_plan_cpu_s']:.2f} s CPU "
              f"+ conventional {r['conventional_plan_cpu_s']:.2f} s CPU), "
              f"{r['tiles']} tiles ({r['classes']} classes), FLOP overhead fwd "
              f"{r['forward_overhead']:.3f}x bwd {r['backward_overhead']:.3f}x", flush=True)
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
