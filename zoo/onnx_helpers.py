"""ONNX Runtime helpers for tests: random images, running a model, exposing intermediate
tensors, and the empirical receptive field of one pixel (:func:`perturbation_field`)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort


def random_image(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """A standard-normal float32 array of ``shape``."""
    return np.random.default_rng(seed).standard_normal(tuple(shape)).astype(np.float32)


def run_onnx(
    onnx_model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    optimize: bool = False,
) -> dict[str, np.ndarray]:
    """Run ``onnx_model`` on ONNX Runtime (CPU); returns every graph output by name.

    Graph optimisations are off by default so the graph runs as written (no BN folding or
    fusions), which keeps results comparable across graph rewrites.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3
    sess = ort.InferenceSession(
        onnx_model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def expose_tensor(onnx_model: onnx.ModelProto, tensor_name: str | Sequence[str]) -> onnx.ModelProto:
    """A copy of ``onnx_model`` with intermediate tensor(s) added as graph outputs.

    Types and shapes come from ``onnx.shape_inference``; a tensor whose shape cannot be inferred
    is exposed with its element type only (float when unknown). Raises ``KeyError`` for a name
    that no node produces and that is not a graph input or initializer.
    """
    names = [tensor_name] if isinstance(tensor_name, str) else list(tensor_name)
    model = copy.deepcopy(onnx_model)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - shape inference is best effort here
        inferred = model
    g = inferred.graph
    infos = {vi.name: vi for vi in [*g.value_info, *g.input, *g.output]}
    produced = {o for n in model.graph.node for o in n.output}
    produced |= {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer}
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in produced:
            raise KeyError(f"tensor {name!r} is not produced by any node of the graph")
        if name in existing:
            continue
        if name in infos:
            model.graph.output.append(copy.deepcopy(infos[name]))
        else:
            model.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
        existing.add(name)
    return model


def perturbation_field(
    onnx_model: onnx.ModelProto,
    input_name: str,
    output_name: str,
    shape: Sequence[int],
    pixel: Sequence[int],
    trials: int = 4,
    seed: int = 0,
    rtol: float = 1e-4,
) -> np.ndarray:
    """Which output positions depend on one input pixel, found empirically with ONNX Runtime.

    For each trial, a random standard-normal input of ``shape`` is run, then run again with the
    input value at spatial position ``pixel`` (all batch items and channels) changed by a random
    amount of magnitude 3 to 100; output positions whose value changes by more than
    ``rtol × (1 + max |output|)`` (well above float32 noise, yet far below the change a real
    dependency makes) are marked. The masks of all trials are OR-ed, so positions that one
    perturbation misses (a ReLU that stays off, a max pool that keeps another value) are still
    found. ``output_name`` may be an intermediate tensor (it is exposed with
    :func:`expose_tensor`).

    Returns a boolean array over the output's spatial grid (its axes after batch and channel;
    0-d for an output without spatial axes). Every marked position lies inside the true
    receptive-field cone of ``pixel``; for dense random networks the mask fills it.
    """
    shape = tuple(int(s) for s in shape)
    pixel = tuple(int(p) for p in pixel)
    if len(pixel) != len(shape) - 2:
        raise ValueError(f"pixel {pixel} must have {len(shape) - 2} spatial coordinates")
    if not all(0 <= p < s for p, s in zip(pixel, shape[2:], strict=True)):
        raise ValueError(f"pixel {pixel} lies outside the spatial extent {shape[2:]}")
    model = onnx_model
    if output_name not in {o.name for o in onnx_model.graph.output}:
        model = expose_tensor(onnx_model, output_name)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    index = (slice(None), slice(None), *pixel)
    mask: np.ndarray | None = None
    for trial in range(trials):
        x = rng.standard_normal(shape).astype(np.float32)
        magnitude = 100.0 if trial % 2 == 0 else 3.0
        delta = (
            rng.choice([-1.0, 1.0], size=x[index].shape)
            * magnitude
            * rng.uniform(0.5, 1.0, size=x[index].shape)
        )
        xp = x.copy()
        xp[index] += delta.astype(np.float32)
        (y0,) = sess.run([output_name], {input_name: x})
        (y1,) = sess.run([output_name], {input_name: xp})
        y0 = np.asarray(y0, dtype=np.float64)
        y1 = np.asarray(y1, dtype=np.float64)
        scale = 1.0 + max(np.abs(y0).max(initial=0.0), np.abs(y1).max(initial=0.0))
        changed = np.abs(y1 - y0) > rtol * scale
        changed = changed.reshape(changed.shape[0] * changed.shape[1], *changed.shape[2:])
        trial_mask = changed.any(axis=0) if changed.ndim > 1 else np.asarray(changed.any())
        mask = trial_mask if mask is None else (mask | trial_mask)
    assert mask is not None
    return mask


__all__ = ["expose_tensor", "perturbation_field", "random_image", "run_onnx"]
