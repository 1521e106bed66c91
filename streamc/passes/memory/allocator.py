"""ONNX Runtime's CPU allocation planner, modelled: the peak memory of one graph run.

:func:`plan_graph` walks a graph's nodes once, O(nodes), in an execution order (ONNX Runtime's
default order, its reverse depth-first search from the leaves; the graph's own order; or the
larger of the two); a tensor lives from its producer to its last reader (graph outputs to the
end, fed inputs for the whole run). ORT's allocation planner is followed: view ops share their
input's buffer (:data:`~streamc.ops.memory.ALIAS_OPS`), element-wise activations write into a
dying input (:data:`~streamc.ops.memory.INPLACE_OPS`), a new tensor takes a freed buffer of the
same shape (which then stays allocated in between), nodes with constant inputs are folded into
session constants (:func:`fold_constants`). Kernel workspace counts during its node only
(:data:`~streamc.ops.memory.WORKSPACE`). :func:`ort_optimized` gives the graph ORT actually
runs, for exact plans.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import onnx

from streamc.errors import StreamcError
from streamc.ops.attrs import is_default_domain
from streamc.ops.facts import NEVER_FOLD
from streamc.ops.memory import ALIAS_OPS, INPLACE_OPS, WORKSPACE, element_bytes

#: What ONNX Runtime keeps for itself besides tensors (CPU provider, ORT 1.32), measured by
#: ``benchmarks/runtime_overhead.py`` with freed memory returned to the system: its start-up
#: (environment, thread pools, kernel registry: 9 MiB) and the first session's first run
#: (2 MiB more), once per process; then about 5.7 KiB per node of every live session (graph,
#: kernels, execution plan), on ResNet-18 backward graphs of 900-1800 nodes. Not tensor memory;
#: a CUDA context is far larger.
RUNTIME_ONCE = 11 * 2**20
RUNTIME_PER_NODE = 5888


def value_bytes(vi: onnx.ValueInfoProto) -> int | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    n = 1
    for d in t.shape.dim:
        if not d.HasField("dim_value"):
            return None
        n *= d.dim_value
    return n * element_bytes(t.elem_type)


def initializer_bytes(t: onnx.TensorProto) -> int:
    return math.prod(t.dims) * element_bytes(t.data_type)



@dataclass
class GraphPlan:
    """The memory of one graph run (bytes).

    ``peak`` counts what the run allocates: fed inputs that are not resident elsewhere,
    intermediate tensors, outputs and kernel workspace, at the node where their sum is largest
    (``peak_node``). ``constants`` (initializers and Constant nodes) stay with the session.
    ``activations`` is the sum of every intermediate buffer, as if none were ever freed.
    """

    name: str
    nodes: int
    peak: int
    peak_node: str
    inputs: int
    outputs: int
    constants: int
    activations: int
    workspace: int
    unknown_shapes: int = 0
    order: str = "ort"
    #: (node, bytes allocated while it runs) in execution order, then the end of the run
    curve: list[tuple[str, int]] = field(default_factory=list, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        # Not asdict(): it would deep-copy the (long) curve only to drop it.
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "curve"}


def _with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    g = model.graph
    known = {vi.name for vi in g.value_info} | {vi.name for vi in g.output}
    if all(o in known for n in g.node for o in n.output if o):
        return model
    return onnx.shape_inference.infer_shapes(model)


NodeStep = tuple[onnx.NodeProto, tuple[str, ...], tuple[str, ...]]  # node, inputs, outputs


def _node_steps(nodes: Sequence[onnx.NodeProto] | Sequence[NodeStep]) -> list[NodeStep]:
    return [(n, tuple(n.input), tuple(n.output)) if isinstance(n, onnx.NodeProto) else n
            for n in nodes]


def fold_constants(nodes: Sequence[onnx.NodeProto] | Sequence[NodeStep], constants: Iterable[str],
                   outputs: Iterable[str]) -> tuple[list[NodeStep], list[str]]:
    """ONNX Runtime's constant folding (on at every optimisation level but ``ORT_DISABLE_ALL``):
    a node whose inputs are all constants (a ``ConstantOfShape`` of a static shape, say) is
    computed once when the session is built, and its outputs become session constants, held as
    long as the session lives. Returns the remaining steps (node, inputs, outputs) in graph
    order and the names of the folded tensors."""
    outputs = set(outputs)
    const = set(constants)
    const.add("")  # an omitted optional input neither stops nor makes a fold
    folded: list[str] = []
    steps: list[NodeStep] = []
    for step in _node_steps(nodes):
        node, ins, outs = step
        if (const.issuperset(ins) and any(ins) and is_default_domain(node)
                and node.op_type not in NEVER_FOLD and node.op_type != "Constant"
                and outputs.isdisjoint(outs)):
            made = [o for o in outs if o]
            const.update(made)
            folded.extend(made)
            continue
        steps.append(step)
    return steps, folded


def _ort_order(ins: Sequence[Sequence[str]], outs: Sequence[Sequence[str]]) -> list[int]:
    """ONNX Runtime's default order of steps given by their inputs and outputs (see
    :func:`execution_order`)."""
    producer: dict[str, int] = {}
    for i, names in enumerate(outs):
        for out in names:
            if out:
                producer[out] = i
    get = producer.get
    inputs_of: list[list[int]] = []
    has_consumer = [False] * len(outs)
    for names in ins:
        preds = sorted({p for p in map(get, names) if p is not None})
        for p in preds:
            has_consumer[p] = True
        inputs_of.append(preds)
    stack: list[tuple[int, bool]] = [(i, False) for i in range(len(outs)) if not has_consumer[i]]
    visited = [False] * len(outs)
    order: list[int] = []
    while stack:
        i, leave = stack.pop()
        if leave:
            order.append(i)
            continue
        if visited[i]:
            continue
        visited[i] = True
        stack.append((i, True))
        stack.extend((p, False) for p in inputs_of[i] if not visited[p])
    return order


def execution_order(nodes: Sequence[onnx.NodeProto] | Sequence[NodeStep], how: str = "ort"
                    ) -> list[int]:
    """Indices of ``nodes`` in execution order.

    ``"ort"``: ONNX Runtime's default order (``GraphViewer``): a reverse depth-first search from
    the leaf nodes (nodes no other node reads), the last leaf first, each node's producers visited
    highest index first, a node emitted once all its producers are. ``"graph"``: the graph's own
    (topological) order.
    """
    if how == "graph":
        return list(range(len(nodes)))
    if how != "ort":
        raise ValueError(f"unknown execution order {how!r} (use 'ort' or 'graph')")
    steps = _node_steps(nodes)
    return _ort_order([s[1] for s in steps], [s[2] for s in steps])


def _share_freed_buffers(start: list[int], end: list[int], size: list[int],
                         key: list[tuple | None], steps: int
                         ) -> tuple[list[int], list[int], list[int]]:
    """ORT's allocation planner: a new tensor takes the buffer of a dead tensor of the same shape
    and type when there is one (the most recently freed first); that buffer then stays allocated
    from its first tensor's birth to its last tensor's death, idle time included. Returns the
    physical buffers' (start, end, size)."""
    free: dict[tuple, list[int]] = {}
    p_start: list[int] = []
    p_end: list[int] = []
    p_size: list[int] = []
    holder: list[int] = []  # physical buffer of each logical buffer
    ending: dict[int, list[int]] = {}
    b = 0
    n = len(size)
    for step in range(steps + 1):
        while b < n and start[b] == step:
            k = key[b]
            stack = free.get(k) if k is not None and end[b] < steps else None
            if stack:
                p = stack.pop()
                p_end[p] = end[b]
            else:
                p = len(p_size)
                p_start.append(step)
                p_end.append(end[b])
                p_size.append(size[b])
            holder.append(p)
            if k is not None and end[b] < steps:  # only these are ever handed on
                ending.setdefault(end[b], []).append(b)
            b += 1
        for done in ending.pop(step, ()):
            free.setdefault(key[done], []).append(holder[done])
    return p_start, p_end, p_size


#: What liveness needs of one graph output of a step: (the step's first output, name, bytes,
#: reuse key or None, counts as an unknown shape).
_Out = tuple[bool, str, int, "tuple | None", bool]
_PLAIN, _ALIAS, _INPLACE = 0, 1, 2


@dataclass
class _Digest:
    """A graph reduced to plain Python tuples, computed once and shared by both orders."""

    names: list[str]  # node name of each step
    ins: list[tuple[str, ...]]
    outs: list[tuple[str, ...]]
    kinds: list[int]  # _PLAIN, _ALIAS (a view of input 0) or _INPLACE (may write into input 0)
    first_out_bytes: list[int]  # bytes of output 0 (-1 when unknown), for in-place writes
    out_info: list[tuple[_Out, ...]]
    workspace: list[int]
    nbytes: dict[str, int]
    fed: int
    constants: int
    outputs: set[str]


def _digest(model: onnx.ModelProto, resident: Iterable[str], fold: bool) -> _Digest:
    g = model.graph
    nbytes: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in (*g.input, *g.value_info, *g.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            # A symbolic dimension reads as 0: such a tensor counts as empty (and unknown).
            shape = tuple(d.dim_value for d in t.shape.dim)
            shapes[vi.name] = shape
            nbytes[vi.name] = math.prod(shape) * element_bytes(t.elem_type)
    constants = 0
    constant_names = set()
    for t in g.initializer:
        constants += initializer_bytes(t)
        constant_names.add(t.name)
        shapes[t.name] = tuple(t.dims)
    resident = set(resident)
    fed = sum(nbytes.get(i.name, 0) for i in g.input
              if i.name not in constant_names and i.name not in resident)
    outputs = {o.name for o in g.output}
    nodes: list[NodeStep] = []
    for n in g.node:
        outs = tuple(n.output)
        if n.op_type == "Constant" and is_default_domain(n):
            for o in outs:
                constants += nbytes.get(o, 0)
                constant_names.add(o)
        else:
            nodes.append((n, tuple(n.input), outs))
    if fold:
        steps, folded = fold_constants(nodes, constant_names, outputs)
        constants += sum(nbytes.get(t, 0) for t in folded)
    else:
        steps = nodes
    names, ins, outs_of, kinds, first_bytes, out_info, workspace = [], [], [], [], [], [], []
    per_op: dict[tuple[str, str], tuple[int, Any]] = {}  # (op, domain) -> (kind, workspace rule)
    for node, node_ins, node_outs in steps:
        op_key = (node.op_type, node.domain)
        if op_key not in per_op:
            op = op_key[0]
            per_op[op_key] = (_ALIAS if op in ALIAS_OPS else _INPLACE if op in INPLACE_OPS
                              else _PLAIN, WORKSPACE.get(op, None, op_key[1]))
        kind, rule = per_op[op_key]
        names.append(node.name)
        ins.append(node_ins)
        outs_of.append(node_outs)
        kinds.append(kind)
        first_bytes.append(nbytes.get(node_outs[0], -1) if node_outs else -1)
        info = []
        for k, out in enumerate(node_outs):
            if out:
                b = nbytes.get(out)
                if b:
                    info.append((k == 0, out, b, (shapes.get(out), b), False))
                else:
                    info.append((k == 0, out, 0, None, b is None or 0 in shapes.get(out, (0,))))
        out_info.append(tuple(info))
        workspace.append(rule(node, shapes) if rule is not None else 0)
    return _Digest(names, ins, outs_of, kinds, first_bytes, out_info, workspace, nbytes, fed,
                     constants, outputs)


def _liveness(prep: _Digest, name: str, order: str, inplace: bool, reuse: bool) -> GraphPlan:
    sequence = (range(len(prep.ins)) if order == "graph"
                else _ort_order(prep.ins, prep.outs))
    steps = len(sequence)
    ins_of, kinds, first_bytes, out_info = prep.ins, prep.kinds, prep.first_out_bytes, \
        prep.out_info
    # Pass 1: the last step at which each tensor is read; outputs live to the end.
    last_use: dict[str, int] = {}
    for step, i in enumerate(sequence):
        for t in ins_of[i]:
            last_use[t] = step
    for o in prep.outputs:
        last_use[o] = steps
    # Pass 2: buffers, with views and in-place writes sharing their input's buffer.
    buffer_of: dict[str, int] = {}
    start: list[int] = []
    end: list[int] = []
    size: list[int] = []
    key: list[tuple | None] = []
    unknown = 0
    get_last = last_use.get
    for step, i in enumerate(sequence):
        kind = kinds[i]
        shared = None
        if kind:
            node_ins = ins_of[i]
            shared = buffer_of.get(node_ins[0]) if node_ins else None
            if kind == _ALIAS:
                if shared is None:
                    continue  # a view of a fed input or a constant: no memory of its own
            elif not (inplace and shared is not None and end[shared] == step
                      and size[shared] == first_bytes[i]):
                shared = None
        for first, out, b, k, unknown_shape in out_info[i]:
            if first and shared is not None:
                buffer_of[out] = shared
                end[shared] = max(end[shared], get_last(out, step))
                continue
            buffer_of[out] = len(size)
            unknown += unknown_shape
            size.append(b)
            start.append(step)
            end.append(get_last(out, step))
            key.append(k)
    activations = sum(size)
    if reuse:
        start, end, size = _share_freed_buffers(start, end, size, key, steps)
    delta = [0] * (steps + 2)
    for s0, e0, b in zip(start, end, size):
        delta[s0] += b
        delta[min(e0, steps) + 1] -= b
    workspace = prep.workspace
    work = [workspace[i] for i in sequence] + [0]
    live = prep.fed
    peak, peak_step = live, -1
    curve = []
    for step in range(steps + 1):
        live += delta[step]
        total = live + work[step]
        curve.append(total)
        if total > peak:
            peak, peak_step = total, step
    names = [prep.names[i] for i in sequence] + ["(end of run)"]
    return GraphPlan(
        name=name,
        nodes=steps,
        peak=peak,
        peak_node="(inputs)" if peak_step < 0 else names[peak_step],
        inputs=prep.fed,
        outputs=sum(prep.nbytes.get(o, 0) for o in prep.outputs),
        constants=prep.constants,
        activations=activations,
        workspace=max(work, default=0),
        unknown_shapes=unknown,
        order=order,
        curve=list(zip(names, curve)),
    )


def plan_graph(model: onnx.ModelProto, resident: Iterable[str] = (), name: str = "",
               order: str = "worst", inplace: bool = True, reuse: bool = True,
               fold: bool = True) -> GraphPlan:
    """Peak memory of one run of ``model`` (see module docstring).

    ``order``: ``"ort"`` (ONNX Runtime's default order of the graph as written, see
    :func:`execution_order`), ``"graph"`` (the graph's own order, which ORT follows with
    ``ExecutionOrder.PRIORITY_BASED``) or ``"worst"``: the larger of the two. ORT's graph
    optimisations rewrite the graph before ordering it, and the order they lead to lies close
    to one or the other depending on the graph; ``"worst"`` plans for both (docs/memory.md).

    ``resident`` names inputs fed from memory held elsewhere (weights), not counted here;
    ``inplace=False`` gives every non-view tensor its own buffer; ``reuse=False`` frees every
    buffer at its last use instead of keeping it for a later tensor of the same shape (ORT's
    allocation planner keeps it); ``fold=False`` skips :func:`fold_constants`.
    """
    if order not in ("ort", "graph", "worst"):
        raise ValueError(f"unknown execution order {order!r} (use 'ort', 'graph' or 'worst')")
    prep = _digest(_with_shapes(model), resident, fold)
    name = name or model.graph.name
    if order != "worst":
        return _liveness(prep, name, order, inplace, reuse)
    plans = [_liveness(prep, name, how, inplace, reuse) for how in ("ort", "graph")]
    return max(plans, key=lambda p: p.peak)


def ort_optimized(model: onnx.ModelProto, level: str = "all") -> onnx.ModelProto:
    """The graph ONNX Runtime actually runs: ``model`` after ORT's CPU graph optimisations at
    ``level`` (``"basic"``, ``"extended"``, ``"all"``), nodes in ORT's execution order, shapes
    inferred (tensors ORT created get their shape from the tensor they replace when inference
    cannot tell). Needs onnxruntime; costs one session build."""
    import tempfile

    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - onnxruntime is a dependency of every real setup
        raise StreamcError("exact memory plans need onnxruntime (pip install streamc[cpu]).") \
            from None
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    with tempfile.TemporaryDirectory(prefix="streamc-plan-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[level]
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options,
                             providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    try:
        optimized = onnx.shape_inference.infer_shapes(optimized)
    except Exception:  # contrib ops ORT introduced; fall back to names below
        pass
    known = {vi.name for vi in optimized.graph.value_info}
    original = _with_shapes(model)
    for vi in list(original.graph.value_info) + list(original.graph.output):
        if vi.name not in known:
            optimized.graph.value_info.append(vi)
    return optimized
