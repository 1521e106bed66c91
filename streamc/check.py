"""``streamc check``: a compiled program against an untiled run of the same model.

Both sides run on ONNX Runtime's CPU provider with the same random image, weights and output
cotangents. The tiled side is the program run by the runtime's interpreter with the runtime's
policy (the same steps, order and sessions as training, on numpy arrays); the untiled side is
the prepared model and its whole-graph backward from the same autodiff pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from streamc.compiler import compile as compile_program
from streamc.graph import load_model, prepare
from streamc.passes.autodiff import build_backward
from streamc.policy import DEFAULT_POLICY, RuntimePolicy
from streamc.program import Program
from streamc.runtime.backend import NumpyBackend
from streamc.runtime.interpreter import Interpreter
from streamc.runtime.options import RuntimeOptions
from streamc.runtime.weights import WeightSet


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
                      output_grads: dict[str, np.ndarray], trainable: Sequence[str],
                      threads: int | None = None
                      ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Outputs and parameter gradients of the whole model on ORT, without tiling."""
    import onnxruntime as ort

    outputs = [o.name for o in model.graph.output]
    backward = build_backward(model, wrt=list(trainable), outputs=list(output_grads),
                              keep_outputs=True, name="untiled_backward")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(backward.model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
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


def run_program(program: Program, image: np.ndarray, params: dict[str, np.ndarray],
                cotangents: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None,
                policy: RuntimePolicy = DEFAULT_POLICY, threads: int | None = None,
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Run ``program`` on numpy arrays through the runtime's interpreter: outputs by name, and
    with ``cotangents`` (outputs by name -> their cotangents) the parameter gradients."""
    backend = NumpyBackend(program, RuntimeOptions(policy=policy, threads=threads))
    interpreter = Interpreter(program, backend, progress=False)
    names = interpreter.output_names

    def output_grads(outputs: list[np.ndarray]) -> list[np.ndarray | None]:
        wanted = cotangents(dict(zip(names, outputs)))
        return [wanted.get(name) for name in names]

    outputs, grads = interpreter.run(image, WeightSet(dict(params)),
                                     output_grads if cotangents is not None else None)
    return dict(zip(names, outputs)), grads


def check(
    model: str | Path | onnx.ModelProto,
    image: Sequence[int] | None,
    tile: int | str | Sequence[int],
    input: str | None = None,
    seed: int = 0,
    tolerance: float = 1e-4,
    program: Program | None = None,
    policy: RuntimePolicy = DEFAULT_POLICY,
) -> CheckReport:
    """Compile (unless ``program`` is given) and compare tiled with untiled results."""
    proto = load_model(model)
    program = program or compile_program(proto, tile, image=image, input=input, with_flops=False)
    rng = np.random.default_rng(seed)
    shape = program.input_shape
    img = rng.standard_normal(shape).astype(np.float32)
    params = {k: np.asarray(v) for k, v in program.parameters.items()}
    output_grads: dict[str, np.ndarray] = {}

    def cotangents(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        output_grads.update({k: rng.standard_normal(v.shape).astype(np.float32)
                             for k, v in outputs.items() if v.dtype == np.float32})
        return output_grads

    outputs, grads = run_program(program, img, params, cotangents, policy)
    trainable = program.meta.trainable
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
