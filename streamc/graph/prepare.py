"""Preparing a model for analysis: choose the image input, fix its size, infer every shape the
way ONNX Runtime computes it, fold constant subgraphs (the Shape/Gather/Concat chains exporters
emit for Pad pads, Resize scales and Reshape shapes) into initializers, drop zero-width pads and
lower whole-image normalisations (:mod:`streamc.ops.lowering`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from streamc.errors import UnsupportedModelError
from streamc.graph.fold import constant_values, drop_unused_initializers, inline_constants
from streamc.graph.load import FLOAT_TYPES, dims
from streamc.ops.attrs import attribute, attributes, set_attribute
from streamc.ops.facts import CEIL_MODE_POOLS
from streamc.ops.geometry import Window
from streamc.ops.lowering import lower
from streamc.ops.vjp.trainable import trainable_initializers


def image_like_inputs(model: onnx.ModelProto) -> list[str]:
    """Graph inputs that look like images: float tensors of rank >= 4 (N, C, spatial...)."""
    inits = {i.name for i in model.graph.initializer}
    names = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        shape = dims(vi)
        if t.elem_type in FLOAT_TYPES and shape is not None and len(shape) >= 4:
            names.append(vi.name)
    return names


def choose_image_input(model: onnx.ModelProto, input_name: str | None = None) -> str:
    """The image input: ``input_name`` if given, else the one float input with >= 2 spatial axes."""
    inits = {i.name for i in model.graph.initializer}
    all_inputs = [vi.name for vi in model.graph.input if vi.name not in inits]
    if input_name is not None:
        if input_name not in all_inputs:
            raise UnsupportedModelError(
                f"the model has no input named {input_name!r}; its inputs are {all_inputs}."
            )
        if input_name not in image_like_inputs(model):
            vi = next(v for v in model.graph.input if v.name == input_name)
            kind = onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type).lower()
            shape = dims(vi)
            raise UnsupportedModelError(
                f"input {input_name!r} ({kind}, shape {list(shape) if shape else '?'}) is not an "
                "image: streamc streams float tensors of shape N x C x H x W or N x C x D x H x W."
            )
        return input_name
    candidates = image_like_inputs(model)
    if not candidates:
        raise UnsupportedModelError(
            "the model has no image-like input (a float tensor of shape N x C x H x W or "
            f"N x C x D x H x W); its inputs are {all_inputs}."
        )
    if len(candidates) > 1:
        raise UnsupportedModelError(
            f"the model has several image-like inputs {candidates}: choose one with --input NAME."
        )
    return candidates[0]


def prepare(
    model: onnx.ModelProto,
    image: Sequence[int] | None = None,
    input_name: str | None = None,
    batch: int | None = None,
) -> onnx.ModelProto:
    """Return a copy of ``model`` with the image's spatial size fixed (if given), shapes inferred,
    whole-image normalisations lowered (:mod:`streamc.ops.lowering`) and constant subgraphs
    folded into initializers.

    ``image`` is the spatial size only ((H, W) or (D, H, W)). A symbolic batch axis is set to
    ``batch`` when given.
    """
    model = copy.deepcopy(model)
    name = choose_image_input(model, input_name)
    vi = next(v for v in model.graph.input if v.name == name)
    dims = vi.type.tensor_type.shape.dim
    n_spatial = len(dims) - 2
    if image is not None:
        image = tuple(int(v) for v in image)
        if len(image) == 1:  # one number for every spatial axis
            image = image * n_spatial
        if len(image) != n_spatial:
            raise UnsupportedModelError(
                f"input {name!r} has {n_spatial} spatial axes but the image size "
                f"{'x'.join(map(str, image))} has {len(image)}."
            )
        if any(v <= 0 for v in image):
            raise UnsupportedModelError(f"image size {image} must be positive.")
        for dim, size in zip(list(dims)[2:], image):
            dim.Clear()
            dim.dim_value = size
    if batch is not None and not dims[0].HasField("dim_value"):
        dims[0].Clear()
        dims[0].dim_value = batch
    # Any stale value_info would contradict the new sizes; inference recomputes it.
    del model.graph.value_info[:]
    # Declared output shapes come from the exporter and can contradict strict inference (a
    # ceil_mode pool whose last window ORT drops): inference recomputes them.
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    trainable = set(trainable_initializers(model))
    model = _fold(_infer(model), trainable)
    _empty_pads_to_identity(model)
    if _drop_windows_in_end_padding(model):
        model = _infer(model)
    # Lowering needs every shape: after folding, Reshape targets computed by Shape ops are known.
    if lower(model, _shapes(model), trainable):
        drop_unused_initializers(model.graph)
        model = _fold(_infer(model), trainable)
    return model


def _empty_pads_to_identity(model: onnx.ModelProto) -> None:
    """A Pad of width zero on every side does nothing in any mode (MONAI writes ``edge`` ones
    where two U-Net branches already agree in size): make it an Identity."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "Pad" or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.input) > 1 and node.input[1]:
            if node.input[1] not in inits:
                continue
            pads = numpy_helper.to_array(inits[node.input[1]])
        else:
            pads = np.asarray(attribute(node, "pads", [1]))
        if pads.size and not np.any(pads):
            node.op_type = "Identity"
            del node.input[1:]
            del node.attribute[:]


def _drop_windows_in_end_padding(model: onnx.ModelProto) -> bool:
    """Rewrite each ceil_mode pool whose last window would start in the end padding so that it
    no longer has that window; True if any changed.

    ONNX Runtime and torch drop that window, ONNX shape inference before opset 22 keeps it, so
    a graph holding such a pool on a whole tensor (the head) fails in ORT's own shape checks.
    The pool becomes floor-mode with, per axis, the least end pad under which floor mode counts
    ORT's windows (a partial last window reads that pad; ORT wants pads below the kernel),
    else keeps ceil_mode with the end pads that leave the dropped window out; either way every
    kept window reads the same input positions. Only pools whose values ignore padding are
    rewritten (max and Lp pools, average pools without ``count_include_pad``)."""
    sizes = _spatial_shapes(model)
    changed = False
    for node in model.graph.node:
        attrs = attributes(node)
        if (node.op_type not in CEIL_MODE_POOLS or not attrs.get("ceil_mode", 0)
                or attrs.get("auto_pad", "NOTSET") != "NOTSET" or node.input[0] not in sizes
                or (node.op_type == "AveragePool" and attrs.get("count_include_pad", 0))):
            continue
        shape = sizes[node.input[0]]
        n = len(shape)
        pads = list(attrs.get("pads", [0] * (2 * n)))
        windows = [Window(k, s, d, pads[i], pads[n + i], ceil_mode=True) for i, (k, s, d) in
                   enumerate(zip(attrs.get("kernel_shape", [1] * n),
                                 attrs.get("strides", [1] * n), attrs.get("dilations", [1] * n)))]
        kept = [w.out_size(size) for w, size in zip(windows, shape)]
        if kept == [_ceil_count(w, size, w.pad_end) for w, size in zip(windows, shape)]:
            continue  # ONNX counts what ORT computes
        # end padding the last kept window reads (negative: it ends inside the input)
        reach = [(m - 1) * w.stride + w.span - size - w.pad_begin
                 for w, size, m in zip(windows, shape, kept)]
        floor_ends = [max(0, e) for e in reach]
        if all(e < w.kernel and replace(w, ceil_mode=False, pad_end=e).out_size(size) == m
               for e, w, size, m in zip(floor_ends, windows, shape, kept)):
            set_attribute(node, "ceil_mode", 0)
            set_attribute(node, "pads", pads[:n] + floor_ends)
            changed = True
            continue
        ends = [e if 0 <= e < w.pad_end and _ceil_count(w, size, e) == m else w.pad_end
                for e, w, size, m in zip(reach, windows, shape, kept)]
        if ends != pads[n:]:
            set_attribute(node, "pads", pads[:n] + ends)
            changed = True
    return changed


def _ceil_count(window: Window, size: int, pad_end: int) -> int:
    """Windows ONNX shape inference (before opset 22) counts under ceil_mode with ``pad_end``."""
    total = size + window.pad_begin + pad_end - window.span
    return -(-total // window.stride) + 1


def _fold(model: onnx.ModelProto, trainable: set[str]) -> onnx.ModelProto:
    """Fold constant subgraphs into initializers until nothing changes (at most 20 rounds)."""
    for _ in range(20):
        # Trainable and multi-element float initializers may be weights: nothing computed
        # from them folds (it would cut them off from their gradient, or rename them).
        weights = trainable | {i.name for i in model.graph.initializer
                               if i.data_type in FLOAT_TYPES and math.prod(i.dims) > 1}
        model, changed = inline_constants(model, constant_values(model, protected=weights))
        if not changed:
            break
        drop_unused_initializers(model.graph)
        model = _infer(model)
    return model


#: Float initializers with more elements than this go to shape inference as typed graph inputs
#: (weights: their values never decide a shape, and serialising them dominates inference).
_INFER_AS_INPUT_ELEMENTS = 1024


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with inferred shapes (updated in place when it holds large weights or
    ceil_mode pools, which are inferred on a stand-in copy)."""
    graph = model.graph
    declared = {vi.name for vi in graph.input}
    weights = [i for i in graph.initializer if i.name not in declared
               and i.data_type in FLOAT_TYPES and math.prod(i.dims) > _INFER_AS_INPUT_ELEMENTS]
    ceil_pools = [i for i, n in enumerate(graph.node) if n.op_type in CEIL_MODE_POOLS
                  and attributes(n).get("ceil_mode", 0)
                  and attributes(n).get("auto_pad", "NOTSET") == "NOTSET"]
    light = model
    if weights or ceil_pools:
        light = onnx.ModelProto()
        light.CopyFrom(model)
    if weights:
        heavy = {i.name for i in weights}
        kept = [i for i in light.graph.initializer if i.name not in heavy]
        del light.graph.initializer[:]
        light.graph.initializer.extend(kept)
        light.graph.input.extend(helper.make_tensor_value_info(i.name, i.data_type, i.dims)
                                 for i in weights)
    try:
        if ceil_pools:
            _floor_mode_stand_ins(light, ceil_pools)
        inferred = shape_inference.infer_shapes(light, check_type=False, strict_mode=True,
                                                data_prop=True)
    except Exception as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "node name" in ln]
        first = lines[0] if lines else (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        first = first.split("Inference error(s): ")[-1]
        raise UnsupportedModelError(
            f"the model's shapes do not work out at this input size: {first}"
        ) from None
    if light is model:
        return inferred
    del graph.value_info[:]  # only types were added: take them over, keep the weights
    graph.value_info.extend(inferred.graph.value_info)
    for output, typed in zip(graph.output, inferred.graph.output, strict=True):
        output.CopyFrom(typed)
    return model




def _floor_mode_stand_ins(model: onnx.ModelProto, pools: list[int]) -> None:
    """Replace the ceil_mode pools at ``pools`` (node indices) by floor-mode pools of the
    output size that ONNX Runtime and torch compute, for shape inference only.

    ONNX shape inference before opset 22 keeps a ceil_mode pool's last window when it would
    start in the end padding; ORT and torch drop it, so the inferred size is one too large and
    strict inference then fails wherever that tensor meets another (a Concat, an Add). The
    stand-in reaches the runtime's size with end padding instead; it is never run.
    """
    pending = list(pools)
    while pending:
        shapes = _spatial_shapes(shape_inference.infer_shapes(model, check_type=False,
                                                              strict_mode=False, data_prop=True))
        # A pool below another pending one sees a size inferred the old way: it waits.
        downstream = _downstream(model.graph, {model.graph.node[i].output[0] for i in pending})
        ready = [i for i in pending if model.graph.node[i].input[0] not in downstream
                 and model.graph.node[i].input[0] in shapes]
        if not ready:
            return  # sizes unknown: strict inference reports what is missing
        for index in ready:
            node = model.graph.node[index]
            _to_floor_mode(node, shapes[node.input[0]])
        pending = [i for i in pending if i not in ready]


def _downstream(graph: onnx.GraphProto, tensors: set[str]) -> set[str]:
    """``tensors`` and every tensor computed from them (nodes are in topological order)."""
    reached = set(tensors)
    for node in graph.node:
        if not reached.isdisjoint(node.input):
            reached.update(node.output)
    return reached


def _spatial_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Known spatial sizes (every axis after the first two) of the model's typed tensors."""
    shapes = {}
    for vi in [*model.graph.input, *model.graph.value_info]:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) > 2 and all(d.HasField("dim_value") for d in dims[2:]):
            shapes[vi.name] = [d.dim_value for d in dims[2:]]
    return shapes


def _to_floor_mode(node: onnx.NodeProto, sizes: list[int]) -> None:
    n = len(sizes)
    attrs = attributes(node)
    kernel = attrs.get("kernel_shape", [1] * n)
    strides = attrs.get("strides", [1] * n)
    dilations = attrs.get("dilations", [1] * n)
    pads = attrs.get("pads", [0] * (2 * n))
    ends = []
    for i, size in enumerate(sizes):
        window = Window(kernel[i], strides[i], dilations[i], pads[i], pads[n + i], ceil_mode=True)
        out = window.out_size(size)
        ends.append(max(pads[n + i], (out - 1) * strides[i] + window.span - size - pads[i]))
    set_attribute(node, "ceil_mode", 0)
    set_attribute(node, "pads", list(pads[:n]) + ends)


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...] | None]:
    graph = model.graph
    shapes = {vi.name: dims(vi) for vi in (*graph.input, *graph.value_info, *graph.output)}
    shapes.update({i.name: tuple(i.dims) for i in graph.initializer})
    return shapes
