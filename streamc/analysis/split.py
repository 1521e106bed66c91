"""Locality split: the spatially local part of the network in stages, the whole-image
reductions between them, the per-sample computations they feed, and the head.

Every image-dependent tensor is one of:

- a **grid** tensor: indexed by image position (the image, and every output of a local op);
  its *phase* is the stage that computes it;
- a **global** tensor: a per-sample value without spatial extent, computed from whole-image
  reductions of grid tensors (:mod:`streamc.ops.reduction`) by *global* nodes (the MLP of a
  squeeze-and-excitation block, the statistics of a normalisation). Local ops read global
  tensors like per-channel constants, so a grid node that reads one belongs to a later stage
  than the reduction it comes from;
- a **head** tensor: everything after the grid that does not come back to it.

Stage ``k`` computes the grid nodes of phase ``k``; it reads grid tensors of earlier stages
(kept whole between stages), global tensors, and writes the grid tensors later stages or the
head read, and the partial results of the reductions of its tensors. A network without
reductions inside has one stage: the prefix of earlier versions.

The grid may end early (``grid_end``): the nodes reading the named grid tensors, and everything
after them, go to the head, which runs them on whole tensors.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from onnx import helper

from streamc.errors import UnsupportedModelError
from streamc.graph import Graph
from streamc.ops.locality import (
    LOCALITY,
    LocalityContext,
    LocalOp,
    NotLocal,
    Refuse,
    nonlocal_reason,
)
from streamc.ops.reduction import REDUCTIONS, ReductionRule


@dataclass
class Stop:
    """A node that consumes a grid tensor but is not local, so the grid ends before it."""

    node: str
    op: str
    tensor: str
    reason: str

    def sentence(self) -> str:
        return f"node {self.node!r} ({self.op}) reading {self.tensor!r}: {self.reason}"


@dataclass(frozen=True)
class Reduction:
    """A whole-image reduction inside the network: node ``node`` reduces grid tensor
    ``tensor`` (computed by stage ``stage``) into global tensor ``output``."""

    node: str
    tensor: str
    output: str
    rule: ReductionRule
    stage: int


@dataclass
class StageIO:
    """What one stage computes and reads: its grid nodes; the grid tensors it reads from
    earlier stages (the image for stage 0, or kept whole tensors: its tile *inputs*); the global
    tensors it reads (*side inputs*); the grid tensors it writes whole for later stages or the
    head (*outputs*); and the reductions of its tensors, computed as per-tile partials."""

    nodes: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    side_inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    reductions: list[Reduction] = field(default_factory=list)

    @property
    def targets(self) -> list[str]:
        """The grid tensors of which each tile keeps (or owns, for reductions) a region."""
        return self.outputs + [r.tensor for r in self.reductions if r.tensor not in self.outputs]


@dataclass
class Split:
    """Result of the locality split (see the module docstring).

    ``prefix``: every grid (local) node, in topological order; ``local_ops``: how each acts on
    the grid; ``phase``: the stage of each grid tensor; ``layouts``: where the spatial axes of
    each grid tensor are (absent: channels-first); ``reductions``: reductions computed tile by
    tile; ``global_nodes``: nodes computing global tensors, with ``ready`` the first stage that
    can read each global tensor; ``cut_tensors``: grid tensors the head reads or the model
    returns; ``head``: the image-dependent nodes after the grid; ``constant_nodes``: nodes that
    do not depend on the image; ``stops``: non-local nodes reading grid tensors.
    """

    input_name: str
    n_spatial: int
    prefix: list[str] = field(default_factory=list)
    local_ops: dict[str, LocalOp] = field(default_factory=dict)
    phase: dict[str, int] = field(default_factory=dict)
    layouts: dict[str, tuple[int, ...]] = field(default_factory=dict)
    reductions: list[Reduction] = field(default_factory=list)
    global_nodes: list[str] = field(default_factory=list)
    ready: dict[str, int] = field(default_factory=dict)
    cut_tensors: list[str] = field(default_factory=list)
    head: list[str] = field(default_factory=list)
    constant_nodes: list[str] = field(default_factory=list)
    stops: list[Stop] = field(default_factory=list)
    prefix_tensors: list[str] = field(default_factory=list)
    stage_io: list[StageIO] = field(default_factory=list)

    @property
    def stages(self) -> int:
        """How many stages the grid part runs in."""
        return len(self.stage_io) or 1 + max(self.phase.values(), default=0)

    @property
    def final_reductions(self) -> list[Reduction]:
        """Reductions whose results only the head reads: it combines their partials."""
        last = self.stages
        return [r for r in self.reductions if self.ready.get(r.output) == last]

    def layout(self, tensor: str) -> tuple[int, ...]:
        return self.layouts.get(tensor, tuple(range(2, 2 + self.n_spatial)))


def image_dependent_tensors(graph: Graph, input_name: str) -> set[str]:
    """Every tensor whose value depends on the image input."""
    dependent = {input_name}
    for name in graph.order:
        node = graph.nodes[name]
        if any(i in dependent for i in node.input if i):
            dependent.update(o for o in node.output if o)
    return dependent


class _Walk:
    """One pass over the nodes in order, classifying each (see :func:`split_graph`)."""

    def __init__(self, graph: Graph, input_name: str, n_spatial: int,
                 reductions_allowed: bool, grid_end: frozenset[str] = frozenset()) -> None:
        self.graph = graph
        self.grid_end = grid_end
        self.dependent = image_dependent_tensors(graph, input_name)
        self.split = Split(input_name=input_name, n_spatial=n_spatial)
        self.ctx = LocalityContext(graph, self.dependent, n_spatial, self.split.layouts, set())
        self.reductions_allowed = reductions_allowed
        self.split.phase[input_name] = 0
        self.split.prefix_tensors.append(input_name)
        self.kind: dict[str, str] = {input_name: "grid"}

    def run(self) -> Split:
        for name in self.graph.order:
            node = self.graph.nodes[name]
            inputs = [i for i in node.input if i and i in self.dependent]
            if not inputs:
                self.split.constant_nodes.append(name)
                continue
            kinds = {self.kind.get(i, "head") for i in inputs}
            if "head" in kinds or not self.grid_end.isdisjoint(inputs):
                self._to_head(name)
            elif "grid" in kinds:
                self._grid_reader(name, node, inputs)
            else:
                self._global(name, node, inputs)
        return self.split

    def _to_head(self, name: str) -> None:
        self.split.head.append(name)
        for out in self.graph.nodes[name].output:
            if out:
                self.kind[out] = "head"

    def _grid_reader(self, name: str, node, inputs: list[str]) -> None:
        rule = LOCALITY.get(node.op_type, self.graph.opset, node.domain)
        reason = None
        if rule is None:
            reason = nonlocal_reason(node)
        else:
            try:
                op = rule(node, self.ctx)
            except Refuse as exc:
                raise UnsupportedModelError(
                    f"node {name!r} ({node.op_type}) cannot be streamed: {exc}.") from None
            except NotLocal as exc:
                reason = str(exc)
        if reason is None:
            self._local(name, node, op)
            return
        reduction = self._reduction(name, node) if self.reductions_allowed else None
        if reduction is not None:
            return
        grid = next(i for i in inputs if self.kind.get(i) == "grid")
        self.split.stops.append(Stop(name, node.op_type, grid, reason))
        self._to_head(name)

    def _local(self, name: str, node, op: LocalOp) -> None:
        split = self.split
        grid = [node.input[s] for s in op.grid_inputs]
        phase = max([split.phase[t] for t in grid]
                    + [split.ready[t] for t in node.input if t in self.ctx.globals])
        layout = op.layout if op.layout is not None else split.layout(grid[0])
        split.prefix.append(name)
        split.local_ops[name] = op
        for out in node.output:
            if out:
                self.kind[out] = "grid"
                split.phase[out] = phase
                if layout != tuple(range(2, 2 + split.n_spatial)):
                    split.layouts[out] = layout
                split.prefix_tensors.append(out)

    def _reduction(self, name: str, node) -> Reduction | None:
        rule = REDUCTIONS.get(node.op_type, self.graph.opset, node.domain)
        if rule is None or len(node.output) != 1 or not self.ctx.is_grid(node.input[0]):
            return None
        if any(i and i in self.dependent for i in node.input[1:]):
            return None
        try:
            spec = rule(node, self.ctx)
        except NotLocal:
            return None
        tensor = node.input[0]
        reduction = Reduction(name, tensor, node.output[0], spec, self.split.phase[tensor])
        self.split.reductions.append(reduction)
        self._mark_global(name, node.output[0], reduction.stage + 1)
        return reduction

    def _mark_global(self, name: str, tensor: str, ready: int) -> None:
        self.kind[tensor] = "global"
        self.ctx.globals.add(tensor)
        self.split.ready[tensor] = ready

    def _global(self, name: str, node, inputs: list[str]) -> None:
        ready = max(self.split.ready[i] for i in inputs)
        self.split.global_nodes.append(name)
        for out in node.output:
            if out:
                self._mark_global(name, out, ready)


def split_graph(graph: Graph, input_name: str, reduce_final: bool = True,
                grid_end: Collection[str] = ()) -> Split:
    """Split ``graph`` into stages of local ops (see the module docstring).

    ``reduce_final``: stream the head's whole-image reductions of grid tensors that the head
    reads only through them (a classifier's global pool) as per-tile partials, so that the
    reduced tensor is never whole; without it they start the head, which reads the whole
    tensor (the *feature map*). ``grid_end``: grid tensors after which the grid ends (their
    readers start the head); only for networks without whole-image statistics inside."""
    shape = graph.shape(input_name)
    if shape is None or len(shape) < 4:
        raise UnsupportedModelError(
            f"input {input_name!r} has shape {shape}; an image input needs N x C and at least "
            "two spatial axes."
        )
    n_spatial = len(shape) - 2
    ends = frozenset(grid_end)
    split = _Walk(graph, input_name, n_spatial, reductions_allowed=True, grid_end=ends).run()
    _demote_dead_ends(graph, split, reduce_final)
    if not split.reductions:
        # No reduction is streamed: the classic split, reductions start the head.
        split = _Walk(graph, input_name, n_spatial, reductions_allowed=False,
                      grid_end=ends).run()
    else:
        _defer_widening_casts(graph, split)
    if not split.prefix:
        stop = split.stops[0] if split.stops else None
        detail = f": {stop.sentence()}" if stop else ""
        raise UnsupportedModelError(
            "the model has no spatially local prefix to stream: the first op reading the image "
            f"is not local{detail}. streamc needs convolutions, pooling or pointwise ops first."
        )
    head_inputs = {i for n in split.head for i in graph.nodes[n].input if i}
    outputs = set(graph.outputs)
    split.cut_tensors = [t for t in split.prefix_tensors if t in head_inputs or t in outputs]
    split.stage_io = _stage_io(graph, split)
    if ends:
        _check_grid_end(split, ends)
    return split


def _check_grid_end(split: Split, ends: frozenset[str]) -> None:
    outside = sorted(ends - set(split.prefix_tensors))
    if outside:
        raise UnsupportedModelError(
            f"grid_end names {outside[0]!r}, which is not a tensor of the streamed prefix: give "
            "the output of a local op (`streamc inspect MODEL` lists them).")
    if split.stages > 1:
        raise UnsupportedModelError(
            "grid_end: the network has whole-image statistics inside (normalisation or "
            "squeeze-and-excitation reductions between stages); ending the grid early is "
            "supported only for networks whose grid is one stage.")


def _stage_io(graph: Graph, split: Split) -> list[StageIO]:
    stages = [StageIO() for _ in range(1 + max(split.phase.values(), default=0))]
    stages[0].inputs.append(split.input_name)
    for name in split.prefix:
        node = graph.nodes[name]
        out = next(o for o in node.output if o)
        k = split.phase[out]
        stage = stages[k]
        stage.nodes.append(name)
        for tensor in node.input:
            if not tensor:
                continue
            if tensor in split.phase and split.phase[tensor] < k and tensor not in stage.inputs:
                stage.inputs.append(tensor)
            if tensor in split.ready and tensor not in stage.side_inputs:
                stage.side_inputs.append(tensor)
    readers: dict[str, set[int]] = {}
    for name in split.prefix:
        node = graph.nodes[name]
        k = split.phase[next(o for o in node.output if o)]
        for tensor in node.input:
            readers.setdefault(tensor, set()).add(k)
    wanted = set(split.cut_tensors)
    for tensor in split.prefix_tensors:
        k = split.phase[tensor]
        if tensor in wanted or any(j > k for j in readers.get(tensor, ())):
            if tensor != split.input_name or k > 0:
                stages[k].outputs.append(tensor)
    for reduction in split.reductions:
        stages[reduction.stage].reductions.append(reduction)
    return stages


def _defer_widening_casts(graph: Graph, split: Split) -> None:
    """Run a Cast to a wider type in the first stage that reads its result, when every reader
    is in a later stage than its input: that input, not the wider copy, is then what is kept
    whole between the stages (a normalisation's float64 path reads a float32 activation;
    keeping the float64 copy would double that boundary and its gradient buffer)."""
    readers: dict[str, list[int]] = {}
    for name in split.prefix:
        node = graph.nodes[name]
        k = split.phase[next(o for o in node.output if o)]
        for tensor in node.input:
            readers.setdefault(tensor, []).append(k)
    reduced = {r.tensor for r in split.reductions}
    head_inputs = {i for n in split.head for i in graph.nodes[n].input if i}
    for name in reversed(split.prefix):
        node = graph.nodes[name]
        if node.op_type != "Cast" or len(node.input) != 1:
            continue
        source, out = node.input[0], node.output[0]
        later = readers.get(out, [])
        if (not later or out in reduced or out in head_inputs or out in graph.outputs
                or min(later) <= split.phase[out]
                or _itemsize(graph, out) <= _itemsize(graph, source)):
            continue
        readers[source].remove(split.phase[out])
        readers[source].append(min(later))
        split.phase[out] = min(later)


def _itemsize(graph: Graph, tensor: str) -> int:
    dtype = graph.dtypes.get(tensor)
    return helper.tensor_dtype_to_np_dtype(dtype).itemsize if dtype else 0


def _demote_dead_ends(graph: Graph, split: Split, reduce_final: bool) -> None:
    """Global nodes whose results never come back to the grid belong to the head, and so do
    the reductions they start, which then read the whole grid tensors they reduce (as when there
    are no stages); with ``reduce_final``, a reduction whose grid tensor nothing else in the
    head reads stays streamed (its result is a global tensor the head reads)."""
    needed: set[str] = {t for n in split.prefix for t in graph.nodes[n].input if t in split.ready}
    for name in reversed(split.global_nodes):
        node = graph.nodes[name]
        if any(o in needed for o in node.output):
            needed.update(i for i in node.input if i in split.ready)
    dead = {r.node for r in split.reductions if r.output not in needed}
    if reduce_final:
        others = {i for n in split.head for i in graph.nodes[n].input if i} | set(graph.outputs)
        final = {r.node for r in split.reductions if r.node in dead and r.tensor not in others}
        needed.update(r.output for r in split.reductions if r.node in final)
        dead -= final
    keep = []
    head = set(split.head)
    for name in split.global_nodes:
        if any(o in needed for o in graph.nodes[name].output):
            keep.append(name)
        else:
            head.add(name)
    split.global_nodes = keep
    split.reductions = [r for r in split.reductions if r.node not in dead]
    head.update(dead)
    for tensor in [t for t in split.ready if t not in needed]:
        del split.ready[tensor]
    # Head nodes downstream of a demoted node stay in the head; keep the graph's order.
    order = {name: k for k, name in enumerate(graph.order)}
    split.head = sorted(head, key=order.__getitem__)
