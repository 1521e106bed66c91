"""The memory plan of one training step: what stays resident, plus the largest phase.

Contract: :func:`plan_program` takes a compiled :class:`~streamc.program.Program` and a
:class:`~streamc.policy.RuntimePolicy` and returns a :class:`MemoryPlan` (bytes of tensors, the
same on CPU and CUDA; docs/memory.md says what ONNX Runtime and the allocator add on top, and
how well the plan matches a real process). It walks the program's steps
(:func:`~streamc.steps.program_steps`) in the order the runtime runs them: at each step, what
stays resident (image, weights and buffers, gradients, optimizer state, full cut tensors and
their gradients, the head's outputs, session constants, ORT's own state), the step's graph run
(:func:`~streamc.passes.memory.allocator.plan_graph`) and the baked sessions alive at that point.

With ``tiles`` (one worker of a tile-parallel run) it plans that worker's steps: its tiles,
the sessions of its shape classes, and the combine steps, each with the scratch memory of its
collective (:meth:`_StepPlanner.combine_bytes`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from streamc._gc import paused_gc
from streamc.passes.memory.allocator import (
    RUNTIME_ONCE,
    RUNTIME_PER_NODE,
    GraphPlan,
    ort_optimized,
    plan_graph,
    value_bytes,
)
from streamc.passes.memory.conventional import ConventionalPlan
from streamc.policy import DEFAULT_POLICY, RuntimePolicy
from streamc.steps import (
    COMBINE_KINDS,
    PHASES,
    Step,
    StepKind,
    TileSubset,
    buffer_access,
    last_uses,
    phase_label,
    program_steps,
)
from streamc.units import format_bytes


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
    outputs: int  # the model's outputs (from the head)
    constants: int  # constant initializers held by the sessions (folded ones included)
    runtime: int = 0  # ORT's start-up and its state in the sessions kept (RUNTIME_* allowance)

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

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
    #: the most bytes of whole buffers (cut tensors, stage outputs, partials, global tensors)
    #: and their gradients alive at once
    buffers: int
    peak: int
    peak_phase: str
    session_arenas: int
    conventional: ConventionalPlan | None = None
    order: str = "worst"
    #: what the baked forward sessions (and the head's) hold at the end of the forward pass:
    #: weight copies and ORT's per-node state
    baked_sessions: int = 0
    #: the runtime policy the plan assumes
    policy: RuntimePolicy = DEFAULT_POLICY
    #: phase -> the graphs whose baked sessions are alive at that phase's peak
    sessions: dict[str, list[str]] = field(default_factory=dict)
    #: (forward, backward) plans of the global graphs between stages
    globals: list[tuple[GraphPlan, GraphPlan]] = field(default_factory=list)

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
        line = f"predicted peak {format_bytes(self.peak)} per training step"
        if self.conventional is not None:
            line += (f"; conventional training {format_bytes(self.conventional.total)} "
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
            "buffers": self.buffers,
            "globals": [{"forward": f.to_dict(), "backward": b.to_dict()}
                        for f, b in self.globals],
            "phases": dict(self.phases),
            "classes": [c.to_dict() for c in self.classes],
            "head_forward": self.head_forward.to_dict(),
            "head_backward": self.head_backward.to_dict(),
            "conventional": self.conventional.to_dict() if self.conventional else None,
            "saving": round(self.saving, 3) if self.saving is not None else None,
            "order": self.order,
            "baked_sessions": self.baked_sessions,
            "policy": self.policy.to_json(),
            "sessions": {k: list(v) for k, v in self.sessions.items()},
        }

    def summary(self) -> list[str]:
        """Human-readable lines for the CLI."""
        r = self.resident
        lines = [
            f"tile {'x'.join(map(str, self.tile))}: {self.tiles} tiles "
            f"({'x'.join(map(str, self.grid))}), {len(self.classes)} shape classes",
            f"predicted peak  {format_bytes(self.peak)}  (at {self.peak_phase}; "
            f"{_allocator_note(self.policy)})",
            f"  resident      {format_bytes(r.total)}  (image {format_bytes(r.image)}, weights "
            f"{format_bytes(r.parameters)}, gradients {format_bytes(r.gradients)}, optimizer "
            f"{format_bytes(r.optimizer)}, ORT's own state {format_bytes(r.runtime)}, session "
            f"constants {format_bytes(r.constants)})",
            f"  whole tensors between graphs (cut tensors, stage outputs, their gradients) "
            f"up to {format_bytes(self.buffers)}",
            f"  tile forward  {format_bytes(self.forward_peak)}",
            f"  tile backward {format_bytes(self.backward_peak)}",
            f"  baked forward sessions (weight copies) {format_bytes(self.baked_sessions)}",
            f"  with ORT's per-session CPU arenas: {format_bytes(self.session_arenas)}",
        ]
        if self.conventional is not None:
            lines.append(f"conventional    {format_bytes(self.conventional.total)}  "
                         f"(saving {self.saving:.1f}x)")
        return lines


def _allocator_note(policy: RuntimePolicy) -> str:
    if policy.allocator == "system":
        return "the process peak with StreamingModel(allocator='system')"
    return ("the process peak with StreamingModel(allocator='system'); ORT's default CPU arena "
            "keeps more, measured 1.2-1.9x: docs/memory.md")


def plan_program(program, conventional: ConventionalPlan | None = None,
                 policy: RuntimePolicy = DEFAULT_POLICY, order: str = "worst",
                 optimizer_copies: int = 2, exact: bool = False,
                 tiles: TileSubset = None, graph_plans: dict[str, GraphPlan] | None = None
                 ) -> MemoryPlan:
    """The memory plan of one training step of ``program`` under ``policy``.

    ``conventional`` (from :func:`~streamc.passes.memory.conventional.plan_conventional`) is
    attached as is; it needs the source model, which a program does not carry.
    ``optimizer_copies`` is the optimizer's state per trainable weight (Adam 2, SGD with
    momentum 1, plain SGD 0). ``order``: see :func:`plan_graph`. ``exact=True`` plans the graphs
    ONNX Runtime actually runs after its optimisations at the policy's levels
    (:func:`ort_optimized`): one session build per optimised graph, a second or so each. A graph
    the policy leaves unoptimised runs as written, in ORT's default order: it is planned in that
    order alone, and folded only where the policy lets ORT fold constants.
    ``tiles``: per stage, the tiles of one worker of a tile-parallel run (its plan).
    ``graph_plans``: graph plans to reuse and fill, shared between calls with the same
    program, policy, order and ``exact`` (the plans of several workers).
    """
    with paused_gc():
        planner = _StepPlanner(program, policy, order, exact, tiles, graph_plans)
        return planner.plan(conventional, optimizer_copies)


class _StepPlanner:
    def __init__(self, program, policy: RuntimePolicy, order: str, exact: bool,
                 tiles: TileSubset = None, graph_plans: dict[str, GraphPlan] | None = None
                 ) -> None:
        self.program = program
        self.meta = program.meta
        self.policy = policy
        self.order = order
        self.exact = exact
        self.param_bytes = {p.name: p.nbytes for p in self.meta.parameters}
        prepare = self.meta.weight_work.prepare
        #: the prepared tensors (``passes/hoist.py``), held from their step to the end of the
        #: backward pass
        self.prepared_bytes = sum(value_bytes(o) or 0 for o in
                                  program.graph(prepare).graph.output) if prepare else 0
        self.steps = program_steps(self.meta, policy, tiles=tiles)
        self._graphs: dict[str, GraphPlan] = {} if graph_plans is None else graph_plans
        self.runs: dict[int, int] = {}  # tile runs per shape class (this worker's)
        for step in self.steps["prefix_forward"]:
            if step.kind is StepKind.TILE_FORWARD:
                class_id = self.meta.tiles[step.tile].parts[step.stage].class_id
                self.runs[class_id] = self.runs.get(class_id, 0) + 1

    def graph_plan(self, relative: str, role: str) -> GraphPlan:
        if relative not in self._graphs:
            model = self.program.graph(relative)
            resident = (set(self.param_bytes) | set(self.meta.head.inputs)
                        | set(self.meta.weight_work.prepared))
            level = self.policy.level(role)
            fold = self.policy.folds_constants(role)
            if level == "none":
                plan = plan_graph(model, resident, relative, "ort", fold=fold)
            elif self.exact:
                plan = plan_graph(ort_optimized(model, level), resident, relative, "graph")
            else:
                plan = plan_graph(model, resident, relative, self.order, fold=fold)
            self._graphs[relative] = plan
        return self._graphs[relative]

    def weight_copies(self, relative: str) -> int:
        """Bytes of the parameters a baked session of graph ``relative`` holds a copy of."""
        inputs = self.program.graph(relative).graph.input
        return sum(self.param_bytes.get(i.name, 0) for i in inputs)

    def plan(self, conventional: ConventionalPlan | None, optimizer_copies: int) -> MemoryPlan:
        meta = self.meta
        classes = [ClassPlan(c.id, self.runs[c.id], list(c.input_size),
                             self.graph_plan(c.forward, "forward"),
                             self.graph_plan(c.backward, "backward")) for c in meta.classes
                   if c.id in self.runs]
        head_fwd = self.graph_plan(meta.head.forward, "forward")
        head_bwd = self.graph_plan(meta.head.backward, "backward")
        globals_ = [(self.graph_plan(g.forward, "forward"), self.graph_plan(g.backward,
                                                                           "backward"))
                    for g in meta.globals]
        all_steps = [s for phase in PHASES for s in self.steps[phase]]
        kept = [self.graph_plan(g, role) for g, role in
                dict.fromkeys((s.graph, s.role) for s in all_steps if s.keeps)]
        graph_plans = [p for c in classes for p in (c.forward, c.backward)] + \
            [head_fwd, head_bwd] + [p for pair in globals_ for p in pair] + kept
        trainable = sum(p.nbytes for p in meta.parameters if p.trainable)
        resident = Resident(
            image=meta.input.nbytes,
            parameters=sum(self.param_bytes.values()),
            gradients=trainable,
            optimizer=optimizer_copies * trainable,
            outputs=head_fwd.outputs,
            constants=sum(p.constants for p in graph_plans),
            runtime=RUNTIME_ONCE + RUNTIME_PER_NODE * self._resident_nodes(all_steps),
        )
        live = _BufferLives(meta, all_steps)
        phases, sessions, baked_sessions = self._phases(resident.total, all_steps, live)
        peak_phase = max(phases, key=lambda k: phases[k])
        arenas = resident.total + live.peak + sum(p.peak for p in graph_plans)
        return MemoryPlan(
            image_size=list(meta.image_size), tile=list(meta.tile), grid=list(meta.grid),
            tiles=len(meta.tiles), resident=resident, classes=classes, head_forward=head_fwd,
            head_backward=head_bwd, phases=phases, buffers=live.peak, peak=phases[peak_phase],
            peak_phase=peak_phase, session_arenas=arenas, conventional=conventional,
            order="exact" if self.exact else self.order, baked_sessions=baked_sessions,
            policy=self.policy, sessions=sessions, globals=globals_,
        )

    def residual_bytes(self, step: Step) -> int:
        """Bytes of the residuals a keeping unit hands from its forward to its backward."""
        cls = self.meta.classes[self.meta.tiles[step.tile].parts[step.stage].class_id]
        outputs = {o.name: o for o in self.program.graph(cls.kept_forward).graph.output}
        return sum(value_bytes(outputs[r]) or 0 for r in cls.residuals)

    def combine_bytes(self, step: Step) -> int:
        """The scratch of a combine step: one copy of the buffer it reduces in place (the
        collective's), or two of the weight gradients (joined into one flat tensor, then
        reduced)."""
        if step.kind is StepKind.COMBINE_WEIGHT_GRADIENTS:
            return 2 * sum(p.nbytes for p in self.meta.parameters if p.trainable)
        return self.meta.buffer(step.name).nbytes

    def _released(self) -> set[str]:
        return {s.graph for phase in PHASES for s in self.steps[phase]
                if s.kind is StepKind.RELEASE}

    def _resident_nodes(self, steps: Iterable[Step]) -> int:
        """Nodes of the sessions that outlive the step: every fed session (built once), and
        baked sessions that are not released (the head's: rebuilt at the next step)."""
        released = self._released()
        meta = self.meta
        mine = [c for c in meta.classes if c.id in self.runs]
        graphs = {c.forward: Step(StepKind.TILE_FORWARD, c.forward) for c in mine}
        graphs.update({c.backward: Step(StepKind.TILE_BACKWARD, c.backward) for c in mine})
        for g in meta.globals:
            graphs[g.forward] = Step(StepKind.GLOBAL_FORWARD, g.forward)
            graphs[g.backward] = Step(StepKind.GLOBAL_BACKWARD, g.backward)
        graphs[meta.head.forward] = Step(StepKind.HEAD_FORWARD, meta.head.forward)
        graphs[meta.head.backward] = Step(StepKind.HEAD_BACKWARD, meta.head.backward)
        graphs.update({s.graph: s for s in steps
                       if s.kind is not StepKind.RELEASE and s.kind not in COMBINE_KINDS})
        return sum(self.graph_plan(g, s.role).nodes for g, s in graphs.items()
                   if not (s.baked and g in released))

    def _phases(self, base: int, steps: list[Step], live: _BufferLives
                ) -> tuple[dict[str, int], dict[str, list[str]], int]:
        """Memory at every step, the largest per phase label, and the baked sessions alive
        then; and what the baked sessions hold at the end of the forward pass."""
        released = self._released()
        held: dict[str, int] = {}  # graph -> bytes its live baked session holds
        phases: dict[str, int] = {}
        sessions: dict[str, list[str]] = {}
        baked_sessions = 0
        prepared = 0
        kept = 0  # residuals held from a keeping unit's forward to its backward
        for position, step in enumerate(steps):
            if step.kind is StepKind.HEAD_BACKWARD and not baked_sessions:
                baked_sessions = sum(held.values())
            if step.kind is StepKind.RELEASE:
                held.pop(step.graph, None)
                continue
            if step.keeps and step.kind is StepKind.TILE_BACKWARD:
                kept -= self.residual_bytes(step)  # inputs of its graph's plan from here
            base_here = base + prepared + kept
            if step.kind is StepKind.PREPARE_WEIGHTS:
                prepared = self.prepared_bytes  # the graph's plan counts them while it runs
            if step.kind in COMBINE_KINDS:
                value = (base_here + live.at(position) + self.combine_bytes(step)
                         + sum(held.values()))
                label = phase_label(self.meta, step)
                if value > phases.get(label, -1):
                    phases[label] = value
                    sessions[label] = sorted(held)
                continue
            plan = self.graph_plan(step.graph, step.role)
            if step.baked and step.graph not in held:
                own = RUNTIME_PER_NODE * plan.nodes if step.graph in released else 0
                held[step.graph] = self.weight_copies(step.graph) + own
            value = base_here + live.at(position) + plan.peak + sum(held.values())
            label = phase_label(self.meta, step)
            if value > phases.get(label, -1):
                phases[label] = value
                sessions[label] = sorted(held)
            if step.keeps and step.kind is StepKind.TILE_FORWARD:
                kept += self.residual_bytes(step)  # outputs of its graph's plan until here
        if not baked_sessions:
            baked_sessions = sum(held.values())
        return phases, sessions, baked_sessions


#: The steps of the backward pass over the stages (after the head's).
_PREFIX_BACKWARD = (StepKind.TILE_BACKWARD, StepKind.GLOBAL_BACKWARD, StepKind.COMBINE_GRADIENT)


class _BufferLives:
    """How many bytes of whole buffers and gradient buffers are alive at each step.

    A buffer (gradient buffers are named ``<buffer>:grad``) lives from the first step that
    writes it (the step after, when the whole buffer is a graph's output) to the last step
    that reads or writes it, as the interpreter frees it (``Interpreter.prefix_backward``):
    forward buffers no earlier than the start of the backward pass over the stages, since the
    forward state is kept whole until then. The image is resident, not a buffer.
    """

    def __init__(self, meta, steps: list[Step]) -> None:
        sizes = {b.name: b.nbytes for b in meta.buffers}
        births: dict[str, int] = {}
        for position, step in enumerate(steps):
            _reads, writes, whole = buffer_access(meta, step)
            for name in writes:
                if name.removesuffix(":grad") in sizes and name not in births:
                    births[name] = position + 1 if whole else position
        backward_start = next((p for p, s in enumerate(steps) if s.kind in _PREFIX_BACKWARD),
                              len(steps))
        last = last_uses(meta, steps)
        delta = [0] * (len(steps) + 2)
        for name, birth in births.items():
            size = sizes[name.removesuffix(":grad")]
            delta[birth] += size
            delta[max(last.get(name, birth), backward_start - 1, birth) + 1] -= size
        self.live, running = [], 0
        for position in range(len(steps) + 1):
            running += delta[position]
            self.live.append(running)
        self.peak = max(self.live, default=0)

    def at(self, position: int) -> int:
        return self.live[position]
