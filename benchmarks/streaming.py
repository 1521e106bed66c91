"""streamc vs conventional torch training and torch checkpointing, 1 to 66 megapixels.

    python -m benchmarks.streaming                          # 1024² .. 8192², 128³ and 256³
    python -m benchmarks.streaming --sizes 1024,2048 --volumes ""
    python -m benchmarks.streaming --quick                  # smoke test, < 3 minutes
    python -m benchmarks.streaming --profile 2048           # ORT op profile of (c) at 2048²

Configurations, each run in its own child process (so its peak memory is its own):

  (a) torch: conventional full-image training step (forward, cross-entropy, backward, SGD);
  (b) torch + ``torch.utils.checkpoint`` over the stages (layer1..layer4 / the 3-D blocks);
  (c) streamc on ONNX Runtime's CPU provider, every tile recomputing its halo
      (``halo="recompute"``), at the tiles of ``--tiles`` (``plan`` = the tile
      ``streamc.tile_search.search_tiles`` picks for ``--budget``);
  (d) the same with halo reuse (``halo="reuse"``: every activation computed once per pass).

Model: ResNet-18 layout (64→512 channels) from the shared ``zoo`` (:func:`zoo.resnet18`),
BatchNorm frozen (eval mode, scale and bias trained) with random statistics (so the exporter
keeps every BatchNorm parameter distinct), global average pooling, linear head, 2 classes; the
3-D net is :class:`zoo.VolumeNet`. torch and ORT use 2 threads. (c) runs through
:class:`~streamc.StreamingModel` (``--engine module``), or through the runtime's interpreter
over its numpy backend (``--engine executor``: the reference path of ``streamc check``).

Per run: step times (``--steps`` after one warm-up step: median, min, max), peak resident memory
of the training steps (``VmHWM`` after resetting it just before the warm-up) and of the whole
child process, and, for (b) and (c), the largest relative difference of their first-step
gradients from (a)'s at the same size: max over parameters of max|g − g_a| / max|g_a|.

A watchdog polls every child's resident memory and kills it above ``--limit-gb`` (recorded as
"stopped at limit"). Torch runs whose memory, extrapolated linearly in pixels from the two
largest sizes measured (in this or an earlier run), exceeds the limit are not started and are
recorded as "predicted N GB". Results merge into ``benchmarks/results/streaming.json`` (keyed by
configuration, size and tile), then ``streaming.md`` and ``streaming.png`` are rewritten from it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from benchmarks.proc_status import reset_peak, status_kb

RESULTS = Path(__file__).parent / "results"
GIB = 1024 ** 3
MACHINE_GIB = 24.0
# Fallback for (a)'s memory when nothing was measured yet (ResNet-18, 2 threads): bytes at 2048²
# and 4096²; extrapolation is linear in pixels.
PRIOR_TORCH = {2048 * 2048: 2.7e9, 4096 * 4096: 7.8e9}
CONFIG_NAMES = {"a": "(a) torch", "b": "(b) torch + checkpoint", "c": "(c) streamc",
                "d": "(d) streamc, halo reuse"}


# ============================================================================================
# child side: one configuration, one size
# ============================================================================================

def make_model(kind: str, width: int):
    """The torch model with deterministic weights and random frozen BatchNorm statistics."""
    import torch

    from zoo import VolumeNet, randomize_batchnorm, resnet18

    torch.manual_seed(0)
    model = resnet18(classes=2, width=width) if kind == "2d" else VolumeNet(classes=2, width=width)
    return randomize_batchnorm(model, seed=1, weight="uniform").eval()


def make_image(kind: str, size: int):
    import numpy as np

    shape = (1, 3, size, size) if kind == "2d" else (1, 1, size, size, size)
    return np.random.default_rng(0).standard_normal(shape, dtype=np.float32)


def resnet_setup(size: int, tile: int, threads: int = 2):
    """ResNet-18 (width 64) at ``size``², its program at ``tile`` (no memory plan), the image
    and its label: what the in-process A/B benchmarks start from."""
    import torch

    from streamc.compiler import compile as compile_program

    torch.set_num_threads(threads)
    module = make_model("2d", 64)
    program = compile_program(_export("2d", module), tile, image=(size, size),
                              with_memory_plan=False)
    return module, program, torch.from_numpy(make_image("2d", size)), torch.tensor([1])


def timed_step(model, optimizer, x, label) -> float:
    """Seconds of one training step: forward, cross-entropy, backward, optimizer step."""
    import torch

    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), label).backward()
    optimizer.step()
    return time.perf_counter() - start


def _export(kind: str, model):
    """The ONNX export of ``model`` with dynamic spatial axes (traced at 224² or 32³)."""
    from streamc.export import export_torch

    shape = (1, 3, 224, 224) if kind == "2d" else (1, 1, 32, 32, 32)
    return export_torch(model, shape)


def _stages_forward(model, x, checkpoint: bool):
    from torch.utils.checkpoint import checkpoint as ckpt

    x = model.stem(x)
    for stage in model.stages():
        x = ckpt(stage, x, use_reentrant=False) if checkpoint else stage(x)
    return model.head(x)


def run_child(spec: dict) -> dict:
    """Run one configuration: build, warm up, time ``steps`` training steps; return a record."""
    import numpy as np
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    kind, size, config = spec["kind"], spec["size"], spec["config"]
    out: dict = {"engine": None}
    t0 = time.perf_counter()
    model = make_model(kind, spec["width"])
    image = make_image(kind, size)
    x = torch.from_numpy(image)
    label = torch.tensor([1])
    loss_fn = torch.nn.functional.cross_entropy
    lr = 1e-4

    if config in ("a", "b"):
        params = dict(model.named_parameters())
        opt = torch.optim.SGD(params.values(), lr=lr)
        checkpoint = config == "b"

        def step():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(_stages_forward(model, x, checkpoint), label)
            loss.backward()
            return params
    else:
        step, params, opt = _streamc_step(spec, kind, size, model, x, label, out)
    out["setup_s"] = round(time.perf_counter() - t0, 3)

    if spec.get("profile"):
        return _profile(spec, step, opt, out)

    peak_reset = reset_peak()
    times, cpu = [], []
    first_grads = None
    load_before = os.getloadavg()[0]
    for i in range(1 + spec["steps"]):
        start, start_cpu = time.perf_counter(), time.process_time()
        grads = step()
        if i == 0 and spec.get("grads_path"):
            first_grads = {k: np.array(_grad_of(v), copy=True) for k, v in grads.items()}
        opt.step()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    out["cpu_s"] = [round(t, 3) for t in cpu[1:]]
    out["loadavg"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    out["peak_bytes"] = status_kb("VmHWM") * 1024 if peak_reset else None
    out["peak_total_bytes"] = None  # filled by the parent from ru_maxrss
    out["warmup_s"] = round(times[0], 3)
    out["times_s"] = [round(t, 3) for t in times[1:]]
    if first_grads is not None:
        np.savez(spec["grads_path"], **first_grads)
    return out


def _grad_of(v):
    import numpy as np

    g = getattr(v, "grad", v)
    if g is None:
        return np.zeros(tuple(v.shape), dtype=np.float32)
    return g.detach().numpy() if hasattr(g, "detach") else g


def _streamc_step(spec, kind, size, model, x, label, out):
    """(c): compile the exported model and return (step, params, optimizer-like)."""
    import torch

    from streamc.compiler import compile as compile_program

    proto = _export(kind, model)
    image = (size,) * (2 if kind == "2d" else 3)
    tile = spec["tile"]
    if tile == "plan":
        from streamc.tile_search import search_tiles

        t = time.perf_counter()
        search = search_tiles(proto, image, budget=int(spec["budget_gb"] * GIB))
        chosen = search.chosen
        # plan_s includes compiling the chosen program (the search compiles each candidate it
        # plans, and the chosen one is used as it is).
        out["plan_s"] = round(time.perf_counter() - t, 3)
        out["planned_tile"] = chosen.tile
        out["plan_predicted_peak_bytes"] = int(chosen.peak)
        out["plan_predicted_overhead"] = round(float(chosen.overhead), 4)
        out["plan_compiled"] = search.compiled
        program = chosen.program
    else:
        t = time.perf_counter()
        program = compile_program(proto, tile, image=image, with_flops=spec.get("flops", True),
                                  halo="reuse" if spec["config"] == "d" else "recompute")
        out["compile_s"] = round(time.perf_counter() - t, 3)
    meta = program.meta
    out["grid"] = list(meta.grid)
    out["tile_used"] = list(meta.tile)
    out["tiles"] = len(program.tiles)
    out["classes"] = len(program.classes)
    out["grid_end"] = list(meta.grid_end) or None  # where compile's grid_end="auto" ended it
    out["forward_overhead"] = meta.flops.forward_overhead if meta.flops else None
    out["backward_overhead"] = meta.flops.backward_overhead if meta.flops else None
    out["cut_bytes"] = sum(4 * math.prod(c.shape) for c in meta.cut_tensors)
    del proto
    loss_fn = torch.nn.functional.cross_entropy
    lr = 1e-4

    engine = spec.get("engine", "module")
    out["engine"] = engine
    if engine == "module":
        from streamc.runtime.module import StreamingModel

        sm = StreamingModel(program, threads=2, progress=False)
        sm.load_state_dict(model.state_dict(), strict=False)
        del model
        params = sm.onnx_parameters
        opt = torch.optim.SGD(params.values(), lr=lr)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(sm(x), label)
            loss.backward()
            return params

        out["_backend"] = lambda: sm._runtime.interpreter(sm.device).backend
        return step, params, opt

    # The runtime's interpreter over its numpy backend (what streamc.check.run_program runs),
    # built once so that its sessions persist across steps as StreamingModel's do; torch only
    # for the loss gradient of the logits.
    from streamc.runtime.backend import NumpyBackend
    from streamc.runtime.interpreter import Interpreter
    from streamc.runtime.options import RuntimeOptions
    from streamc.runtime.weights import WeightSet

    interpreter = Interpreter(program, NumpyBackend(program, RuntimeOptions(threads=2)),
                              progress=False)
    values = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()
              if k in program.parameters}
    trainable = meta.trainable
    image_np = x.numpy()
    state = {}

    def output_grads(outputs):
        logits = torch.from_numpy(outputs[0]).requires_grad_()
        loss_fn(logits, label).backward()
        return [logits.grad.numpy()] + [None] * (len(outputs) - 1)

    def step():
        _, grads = interpreter.run(image_np, WeightSet(dict(values)), output_grads)
        state["grads"] = grads
        return grads

    class _SGD:
        def step(self):
            for name in trainable:
                g = state["grads"].get(name)
                if g is not None:
                    values[name] = values[name] - lr * g  # new arrays: sessions keep the old

    out["_backend"] = lambda: interpreter.backend
    return step, {n: None for n in trainable}, _SGD()


# -- ORT profile of one (c) step ---------------------------------------------------------------

def _profile(spec, step, opt, out) -> dict:
    """Warm up, then profile one step: wall time per graph run and session build (Python-side
    timers) and ORT's per-node times, classified into forward / recompute / dX / dW / ...

    The hooks wrap, on this run's instances only, the backend's ``run`` (one graph run, with
    its session build when there is one) and its session pool's ``_session_options`` (profiling
    on) and ``_build`` (one session build)."""
    prof_dir = Path(spec["profile"])
    prof_dir.mkdir(parents=True, exist_ok=True)
    step()
    opt.step()
    backend = out["_backend"]()  # the interpreter exists once a step has run
    pool = backend.pool
    timers = {"run": {}, "build": {}}
    built: list = []
    orig_options, orig_build, orig_run = pool._session_options, pool._build, backend.run

    def options(role):
        so = orig_options(role)
        so.enable_profiling = True
        so.profile_file_prefix = str(prof_dir / f"ort_{len(built)}")
        return so

    def build(relative, weights, baked):
        t = time.perf_counter()
        entry = orig_build(relative, weights, baked)
        timers["build"][relative] = timers["build"].get(relative, 0.0) + time.perf_counter() - t
        built.append((relative, entry))
        return entry

    def run(step, weights, feeds, outputs):
        t = time.perf_counter()
        result = orig_run(step, weights, feeds, outputs)
        timers["run"][step.graph] = timers["run"].get(step.graph, 0.0) + time.perf_counter() - t
        return result

    pool.clear()  # sessions kept from the warm-up (fed ones are built once): rebuild profiled
    pool._session_options = options
    pool._build = build
    backend.run = run
    t = time.perf_counter()
    step()
    wall = time.perf_counter() - t
    t = time.perf_counter()
    opt.step()
    opt_s = time.perf_counter() - t
    files = []
    for relative, entry in built:
        files.append((relative, entry.session.end_profiling()))
    run_s = {k: round(v, 3) for k, v in timers["run"].items()}
    build_s = {k: round(v, 3) for k, v in timers["build"].items()}
    # "run" timers include the build when a session is (re)built inside run()
    ort_run_total = sum(timers["run"].values()) - sum(timers["build"].values())
    categories: dict[str, float] = {}
    by_op: dict[str, float] = {}
    node_total = 0.0
    for relative, path in files:
        with open(path) as f:
            events = json.load(f)
        direction = ("head" if "head" in relative else
                     "backward" if "backward" in relative else "forward")
        for e in events:
            if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
                continue
            name = e["name"][: -len("_kernel_time")]
            op = e.get("args", {}).get("op_name", "?")
            dur = e["dur"] / 1e6
            node_total += dur
            cat = _classify(direction, name, op)
            categories[cat] = categories.get(cat, 0.0) + dur
            key = f"{direction}:{op}"
            by_op[key] = by_op.get(key, 0.0) + dur
    out.update({
        "profile_step_s": round(wall, 3),
        "optimizer_s": round(opt_s, 4),
        "graph_run_s": run_s,
        "session_build_s": build_s,
        "session_build_total_s": round(sum(timers["build"].values()), 3),
        "ort_run_total_s": round(ort_run_total, 3),
        "ort_node_total_s": round(node_total, 3),
        "outside_ort_s": round(wall - sum(timers["run"].values()), 3),
        "categories_s": {k: round(v, 3) for k, v in sorted(categories.items(),
                                                           key=lambda kv: -kv[1])},
        "by_op_s": {k: round(v, 3) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:25]},
    })
    for _, path in files:
        Path(path).unlink(missing_ok=True)
    return out


def _classify(direction: str, name: str, op: str) -> str:
    if direction == "head":
        return "head (forward + backward)"
    if direction == "forward":
        return "forward"
    if not name.startswith("grad/"):
        return "recompute (forward part of the backward graph)"
    scope = name.split("/")[-2] if name.count("/") >= 2 else ""
    if scope == "Conv" or "/Conv/" in name:
        if op in ("Conv", "ConvTranspose", "FusedConv"):
            return "Conv dX (Conv / ConvTranspose)"
        if op in ("Gemm", "MatMul", "FusedGemm", "FusedMatMul"):
            return "Conv dW (Gemm)"
        return "Conv dW copies (im2col Slice/Pad/Concat/Reshape/Transpose)"
    return "other backward (BN, ReLU, MaxPool, Add, ...)"


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    try:
        out = run_child(spec)
        out.pop("_backend", None)
        out["status"] = "ok"
    except Exception as exc:  # recorded, the parent goes on with the next configuration
        import traceback

        traceback.print_exc()
        out = {"status": "failed", "note": f"{type(exc).__name__}: {exc}"[:400]}
    Path(spec["result_path"]).write_text(json.dumps(out))


# ============================================================================================
# parent side: jobs, watchdog, predictions, results
# ============================================================================================

def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def launch(spec: dict, limit_bytes: int, timeout_s: float, log) -> dict:
    """Run one child with the RSS watchdog; return its record (status ok/failed/stopped/...)."""
    import resource

    with tempfile.TemporaryDirectory(prefix="streamc-bench-") as tmp:
        spec = dict(spec, result_path=str(Path(tmp) / "result.json"))
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2",
                   PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent)] +
                                              [p for p in [os.environ.get("PYTHONPATH")] if p]))
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.streaming", "--child",
                                 str(spec_path)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        stopped = None
        max_rss = 0
        import threading

        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        while proc.poll() is None:
            rss = _rss_bytes(proc.pid)
            max_rss = max(max_rss, rss)
            if rss > limit_bytes:
                stopped = f"stopped at limit ({rss / GIB:.1f} GiB > {limit_bytes / GIB:.1f} GiB)"
            elif time.perf_counter() - start > timeout_s:
                stopped = f"stopped after {timeout_s:.0f} s (time limit)"
            if stopped:
                proc.kill()
                break
            time.sleep(0.1)
        proc.wait()
        reader.join(timeout=5)
        after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        elapsed = time.perf_counter() - start
        result_path = Path(spec["result_path"])
        if stopped:
            record = {"status": "stopped", "note": stopped}
        elif result_path.exists():
            record = json.loads(result_path.read_text())
        else:
            record = {"status": "failed", "note": f"child exited {proc.returncode}"}
        if record.get("status") == "failed":
            log("".join(lines[-30:]))
        # ru_maxrss of children is the max over all children so far: it is this child's peak
        # only when it grew (the usual case: sizes run in increasing order).
        record["peak_total_bytes"] = (after * 1024 if after > before else None)
        record["watchdog_max_rss_bytes"] = max_rss
        record["wall_s"] = round(elapsed, 1)
        return record


def _key(r: dict) -> tuple:
    return (r["kind"], r["config"], r["size"], str(r.get("tile")), r["width"])


def load_results(path: Path) -> dict:
    if path.exists():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            pass
    return {"runs": []}


def save_results(path: Path, data: dict, record: dict) -> None:
    runs = [r for r in data["runs"] if _key(r) != _key(record)]
    runs.append(record)
    runs.sort(key=lambda r: (r["kind"], r["width"], r["size"], r["config"],
                             _tile_sort(r.get("tile"))))
    data["runs"] = runs
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _tile_sort(tile) -> tuple:
    return (1, 0) if tile == "plan" else (0, tile or 0)


def predict_peak(data: dict, kind: str, config: str, width: int, size: int) -> float | None:
    """Bytes, linear in pixels through the two largest measured sizes (else the prior)."""
    pts = sorted({(r["size"] ** (2 if kind == "2d" else 3), r["peak_bytes"])
                  for r in data["runs"]
                  if r["kind"] == kind and r["config"] == config and r["width"] == width
                  and r.get("status") == "ok" and r.get("peak_bytes")})
    pixels = size ** (2 if kind == "2d" else 3)
    if len(pts) < 2:
        if kind != "2d" or width != 64:
            return None
        pts = sorted(PRIOR_TORCH.items())
    (p1, m1), (p2, m2) = pts[-2], pts[-1]
    if pixels <= p2:
        return None
    slope = (m2 - m1) / (p2 - p1) if p2 != p1 else 0.0
    return m2 + slope * (pixels - p2)


def grad_rel_diff(path_a: Path, path_x: Path) -> dict | None:
    import numpy as np

    if not (path_a.exists() and path_x.exists()):
        return None
    ga, gx = np.load(path_a), np.load(path_x)
    worst, worst_name, missing = 0.0, None, []
    for name in ga.files:
        if name not in gx.files:
            missing.append(name)
            continue
        a = ga[name].astype(np.float64)
        d = np.abs(gx[name].astype(np.float64) - a).max()
        scale = np.abs(a).max()
        rel = d / scale if scale > 0 else d
        if rel > worst:
            worst, worst_name = float(rel), name
    return {"grad_rel_diff": worst, "grad_worst_param": worst_name,
            "grad_missing": missing[:10], "grad_params": len(ga.files)}


def build_jobs(args) -> list[dict]:
    jobs = []
    configs = [c for c in args.configs.split(",") if c]
    tiles = [t for t in args.tiles.split(",") if t]
    for kind, sizes, tile_list, width in (("2d", args.sizes, tiles, args.width),
                                          ("3d", args.volumes, args.volume_tiles.split(","),
                                           args.volume_width)):
        for size in sizes:
            for config in configs:
                if config in ("a", "b"):
                    jobs.append(dict(kind=kind, config=config, size=size, tile=None, width=width))
                    continue
                seen = set()
                for t in tile_list:
                    if t == "plan":
                        if kind != "2d" or size < args.plan_from or config != "c":
                            continue
                        jobs.append(dict(kind=kind, config="c", size=size, tile="plan",
                                         width=width))
                        continue
                    eff = min(int(t), size)
                    if eff in seen or (eff < size and kind == "2d" and eff < args.min_tile_2d):
                        continue
                    seen.add(eff)
                    jobs.append(dict(kind=kind, config=config, size=size, tile=eff,
                                     width=width))
    return jobs


def summarize(record: dict) -> dict:
    times = record.get("times_s") or []
    if times:
        record["median_s"] = round(statistics.median(times), 3)
        record["min_s"] = round(min(times), 3)
        record["max_s"] = round(max(times), 3)
        record["s_per_mp"] = round(record["median_s"] / record["megapixels"], 4)
    if record.get("cpu_s"):
        record["cpu_median_s"] = round(statistics.median(record["cpu_s"]), 3)
    if record.get("peak_bytes"):
        record["peak_gb"] = round(record["peak_bytes"] / 1e9, 3)
    return record


def label(r: dict) -> str:
    name = CONFIG_NAMES[r["config"]]
    if r["config"] in ("c", "d"):
        if r.get("tile") == "plan":
            used = r.get("planned_tile")
            name += f" tile plan({r.get('budget_gb', 8):g} GiB)" + (f"→{used}" if used else "")
        else:
            name += f" tile {r['tile']}"
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="1024,2048,4096,8192", help="2-D image sides")
    parser.add_argument("--volumes", default="128,256", help="3-D volume sides ('' for none)")
    parser.add_argument("--configs", default="a,b,c")
    parser.add_argument("--tiles", default="1024,2048,plan", help="streamc tiles, 2-D")
    parser.add_argument("--volume-tiles", default="64,128")
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 stem channels")
    parser.add_argument("--volume-width", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--budget", type=float, default=8.0, help="GiB for the 'plan' tile")
    parser.add_argument("--plan-from", type=int, default=4096, help="smallest size for 'plan'")
    parser.add_argument("--min-tile-2d", type=int, default=1024,
                        help="skip 2-D tiles below this that would not cover the image")
    parser.add_argument("--limit-gb", type=float, default=20.0, help="watchdog RSS limit, GiB")
    parser.add_argument("--torch-max", type=int, default=4096,
                        help="never start 2-D torch runs above this side (record the prediction)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per child")
    parser.add_argument("--engine", choices=["module", "executor"], default="module",
                        help="(c) through StreamingModel, or the runtime's interpreter on "
                        "its numpy backend")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: width-16 ResNet at 256², 512²; VolumeNet at 32³, 64³")
    parser.add_argument("--profile", type=int, metavar="SIZE",
                        help="profile (c) at SIZE² (tiles from --tiles) instead of benchmarking")
    parser.add_argument("--output", help="results JSON (default benchmarks/results/streaming.json)")
    parser.add_argument("--report", action="store_true",
                        help="only rewrite the .md and .png from the results JSON")
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return
    if args.quick:
        args.sizes, args.volumes, args.width, args.volume_width = "256,512", "32,64", 16, 8
        args.tiles, args.volume_tiles, args.min_tile_2d = "1024", "32", 0
        args.steps = min(args.steps, 3)
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.volumes = [int(s) for s in args.volumes.split(",") if s]
    default_name = "streaming_quick.json" if args.quick else "streaming.json"
    out_path = Path(args.output) if args.output else RESULTS / default_name
    grads_dir = Path(tempfile.gettempdir()) / f"streamc-bench-grads-{out_path.stem}"
    grads_dir.mkdir(exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    if args.profile:
        run_profile(args, log)
        return
    if args.report:
        data = load_results(out_path)
        for r in data["runs"]:
            summarize(r)
        out_path.write_text(json.dumps(data, indent=1))
        write_reports(out_path)
        return

    data = load_results(out_path)
    data["machine"] = {
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "torch_threads": 2, "ort_threads": 2,
        "limit_gb": args.limit_gb, "command": " ".join(["python -m benchmarks.streaming"] +
                                                        sys.argv[1:]),
        **_versions(),
    }
    limit = int(args.limit_gb * GIB)
    started = time.perf_counter()
    for job in build_jobs(args):
        kind, size, config = job["kind"], job["size"], job["config"]
        nd = 2 if kind == "2d" else 3
        record = dict(job, megapixels=round(size ** nd / 1e6, 3), steps=args.steps,
                      budget_gb=args.budget if job.get("tile") == "plan" else None)
        name = label(record) + f" @ {size}{'²' if nd == 2 else '³'}"
        if config in ("a", "b"):
            predicted = predict_peak(data, kind, config, job["width"], size)
            if kind == "2d" and size > args.torch_max:
                gb = "unknown" if predicted is None else f"{predicted / 1e9:.0f} GB"
                over = predicted is not None and predicted > MACHINE_GIB * GIB
                record.update(status="skipped", note=f"not run (> {args.torch_max}²); predicted "
                              f"{gb}" + (f", exceeds {MACHINE_GIB:g} GiB" if over else ""))
                if predicted is not None:
                    record["predicted_peak_bytes"] = int(predicted)
                save_results(out_path, data, record)
                log(f"{name}: {record['note']}")
                continue
            if predicted is not None and predicted > limit:
                where = (f"exceeds {MACHINE_GIB:g} GiB" if predicted > MACHINE_GIB * GIB else
                         f"exceeds the {args.limit_gb:g} GiB watchdog limit")
                record.update(status="skipped", predicted_peak_bytes=int(predicted),
                              note=f"predicted {predicted / 1e9:.0f} GB, {where}")
                save_results(out_path, data, record)
                log(f"{name}: not run ({record['note']})")
                continue
        tile_tag = job.get("tile") or "full"
        grads_path = grads_dir / f"{kind}_{job['width']}_{size}_{config}_{tile_tag}.npz"
        spec = dict(job, steps=args.steps, grads_path=str(grads_path), engine=args.engine,
                    budget_gb=args.budget)
        log(f"{name}: running ...")
        result = launch(spec, limit, args.timeout, log)
        record.update(result)
        summarize(record)
        if config != "a":
            diff = grad_rel_diff(grads_dir / f"{kind}_{job['width']}_{size}_a_full.npz",
                                 grads_path)
            if diff:
                record.update(diff)
        elif record.get("status") == "ok":
            for other in data["runs"]:  # (a) ran after (b)/(c): fill their column now
                if (other["kind"], other["size"], other["width"]) == (kind, size, job["width"]) \
                        and other["config"] != "a":
                    tag = other.get("tile") or "full"
                    diff = grad_rel_diff(grads_path, grads_dir /
                                         f"{kind}_{job['width']}_{size}_{other['config']}_{tag}.npz")
                    if diff:
                        other.update(diff)
        save_results(out_path, data, record)
        log(f"{name}: {_one_line(record)}")
    log(f"done in {time.perf_counter() - started:.0f} s -> {out_path}")
    write_reports(out_path)


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "onnxruntime", "onnx", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _one_line(r: dict) -> str:
    if r.get("status") != "ok":
        return f"{r.get('status')}: {r.get('note', '')}"
    s = (f"median {r['median_s']:.2f} s (min {r['min_s']:.2f}, max {r['max_s']:.2f}), "
         f"peak {r.get('peak_gb', float('nan')):.2f} GB, {r['s_per_mp']:.3f} s/MP")
    if r.get("grid"):
        s += f", grid {'x'.join(map(str, r['grid']))}"
    if r.get("grad_rel_diff") is not None:
        s += f", grad rel diff {r['grad_rel_diff']:.1e}"
    return s


# -- reports -----------------------------------------------------------------------------------

def markdown_table(runs: list[dict]) -> str:
    head = ("| config | size | MP | tile | step median s | min s | max s | peak GB | s/MP "
            "| CPU s/step | load | grad rel diff | note |\n"
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    rows = [head]
    for r in runs:
        nd = 2 if r["kind"] == "2d" else 3
        size = f"{r['size']}{'²' if nd == 2 else '³'}"
        mp = f"{r['megapixels']:.2f}" if r["megapixels"] < 10 else f"{r['megapixels']:.1f}"
        tile = "—"
        if r["config"] in ("c", "d"):
            tile = str(r.get("tile"))
            if r.get("tile") == "plan":
                tile = f"plan {r.get('budget_gb', 8):g} GiB" + (
                    f" → {r['planned_tile']}" if r.get("planned_tile") else "")
            if r.get("grid"):
                tile += f" ({'×'.join(map(str, r['grid']))})"
        if r.get("status") == "ok":
            cells = [f"{r['median_s']:.2f}", f"{r['min_s']:.2f}", f"{r['max_s']:.2f}",
                     f"{r.get('peak_gb', float('nan')):.2f}", f"{r['s_per_mp']:.3f}",
                     f"{r['cpu_median_s']:.1f}" if r.get("cpu_median_s") else "",
                     "–".join(f"{v:.0f}" for v in r.get("loadavg", []))]
        else:
            cells = ["—"] * 7
        diff = r.get("grad_rel_diff")
        note = r.get("note", "") if r.get("status") != "ok" else ""
        if r.get("status") == "ok" and r.get("engine") == "executor":
            note = "numpy executor"
        rows.append(f"| {label(r).split(' tile')[0]} | {size} | {mp} | {tile} | "
                    + " | ".join(cells) + f" | {'' if diff is None else f'{diff:.1e}'} | {note} |")
    return "\n".join(rows)


def targets(runs: list[dict]) -> list[str]:
    """The issue's targets, each met / missed / not measured, with the numbers."""
    def find(config, size, tile=None, kind="2d", width=64):
        for r in runs:
            if (r["kind"], r["config"], r["size"], r["width"]) == (kind, config, size, width) \
                    and (tile is None or r.get("tile") == tile):
                return r
        return None

    def ok(r):
        return r is not None and r.get("status") == "ok"

    out = []
    c8 = find("c", 8192, 2048)
    if ok(c8):
        peak = c8["peak_bytes"] / GIB
        out.append(f"- 8192², (c) tile 2048 completes a step within 6 GiB: "
                   f"**{'met' if peak <= 6 else 'missed'}** (peak {peak:.2f} GiB, "
                   f"step {c8['median_s']:.0f} s)")
    else:
        out.append("- 8192², (c) within 6 GiB: **not measured**"
                   + (f" ({c8.get('note')})" if c8 else ""))
    a8 = find("a", 8192)
    if a8 and a8.get("predicted_peak_bytes"):
        gb = a8["predicted_peak_bytes"] / GIB
        out.append(f"- 8192², (a) cannot run in 24 GiB: **{'met' if gb > 24 else 'missed'}** "
                   f"(predicted {gb:.1f} GiB from the measured growth; not run)")
    elif a8 and a8.get("status") == "stopped":
        out.append(f"- 8192², (a) cannot run in 24 GiB: **met** ({a8['note']})")
    elif ok(a8):
        out.append(f"- 8192², (a) cannot run in 24 GiB: **missed** (it ran, peak "
                   f"{a8['peak_bytes'] / GIB:.1f} GiB)")
    else:
        out.append("- 8192², (a) cannot run in 24 GiB: **not measured**")

    def ratio_line(size, tile, bound, goal=None, what=None):
        a, c = find("a", size), find("c", size, tile)
        what = what or f"tile {tile}"
        if ok(a) and ok(c):
            q = c["median_s"] / a["median_s"]
            s = (f"- {size}², (c) {what} ≤ {bound}× (a): **{'met' if q <= bound else 'missed'}** "
                 f"({c['median_s']:.1f} s vs {a['median_s']:.1f} s = {q:.2f}×")
            if goal:
                s += f"; goal {goal}× {'met' if q <= goal else 'missed'}"
            if c.get("cpu_median_s") and a.get("cpu_median_s"):
                s += f"; CPU time {c['cpu_median_s'] / a['cpu_median_s']:.2f}×"
            return s + ")"
        return f"- {size}², (c) {what} ≤ {bound}× (a): **not measured**"

    out.append(ratio_line(2048, 2048, 1.5, 1.1, "one tile (2048)"))
    out.append(ratio_line(4096, 2048, 1.8))
    plan = find("c", 4096, "plan")
    out.append(ratio_line(4096, "plan", 1.5, what="planner tile (8 GiB)"
                          + (f" = {plan['planned_tile']}" if plan and plan.get("planned_tile")
                             else "")))
    for tile in (1024, 2048):
        pts = [find("c", s, tile) for s in (2048, 4096, 8192)]
        pts = [p for p in pts if ok(p)]
        if len(pts) >= 2:
            spm = [p["s_per_mp"] for p in pts]
            mean = statistics.mean(spm)
            dev = max(abs(v - mean) / mean for v in spm)
            sizes = ", ".join(f"{p['size']}²: {p['s_per_mp']:.3f}" for p in pts)
            out.append(f"- tile {tile}, 4–67 MP, s/MP within ±20%: "
                       f"**{'met' if dev <= 0.2 else 'missed'}** "
                       f"(±{dev * 100:.0f}% around the mean, "
                       f"max/min {max(spm) / min(spm):.2f}×, {len(pts)} sizes; {sizes})")
            lo, hi = pts[0], pts[-1]
            grown = (hi["peak_bytes"] - lo["peak_bytes"]) / 1e9
            data_growth = ((3 * hi["size"] ** 2 * 4 + 2 * hi.get("cut_bytes", 0))
                           - (3 * lo["size"] ** 2 * 4 + 2 * lo.get("cut_bytes", 0))) / 1e9
            verdict = "met" if grown <= data_growth * 1.25 + 0.3 else "missed"
            out.append(f"- tile {tile}, peak growth {lo['size']}²→{hi['size']}² vs image + cut "
                       f"tensor (+ its gradient) bytes: **{verdict}** "
                       f"(+{grown:.2f} GB measured, +{data_growth:.2f} GB of image and cut "
                       f"tensors)")
        else:
            out.append(f"- tile {tile}, s/MP and peak growth over 4–67 MP: **not measured** "
                       f"({len(pts)} size(s) ran)")
    return out


def write_reports(json_path: Path) -> None:
    data = load_results(json_path)
    runs = data["runs"]
    stem = json_path.stem
    md = [f"# streamc vs torch: training-step time and peak memory ({stem})", "",
          "Generated by `python -m benchmarks.streaming` "
          f"(`{data.get('machine', {}).get('command', '')}`) on "
          f"{data.get('machine', {}).get('cpus')} "
          "CPUs; torch and ORT with 2 threads each. Step: forward, cross-entropy, backward, SGD; "
          "median/min/max of the timed steps after one warm-up. Peak: resident-memory high-water "
          "mark of the training steps (VmHWM reset before the warm-up). s/MP: median step over "
          "megapixels (megavoxels for ³). CPU s/step: process CPU time per step (both threads; "
          "robust to other load on the machine). Load: 1-minute load average before and after "
          "the timed steps (2 cores: above 2 means the step shared the CPUs). Grad rel diff: "
          "max over parameters of max|g − g_a| / max|g_a| on the first step, against (a) at the "
          "same size.", ""]
    for kind, title in (("2d", "2-D"), ("3d", "3-D")):
        sel = [r for r in runs if r["kind"] == kind]
        if sel:
            widths = sorted({r["width"] for r in sel})
            md += [f"## {title} (width {', '.join(map(str, widths))})", "", markdown_table(sel),
                   ""]
    if stem == "streaming":
        md += ["## Targets", ""] + targets(runs) + [""]
    (json_path.parent / f"{stem}.md").write_text("\n".join(md))
    try:
        plot(runs, json_path.parent / f"{stem}.png")
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict[str, list] = {}
    for r in runs:
        if r.get("status") != "ok":
            continue
        name = label(r).replace(" tile plan", " plan") + (" (3-D)" if r["kind"] == "3d" else "")
        series.setdefault(name, []).append(r)
    for name, pts in sorted(series.items()):
        pts.sort(key=lambda r: r["megapixels"])
        mp = [p["megapixels"] for p in pts]
        style = "--" if "3-D" in name else "-"
        axes[0].plot(mp, [p["median_s"] for p in pts], style, marker="o", label=name)
        axes[1].plot(mp, [p["peak_bytes"] / GIB for p in pts], style, marker="o", label=name)
    for r in runs:
        if r.get("predicted_peak_bytes"):
            axes[1].scatter([r["megapixels"]], [r["predicted_peak_bytes"] / GIB], marker="x",
                            color="red", zorder=5)
    axes[1].axhline(MACHINE_GIB, color="grey", ls=":", lw=1)
    axes[1].text(0.02, 0.97, "dotted: 24 GiB (this machine); ×: predicted, not run",
                 fontsize=8, color="grey", transform=axes[1].transAxes, va="top")
    for ax, ylabel in zip(axes, ("training step, s (median)", "peak resident memory, GiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("megapixels (megavoxels for 3-D)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("ResNet-18 training step on 2 CPU cores: torch vs streamc")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_profile(args, log) -> None:
    """Profile (d) if ``--configs`` names it, else (c), at ``--profile`` size for each tile in
    ``--tiles`` (numbers only)."""
    out_path = RESULTS / "streaming_profile.json"
    data = load_results(out_path)
    data.setdefault("profiles", [])
    config = "d" if "d" in args.configs.split(",") else "c"
    for t in [t for t in args.tiles.split(",") if t.isdigit()]:
        tile = min(int(t), args.profile)
        spec = dict(kind="2d", config=config, size=args.profile, tile=tile, width=args.width,
                    steps=0, engine="module", flops=True,
                    profile=str(Path(tempfile.gettempdir()) / "streamc-profile"))
        log(f"profiling ({config}) at {args.profile}² tile {tile} ...")
        rec = launch(spec, int(args.limit_gb * GIB), args.timeout, log)
        rec.update(size=args.profile, tile=tile, width=args.width, config=config)
        data["profiles"] = [p for p in data["profiles"]
                            if (p.get("size"), p.get("tile"), p.get("width"),
                                p.get("config", "c")) !=
                            (args.profile, tile, args.width, config)] + [rec]
        log(json.dumps(rec, indent=1))
    data.pop("runs", None)
    out_path.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
