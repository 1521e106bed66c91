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
from onnx import helper

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


def model_parameters(model: onnx.ModelProto) -> Parameters:
    """Trainable weights (:func:`~streamc.passes.autodiff.trainable_initializers`, which follows
    reshaped weights back to their initializer) and buffers (BatchNorm statistics)."""
    floats = {i.name for i in model.graph.initializer if i.data_type in FLOAT_TYPES}
    trainable = trainable_initializers(model)
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
    """The head as an ONNX model (see module docstring)."""
    graph = analysis.graph
    model = analysis.model
    cuts = list(analysis.cut_tensors)
    head_set = set(analysis.head)
    nodes = [onnx.NodeProto() for _ in analysis.head]
    for copy, name in zip(nodes, analysis.head):
        copy.CopyFrom(graph.nodes[name])
    # Image-independent nodes the head reads (computed constants, reshaped weights).
    needed = {i for n in nodes for i in n.input if i}
    constant_nodes = []
    for name in reversed(analysis.split.constant_nodes):
        node = graph.nodes[name]
        if name not in head_set and any(o in needed for o in node.output):
            constant_nodes.append(node)
            needed.update(i for i in node.input if i)
    nodes = list(reversed(constant_nodes)) + nodes
    outputs: dict[str, str] = {}
    for out in graph.outputs:
        if out in cuts:
            renamed = f"{out}:out"
            nodes.append(helper.make_node("Identity", [out], [renamed], name=f"{renamed}_identity"))
            outputs[out] = renamed
        else:
            outputs[out] = out
    used = {i for n in nodes for i in n.input if i}
    inits = {i.name: i for i in model.graph.initializer}
    inputs = []
    for cut in cuts:
        inputs.append(helper.make_tensor_value_info(
            cut, graph.dtypes.get(cut, onnx.TensorProto.FLOAT), list(graph.shape(cut))))
    for name in sorted(p for p in parameters if p in used):
        t = inits[name]
        inputs.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    initializers = [t for n, t in inits.items() if n in used and n not in parameters]
    out_vis = []
    for out in graph.outputs:
        shape = graph.shape(out)
        out_vis.append(helper.make_tensor_value_info(
            outputs[out], graph.dtypes.get(out, onnx.TensorProto.FLOAT),
            list(shape) if shape is not None else None))
    g = helper.make_graph(nodes, "head", inputs, out_vis, initializers)
    proto = helper.make_model(g, opset_imports=list(model.opset_import), producer_name="streamc")
    proto.ir_version = model.ir_version
    proto = onnx.shape_inference.infer_shapes(proto)
    return Head(proto, cuts, outputs)


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
