"""The memory of conventional full-image training of a model, the way torch's autograd does it:
what each op keeps for its backward pass (:data:`~streamc.ops.memory.SAVED`), each tensor once,
plus the gradients alive at once in the backward pass."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import onnx

from streamc.analysis import Analysis
from streamc.graph import opset_version
from streamc.ops.memory import SAVED, saves_nothing
from streamc.passes.extract import model_parameters
from streamc.passes.memory.allocator import initializer_bytes, plan_graph, value_bytes


@dataclass
class ConventionalPlan:
    """Full-image training of the same model, autograd style (bytes).

    ``activations``: what the forward pass keeps for backward, tensor by tensor as torch's
    autograd does (:data:`SAVED`: a convolution keeps its input, a ReLU its output, a max-pool
    its input and int64 indices...), each tensor once. ``backward``: the peak of the gradient
    tensors alive at once in the backward pass, which mirrors the forward pass's liveness (the
    gradient of a tensor lives from its last reader's backward to its producer's backward).
    ``all_activations`` (not in the total) keeps every intermediate tensor instead: the upper
    bound of a framework that frees nothing.
    """

    image: int
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    backward: int
    all_activations: int = 0

    @property
    def total(self) -> int:
        return (self.image + self.parameters + self.gradients + self.optimizer
                + self.activations + self.backward)

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def plan_conventional(analysis: Analysis, optimizer_copies: int = 2) -> ConventionalPlan:
    """Memory of conventional full-image training of the analysed model at its image size;
    see :class:`ConventionalPlan`."""
    proto = analysis.model
    params = model_parameters(analysis)
    inits = {t.name: t for t in proto.graph.initializer}
    param_bytes = sum(initializer_bytes(inits[n]) for n in params.names if n in inits)
    trainable = sum(initializer_bytes(inits[n]) for n in params.trainable if n in inits)
    image_vi = next(v for v in proto.graph.input if v.name == analysis.input_name)
    image_bytes = value_bytes(image_vi) or 0
    everything = plan_graph(proto, (), "conventional", order="graph", inplace=False)
    kept, peak = _autograd_memory(proto, analysis.input_name)
    return ConventionalPlan(
        image=image_bytes,
        parameters=param_bytes,
        gradients=trainable,
        optimizer=optimizer_copies * trainable,
        activations=kept,
        backward=max(peak - kept, 0),
        all_activations=everything.activations,
    )


def head_memory(analysis: Analysis) -> int:
    """Bytes the head of ``analysis`` needs in its backward pass, autograd style: its inputs
    from the grid (the cut tensors) and their gradients, plus what its nodes keep for backward
    and the gradients alive at once (as :func:`plan_conventional` counts them). An estimate
    from below of the program's head phase (ORT's backward graph holds at least these)."""
    g = analysis.model.graph
    head = set(analysis.head)
    nodes = [node for node in g.node if node.name in head]
    sizes = _tensor_bytes(g)
    cuts = sum(sizes.get(t, 0) for t in analysis.cut_tensors)
    _kept, peak = _autograd_memory(analysis.model, analysis.input_name, nodes,
                                   frozenset(analysis.cut_tensors))
    return 2 * cuts + peak


def _autograd_memory(model: onnx.ModelProto, image: str,
                     nodes: list[onnx.NodeProto] | None = None,
                     sources: frozenset[str] = frozenset()) -> tuple[int, int]:
    """(bytes kept for backward at the end of the forward pass, peak bytes of kept tensors plus
    live gradients during the backward pass), autograd style, in the graph's order, over
    ``nodes`` (default: all), with ``sources`` counted as inputs rather than activations.

    A kept tensor (:data:`SAVED`) is released once the backward of the earliest node keeping it
    has run; the gradient of a tensor lives from the backward of its last reader to the backward
    of its producer. Gradients of the image and of weights are not counted here.
    """
    g = model.graph
    nbytes = _tensor_bytes(g)
    not_activations = ({t.name for t in g.initializer} | {i.name for i in g.input} | {image}
                       | sources)
    opset = opset_version(model)
    nodes = list(g.node) if nodes is None else nodes
    n = len(nodes)
    first_keeper: dict[str, int] = {}
    extras = 0
    alive = [0] * (n + 2)  # difference array over backward steps j = 0..n (n: before backward)
    producer: dict[str, int] = {}
    last_reader: dict[str, int] = {}
    for j, node in enumerate(nodes):
        # An op without a rule has no VJP rule either: nothing differentiates through it.
        rule = SAVED.get(node.op_type, opset, node.domain) or saves_nothing
        names, extra = rule(node, nbytes)
        for t in names:
            if t and t not in not_activations and t not in first_keeper:
                first_keeper[t] = j
        if extra:  # held by this node alone: alive for backward steps j..n
            alive[j] += extra
            extras += extra
        for t in node.input:
            if t:
                last_reader[t] = j
        for t in node.output:
            if t:
                producer[t] = j
    kept = extras
    for t, j in first_keeper.items():
        kept += nbytes.get(t, 0)
        alive[j] += nbytes.get(t, 0)
    for o in g.output:
        last_reader[o.name] = n
    for t, p in producer.items():  # the gradient of t: backward steps p..last reader
        if t in not_activations or t not in last_reader:
            continue
        alive[p] += nbytes.get(t, 0)
        alive[last_reader[t] + 1] -= nbytes.get(t, 0)
    peak = running = 0
    for j in range(n + 1):
        running += alive[j]
        peak = max(peak, running)
    return kept, peak


def _tensor_bytes(graph: onnx.GraphProto) -> dict[str, int]:
    """Bytes of every graph input, value and output whose shape is known (0 otherwise)."""
    return {vi.name: value_bytes(vi) or 0
            for vi in list(graph.input) + list(graph.value_info) + list(graph.output)}
