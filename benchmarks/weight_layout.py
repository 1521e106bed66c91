"""The layout of a Conv weight gradient on ONNX Runtime: one Transpose against two.

The dense weight-gradient rule (``streamc/ops/vjp/conv.py``) ends with a product laid out as
(kernel rows, C, kernel columns, M); W's layout is (M, C, kernel rows, kernel columns). The
gradient-layout graph (``passes/hoist.py``) does that once per backward pass for every Conv.
This times, on ORT's CPU provider with the backward graphs' settings (no graph optimisation, 2
threads), the single Transpose with the combined permutation against what the rule emits now:
a Transpose that swaps the two leading axes (moving rows of kernel-columns x M values), then one
2-D Transpose (``_m_first``); numpy's copy is timed for scale. Both ORT forms are checked equal
to numpy's. Each variant runs in interleaved rounds; the table gives the minimum per variant.

    python benchmarks/weight_layout.py      # under a minute

Writes benchmarks/results/weight_layout.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

RESULTS = Path(__file__).parent / "results" / "weight_layout.json"
SHAPES = [(64, 64), (128, 128), (256, 256), (512, 512), (256, 512)]  # (C, M), 3x3 kernels
KERNEL = 3


def _session(nodes: list, constants: dict[str, list[int]], shape: tuple[int, ...],
             threads: int) -> ort.InferenceSession:
    graph = helper.make_graph(
        nodes, "layout", [helper.make_tensor_value_info("p", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def measure(c: int, m: int, reps: int, threads: int) -> dict:
    k = KERNEL
    product = np.random.default_rng(0).random((k, c, k, m), dtype=np.float32)
    expected = product.transpose(3, 1, 0, 2)
    node = helper.make_node
    one = _session([node("Transpose", ["p"], ["w"], perm=[3, 1, 0, 2])], {}, product.shape,
                   threads)
    two = _session([node("Reshape", ["p", "rows"], ["r"]),
                    node("Transpose", ["r"], ["s"], perm=[1, 0, 2]),
                    node("Reshape", ["s", "flat"], ["f"]),
                    node("Transpose", ["f"], ["t"], perm=[1, 0]),
                    node("Reshape", ["t", "out"], ["w"])],
                   {"rows": [k, c, k * m], "flat": [c * k * k, m], "out": [m, c, k, k]},
                   product.shape, threads)
    runs = {
        "one_transpose": lambda: one.run(None, {"p": product})[0],
        "two_transposes": lambda: two.run(None, {"p": product})[0],
        "numpy": lambda: np.ascontiguousarray(product.transpose(3, 1, 0, 2)),
    }
    for name, run in runs.items():
        if not np.array_equal(run(), expected):
            raise AssertionError(f"{name} gives a different layout")
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(1000 * (time.perf_counter() - start))
    best = {name: min(v) for name, v in times.items()}
    return {"C": c, "M": m, "kernel": k, "ms_min": best, "ms_all": times,
            "one_over_two": best["one_transpose"] / best["two_transposes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    load = os.getloadavg()
    rows = [measure(c, m, args.reps, args.threads) for c, m in SHAPES]
    lines = ["| C, M (3x3) | one Transpose ms | two Transposes ms | numpy ms | one / two |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        ms = r["ms_min"]
        lines.append(f"| {r['C']}, {r['M']} | {ms['one_transpose']:.2f} "
                     f"| {ms['two_transposes']:.2f} | {ms['numpy']:.2f} "
                     f"| {r['one_over_two']:.1f} |")
    table = "\n".join(lines)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "command": "python benchmarks/weight_layout.py",
        "reps": args.reps, "threads": args.threads,
        "load_average_before_after": [load, os.getloadavg()],
        "versions": {"onnxruntime": ort.__version__, "onnx": onnx.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "rows": rows, "markdown": table,
    }, indent=2))


if __name__ == "__main__":
    main()
