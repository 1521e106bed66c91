"""Hoist the weight work out of the tile backward graphs: done once per backward pass, not once
per tile.

Contract: :func:`hoist_weight_work` takes the tile backward graphs (:class:`BackwardGraph`, one
per shape class) and the names of the runtime-owned parameters, and returns
:class:`HoistedGraphs`: the backward graphs rewritten, plus at most two small graphs run once
per backward pass. Every rewritten graph computes what it computed before, given them:

- **prepare** (before the first tile): the nodes of a backward graph that read only
  parameters and constants (a flipped, channel-swapped Conv weight for the input gradient,
  BatchNorm's per-channel scale) are the same in every tile. They move into one graph that
  reads the parameters and gives the *prepared* tensors; the backward graphs read those as
  inputs. Nodes equal in several classes (same op, attributes and inputs, constants compared
  by value) are computed once. Pure views of a parameter (Reshape, Unsqueeze, ...) stay: they
  cost nothing and a prepared copy would cost memory.
- **gradient layout** (after the last tile): a weight gradient that a graph brings into the
  weight's layout with a Transpose after its last product (the Conv weight gradient's Gemm
  layout, ``ops/vjp/conv.py``) is given in the product's layout instead; the runtime sums it
  over tiles in that layout and this graph moves the sum into the weight's layout once. A
  parameter gets a raw layout only when every backward graph that differentiates it gives it
  through the same chain of layout nodes, ending at a Reshape to a fully known shape (the raw
  shape).

Both rely only on the graphs: a tile's work is linear in its weight gradient, so the layout of a
sum is the sum of the layouts, and the prepared tensors are functions of the weights alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace

import onnx
from onnx import helper, numpy_helper, shape_inference

from streamc.passes.autodiff import BackwardGraph
from streamc.passes.memory.allocator import value_bytes

#: Ops that only re-lay a tensor out: free to leave in a graph, and what a gradient layout chain
#: is made of.
VIEW_OPS = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"})
#: A gradient layout chain moves out only when it copies (a Transpose; a Gather with constant
#: indices reorders like one).
_LAYOUT_OPS = VIEW_OPS | {"Transpose", "Gather"}
#: Ops whose result is not a function of their inputs (never hoisted).
_IMPURE = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                     "Multinomial", "Bernoulli", "Dropout"})

RAW_SUFFIX = ":raw"
LAID_OUT_SUFFIX = ":grad"
PREFIX = "prepared:"


@dataclass
class HoistedGraphs:
    """The result of :func:`hoist_weight_work`.

    ``backward``: the rewritten backward graphs (a parameter with a raw layout has its
    ``gradients`` entry naming the raw output). ``prepare``: reads parameters, gives
    ``prepared`` (graph outputs of the names the backward graphs read), or None. ``layout``:
    reads ``raw`` (parameter -> graph input, the gradient summed over tiles in the raw layout),
    gives ``laid_out`` (parameter -> graph output, its gradient), or None.
    """

    backward: list[BackwardGraph]
    prepare: onnx.ModelProto | None = None
    prepared: list[str] = field(default_factory=list)
    layout: onnx.ModelProto | None = None
    raw: dict[str, str] = field(default_factory=dict)
    laid_out: dict[str, str] = field(default_factory=dict)


def hoist_weight_work(graphs: Sequence[BackwardGraph], parameters: Collection[str]
                      ) -> HoistedGraphs:
    """Move the per-tile weight work out of ``graphs`` (see the module docstring)."""
    if not graphs:
        return HoistedGraphs([])
    params = set(parameters)
    chains = [_chains(g.model, g.gradients, params) for g in graphs]
    layouts = _gradient_layouts(graphs, chains)
    stripped = [_without_layout_chains(g, c, layouts) for g, c in zip(graphs, chains)]
    prepare = _Prepare()
    rewritten = [prepare.take(g, params) for g in stripped]
    prepare_model = prepare.model(graphs[0].model)
    if prepare_model is None:
        rewritten = stripped
    else:
        for graph in rewritten:
            _type_prepared_inputs(graph.model, prepare_model)
    raw = {p: p + RAW_SUFFIX for p in layouts}
    laid_out = {p: p + LAID_OUT_SUFFIX for p in layouts}
    return HoistedGraphs(
        backward=rewritten,
        prepare=prepare_model,
        prepared=list(prepare.outputs) if prepare_model is not None else [],
        layout=_layout_model(layouts, raw, laid_out, graphs[0].model),
        raw=raw,
        laid_out=laid_out,
    )


# -- keys: equal computations across graphs ------------------------------------------------------

def _digest(*parts: object) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()


def _constant_key(tensor: onnx.TensorProto) -> str:
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    copy.name = ""
    return _digest("const", hashlib.sha1(copy.SerializeToString()).hexdigest())


def _attributes(node: onnx.NodeProto) -> tuple[bytes, ...]:
    return tuple(a.SerializeToString() for a in sorted(node.attribute, key=lambda a: a.name))


def _node_key(node: onnx.NodeProto, inputs: Sequence[str]) -> str:
    return _digest(node.domain, node.op_type, _attributes(node), tuple(inputs))


# -- prepare ---------------------------------------------------------------------------------

class _Prepare:
    """Collects the weight-only nodes of every backward graph into one prepare graph."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.inputs: dict[str, onnx.ValueInfoProto] = {}
        self.outputs: dict[str, None] = {}  # prepared tensor names, in order
        self._name_of: dict[str, str] = {}  # key -> tensor name in the prepare graph
        self._used_names: set[str] = set()
        self._node_names: set[str] = set()

    def _name(self, key: str, wanted: str) -> str:
        """The prepare graph's name of a tensor: ``prepared:`` and a name it had (no tensor of
        a backward graph or parameter has such a name)."""
        if key in self._name_of:
            return self._name_of[key]
        wanted = PREFIX + wanted
        name, k = wanted, 1
        while name in self._used_names:
            name, k = f"{wanted}#{k}", k + 1
        self._name_of[key] = name
        self._used_names.add(name)
        return name

    def take(self, graph: BackwardGraph, params: set[str]) -> BackwardGraph:
        """``graph`` without its weight-only nodes, which join the prepare graph."""
        model = graph.model
        g = model.graph
        hoisted = _weight_only(g, params)
        if not hoisted:
            return graph
        constants = {t.name: t for t in g.initializer}
        param_inputs = {i.name: i for i in g.input if i.name in params}
        key_of: dict[str, str] = {}
        for name in param_inputs:
            key_of[name] = _digest("param", name)
        for name, tensor in constants.items():
            key_of[name] = _constant_key(tensor)
        renamed: dict[str, str] = {}  # this graph's tensor name -> prepare graph name

        def prepared_name(name: str) -> str:
            if name == "":
                return ""
            if name in param_inputs:
                self.inputs.setdefault(name, param_inputs[name])
                self._used_names.add(name)
                return name
            if name in constants:
                target = self._name(key_of[name], name)
                if target not in self.initializers:
                    tensor = onnx.TensorProto()
                    tensor.CopyFrom(constants[name])
                    tensor.name = target
                    self.initializers[target] = tensor
                return target
            return renamed[name]

        for index in hoisted:
            node = g.node[index]
            inputs = [prepared_name(i) for i in node.input]
            base = _node_key(node, [key_of.get(i, i) for i in node.input])
            fresh = False
            for k, out in enumerate(node.output):
                key_of[out] = _digest(base, k)
                fresh = fresh or key_of[out] not in self._name_of
                renamed[out] = self._name(key_of[out], out)
            if fresh:
                copy = onnx.NodeProto()
                copy.CopyFrom(node)
                del copy.input[:]
                copy.input.extend(inputs)
                del copy.output[:]
                copy.output.extend(renamed[o] for o in node.output)
                copy.name = self._node_name(node.name or node.op_type)
                self.nodes.append(copy)
        hoisted_set = set(hoisted)
        kept_nodes = [n for i, n in enumerate(g.node) if i not in hoisted_set]
        produced = {o for i in hoisted for o in g.node[i].output}
        frontier = [t for t in dict.fromkeys(i for n in kept_nodes for i in n.input)
                    if t in produced]
        for t in frontier:
            self.outputs.setdefault(renamed[t], None)
        return replace(graph, model=_rewire(model, kept_nodes,
                                            {t: renamed[t] for t in frontier}, params))

    def _node_name(self, wanted: str) -> str:
        name, k = wanted, 1
        while name in self._node_names:
            name, k = f"{wanted}#{k}", k + 1
        self._node_names.add(name)
        return name

    def model(self, like: onnx.ModelProto) -> onnx.ModelProto | None:
        if not self.outputs:
            return None
        graph = helper.make_graph(
            self.nodes, "prepare", list(self.inputs.values()),
            [helper.make_empty_tensor_value_info(n) for n in self.outputs],
            initializer=list(self.initializers.values()))
        model = helper.make_model(graph, opset_imports=list(like.opset_import),
                                  ir_version=like.ir_version)
        try:
            inferred = shape_inference.infer_shapes(model, strict_mode=True)
        except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
            return None  # keep the graphs as they are
        types = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
        for name in self.outputs:
            if (name not in types or not types[name].type.tensor_type.elem_type
                    or value_bytes(types[name]) is None):
                return None  # a prepared tensor of unknown size: keep the graphs as they are
        del model.graph.output[:]
        model.graph.output.extend(types[n] for n in self.outputs)
        return model


def _weight_only(graph: onnx.GraphProto, params: set[str]) -> list[int]:
    """Indices of the nodes (in graph order) worth computing once: they read only parameters,
    constants and such nodes' outputs, depend on at least one parameter, and are not pure
    views of a parameter."""
    constant = {t.name for t in graph.initializer} | {""}
    from_weights: dict[str, bool] = {p: True for p in params}  # tensor -> it is a real product
    views: set[str] = set(params)  # parameters and their views: depend on a parameter
    outputs = {o.name for o in graph.output}
    chosen = []
    for index, node in enumerate(graph.node):
        if node.op_type in _IMPURE or any(i not in constant and i not in from_weights
                                          and i not in views for i in node.input):
            continue
        if not any(i in views or i in from_weights for i in node.input):
            continue  # constants only: not this pass's business
        if node.op_type in VIEW_OPS and not any(from_weights.get(i) and i not in params
                                                for i in node.input):
            views.update(node.output)  # a view of a parameter: leave it in the graph
            continue
        if any(o in outputs for o in node.output):
            continue
        chosen.append(index)
        from_weights.update((o, True) for o in node.output)
    # a view of a parameter read by a chosen node must be computed in the prepare graph too
    return _with_view_inputs(graph, chosen, views - params)


def _with_view_inputs(graph: onnx.GraphProto, chosen: list[int], views: set[str]) -> list[int]:
    """``chosen`` plus the view nodes that produce what chosen nodes read, in graph order."""
    needed = {i for k in chosen for i in graph.node[k].input if i in views}
    producer = {o: k for k, n in enumerate(graph.node) for o in n.output}
    extra: set[int] = set()
    while needed:
        name = needed.pop()
        k = producer[name]
        if k not in extra:
            extra.add(k)
            needed.update(i for i in graph.node[k].input if i in views)
    return sorted(set(chosen) | extra)


def _rewire(model: onnx.ModelProto, nodes: list[onnx.NodeProto], frontier: dict[str, str],
            params: set[str]) -> onnx.ModelProto:
    """A copy of ``model`` with ``nodes`` only, the ``frontier`` tensors read as graph inputs
    (renamed to their prepare graph names), and unread constants and parameters dropped."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    del g.node[:]
    for node in nodes:
        copy = g.node.add()
        copy.CopyFrom(node)
        for k, name in enumerate(copy.input):
            if name in frontier:
                copy.input[k] = frontier[name]
    read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    kept_init = [t for t in g.initializer if t.name in read]
    del g.initializer[:]
    g.initializer.extend(kept_init)
    kept_inputs = [i for i in g.input if i.name not in params or i.name in read]
    del g.input[:]
    g.input.extend(kept_inputs)
    g.input.extend(helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)
                   for name in dict.fromkeys(frontier.values()))
    return out


def _type_prepared_inputs(model: onnx.ModelProto, prepare: onnx.ModelProto) -> None:
    """Give the prepared inputs of a rewritten backward graph the prepare graph's types."""
    types = {o.name: o for o in prepare.graph.output}
    for value in model.graph.input:
        if value.name in types and value.type.tensor_type.elem_type == 0:
            value.CopyFrom(types[value.name])


# -- gradient layout -------------------------------------------------------------------------

@dataclass(frozen=True)
class _Chain:
    """The layout nodes from a gradient's raw product (``raw``: the output of a Reshape to
    ``shape``) to the graph output: their indices in the graph, first node first."""

    raw: str
    shape: tuple[int, ...]
    elem_type: int
    indices: tuple[int, ...]
    key: str


def _chains(model: onnx.ModelProto, gradients: dict[str, str], params: set[str]
            ) -> dict[str, _Chain | None]:
    """Parameter -> the layout chain of its gradient in ``model`` (None: it has none)."""
    g = model.graph
    producer = {o: k for k, n in enumerate(g.node) for o in n.output}
    consumers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    outputs = {o.name: o for o in g.output}
    constants = {t.name: t for t in g.initializer}

    def chain_of(output: str) -> _Chain | None:
        chain: list[int] = []
        name = output
        raw = None  # the earliest Reshape so far whose output can be the raw product
        while True:
            k = producer.get(name)
            node = None if k is None else g.node[k]
            if node is None or node.op_type not in _LAYOUT_OPS:
                break
            if any(i and i not in constants for i in node.input[1:]):
                break
            if node.op_type == "Reshape" and any(g.node[j].op_type == "Transpose"
                                                 for j in chain):
                shape = tuple(int(v) for v in numpy_helper.to_array(constants[node.input[1]]))
                if all(v > 0 for v in shape):
                    raw = (len(chain), name, shape)  # its output is a raw product
            chain.append(k)
            data = node.input[0]
            if consumers.get(data, 0) != 1 or data in outputs or data in constants:
                break
            name = data
        if raw is None:
            return None
        length, name, shape = raw
        chain = chain[:length]
        indices = tuple(reversed(chain))
        nodes = [g.node[k] for k in indices]
        used = [constants[i] for n in nodes for i in n.input[1:] if i]
        key = _digest(shape, tuple((n.op_type, _attributes(n)) for n in nodes),
                      tuple(_constant_key(t) for t in used))
        return _Chain(name, shape, outputs[output].type.tensor_type.elem_type, indices, key)

    return {p: chain_of(o) for p, o in gradients.items() if p in params}


def _gradient_layouts(graphs: Sequence[BackwardGraph], chains: Sequence[dict[str, _Chain | None]]
                      ) -> dict[str, tuple[_Chain, BackwardGraph]]:
    """Parameter -> the layout chain every graph that differentiates it shares (and a graph
    that holds it)."""
    found: dict[str, tuple[_Chain, BackwardGraph] | None] = {}
    for graph, of_graph in zip(graphs, chains):
        for wrt, chain in of_graph.items():
            if wrt not in found:
                found[wrt] = None if chain is None else (chain, graph)
            elif chain is None or found[wrt] is None or found[wrt][0].key != chain.key:
                found[wrt] = None
    return {p: c for p, c in found.items() if c is not None}


def _without_layout_chains(graph: BackwardGraph, chains: dict[str, _Chain | None],
                           layouts: Collection[str]) -> BackwardGraph:
    """``graph`` giving the raw product of each parameter of ``layouts`` it differentiates."""
    moved = {p: c for p, c in chains.items() if p in layouts and c is not None}
    if not moved:
        return graph
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    g = model.graph
    drop = {k for c in moved.values() for k in c.indices}
    kept = [n for k, n in enumerate(g.node) if k not in drop]
    del g.node[:]
    g.node.extend(kept)
    gradients = dict(graph.gradients)
    for param, chain in moved.items():
        old = graph.gradients[param]
        for o in g.output:
            if o.name == old:
                o.CopyFrom(helper.make_tensor_value_info(chain.raw, chain.elem_type, chain.shape))
        gradients[param] = chain.raw
    read = {i for n in g.node for i in n.input}
    kept_init = [t for t in g.initializer if t.name in read]
    del g.initializer[:]
    g.initializer.extend(kept_init)
    return replace(graph, model=model, gradients=gradients)


def _layout_model(layouts: dict[str, tuple[_Chain, BackwardGraph]], raw_names: dict[str, str],
                  laid_out: dict[str, str], like: onnx.ModelProto) -> onnx.ModelProto | None:
    """The graph from each parameter's raw gradient (input ``raw_names[p]``) to its gradient
    (output ``laid_out[p]``): its layout chain, copied."""
    if not layouts:
        return None
    nodes, inputs, outputs, constants = [], [], [], []
    for param, (chain, source) in layouts.items():
        g = source.model.graph
        raw = raw_names[param]
        inputs.append(helper.make_tensor_value_info(raw, chain.elem_type, chain.shape))
        chain_nodes = [g.node[k] for k in chain.indices]
        rename = {chain.raw: raw, chain_nodes[-1].output[0]: laid_out[param]}
        by_name = {t.name: t for t in g.initializer}
        for name in dict.fromkeys(i for n in chain_nodes for i in n.input[1:] if i):
            copy = onnx.TensorProto()
            copy.CopyFrom(by_name[name])
            copy.name = rename[name] = f"{param}:{name}"
            constants.append(copy)
        for node in chain_nodes:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"{param}:{node.name or node.op_type}"
            del copy.input[:]
            copy.input.extend(rename.get(i, f"{param}:{i}") for i in node.input)
            del copy.output[:]
            copy.output.extend(rename.get(o, f"{param}:{o}") for o in node.output)
            nodes.append(copy)
        outputs.append(helper.make_tensor_value_info(laid_out[param], chain.elem_type, None))
    graph = helper.make_graph(nodes, "gradient_layout", inputs, outputs, initializer=constants)
    model = helper.make_model(graph, opset_imports=list(like.opset_import),
                              ir_version=like.ir_version)
    inferred = shape_inference.infer_shapes(model, strict_mode=True)
    del model.graph.output[:]
    model.graph.output.extend(inferred.graph.output)
    return model
