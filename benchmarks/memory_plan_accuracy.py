"""Predicted against measured peak memory of one training step through ``StreamingModel``.

For three CNNs (ResNet-18 at width 32, a VGG-ish and a two-level U-Net, all from the shared
``zoo`` package, at 1024²), three tile sizes each, this script compiles a program, plans it
(:func:`streamc.passes.memory.plan_program` with plain SGD's state, ``optimizer_copies=0``, and
the default :class:`~streamc.policy.RuntimePolicy`, whose constant folding is
``fold_constants="forward"``) and
measures, in a fresh child process per configuration, training steps (forward, loss, backward,
``torch.optim.SGD`` step; two by default) of a :class:`streamc.StreamingModel`:

- ``default``: the runtime's defaults, what users run (weights baked into the sessions where
  worth it, one shared CPU arena, memory patterns off, sessions released after their pass,
  ``malloc_trim`` after each run);
- ``lean``: ``StreamingModel(..., allocator="system")``: the same with the CPU arena off and
  glibc's mmap threshold pinned at 64 KiB, so that every freed tensor goes back to the system
  (what the plan's tensor model describes).

Measuring: the child loads the program, builds the ``StreamingModel`` (weights resident),
allocates the image and the label, collects garbage, resets the high-water mark (``echo 5 >
/proc/self/clear_refs``) and takes VmRSS as the baseline; measured = VmHWM after the steps -
baseline (the first step's is recorded too: the fed sessions that later steps keep from the
start do not exist yet during its forward pass). No session exists before the
step, so ORT's own start-up (environment, thread pools, kernels) is in the measurement. The
weights and the image are in the baseline, so the prediction compared is ``plan.peak -
resident.parameters - resident.image`` (``predicted``). The loss is cross-entropy on the
classifiers' logits and the mean of the U-Net's output map.

Usage::

    python benchmarks/memory_plan_accuracy.py                          # ~8 min on 2 cores
    python benchmarks/memory_plan_accuracy.py --docs docs/memory.md    # also update the tables
    python benchmarks/memory_plan_accuracy.py --models vgg --tiles 256 --variants default

Results go to ``benchmarks/results/memory_plan_accuracy.json``; the planning-time table comes
from ResNet-18/50 programs at 8192², tile 2048 (``--no-planning-time`` skips it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 2**20
#: runtime settings measured: name -> StreamingModel keyword arguments (``default``: what users
#: run; ``lean``: no arena, glibc's mmap threshold pinned, so freed tensors go back to the system)
VARIANTS: dict[str, dict] = {
    "default": {},
    "lean": {"allocator": "system"},
}
#: variants that also change RuntimeOptions fields (set before the first run)
OPTION_VARIANTS: dict[str, dict] = {
    "shrink": {"shrink_arena": True},
    "no-shrink": {"shrink_arena": False},
    "reserve2g": {"arena_reserve": 2**31 - 1, "arena_extend": "pow2"},
    "reserve512m": {"arena_reserve": 2**29, "arena_extend": "pow2"},
    "reserve256m": {"arena_reserve": 2**28, "arena_extend": "pow2"},
    "reserve1g": {"arena_reserve": 2**30, "arena_extend": "pow2"},
    "pow2": {"arena_extend": "pow2"},
}
#: model: (image size, tile sizes)
CASES = {
    "resnet18": (1024, [640, 768, 1024]),
    "vgg": (1024, [256, 512, 1024]),
    "unet": (1024, [256, 512, 1024]),
}
#: the full-scale check: ResNet-18 at width 64 (``--models resnet18w64``; ~4 min)
FULL_SCALE = (4096, [2048])


# ------------------------------------------------------------------------------------------------
# Models (torch, from the shared zoo)


def build_module(name: str):
    """The torch module of a benchmark model, eval mode, BatchNorm randomised."""
    import torch

    from zoo import BasicBlock, ResNet, randomize_batchnorm
    from zoo.models import UNetish, VGGish

    torch.manual_seed(0)
    if name == "resnet18":
        module = ResNet(BasicBlock, [2, 2, 2, 2], classes=10, width=32)
    elif name == "resnet18w64":
        module = ResNet(BasicBlock, [2, 2, 2, 2], classes=2, width=64)
    else:
        module = {"vgg": VGGish, "unet": UNetish}[name]()
    return randomize_batchnorm(module).eval()


def export(name: str, size: int):
    """The model exported at ``size``² (static shapes); above 1024² exported at 512² with
    dynamic spatial axes instead (tracing runs a full-image forward in torch)."""
    from streamc.export import export_torch

    if size > 1024:
        return export_torch(build_module(name), (1, 3, 512, 512), dynamic=True)
    return export_torch(build_module(name), (1, 3, size, size), dynamic=False)


# ------------------------------------------------------------------------------------------------
# Measuring child


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(line.split()[1]) * 1024
    return out


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child_step(program_dir: str, variant: str, steps: int = 2) -> dict:
    """Training steps of a program through ``StreamingModel`` with the runtime settings of
    ``variant``, in this (fresh) process; peak RSS growth in bytes over the first step and over
    all of them, and the RSS growth left after the last."""
    import torch

    from streamc.program import load
    from streamc.runtime.module import StreamingModel

    program = load(program_dir)
    model = StreamingModel(program, progress=False, **VARIANTS.get(variant, {}))
    if variant in OPTION_VARIANTS:
        import dataclasses

        model._runtime.options = dataclasses.replace(model._runtime.options,
                                                      **OPTION_VARIANTS[variant])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    image = torch.randn(program.input_shape)
    label = torch.zeros(program.input_shape[0], dtype=torch.long)
    gc.collect()
    _reset_hwm()
    base = _status()["VmRSS"]
    peaks, seconds = [], []
    for _ in range(steps):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        out = model(image)
        if out.dim() == 2:  # logits
            loss = torch.nn.functional.cross_entropy(out, label)
        else:
            loss = out.mean()
        loss.backward()
        optimizer.step()
        del out, loss
        seconds.append(round(time.perf_counter() - started, 2))
        peaks.append(_status()["VmHWM"] - base)
    return {"first_step": peaks[0], "steps": max(peaks), "after": _status()["VmRSS"] - base,
            "seconds": seconds}


def run_child(args: list[str]) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          env=env)
    if proc.returncode:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# The benchmark


def planning_time(image: int = 8192, tile: int = 2048, repeat: int = 3) -> list[dict]:
    """CPU seconds of :func:`plan_program` on ResNet-18 and ResNet-50 programs (median)."""
    from streamc.compiler import compile
    from streamc.export import export_torch
    from streamc.passes.memory import plan_program
    from zoo import randomize_batchnorm, resnet18, resnet50

    rows = []
    for name, factory in (("resnet18", resnet18), ("resnet50", resnet50)):
        model = export_torch(randomize_batchnorm(factory()), (1, 3, 224, 224))
        program = compile(model, tile=tile, image=(image, image), with_memory_plan=False)
        times = []
        for _ in range(repeat):
            started = time.process_time()
            plan_program(program)
            times.append(time.process_time() - started)
        rows.append({
            "model": name, "image": image, "tile": tile, "classes": len(program.classes),
            "nodes": sum(len(g.graph.node) for g in program.graphs.values()),
            "plan_cpu_s": round(sorted(times)[len(times) // 2], 3),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CASES),
                        help="comma-separated subset of CASES, or resnet18w64 (full width, "
                        f"{FULL_SCALE[0]}², tile {FULL_SCALE[1][0]}; not in the default run)")
    parser.add_argument("--tiles", default=None, help="comma-separated tile sizes (all models)")
    parser.add_argument("--image", type=int, default=None, help="image size (all models)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--keep-tiles", type=int, default=None,
                        help="compile with keep_tiles=N (N tiles keep their activations)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join([*VARIANTS, *OPTION_VARIANTS])}")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/memory_plan_accuracy.json"))
    parser.add_argument("--docs", default=None, help="update the results tables in this file")
    parser.add_argument("--tables-from", default=None,
                        help="only rewrite the --docs tables from this results JSON")
    parser.add_argument("--no-planning-time", action="store_true")
    args = parser.parse_args()
    if args.tables_from:
        report = json.loads(Path(args.tables_from).read_text())
        print(markdown_table(report))
        if args.docs:
            update_docs(Path(args.docs), markdown_table(report), planning_table(report))
        return

    from streamc.compiler import compile
    from streamc.passes.memory import plan_program
    from streamc.units import format_bytes

    rows = []
    load = [os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="streamc-bench-") as tmp:
        for name in args.models.split(","):
            size, tiles = CASES[name] if name in CASES else FULL_SCALE
            size = args.image or size
            if args.tiles:
                tiles = [int(t) for t in args.tiles.split(",")]
            model = export(name, size)
            for tile in tiles:
                program = compile(model, tile=tile, image=(size, size), with_flops=True,
                                  with_memory_plan=False, keep_tiles=args.keep_tiles)
                directory = Path(tmp) / f"{name}_{tile}"
                program.save(directory)
                # The default runtime policy (constant folding in forward graphs only), plain
                # SGD's state.
                plan = plan_program(program, optimizer_copies=0)
                exact = plan_program(program, optimizer_copies=0, exact=True)
                r = plan.resident
                row = {
                    "model": name, "image": size, "tile": tile,
                    "grid": list(program.meta.grid),
                    "classes": len(program.classes), "tiles": len(program.tiles),
                    "kept_tiles": program.meta.kept_tiles,
                    "overhead": round(program.meta.flops.overhead, 3),
                    "plan_peak": plan.peak, "plan_phase": plan.peak_phase,
                    "resident": r.to_dict(),
                    "predicted": plan.peak - r.parameters - r.image,
                    "predicted_exact": exact.peak - r.parameters - r.image,
                    "exact_phase": exact.peak_phase,
                }
                del program
                row["measured"] = {}
                for variant in args.variants.split(","):
                    m = run_child(["--child", str(directory), variant, str(args.steps)])
                    row["measured"][variant] = m
                    load.append(os.getloadavg())
                    print(f"{name} {size}² tile {tile} ({row['tiles']} tiles, "
                          f"{row['classes']} classes) [{variant}]: predicted "
                          f"{format_bytes(row['predicted'])} at {row['plan_phase']}, measured "
                          f"{format_bytes(m['first_step'])} (step 1) / "
                          f"{format_bytes(m['steps'])} (steps), ratio "
                          f"{m['steps'] / row['predicted']:.2f}, RSS after "
                          f"{format_bytes(m['after'])}, {m['seconds']} s", flush=True)
                rows.append(row)
    planning = None if args.no_planning_time else planning_time()
    import onnxruntime

    report = {
        "command": " ".join(["python benchmarks/memory_plan_accuracy.py", *sys.argv[1:]]),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "onnxruntime": onnxruntime.__version__, "platform": platform.platform()},
        "load_average_1min": [round(x[0], 2) for x in load],
        "rows": rows,
        "planning": planning,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    table = markdown_table(report)
    print(table)
    if planning:
        print(planning_table(report))
    if args.docs:
        update_docs(Path(args.docs), table, planning_table(report))


def markdown_table(report: dict) -> str:
    """The accuracy table (MiB) for docs/memory.md, each runtime variant: the first step, the
    peak over all steps (what the ratios compare: the plan describes a step once the fed
    sessions exist) and what stays after the last."""
    variants = [v for v in [*VARIANTS, *OPTION_VARIANTS]
                if any(v in r["measured"] for r in report["rows"])]
    head = "| model | image | tile | tiles (classes) | recompute | predicted | at | exact |"
    rule = "|---|---|---|---|---|---|---|---|"
    for v in variants:
        head += f" {v} step 1 | {v} all steps | ratio | ratio (exact) | {v} after | {v} s |"
        rule += "---|---|---|---|---|---|"
    lines = [head, rule]
    for r in report["rows"]:
        line = (f"| {r['model']} | {r['image']}² | {r['tile']} | {r['tiles']} ({r['classes']}) "
                f"| {r['overhead']:.2f} | {r['predicted'] / MiB:.1f} | {r['plan_phase']} "
                f"| {r['predicted_exact'] / MiB:.1f} |")
        for v in variants:
            m = r["measured"].get(v)
            line += (f" {m['first_step'] / MiB:.1f} | {m['steps'] / MiB:.1f} "
                     f"| {m['steps'] / r['predicted']:.2f} "
                     f"| {m['steps'] / r['predicted_exact']:.2f} "
                     f"| {m['after'] / MiB:.1f} | {m['seconds'][0]} |" if m else " | | | | | |")
        lines.append(line)
    return "\n".join(lines)


def planning_table(report: dict) -> str:
    """Planning time on the ResNet programs, for docs/memory.md."""
    rows = report.get("planning")
    if not rows:
        return ""
    lines = ["| model | image | tile | classes | nodes (all graphs) | plan CPU s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['image']}² | {r['tile']} | {r['classes']} "
                     f"| {r['nodes']} | {r['plan_cpu_s']} |")
    return "\n".join(lines)


def _replace_between(text: str, name: str, body: str, path: Path) -> str:
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{path} has no {begin} ... {end} markers")
    before, rest = text.split(begin, 1)
    _, after = rest.split(end, 1)
    return before + begin + "\n" + body + "\n" + end + after


def update_docs(path: Path, table: str, planning: str = "") -> None:
    text = _replace_between(path.read_text(), "accuracy-table", table, path)
    if planning:
        text = _replace_between(text, "planning-table", planning, path)
    path.write_text(text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child_step(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    else:
        main()
