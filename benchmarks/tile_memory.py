"""Where streamc's memory goes: peak RSS of one tile's forward / backward run and of whole steps.

For ResNet-18 (``zoo.resnet18``, width 64, frozen BatchNorm) compiled at ``--size``² with
``--tile``, every *variant* (a :class:`~streamc.policy.RuntimePolicy` and the other
:class:`~streamc.runtime.options.RuntimeOptions` fields) runs in its own child process (ORT's
shared arena and glibc's heap are process-wide), which

1. builds a :class:`~streamc.runtime.module.StreamingModel` with the variant's options;
2. runs tile 0's forward step twice and its backward step twice through the model's backend
   (the steps of :func:`streamc.steps.program_steps`, baked or fed as the policy says; the first
   run of each includes the session build), measuring around each run the peak
   resident memory (VmHWM, reset by writing ``5`` to ``/proc/self/clear_refs``), the resident
   memory after it (VmRSS) and the process CPU time;
3. runs ``--steps`` whole training steps (SGD) and reports the peak over them and the CPU time
   of the last one.

``--variants torch`` runs torch's conventional step on one tile-sized image instead, for scale.
Also printed: the sum of the sizes of every tensor of the tile's forward and backward graphs
(what a planner without reuse would hold). Numbers in MiB. Usage::

    python -m benchmarks.tile_memory --size 1024 --tile 1024
    python -m benchmarks.tile_memory --size 2048 --tile 1024 --variants base,best --steps 2
    python -m benchmarks.tile_memory --list
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The runtime's defaults before this benchmark; every variant but "default" is BASE + changes.
# Keys are RuntimePolicy fields (weights, optimization, fold_constants, release_sessions) or
# RuntimeOptions fields (the others).
BASE = {"cpu_arena": "shared", "arena_extend": "same", "mem_pattern": True, "optimization": "all",
        "weights": "auto", "mmap_threshold": None, "trim": False, "release_sessions": False,
        "fold_constants": "all"}
# name -> changes to BASE; "default" is RuntimeOptions() as it is now;
# "torch" is torch's conventional step on one tile-sized image.
CHANGES: dict[str, dict] = {
    "base": {},
    "arena_off": {"cpu_arena": False},
    "arena_session": {"cpu_arena": True},
    "arena_pow2": {"arena_extend": "pow2"},
    "no_pattern": {"mem_pattern": False},
    "opt_extended": {"optimization": "extended"},
    "opt_basic": {"optimization": "basic"},
    "weights_inputs": {"weights": "inputs"},
    "weights_init": {"weights": "initializers"},
    "malloc": {"mmap_threshold": 1 << 20, "trim": True},
    "arena_off_malloc": {"cpu_arena": False, "mmap_threshold": 1 << 20, "trim": True},
    "arena_off_nopat": {"cpu_arena": False, "mem_pattern": False},
    "arena_off_nopat_malloc": {"cpu_arena": False, "mem_pattern": False,
                               "mmap_threshold": 1 << 20, "trim": True},
    "release": {"release_sessions": True},
    "no_fold": {"fold_constants": "forward"},
    "no_fold_all": {"fold_constants": "none"},
    "no_pattern_no_fold": {"mem_pattern": False, "fold_constants": "forward"},
    "no_pattern_release": {"mem_pattern": False, "release_sessions": True},
    "arena_off_nopat_release": {"cpu_arena": False, "mem_pattern": False,
                                "release_sessions": True},
}
VARIANTS: dict[str, dict] = {name: {**BASE, **c} for name, c in CHANGES.items()}
VARIANTS["default"] = {}
# The current defaults without malloc_trim(0) after each run, and with a fixed 1 MiB mmap
# threshold on top. (docs/memory-runtime.md's "default + trim" rows are today's "default".)
VARIANTS["default_no_trim"] = {"trim": False}
VARIANTS["default_malloc"] = {"mmap_threshold": 1 << 20}
VARIANTS["default_arena_off"] = {"cpu_arena": False}
VARIANTS["default_opt_basic"] = {"optimization": "basic"}
VARIANTS["default_opt_extended"] = {"optimization": "extended"}
VARIANTS["torch"] = {}

MIB = 2**20


def status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Probe:
    """Peak (VmHWM) and RSS after, relative to RSS before, and CPU/wall seconds."""

    def __enter__(self):
        reset_peak()
        self.rss0 = status("VmRSS")
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.peak = status("VmHWM")
        self.rss1 = status("VmRSS")
        self.cpu = time.process_time() - self.cpu0
        self.wall = time.perf_counter() - self.wall0

    def row(self) -> dict:
        return {"rss_before": round(self.rss0), "peak": round(self.peak),
                "peak_rise": round(self.peak - self.rss0), "rss_after": round(self.rss1),
                "cpu_s": round(self.cpu, 2), "wall_s": round(self.wall, 2)}


def graph_tensor_mib(model) -> float:
    """Sum of the sizes of every intermediate tensor with a static shape (MiB)."""
    import onnx

    sizes = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.INT64: 8, onnx.TensorProto.BOOL: 1,
             onnx.TensorProto.INT32: 4, onnx.TensorProto.DOUBLE: 8}
    inferred = onnx.shape_inference.infer_shapes(model)
    total = 0
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = vi.type.tensor_type
        dims = [d.dim_value for d in t.shape.dim]
        if dims and all(d > 0 for d in dims):
            total += math.prod(dims) * sizes.get(t.elem_type, 4)
    return total / MIB


def runtime_options(fields: dict, threads: int):
    """The RuntimeOptions of a variant: its RuntimePolicy fields make the policy, the rest are
    RuntimeOptions fields."""
    from dataclasses import fields as dataclass_fields

    from streamc.policy import RuntimePolicy
    from streamc.runtime.options import RuntimeOptions

    policy_keys = {f.name for f in dataclass_fields(RuntimePolicy)}
    policy = RuntimePolicy(**{k: v for k, v in fields.items() if k in policy_keys})
    return RuntimeOptions(policy=policy, threads=threads,
                          **{k: v for k, v in fields.items() if k not in policy_keys})


def build_program(size: int, tile: int, cache: Path):
    from streamc.program import load

    path = cache / f"resnet18-{size}-{tile}"
    if (path / "program.json").exists():
        return load(path)
    import torch

    from streamc.compiler import compile as compile_program
    from streamc.export import export_torch
    from zoo import randomize_batchnorm, resnet18

    torch.manual_seed(0)
    model = export_torch(randomize_batchnorm(resnet18()), (1, 3, 224, 224))
    program = compile_program(model, tile, image=(size, size), with_flops=False)
    program.save(path)
    return program


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    out: dict = {"variant": args.variant, "size": args.size, "tile": args.tile}
    if args.variant == "torch":
        from zoo import resnet18

        net = resnet18().eval()
        x = torch.randn(1, 3, args.tile, args.tile)
        y = torch.tensor([1])
        opt = torch.optim.SGD(net.parameters(), lr=1e-4)
        for k in range(args.steps):
            with Probe() as p:
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
            out[f"step{k + 1}"] = p.row()
        return out

    from streamc.runtime.module import StreamingModel
    from streamc.steps import StepKind, program_steps
    from zoo import randomize_batchnorm, resnet18

    program = build_program(args.size, args.tile, Path(args.cache))
    options = runtime_options(VARIANTS[args.variant], args.threads)
    sm = StreamingModel(program, threads=args.threads, progress=False)
    sm._runtime.options = options  # before the first call builds the interpreter
    torch.manual_seed(0)
    net = resnet18()
    randomize_batchnorm(net)
    sm.load_state_dict(net.state_dict(), strict=False)
    del net
    out["tiles"], out["classes"] = len(program.tiles), len(program.classes)
    image = torch.randn(1, 3, args.size, args.size)
    label = torch.tensor([1])
    out["image_mib"] = round(image.numel() * 4 / MIB, 1)
    out["cut_mib"] = round(sum(4 * math.prod(c.shape)
                               for c in program.meta.cut_tensors) / MIB, 1)
    params = sm.onnx_parameters
    out["weights_mib"] = round(sum(p.numel() * 4 for p in params.values()) / MIB, 1)
    tile = program.tiles[0]
    cls = program.classes[tile.class_id]
    if args.tensor_sums:
        out["fwd_tensors_mib"] = round(graph_tensor_mib(program.graph(cls.forward)), 1)
        out["bwd_tensors_mib"] = round(graph_tensor_mib(program.graph(cls.backward)), 1)
    out["rss_start"] = round(status("VmRSS"))

    # -- one tile through the backend ----------------------------------------------------------
    interpreter = sm._runtime.interpreter(torch.device("cpu"))
    backend, pool = interpreter.backend, interpreter.backend.pool
    weights = sm._runtime.snapshot(sm._tensors())
    steps = program_steps(program.meta, options.policy)
    forward = next(s for s in steps["prefix_forward"] if s.tile == 0)
    backward = next(s for s in steps["prefix_backward"]
                    if s.kind is StepKind.TILE_BACKWARD and s.tile == 0)
    out["tile_baked"] = {"forward": forward.baked, "backward": backward.baked}
    crop = backend.crop(image, tile.crop)
    fwd_out = list(cls.outputs.values())
    for k in (1, 2):
        with Probe() as p:
            vals = backend.run(forward, weights, {program.input_name: crop}, fwd_out)
        out[f"tile_fwd{k}"] = p.row()
        del vals
    feeds = {program.input_name: crop}
    for cut, cot in cls.cotangents.items():
        shape = interpreter.cut_shapes[cut]
        size = [b - a for a, b in tile.kept[cut]]
        feeds[cot] = torch.randn(list(shape[:2]) + size)
    for k in (1, 2):
        with Probe() as p:
            vals = backend.run(backward, weights, feeds, list(cls.gradients.values()))
        out[f"tile_bwd{k}"] = p.row()
        del vals
    del feeds, crop

    # -- whole steps ---------------------------------------------------------------------------
    opt = torch.optim.SGD(params.values(), lr=1e-4)
    for k in range(args.steps):
        with Probe() as p:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(sm(image), label).backward()
            opt.step()
        out[f"step{k + 1}"] = p.row()
    out["sessions_built"] = pool.builds
    out["sessions_live"] = len(pool.live)
    out["rss_end"] = round(status("VmRSS"))
    # What the live sessions hold: RSS freed by dropping them (the arena keeps its memory).
    import gc

    from streamc.runtime.allocators import malloc_trim

    malloc_trim()
    gc.collect()
    before = status("VmRSS")
    pool.clear()
    gc.collect()
    malloc_trim()
    out["sessions_held_mib"] = round(before - status("VmRSS"))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--variants", default="default,torch")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default="/tmp/streamc-tile-memory")
    parser.add_argument("--tensor-sums", action="store_true")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.list:
        for name, fields in VARIANTS.items():
            print(f"{name:24s} {fields}")
        return
    if args.variant:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    if "torch" not in args.variants.split(",") or len(args.variants.split(",")) > 1:
        build_program(args.size, args.tile, Path(args.cache))  # compile once, children load
    for name in args.variants.split(","):
        cmd = [sys.executable, "-m", "benchmarks.tile_memory", "--variant", name,
               "--size", str(args.size), "--tile", str(args.tile), "--steps", str(args.steps),
               "--threads", str(args.threads), "--cache", args.cache]
        if args.tensor_sums:
            cmd.append("--tensor-sums")
        load = os.getloadavg()[0]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{name}: failed (rc {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
            continue
        result = json.loads(lines[-1][7:])
        result["load"] = round(load, 1)
        print(json.dumps(result), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
