"""``streamc check``: a compiled program against an untiled run of the same model.

Both sides run on ONNX Runtime's CPU provider with the same random image, weights and output
cotangents. The tiled side is the program (tile forward, head, head backward, tile backward);
the untiled side is the prepared model and its whole-graph backward from the same autodiff pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from streamc.compiler import compile as compile_program
from streamc.graph import load_model, prepare
from streamc.passes.autodiff import build_backward
from streamc.program import Program
from streamc.runtime.executor import ProgramExecutor, SessionFactory


@dataclass
class Difference:
    """Largest absolute and relative difference of one tensor (relative to its largest value)."""

    name: str
    max_abs: float
    max_rel: float

    def to_dict(self) -> dict:
        return {"name": self.name, "max_abs": self.max_abs, "max_rel": self.max_rel}


@dataclass
class CheckReport:
    """Differences of every output and every parameter gradient, and whether all pass."""

    program: Program
    tolerance: float
    outputs: list[Difference] = field(default_factory=list)
    gradients: list[Difference] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(d.max_rel <= self.tolerance for d in self.outputs + self.gradients)

    @property
    def worst(self) -> Difference | None:
        items = self.outputs + self.gradients
        return max(items, key=lambda d: d.max_rel) if items else None

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "tolerance": self.tolerance,
            "tiles": len(self.program.tiles),
            "outputs": [d.to_dict() for d in self.outputs],
            "gradients": [d.to_dict() for d in self.gradients],
        }


def difference(name: str, actual: np.ndarray, expected: np.ndarray) -> Difference:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        return Difference(name, float("inf"), float("inf"))
    diff = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    return Difference(name, diff, diff / scale if scale > 0 else diff)


def untiled_reference(model: onnx.ModelProto, image: np.ndarray, params: dict[str, np.ndarray],
                      output_grads: dict[str, np.ndarray], trainable: Sequence[str]
                      ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Outputs and parameter gradients of the whole model on ORT, without tiling."""
    factory = SessionFactory()
    outputs = [o.name for o in model.graph.output]
    backward = build_backward(model, wrt=list(trainable), outputs=list(output_grads),
                              keep_outputs=True, name="untiled_backward")
    session = factory(backward.model.SerializeToString())
    input_name = next(i.name for i in model.graph.input
                      if i.name not in {t.name for t in model.graph.initializer})
    feeds = {input_name: image}
    graph_inputs = {i.name for i in session.get_inputs()}
    feeds.update({k: v for k, v in params.items() if k in graph_inputs})
    for out, cot in backward.cotangents.items():
        feeds[cot] = output_grads[out]
    names = [backward.outputs[o] for o in outputs if o in backward.outputs]
    grad_names = list(backward.gradients.items())
    results = session.run(names + [n for _, n in grad_names], feeds)
    out_values = dict(zip([o for o in outputs if o in backward.outputs], results[:len(names)]))
    grads = {wrt: value for (wrt, _), value in zip(grad_names, results[len(names):])}
    return out_values, grads


def check(
    model: str | Path | onnx.ModelProto,
    image: Sequence[int] | None,
    tile: int | str | Sequence[int],
    input: str | None = None,
    seed: int = 0,
    tolerance: float = 1e-4,
    program: Program | None = None,
) -> CheckReport:
    """Compile (unless ``program`` is given) and compare tiled with untiled results."""
    proto = load_model(model)
    program = program or compile_program(proto, tile, image=image, input=input, with_flops=False)
    rng = np.random.default_rng(seed)
    shape = program.input_shape
    img = rng.standard_normal(shape).astype(np.float32)
    params = {k: np.asarray(v) for k, v in program.parameters.items()}
    executor = ProgramExecutor(program)
    # The cotangents need the outputs' shapes: run the forward once and reuse its cut tensors.
    cuts = executor.forward_prefix(img, params)
    outputs = executor.forward_head(cuts, params)
    output_grads = {k: rng.standard_normal(v.shape).astype(np.float32)
                    for k, v in outputs.items() if v.dtype == np.float32}
    grads = executor.backward(img, params, cuts, output_grads)
    trainable = [p["name"] for p in program.meta["parameters"] if p["trainable"]]
    prepared = prepare(proto, program.image_size, program.input_name, batch=shape[0])
    ref_outputs, ref_grads = untiled_reference(prepared, img, params, output_grads, trainable)
    report = CheckReport(program, tolerance)
    for name, value in ref_outputs.items():
        report.outputs.append(difference(name, outputs[name], value))
    for name in trainable:
        expected = ref_grads.get(name)
        actual = grads.get(name)
        if expected is None and actual is None:
            continue
        if actual is None:
            actual = np.zeros_like(expected)
        if expected is None:
            expected = np.zeros_like(actual)
        report.gradients.append(difference(name, actual, expected))
    return report
