"""The one interpreter of compiled programs.

:class:`Interpreter` walks a program's steps (:func:`~streamc.steps.program_steps`) in the one
order the program and the runtime policy define, and hands every piece of tensor work to a
:class:`~streamc.runtime.backend.Backend`. ``streamc check`` runs it over the numpy backend,
:class:`~streamc.runtime.module.StreamingModel` over the torch backends: the same steps, the
same order, the same sessions.

It holds the program's *buffers* (:class:`~streamc.meta.BufferSpec`) per batch chunk:

- a tile forward step crops its stage's inputs (the image, or buffers of earlier stages), reads
  the global buffers its stage needs, writes its kept regions into the stage's output buffers
  and its partials into its row of each partials buffer;
- a global graph reads whole buffers (stacked partials, earlier globals) and writes global
  buffers; the head reads whole buffers and gives the model's outputs;
- backward runs the same units in reverse with gradient buffers: a tile's backward graph takes
  the gradients of its kept regions and partials, and gives the gradients of the weights
  (summed over tiles), of its input crops (added into whole gradient buffers: the tiles' crops
  overlap, their contributions add up) and of the global buffers it read (summed).

A program compiled for batch ``n`` runs a batch of ``k·n`` images as ``k`` chunks: every step
runs once per chunk, outputs are joined along the batch axis, weight gradients summed.

The image may be a lazy :class:`~streamc.data.sources.ImageSource` instead of a tensor: each
tile's crop is then read from it on demand, a crop ahead on a thread
(:class:`~streamc.data.prefetch.CropReader`), in forward and again in backward (the image is
never held whole, so backward reads its crops again rather than keeping them). Grid buffers may
be written into array-likes the caller gives (``outputs``: a map larger than memory, written
tile by tile), and a saliency program's image gradient added into one (``image_grad``).

With ``workers`` (:class:`~streamc.runtime.workers.Workers`: one worker of a tile-parallel
run), it runs that worker's tiles only and hands each combine step's buffer to
``workers.combine`` (:mod:`streamc.steps`). The graphs on whole buffers (global graphs, head)
run on every worker; what they add into sums that are combined later (weight gradients,
combined gradient buffers) only the root worker adds, so that each is counted once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from onnx import helper

from streamc.data.prefetch import CropReader
from streamc.data.sources import is_image_source
from streamc.errors import InputError
from streamc.meta import BufferSpec, ClassSpec, GraphSpec
from streamc.program import Program
from streamc.progress import progress_bar
from streamc.runtime.backend import Backend, Index
from streamc.runtime.weights import WeightSet
from streamc.runtime.workers import Workers, reduce_op
from streamc.steps import Step, StepKind, last_uses, program_steps

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


@dataclass
class ForwardState:
    """What the forward pass leaves for the backward pass: the image and, per batch chunk, the
    buffers the stages and global graphs wrote."""

    image: Tensor
    chunks: list[slice]
    buffers: list[dict[str, Tensor]] = field(default_factory=list)
    #: reads a lazy image's crops during a pass (None: the image is a tensor)
    reader: CropReader | None = None
    #: (chunk, stage, tile) -> the residuals of a unit that keeps its activations
    kept: dict[tuple[int, int, int], dict[str, Tensor]] = field(default_factory=dict)


def index(box: Sequence[Sequence[int]], layout: Sequence[int], rank: int) -> Index:
    """Index of a spatial box over a tensor of ``rank`` whose spatial axes are at ``layout``."""
    result: list[slice] = [slice(None)] * rank
    for position, (a, b) in zip(layout, box):
        result[position] = slice(a, b)
    return tuple(result)


class Interpreter:
    """Runs a program's steps over a backend (see the module docstring).

    ``progress``: tqdm bars over tile steps (None: only when stderr is a terminal).
    ``workers``: run as one worker of a tile-parallel run (None: every tile, one process).
    """

    def __init__(self, program: Program, backend: Backend, progress: bool | None = None,
                 workers: Workers | None = None) -> None:
        self.program = program
        self.backend = backend
        self.workers = workers
        self.policy = backend.pool.policy
        self.progress = progress
        meta = program.meta
        self.meta = meta
        self.batch = int(meta.input.shape[0])
        self.image_name = meta.input.name
        self.buffers: dict[str, BufferSpec] = {b.name: b for b in meta.buffers}
        self.globals: dict[str, GraphSpec] = {g.name: g for g in meta.globals}
        self.cut_names = list(meta.head.inputs)
        self.output_names = list(meta.outputs)
        self._steps: dict[int, dict[str, list[Step]]] = {}
        self._weight_names: list[str] | None = None

    def steps(self, phase: str, chunks: int = 1) -> list[Step]:
        """The steps of ``phase`` for a batch of ``chunks`` compiled batches."""
        if chunks not in self._steps:
            tiles = None if self.workers is None else self.workers.tiles
            self._steps[chunks] = program_steps(self.meta, self.policy, chunks, tiles)
        return self._steps[chunks][phase]

    def chunks(self, total: int) -> list[slice]:
        """Batch slices of the compiled batch size."""
        if total % self.batch or total == 0:
            raise InputError(
                f"the image batch is {total}, but the program was compiled for batches of "
                f"{self.batch}: pass a positive multiple of {self.batch} images."
            )
        return [slice(b, b + self.batch) for b in range(0, total, self.batch)]

    # -- where tensors are -----------------------------------------------------------------------
    def _layout(self, name: str) -> tuple[int, ...]:
        spec = self.buffers.get(name)
        if spec is not None and spec.layout:
            return spec.layout
        return tuple(range(2, len(self.meta.input.shape)))

    def _rank(self, name: str) -> int:
        spec = self.buffers.get(name)
        return len(spec.shape) if spec is not None else len(self.meta.input.shape)

    def _index(self, name: str, box) -> Index:
        spec = self.buffers.get(name)
        if spec is not None and spec.origin:  # a band: it starts at ``origin``
            box = [(a - o, b - o) for (a, b), o in zip(box, spec.origin)]
        return index(box, self._layout(name), self._rank(name))

    def _source(self, state: ForwardState, c: int, name: str) -> Tensor:
        if name == self.image_name:
            return self.backend.batch(state.image, state.chunks[c])
        return state.buffers[c][name]

    def _buffer(self, store: dict[str, Tensor], name: str) -> Tensor:
        """``store[name]``, created as the buffer's identity (zeros) on first use."""
        if name not in store:
            spec = self.buffers.get(name)
            if spec is None and name == self.image_name:  # its gradient (a saliency program)
                store[name] = self.backend.full(self.meta.input.shape, 0.0, np.float32)
            elif spec is None:
                raise InputError(f"internal: the program has no buffer {name!r}; please "
                                 "report this.")
            else:
                store[name] = self.backend.full(spec.shape, spec.identity,
                                                helper.tensor_dtype_to_np_dtype(spec.elem_type))
        return store[name]

    # -- lazy images -----------------------------------------------------------------------------
    def image_reads(self, phase: str, chunks: Sequence[slice]) -> list[Index]:
        """The image crops ``phase`` (``"prefix_forward"`` or ``"prefix_backward"``) reads, in
        the order it reads them: what a prefetching reader reads ahead."""
        kind = StepKind.TILE_FORWARD if phase == "prefix_forward" else StepKind.TILE_BACKWARD
        reads = []
        for step in self.steps(phase, len(chunks)):
            if step.kind is kind:
                part = self.meta.tiles[step.tile].parts[step.stage]
                if self.image_name in part.crops:
                    reads += [self._image_index(chunk, part.crops[self.image_name])
                              for chunk in chunks]
        return reads

    def _image_index(self, chunk: slice, box) -> Index:
        return (chunk, *self._index(self.image_name, box)[1:])

    @contextmanager
    def _reading(self, state: ForwardState, phase: str) -> Iterator[None]:
        """Within: the image's crops of ``phase`` are read ahead, when the image is lazy."""
        if not is_image_source(state.image):
            yield
            return
        with CropReader(state.image, self.image_reads(phase, state.chunks)) as reader:
            state.reader = reader
            try:
                yield
            finally:
                state.reader = None

    def _crop(self, state: ForwardState, c: int, name: str, box) -> Tensor:
        if name == self.image_name and state.reader is not None:
            crop = state.reader.read(self._image_index(state.chunks[c], box))
            return self.backend.from_numpy(crop)
        return self.backend.crop(self._source(state, c, name), self._index(name, box))

    # -- forward -----------------------------------------------------------------------------
    def prefix_forward(self, image: Tensor, weights: WeightSet,
                       outputs: Mapping[str, Any] | None = None, keep: bool = True
                       ) -> tuple[list[Tensor], ForwardState]:
        """Every stage and global graph: the head's inputs (in ``cut_names`` order, whole
        batch) and the state the backward pass needs.

        ``outputs``: array-likes (``__setitem__``) that grid buffers are written into, tile by
        tile, instead of buffers in memory (one batch chunk only). ``keep``: the units that
        keep their activations for the backward pass do (False: no backward pass follows)."""
        chunks = self.chunks(image.shape[0])
        if self.workers is not None:
            self.workers.check_input(image)
        state = ForwardState(image, chunks, [{} for _ in chunks])
        if outputs:
            self._single_chunk(chunks, "outputs")
            unknown = [n for n in outputs if n not in self.buffers]
            if unknown:
                raise InputError(f"{unknown[0]!r} is not a buffer of this program.")
            state.buffers[0].update(outputs)
        steps = self.steps("prefix_forward", len(chunks))
        tiles = sum(1 for s in steps if s.kind is StepKind.TILE_FORWARD)
        with progress_bar(len(chunks) * tiles, "forward", self.progress) as tick, \
                self._reading(state, "prefix_forward"):
            for step in steps:
                for c in range(len(chunks)):
                    if step.kind is StepKind.TILE_FORWARD:
                        self._tile_forward(step if keep or not step.keeps else
                                           self._recomputing(step), state, c, weights)
                        tick()
                    elif step.kind is StepKind.COMBINE:
                        self._combine(state.buffers[c], step.name, forward=True)
                    else:
                        self._global_forward(step, state, c, weights)
        return [self.backend.concat([self._source(state, c, n) for c in range(len(chunks))])
                for n in self.cut_names], state

    def _tile_forward(self, step: Step, state: ForwardState, c: int, weights: WeightSet
                      ) -> None:
        backend = self.backend
        part = self.meta.tiles[step.tile].parts[step.stage]
        cls = self.meta.classes[part.class_id]
        feeds = self._tile_feeds(cls, part, state, c)
        names = list(cls.outputs) + list(cls.partials)
        graph_outputs = [cls.outputs.get(n) or cls.partials[n] for n in names] + list(cls.emits)
        residuals = list(cls.residuals) if step.keeps else []
        values = backend.run(step, weights, feeds, graph_outputs + residuals)
        if step.keeps:
            state.kept[(c, step.stage, step.tile)] = dict(zip(residuals,
                                                              values[len(graph_outputs):]))
        store = state.buffers[c]
        for name, value in zip(names, values):
            target = self._buffer(store, name)
            if name in cls.outputs:
                backend.write(target, self._index(name, part.kept[name]), value)
            else:
                backend.write(target, (step.tile,), value)
        for name, value in zip(cls.emits, values[len(names):]):
            band, box = part.bands[name]
            backend.write(self._buffer(store, band), self._index(band, box), value)

    def _recomputing(self, step: Step) -> Step:
        """A keeping unit's forward step as a plain one (no backward pass follows)."""
        cls = self.meta.classes[self.meta.tiles[step.tile].parts[step.stage].class_id]
        return replace(step, graph=cls.forward, keeps=False)

    def _single_chunk(self, chunks: Sequence[slice], what: str) -> None:
        if len(chunks) != 1:
            raise InputError(f"{what} can be given for one batch of {self.batch} image(s), "
                             f"not {len(chunks)}: run the images one batch at a time.")

    def _tile_feeds(self, cls: ClassSpec, part, state: ForwardState, c: int) -> dict[str, Tensor]:
        feeds = {t: self._crop(state, c, t, part.crops[t]) for t in cls.inputs}
        feeds.update({g: state.buffers[c][g] for g in cls.side_inputs})
        for name in cls.strips:
            band, box = part.bands[name]
            feeds[name] = self.backend.crop(state.buffers[c][band], self._index(band, box))
        return feeds

    def _global_forward(self, step: Step, state: ForwardState, c: int, weights: WeightSet
                        ) -> None:
        spec = self.globals[step.name]
        store = state.buffers[c]
        feeds = {n: self._buffer(store, n) for n in spec.inputs}
        names = list(spec.outputs)
        values = self.backend.run(step, weights, feeds, [spec.outputs[n] for n in names])
        store.update(zip(names, values))

    def head_forward(self, inputs: Sequence[Tensor], weights: WeightSet) -> list[Tensor]:
        """The model's outputs (in ``output_names`` order) from the head's inputs."""
        backend = self.backend
        head = self.meta.head
        graph_outputs = [head.outputs[o] for o in self.output_names]
        chunks = self.chunks(inputs[0].shape[0])
        (step,) = self.steps("head_forward", len(chunks))
        per_chunk = []
        for chunk in chunks:
            feeds = {name: backend.batch(t, chunk) for name, t in zip(self.cut_names, inputs)}
            per_chunk.append(backend.run(step, weights, feeds, graph_outputs))
        return [backend.concat([c[k] for c in per_chunk]) for k in range(len(graph_outputs))]

    # -- backward ------------------------------------------------------------------------------
    def head_backward(self, inputs: Sequence[Tensor], weights: WeightSet,
                      output_grads: Sequence[Tensor | None]
                      ) -> tuple[list[Tensor | None], dict[str, Tensor]]:
        """(gradients of the head's inputs, gradients of the head's trainable parameters)."""
        backend = self.backend
        head = self.meta.head
        chunks = self.chunks(inputs[0].shape[0])
        steps = self.steps("head_backward", len(chunks))
        if not steps:
            return [None] * len(self.cut_names), {}
        (step,) = steps
        pairs = list(head.gradients.items())
        parts: dict[str, list[Tensor]] = {}
        param_grads: dict[str, Tensor] = {}
        for chunk in chunks:
            feeds = {name: backend.batch(t, chunk) for name, t in zip(self.cut_names, inputs)}
            for out, grad in zip(self.output_names, output_grads):
                cot = head.cotangents.get(head.outputs[out])
                if cot is None:
                    continue
                feeds[cot] = (self._zeros_like_input(head.backward, cot) if grad is None
                              else backend.batch(grad, chunk))
            values = backend.run(step, weights, feeds, [n for _, n in pairs])
            for (wrt, _), value in zip(pairs, values):
                if wrt in self.cut_names:
                    parts.setdefault(wrt, []).append(value)
                else:
                    backend.accumulate(param_grads, wrt, value)
        grads = [backend.concat(parts[name]) if name in parts else None
                 for name in self.cut_names]
        return grads, param_grads

    def prefix_backward(self, state: ForwardState, weights: WeightSet,
                        cut_grads: Sequence[Tensor | None], image_grad: Any = None
                        ) -> dict[str, Tensor]:
        """Weight gradients of every stage and global graph, summed over tiles and chunks,
        given the gradients of the head's inputs.

        A saliency program also gives the image's gradient: added into ``image_grad`` (an
        array-like with ``__getitem__`` and ``__setitem__``, one batch chunk) when given, else
        returned under the image's name."""
        backend = self.backend
        params: dict[str, Tensor] = {}
        if all(g is None for g in cut_grads):
            return params
        chunks = state.chunks
        steps = self.steps("prefix_backward", len(chunks))
        if self._drops_replicated():  # the root adds the head's share of combined gradients
            combined = {s.name for s in steps if s.kind is StepKind.COMBINE_GRADIENT}
            cut_grads = [None if n in combined else g for n, g in zip(self.cut_names, cut_grads)]
        grads: list[dict[str, Tensor]] = [
            {n: backend.batch(g, chunk) for n, g in zip(self.cut_names, cut_grads)
             if g is not None} for chunk in chunks]
        if image_grad is not None:
            self._single_chunk(chunks, "image_grad")
            grads[0][self.image_name] = image_grad
        tiles = sum(1 for s in steps if s.kind is StepKind.TILE_BACKWARD)
        free_after = self._free_after(state, grads, steps)
        prepared: dict[str, Tensor] = {}
        with progress_bar(len(chunks) * tiles, "backward", self.progress) as tick, \
                self._reading(state, "prefix_backward"):
            for position, step in enumerate(steps):
                if step.kind is StepKind.RELEASE:
                    backend.release(step)
                    continue
                if step.kind is StepKind.COMBINE_WEIGHT_GRADIENTS:
                    self._combine_weight_gradients(params)
                    continue
                if step.kind is StepKind.PREPARE_WEIGHTS:
                    names = list(self.meta.weight_work.prepared)
                    prepared = dict(zip(names, backend.run(step, weights, {}, names)))
                    continue
                if step.kind is StepKind.GRADIENT_LAYOUT:
                    self._lay_out_gradients(step, params, weights)
                    continue
                for c in range(len(chunks)):
                    if step.kind is StepKind.TILE_BACKWARD:
                        self._tile_backward(step, state, c, grads[c], params, weights,
                                            prepared)
                        tick()
                    elif step.kind is StepKind.COMBINE_GRADIENT:
                        self._combine(grads[c], step.name, forward=False)
                    else:
                        self._global_backward(step, state, c, grads[c], params, weights)
                self._free(state, grads, free_after.get(position, ()))
        if image_grad is None and any(self.image_name in g for g in grads):
            params[self.image_name] = backend.concat([self._buffer(g, self.image_name)
                                                      for g in grads])
        return params

    def _free_after(self, state: ForwardState, grads: list[dict[str, Tensor]],
                    steps: Sequence[Step]) -> dict[int, list[str]]:
        """Buffers (``<buffer>:grad``: gradient buffers) to free after each position of
        ``steps``, the last that uses them; those that no step uses are freed now. The memory
        plan counts the same lives (``passes/memory/step.py``)."""
        last = last_uses(self.meta, steps)
        unused = {n for store in state.buffers for n in store if n not in last}
        unused |= {f"{n}:grad" for store in grads for n in store if f"{n}:grad" not in last}
        self._free(state, grads, unused)
        free_after: dict[int, list[str]] = {}
        for name, position in last.items():
            free_after.setdefault(position, []).append(name)
        return free_after

    def _free(self, state: ForwardState, grads: list[dict[str, Tensor]],
              names: Iterable[str]) -> None:
        for name in names:
            buffer = name.removesuffix(":grad")
            if buffer not in self.buffers:  # the image, or its gradient (saliency)
                continue
            for store in grads if name.endswith(":grad") else state.buffers:
                store.pop(buffer, None)

    def _tile_backward(self, step: Step, state: ForwardState, c: int, grads: dict[str, Tensor],
                       params: dict[str, Tensor], weights: WeightSet,
                       prepared: Mapping[str, Tensor]) -> None:
        backend = self.backend
        part = self.meta.tiles[step.tile].parts[step.stage]
        cls = self.meta.classes[part.class_id]
        feeds = self._tile_feeds(cls, part, state, c)
        feeds.update(prepared)
        if step.keeps:
            feeds.update(state.kept.pop((c, step.stage, step.tile)))
        for name, cot in cls.cotangents.items():
            if name in cls.outputs:  # the kept region of an output buffer
                buffer, where = name, self._index(name, part.kept[name])
            elif name in part.bands:  # a strip handed on: what the tiles after it gave back
                buffer, box = part.bands[name]
                where = self._index(buffer, box)
            else:  # a partial: the tile's row
                buffer, where = name, (step.tile,)
            given = grads.get(buffer)
            feeds[cot] = (self._zeros_like_input(cls.backward, cot) if given is None
                          else backend.read(given, where))
        pairs = list(cls.gradients.items())
        values = backend.run(step, weights, feeds, [n for _, n in pairs])
        raw = self.meta.weight_work.raw
        for (wrt, _), value in zip(pairs, values):
            if wrt in cls.inputs:  # a crop: its gradient adds into the whole buffer's
                backend.add(self._buffer(grads, wrt), self._index(wrt, part.crops[wrt]), value)
            elif wrt in part.bands:  # a strip: its gradient goes back to the tiles before
                band, box = part.bands[wrt]
                backend.add(self._buffer(grads, band), self._index(band, box), value)
            elif wrt in self.buffers:
                backend.accumulate(grads, wrt, value)
            else:  # a weight: summed in the layout its gradient graph gives
                backend.accumulate(params, raw.get(wrt, wrt), value)

    def _lay_out_gradients(self, step: Step, params: dict[str, Tensor], weights: WeightSet
                           ) -> None:
        """Move the weight gradients summed in their raw layouts into the weights' layouts
        (added to what the global graphs gave them)."""
        work = self.meta.weight_work
        names = [n for n in work.laid_out if work.raw[n] in params]
        if not names:
            return
        feeds = {graph_input: (params.pop(graph_input) if graph_input in params else
                               self._zeros_like_input(step.graph, graph_input))
                 for graph_input in work.raw.values()}
        values = self.backend.run(step, weights, feeds, [work.laid_out[n] for n in names])
        for name, value in zip(names, values):
            self.backend.accumulate(params, name, value)

    def _global_backward(self, step: Step, state: ForwardState, c: int,
                         grads: dict[str, Tensor], params: dict[str, Tensor],
                         weights: WeightSet) -> None:
        backend = self.backend
        spec = self.globals[step.name]
        store = state.buffers[c]
        feeds = {n: self._buffer(store, n) for n in spec.inputs}
        for buffer, out in spec.outputs.items():
            cot = spec.cotangents.get(out)
            if cot is not None:
                given = grads.get(buffer)
                feeds[cot] = self._zeros_like_input(spec.backward, cot) if given is None \
                    else given
        pairs = list(spec.gradients.items())
        values = backend.run(step, weights, feeds, [n for _, n in pairs])
        combined = self._combined_gradients(len(state.chunks))
        for (wrt, _), value in zip(pairs, values):
            if self._drops_replicated() and (wrt not in self.buffers or wrt in combined):
                continue  # the root adds it; the combine step sums it into every worker's
            backend.accumulate(grads if wrt in self.buffers else params, wrt, value)

    # -- workers ---------------------------------------------------------------------------------
    def _drops_replicated(self) -> bool:
        return self.workers is not None and not self.workers.root

    def _combined_gradients(self, chunks: int) -> set[str]:
        return {s.name for s in self.steps("prefix_backward", chunks)
                if s.kind is StepKind.COMBINE_GRADIENT}

    def _combine(self, store: dict[str, Tensor], name: str, forward: bool) -> None:
        """Combine a buffer (``forward``) or a gradient buffer with the other workers'."""
        if forward:
            store[name] = self.workers.combine(self._buffer(store, name),
                                               reduce_op(self.buffers[name].identity),
                                               f"buffer {name}")
            return
        if name not in store:
            spec = self.buffers[name]
            store[name] = self.backend.full(spec.shape, 0.0,
                                            helper.tensor_dtype_to_np_dtype(spec.elem_type))
        store[name] = self.workers.combine(store[name], "sum", f"the gradient of {name}")

    def _combine_weight_gradients(self, params: dict[str, Tensor]) -> None:
        """Sum every weight gradient of the prefix over the workers (zeros where a worker has
        none, so that every worker hands the same tensors to the collective)."""
        if self._weight_names is None:
            graphs = [*self.meta.classes, *self.meta.globals]
            self._weight_names = sorted({w for g in graphs for w in g.gradients
                                         if w not in self.buffers and w != self.image_name})
        shapes = {p.name: p for p in self.meta.parameters}
        for name in self._weight_names:
            if name not in params:
                spec = shapes[name]
                params[name] = self.backend.full(
                    spec.shape, 0.0, helper.tensor_dtype_to_np_dtype(spec.elem_type))
        names = self._weight_names
        values = self.workers.combine_all([params[n] for n in names], "the weight gradients")
        params.update(zip(names, values))

    def _zeros_like_input(self, graph: str, name: str) -> Tensor:
        for vi in self.program.graph(graph).graph.input:
            if vi.name == name:
                t = vi.type.tensor_type
                return self.backend.full([d.dim_value for d in t.shape.dim], 0.0,
                                         helper.tensor_dtype_to_np_dtype(t.elem_type))
        raise InputError(f"internal: graph {graph} has no input {name!r}")

    # -- a whole step ----------------------------------------------------------------------------
    def run(self, image: Tensor, weights: WeightSet,
            output_grads: Callable[[list[Tensor]], Sequence[Tensor | None]] | None = None
            ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """A whole step: forward; with ``output_grads`` (the model's outputs -> their
        cotangents) also backward. Returns (outputs, parameter gradients, head and prefix)."""
        inputs, state = self.prefix_forward(image, weights, keep=output_grads is not None)
        outputs = self.head_forward(inputs, weights)
        if output_grads is None:
            return outputs, {}
        cut_grads, grads = self.head_backward(inputs, weights, output_grads(outputs))
        for name, value in self.prefix_backward(state, weights, cut_grads).items():
            self.backend.accumulate(grads, name, value)
        return outputs, grads


__all__ = ["ForwardState", "Interpreter", "check_image", "index"]
