"""Conv weight gradients with fewer window copies, on ONNX Runtime: what the rule emits against
forms that copy less.

For a 3×3, stride-1 Conv, the dense weight-gradient rule (``_dense_weight_grad`` in
``streamc/ops/vjp/conv.py``) copies the input's three row windows into one matrix (Slice +
Concat), dY's three column shifts into another, and runs one Gemm. Copying less means more,
smaller Gemms, or longer ones:

- ``emitted``: 3 X windows concatenated (3C, L) · 3 dY shifts concatenated (3M, L)ᵀ, one Gemm;
- ``no_x_concat``: the 3 X windows uncopied into a matrix: 3 Gemms (C, L) · (3M, L)ᵀ;
- ``no_concat``: nothing concatenated: 9 Gemms (C, L) · (M, L)ᵀ;
- ``x_whole``: X not sliced at all; dY shifted by each tap's whole offset, (9M, L') · one Gemm.

Inputs are the flattened, padded phase layout the rule builds (N = 1). ORT CPU provider, graph
optimisations off and 2 threads (the backward graphs' settings); interleaved rounds, medians.
The first three are checked equal.

    python benchmarks/dw_copies.py      # about a minute

Writes benchmarks/results/dw_copies.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = [(64, 128), (128, 64), (256, 32), (512, 16), (64, 256)]  # (channels, tile side)
VARIANTS = ("emitted", "no_x_concat", "no_concat", "x_whole")
RESULTS = Path(__file__).parent / "results" / "dw_copies.json"


def dw_model(variant: str, c: int, h: int) -> tuple[onnx.ModelProto, int, int]:
    """The weight gradient of a 3×3 Conv (C -> C channels, h×h output, pads 1) in ``variant``;
    with the lengths of its flattened X and dY inputs."""
    row = h + 2  # one padded row of the phase
    length = h * row  # positions a tap's window covers
    x_length, dy_length = (h + 3) * row, (h + 1) * row  # spare row; dY's leading zero row
    nodes, inits = [], []

    def ints(values) -> str:
        name = f"c{len(inits)}"
        inits.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
        return name

    def op(op_type: str, *inputs: str, **attrs) -> str:
        out = f"t{len(nodes)}"
        nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def window(x: str, start: int, size: int) -> str:
        return op("Slice", x, ints([start]), ints([start + size]), ints([1]))

    if variant == "x_whole":
        shifts = []
        for o in range(3):
            for j in range(3):
                moved = op("Pad", "dy", ints([0, o * row + j, 0, x_length - dy_length]))
                shifts.append(window(moved, 0, x_length))
        out = op("Gemm", "x", op("Concat", *shifts, axis=0), transB=1)
    else:
        xs = [window("x", o * row, length) for o in range(3)]
        dys = [window("dy", row - j, length) for j in range(3)]
        if variant == "emitted":
            out = op("Gemm", op("Concat", *xs, axis=0), op("Concat", *dys, axis=0), transB=1)
        elif variant == "no_x_concat":
            moved = op("Concat", *dys, axis=0)
            out = op("Concat", *[op("Gemm", x, moved, transB=1) for x in xs], axis=0)
        else:
            out = op("Concat", *[op("Concat", *[op("Gemm", x, d, transB=1) for d in dys], axis=1)
                                 for x in xs], axis=0)
    graph = helper.make_graph(
        nodes, "dw",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [c, x_length]),
         helper.make_tensor_value_info("dy", TensorProto.FLOAT, [c, dy_length])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, x_length, dy_length


def _session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def measure(c: int, h: int, rounds: int, threads: int) -> dict:
    sessions, feeds = {}, None
    for variant in VARIANTS:
        model, x_length, dy_length = dw_model(variant, c, h)
        sessions[variant] = _session(model, threads)
        if feeds is None:
            rng = np.random.default_rng(0)
            feeds = {"x": rng.standard_normal((c, x_length)).astype(np.float32),
                     "dy": rng.standard_normal((c, dy_length)).astype(np.float32)}
    reference = sessions["emitted"].run(None, feeds)[0]
    for variant in ("no_x_concat", "no_concat"):
        np.testing.assert_allclose(sessions[variant].run(None, feeds)[0], reference,
                                   rtol=1e-4, atol=1e-3)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for variant in VARIANTS:
            start = time.perf_counter()
            sessions[variant].run(None, feeds)
            times[variant].append(time.perf_counter() - start)
    ms = {v: round(statistics.median(t) * 1e3, 2) for v, t in times.items()}
    return {"channels": c, "output": [h, h], "median_ms": ms,
            "over_emitted": {v: round(ms[v] / ms["emitted"], 3) for v in VARIANTS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    rows = []
    for c, h in SHAPES:
        rows.append(measure(c, h, args.rounds, args.threads))
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps({
        "command": f"python benchmarks/dw_copies.py --rounds {args.rounds} --threads "
                   f"{args.threads}",
        "machine": platform.machine(), "onnxruntime": ort.__version__, "results": rows},
        indent=1) + "\n")


if __name__ == "__main__":
    main()
