"""Predicted against measured peak memory of one training step (issue 6).

For three CNNs defined here (a ResNet-ish, a VGG-ish and a U-Net-ish, exported from torch) at
1024x1024 and three tile sizes each, this script compiles a program, plans it with
:func:`streamc.passes.memory_plan.plan_program` (fast plan, and the exact plan of the graphs
ONNX Runtime really runs), then measures the peak resident-set growth of a fresh process
running one training step with :meth:`streamc.runtime.executor.ProgramExecutor.run` plus
Adam's state, under several ONNX Runtime / glibc configurations:

- ``lean``: ``ORT_ENABLE_ALL`` (the executor's level), CPU arena off, memory pattern off, and
  glibc's mmap threshold pinned (``MALLOC_MMAP_THRESHOLD_=65536``) so that freed tensors go
  back to the system. The plan's ``peak`` is the prediction for this configuration.
- ``lean-noopt``: ``lean`` with ``ORT_DISABLE_ALL``: ORT runs the graphs as written, in its
  default order, which the fast plan models exactly.
- ``lean-glibc``: ``lean`` without pinning glibc's threshold (heap fragmentation shows).
- ``pattern``: ``lean`` with ORT's memory-pattern optimisation on.
- ``ort-default``: the executor's default :class:`SessionFactory` (CPU arena on in every
  session, memory pattern on); compared with the plan's ``session_arenas`` figure.

Measuring: the child process loads the program, builds every session, copies the parameters,
then resets the high-water mark (``echo 5 > /proc/self/clear_refs``) and records VmRSS as the
baseline; it allocates the image and Adam's two moments, runs the step, and reads VmHWM. The
measured figure is VmHWM - baseline. The sessions' constants are in the baseline, so the
prediction compared is ``plan.peak - resident.constants`` (``predicted`` below; ``exact``
from ``plan_program(..., exact=True)``; for ``ort-default``, ``plan.session_arenas`` likewise).

It also measures conventional full-image training of the same torch modules (forward, backward,
Adam step; same protocol) against :func:`plan_conventional`, and times planning on a
ResNet-50-sized graph.

Usage::

    python benchmarks/memory_plan_accuracy.py              # everything (~15 min on 2 cores)
    python benchmarks/memory_plan_accuracy.py --quick      # 512x512, fewer configurations
    python benchmarks/memory_plan_accuracy.py --docs docs/memory.md   # also update the table

Results go to ``benchmarks/results/memory_plan_accuracy.json``.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 2**20
PINNED = {"MALLOC_MMAP_THRESHOLD_": "65536"}
CONFIGS = {
    # name: (enable_cpu_mem_arena, enable_mem_pattern, environment, graph optimisation level)
    "lean": (False, False, PINNED, "all"),
    "lean-noopt": (False, False, PINNED, "none"),
    "lean-glibc": (False, False, {}, "all"),
    "pattern": (False, True, PINNED, "all"),
    "ort-default": (True, True, PINNED, "all"),
}


# ------------------------------------------------------------------------------------------------
# Models (torch); imported lazily so that the measuring children stay lean


def build_module(name: str):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return self.relu(y + (x if self.down is None else self.down(x)))

    class ResNetish(nn.Module):
        """7x7/2 stem, BN, ReLU, maxpool/2, two blocks at 32 ch, two at 64 ch (/2), GAP, FC."""

        def __init__(self, w: int = 32) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, w, 7, 2, 3, bias=False), nn.BatchNorm2d(w),
                                      nn.ReLU(), nn.MaxPool2d(3, 2, 1))
            self.layer1 = nn.Sequential(Block(w, w), Block(w, w))
            self.layer2 = nn.Sequential(Block(w, 2 * w, 2), Block(2 * w, 2 * w))
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(2 * w, 10)

        def forward(self, x):
            x = self.layer2(self.layer1(self.stem(x)))
            return self.fc(torch.flatten(self.pool(x), 1))

    class VGGish(nn.Module):
        """conv-ReLU x2 at 32 ch, maxpool, x2 at 64 ch, maxpool, conv 64, GAP, FC."""

        def __init__(self, w: int = 32) -> None:
            super().__init__()

            def c(a, b):
                return [nn.Conv2d(a, b, 3, padding=1), nn.ReLU()]

            self.features = nn.Sequential(*c(3, w), *c(w, w), nn.MaxPool2d(2), *c(w, 2 * w),
                                          *c(2 * w, 2 * w), nn.MaxPool2d(2), *c(2 * w, 2 * w))
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(2 * w, 10)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.features(x)), 1))

    class UNetish(nn.Module):
        """Two-level U-Net (16/32/64 ch), nearest upsampling, skip concatenations; the output is
        a full-resolution 2-channel map (the whole network is the prefix)."""

        def __init__(self, w: int = 16) -> None:
            super().__init__()

            def c(a, b):
                return nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(b, b, 3, padding=1), nn.ReLU())

            self.e1, self.e2, self.b = c(3, w), c(w, 2 * w), c(2 * w, 4 * w)
            self.pool = nn.MaxPool2d(2)
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.d2, self.d1 = c(6 * w, 2 * w), c(3 * w, w)
            self.out = nn.Conv2d(w, 2, 1)

        def forward(self, x):
            s1 = self.e1(x)
            s2 = self.e2(self.pool(s1))
            y = self.b(self.pool(s2))
            y = self.d2(torch.cat([self.up(y), s2], 1))
            return self.out(self.d1(torch.cat([self.up(y), s1], 1)))

    torch.manual_seed(0)
    module = {"resnet": ResNetish, "vgg": VGGish, "unet": UNetish}[name]()
    g = torch.Generator().manual_seed(1)
    for mod in module.modules():  # non-trivial BN, so that torch keeps every initializer
        if isinstance(mod, nn.BatchNorm2d):
            n = mod.num_features
            with torch.no_grad():
                mod.weight.copy_(1 + 0.1 * torch.randn(n, generator=g))
                mod.bias.copy_(0.1 * torch.randn(n, generator=g))
                mod.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                mod.running_var.copy_(1 + 0.1 * torch.rand(n, generator=g))
    return module.eval()


def export(module, size: int):
    import onnx
    import torch

    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, 3, size, size),), f, dynamo=False,
                          opset_version=17, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.EVAL, input_names=["image"],
                          output_names=["out"])
    return onnx.load_model_from_string(f.getvalue())


# ------------------------------------------------------------------------------------------------
# Measuring children


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


def child_step(program_dir: str, config: str) -> dict:
    """One training step of a program in this (fresh) process; peak RSS growth in bytes."""
    import onnxruntime as ort

    from streamc.program import load
    from streamc.runtime.executor import ProgramExecutor, SessionFactory

    arena, pattern, _env, level = CONFIGS[config]

    def lean_factory(data: bytes):
        options = ort.SessionOptions()
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                                            if level == "all"
                                            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        options.log_severity_level = 3
        options.enable_cpu_mem_arena = arena
        options.enable_mem_pattern = pattern
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])

    program = load(program_dir)
    factory = SessionFactory() if config == "ort-default" else lean_factory
    executor = ProgramExecutor(program, factory)
    for relative in program.graphs:
        executor.session(relative)
    head = program.graphs[program.meta["head"]["forward"]]
    shapes = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim]
              for o in head.graph.output}
    params = {k: v.copy() for k, v in program.parameters.items()}
    gc.collect()
    _reset_hwm()
    base = _status()["VmRSS"]
    image = np.empty(program.input_shape, np.float32)
    np.random.default_rng(0).standard_normal(out=image, dtype=np.float32)  # no temporaries
    trainable = [p["name"] for p in program.meta["parameters"] if p["trainable"]]
    adam = [np.ones_like(params[k]) for k in trainable for _ in range(2)]
    output_grads = {out: np.ones(shapes[g], np.float32)
                    for out, g in program.meta["head"]["outputs"].items()}
    started = time.perf_counter()
    _outputs, grads = executor.run(image, params, output_grads)
    seconds = time.perf_counter() - started
    after = _status()
    del adam, grads
    return {"measured": after["VmHWM"] - base, "seconds": round(seconds, 2)}


def child_torch(model: str, size: int) -> dict:
    """Conventional training: forward, backward and an Adam step of the torch module."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    module = build_module(model)
    for p in module.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    gc.collect()
    _reset_hwm()
    base = _status()["VmRSS"]
    image = torch.randn(1, 3, size, size)
    started = time.perf_counter()
    out = module(image)
    out.float().sum().backward()
    optimizer.step()
    seconds = time.perf_counter() - started
    after = _status()
    return {"measured": after["VmHWM"] - base, "seconds": round(seconds, 2)}


def run_child(args: list[str], env: dict[str, str]) -> dict:
    full_env = dict(os.environ, **env)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          env=full_env)
    if proc.returncode:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# The benchmark


def resnet50_planning_time() -> dict:
    """Planning time on a ResNet-50-sized graph (bottlenecks [3, 4, 6, 3], 53 convolutions)."""
    import torch
    from torch import nn

    from streamc.compiler import compile
    from streamc.passes.memory_plan import plan_conventional, plan_program

    class Bottleneck(nn.Module):
        def __init__(self, cin, mid, stride=1):
            super().__init__()
            cout = mid * 4
            self.c1, self.b1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
            self.c2, self.b2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
            self.c3, self.b3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.relu(self.b1(self.c1(x)))
            y = self.relu(self.b2(self.c2(y)))
            y = self.b3(self.c3(y))
            return self.relu(y + (x if self.down is None else self.down(x)))

    layers, cin = [], 64
    for mid, n, s in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        for i in range(n):
            layers.append(Bottleneck(cin, mid, s if i == 0 else 1))
            cin = mid * 4
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                           nn.MaxPool2d(3, 2, 1), *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(2048, 1000))
    g = torch.Generator().manual_seed(1)
    for mod in module.modules():
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                mod.weight.copy_(1 + 0.1 * torch.randn(mod.num_features, generator=g))
                mod.running_var.copy_(1 + 0.1 * torch.rand(mod.num_features, generator=g))
    model = export(module.eval(), 1024)
    results = {}
    for tile in (1024, 512):
        started = time.perf_counter()
        program = compile(model, tile=tile, image=(1024, 1024), with_flops=False)
        compile_s = time.perf_counter() - started
        timings = {}
        for order in ("ort", "worst"):
            started = time.perf_counter()
            plan = plan_program(program, order=order)
            timings[order] = round(time.perf_counter() - started, 3)
        cls = program.classes[0]
        results[str(tile)] = {
            "classes": len(program.classes),
            "tiles": len(program.tiles),
            "forward_nodes": len(program.graphs[cls["forward"]].graph.node),
            "backward_nodes": len(program.graphs[cls["backward"]].graph.node),
            "compile_seconds": round(compile_s, 2),
            "plan_seconds": timings,
            "plan_seconds_per_class": {k: round(v / len(program.classes), 3)
                                       for k, v in timings.items()},
            "peak": plan.peak,
        }
    started = time.perf_counter()
    plan_conventional(model, (1024, 1024))
    results["conventional_seconds"] = round(time.perf_counter() - started, 3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512x512, lean configs only")
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated subset of {','.join(CONFIGS)}")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/memory_plan_accuracy.json"))
    parser.add_argument("--docs", default=None, help="update the results tables in this file")
    parser.add_argument("--tables-from", default=None,
                        help="only rewrite the --docs tables from this results JSON")
    parser.add_argument("--no-torch", action="store_true", help="skip conventional torch runs")
    parser.add_argument("--no-resnet50", action="store_true", help="skip the planning timing")
    args = parser.parse_args()
    if args.tables_from:
        report = json.loads(Path(args.tables_from).read_text())
        print(markdown_table(report))
        if args.docs:
            update_docs(Path(args.docs), markdown_table(report), planning_table(report))
        return

    from streamc.compiler import compile
    from streamc.passes.memory_plan import format_size, plan_conventional, plan_program

    size = 512 if args.quick else 1024
    tiles = [128, 256, 512] if args.quick else [256, 512, 1024]
    configs = args.configs.split(",") if args.configs else (
        ["lean", "lean-glibc"] if args.quick else list(CONFIGS))
    rows = []
    conventional_rows = []
    with tempfile.TemporaryDirectory(prefix="streamc-bench-") as tmp:
        for name in ("resnet", "vgg", "unet"):
            model = export(build_module(name), size)
            conventional = plan_conventional(model, (size, size))
            if not args.no_torch:
                torch_measured = run_child(["--torch-child", name, str(size)], PINNED)
                predicted = conventional.total - conventional.parameters
                conventional_rows.append({
                    "model": name, "image": size, "predicted": predicted,
                    "measured": torch_measured["measured"],
                    "ratio": round(torch_measured["measured"] / predicted, 3),
                    "seconds": torch_measured["seconds"],
                })
                print(f"{name} {size}: conventional predicted {format_size(predicted)}, torch "
                      f"measured {format_size(torch_measured['measured'])}", flush=True)
            for tile in tiles:
                program = compile(model, tile=tile, image=(size, size), with_flops=True)
                directory = Path(tmp) / f"{name}_{tile}"
                program.save(directory)
                started = time.perf_counter()
                plan = plan_program(program, conventional)
                plan_s = time.perf_counter() - started
                started = time.perf_counter()
                exact = plan_program(program, conventional, exact=True)
                exact_s = time.perf_counter() - started
                row = {
                    "model": name, "image": size, "tile": tile,
                    "grid": program.meta["grid"], "classes": len(program.classes),
                    "tiles": len(program.tiles),
                    "overhead": round(
                        (program.meta["flops"]["tiled_forward"]
                         + program.meta["flops"]["tiled_backward"])
                        / (program.meta["flops"]["untiled_forward"]
                           + program.meta["flops"]["untiled_backward"]), 3),
                    "plan_peak": plan.peak, "plan_phase": plan.peak_phase,
                    "constants": plan.resident.constants,
                    "predicted": plan.peak - plan.resident.constants,
                    "predicted_exact": exact.peak - exact.resident.constants,
                    "predicted_arenas": plan.session_arenas - plan.resident.constants,
                    "conventional": conventional.total,
                    "plan_seconds": round(plan_s, 3), "exact_plan_seconds": round(exact_s, 2),
                    "measured": {},
                }
                for config in configs:
                    result = run_child(["--child", str(directory), config], CONFIGS[config][2])
                    row["measured"][config] = result
                    reference = row["predicted_arenas"] if config == "ort-default" \
                        else row["predicted"]
                    print(f"{name} {size} tile {tile} [{config}]: predicted "
                          f"{format_size(reference)} (exact {format_size(row['predicted_exact'])})"
                          f", measured {format_size(result['measured'])}, ratio "
                          f"{result['measured'] / reference:.3f}, step {result['seconds']} s",
                          flush=True)
                rows.append(row)
    resnet50 = None if args.no_resnet50 else resnet50_planning_time()
    if resnet50:
        print("ResNet-50-sized planning:", json.dumps(resnet50))
    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:  # pragma: no cover
        ort_version = None
    report = {
        "command": "python benchmarks/memory_plan_accuracy.py" + (" --quick" if args.quick else ""),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "onnxruntime": ort_version, "platform": platform.platform()},
        "configs": {k: {"cpu_mem_arena": v[0], "mem_pattern": v[1], "env": v[2],
                        "graph_optimization": v[3]}
                    for k, v in CONFIGS.items() if k in configs},
        "rows": rows,
        "conventional": conventional_rows,
        "resnet50_planning": resnet50,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    table = markdown_table(report)
    print(table)
    if args.docs:
        update_docs(Path(args.docs), table, planning_table(report))


def markdown_table(report: dict) -> str:
    """The tables (MiB) for docs/memory.md: accuracy, then the effect of each configuration."""
    configs = list(report["configs"])
    rows = report["rows"]

    def ratio(r: dict, config: str, key: str) -> str:
        m = r["measured"].get(config)
        return f"{m['measured'] / r[key]:.2f}" if m else ""

    def mib(r: dict, config: str) -> str:
        m = r["measured"].get(config)
        return f"{m['measured'] / MiB:.1f}" if m else ""

    lines = [
        "| model | image | tile | tiles (classes) | recompute | predicted | exact "
        "| measured lean | ratio | ratio (exact) | measured lean-noopt | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['image']}² | {r['tile']} | {r['tiles']} ({r['classes']}) "
            f"| {r['overhead']:.2f} | {r['predicted'] / MiB:.1f} "
            f"| {r['predicted_exact'] / MiB:.1f} "
            f"| {mib(r, 'lean')} | {ratio(r, 'lean', 'predicted')} "
            f"| {ratio(r, 'lean', 'predicted_exact')} | {mib(r, 'lean-noopt')} "
            f"| {ratio(r, 'lean-noopt', 'predicted')} |")
    lines += ["", "| model | tile | " + " | ".join(f"{c} MiB (s/step)" for c in configs)
              + " | ort-default / session_arenas |",
              "|---|---|" + "---|" * len(configs) + "---|"]
    for r in rows:
        cells = []
        for c in configs:
            m = r["measured"].get(c)
            cells.append(f"{m['measured'] / MiB:.1f} ({m['seconds']:.1f})" if m else "")
        lines.append(f"| {r['model']} | {r['tile']} | " + " | ".join(cells)
                     + f" | {ratio(r, 'ort-default', 'predicted_arenas')} |")
    if report.get("conventional"):
        lines += ["", "| model | image | conventional predicted | torch measured | ratio |",
                  "|---|---|---|---|---|"]
        for r in report["conventional"]:
            lines.append(f"| {r['model']} | {r['image']}² | {r['predicted'] / MiB:.1f} | "
                         f"{r['measured'] / MiB:.1f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def planning_table(report: dict) -> str:
    """Planning time on the ResNet-50-sized model, for docs/memory.md."""
    r = report.get("resnet50_planning")
    if not r:
        return ""
    lines = ["| tile | classes | nodes per class (fwd + bwd) | compile s | plan s (order ort) "
             "| plan s (worst) | per class s (worst) |", "|---|---|---|---|---|---|---|"]
    for tile in ("1024", "512"):
        t = r[tile]
        lines.append(f"| {tile} | {t['classes']} | {t['forward_nodes']} + {t['backward_nodes']} "
                     f"| {t['compile_seconds']} | {t['plan_seconds']['ort']} "
                     f"| {t['plan_seconds']['worst']} | {t['plan_seconds_per_class']['worst']} |")
    lines.append(f"\nConventional figure (`plan_conventional`, whole model at 1024²): "
                 f"{r['conventional_seconds']} s.")
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
        print(json.dumps(child_step(sys.argv[2], sys.argv[3])))
    elif len(sys.argv) > 1 and sys.argv[1] == "--torch-child":
        print(json.dumps(child_torch(sys.argv[2], int(sys.argv[3]))))
    else:
        main()
