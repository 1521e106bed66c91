"""Memory-plan pass: predict the peak memory of a training step, tiled and conventional.

Contract: :func:`plan_program` takes a compiled :class:`~streamc.program.Program` and returns a
:class:`MemoryPlan` (bytes of tensors, the same on CPU and CUDA; ``docs/memory.md`` says what
ONNX Runtime and the allocator add on top, and how well the plan matches a real process).
:func:`plan_model` compiles and plans several tile sizes of a model, :func:`select_tile` /
:func:`choose_tile` pick the one with the least recompute whose peak fits a budget,
:func:`parse_size` reads budgets, :func:`plot_plans` draws memory and recompute against tile size.

How a graph is planned (:func:`plan_graph`): tensor sizes come from shape inference; the nodes are
walked once, O(nodes), in an execution order (ONNX Runtime's default order, its reverse
depth-first search from the leaves; the graph's own order; or the larger of the two); a tensor
lives from its producer to its last reader (graph outputs to the end, fed inputs for the whole
run). ORT's allocation planner is followed: view ops share their input's buffer, element-wise
activations write into a dying input, a new tensor takes a freed buffer of the same shape (which
then stays allocated in between), nodes with constant inputs are folded into session constants.
Kernel workspace counts during its node only (:data:`WORKSPACE`, a per-op table).

How a step is planned (:func:`plan_program`): what stays resident (image, weights and buffers,
gradients, optimizer state, full cut tensors and their gradients, the head's outputs, session
constants, an allowance for ORT's per-session state) plus the largest phase (a tile class's
forward or backward graph, the head's forward or backward). :func:`plan_conventional` is
full-image training the way autograd does it (what each op keeps for backward: :data:`SAVED`).
``exact=True`` plans the graphs ORT actually runs after its own optimisations (needs ORT).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import onnx

from streamc._gc import paused_gc
from streamc.errors import CompileError, StreamcError
from streamc.graph import attributes
from streamc.ops.registry import OpTable

# ------------------------------------------------------------------------------------------------
# Sizes


#: Bytes per element of each ONNX tensor element type.
ELEMENT_BYTES: dict[int, int] = {
    onnx.TensorProto.FLOAT: 4,
    onnx.TensorProto.UINT8: 1,
    onnx.TensorProto.INT8: 1,
    onnx.TensorProto.UINT16: 2,
    onnx.TensorProto.INT16: 2,
    onnx.TensorProto.INT32: 4,
    onnx.TensorProto.INT64: 8,
    onnx.TensorProto.BOOL: 1,
    onnx.TensorProto.FLOAT16: 2,
    onnx.TensorProto.DOUBLE: 8,
    onnx.TensorProto.UINT32: 4,
    onnx.TensorProto.UINT64: 8,
    onnx.TensorProto.BFLOAT16: 2,
}

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30,
    "ti": 2**40, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """``'4GiB'``, ``'512MiB'``, ``'8GB'``, ``'1.5G'`` or plain bytes (``'1000000'``) -> bytes.

    Binary units (KiB, MiB, GiB, TiB) are powers of 1024, decimal ones (kB, MB, GB, TB and the
    bare letters k, M, G, T) powers of 1000. Case does not matter.
    """
    if isinstance(text, bool):
        raise StreamcError(f"memory size {text!r} is not a size.")
    if isinstance(text, int):
        if text <= 0:
            raise StreamcError(f"memory size {text} must be positive.")
        return text
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise StreamcError(
            f"memory size {text!r} is not a size: write a number with an optional unit, e.g. "
            "4GiB, 512MiB, 8GB or 1000000 (bytes)."
        )
    value = float(match.group(1)) * _UNITS[unit]
    if value < 1:
        raise StreamcError(f"memory size {text!r} must be at least one byte.")
    return int(value)


def format_size(n: float) -> str:
    """Bytes as a short human string in binary units (``'1.50 GiB'``)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _type_bytes(elem_type: int) -> int:
    return ELEMENT_BYTES.get(elem_type, 4)


def _value_bytes(vi: onnx.ValueInfoProto) -> int | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    n = 1
    for d in t.shape.dim:
        if not d.HasField("dim_value"):
            return None
        n *= d.dim_value
    return n * _type_bytes(t.elem_type)


def _initializer_bytes(t: onnx.TensorProto) -> int:
    return math.prod(t.dims) * _type_bytes(t.data_type)


# ------------------------------------------------------------------------------------------------
# Per-op tables: buffer sharing and kernel workspace

#: ONNX Runtime CPU kernels declared ``Alias(0, 0)``: the output is a view of input 0.
ALIAS_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"})
#: Kernels declared ``MayInplace(0, 0)``: the output may reuse input 0's buffer when it dies.
INPLACE_OPS = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "HardSigmoid", "Softplus",
    "Softsign", "ThresholdedRelu", "HardSwish", "Scatter", "ScatterElements",
})

Shapes = dict[str, tuple[int, ...]]

#: What ONNX Runtime keeps for itself besides tensors (CPU provider, ORT 1.32), measured by
#: ``benchmarks/runtime_overhead.py`` with freed memory returned to the system: its start-up
#: (environment, thread pools, kernel registry: 9 MiB) and the first session's first run
#: (2 MiB more), once per process; then about 5.7 KiB per node of every live session (graph,
#: kernels, execution plan), on ResNet-18 backward graphs of 900-1800 nodes. Not tensor memory;
#: a CUDA context is far larger.
RUNTIME_ONCE = 11 * 2**20
RUNTIME_PER_NODE = 5888

#: Contract of a rule: ``rule(node, shapes) -> bytes`` of scratch memory the kernel allocates for
#: itself while it runs (freed when it returns). Ops without a rule need none.
WORKSPACE: OpTable = OpTable("memory workspace")


@WORKSPACE.register("ConvTranspose")
def conv_transpose_workspace(node: onnx.NodeProto, shapes: Shapes) -> int:
    """ORT CPU ConvTranspose: a column buffer of (C_out/group · prod(kernel)) × input pixels."""
    x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
    if not x or not w:
        return 0
    return 4 * math.prod(w[1:]) * math.prod(x[2:])


@WORKSPACE.register("Conv")
def conv_workspace(node: onnx.NodeProto, shapes: Shapes) -> int:
    """MLAS convolution: im2col of the whole output only when there are more filters than
    output pixels; otherwise it works in small per-thread segments (or needs nothing)."""
    x, w, y = (shapes.get(node.input[0]), shapes.get(node.input[1]),
               shapes.get(node.output[0]))
    if not x or not w or not y:
        return 0
    attrs = attributes(node)
    group = int(attrs.get("group", 1))
    out_pixels = math.prod(y[2:])
    k = math.prod(w[1:])
    pointwise = (math.prod(w[2:]) == 1 and all(s == 1 for s in attrs.get("strides", [1]))
                 and not any(attrs.get("pads", [0])))
    if pointwise:
        return 0
    if w[0] // group > out_pixels:
        return 4 * out_pixels * k
    return 4 * 128 * 128  # one MLAS segment (MLAS_SGEMM_STRIDEN × STRIDEK floats)


#: Contract of a rule: ``rule(node, nbytes) -> (tensor names, extra bytes)``: what reverse-mode
#: autodiff keeps of a forward node for its backward pass, as torch's autograd does (used for the
#: conventional figure). Ops without a rule keep all their inputs.
SAVED: OpTable = OpTable("saved for backward")


@SAVED.register("Conv", "ConvTranspose", "Gemm", "MatMul", "Mul", "Div", "Pow", "PRelu")
def saves_inputs(node: onnx.NodeProto, nbytes: dict[str, int]) -> tuple[list[str], int]:
    return [t for t in node.input if t], 0


@SAVED.register("BatchNormalization", "LeakyRelu", "Elu", "Selu", "Celu", "Softplus", "Softsign",
                "HardSigmoid", "HardSwish", "Log", "Abs", "GlobalAveragePool", "AveragePool",
                "GlobalMaxPool")
def saves_first_input(node: onnx.NodeProto, nbytes: dict[str, int]) -> tuple[list[str], int]:
    return list(node.input[:1]), 0


@SAVED.register("Relu", "Sigmoid", "Tanh", "Exp", "Sqrt", "Reciprocal")
def saves_output(node: onnx.NodeProto, nbytes: dict[str, int]) -> tuple[list[str], int]:
    return list(node.output[:1]), 0


@SAVED.register("MaxPool")
def saves_input_and_indices(node: onnx.NodeProto, nbytes: dict[str, int]
                            ) -> tuple[list[str], int]:
    # The input, and int64 indices of the output's shape (twice a float32 output's bytes).
    return list(node.input[:1]), 2 * nbytes.get(node.output[0], 0)


@SAVED.register("Add", "Sub", "Neg", "Concat", "Split", "Slice", "Pad", "Reshape", "Flatten",
                "Squeeze", "Unsqueeze", "Identity", "Transpose", "Resize", "Upsample", "Dropout",
                "Cast", "Expand", "ReduceSum", "ReduceMean", "Shape", "Constant",
                "ConstantOfShape")
def saves_nothing(node: onnx.NodeProto, nbytes: dict[str, int]) -> tuple[list[str], int]:
    return [], 0


# ------------------------------------------------------------------------------------------------
# One graph


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


Step = tuple[onnx.NodeProto, tuple[str, ...], tuple[str, ...]]  # node, its inputs, its outputs

#: Ops ONNX Runtime never folds into constants.
_NEVER_FOLD = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                         "Multinomial", "Bernoulli", "Constant"})


def _steps(nodes: Sequence[onnx.NodeProto] | Sequence[Step]) -> list[Step]:
    return [(n, tuple(n.input), tuple(n.output)) if isinstance(n, onnx.NodeProto) else n
            for n in nodes]


def fold_constants(nodes: Sequence[onnx.NodeProto] | Sequence[Step], constants: Iterable[str],
                   outputs: Iterable[str]) -> tuple[list[Step], list[str]]:
    """ONNX Runtime's constant folding (on at every optimisation level but ``ORT_DISABLE_ALL``):
    a node whose inputs are all constants (a ``ConstantOfShape`` of a static shape, say) is
    computed once when the session is built, and its outputs become session constants, held as
    long as the session lives. Returns the remaining steps (node, inputs, outputs) in graph
    order and the names of the folded tensors."""
    outputs = set(outputs)
    const = set(constants)
    const.add("")  # an omitted optional input neither stops nor makes a fold
    folded: list[str] = []
    steps: list[Step] = []
    for step in _steps(nodes):
        node, ins, outs = step
        if (const.issuperset(ins) and any(ins) and node.domain in ("", "ai.onnx")
                and node.op_type not in _NEVER_FOLD and outputs.isdisjoint(outs)):
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


def execution_order(nodes: Sequence[onnx.NodeProto] | Sequence[Step], how: str = "ort"
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
    steps = _steps(nodes)
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
class _Prepared:
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


def _prepare(model: onnx.ModelProto, resident: Iterable[str], fold: bool) -> _Prepared:
    g = model.graph
    nbytes: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in (*g.input, *g.value_info, *g.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            # A symbolic dimension reads as 0: such a tensor counts as empty (and unknown).
            shape = tuple(d.dim_value for d in t.shape.dim)
            shapes[vi.name] = shape
            nbytes[vi.name] = math.prod(shape) * _type_bytes(t.elem_type)
    constants = 0
    constant_names = set()
    for t in g.initializer:
        constants += _initializer_bytes(t)
        constant_names.add(t.name)
        shapes[t.name] = tuple(t.dims)
    resident = set(resident)
    fed = sum(nbytes.get(i.name, 0) for i in g.input
              if i.name not in constant_names and i.name not in resident)
    outputs = {o.name for o in g.output}
    nodes: list[Step] = []
    for n in g.node:
        outs = tuple(n.output)
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
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
    return _Prepared(names, ins, outs_of, kinds, first_bytes, out_info, workspace, nbytes, fed,
                     constants, outputs)


def _liveness(prep: _Prepared, name: str, order: str, inplace: bool, reuse: bool) -> GraphPlan:
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
    prep = _prepare(_with_shapes(model), resident, fold)
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


# ------------------------------------------------------------------------------------------------
# A whole training step


@dataclass
class ClassPlan:
    """One tile shape class: how many tiles use it, and its forward and backward graph plans."""

    id: int
    tiles: int
    input_size: list[int]
    forward: GraphPlan
    backward: GraphPlan

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "tiles": self.tiles, "input_size": self.input_size,
                "forward": self.forward.to_dict(), "backward": self.backward.to_dict()}


@dataclass
class Resident:
    """What stays in memory for the whole step (bytes)."""

    image: int
    parameters: int  # weights and buffers (BatchNorm statistics)
    gradients: int  # one per trainable weight
    optimizer: int  # optimizer state: Adam keeps two moments per trainable weight
    cut_tensors: int
    cut_gradients: int
    outputs: int  # the model's outputs (from the head)
    constants: int  # constant initializers held by the sessions (folded ones included)
    runtime: int = 0  # ORT's start-up and its state in the sessions kept (RUNTIME_* allowance)

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


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


@dataclass
class MemoryPlan:
    """Predicted peak memory of one training step of a program (bytes).

    ``peak`` = ``resident.total`` plus the largest phase (a tile class's forward or backward
    graph, or the head's): the figure when every session's memory is returned between runs
    (ORT's CPU arena off, see docs/memory.md). ``session_arenas`` is the figure with ORT's
    default CPU arena, where each session keeps the memory of its own largest run, so the graph
    peaks add up. ``conventional`` is full-image training; ``saving`` = conventional / peak.
    """

    image_size: list[int]
    tile: list[int]
    grid: list[int]
    tiles: int
    resident: Resident
    classes: list[ClassPlan]
    head_forward: GraphPlan
    head_backward: GraphPlan
    phases: dict[str, int]
    peak: int
    peak_phase: str
    session_arenas: int
    conventional: ConventionalPlan | None = None
    order: str = "worst"
    #: what the baked forward sessions (and the head's) hold at the end of the forward pass:
    #: weight copies and ORT's per-node state
    baked_sessions: int = 0

    @property
    def forward_peak(self) -> int:
        """The largest tile forward graph peak (bytes)."""
        return max((c.forward.peak for c in self.classes), default=0)

    @property
    def backward_peak(self) -> int:
        """The largest tile backward graph peak (bytes)."""
        return max((c.backward.peak for c in self.classes), default=0)

    @property
    def saving(self) -> float | None:
        if self.conventional is None or not self.peak:
            return None
        return self.conventional.total / self.peak

    @property
    def headline(self) -> str:
        """One line: the predicted peak and, when known, the conventional figure."""
        line = f"predicted peak {format_size(self.peak)} per training step"
        if self.conventional is not None:
            line += (f"; conventional training {format_size(self.conventional.total)} "
                     f"({self.saving:.1f}x the tiled peak)")
        return line

    def to_dict(self) -> dict[str, Any]:
        return {
            "headline": self.headline,
            "image_size": self.image_size,
            "tile": self.tile,
            "grid": self.grid,
            "tiles": self.tiles,
            "peak": self.peak,
            "peak_phase": self.peak_phase,
            "session_arenas": self.session_arenas,
            "forward_peak": self.forward_peak,
            "backward_peak": self.backward_peak,
            "resident": self.resident.to_dict(),
            "phases": dict(self.phases),
            "classes": [c.to_dict() for c in self.classes],
            "head_forward": self.head_forward.to_dict(),
            "head_backward": self.head_backward.to_dict(),
            "conventional": self.conventional.to_dict() if self.conventional else None,
            "saving": round(self.saving, 3) if self.saving is not None else None,
            "order": self.order,
            "baked_sessions": self.baked_sessions,
        }

    def summary(self) -> list[str]:
        """Human-readable lines for the CLI."""
        r = self.resident
        lines = [
            f"tile {'x'.join(map(str, self.tile))}: {self.tiles} tiles "
            f"({'x'.join(map(str, self.grid))}), {len(self.classes)} shape classes",
            f"predicted peak  {format_size(self.peak)}  (at {self.peak_phase}; the process "
            f"peak with StreamingModel(allocator='system'); ORT's default CPU arena keeps more, "
            f"measured 1.3-2.4x: docs/memory.md)",
            f"  resident      {format_size(r.total)}  (image {format_size(r.image)}, weights "
            f"{format_size(r.parameters)}, gradients {format_size(r.gradients)}, optimizer "
            f"{format_size(r.optimizer)}, cut tensors and gradients "
            f"{format_size(r.cut_tensors + r.cut_gradients)}, ORT's own state "
            f"{format_size(r.runtime)}, session constants {format_size(r.constants)})",
            f"  tile forward  {format_size(self.forward_peak)}",
            f"  tile backward {format_size(self.backward_peak)}",
            f"  baked forward sessions (weight copies) {format_size(self.baked_sessions)}",
            f"  with ORT's per-session CPU arenas: {format_size(self.session_arenas)}",
        ]
        if self.conventional is not None:
            lines.append(f"conventional    {format_size(self.conventional.total)}  "
                         f"(saving {self.saving:.1f}x)")
        return lines


def _param_sizes(meta: dict) -> dict[str, int]:
    """Bytes of each parameter of a program."""
    return {p["name"]: math.prod(p["shape"]) * _type_bytes(p.get("elem_type",
                                                                 onnx.TensorProto.FLOAT))
            for p in meta["parameters"]}


def plan_program(program, conventional: ConventionalPlan | None = None, order: str = "worst",
                 optimizer_copies: int = 2, exact: bool | str = False,
                 fold_constants: str = "forward", backward_optimization: str = "none",
                 weights: str = "auto") -> MemoryPlan:
    """The memory plan of one training step of ``program`` (see :class:`MemoryPlan`).

    ``conventional`` (from :func:`plan_conventional`) is attached as is; it needs the source
    model, which a program does not carry. ``optimizer_copies`` is the optimizer's state per
    trainable weight (Adam 2, SGD with momentum 1, plain SGD 0). ``order``: see
    :func:`plan_graph`. ``exact=True`` (or an ORT optimisation level, ``"basic"``, ``"extended"``,
    ``"all"``; True means ``"all"``, the executor's level) plans the graphs ONNX Runtime
    actually runs (:func:`ort_optimized`): one session build per optimised graph, a second or
    so each.
    ``fold_constants``: which sessions let ORT fold constants: ``"forward"`` (the runtime's
    default), ``"all"`` or ``"none"``; ``backward_optimization``: ORT's optimisation level for
    backward graphs, ``"none"`` (the runtime's default) or any other level. Both mirror
    :class:`streamc.runtime.sessions.RuntimeOptions`. An unoptimised backward graph runs as
    written, in ORT's default order, so it is planned in that order alone and without folding.
    ``weights`` (``"auto"``, ``"inputs"`` or ``"initializers"``, as ``RuntimeOptions.weights``)
    says which sessions are baked and so hold a copy of their weights; ``"auto"`` with
    optimised backward graphs is planned as if every backward session were baked (an upper
    bound: the runtime bakes only classes with enough tiles).
    """
    if weights not in ("auto", "inputs", "initializers"):
        raise ValueError(f"weights={weights!r}: use 'auto', 'inputs' or 'initializers'")
    with paused_gc():
        return _plan_program(program, conventional, order, optimizer_copies, exact,
                             fold_constants, backward_optimization, weights)


def _plan_program(program, conventional: ConventionalPlan | None, order: str,
                  optimizer_copies: int, exact: bool | str, fold_constants: str,
                  backward_optimization: str, weights: str) -> MemoryPlan:
    level = "all" if exact is True else exact or None
    if fold_constants not in ("all", "forward", "none"):
        raise ValueError(f"fold_constants={fold_constants!r}: use 'all', 'forward' or 'none'")
    if backward_optimization not in ("all", "extended", "basic", "none"):
        raise ValueError(f"backward_optimization={backward_optimization!r}: use 'all', "
                         "'extended', 'basic' or 'none'")

    def plan(relative: str, resident: set[str]) -> GraphPlan:
        model = program.graph(relative)
        backward = "backward" in relative
        if backward and backward_optimization == "none":
            return plan_graph(model, resident, relative, "ort", fold=False)
        if level:
            graph_level = backward_optimization if backward else level
            return plan_graph(ort_optimized(model, graph_level), resident, relative, "graph")
        fold = fold_constants == "all" or (fold_constants == "forward" and not backward)
        return plan_graph(model, resident, relative, order, fold=fold)

    meta = program.meta
    param_size = _param_sizes(meta)
    params = sum(param_size.values())
    trainable = sum(param_size[p["name"]] for p in meta["parameters"] if p.get("trainable"))
    input_meta = meta["input"]
    image = math.prod(input_meta["shape"]) * _type_bytes(input_meta.get("elem_type", 1))
    cuts = sum(math.prod(c["shape"]) * 4 for c in meta["cut_tensors"])
    counts: dict[int, int] = {}
    for t in meta["tiles"]:
        counts[t["class"]] = counts.get(t["class"], 0) + 1
    param_names = {p["name"] for p in meta["parameters"]}
    classes = []
    for cls in meta["classes"]:
        resident = set(cls["parameters"])
        fwd = plan(cls["forward"], resident)
        bwd = plan(cls["backward"], resident)
        classes.append(ClassPlan(cls["id"], counts.get(cls["id"], 0), list(cls["input_size"]),
                                 fwd, bwd))
    head = meta["head"]
    head_resident = param_names | set(head["inputs"])
    head_fwd = plan(head["forward"], head_resident)
    head_bwd = plan(head["backward"], head_resident)
    resident = Resident(
        image=image,
        parameters=params,
        gradients=trainable,
        optimizer=optimizer_copies * trainable,
        cut_tensors=cuts,
        cut_gradients=cuts,
        outputs=head_fwd.outputs,
        constants=sum(c.forward.constants + c.backward.constants for c in classes)
        + head_fwd.constants + head_bwd.constants,
        runtime=0,  # below, once it is known which sessions stay
    )
    # Baked sessions hold a copy of their graph's weights (see the RuntimeOptions.weights
    # contract) besides ORT's per-node state: every forward session from its class's first
    # tile until the backward pass starts, the head's forward session for the whole step, a
    # baked backward session until its class's last tile. Fed sessions are built once and kept
    # from step to step: resident.
    by_id = {c["id"]: c for c in meta["classes"]}
    bake_forward = weights in ("auto", "initializers")
    bake_backward = weights == "initializers" or (weights == "auto"
                                                  and backward_optimization != "none")

    def copies(cls: dict) -> int:
        return sum(param_size.get(n, 0) for n in cls["parameters"])

    head_copy = sum(param_size.get(i.name, 0)
                    for i in program.graph(head["forward"]).graph.input) if bake_forward else 0
    fed_nodes = head_fwd.nodes + head_bwd.nodes
    fed_nodes += 0 if bake_forward else sum(c.forward.nodes for c in classes)
    fed_nodes += 0 if bake_backward else sum(c.backward.nodes for c in classes)
    resident.runtime = RUNTIME_ONCE + RUNTIME_PER_NODE * fed_nodes
    base = resident.total
    phases: dict[str, int] = {}
    held = 0
    plans = {c.id: c for c in classes}
    for k in program.class_order:
        # Forward runs before the cut gradients exist.
        if bake_forward:
            held += copies(by_id[k]) + RUNTIME_PER_NODE * plans[k].forward.nodes
        phases[f"tile class {k} forward"] = base - cuts + plans[k].forward.peak + held
    baked_sessions = held + head_copy
    phases["head forward"] = base - cuts + head_fwd.peak + baked_sessions
    phases["head backward"] = base - cuts + head_bwd.peak + baked_sessions
    for k in program.class_order:
        own = (copies(by_id[k]) + RUNTIME_PER_NODE * plans[k].backward.nodes
               if bake_backward else 0)
        phases[f"tile class {k} backward"] = base + plans[k].backward.peak + head_copy + own
    peak_phase = max(phases, key=lambda k: phases[k])
    arenas = base + sum(c.forward.peak + c.backward.peak for c in classes) \
        + head_fwd.peak + head_bwd.peak
    return MemoryPlan(
        image_size=list(meta["image_size"]),
        tile=list(meta["tile"]),
        grid=list(meta["grid"]),
        tiles=len(meta["tiles"]),
        resident=resident,
        classes=classes,
        head_forward=head_fwd,
        head_backward=head_bwd,
        phases=phases,
        peak=phases[peak_phase],
        peak_phase=peak_phase,
        session_arenas=arenas,
        conventional=conventional,
        order=f"exact ({level})" if level else order,
        baked_sessions=baked_sessions,
    )


def plan_conventional(model, image: Sequence[int] | None = None, input: str | None = None,
                      optimizer_copies: int = 2) -> ConventionalPlan:
    """Memory of conventional full-image training of ``model`` (a path, a ModelProto or an
    :class:`~streamc.analysis.Analysis`); see :class:`ConventionalPlan`."""
    from streamc.analysis import Analysis, analyze
    from streamc.passes.extract import model_parameters

    analysis = model if isinstance(model, Analysis) else analyze(model, image, input)
    proto = analysis.model
    params = model_parameters(proto)
    inits = {t.name: t for t in proto.graph.initializer}
    param_bytes = sum(_initializer_bytes(inits[n]) for n in params.names if n in inits)
    trainable = sum(_initializer_bytes(inits[n]) for n in params.trainable if n in inits)
    image_vi = next(v for v in proto.graph.input if v.name == analysis.input_name)
    image_bytes = _value_bytes(image_vi) or 0
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


def _autograd_memory(model: onnx.ModelProto, image: str) -> tuple[int, int]:
    """(bytes kept for backward at the end of the forward pass, peak bytes of kept tensors plus
    live gradients during the backward pass), autograd style, in the graph's order.

    A kept tensor (:data:`SAVED`) is released once the backward of the earliest node keeping it
    has run; the gradient of a tensor lives from the backward of its last reader to the backward
    of its producer. Gradients of the image and of weights are not counted here.
    """
    g = model.graph
    nbytes = {vi.name: _value_bytes(vi) or 0
              for vi in list(g.input) + list(g.value_info) + list(g.output)}
    not_activations = {t.name for t in g.initializer} | {i.name for i in g.input} | {image}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    nodes = list(g.node)
    n = len(nodes)
    first_keeper: dict[str, int] = {}
    extras = 0
    alive = [0] * (n + 2)  # difference array over backward steps j = 0..n (n: before backward)
    producer: dict[str, int] = {}
    last_reader: dict[str, int] = {}
    for j, node in enumerate(nodes):
        rule = SAVED.get(node.op_type, opset, node.domain) or saves_inputs
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


# ------------------------------------------------------------------------------------------------
# Choosing the tile size


@dataclass
class TilePlan:
    """One candidate tile size of a model: its recompute overhead and predicted memory (bytes).

    ``overhead`` is tiled over untiled FLOPs of forward and backward together (1.0 = no
    recompute); ``peak`` is :attr:`MemoryPlan.peak`; ``conventional`` the full-image figure of
    the same model (the same in every TilePlan of one :func:`plan_model` call).
    """

    tile: int
    tile_size: list[int]
    grid: list[int]
    tiles: int
    classes: int
    forward_overhead: float
    backward_overhead: float
    overhead: float
    forward_peak: int
    backward_peak: int
    peak: int
    session_arenas: int
    conventional: int
    plan: MemoryPlan = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "plan"}
        d["memory_plan"] = self.plan.to_dict()
        return d


def _flops_overhead(program) -> tuple[float, float, float]:
    f = program.meta.get("flops") or {}
    untiled = f.get("untiled_forward", 0) + f.get("untiled_backward", 0)
    tiled = f.get("tiled_forward", 0) + f.get("tiled_backward", 0)
    total = round(tiled / untiled, 4) if untiled else float("nan")
    return (f.get("forward_overhead", float("nan")), f.get("backward_overhead", float("nan")),
            total)


def smallest_tile(analysis) -> int:
    """The smallest tile size (one number for every axis) the schedule accepts for this model:
    the crop that keeps one alignment step of the cut tensors (the receptive field's halo),
    rounded up to the alignment."""
    from streamc.passes.schedule import _axis_kept, _crop_along

    smallest = 1
    for axis, (size, align) in enumerate(zip(analysis.image_size, analysis.alignment)):
        if size > 2 * align:
            mid = (size // 2 // align) * align
            a, b = _crop_along(analysis, axis, _axis_kept(analysis, axis, mid, mid + align, size))
            need = b - a
        else:
            need = size
        smallest = max(smallest, -(-need // align) * align)
    return smallest


def candidate_tiles(analysis, factor: float = 2 ** 0.5) -> list[int]:
    """Tile sizes worth planning: from the smallest whose kept region is as wide as its halo
    (twice :func:`smallest_tile` less one alignment step: below it a tile recomputes more than
    it keeps, and a large image needs tens of thousands of tiles) up by ``factor`` each step
    (multiples of the alignment) to the first that holds the whole image in one tile."""
    align = max(analysis.alignment)
    largest = -(-max(analysis.image_size) // align) * align
    tiles = []
    smallest = smallest_tile(analysis)
    t = float(max(smallest, 2 * smallest - align))
    while True:
        snapped = min(largest, -(-int(t) // align) * align)
        if not tiles or snapped > tiles[-1]:
            tiles.append(snapped)
        if snapped >= largest:
            return tiles
        t *= factor


def plan_model(model, image: Sequence[int] | None, tiles: Sequence[int] | None = None,
               input: str | None = None, *, exact: bool | str = False,
               optimizer_copies: int = 2, first_fit: int | None = None) -> list[TilePlan]:
    """Compile ``model`` at each tile size in ``tiles`` (default :func:`candidate_tiles`) and
    plan it: recompute overhead, predicted peak memory, and the conventional figure. Plans come
    in increasing tile size. Tiles too small for the model are skipped.

    ``first_fit`` (bytes) plans from the largest tile down and stops at the first whose peak
    fits it: larger tiles recompute less, so that is the tile a budget picks (a smaller one
    that also fits recomputes more), and the small tiles, whose compilation is the slowest
    (many tiles and shape classes), are compiled only when nothing larger fits.

    Tiles below the candidates' floor are not planned unless asked for: they recompute more
    than they keep, and they do not need less memory in general, since every shape class adds
    a baked session holding a copy of the weights (ResNet-18 at 2048²: the smallest tile the
    schedule accepts, 448, has 196 classes and a 9.45 GiB plan; tile 864, the floor, 9 classes
    and 731 MiB).
    """
    from streamc.analysis import analyze
    from streamc.compiler import compile
    from streamc.graph import load_model

    proto = load_model(model)
    analysis = analyze(proto, image, input)
    if any(s is None for s in analysis.image_size):
        raise CompileError(
            "the model's spatial size is dynamic: pass the image size (--image HxW) to plan it."
        )
    conventional = plan_conventional(analysis, optimizer_copies=optimizer_copies)
    smallest = smallest_tile(analysis)
    sizes = sorted(set(int(t) for t in tiles)) if tiles else candidate_tiles(analysis)
    plans: list[TilePlan] = []
    for t in (sizes if first_fit is None else reversed(sizes)):
        if t < smallest:
            continue
        program = compile(proto, tile=t, image=analysis.image_size, input=input,
                          with_flops=True)
        plan = plan_program(program, conventional, optimizer_copies=optimizer_copies,
                            exact=exact)
        fwd, bwd, total = _flops_overhead(program)
        plans.append(TilePlan(
            tile=t,
            tile_size=list(program.meta["tile"]),
            grid=list(program.meta["grid"]),
            tiles=len(program.tiles),
            classes=len(program.classes),
            forward_overhead=fwd,
            backward_overhead=bwd,
            overhead=total,
            forward_peak=plan.forward_peak,
            backward_peak=plan.backward_peak,
            peak=plan.peak,
            session_arenas=plan.session_arenas,
            conventional=conventional.total,
            plan=plan,
        ))
        if first_fit is not None and plan.peak <= first_fit:
            break
    plans.sort(key=lambda p: p.tile)
    if not plans:
        raise CompileError(
            f"no tile size in {list(sizes)} is large enough for this model: the smallest that "
            f"works is {smallest}."
        )
    return plans


def select_tile(plans: Sequence[TilePlan], budget_bytes: int | str) -> TilePlan:
    """Among planned tile sizes, the one with the least recompute whose peak fits the budget
    (ties: the smaller peak). Raises :class:`CompileError`, naming the smallest budget that
    would work, when none fits."""
    budget = parse_size(budget_bytes)
    if not plans:
        raise CompileError("no tile sizes were planned.")
    fitting = [p for p in plans if p.peak <= budget]
    if not fitting:
        least = min(plans, key=lambda p: (p.peak, p.tile))
        raise CompileError(
            f"a memory budget of {format_size(budget)} ({budget} bytes) is too small for this "
            f"model at {'x'.join(map(str, least.plan.image_size))}: the least memory any "
            f"planned tile size ({', '.join(str(p.tile) for p in plans)}) needs is "
            f"{format_size(least.peak)} ({least.peak} bytes, tile {least.tile}). Use a budget "
            f"of at least {least.peak} bytes (--memory-budget {least.peak})."
        )
    return min(fitting, key=lambda p: (p.overhead, p.peak))


def choose_tile(model, image: Sequence[int] | None, budget_bytes: int | str,
                input: str | None = None, *, tiles: Sequence[int] | None = None,
                exact: bool | str = False, optimizer_copies: int = 2) -> tuple[int, TilePlan]:
    """The tile size with the least recompute whose predicted peak fits ``budget_bytes`` (an
    int or a size such as ``'4GiB'``), and its plan, among ``tiles`` (default
    :func:`candidate_tiles`). Raises :class:`CompileError`, naming the smallest budget that
    would work, when even the least demanding tile does not fit."""
    budget = parse_size(budget_bytes)
    plans = plan_model(model, image, tiles, input, exact=exact,
                       optimizer_copies=optimizer_copies, first_fit=budget)
    best = select_tile(plans, budget)
    return best.tile, best


def plans_table(plans: Sequence[TilePlan], chosen: TilePlan | None = None) -> list[str]:
    """Text lines for the CLI: one row per tile size, the chosen one marked."""
    lines = [f"{'tile':>6} {'tiles':>6} {'classes':>7} {'recompute':>9} {'forward':>11} "
             f"{'backward':>11} {'peak':>11}"]
    for p in plans:
        mark = " <" if chosen is not None and p.tile == chosen.tile else ""
        lines.append(f"{p.tile:>6} {p.tiles:>6} {p.classes:>7} {p.overhead:>8.2f}x "
                     f"{format_size(p.forward_peak):>11} {format_size(p.backward_peak):>11} "
                     f"{format_size(p.peak):>11}{mark}")
    if plans:
        lines.append(f"conventional (full image, all activations kept): "
                     f"{format_size(plans[0].conventional)}")
    return lines


# ------------------------------------------------------------------------------------------------
# Plot


def plot_plans(plans: Sequence[TilePlan], conventional: int | None, budget: int | str | None,
               path: str | Path) -> Path:
    """Predicted peak memory and recompute overhead against tile size, with the budget and the
    conventional (full-image) figure as horizontal lines; written to ``path`` (PNG, SVG, PDF).
    Needs matplotlib (``pip install 'streamc[plot]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise StreamcError(
            "plotting needs matplotlib, which is not installed: pip install 'streamc[plot]' "
            "(or pip install matplotlib)."
        ) from None
    if not plans:
        raise StreamcError("nothing to plot: no tile plans were given.")
    xs = [p.tile for p in plans]
    top = max([p.peak for p in plans] + [conventional or 0]
              + [parse_size(budget) if budget is not None else 0])
    unit, scale = ("GiB", 2**30) if top >= 2**30 else ("MiB", 2**20)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(xs, [p.peak / scale for p in plans], "o-", color="tab:blue", label="predicted peak")
    ax.plot(xs, [p.plan.resident.total / scale for p in plans], ":", color="tab:blue",
            label="resident (image, weights, optimizer, cut tensors, constants)")
    if conventional:
        ax.axhline(conventional / scale, color="tab:red", ls="--", label="conventional training")
    if budget is not None:
        ax.axhline(parse_size(budget) / scale, color="tab:green", ls="-.", label="budget")
    ax.set_xlabel("tile size (input pixels per axis)")
    ax.set_ylabel(f"memory ({unit})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    right = ax.twinx()
    right.plot(xs, [p.overhead for p in plans], "s-", color="tab:orange",
               label="recompute overhead (FLOPs)")
    right.set_ylabel("tiled / untiled FLOPs")
    right.set_ylim(bottom=min(1.0, *(p.overhead for p in plans)) * 0.95)
    handles = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="upper center")
    ax.set_title("memory and recompute against tile size")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
