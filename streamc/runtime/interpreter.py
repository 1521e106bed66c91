"""The one interpreter of compiled programs.

:class:`Interpreter` walks a program's steps (:func:`~streamc.steps.program_steps`: prefix
forward, head forward, head backward, prefix backward) in the one order the program and the
runtime policy define, and hands every piece of tensor work to a
:class:`~streamc.runtime.backend.Backend`. ``streamc check`` runs it over the numpy backend,
:class:`~streamc.runtime.module.StreamingModel` over the torch backends: the same steps, the
same order, the same sessions.

- prefix forward: for each tile, crop the image, run its class's forward graph, write the kept
  region of each cut tensor into the full cut tensor;
- head forward / backward: once on the full cut tensors;
- prefix backward: for each tile, run its class's backward graph on the same crop with the
  cotangent of its kept regions, and add the weight gradients up; release steps free baked
  sessions once their pass is over.

A program compiled for batch ``n`` runs a batch of ``k·n`` images as ``k`` chunks: each tile
step runs once per chunk, outputs and cut tensors are joined along the batch axis, weight
gradients summed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from streamc.errors import InputError
from streamc.program import Program
from streamc.progress import progress_bar
from streamc.runtime.backend import Backend
from streamc.runtime.weights import WeightSet
from streamc.steps import Step, StepKind, program_steps

Tensor = Any


def check_image(program: Program, shape: Sequence[int], dtype: object, float32: bool) -> None:
    """Raise :class:`~streamc.errors.InputError` unless an image of ``shape`` and ``dtype``
    (``float32``: whether it is float32) is what ``program`` takes: ``(N, C, *size)`` with the
    compiled channels and size, ``N`` a positive multiple of the compiled batch."""
    expected = program.input_shape
    shape = tuple(shape)
    if len(shape) != len(expected):
        dims = ", ".join(map(str, expected[2:]))
        raise InputError(
            f"the image has {len(shape)} axes {list(shape)}, the program expects "
            f"{len(expected)}: (batch, channels, *size) = (N, {expected[1]}, {dims})."
        )
    if shape[1] != expected[1]:
        raise InputError(
            f"the image has {shape[1]} channels, the program was compiled for {expected[1]}.")
    if shape[2:] != tuple(expected[2:]):
        size = "x".join(map(str, shape[2:]))
        compiled = "x".join(map(str, expected[2:]))
        raise InputError(
            f"the image is {size} but this program was compiled for {compiled} images: "
            f"compile another program for this size (streamc compile --image {size}, or "
            f"compile(model, tile, image={tuple(shape[2:])}))."
        )
    if not float32:
        raise InputError(
            f"the image is {dtype}, the program takes float32: convert it first "
            "(image.float() or array.astype(np.float32))."
        )
    if shape[0] == 0 or shape[0] % expected[0]:
        raise InputError(
            f"the image batch is {shape[0]}, but the program was compiled for batches of "
            f"{expected[0]}: pass a positive multiple of {expected[0]} images."
        )


class Interpreter:
    """Runs a program's steps over a backend (see the module docstring).

    ``progress``: tqdm bars over tile steps (None: only when stderr is a terminal).
    """

    def __init__(self, program: Program, backend: Backend, progress: bool | None = None
                 ) -> None:
        self.program = program
        self.backend = backend
        self.policy = backend.pool.policy
        self.progress = progress
        meta = program.meta
        self.batch = int(meta.input.shape[0])
        self.cut_names = meta.cut_names
        self.cut_shapes = {c.name: c.shape for c in meta.cut_tensors}
        self.output_names = list(meta.outputs)
        self._steps: dict[int, dict[str, list[Step]]] = {}

    def steps(self, phase: str, chunks: int = 1) -> list[Step]:
        """The steps of ``phase`` for a batch of ``chunks`` compiled batches."""
        if chunks not in self._steps:
            self._steps[chunks] = program_steps(self.program.meta, self.policy, chunks)
        return self._steps[chunks][phase]

    def chunks(self, total: int) -> list[slice]:
        """Batch slices of the compiled batch size."""
        if total % self.batch or total == 0:
            raise InputError(
                f"the image batch is {total}, but the program was compiled for batches of "
                f"{self.batch}: pass a positive multiple of {self.batch} images."
            )
        return [slice(b, b + self.batch) for b in range(0, total, self.batch)]

    # -- phases ----------------------------------------------------------------------------------
    def prefix_forward(self, image: Tensor, weights: WeightSet) -> list[Tensor]:
        """The full cut tensors (in ``cut_names`` order) for a batch of images."""
        backend = self.backend
        chunks = self.chunks(image.shape[0])
        cuts = [{name: backend.zeros(self.cut_shapes[name]) for name in self.cut_names}
                for _ in chunks]
        steps = self.steps("prefix_forward", len(chunks))
        with self._bar(len(steps) * len(chunks), "forward") as tick:
            for step in steps:
                tile = self.program.tiles[step.tile]
                cls = self.program.classes[tile.class_id]
                pairs = list(cls.outputs.items())
                for c, chunk in enumerate(chunks):
                    x = backend.crop(backend.batch(image, chunk), tile.crop)
                    values = backend.run(step, weights, {self.program.input_name: x},
                                         [out for _, out in pairs])
                    for (cut, _), value in zip(pairs, values):
                        backend.write(cuts[c][cut], tile.kept[cut], value)
                    tick()
        return [backend.concat([c[name] for c in cuts]) for name in self.cut_names]

    def head_forward(self, cuts: Sequence[Tensor], weights: WeightSet) -> list[Tensor]:
        """The model's outputs (in ``output_names`` order) from the full cut tensors."""
        backend = self.backend
        head = self.program.meta.head
        graph_outputs = [head.outputs[o] for o in self.output_names]
        chunks = self.chunks(cuts[0].shape[0])
        (step,) = self.steps("head_forward", len(chunks))
        per_chunk = []
        for chunk in chunks:
            feeds = {name: backend.batch(c, chunk) for name, c in zip(self.cut_names, cuts)}
            per_chunk.append(backend.run(step, weights, feeds, graph_outputs))
        return [backend.concat([c[k] for c in per_chunk]) for k in range(len(graph_outputs))]

    def head_backward(self, cuts: Sequence[Tensor], weights: WeightSet,
                      output_grads: Sequence[Tensor | None]
                      ) -> tuple[list[Tensor | None], dict[str, Tensor]]:
        """(gradients of the cut tensors, gradients of the head's trainable parameters)."""
        backend = self.backend
        head = self.program.meta.head
        chunks = self.chunks(cuts[0].shape[0])
        steps = self.steps("head_backward", len(chunks))
        if not steps:
            return [None] * len(self.cut_names), {}
        (step,) = steps
        pairs = list(head.gradients.items())
        cut_parts: dict[str, list[Tensor]] = {}
        param_grads: dict[str, Tensor] = {}
        for chunk in chunks:
            feeds = {name: backend.batch(c, chunk) for name, c in zip(self.cut_names, cuts)}
            for out, grad in zip(self.output_names, output_grads):
                cot = head.cotangents.get(head.outputs[out])
                if cot is None:
                    continue
                feeds[cot] = (backend.zeros(self._input_shape(head.backward, cot))
                              if grad is None else backend.batch(grad, chunk))
            values = backend.run(step, weights, feeds, [n for _, n in pairs])
            for (wrt, _), value in zip(pairs, values):
                if wrt in self.cut_shapes:
                    cut_parts.setdefault(wrt, []).append(value)
                else:
                    backend.accumulate(param_grads, wrt, value)
        cut_grads = [backend.concat(cut_parts[name]) if name in cut_parts else None
                     for name in self.cut_names]
        return cut_grads, param_grads

    def prefix_backward(self, image: Tensor, weights: WeightSet,
                        cut_grads: Sequence[Tensor | None]) -> dict[str, Tensor]:
        """Weight gradients of the prefix, summed over tiles (and batch chunks)."""
        backend = self.backend
        grads: dict[str, Tensor] = {}
        given = {name: g for name, g in zip(self.cut_names, cut_grads) if g is not None}
        if not given:
            return grads
        chunks = self.chunks(image.shape[0])
        steps = self.steps("prefix_backward", len(chunks))
        tiles = sum(1 for s in steps if s.kind is StepKind.TILE_BACKWARD)
        with self._bar(tiles * len(chunks), "backward") as tick:
            for step in steps:
                if step.kind is StepKind.RELEASE:
                    backend.release(step)
                    continue
                tile = self.program.tiles[step.tile]
                cls = self.program.classes[tile.class_id]
                pairs = list(cls.gradients.items())
                for chunk in chunks:
                    feeds = {self.program.input_name:
                             backend.crop(backend.batch(image, chunk), tile.crop)}
                    for cut, cot in cls.cotangents.items():
                        box = tile.kept[cut]
                        feeds[cot] = (backend.read(backend.batch(given[cut], chunk), box)
                                      if cut in given else backend.zeros(
                                          [*self.cut_shapes[cut][:2], *(b - a for a, b in box)]))
                    values = backend.run(step, weights, feeds, [out for _, out in pairs])
                    for (name, _), value in zip(pairs, values):
                        backend.accumulate(grads, name, value)
                    del values, feeds
                    tick()
        return grads

    def run(self, image: Tensor, weights: WeightSet,
            output_grads: Callable[[list[Tensor]], Sequence[Tensor | None]] | None = None
            ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """A whole step: forward; with ``output_grads`` (the model's outputs -> their
        cotangents) also backward. Returns (outputs, parameter gradients, head and prefix)."""
        cuts = self.prefix_forward(image, weights)
        outputs = self.head_forward(cuts, weights)
        if output_grads is None:
            return outputs, {}
        cut_grads, grads = self.head_backward(cuts, weights, output_grads(outputs))
        for name, value in self.prefix_backward(image, weights, cut_grads).items():
            self.backend.accumulate(grads, name, value)
        return outputs, grads

    # -- helpers ---------------------------------------------------------------------------------
    def _input_shape(self, graph: str, name: str) -> list[int]:
        for vi in self.program.graph(graph).graph.input:
            if vi.name == name:
                return [d.dim_value for d in vi.type.tensor_type.shape.dim]
        raise InputError(f"internal: graph {graph} has no input {name!r}")

    def _bar(self, total: int, desc: str):
        return progress_bar(total, desc, self.progress)
