"""The typed description of a compiled program: what ``program.json`` holds.

:class:`ProgramMeta` and the specs it is made of are written by the compiler and read by the
runtime, the memory planner and the CLI; :meth:`ProgramMeta.to_json` and
:meth:`ProgramMeta.from_json` are the only places that know the on-disk keys. A box is one
half-open ``(start, stop)`` interval per spatial axis, in full-image coordinates of its tensor.

A program runs in **stages** (docs/architecture.md): stage ``k`` runs one tile graph per tile
(the graph of the tile's shape class in that stage), reading crops of whole tensors (the image,
or *buffers* earlier stages wrote) and per-sample *global* buffers, and writing the kept regions
of its output buffers and its partials of whole-image reductions (one row per tile of a
*partials* buffer). Between stages a *global graph* combines the partials into global buffers;
after the last stage the *head* runs on whole buffers. A network without reductions inside has
one stage and no global graph.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from streamc.errors import ProgramError
from streamc.ops.memory import element_bytes

FORMAT = "streamc-program"
#: Version 6: the weight work hoisted out of the tile backward graphs (prepare and gradient
#: layout graphs); version 5: halo reuse (bands, strips handed on between tiles, the run order
#: they need);
#: version 4: a global graph may follow the last stage (the head's reductions, streamed);
#: version 3: stages, buffers and global graphs; version 2: typed metadata, run order, policy.
FORMAT_VERSION = 7

Box = tuple[tuple[int, int], ...]


def _box(value: Sequence[Sequence[int]]) -> Box:
    return tuple((int(a), int(b)) for a, b in value)


def _box_json(box: Box) -> list[list[int]]:
    return [[int(a), int(b)] for a, b in box]


def _fraction(value: int | str) -> Fraction:
    return Fraction(value) if isinstance(value, str) else Fraction(int(value))


def _fraction_json(value: Fraction) -> int | str:
    return value.numerator if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _boxes(value: Mapping[str, Any]) -> dict[str, Box]:
    return {str(k): _box(v) for k, v in value.items()}


def _boxes_json(value: Mapping[str, Box]) -> dict[str, list[list[int]]]:
    return {k: _box_json(v) for k, v in value.items()}


@dataclass(frozen=True)
class InputSpec:
    """The image input: its name, full shape (N, C, *size) and ONNX element type."""

    name: str
    shape: tuple[int, ...]
    elem_type: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_bytes(self.elem_type)


@dataclass(frozen=True)
class BufferSpec:
    """A whole tensor the runtime holds between graph runs (shapes are per compiled batch).

    ``kind``: ``"grid"`` (a grid tensor a stage writes whole: its ``stride``, ``receptive_field``
    and the positions of its spatial axes, ``layout``), ``"global"`` (a per-sample tensor) or
    ``"partials"`` (the partials of one reduction, one row per tile; a row no tile writes holds
    ``identity``) or ``"band"`` (halo reuse: the strips of a grid tensor that tiles at one index
    along one axis read, written by the tiles before them; its spatial axes start at
    ``origin`` in the tensor's full-image coordinates).
    """

    name: str
    shape: tuple[int, ...]
    elem_type: int = 1
    kind: str = "grid"
    stride: tuple[Fraction, ...] = ()
    receptive_field: tuple[int, ...] = ()
    layout: tuple[int, ...] = ()
    identity: float = 0.0
    origin: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_bytes(self.elem_type)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "elem_type": self.elem_type,
                "kind": self.kind, "stride": [_fraction_json(s) for s in self.stride],
                "receptive_field": list(self.receptive_field), "layout": list(self.layout),
                "identity": self.identity, "origin": list(self.origin)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> BufferSpec:
        return cls(str(d["name"]), tuple(map(int, d["shape"])), int(d["elem_type"]),
                   str(d["kind"]), tuple(_fraction(s) for s in d["stride"]),
                   tuple(map(int, d["receptive_field"])), tuple(map(int, d["layout"])),
                   float(d["identity"]), tuple(map(int, d.get("origin", ()))))


#: A tensor that leaves the grid for the head (kept for the name ``streamc inspect`` uses).
CutSpec = BufferSpec


@dataclass(frozen=True)
class ParameterSpec:
    """An initializer the runtime owns: trainable weights, or buffers (BatchNorm statistics)."""

    name: str
    shape: tuple[int, ...]
    elem_type: int
    trainable: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_bytes(self.elem_type)


@dataclass(frozen=True)
class TilePart:
    """What one tile does in one stage: its shape class, the region of each stage input it
    reads (``crops``), the region of each stage output and reduced tensor it keeps, and with
    halo reuse, for each strip its class's graph reads or hands on, the band buffer and the
    full-image box (``bands``: graph input or output -> (buffer, box))."""

    class_id: int
    crops: Mapping[str, Box]
    kept: Mapping[str, Box]
    bands: Mapping[str, tuple[str, Box]] = field(default_factory=dict)


@dataclass(frozen=True)
class TileSpec:
    """One tile: its grid index and its part in each stage (None: nothing to do there). Its
    row in every partials buffer is its index in the program's tile list."""

    index: tuple[int, ...]
    parts: tuple[TilePart | None, ...]

    @property
    def class_id(self) -> int:
        """The tile's shape class in the first stage."""
        return self.parts[0].class_id

    @property
    def crop(self) -> Box:
        """The image region the tile reads in the first stage."""
        return next(iter(self.parts[0].crops.values()))

    @property
    def kept(self) -> dict[str, Box]:
        """Every region the tile keeps, of every stage."""
        merged: dict[str, Box] = {}
        for part in self.parts:
            if part is not None:
                merged.update(part.kept)
        return merged


@dataclass(frozen=True)
class ClassSpec:
    """A tile shape class of one stage: one forward graph and its backward graph.

    ``inputs``: stage input buffer -> crop size; ``side_inputs``: global buffers read;
    ``outputs``: output buffer -> forward graph output holding its kept region; ``partials``:
    partials buffer -> forward graph output; ``cotangents``: output or partials buffer ->
    backward graph input of its gradient; ``gradients``: parameter, input buffer or global
    buffer -> backward graph output; ``parameters``: the runtime-owned inputs of the forward.
    With halo reuse, ``strips`` are the graph inputs holding strips from earlier tiles and
    ``emits`` the graph outputs handing strips on (each tile's part names the band buffer);
    their cotangents and gradients are keyed by these graph names. A class with a unit that
    keeps its activations (``ProgramMeta.kept``) has ``kept_forward`` (the forward graph also
    giving the ``residuals``) and ``kept_backward`` (the backward graph reading them instead of
    recomputing; ``passes/keep.py``).
    """

    id: int
    stage: int
    forward: str
    backward: str
    inputs: Mapping[str, tuple[int, ...]]
    side_inputs: tuple[str, ...]
    outputs: Mapping[str, str]
    partials: Mapping[str, str]
    cotangents: Mapping[str, str]
    gradients: Mapping[str, str]
    parameters: tuple[str, ...]
    strips: tuple[str, ...] = ()
    emits: tuple[str, ...] = ()
    kept_forward: str = ""
    kept_backward: str = ""
    residuals: tuple[str, ...] = ()

    @property
    def input_size(self) -> tuple[int, ...]:
        """The crop size of the first input (the image's, in the first stage)."""
        return next(iter(self.inputs.values()))


@dataclass(frozen=True)
class StageSpec:
    """One stage: the buffers its tiles read (``inputs``: crops; ``side_inputs``: whole global
    buffers) and write (``outputs``: kept regions; ``partials``: one row per tile), and the
    order its tiles run in (``run_order``, tile indices)."""

    index: int
    inputs: tuple[str, ...]
    side_inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    partials: tuple[str, ...]
    run_order: tuple[int, ...]


@dataclass(frozen=True)
class GraphSpec:
    """A graph run once per batch chunk on whole buffers (a global graph, or the head): its
    forward and backward graphs, the buffers it reads (``inputs``, graph inputs of the same
    names), ``outputs`` (buffer or model output -> graph output), ``cotangents`` (graph output
    -> backward input), ``gradients`` (input buffer or parameter -> backward output), and the
    first stage that may read its outputs (``ready``; the head, and a global graph after the
    last stage: the number of stages)."""

    name: str
    forward: str
    backward: str
    inputs: tuple[str, ...]
    outputs: Mapping[str, str]
    cotangents: Mapping[str, str]
    gradients: Mapping[str, str]
    ready: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "forward": self.forward, "backward": self.backward,
                "inputs": list(self.inputs), "outputs": dict(self.outputs),
                "cotangents": dict(self.cotangents), "gradients": dict(self.gradients),
                "ready": self.ready}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> GraphSpec:
        return cls(str(d["name"]), str(d["forward"]), str(d["backward"]), tuple(d["inputs"]),
                   dict(d["outputs"]), dict(d["cotangents"]), dict(d["gradients"]),
                   int(d["ready"]))


#: The head is a graph on whole buffers like the global graphs.
HeadSpec = GraphSpec


@dataclass(frozen=True)
class WeightWorkSpec:
    """The weight work hoisted out of the tile backward graphs (``passes/hoist.py``), each run
    once per backward pass.

    ``prepare``: a graph that reads parameters and gives ``prepared`` (tensors the tile backward
    graphs read as inputs of the same names); ``layout``: a graph that reads ``raw`` (parameter
    -> graph input: its gradient summed over tiles in the layout the tile backward graphs give
    it) and gives ``laid_out`` (parameter -> graph output: its gradient). Empty names: none.
    """

    prepare: str = ""
    prepared: tuple[str, ...] = ()
    layout: str = ""
    raw: Mapping[str, str] = field(default_factory=dict)
    laid_out: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"prepare": self.prepare, "prepared": list(self.prepared), "layout": self.layout,
                "raw": dict(self.raw), "laid_out": dict(self.laid_out)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> WeightWorkSpec:
        return cls(str(d["prepare"]), tuple(map(str, d["prepared"])), str(d["layout"]),
                   {str(k): str(v) for k, v in d["raw"].items()},
                   {str(k): str(v) for k, v in d["laid_out"].items()})


@dataclass(frozen=True)
class FlopCounts:
    """FLOPs of one training step, tiled and untiled (the same table counts both)."""

    untiled_forward: int
    untiled_backward: int
    tiled_forward: int
    tiled_backward: int

    @property
    def forward_overhead(self) -> float:
        return round(self.tiled_forward / max(self.untiled_forward, 1), 4)

    @property
    def backward_overhead(self) -> float:
        return round(self.tiled_backward / max(self.untiled_backward, 1), 4)

    @property
    def overhead(self) -> float:
        """Tiled over untiled FLOPs of forward and backward together (1.0: no recompute)."""
        untiled = self.untiled_forward + self.untiled_backward
        return round((self.tiled_forward + self.tiled_backward) / max(untiled, 1), 4)

    def to_json(self) -> dict[str, Any]:
        return {"untiled_forward": self.untiled_forward,
                "untiled_backward": self.untiled_backward,
                "tiled_forward": self.tiled_forward, "tiled_backward": self.tiled_backward,
                "forward_overhead": self.forward_overhead,
                "backward_overhead": self.backward_overhead}


@dataclass(frozen=True)
class SourceSpec:
    """Where the program was compiled from: the model file (None from memory) and its hash."""

    path: str | None
    sha256: str | None


@dataclass
class ProgramMeta:
    """Everything ``program.json`` describes (see the module docstring)."""

    source: SourceSpec
    input: InputSpec
    image_size: tuple[int, ...]
    requested_tile: tuple[int, ...]
    tile: tuple[int, ...]
    alignment: tuple[int, ...]
    boundaries: tuple[tuple[int, ...], ...]
    buffers: list[BufferSpec]
    parameters: list[ParameterSpec]
    stages: list[StageSpec]
    classes: list[ClassSpec]
    tiles: list[TileSpec]
    globals: list[GraphSpec]
    head: GraphSpec
    outputs: list[str]
    model: str
    notes: list[str] = field(default_factory=list)
    flops: FlopCounts | None = None
    #: the stored memory plan (``MemoryPlan.to_dict()``), for the policy it names
    memory_plan: dict[str, Any] | None = None
    compile_seconds: float | None = None
    #: the grid's share of the model's forward FLOPs and activation bytes
    #: (:class:`~streamc.analysis.analyze.StreamedShare`): ``{"flops": f, "activations": a}``
    streamed: dict[str, float] | None = None
    #: what the backward graphs differentiate: ``"train"`` (the weights), ``"saliency"`` (the
    #: image) or ``"inference"`` (no backward graphs; their file names are empty)
    mode: str = "train"
    #: ``"reuse"``: tiles hand strips on, run in grid order forward and in reverse backward;
    #: ``"recompute"``: every tile recomputes its halo
    halo: str = "recompute"
    #: the weight work done once per backward pass instead of once per tile
    weight_work: WeightWorkSpec = field(default_factory=WeightWorkSpec)
    #: (stage, tile) units that keep their activations from forward to backward (their class's
    #: ``kept_forward`` and ``kept_backward`` graphs) instead of recomputing them
    kept: tuple[tuple[int, int], ...] = ()
    #: the kept units other than those keeping everything keep only their activations at this
    #: cumulative stride or more (``compile(..., keep_stride=...)``); None: they keep everything
    keep_stride: int | None = None
    #: grid tensors after which the grid was ended early, the rest running whole in the head
    #: (``compile(..., grid_end=...)``); empty: where the network's local ops end
    grid_end: tuple[str, ...] = ()

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(len(b) - 1 for b in self.boundaries)

    @property
    def kept_tiles(self) -> int:
        """How many tiles keep their activations (in some stage)."""
        return len({tile for _, tile in self.kept})

    def buffer(self, name: str) -> BufferSpec:
        return self._buffers[name]

    @property
    def _buffers(self) -> dict[str, BufferSpec]:
        return {b.name: b for b in self.buffers}

    @property
    def cut_tensors(self) -> list[BufferSpec]:
        """The buffers the head reads (grid tensors and global tensors)."""
        buffers = self._buffers
        return [buffers[name] for name in self.head.inputs if name in buffers]

    @property
    def cut_names(self) -> list[str]:
        return list(self.head.inputs)

    @property
    def trainable(self) -> list[str]:
        return [p.name for p in self.parameters if p.trainable]

    @property
    def run_order(self) -> list[int]:
        """Tile indices in the order the first stage runs them."""
        return list(self.stages[0].run_order)

    def graph_files(self) -> list[str]:
        """Every graph file the description refers to."""
        files = [self.model, self.head.forward, self.head.backward]
        for g in self.globals:
            files += [g.forward, g.backward]
        for c in self.classes:
            files += [c.forward, c.backward, c.kept_forward, c.kept_backward]
        files += [self.weight_work.prepare, self.weight_work.layout]
        return [f for f in files if f]  # an inference program has no backward graphs

    def tiles_per_class(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for tile in self.tiles:
            for part in tile.parts:
                if part is not None:
                    counts[part.class_id] = counts.get(part.class_id, 0) + 1
        return counts

    # -- JSON ------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The ``program.json`` form (without ``files`` and ``checksum``, which saving adds)."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "source": {"path": self.source.path, "sha256": self.source.sha256},
            "input": {"name": self.input.name, "shape": list(self.input.shape),
                      "elem_type": self.input.elem_type},
            "image_size": list(self.image_size),
            "requested_tile": list(self.requested_tile),
            "tile": list(self.tile),
            "alignment": list(self.alignment),
            "grid": list(self.grid),
            "boundaries": [list(b) for b in self.boundaries],
            "notes": list(self.notes),
            "buffers": [b.to_json() for b in self.buffers],
            "parameters": [
                {"name": p.name, "shape": list(p.shape), "elem_type": p.elem_type,
                 "trainable": p.trainable} for p in self.parameters],
            "stages": [
                {"index": s.index, "inputs": list(s.inputs), "side_inputs": list(s.side_inputs),
                 "outputs": list(s.outputs), "partials": list(s.partials),
                 "run_order": list(s.run_order)} for s in self.stages],
            "classes": [
                {"id": c.id, "stage": c.stage, "forward": c.forward, "backward": c.backward,
                 "inputs": {k: list(v) for k, v in c.inputs.items()},
                 "side_inputs": list(c.side_inputs), "outputs": dict(c.outputs),
                 "partials": dict(c.partials), "cotangents": dict(c.cotangents),
                 "gradients": dict(c.gradients), "parameters": list(c.parameters),
                 "strips": list(c.strips), "emits": list(c.emits),
                 "kept_forward": c.kept_forward, "kept_backward": c.kept_backward,
                 "residuals": list(c.residuals)}
                for c in self.classes],
            "tiles": [
                {"index": list(t.index),
                 "parts": [None if p is None else
                           {"class": p.class_id, "crops": _boxes_json(p.crops),
                            "kept": _boxes_json(p.kept),
                            "bands": {k: [b, _box_json(box)] for k, (b, box) in p.bands.items()}}
                           for p in t.parts]}
                for t in self.tiles],
            "globals": [g.to_json() for g in self.globals],
            "head": self.head.to_json(),
            "outputs": list(self.outputs),
            "model": self.model,
            "flops": self.flops.to_json() if self.flops is not None else None,
            "memory_plan": self.memory_plan,
            "compile_seconds": self.compile_seconds,
            "streamed": self.streamed,
            "mode": self.mode,
            "halo": self.halo,
            "weight_work": self.weight_work.to_json(),
            "kept": [list(unit) for unit in self.kept],
            "keep_stride": self.keep_stride,
            "grid_end": list(self.grid_end),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "program.json") -> ProgramMeta:
        """Read the ``program.json`` form; a missing or malformed entry is a
        :class:`~streamc.errors.ProgramError` naming it."""
        try:
            return cls._from_json(data)
        except (KeyError, TypeError, ValueError, AttributeError, StopIteration) as exc:
            what = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise ProgramError(
                f"{where} is malformed ({type(exc).__name__}: {what}); recompile the program."
            ) from None

    @classmethod
    def _from_json(cls, d: Mapping[str, Any]) -> ProgramMeta:
        flops = d.get("flops")
        return cls(
            source=SourceSpec(d["source"]["path"], d["source"]["sha256"]),
            input=InputSpec(str(d["input"]["name"]), tuple(map(int, d["input"]["shape"])),
                            int(d["input"]["elem_type"])),
            image_size=tuple(map(int, d["image_size"])),
            requested_tile=tuple(map(int, d["requested_tile"])),
            tile=tuple(map(int, d["tile"])),
            alignment=tuple(map(int, d["alignment"])),
            boundaries=tuple(tuple(map(int, b)) for b in d["boundaries"]),
            notes=[str(n) for n in d.get("notes", [])],
            buffers=[BufferSpec.from_json(b) for b in d["buffers"]],
            parameters=[ParameterSpec(str(p["name"]), tuple(map(int, p["shape"])),
                                      int(p["elem_type"]), bool(p["trainable"]))
                        for p in d["parameters"]],
            stages=[StageSpec(int(s["index"]), tuple(s["inputs"]), tuple(s["side_inputs"]),
                              tuple(s["outputs"]), tuple(s["partials"]),
                              tuple(map(int, s["run_order"]))) for s in d["stages"]],
            classes=[ClassSpec(int(c["id"]), int(c["stage"]), str(c["forward"]),
                               str(c["backward"]),
                               {str(k): tuple(map(int, v)) for k, v in c["inputs"].items()},
                               tuple(c["side_inputs"]), dict(c["outputs"]),
                               dict(c["partials"]), dict(c["cotangents"]),
                               dict(c["gradients"]), tuple(c["parameters"]),
                               tuple(c.get("strips", ())), tuple(c.get("emits", ())),
                               str(c.get("kept_forward", "")), str(c.get("kept_backward", "")),
                               tuple(c.get("residuals", ())))
                     for c in d["classes"]],
            tiles=[TileSpec(tuple(map(int, t["index"])),
                            tuple(None if p is None else
                                  TilePart(int(p["class"]), _boxes(p["crops"]),
                                           _boxes(p["kept"]),
                                           {str(k): (str(b), _box(box)) for k, (b, box)
                                            in p.get("bands", {}).items()})
                                  for p in t["parts"]))
                   for t in d["tiles"]],
            globals=[GraphSpec.from_json(g) for g in d["globals"]],
            head=GraphSpec.from_json(d["head"]),
            outputs=[str(o) for o in d["outputs"]],
            model=str(d["model"]),
            flops=None if not flops else FlopCounts(
                int(flops["untiled_forward"]), int(flops["untiled_backward"]),
                int(flops["tiled_forward"]), int(flops["tiled_backward"])),
            memory_plan=d.get("memory_plan"),
            compile_seconds=d.get("compile_seconds"),
            streamed=None if d.get("streamed") is None else {
                "flops": float(d["streamed"]["flops"]),
                "activations": float(d["streamed"]["activations"])},
            mode=str(d.get("mode", "train")),
            halo=str(d.get("halo", "recompute")),
            weight_work=WeightWorkSpec.from_json(d["weight_work"]),
            kept=tuple((int(k), int(t)) for k, t in d.get("kept", ())),
            keep_stride=d.get("keep_stride"),
            grid_end=tuple(d.get("grid_end", ())),
        )


def class_run_order(tiles: Sequence[TileSpec], stage: int = 0) -> list[int]:
    """Tile classes of ``stage`` in the order the runtime runs them: the largest crop first.

    The order of tiles does not change the result (up to float summation order), but it
    decides how well ONNX Runtime's CPU arena, which never gives memory back, reuses its
    chunks: a class whose tensors are larger than every earlier one's cannot use the freed
    chunks and extends the arena by its whole working set. Largest first, the later classes'
    smaller tensors fit into the chunks it leaves.
    """
    largest: dict[int, int] = {}
    for tile in tiles:
        part = tile.parts[stage] if stage < len(tile.parts) else None
        if part is None:
            continue
        crop = max((math.prod(b - a for a, b in box) for box in part.crops.values()), default=0)
        largest[part.class_id] = max(largest.get(part.class_id, 0), crop)
    return sorted(largest, key=lambda k: (-largest[k], k))


def tile_run_order(tiles: Sequence[TileSpec], stage: int = 0) -> list[int]:
    """Indices of the tiles with a part in ``stage``, grouped by class, classes in
    :func:`class_run_order`, tiles in grid order within a class."""
    rank = {k: i for i, k in enumerate(class_run_order(tiles, stage))}
    chosen = [i for i, t in enumerate(tiles) if stage < len(t.parts) and t.parts[stage]]
    return sorted(chosen, key=lambda i: rank[tiles[i].parts[stage].class_id])
