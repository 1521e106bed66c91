"""Real model zoos through streamc: timm and MONAI networks with whole-image statistics inside.

    python -m benchmarks.zoo_models                      # every part, every model (~1-2 h)
    python -m benchmarks.zoo_models --parts exact,plan   # the fast parts
    python -m benchmarks.zoo_models --models efficientnet_b0 --parts measure

Needs timm 1.0.31 and MONAI 1.6.1, installed without touching torch::

    pip install --no-deps timm==1.0.31 torchvision==0.28.0 huggingface_hub safetensors pyyaml \\
        pillow monai==1.6.1

(the local torchvision wheel is a CUDA build; ``/work/shared/scripts/timm_shim.py``, or any copy
of it on ``sys.path`` as ``timm_shim``, lets timm import it beside CPU torch). Models are built
without pretrained weights, their norms, biases and BatchNorm statistics randomised
(:func:`zoo.randomize_parameters`) so the exporter keeps every parameter apart, exported with
:func:`streamc.export_torch` at a small size with dynamic spatial axes, and compiled at each
part's size. Parts:

- ``exact``: one training step through :class:`~streamc.StreamingModel` (loss ``Σ y ⊙ c``,
  ``c`` uniform in [0.5, 1.5]) against torch autograd on the original module at a size with
  several tiles: the output and every weight gradient, relative error against torch float64
  (on the scale of the tensor's float64 gradient, floored at 1e-6 of the largest: an exactly
  zero gradient is compared as noise on that scale), and the ratio to torch float32's own error
  (the bound: 10x; errors under 1e-5 pass outright). torch float32's own error is the largest
  over ``FLOAT32_EVALUATIONS`` float32 evaluations: the module as given and with its weights
  and image moved by up to one ulp (the table also gives the one unperturbed run's).
  ``--seeds`` repeats it for other images and cotangents; ``--one-tile`` also runs the model
  compiled as one tile, which separates what tiling adds from what ONNX Runtime's float32
  arithmetic does. ``c`` has one sign on
  purpose: with random signs, a weight gradient of a 3-D segmentation net is a sum of ~10⁶
  cancelling terms only ~√N times one term, and a single ReLU/PReLU input that float32
  rounding moves across zero (in torch's float32 run as in ours: both are ~1e-6 off float64)
  changes it by ~1e-3; the bound would then measure luck. It still could, less often, with
  one sign (hard-swish kinks, per-channel sums that cancel): hence the seeds, and the several
  float32 evaluations.
- ``plan``: at 4096² (256³ for 3-D) the stages, the predicted peak of a training step
  (:mod:`streamc.passes.memory`, Adam's state) against conventional training's, FLOP overhead.
- ``measure``: one training step of that program in a fresh process, peak RSS growth against
  the plan as ``benchmarks/memory_plan_accuracy.py`` defines it (``predicted = plan.peak −
  parameters − image``, SGD's state), for the lean (``allocator="system"``) and default runtime;
  not run when the prediction exceeds the memory available. ``--measure-size 2048:512``
  measures at another size (a row of its own).
- ``speed``: one size where torch fits (1024², 128³): a training step of torch and of streamc,
  each in its own process, side by side (seconds, peak RSS), with FLOP overhead and stages.

Results: ``benchmarks/results/zoo_models.json`` and ``zoo_models.md`` (merged per part/model).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
MiB = 2**20

#: name -> (library, input channels, spatial dims, exact (size, tile), plan (size, tile),
#:          speed (size, tile))
MODELS: dict[str, tuple] = {
    "convnext_atto": ("timm", 3, 2, (2048, 512), (4096, 2048), (2048, 1536)),
    "efficientnet_b0": ("timm", 3, 2, (512, 128), (4096, 1024), (1024, 512)),
    "mobilenetv3_large_100": ("timm", 3, 2, (512, 128), (4096, 1024), (1024, 512)),
    "regnety_002": ("timm", 3, 2, (512, 128), (4096, 1024), (1024, 512)),
    "basicunet": ("monai", 1, 2, (256, 64), (4096, 1024), (1024, 512)),
    "segresnet_3d": ("monai", 1, 3, (64, 16), (256, 64), (128, 64)),
    "unet_3d": ("monai", 1, 3, (64, 16), (256, 64), (128, 64)),
}
#: The issue's bound on a gradient's error: this many times torch float32's own error.
FLOAT32_FACTOR = 10.0
#: torch float32's own error is the largest over this many float32 evaluations of the module:
#: as given, and with every weight and the image moved by up to one ulp (float32 rounding of
#: the inputs themselves). One evaluation is one draw: a pre-activation within float32 noise of
#: a kink flips in some evaluations and not in others.
FLOAT32_EVALUATIONS = 8


# ------------------------------------------------------------------------------------------------
# Models


def _import_timm():
    warnings.filterwarnings("ignore")
    for path in (Path("/work/shared/scripts"), ROOT.parent / "shared" / "scripts"):
        if (path / "timm_shim.py").exists() and str(path) not in sys.path:
            sys.path.insert(0, str(path))
    try:
        import timm_shim  # noqa: F401  (lets the CUDA torchvision wheel import beside CPU torch)
    except ImportError:
        pass
    import timm

    return timm


def build_module(name: str):
    """The torch module of ``name``: no pretrained weights, parameters randomised, eval mode."""
    import torch

    from zoo import randomize_parameters

    library = MODELS[name][0]
    torch.manual_seed(0)
    if library == "timm":
        module = _import_timm().create_model(name, pretrained=False, num_classes=2)
    else:
        from monai.networks import nets

        if name == "basicunet":
            module = nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2,
                                    norm=("instance", {"affine": True}))
        elif name == "segresnet_3d":
            module = nets.SegResNet(spatial_dims=3, in_channels=1, out_channels=2,
                                    init_filters=8)
        else:
            module = nets.UNet(spatial_dims=3, in_channels=1, out_channels=2,
                               channels=(16, 32, 64, 128), strides=(2, 2, 2),
                               num_res_units=2)
    return randomize_parameters(module)


def shape_of(name: str, size: int) -> tuple[int, ...]:
    _, channels, dims, *_ = MODELS[name]
    return (1, channels) + (size,) * dims


def export(name: str, module):
    """Exported at a small size (64², 32³) with dynamic spatial axes."""
    from streamc.export import export_torch

    dims = MODELS[name][2]
    return export_torch(copy.deepcopy(module), shape_of(name, 64 if dims == 2 else 32),
                        dynamic=True)


def _loss(out, cotangent):
    return (out * cotangent).sum()


# ------------------------------------------------------------------------------------------------
# Parts


def _streamed_step(program, image, seed: int) -> tuple[dict, object, float]:
    """(output and weight gradients by name, the cotangent, seconds) of one StreamingModel
    step of ``program``."""
    import numpy as np
    import torch

    from streamc.runtime.module import StreamingModel

    model = StreamingModel(program, threads=2, progress=False)
    started = time.perf_counter()
    out = model(image)
    cotangent = torch.from_numpy(np.random.default_rng(seed + 1).uniform(
        0.5, 1.5, tuple(out.shape)).astype(np.float32))
    _loss(out, cotangent).backward()
    seconds = time.perf_counter() - started
    values = {"output": out.detach().double()}
    values.update({k: p.grad.double() for k, p in model.onnx_parameters.items()})
    return values, cotangent, seconds


def part_exact(name: str, seed: int = 0, one_tile: bool = False) -> dict:
    """One StreamingModel training step against torch autograd (float64 reference); with
    ``one_tile``, also against the same model compiled as one tile (what tiling adds)."""
    import numpy as np
    import torch

    from streamc.compiler import compile as compile_program

    size, tile = MODELS[name][3]
    module = build_module(name)
    model_proto = export(name, module)
    program = compile_program(model_proto, tile=tile, image=shape_of(name, size)[2:],
                              with_memory_plan=False)
    halo = program.meta.halo
    image = torch.from_numpy(np.random.default_rng(seed).standard_normal(
        shape_of(name, size)).astype(np.float32))
    streamed, cotangent, seconds = _streamed_step(program, image, seed)

    def reference(dtype, nudge: int | None = None):
        m = copy.deepcopy(module).to(dtype)
        x = image.to(dtype)
        if nudge is not None:  # another float32 evaluation: inputs moved by up to one ulp
            generator = torch.Generator().manual_seed(nudge)

            def moved(t):
                u = torch.rand(t.shape, generator=generator, dtype=torch.float64) * 2 - 1
                return (t.double() * (1 + u * 2.0**-23)).to(dtype)

            with torch.no_grad():
                for p in m.parameters():
                    p.copy_(moved(p))
            x = moved(x)
        y = m(x)
        _loss(y, cotangent.to(dtype)).backward()
        values = {"output": y.detach().double()}
        values.update({k: p.grad.double() for k, p in m.named_parameters()
                       if p.grad is not None})
        return values

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact, single = reference(torch.float64), reference(torch.float32)
        others = [reference(torch.float32, nudge=k) for k in range(1, FLOAT32_EVALUATIONS)]

    # A tensor's error is on the scale of its float64 gradient, floored at 1e-6 of the largest
    # one: a gradient that is zero exactly (a bias before a normalisation) is float32 noise in
    # torch as in streamc, and relative to itself that noise would be ~1e9.
    floor = 1e-6 * max(v.abs().max().item() for v in exact.values())

    def rel(a, b):
        return (a - b).abs().max().item() / max(b.abs().max().item(), floor)

    missing = sorted(set(exact) - set(streamed))
    rows = {}
    plain = {}  # torch float32's error in its one unperturbed run
    for key, value in exact.items():
        if key not in streamed:
            continue
        plain[key] = rel(single[key], value)
        own = max([plain[key]] + [rel(o[key], value) for o in others])
        rows[key] = (rel(streamed[key], value), own)
    worst_key = max(rows, key=lambda k: rows[k][0] / max(rows[k][1], 1e-12))
    failures = [k for k, (e, f) in rows.items() if e > max(1e-5, FLOAT32_FACTOR * f)]
    extra = {}
    if one_tile:
        whole = compile_program(model_proto, tile=size, image=shape_of(name, size)[2:],
                                with_memory_plan=False)
        untiled, _, _ = _streamed_step(whole, image, seed)
        errors = {k: rel(untiled[k], exact[k]) for k in rows}
        extra = {"one_tile": {  # what tiling adds: tiled vs one tile, on the same scale
            "worst_error": max(errors.values()),
            "error_of_worst_tensor": errors[worst_key],
            "tiled_vs_one_tile": max((streamed[k] - untiled[k]).abs().max().item()
                                     / max(exact[k].abs().max().item(), floor)
                                     for k in rows)}}
    return {
        "seed": seed, **extra,
        "image": size, "tile": tile, "halo": halo, "tiles": len(program.tiles),
        "stages": len(program.meta.stages), "classes": len(program.classes),
        "parameters": len(rows), "missing_parameters": missing,
        "worst": {"tensor": worst_key, "error": rows[worst_key][0],
                  "torch_float32_error": rows[worst_key][1],
                  "torch_float32_error_one_run": plain[worst_key]},
        "float32_evaluations": FLOAT32_EVALUATIONS,
        "max_error": max(e for e, _ in rows.values()),
        "failures": failures, "ok": not failures and not missing,
        "step_s": round(seconds, 2),
    }


def compile_at_plan_size(name: str, tmp: Path | None = None,
                         size_tile: tuple[int, int] | None = None):
    """The program of ``name`` at the plan part's size and tile (or ``size_tile``), saved
    under ``tmp`` when given."""
    from streamc.compiler import compile as compile_program

    size, tile = size_tile or MODELS[name][4]
    module = build_module(name)
    started = time.perf_counter()
    program = compile_program(export(name, module), tile=tile,
                              image=shape_of(name, size)[2:])
    seconds = time.perf_counter() - started
    if tmp is not None:
        program.save(tmp / name)
    return program, seconds


def part_plan(name: str, program=None, seconds: float | None = None) -> dict:
    if program is None:
        program, seconds = compile_at_plan_size(name)
    meta = program.meta
    plan = meta.memory_plan
    conventional = plan["conventional"]["total"]
    return {
        "image": MODELS[name][4][0], "tile": MODELS[name][4][1], "tiles": len(program.tiles),
        "stages": len(meta.stages), "classes": len(program.classes),
        "kept_between_stages": sum(b.nbytes for b in meta.buffers
                                   if b.kind == "grid" and b.name not in meta.head.inputs),
        "streamed": meta.streamed, "overhead": meta.flops.overhead,
        "predicted_peak": plan["peak"], "peak_phase": plan["peak_phase"],
        "conventional": conventional, "ratio": round(plan["peak"] / conventional, 3),
        "compile_s": round(seconds, 1),
    }


def part_measure(name: str, program_dir: Path, steps: int = 1) -> dict:
    """Peak RSS of training steps against the plan, as memory_plan_accuracy.py measures; not
    run (an ``error`` in the row) when the prediction exceeds the memory available now."""
    from streamc.passes.memory import plan_program
    from streamc.program import load

    program = load(program_dir)
    plan = plan_program(program, optimizer_copies=0)
    r = plan.resident
    predicted = plan.peak - r.parameters - r.image
    row = {"image": program.meta.image_size[0], "tile": program.meta.tile[0],
           "predicted": predicted, "plan_phase": plan.peak_phase, "measured": {}}
    del program
    available = _meminfo("MemAvailable")
    if predicted > available:
        error = (f"not run: the plan predicts {predicted / MiB:.0f} MiB, more than the "
                 f"{available / MiB:.0f} MiB this machine has available")
        row["measured"] = {v: {"error": error} for v in ("lean", "default")}
        return row
    script = ROOT / "benchmarks" / "memory_plan_accuracy.py"
    for variant in ("lean", "default"):
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH",
                                                                                   ""))
        proc = subprocess.run([sys.executable, str(script), "--child", str(program_dir), variant,
                               str(steps)], capture_output=True, text=True, env=env)
        if proc.returncode:
            row["measured"][variant] = {"error": proc.stderr.strip().splitlines()[-1:]}
            continue
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        m["ratio"] = round(m["steps"] / predicted, 3)
        row["measured"][variant] = m
    return row


def speed_child(spec: dict) -> dict:
    """One configuration in this fresh process: a warm-up step, then ``steps`` timed steps."""
    import numpy as np
    import torch

    torch.set_num_threads(2)
    name, config = spec["name"], spec["config"]
    size, tile = MODELS[name][5]
    shape = shape_of(name, size)
    module = build_module(name)
    image = torch.from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    out: dict = {}
    if config == "torch":
        model = module
    else:
        from streamc.compiler import compile as compile_program
        from streamc.runtime.module import StreamingModel

        started = time.perf_counter()
        program = compile_program(export(name, module), tile=tile, image=shape[2:],
                                  with_memory_plan=False)
        out.update(compile_s=round(time.perf_counter() - started, 1), tiles=len(program.tiles),
                   stages=len(program.meta.stages), overhead=program.meta.flops.overhead)
        model = StreamingModel(program, threads=2, progress=False)
        del module
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss("VmRSS")
    times = []
    for _ in range(1 + spec["steps"]):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        y = model(image)
        (y.float().mean() if y.dim() > 2 else y.sum()).backward()
        optimizer.step()
        del y
        times.append(round(time.perf_counter() - started, 2))
    out.update(warmup_s=times[0], times_s=times[1:], peak=_rss("VmHWM") - base)
    return out


def _proc_bytes(path: str, field: str) -> int:
    """A ``kB`` field of a /proc file (``/proc/meminfo``, ``/proc/self/status``), in bytes."""
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _meminfo(field: str) -> int:
    return _proc_bytes("/proc/meminfo", field)


def _rss(field: str) -> int:
    return _proc_bytes("/proc/self/status", field)


def part_speed(name: str, steps: int) -> dict:
    row = {"image": MODELS[name][5][0], "tile": MODELS[name][5][1]}
    for config in ("torch", "streamc"):
        spec = json.dumps({"name": name, "config": config, "steps": steps})
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH",
                                                                                   ""))
        proc = subprocess.run([sys.executable, "-m", "benchmarks.zoo_models", "--speed-child",
                               spec], capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode:
            row[config] = {"error": proc.stderr.strip().splitlines()[-1:]}
        else:
            row[config] = json.loads(proc.stdout.strip().splitlines()[-1])
    t, s = row["torch"], row["streamc"]
    if "times_s" in t and "times_s" in s:
        row["time_ratio"] = round(min(s["times_s"]) / min(t["times_s"]), 2)
        row["peak_ratio"] = round(s["peak"] / t["peak"], 2)
    return row


# ------------------------------------------------------------------------------------------------
# Report


def _table_head(title: str, columns: list[str], text: str | None = None) -> list[str]:
    """The lines that open a report section: its title, ``text`` if any, the table header."""
    return ([f"### {title}", ""] + ([text, ""] if text else [])
            + ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)])


def markdown(report: dict) -> str:
    lines = []
    exact = report.get("exact", {})
    if exact:
        lines += _table_head(
            "One training step through StreamingModel vs torch autograd",
            ["model", "seed", "image", "tile", "halo", "tiles", "stages", "parameters",
             "worst tensor",
             "error", "torch float32 error", "of which one run", "ok", "one tile: error",
             "tiled vs one tile"],
            "Error: max |g − g₆₄| / max |g₆₄| against torch in float64, per tensor; the worst "
            "tensor is the one furthest over torch float32's own error, the largest over "
            f"{FLOAT32_EVALUATIONS} float32 evaluations (as given, and with weights and image "
            "moved by up to one ulp); its unperturbed run's error is the next column. One tile: "
            "the same model compiled as a single tile (what tiling adds is the last column).")
        for name, r in exact.items():
            w, one = r["worst"], r.get("one_tile")
            tail = (f"| {one['error_of_worst_tensor']:.1e} | {one['tiled_vs_one_tile']:.1e} |"
                    if one else "| | |")
            lines.append(f"| {name.split(' seed ')[0]} | {r.get('seed', 0)} | {r['image']} "
                         f"| {r['tile']} | {r.get('halo', 'recompute')} | {r['tiles']} "
                         f"| {r['stages']} "
                         f"| {r['parameters']} | {w['tensor']} | {w['error']:.1e} "
                         f"| {w['torch_float32_error']:.1e} "
                         f"| {w.get('torch_float32_error_one_run', float('nan')):.1e} "
                         f"| {'yes' if r['ok'] else 'NO'} "
                         + tail)
        lines.append("")
    plans = report.get("plan", {})
    if plans:
        lines += _table_head(
            "Predicted peak of a training step at 4096² (256³), Adam",
            ["model", "tile", "tiles", "stages", "streamed FLOPs", "FLOP overhead",
             "kept between stages", "predicted peak", "conventional", "ratio"])
        for name, r in plans.items():
            share = r["streamed"]["flops"] if r["streamed"] else float("nan")
            lines.append(f"| {name} | {r['tile']} | {r['tiles']} | {r['stages']} | {share:.0%} "
                         f"| {r['overhead']:.2f} | {r['kept_between_stages'] / MiB:.0f} MiB "
                         f"| {r['predicted_peak'] / MiB:.0f} MiB "
                         f"| {r['conventional'] / MiB:.0f} MiB | {r['ratio']:.2f} |")
        lines.append("")
    measured = report.get("measure", {})
    if measured:
        lines += _table_head(
            "Measured peak of one training step vs the plan (SGD)",
            ["model", "image", "tile", "predicted", "lean measured", "lean ratio",
             "default measured", "default ratio", "lean step s"])
        for key, r in measured.items():
            lean, default = r["measured"].get("lean", {}), r["measured"].get("default", {})
            name = key.split(" at ")[0]

            def cell(m, key):
                return f"{m[key] / MiB:.0f} MiB" if key in m else m.get("error", "")

            image, tile = r.get("image", MODELS[name][4][0]), r.get("tile", MODELS[name][4][1])
            lines.append(f"| {name} | {image} | {tile} | {r['predicted'] / MiB:.0f} MiB "
                         f"| {cell(lean, 'steps')} "
                         f"| {lean.get('ratio', '')} | {cell(default, 'steps')} "
                         f"| {default.get('ratio', '')} | {lean.get('seconds', [''])[0]} |")
        lines.append("")
    speed = report.get("speed", {})
    if speed:
        lines += _table_head(
            "Time and peak vs torch where torch fits (one run, side by side)",
            ["model", "image", "tile", "tiles", "stages", "FLOP overhead", "torch s",
             "streamc s", "time ratio", "torch peak", "streamc peak", "peak ratio"])
        for name, r in speed.items():
            t, s = r["torch"], r["streamc"]
            if "times_s" not in t or "times_s" not in s:
                lines.append(f"| {name} | {r['image']} | {r['tile']} | | | | "
                             f"{t.get('error', '')} | {s.get('error', '')} | | | | |")
                continue
            lines.append(f"| {name} | {r['image']} | {r['tile']} | {s['tiles']} | {s['stages']} "
                         f"| {s['overhead']:.2f} | {min(t['times_s'])} | {min(s['times_s'])} "
                         f"| {r['time_ratio']} | {t['peak'] / MiB:.0f} MiB "
                         f"| {s['peak'] / MiB:.0f} MiB | {r['peak_ratio']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--parts", default="exact,plan,measure,speed")
    parser.add_argument("--steps", type=int, default=1, help="timed steps in the speed part")
    parser.add_argument("--seeds", default="0",
                        help="exact part: image and cotangent seeds, e.g. 0,1,2,3")
    parser.add_argument("--one-tile", action="store_true",
                        help="exact part: also run the model compiled as one tile")
    parser.add_argument("--measure-size", metavar="SIZE:TILE",
                        help="measure part only: this image size and tile instead of the plan "
                             "part's (the row is kept apart, e.g. 'basicunet at 2048')")
    parser.add_argument("--out", default=str(RESULTS / "zoo_models.json"))
    args = parser.parse_args()
    measure_size = (tuple(int(v) for v in args.measure_size.split(":"))
                    if args.measure_size else None)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {}
    parts = args.parts.split(",")
    import onnxruntime

    report["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                         "onnxruntime": onnxruntime.__version__,
                         "platform": platform.platform()}
    report["command"] = "python -m benchmarks.zoo_models " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="streamc-zoo-") as tmp:
        for name in args.models.split(","):
            if name not in MODELS:
                raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
            if "exact" in parts:
                for seed in map(int, args.seeds.split(",")):
                    r = part_exact(name, seed, args.one_tile)
                    key = name if seed == 0 else f"{name} seed {seed}"
                    report.setdefault("exact", {})[key] = r
                    print(f"{key}: exact {'OK' if r['ok'] else 'FAILED'}: worst {r['worst']}, "
                          f"{r['tiles']} tiles, {r['stages']} stages, {r['step_s']} s"
                          + (f", one tile {r['one_tile']}" if "one_tile" in r else ""),
                          flush=True)
            if "plan" in parts or ("measure" in parts and not measure_size):
                program, seconds = compile_at_plan_size(name, Path(tmp))
                r = report.setdefault("plan", {})[name] = part_plan(name, program, seconds)
                del program
                print(f"{name}: plan {r['predicted_peak'] / MiB:.0f} MiB vs conventional "
                      f"{r['conventional'] / MiB:.0f} MiB (ratio {r['ratio']}), "
                      f"{r['stages']} stages, overhead {r['overhead']}", flush=True)
            if "measure" in parts:
                key = name
                if measure_size:
                    compile_at_plan_size(name, Path(tmp), measure_size)
                    key = f"{name} at {measure_size[0]}"
                r = report.setdefault("measure", {})[key] = part_measure(name, Path(tmp) / name)
                print(f"{key}: measured {r['measured']}, predicted "
                      f"{r['predicted'] / MiB:.0f} MiB", flush=True)
            if "speed" in parts:
                r = report.setdefault("speed", {})[name] = part_speed(name, args.steps)
                print(f"{name}: speed {r}", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1) + "\n")
            out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--speed-child":
        print(json.dumps(speed_child(json.loads(sys.argv[2]))))
    else:
        main()
