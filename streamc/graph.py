"""ONNX model -> a prepared, shape-inferred, constant-folded model and a networkx DAG over it.

:func:`load_model` reads and checks a model; :func:`prepare` fixes the image size (when given),
infers shapes and folds constant subgraphs (the Shape/Gather/Concat chains that exporters emit for
Pad pads, Resize scales and Reshape shapes); :class:`Graph` is the read-only view every analysis
and pass works on: producers, consumers, shapes, constants and a DAG of node names.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from streamc.errors import ModelLoadError, UnsupportedModelError
from streamc.ops.axis import Window

#: Ops whose result must never be folded even when every input is constant.
_NEVER_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
               "Multinomial", "Bernoulli"}
#: Folded tensors larger than this stay as nodes (folding is for shape arithmetic, not weights).
_MAX_FOLDED_ELEMENTS = 1 << 16

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.BFLOAT16}


def load_model(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    """Read an ONNX model from a path (or take a ModelProto) and check it; clear errors only."""
    return load_model_serialized(model)[0]


def load_model_serialized(model: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, bytes]:
    """:func:`load_model`, also returning the serialized model that the checker read."""
    if isinstance(model, onnx.ModelProto):
        proto = model
        where = "the given model"
    else:
        path = Path(model)
        where = str(path)
        if not path.exists():
            raise ModelLoadError(f"{path}: no such file.")
        if path.is_dir():
            raise ModelLoadError(f"{path} is a directory, not an ONNX model file.")
        try:
            proto = onnx.load(str(path), load_external_data=True)
        except Exception as exc:  # protobuf raises several unrelated types
            raise ModelLoadError(
                f"{path} is not a readable ONNX model ({type(exc).__name__}): "
                "pass a .onnx file exported with torch.onnx.export or similar."
            ) from None
        if not proto.graph.node and not proto.graph.input:
            raise ModelLoadError(f"{path} is not an ONNX model (it parsed to an empty graph).")
    serialized = proto.SerializeToString()
    try:
        onnx.checker.check_model(serialized)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise ModelLoadError(f"{where} fails the ONNX checker: {first}") from None
    return proto, serialized


def opset_version(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def _dims(value_info: onnx.ValueInfoProto) -> tuple[int | None, ...] | None:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)


def image_like_inputs(model: onnx.ModelProto) -> list[str]:
    """Graph inputs that look like images: float tensors of rank >= 4 (N, C, spatial...)."""
    inits = {i.name for i in model.graph.initializer}
    names = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dims = _dims(vi)
        if t.elem_type in FLOAT_TYPES and dims is not None and len(dims) >= 4:
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
    """Return a copy of ``model`` with the image's spatial size fixed (if given), shapes inferred
    and constant subgraphs folded into initializers.

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
    model = _infer(model)
    for _ in range(20):
        model, changed = _fold_constants(model)
        if not changed:
            break
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
    ceil_pools = [i for i, n in enumerate(graph.node) if n.op_type in _CEIL_MODE_POOLS
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


_CEIL_MODE_POOLS = {"MaxPool", "AveragePool", "LpPool"}


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


class InitializerArrays(Mapping[str, np.ndarray]):
    """Initializers by name, converted to numpy on first access (a ResNet-50's 100 MB of
    weights need not be copied to find the few small constants a pass reads)."""

    def __init__(self, initializers: Iterable[onnx.TensorProto]) -> None:
        self._protos = {i.name: i for i in initializers}
        self._arrays: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        array = self._arrays.get(name)
        if array is None:
            array = self._arrays[name] = numpy_helper.to_array(self._protos[name])
        return array

    def __contains__(self, name: object) -> bool:
        return name in self._protos

    def __iter__(self) -> Iterator[str]:
        return iter(self._protos)

    def __len__(self) -> int:
        return len(self._protos)

    def proto(self, name: str) -> onnx.TensorProto:
        return self._protos[name]


def _fold_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """Fold Constant nodes, Shape of static tensors, and nodes whose inputs are all constant.

    Nodes that read a float initializer with more than one element are not folded: such a
    tensor may be a trainable weight, and folding would cut it off from its gradient.
    """
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    inits = InitializerArrays(graph.initializer)  # the original ones, not those folded here
    const: dict[str, np.ndarray] = {}

    def array_of(name: str) -> np.ndarray:
        return const[name] if name in const else inits[name]

    shapes = {vi.name: _dims(vi) for vi in list(graph.value_info) + list(graph.input)
              + list(graph.output)}
    graph_outputs = {o.name for o in graph.output}
    keep_nodes = []
    new_inits: list[onnx.TensorProto] = []
    changed = False
    for node in graph.node:
        values = None
        if node.domain not in ("", "ai.onnx") or node.op_type in _NEVER_FOLD:
            keep_nodes.append(node)
            continue
        if node.op_type == "Constant":
            values = [numpy_helper.to_array(_constant_value(node))] if _constant_value(
                node) is not None else None
        elif node.op_type == "Shape" and node.input[0] in shapes:
            dims = shapes[node.input[0]]
            if dims is not None and all(d is not None for d in dims):
                start = _attr(node, "start", 0)
                end = _attr(node, "end", None)
                values = [np.array(dims[start:end] if end is not None else dims[start:],
                                   dtype=np.int64)]
        elif node.input and all(i == "" or i in const or i in inits for i in node.input):
            guarded = any(
                i in inits and inits.proto(i).data_type in FLOAT_TYPES
                and math.prod(inits.proto(i).dims) > 1
                for i in node.input if i
            )
            if not guarded:
                try:
                    values = _evaluate(ReferenceEvaluator, node,
                                       {i: array_of(i) for i in node.input if i},
                                       opset_version(model))
                except Exception:
                    values = None
                if values is not None and any(v.size > _MAX_FOLDED_ELEMENTS for v in values):
                    values = None
        if values is None or any(o in graph_outputs for o in node.output):
            keep_nodes.append(node)
            continue
        changed = True
        for out_name, value in zip(node.output, values):
            if out_name:
                const[out_name] = np.asarray(value)
                new_inits.append(numpy_helper.from_array(np.asarray(value), out_name))
    if not changed:
        return model, False
    del graph.node[:]
    graph.node.extend(keep_nodes)
    graph.initializer.extend(new_inits)
    _drop_unused_initializers(graph)
    return model, True


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for a in node.attribute:
        if a.name == "value":
            return a.t
        if a.name in ("value_float", "value_int", "value_floats", "value_ints"):
            v = helper.get_attribute_value(a)
            dtype = np.float32 if "float" in a.name else np.int64
            return numpy_helper.from_array(np.array(v, dtype=dtype))
    return None


def _evaluate(evaluator_cls, node, const, opset) -> list[np.ndarray]:
    inputs = [i for i in node.input if i]
    g = helper.make_graph(
        [node], "fold",
        [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(const[i].dtype),
                                       const[i].shape) for i in inputs],
        [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
         for o in node.output if o],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    results = evaluator_cls(m).run(None, {i: const[i] for i in inputs})
    return [np.asarray(r) for r in results]


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    removed = {i.name for i in graph.initializer if i.name not in used}
    keep = [i for i in graph.initializer if i.name not in removed]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    # Inputs that only existed to carry a removed initializer go too.
    inputs = [vi for vi in graph.input if vi.name not in removed]
    del graph.input[:]
    graph.input.extend(inputs)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def set_attribute(node: onnx.NodeProto, name: str, value) -> None:
    """Replace (or add) attribute ``name`` of ``node``; ``value=None`` removes it."""
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    if value is not None:
        node.attribute.append(helper.make_attribute(name, value))


def attributes(node: onnx.NodeProto) -> dict:
    """A node's attributes as plain Python values (bytes decoded to str)."""
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        out[a.name] = v
    return out


@dataclass
class Graph:
    """Read-only view of a prepared model: nodes by name, tensors, shapes, constants, DAG.

    ``dag`` is a networkx DiGraph over node names; each edge carries ``tensor`` (the tensor
    name that flows along it). Every node has a unique, non-empty name (generated if needed).
    """

    model: onnx.ModelProto
    nodes: dict[str, onnx.NodeProto] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    producer: dict[str, str] = field(default_factory=dict)
    consumers: dict[str, list[str]] = field(default_factory=dict)
    shapes: dict[str, tuple[int | None, ...] | None] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)
    constants: Mapping[str, np.ndarray] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    dag: nx.DiGraph = field(default_factory=nx.DiGraph)
    opset: int = 17

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> Graph:
        g = cls(model=model, opset=opset_version(model))
        graph = model.graph
        g.constants = InitializerArrays(graph.initializer)
        g.inputs = [vi.name for vi in graph.input if vi.name not in g.constants]
        g.outputs = [vi.name for vi in graph.output]
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            g.shapes[vi.name] = _dims(vi)
            g.dtypes[vi.name] = vi.type.tensor_type.elem_type
        for init in graph.initializer:
            g.shapes[init.name] = tuple(init.dims)
            g.dtypes[init.name] = init.data_type
        used_names: set[str] = set()
        for index, node in enumerate(graph.node):
            name = node.name or f"{node.op_type}_{index}"
            while name in used_names:
                name = f"{name}_{index}"
            used_names.add(name)
            if node.name != name:
                node.name = name
            g.nodes[name] = node
            g.order.append(name)
            g.dag.add_node(name)
            for out in node.output:
                if out:
                    g.producer[out] = name
        for name in g.order:
            for inp in g.nodes[name].input:
                if not inp:
                    continue
                g.consumers.setdefault(inp, []).append(name)
                if inp in g.producer:
                    g.dag.add_edge(g.producer[inp], name, tensor=inp)
        return g

    def node(self, name: str) -> onnx.NodeProto:
        return self.nodes[name]

    def shape(self, tensor: str) -> tuple[int | None, ...] | None:
        return self.shapes.get(tensor)

    def is_constant(self, tensor: str) -> bool:
        return tensor in self.constants

    def topological(self) -> list[str]:
        """Node names in a topological order (the model's own order, which ONNX requires)."""
        return list(self.order)
