"""Extract pass: the head (everything after the cut) as a standalone ONNX graph, and the model's
parameters.

Contract: :func:`extract_head` takes an :class:`~streamc.analysis.Analysis` and the set of
parameter names and returns a :class:`Head`: a graph whose inputs are the full cut tensors and
the parameters it reads, and whose outputs are the model's outputs. :func:`model_parameters`
says which initializers the runtime owns (trainable weights, and buffers such as BatchNorm
statistics) and which are plain constants baked into the graphs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from streamc.analysis import Analysis
from streamc.graph import FLOAT_TYPES
from streamc.ops.facts import ALIAS_NODES, BUFFER_SLOTS
from streamc.passes.autodiff import trainable_initializers


@dataclass
class Parameters:
    """Initializers the runtime owns: ``trainable`` get gradients, ``buffers`` do not."""

    trainable: list[str]
    buffers: list[str]

    @property
    def names(self) -> set[str]:
        return set(self.trainable) | set(self.buffers)


def model_parameters(analysis: Analysis) -> Parameters:
    """Trainable weights (:func:`~streamc.ops.vjp.trainable.trainable_initializers` of the
    model as given, so that weights keep their names through preparation) and buffers
    (BatchNorm statistics) of the prepared model."""
    model = analysis.model
    floats = {i.name for i in model.graph.initializer if i.data_type in FLOAT_TYPES}
    source = analysis.source if analysis.source is not None else model
    trainable = [t for t in trainable_initializers(source) if t in floats]
    owned = set(trainable)
    buffers: dict[str, None] = {}
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            if (node.op_type, slot) in BUFFER_SLOTS and name in floats and name not in owned:
                buffers.setdefault(name)
    return Parameters(trainable, list(buffers))


def tied_parameters(model: onnx.ModelProto, trainable: Sequence[str]) -> dict[str, list[str]]:
    """Trainable initializers that other names alias through ``Identity`` nodes: initializer ->
    the aliases. The torch exporter writes this when it merges initializers of equal value (a
    freshly initialised network's BatchNorm weights, say): the merged weights then train as
    one parameter, which the torch module did not do."""
    wanted = set(trainable)
    tied: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type in ALIAS_NODES and node.input and node.input[0] in wanted:
            tied.setdefault(node.input[0], []).extend(o for o in node.output if o)
    return tied


@dataclass
class Head:
    """The head graph and how its outputs map to the model's outputs."""

    model: onnx.ModelProto
    inputs: list[str]  # cut tensor names, in order
    outputs: dict[str, str]  # model output name -> head graph output name


def extract_head(analysis: Analysis, parameters: set[str]) -> Head:
    """The head as an ONNX model (see module docstring): inputs are the cut tensors, then the
    per-sample (global) tensors the head reads."""
    graph = analysis.graph
    cuts = list(analysis.cut_tensors)
    nodes = _copies(graph, analysis.head)
    read = {i for n in nodes for i in n.input if i}
    sources = cuts + [t for t in analysis.split.ready if t in read or t in graph.outputs]
    outputs: dict[str, str] = {}
    for out in graph.outputs:
        if out in sources:
            renamed = f"{out}:out"
            nodes.append(helper.make_node("Identity", [out], [renamed], name=f"{renamed}_identity"))
            outputs[out] = renamed
        else:
            outputs[out] = out
    proto = _standalone(analysis, nodes, sources, [(outputs[o], o) for o in graph.outputs],
                        parameters, "head")
    return Head(proto, sources, outputs)


@dataclass
class GlobalGraph:
    """A graph on per-sample values between two stages: it combines the partials of the
    reductions of the stage before it (inputs named :func:`stacked_name`, one row per tile) and
    computes the global tensors the next stages read."""

    model: onnx.ModelProto
    inputs: list[str]  # stacked partials, then earlier global tensors
    outputs: list[str]  # global tensors


def stacked_name(reduction_output: str) -> str:
    """Name of the input of a global graph that holds a reduction's partials, one per tile."""
    return f"{reduction_output}:partials"


def extract_global(analysis: Analysis, ready: int, parameters: set[str], tiles: int
                   ) -> GlobalGraph:
    """The global graph that makes the global tensors first readable by stage ``ready``
    (``tiles``: rows of the stacked partials, one per tile)."""
    graph = analysis.graph
    split = analysis.split
    nodes: list[onnx.NodeProto] = []
    sources: list[str] = []
    for reduction in split.stage_io[ready - 1].reductions:
        stacked = stacked_name(reduction.output)
        sources.append(stacked)
        nodes += _combine(analysis, reduction, stacked)
    mine = [n for n in split.global_nodes
            if split.ready[next(o for o in graph.nodes[n].output if o)] == ready]
    nodes += _copies(graph, mine)
    made = {o for n in nodes for o in n.output}
    read = {i for n in nodes for i in n.input if i}
    sources += [t for t in split.ready if split.ready[t] < ready and t in read]
    wanted = _global_readers(analysis, ready)
    outputs = [t for t in split.ready if split.ready[t] == ready and t in made and t in wanted]
    vis = [(t, t) for t in outputs]
    model = _standalone(analysis, nodes, sources, vis, parameters, f"global{ready}", tiles)
    return GlobalGraph(model, sources, outputs)


def _global_readers(analysis: Analysis, ready: int) -> set[str]:
    """Tensors read after the global graph of ``ready``: by later stages, later global
    graphs, or the head."""
    graph = analysis.graph
    split = analysis.split
    names = [n for n in split.prefix
             if split.phase[next(o for o in graph.nodes[n].output if o)] >= ready]
    names += [n for n in split.global_nodes
              if split.ready[next(o for o in graph.nodes[n].output if o)] > ready]
    names += analysis.head
    read = {i for n in names for i in graph.nodes[n].input if i}
    return read | set(graph.outputs)


def _combine(analysis: Analysis, reduction, stacked: str) -> list[onnx.NodeProto]:
    """Nodes turning the stacked partials of ``reduction`` into its output: reduce over the
    tiles, divide by the count for a mean, drop the reduced axes unless kept."""
    graph = analysis.graph
    rule = reduction.rule
    name = reduction.node
    opset = graph.opset
    combined = f"{reduction.output}:combined"
    zero = f"{name}/combine_axes"
    nodes = [helper.make_node("Constant", [], [zero], name=zero,
                              value=numpy_helper.from_array(np.array([0], np.int64)))]
    if opset >= 18 or (rule.combine == "ReduceSum" and opset >= 13):
        nodes.append(helper.make_node(rule.combine, [stacked, zero], [combined], keepdims=0,
                                      name=f"{name}/combine"))
    else:
        nodes.append(helper.make_node(rule.combine, [stacked], [combined], axes=[0],
                                      keepdims=0, name=f"{name}/combine"))
    value = combined
    if rule.mean:
        shape = graph.shape(reduction.tensor)
        count = int(np.prod([shape[a] for a in rule.axes]))
        dtype = helper.tensor_dtype_to_np_dtype(graph.dtypes.get(reduction.tensor, 1))
        divisor = f"{name}/count"
        nodes.append(helper.make_node("Constant", [], [divisor], name=divisor,
                                      value=numpy_helper.from_array(np.array(count, dtype))))
        value = f"{reduction.output}:sum_mean"
        nodes.append(helper.make_node("Div", [combined, divisor], [value], name=f"{name}/mean"))
    target = f"{name}/shape"
    nodes.append(helper.make_node("Constant", [], [target], name=target, value=numpy_helper
                                  .from_array(np.array(graph.shape(reduction.output), np.int64))))
    nodes.append(helper.make_node("Reshape", [value, target], [reduction.output],
                                  name=f"{name}/finalize"))
    return nodes


def _copies(graph, names: list[str]) -> list[onnx.NodeProto]:
    nodes = [onnx.NodeProto() for _ in names]
    for copy, name in zip(nodes, names):
        copy.CopyFrom(graph.nodes[name])
    return nodes


def _standalone(analysis: Analysis, nodes: list[onnx.NodeProto], sources: list[str],
                outputs: list[tuple[str, str]], parameters: set[str], name: str,
                tiles: int = 0) -> onnx.ModelProto:
    """``nodes`` as a model: inputs ``sources`` (shapes from the analysis, or stacked partials)
    and the parameters they read, the constant nodes they need, ``outputs`` as (graph output,
    tensor whose type it has)."""
    graph = analysis.graph
    model = analysis.model
    needed = {i for n in nodes for i in n.input if i}
    constant_nodes = []
    own = {o for n in nodes for o in n.output}
    for cname in reversed(analysis.split.constant_nodes):
        node = graph.nodes[cname]
        if any(o in needed for o in node.output) and not any(o in own for o in node.output):
            constant_nodes.append(node)
            needed.update(i for i in node.input if i)
    nodes = list(reversed(constant_nodes)) + nodes
    used = {i for n in nodes for i in n.input if i}
    inits = {i.name: i for i in model.graph.initializer}
    inputs = [_source_info(analysis, s, tiles) for s in sources]
    for pname in sorted(p for p in parameters if p in used):
        t = inits[pname]
        inputs.append(helper.make_tensor_value_info(pname, t.data_type, list(t.dims)))
    initializers = [t for n, t in inits.items() if n in used and n not in parameters]
    out_vis = []
    for out, like in outputs:
        shape = graph.shape(like)
        out_vis.append(helper.make_tensor_value_info(
            out, graph.dtypes.get(like, onnx.TensorProto.FLOAT),
            list(shape) if shape is not None else None))
    g = helper.make_graph(nodes, name, inputs, out_vis, initializers)
    proto = helper.make_model(g, opset_imports=list(model.opset_import), producer_name="streamc")
    proto.ir_version = model.ir_version
    return onnx.shape_inference.infer_shapes(proto)


def _source_info(analysis: Analysis, source: str, tiles: int) -> onnx.ValueInfoProto:
    graph = analysis.graph
    if source.endswith(":partials"):
        reduction = next(r for r in analysis.split.reductions
                         if stacked_name(r.output) == source)
        shape = list(graph.shape(reduction.tensor))
        for axis in reduction.rule.axes:
            shape[axis] = 1
        return helper.make_tensor_value_info(
            source, graph.dtypes.get(reduction.tensor, 1), [tiles] + shape)
    return helper.make_tensor_value_info(source, graph.dtypes.get(source, 1),
                                         list(graph.shape(source)))


def parameter_values(initializers: Mapping[str, np.ndarray], names: set[str]
                     ) -> dict[str, np.ndarray]:
    """Current values of the named initializers (``Graph.constants`` of the prepared model)."""
    return {name: initializers[name] for name in initializers if name in names}


def model_graph(model: onnx.ModelProto, parameters: set[str]) -> onnx.ModelProto:
    """The prepared model with runtime-owned initializers turned into graph inputs.

    Stored in the program so the runtime can export the original graph with trained weights
    (the values live in ``parameters.npz``, not twice in the program).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    owned = [t for t in graph.initializer if t.name in parameters]
    kept = [t for t in graph.initializer if t.name not in parameters]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    declared = {i.name for i in graph.input}
    for t in owned:
        if t.name not in declared:
            graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return out
