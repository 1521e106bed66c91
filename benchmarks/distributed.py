"""Tile-parallel training: 2 workers × 1 thread vs 1 worker × 2 threads, and a projection.

    python -m benchmarks.distributed                      # 4096² ResNet-18, tile 2048
    python -m benchmarks.distributed --size 1024 --tile 512 --steps 1 --output /tmp/d.json

Measured, side by side in one run, on one ResNet-18 training step (forward, cross-entropy,
backward, SGD) of one image, the same compiled program loaded by every process:

  (1x2) one process, ``StreamingModel(threads=2)``, torch on 2 threads;
  (2x1) two processes launched by ``torchrun --nproc-per-node 2``, one ORT and torch thread
        each, ``streamc.runtime.distributed.setup(model, tile_workers=2)``: each runs the tiles
        the schedule gives it, the cut tensor and the weight gradients are all-reduced (gloo).

The two configurations run ``--rounds`` times, alternated, so that a change in the machine's
load hits both. Per configuration: step times (``--steps`` after one warm-up in each round,
median; for (2x1) the slower worker's), CPU seconds per step (both workers' together),
peak resident memory of each process during the steps (``VmHWM`` after resetting it before the
warm-up), and a breakdown of the last step: time in each tile class's forward and backward
graph runs, in the head, in the combine steps (and the bytes they exchanged), the rest (loss,
optimizer, Python). The first-step gradients of (2x1) are compared with (1x2)'s.

Projection (on paper): the per-tile times measured in (2x1), as seconds per FLOP of forward and
of backward graphs on one thread, give every tile's time in programs compiled for 8192² and
16384² (tiles 1024 and 2048); the schedule of :func:`streamc.passes.partition.assign_tiles`
for 8 and 64 workers gives the busiest worker's compute; the head and the rest scale with the
cut tensor's size; the combine steps are ring all-reduces of the cut tensor and of the weight
gradients, each worker sending and receiving ``2 (N-1)/N`` times their bytes, timed at 10 Gb/s
and 100 Gb/s. Per-worker memory is the compile-time memory plan of the busiest worker.
Results: ``benchmarks/results/distributed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.proc_status import reset_peak, status_kb

RESULTS = Path(__file__).parent / "results"
LINKS = {"10 Gb/s": 1.25e9, "100 Gb/s": 12.5e9}  # bytes per second, each direction


# ============================================================================================
# child side
# ============================================================================================

class _Timers:
    """Wall time of every graph run (by step kind and shape class) and combine step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.bytes = 0

    def add(self, key: str, seconds: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds

    def wrap_backend(self, backend, meta) -> None:
        run = backend.run

        def timed(step, weights, feeds, outputs):
            started = time.perf_counter()
            result = run(step, weights, feeds, outputs)
            if step.tile is not None:
                cls = meta.tiles[step.tile].parts[step.stage].class_id
                key = f"{step.role} class {cls}"
            else:
                key = step.kind.value
            self.add(key, time.perf_counter() - started)
            return result

        backend.run = timed

    def wrap_workers(self, workers) -> None:
        combine, combine_all = workers.combine, workers.combine_all

        def timed_combine(tensor, op, what):
            started = time.perf_counter()
            result = combine(tensor, op, what)
            self.add("combine", time.perf_counter() - started)
            self.bytes += tensor.numel() * tensor.element_size()
            return result

        def timed_all(tensors, what):
            started = time.perf_counter()
            result = combine_all(tensors, what)
            self.add("combine weight gradients", time.perf_counter() - started)
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
            return result

        workers.combine, workers.combine_all = timed_combine, timed_all


def run_child(spec: dict) -> dict:
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.nn import functional as F

    import streamc
    from streamc.runtime.module import StreamingModel

    threads = spec["threads"]
    torch.set_num_threads(threads)
    program = streamc.load(spec["program"])
    model = StreamingModel(program, threads=threads, progress=False)
    rank, run = 0, None
    if spec["workers"] > 1:
        from streamc.runtime.distributed import setup

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        run = setup(model, tile_workers=spec["workers"], timeout=600)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(
        program.input_shape, dtype=np.float32))
    label = torch.tensor([1])
    params = model.onnx_parameters
    opt = torch.optim.SGD(params.values(), lr=1e-4)
    timers = _Timers()
    if run is not None:
        timers.wrap_workers(run.workers)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), label).backward()

    peak_reset = reset_peak()
    times, cpu, breakdown = [], [], {}
    load = os.getloadavg()[0]
    for i in range(1 + spec["steps"]):
        if run is not None:
            dist.barrier()
        timers.seconds, timers.bytes = {}, 0
        started, started_cpu = time.perf_counter(), time.process_time()
        step()
        if i == 0:
            if spec.get("grads"):
                torch.save({n: p.grad for n, p in params.items()},
                           f"{spec['grads']}.{rank}.pt")
            # the interpreter exists now: time its graph runs from the next step on
            timers.wrap_backend(model._runtime.interpreter(model.device).backend, program.meta)
        opt.step()
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
        breakdown = {"seconds": {k: round(v, 3) for k, v in sorted(timers.seconds.items())},
                     "combined_bytes": timers.bytes}
    out = {
        "rank": rank,
        "threads": threads,
        "warmup_s": round(times[0], 3),
        "times_s": [round(t, 3) for t in times[1:]],
        "cpu_s": [round(t, 3) for t in cpu[1:]],
        "peak_bytes": status_kb("VmHWM") * 1024 if peak_reset else None,
        "last_step": breakdown,
        "loadavg": [round(load, 2), round(os.getloadavg()[0], 2)],
    }
    if run is not None:
        out["tiles"] = [sorted(t) for t in run.assignment.tiles_of(run.tile_rank)]
        dist.destroy_process_group()
    return out


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = run_child(spec)
    Path(f"{spec['result']}.{out['rank']}.json").write_text(json.dumps(out))


# ============================================================================================
# parent side
# ============================================================================================

def _launch(spec: dict, tmp: Path, log) -> list[dict]:
    spec_path = tmp / f"spec_{spec['name']}.json"
    spec = dict(spec, result=str(tmp / f"result_{spec['name']}"))
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    if spec["workers"] > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={spec['workers']}", "-m", "benchmarks.distributed",
                   "--child", str(spec_path)]
    else:
        command = [sys.executable, "-m", "benchmarks.distributed", "--child", str(spec_path)]
    log(f"running {spec['name']}: {' '.join(command[1:])}")
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    log(f"  done in {time.perf_counter() - started:.0f} s")
    return [json.loads(Path(f"{spec['result']}.{r}.json").read_text())
            for r in range(spec["workers"])]


def _export_resnet18():
    from benchmarks.streaming import _export, make_model

    return _export("2d", make_model("2d", 64))


def _class_flops(program) -> dict[int, tuple[int, int]]:
    from streamc.passes.flops import backward_flops, count_flops

    result = {}
    for cls in program.meta.classes:
        forward = program.graph(cls.forward)
        result[cls.id] = (count_flops(forward), backward_flops(forward, set(cls.gradients)))
    return result


def _rates(program, records: list[dict]) -> dict[str, float]:
    """Seconds per FLOP of forward and of backward tile graph runs, on one thread, from the
    last step of every worker of (2x1)."""
    flops = _class_flops(program)
    seconds = {"forward": 0.0, "backward": 0.0}
    counted = {"forward": 0, "backward": 0}
    for record in records:
        runs = {}
        for stage_tiles in record["tiles"]:
            for t in stage_tiles:
                cls = program.meta.tiles[t].class_id
                runs[cls] = runs.get(cls, 0) + 1
        for key, value in record["last_step"]["seconds"].items():
            role, _, cls = key.partition(" class ")
            if cls:
                seconds[role] += value
        for cls, n in runs.items():
            counted["forward"] += n * flops[cls][0]
            counted["backward"] += n * flops[cls][1]
    return {role: seconds[role] / counted[role] for role in seconds}


def _project(model, size: int, tiles: list[int], workers: list[int], rates: dict[str, float],
             fixed: dict[str, float], measured_cut: int, log) -> list[dict]:
    """The step time of ``size``² on each worker count, for the best of ``tiles``."""
    from streamc.compiler import compile as compile_program
    from streamc.passes.memory import plan_program
    from streamc.passes.partition import assign_tiles

    rows = []
    for tile in tiles:
        started = time.perf_counter()
        program = compile_program(model, tile, image=(size, size), with_flops=False,
                                  with_memory_plan=False)
        log(f"  compiled {size}² tile {tile}: {len(program.tiles)} tiles "
            f"({time.perf_counter() - started:.0f} s)")
        flops = _class_flops(program)
        seconds = {c: rates["forward"] * f + rates["backward"] * b for c, (f, b) in flops.items()}
        cut = sum(b.nbytes for b in program.meta.cut_tensors)
        weights = sum(p.nbytes for p in program.meta.parameters if p.trainable)
        scale = cut / measured_cut  # the head and the rest grow with the cut tensor
        graph_plans: dict = {}
        for n in [1, *workers]:
            assignment = assign_tiles(program, n)  # the schedule the runtime runs
            busy = [sum(seconds[program.meta.tiles[t].class_id] for t in share.tiles[0])
                    for share in assignment.shares]
            busiest = max(range(n), key=busy.__getitem__)
            serial = fixed["head"] * scale + fixed["rest"]
            volume = 0 if n == 1 else 2 * (n - 1) / n * (cut + weights)
            plan = plan_program(program, tiles=assignment.tiles_of(busiest),
                                graph_plans=graph_plans)
            row = {
                "size": size, "tile": tile, "workers": n, "tiles": len(program.tiles),
                "busy_workers": sum(1 for s in assignment.shares if s.tile_count),
                "flop_balance": round(assignment.balance, 3),
                "compute_s": round(busy[busiest], 1), "head_and_rest_s": round(serial, 1),
                "all_reduced_bytes": cut + weights if n > 1 else 0,
                "sent_per_worker_bytes": int(volume),
                "busiest_worker_peak_bytes": plan.peak,
            }
            for link, bandwidth in LINKS.items():
                name = link.replace(" ", "")
                row[f"all_reduce_s_at_{name}"] = round(volume / bandwidth, 3)
                row[f"step_s_at_{name}"] = round(busy[busiest] + serial + volume / bandwidth, 1)
            rows.append(row)
    return rows


def measure(args: argparse.Namespace, model, log) -> dict:
    """Run (1x2) and (2x1) on one compiled program; what they measured."""
    import torch

    from streamc.compiler import compile as compile_program

    with tempfile.TemporaryDirectory(prefix="streamc-dist-") as tmp_name:
        tmp = Path(tmp_name)
        program = compile_program(model, args.tile, image=(args.size, args.size))
        path = program.save(tmp / "program")
        log(f"{args.size}² tile {args.tile}: {len(program.tiles)} tiles, "
            f"{len(program.classes)} shape classes")
        base = {"program": str(path), "steps": args.steps}
        singles, pairs = [], []
        for k in range(args.rounds):  # alternated: a change of the machine's load hits both
            singles.append(_launch({**base, "name": f"1x2_{k}", "workers": 1, "threads": 2,
                                    "grads": str(tmp / "grads_1x2")}, tmp, log)[0])
            pairs.append(_launch({**base, "name": f"2x1_{k}", "workers": 2, "threads": 1,
                                  "grads": str(tmp / "grads_2x1")}, tmp, log))
        reference = torch.load(tmp / "grads_1x2.0.pt")
        worst = 0.0
        for rank in range(2):
            grads = torch.load(tmp / f"grads_2x1.{rank}.pt")
            for name, ref in reference.items():
                scale = ref.abs().max().item() or 1.0
                worst = max(worst, (grads[name] - ref).abs().max().item() / scale)

    step_1x2 = statistics.median(t for r in singles for t in r["times_s"])
    step_2x1 = statistics.median(max(r["times_s"][k] for r in pair)
                                 for pair in pairs for k in range(args.steps))
    cpu_1x2 = statistics.median(t for r in singles for t in r["cpu_s"])
    cpu_2x1 = statistics.median(sum(r["cpu_s"][k] for r in pair)
                                for pair in pairs for k in range(args.steps))
    pair = pairs[-1]
    rates = _rates(program, pair)
    last = pair[0]["last_step"]["seconds"]
    tile_s = sum(v for k, v in last.items() if " class " in k)
    combine_s = last.get("combine", 0.0) + last.get("combine weight gradients", 0.0)
    head_s = last.get("head forward", 0.0) + last.get("head backward", 0.0)
    rest_s = pair[0]["times_s"][-1] - tile_s - combine_s - head_s
    measured = {
        "image": args.size, "tile": args.tile, "tiles": len(program.tiles),
        "classes": len(program.classes),
        "cut_bytes": sum(b.nbytes for b in program.meta.cut_tensors),
        "weight_gradient_bytes": sum(p.nbytes for p in program.meta.parameters if p.trainable),
        "step_1x2_s": step_1x2, "step_2x1_s": step_2x1,
        "speedup": round(step_1x2 / step_2x1, 3),
        "cpu_s_per_step_1x2": cpu_1x2, "cpu_s_per_step_2x1_both_workers": cpu_2x1,
        "peak_1x2_bytes": max(r["peak_bytes"] for r in singles),
        "peak_2x1_bytes_per_worker": [max(p[w]["peak_bytes"] for p in pairs)
                                      for w in range(2)],
        "planned_peak_1x2_bytes": program.meta.memory_plan["peak"],
        "planned_peak_2x1_bytes_per_worker": _worker_peaks(program, 2),
        "gradient_max_rel_diff_2x1_vs_1x2": worst,
        "worker_0_last_step": {"tiles_s": round(tile_s, 3), "combine_s": round(combine_s, 3),
                               "head_s": round(head_s, 3), "rest_s": round(rest_s, 3),
                               "combined_bytes": pair[0]["last_step"]["combined_bytes"]},
        "seconds_per_flop_1_thread": rates,
        "runs_1x2": singles, "runs_2x1": pairs,
    }
    log(f"1x2 {step_1x2:.1f} s, 2x1 {step_2x1:.1f} s: speed-up {measured['speedup']}x; "
        f"peaks {measured['peak_1x2_bytes'] / 2**30:.2f} GiB vs "
        f"{[round(b / 2**30, 2) for b in measured['peak_2x1_bytes_per_worker']]} GiB; "
        f"gradients within {worst:.1e}")
    return measured


def _worker_peaks(program, workers: int) -> list[int]:
    from streamc.passes.partition import assign_tiles, worker_plans

    return [p.peak for p in worker_plans(program, assign_tiles(program, workers))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tile", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=1, help="timed steps after one warm-up")
    parser.add_argument("--rounds", type=int, default=2,
                        help="(1x2) and (2x1) runs, alternated")
    parser.add_argument("--project", default="8192,16384", help="sizes to project ('' none)")
    parser.add_argument("--project-tiles", default="1024,2048")
    parser.add_argument("--project-workers", default="8,64")
    parser.add_argument("--project-only", action="store_true",
                        help="redo the projection from the measurements in --output")
    parser.add_argument("--output", default=str(RESULTS / "distributed.json"))
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return

    import torch

    def log(line: str) -> None:
        print(line, flush=True)

    model = _export_resnet18()
    output = Path(args.output)
    if args.project_only:
        result = json.loads(output.read_text())
        measured = result["measured"]
    else:
        measured = measure(args, model, log)
        result = {
            "command": "python -m benchmarks.distributed " + " ".join(sys.argv[1:]),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(), "torch": torch.__version__},
            "measured": measured,
        }
        output.write_text(json.dumps(result, indent=1))  # kept if the projection fails
    rows = []
    fixed = {"head": measured["worker_0_last_step"]["head_s"],
             "rest": measured["worker_0_last_step"]["rest_s"]}
    for size in [int(s) for s in args.project.split(",") if s]:
        rows += _project(model, size, [int(t) for t in args.project_tiles.split(",")],
                         [int(w) for w in args.project_workers.split(",")],
                         measured["seconds_per_flop_1_thread"], fixed, measured["cut_bytes"],
                         log)
    result["projection"] = {
        "model": ("step = busiest worker's tile time (its tiles' forward and backward FLOPs x "
                  "the measured 1-thread seconds per FLOP) + head and rest (measured on worker "
                  "0, the head scaled with the cut tensor) + a ring all-reduce of the cut "
                  "tensor and of the weight gradients at the link's bandwidth; no overlap of "
                  "communication with compute; workers like this machine's cores, one thread "
                  "each; the schedule is assign_tiles (FLOP-balanced, as the runtime runs it)"),
        "links_bytes_per_s": LINKS,
        "rows": rows,
    }
    output.write_text(json.dumps(result, indent=1))
    log(f"written to {output}")


if __name__ == "__main__":
    main()
