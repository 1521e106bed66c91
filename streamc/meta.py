"""The typed description of a compiled program: what ``program.json`` holds.

:class:`ProgramMeta` and the specs it is made of are written by the compiler and read by the
runtime, the memory planner and the CLI; :meth:`ProgramMeta.to_json` and
:meth:`ProgramMeta.from_json` are the only places that know the on-disk keys. A box is one
half-open ``(start, stop)`` interval per spatial axis, in full-image coordinates of its tensor.
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
#: Version 2: typed metadata, the run order and the runtime policy of the stored memory plan.
FORMAT_VERSION = 2

Box = tuple[tuple[int, int], ...]


def _box(value: Sequence[Sequence[int]]) -> Box:
    return tuple((int(a), int(b)) for a, b in value)


def _box_json(box: Box) -> list[list[int]]:
    return [[int(a), int(b)] for a, b in box]


def _fraction(value: int | str) -> Fraction:
    return Fraction(value) if isinstance(value, str) else Fraction(int(value))


def _fraction_json(value: Fraction) -> int | str:
    return value.numerator if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


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
class CutSpec:
    """A tensor that leaves the prefix: its full shape, cumulative stride and receptive field."""

    name: str
    shape: tuple[int, ...]
    stride: tuple[Fraction, ...]
    receptive_field: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * 4


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
class TileSpec:
    """One tile: grid index, shape class, the image crop it reads, and the region of each cut
    tensor it keeps (the kept regions of all tiles partition each cut tensor)."""

    index: tuple[int, ...]
    class_id: int
    crop: Box
    kept: Mapping[str, Box]


@dataclass(frozen=True)
class ClassSpec:
    """A tile shape class: one forward graph and its backward graph, shared by its tiles.

    ``outputs``: cut tensor -> forward graph output holding its kept region; ``cotangents``:
    cut tensor -> backward graph input of that region's gradient; ``gradients``: parameter ->
    backward graph output; ``parameters``: the runtime-owned inputs of the forward graph.
    """

    id: int
    forward: str
    backward: str
    input_size: tuple[int, ...]
    outputs: Mapping[str, str]
    cotangents: Mapping[str, str]
    gradients: Mapping[str, str]
    parameters: tuple[str, ...]


@dataclass(frozen=True)
class HeadSpec:
    """The head: its graphs, the cut tensors it reads (``inputs``), model output -> graph output
    (``outputs``), graph output -> cotangent input (``cotangents``), wrt -> gradient output."""

    forward: str
    backward: str
    inputs: tuple[str, ...]
    outputs: Mapping[str, str]
    cotangents: Mapping[str, str]
    gradients: Mapping[str, str]


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
    cut_tensors: list[CutSpec]
    parameters: list[ParameterSpec]
    classes: list[ClassSpec]
    tiles: list[TileSpec]
    head: HeadSpec
    outputs: list[str]
    model: str
    #: tile indices in the order the runtime runs them (and the memory plan follows)
    run_order: list[int]
    notes: list[str] = field(default_factory=list)
    flops: FlopCounts | None = None
    #: the stored memory plan (``MemoryPlan.to_dict()``), for the policy it names
    memory_plan: dict[str, Any] | None = None
    compile_seconds: float | None = None

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(len(b) - 1 for b in self.boundaries)

    @property
    def cut_names(self) -> list[str]:
        return [c.name for c in self.cut_tensors]

    @property
    def trainable(self) -> list[str]:
        return [p.name for p in self.parameters if p.trainable]

    def graph_files(self) -> list[str]:
        """Every graph file the description refers to."""
        files = [self.model, self.head.forward, self.head.backward]
        for c in self.classes:
            files += [c.forward, c.backward]
        return files

    def tiles_per_class(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for tile in self.tiles:
            counts[tile.class_id] = counts.get(tile.class_id, 0) + 1
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
            "cut_tensors": [
                {"name": c.name, "shape": list(c.shape),
                 "stride": [_fraction_json(s) for s in c.stride],
                 "receptive_field": list(c.receptive_field)} for c in self.cut_tensors],
            "parameters": [
                {"name": p.name, "shape": list(p.shape), "elem_type": p.elem_type,
                 "trainable": p.trainable} for p in self.parameters],
            "classes": [
                {"id": c.id, "forward": c.forward, "backward": c.backward,
                 "input_size": list(c.input_size), "outputs": dict(c.outputs),
                 "cotangents": dict(c.cotangents), "gradients": dict(c.gradients),
                 "parameters": list(c.parameters)} for c in self.classes],
            "tiles": [
                {"index": list(t.index), "class": t.class_id, "crop": _box_json(t.crop),
                 "kept": {c: _box_json(b) for c, b in t.kept.items()}} for t in self.tiles],
            "run_order": list(self.run_order),
            "head": {"forward": self.head.forward, "backward": self.head.backward,
                     "inputs": list(self.head.inputs), "outputs": dict(self.head.outputs),
                     "cotangents": dict(self.head.cotangents),
                     "gradients": dict(self.head.gradients)},
            "outputs": list(self.outputs),
            "model": self.model,
            "flops": self.flops.to_json() if self.flops is not None else None,
            "memory_plan": self.memory_plan,
            "compile_seconds": self.compile_seconds,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "program.json") -> ProgramMeta:
        """Read the ``program.json`` form; a missing or malformed entry is a
        :class:`~streamc.errors.ProgramError` naming it."""
        try:
            return cls._from_json(data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            what = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise ProgramError(
                f"{where} is malformed ({type(exc).__name__}: {what}); recompile the program."
            ) from None

    @classmethod
    def _from_json(cls, d: Mapping[str, Any]) -> ProgramMeta:
        flops = d.get("flops")
        head = d["head"]
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
            cut_tensors=[CutSpec(str(c["name"]), tuple(map(int, c["shape"])),
                                 tuple(_fraction(s) for s in c["stride"]),
                                 tuple(map(int, c["receptive_field"])))
                         for c in d["cut_tensors"]],
            parameters=[ParameterSpec(str(p["name"]), tuple(map(int, p["shape"])),
                                      int(p["elem_type"]), bool(p["trainable"]))
                        for p in d["parameters"]],
            classes=[ClassSpec(int(c["id"]), str(c["forward"]), str(c["backward"]),
                               tuple(map(int, c["input_size"])), dict(c["outputs"]),
                               dict(c["cotangents"]), dict(c["gradients"]),
                               tuple(c["parameters"])) for c in d["classes"]],
            tiles=[TileSpec(tuple(map(int, t["index"])), int(t["class"]), _box(t["crop"]),
                            {str(c): _box(b) for c, b in t["kept"].items()})
                   for t in d["tiles"]],
            run_order=[int(i) for i in d["run_order"]],
            head=HeadSpec(str(head["forward"]), str(head["backward"]), tuple(head["inputs"]),
                          dict(head["outputs"]), dict(head["cotangents"]),
                          dict(head["gradients"])),
            outputs=[str(o) for o in d["outputs"]],
            model=str(d["model"]),
            flops=None if not flops else FlopCounts(
                int(flops["untiled_forward"]), int(flops["untiled_backward"]),
                int(flops["tiled_forward"]), int(flops["tiled_backward"])),
            memory_plan=d.get("memory_plan"),
            compile_seconds=d.get("compile_seconds"),
        )


def class_run_order(tiles: Sequence[TileSpec]) -> list[int]:
    """Tile classes in the order the runtime runs them: the largest crop first.

    The order of tiles does not change the result (up to float summation order), but it
    decides how well ONNX Runtime's CPU arena, which never gives memory back, reuses its
    chunks: a class whose tensors are larger than every earlier one's cannot use the freed
    chunks and extends the arena by its whole working set. Largest first, the later classes'
    smaller tensors fit into the chunks it leaves.
    """
    largest: dict[int, int] = {}
    for tile in tiles:
        crop = math.prod(b - a for a, b in tile.crop)
        largest[tile.class_id] = max(largest.get(tile.class_id, 0), crop)
    return sorted(largest, key=lambda k: (-largest[k], k))


def tile_run_order(tiles: Sequence[TileSpec]) -> list[int]:
    """Tile indices grouped by class, classes in :func:`class_run_order`, tiles in grid order
    within a class."""
    rank = {k: i for i, k in enumerate(class_run_order(tiles))}
    return sorted(range(len(tiles)), key=lambda i: rank[tiles[i].class_id])
