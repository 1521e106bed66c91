"""ReLU and LeakyReLU gradients on ONNX Runtime's CPU provider: ``Where`` against a mask.

A ReLU's VJP zeroes the output gradient where the output is not positive. Three standard-ONNX
forms of it, each a two-input graph (``y`` the ReLU output, ``dy`` its cotangent) run on ORT's
CPU provider with 2 threads and no graph optimisation (how backward graphs run by default),
timed in interleaved rounds so that background load hits them alike (medians):

- ``where``: ``Where(Greater(y, 0), dy, 0)``, the rule before ``ops.vjp.common.masked``;
- ``cast_mul``: ``Mul(dy, Cast(Greater(y, 0)))``, the rule now;
- ``sign_mul``: ``Mul(dy, Sign(y))`` (``y >= 0``, so ``Sign(y)`` is the mask).

and LeakyReLU's (slope 0.1, ``y`` read as its input):

- ``leaky_where``: ``Where(Greater(y, 0), dy, Mul(dy, 0.1))``, the rule before;
- ``leaky_max``: ``Mul(dy, Max(Cast(Greater(y, 0)), 0.1))``, the rule now.

Each result is checked equal to ``where``'s (``leaky_max`` to ``leaky_where``'s).

    python benchmarks/vjp_mask.py          # under a minute

Writes ``benchmarks/results/vjp_mask.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

RESULTS = Path(__file__).parent / "results" / "vjp_mask.json"
SHAPES = [(32, 512), (64, 256), (64, 1024)]


def graph(form: str, shape: list[int]) -> bytes:
    y, dy = (helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("y", "dy"))
    dx = helper.make_tensor_value_info("dx", TensorProto.FLOAT, shape)
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    slope = helper.make_tensor("slope", TensorProto.FLOAT, [], [0.1])
    positive = helper.make_node("Greater", ["y", "zero"], ["m"])
    nodes = {
        "where": [positive, helper.make_node("Where", ["m", "dy", "zero"], ["dx"])],
        "cast_mul": [positive, helper.make_node("Cast", ["m"], ["f"], to=TensorProto.FLOAT),
                     helper.make_node("Mul", ["dy", "f"], ["dx"])],
        "sign_mul": [helper.make_node("Sign", ["y"], ["f"]),
                     helper.make_node("Mul", ["dy", "f"], ["dx"])],
        "leaky_where": [positive, helper.make_node("Mul", ["dy", "slope"], ["s"]),
                        helper.make_node("Where", ["m", "dy", "s"], ["dx"])],
        "leaky_max": [positive, helper.make_node("Cast", ["m"], ["f"], to=TensorProto.FLOAT),
                      helper.make_node("Max", ["f", "slope"], ["g"]),
                      helper.make_node("Mul", ["dy", "g"], ["dx"])],
    }[form]
    used = ([zero] if form != "sign_mul" else []) + ([slope] if "leaky" in form else [])
    model = helper.make_model(helper.make_graph(nodes, form, [y, dy], [dx], used),
                              opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    forms = ("where", "cast_mul", "sign_mul", "leaky_where", "leaky_max")
    rows = []
    rng = np.random.default_rng(0)
    for channels, size in SHAPES:
        shape = [1, channels, size, size]
        relu = {"y": np.maximum(rng.standard_normal(shape, dtype=np.float32), 0),
                "dy": rng.standard_normal(shape, dtype=np.float32)}
        leaky = {"y": rng.standard_normal(shape, dtype=np.float32), "dy": relu["dy"]}
        sessions = {f: ort.InferenceSession(graph(f, shape), options,
                                            providers=["CPUExecutionProvider"]) for f in forms}
        feeds = {f: leaky if "leaky" in f else relu for f in forms}
        times: dict[str, list[float]] = {f: [] for f in forms}
        for f in forms:
            reference = "leaky_where" if "leaky" in f else "where"
            if not np.array_equal(sessions[f].run(None, feeds[f])[0],
                                  sessions[reference].run(None, feeds[f])[0]):
                raise SystemExit(f"{f} differs from {reference} at {shape}")
        for _ in range(args.rounds):
            for f in forms:
                started = time.perf_counter()
                sessions[f].run(None, feeds[f])
                times[f].append(time.perf_counter() - started)
        row = {"shape": shape, "MiB": 4 * int(np.prod(shape)) / 2**20,
               **{f"{f}_ms": round(1e3 * statistics.median(times[f]), 2) for f in forms}}
        row["where_over_cast_mul"] = round(row["where_ms"] / row["cast_mul_ms"], 2)
        row["leaky_where_over_leaky_max"] = round(row["leaky_where_ms"] / row["leaky_max_ms"], 2)
        rows.append(row)
        print(row, flush=True)
    out = {"command": "python benchmarks/vjp_mask.py " + " ".join(sys.argv[1:]),
           "machine": {"python": platform.python_version(), "onnxruntime": ort.__version__,
                       "threads": 2}, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
