"""``streamc check``: a compiled program against an untiled run of the same model, and the
gradients against finite differences.

All runs are on ONNX Runtime's CPU provider with the same random image, weights and output
cotangents ``c`` of the loss ``L = Σ ⟨output, c⟩``:

- **tiled**: the program, run by the runtime's interpreter with the runtime's policy (the same
  steps, order and sessions as training, on numpy arrays);
- **untiled**: the prepared model and its whole-graph backward graph, twice: with ORT's graph
  optimisations and without. The two differ only by float32 rounding (fusions reorder the
  arithmetic), so their difference measures this model's float32 noise: each tensor passes
  when the tiled result is within ``max(tolerance, NOISE_FACTOR × noise)`` of the untiled one.
  A deep network does not fail for rounding, and a tiling bug, far larger, still does.
- **finite differences**: the directional derivative of ``L`` along random parameter
  directions, from forward runs of the untiled model at ``θ ± ε·v``, against ``⟨∇L, v⟩`` from
  the tiled gradients. It shares nothing with streamc's autodiff, so it catches an autodiff bug
  that tiled-vs-untiled cannot (both sides use the same backward rules).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from streamc.compiler import GridEnd
from streamc.compiler import compile as compile_program
from streamc.errors import StreamcError
from streamc.graph import load_model, prepare
from streamc.passes.autodiff import build_backward
from streamc.passes.extract import model_graph
from streamc.passes.schedule import DEFAULT_HALO
from streamc.policy import DEFAULT_POLICY, RuntimePolicy
from streamc.program import Program
from streamc.runtime.backend import NumpyBackend
from streamc.runtime.interpreter import Interpreter
from streamc.runtime.options import RuntimeOptions
from streamc.runtime.weights import WeightSet
from streamc.units import format_bytes

#: A tensor passes when its tiled-vs-untiled error is at most this many times the untiled
#: float32 noise (or the tolerance, whichever is larger).
NOISE_FACTOR = 10.0
#: Finite differences pass within this relative error (or 4x their own noise estimate).
FD_TOLERANCE = 1e-2
#: Relative size of a finite-difference step: ε·‖v‖ = FD_STEP·‖θ‖ over the perturbed weights.
FD_STEP = 1e-3

Arrays = dict[str, np.ndarray]


@dataclass
class Difference:
    """Largest absolute and relative difference of one tensor (relative to its largest value),
    and the relative error it may have (``allowed``)."""

    name: str
    max_abs: float
    max_rel: float
    allowed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.allowed

    def to_dict(self) -> dict:
        return {"name": self.name, "max_abs": self.max_abs, "max_rel": self.max_rel,
                "allowed": self.allowed, "ok": self.ok}


@dataclass
class DirectionCheck:
    """⟨∇L, v⟩ from the tiled gradients against central finite differences along ``v``."""

    name: str
    analytic: float
    numeric: float
    #: |FD(ε) − FD(2ε)|: how far the finite difference itself can be trusted
    noise: float

    @property
    def error(self) -> float:
        scale = max(abs(self.analytic), abs(self.numeric), 1e-30)
        return abs(self.analytic - self.numeric) / scale

    @property
    def ok(self) -> bool:
        scale = max(abs(self.analytic), abs(self.numeric), 1e-30)
        return abs(self.analytic - self.numeric) <= max(FD_TOLERANCE * scale, 4 * self.noise)

    def to_dict(self) -> dict:
        return {"name": self.name, "analytic": self.analytic, "numeric": self.numeric,
                "noise": self.noise, "error": self.error, "ok": self.ok}


@dataclass
class CheckReport:
    """Differences of every output and parameter gradient, the finite-difference checks, and
    whether all pass."""

    program: Program
    tolerance: float
    outputs: list[Difference] = field(default_factory=list)
    gradients: list[Difference] = field(default_factory=list)
    directions: list[DirectionCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (all(d.ok for d in self.outputs + self.gradients)
                and all(d.ok for d in self.directions))

    @property
    def worst(self) -> Difference | None:
        items = self.outputs + self.gradients
        return max(items, key=lambda d: d.max_rel / max(d.allowed, 1e-30)) if items else None

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "tolerance": self.tolerance,
            "tiles": len(self.program.tiles),
            "notes": list(self.program.meta.notes),
            "outputs": [d.to_dict() for d in self.outputs],
            "gradients": [d.to_dict() for d in self.gradients],
            "finite_differences": [d.to_dict() for d in self.directions],
        }


def difference(name: str, actual: np.ndarray, expected: np.ndarray, allowed: float = 0.0
               ) -> Difference:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        return Difference(name, float("inf"), float("inf"), allowed)
    diff = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    return Difference(name, diff, diff / scale if scale > 0 else diff, allowed)


def _session(model: onnx.ModelProto, optimized: bool = True, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StreamcError(f"ONNX Runtime could not load the untiled model: {first}") from None


def _image_input(model: onnx.ModelProto) -> str:
    inits = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


def untiled_reference(model: onnx.ModelProto, image: np.ndarray, params: Arrays,
                      output_grads: Arrays, trainable: Sequence[str],
                      threads: int | None = None, optimized: bool = True
                      ) -> tuple[Arrays, Arrays]:
    """Outputs and parameter gradients of the whole model on ORT, without tiling."""
    outputs = [o.name for o in model.graph.output]
    backward = build_backward(model, wrt=list(trainable), outputs=list(output_grads),
                              keep_outputs=True, name="untiled_backward")
    session = _session(backward.model, optimized, threads)
    feeds = {_image_input(model): image}
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


def run_program(program: Program, image: np.ndarray, params: Arrays,
                cotangents: Callable[[Arrays], Arrays] | None,
                policy: RuntimePolicy = DEFAULT_POLICY, threads: int | None = None,
                ) -> tuple[Arrays, Arrays]:
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


def finite_differences(model: onnx.ModelProto, image: np.ndarray, params: Arrays,
                       cotangents: Arrays, grads: Arrays, groups: dict[str, list[str]],
                       rng: np.random.Generator) -> list[DirectionCheck]:
    """For each named group of parameters, a random direction ``v`` over them: ⟨grads, v⟩
    against the central difference of ``L = Σ ⟨output, c⟩`` (forward runs of ``model``,
    whose parameters are fed as inputs, at steps ε and 2ε)."""
    session = _session(model_graph(model, set(params)))
    inputs = {i.name for i in session.get_inputs()}
    image_name = _image_input(model)
    outputs = [o for o in cotangents if o in {v.name for v in model.graph.output}]

    def loss(values: Arrays) -> float:
        feeds = {image_name: image, **{k: v for k, v in values.items() if k in inputs}}
        results = session.run(outputs, feeds)
        return float(sum(np.vdot(r.astype(np.float64), cotangents[o].astype(np.float64))
                         for o, r in zip(outputs, results)))

    checks = []
    for name, members in groups.items():
        members = [m for m in members if m in params and m in inputs]
        if not members:
            continue
        v = {m: rng.standard_normal(params[m].shape) for m in members}
        theta = np.sqrt(sum(float(np.sum(params[m].astype(np.float64) ** 2)) for m in members))
        norm = np.sqrt(sum(float(np.sum(d ** 2)) for d in v.values()))
        eps = FD_STEP * max(theta, 1.0) / norm
        analytic = sum(float(np.vdot(grads.get(m, np.zeros_like(v[m])), v[m])) for m in members)

        near, far = (_central(loss, params, members, v, step) for step in (eps, 2 * eps))
        checks.append(DirectionCheck(name, analytic, float(near), float(abs(near - far))))
    return checks


def _central(loss: Callable[[Arrays], float], params: Arrays, members: list[str],
             v: dict[str, np.ndarray], step: float) -> float:
    """(L(θ + step·v) − L(θ − step·v)) / (2·step), moving only ``members``."""
    plus = {**params, **{m: (params[m] + step * v[m]).astype(np.float32) for m in members}}
    minus = {**params, **{m: (params[m] - step * v[m]).astype(np.float32) for m in members}}
    return (loss(plus) - loss(minus)) / (2 * step)


def _direction_groups(program: Program) -> dict[str, list[str]]:
    trainable = program.meta.trainable
    head = set(program.meta.head.gradients)
    groups = {"all weights": trainable,
              "prefix weights": [p for p in trainable if p not in head],
              "head weights": [p for p in trainable if p in head]}
    return {k: v for k, v in groups.items() if v}


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _refuse_without_memory(program: Program) -> None:
    """Say before starting when the untiled reference cannot fit this machine's memory."""
    plan = program.meta.memory_plan or {}
    conventional = (plan.get("conventional") or {}).get("total")
    available = _available_memory()
    if conventional is None or available is None:
        return
    needed = int(1.5 * conventional) + plan.get("peak", 0)  # ORT's untiled backward, unfused
    if needed > available:
        size = "x".join(map(str, program.image_size))
        raise StreamcError(
            f"check needs about {format_bytes(needed)} at {size} (an untiled run of the whole "
            f"image, which the tiled program is compared with), but {format_bytes(available)} "
            "is available: check a smaller image (--image); a program exact at one size is "
            "compiled by the same rules at every size.")


def check(
    model: str | Path | onnx.ModelProto,
    image: Sequence[int] | None,
    tile: int | str | Sequence[int],
    input: str | None = None,
    seed: int = 0,
    tolerance: float = 1e-4,
    program: Program | None = None,
    policy: RuntimePolicy = DEFAULT_POLICY,
    finite_difference: bool = True,
    halo: str = DEFAULT_HALO,
    grid_end: GridEnd = "auto",
) -> CheckReport:
    """Compile (unless ``program`` is given; ``halo`` and ``grid_end`` as
    :func:`streamc.compile`) and compare tiled with untiled results and with finite differences
    (see the module docstring)."""
    proto = load_model(model)
    program = program or compile_program(proto, tile, image=image, input=input, with_flops=False,
                                         halo=halo, grid_end=grid_end)
    _refuse_without_memory(program)
    rng = np.random.default_rng(seed)
    shape = program.input_shape
    img = rng.standard_normal(shape).astype(np.float32)
    params = {k: np.asarray(v) for k, v in program.parameters.items()}
    output_grads: Arrays = {}

    def cotangents(outputs: Arrays) -> Arrays:
        output_grads.update({k: rng.standard_normal(v.shape).astype(np.float32)
                             for k, v in outputs.items() if v.dtype == np.float32})
        return output_grads

    outputs, grads = run_program(program, img, params, cotangents, policy)
    trainable = program.meta.trainable
    prepared = prepare(proto, program.image_size, program.input_name, batch=shape[0])
    ref = untiled_reference(prepared, img, params, output_grads, trainable)
    plain = untiled_reference(prepared, img, params, output_grads, trainable, optimized=False)
    report = CheckReport(program, tolerance)
    for kind, tiled, (expected, other) in (("output", outputs, (ref[0], plain[0])),
                                           ("gradient", grads, (ref[1], plain[1]))):
        names = list(expected) if kind == "output" else trainable
        for name in names:
            want = expected.get(name)
            got = tiled.get(name)
            if want is None and got is None:
                continue
            want = np.zeros_like(got) if want is None else want
            got = np.zeros_like(want) if got is None else got
            noise = difference(name, other.get(name, want), want).max_rel
            allowed = max(tolerance, NOISE_FACTOR * noise)
            (report.outputs if kind == "output" else report.gradients).append(
                difference(name, got, want, allowed))
    if finite_difference:
        report.directions = finite_differences(prepared, img, params, output_grads, grads,
                                               _direction_groups(program), rng)
    return report
