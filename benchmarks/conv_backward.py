"""Conv backward: streamc's emitted ONNX graphs on ONNX Runtime vs torch, side by side.

For each (channels, size, stride) a 3×3 Conv (pads 1, N=1, float32) is differentiated with
:func:`streamc.passes.autodiff.build_backward`, once for dX (wrt the input; W stays an
initializer) and once for dW (wrt W). Each emitted graph runs on ONNX Runtime's CPU provider, at the
optimisation level streamc runs backward graphs at (``RuntimePolicy.backward_optimization``), and
is timed against torch's own kernels (``aten.convolution_backward`` with one output mask, which
is what autograd calls). Forward convolutions are timed too, for scale, and so is the copy-free
alternative for dW: one Conv with batch and channel axes swapped (:func:`swapped_dw_model`).
All variants are timed in interleaved rounds (so that background load hits them alike); the
table reports medians.

    python benchmarks/conv_backward.py            # default shapes, under 3 minutes
    python benchmarks/conv_backward.py --full     # adds 64 channels at 1024²

Writes benchmarks/results/conv_backward.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from streamc.ops.vjp import conv as conv_vjp
from streamc.passes.autodiff import build_backward
from streamc.policy import DEFAULT_POLICY
from streamc.runtime.sessions import ORT_LEVELS

DEFAULT_SHAPES = [(64, 256, 1), (64, 256, 2), (128, 512, 1), (128, 512, 2)]
FULL_SHAPES = DEFAULT_SHAPES + [(64, 1024, 1), (64, 1024, 2)]
RESULTS = Path(__file__).parent / "results" / "conv_backward.json"


def conv_model(channels: int, size: int, stride: int) -> onnx.ModelProto:
    """One 3×3 Conv, pads 1, N=1, channels -> channels."""
    out = (size + 2 - 3) // stride + 1
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((channels, channels, 3, 3)) * 0.05).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], strides=[stride] * 2)
    graph = helper.make_graph(
        [node], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, out, out])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def swapped_dw_model(channels: int, size: int, stride: int) -> onnx.ModelProto:
    """dW of :func:`conv_model` as one Conv with batch and channel axes swapped, no window copies.

    X (1, C, H, W) read as C one-channel images (C, 1, H, W), dY (1, M, h, w) as M one-channel
    kernels (M, 1, h, w) dilated by the stride: their Conv, cropped to the first 3×3 positions
    (a stride that does not divide the padded extent leaves one more), is (C, M, 3, 3), W's
    gradient with its two leading axes swapped."""
    out = (size + 2 - 3) // stride + 1
    nodes = [
        helper.make_node("Transpose", ["x"], ["images"], perm=[1, 0, 2, 3]),
        helper.make_node("Transpose", ["dy"], ["kernels"], perm=[1, 0, 2, 3]),
        helper.make_node("Conv", ["images", "kernels"], ["full"], pads=[1, 1, 1, 1],
                         dilations=[stride, stride]),
        helper.make_node("Slice", ["full", "zeros", "threes", "axes"], ["swapped"]),
        helper.make_node("Transpose", ["swapped"], ["dw"], perm=[1, 0, 2, 3]),
    ]
    graph = helper.make_graph(
        nodes, "conv_dw_swapped",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size]),
         helper.make_tensor_value_info("dy", TensorProto.FLOAT, [1, channels, out, out])],
        [helper.make_tensor_value_info("dw", TensorProto.FLOAT, [channels, channels, 3, 3])],
        [numpy_helper.from_array(np.array(v, np.int64), name)
         for name, v in (("zeros", [0, 0]), ("threes", [3, 3]), ("axes", [2, 3]))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def session(model: onnx.ModelProto, threads: int, level: str = "all") -> ort.InferenceSession:
    """A CPU session at ONNX Runtime optimisation ``level`` (streamc's policy names)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[level])
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def timed_rounds(
    runs: dict[str, Callable[[], object]], reps: int, clock: Callable[[], float]
) -> dict[str, list[float]]:
    """Milliseconds per callable, over ``reps`` interleaved rounds (after a warm-up)."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            start = clock()
            run()
            times[name].append(1000 * (clock() - start))
    return times


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def measure(channels: int, size: int, stride: int, reps: int, threads: int,
            clock: Callable[[], float] = time.perf_counter) -> dict:
    model = conv_model(channels, size, stride)
    weight = numpy_helper.to_array(model.graph.initializer[0])
    out = (size + 2 - 3) // stride + 1
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, channels, size, size)).astype(np.float32)
    dy = rng.standard_normal((1, channels, out, out)).astype(np.float32)

    dx_graph = build_backward(model, ["x"])
    dw_graph = build_backward(model, ["w"])
    forward = session(model, threads)
    # the backward graphs at the level streamc runs them (its default policy)
    level = DEFAULT_POLICY.backward_optimization
    dx_session = session(dx_graph.model, threads, level)
    dw_session = session(dw_graph.model, threads, level)
    swapped_session = session(swapped_dw_model(channels, size, stride), threads, level)
    swapped_feeds = {"x": x, "dy": dy}
    dx_feeds = {"x": x, dx_graph.cotangents["y"]: dy}
    dw_feeds = {"x": x, "w": weight, dw_graph.cotangents["y"]: dy}
    dw_feeds = {k: v for k, v in dw_feeds.items()
                if k in {i.name for i in dw_graph.model.graph.input}}

    xt, wt, dyt = torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(dy)

    def torch_backward(mask: list[bool]) -> Callable[[], object]:
        return lambda: torch.ops.aten.convolution_backward(
            dyt, xt, wt, None, [stride] * 2, [1, 1], [1, 1], False, [0, 0], 1, mask)

    with torch.no_grad():
        runs = {
            "ort_forward": lambda: forward.run(None, {"x": x}),
            "torch_forward": lambda: torch.nn.functional.conv2d(xt, wt, padding=1,
                                                                stride=stride),
            "ort_dx": lambda: dx_session.run(None, dx_feeds),
            "torch_dx": torch_backward([True, False, False]),
            "ort_dw": lambda: dw_session.run(None, dw_feeds),
            "torch_dw": torch_backward([False, True, False]),
            "ort_dw_swapped": lambda: swapped_session.run(None, swapped_feeds),
        }
        times = timed_rounds(runs, reps, clock)
        ms = {name: statistics.median(values) for name, values in times.items()}
        best = {name: min(values) for name, values in times.items()}
        torch_dx, torch_dw, _ = torch.ops.aten.convolution_backward(
            dyt, xt, wt, None, [stride] * 2, [1, 1], [1, 1], False, [0, 0], 1,
            [True, True, False])
    errors = {
        "dx": relative_error(dx_session.run(None, dx_feeds)[0], torch_dx.numpy()),
        "dw": relative_error(dw_session.run(None, dw_feeds)[0], torch_dw.numpy()),
        "dw_swapped": relative_error(swapped_session.run(None, swapped_feeds)[0],
                                     torch_dw.numpy()),
    }
    return {
        "channels": channels, "size": size, "stride": stride, "ms": ms,
        "dx_ratio": ms["ort_dx"] / ms["torch_dx"], "dw_ratio": ms["ort_dw"] / ms["torch_dw"],
        "dw_swapped_ratio": ms["ort_dw_swapped"] / ms["torch_dw"],
        "ms_min": best, "dx_ratio_min": best["ort_dx"] / best["torch_dx"],
        "dw_ratio_min": best["ort_dw"] / best["torch_dw"], "ms_all": times,
        "relative_error": errors,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| ch, size, stride | ORT fwd | torch fwd | ORT dX | torch dX | dX ratio "
        "| ORT dW | torch dW | dW ratio | swapped dW | swapped ratio | ratio of minima dX / dW "
        "| rel. err dX / dW / swapped dW |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = r["ms"]
        lines.append(
            f"| {r['channels']}, {r['size']}², s{r['stride']} | {ms['ort_forward']:.0f} "
            f"| {ms['torch_forward']:.0f} | {ms['ort_dx']:.0f} | {ms['torch_dx']:.0f} "
            f"| {r['dx_ratio']:.2f} | {ms['ort_dw']:.0f} | {ms['torch_dw']:.0f} "
            f"| {r['dw_ratio']:.2f} | {ms['ort_dw_swapped']:.0f} | {r['dw_swapped_ratio']:.2f} "
            f"| {r['dx_ratio_min']:.2f} / {r['dw_ratio_min']:.2f} "
            f"| {r['relative_error']['dx']:.0e} / "
            f"{r['relative_error']['dw']:.0e} / {r['relative_error']['dw_swapped']:.0e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also run 64 channels at 1024²")
    parser.add_argument("--shape", action="append", default=None, metavar="CH,SIZE,STRIDE",
                        help="measure only this shape (repeatable), e.g. --shape 64,1024,1")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds per shape")
    parser.add_argument("--threads", type=int, default=2, help="ORT and torch threads")
    parser.add_argument("--chunk-mb", type=int, default=None,
                        help="override streamc.ops.vjp.conv.DW_CHUNK_BYTES (MiB)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or this process's CPU time (steadier on a busy "
                        "machine; use it with --threads 1, as idle threads may spin)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.chunk_mb is not None:
        conv_vjp.DW_CHUNK_BYTES = args.chunk_mb << 20
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    shapes = FULL_SHAPES if args.full else DEFAULT_SHAPES
    if args.shape:
        shapes = [tuple(int(v) for v in text.split(",")) for text in args.shape]
    for channels, size, stride in shapes:
        rows.append(measure(channels, size, stride, args.reps, args.threads,
                            CLOCKS[args.clock]))
        print(f"done {channels}, {size}², s{stride}", flush=True)
    table = markdown(rows)
    print(f"\nmilliseconds ({args.clock} clock), median of {args.reps} interleaved rounds, "
          f"{args.threads} threads\n")
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "command": " ".join(["python benchmarks/conv_backward.py", *sys.argv[1:]]),
        "reps": args.reps, "threads": args.threads, "clock": args.clock,
        "dw_chunk_bytes": conv_vjp.DW_CHUNK_BYTES,
        "load_average_before_after": [load_before, os.getloadavg()],
        "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__,
                     "onnx": onnx.__version__, "python": platform.python_version()},
        "machine": platform.processor() or platform.machine(),
        "rows": rows, "markdown": table,
    }, indent=2))


if __name__ == "__main__":
    main()
