"""The tile loop on torch tensors: what :class:`~streamc.runtime.module.StreamingModel` runs.

:class:`StreamEngine` is :class:`~streamc.runtime.executor.ProgramExecutor`'s schedule (DESIGN
section 5) on torch tensors that stay on the runtime's device, with the sessions of a
:class:`~streamc.runtime.sessions.SessionPool`:

- prefix forward: for each tile, crop the image, run its class's forward graph, write the kept
  region of each cut tensor into the full cut tensor;
- head forward / backward: once on the full cut tensors;
- prefix backward: for each tile, run its class's backward graph on the same crop with the
  cotangent of its kept regions, and sum the weight gradients over tiles.

A program compiled for batch ``n`` runs a batch of ``k·n`` images as ``k`` chunks: outputs and
cut tensors are concatenated along the batch axis, weight gradients summed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from streamc.errors import InputError
from streamc.program import Program
from streamc.runtime.sessions import SessionPool, WeightSet


def region(box: Sequence[Sequence[int]]) -> tuple[slice, ...]:
    """Index of a spatial box over (N, C, *spatial)."""
    return (slice(None), slice(None)) + tuple(slice(a, b) for a, b in box)


class _Progress:
    """A tqdm bar over tiles, shown only when asked or when stderr is a terminal."""

    def __init__(self, enabled: bool | None, min_steps: int = 8) -> None:
        self.enabled = enabled
        self.min_steps = min_steps

    @contextmanager
    def bar(self, total: int, desc: str) -> Iterator[object]:
        show = self.enabled
        if show is None:
            show = total >= self.min_steps and _stderr_is_terminal()
        if not show:
            yield None
            return
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"streamc {desc}", unit="tile", leave=False,
                   dynamic_ncols=True)
        try:
            yield bar
        finally:
            bar.close()


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class StreamEngine:
    """Runs a program's graphs tile by tile on torch tensors (see module docstring)."""

    def __init__(self, program: Program, pool: SessionPool, progress: bool | None = None
                 ) -> None:
        self.program = program
        self.pool = pool
        self.progress = _Progress(progress)
        meta = program.meta
        self.input_name: str = program.input_name
        self.batch: int = int(program.input_shape[0])
        self.cut_names: list[str] = [c["name"] for c in meta["cut_tensors"]]
        self.cut_shapes: dict[str, tuple[int, ...]] = {
            c["name"]: tuple(c["shape"]) for c in meta["cut_tensors"]}
        self.output_names: list[str] = list(meta["outputs"])
        self.head = meta["head"]
        self.tiles_per_class: dict[int, int] = {}
        for tile in program.tiles:
            k = tile["class"]
            self.tiles_per_class[k] = self.tiles_per_class.get(k, 0) + 1
        self.tiles = run_order(program)

    @property
    def device(self) -> torch.device:
        return self.pool.device

    def chunks(self, total: int) -> list[slice]:
        """Batch slices of the compiled batch size."""
        if total % self.batch:
            raise InputError(
                f"the image batch is {total}, but the program was compiled for batches of "
                f"{self.batch}: pass a multiple of {self.batch} images."
            )
        return [slice(b, b + self.batch) for b in range(0, total, self.batch)]

    # -- prefix --------------------------------------------------------------------------------
    def prefix_forward(self, image: torch.Tensor, weights: WeightSet) -> list[torch.Tensor]:
        """The full cut tensors (in ``cut_names`` order) for a batch of images."""
        tiles = self.tiles
        chunks = self.chunks(image.shape[0])
        baked = self.pool.bakes(backward=False)
        per_chunk: list[dict[str, torch.Tensor]] = []
        with self.progress.bar(len(chunks) * len(tiles), "forward") as bar:
            for chunk in chunks:
                x = image[chunk]
                cuts = {name: torch.zeros(self.cut_shapes[name], dtype=torch.float32,
                                          device=self.device) for name in self.cut_names}
                for tile in tiles:
                    cls = self.program.classes[tile["class"]]
                    pairs = list(cls["outputs"].items())
                    values = self.pool.run(cls["forward"], weights,
                                           {self.input_name: x[region(tile["crop"])]},
                                           [out for _, out in pairs], baked)
                    for (cut, _), value in zip(pairs, values):
                        _write(cuts[cut], region(tile["kept"][cut]), value)
                    _tick(bar)
                per_chunk.append(cuts)
        return [_cat([c[name] for c in per_chunk]) for name in self.cut_names]

    def prefix_backward(self, image: torch.Tensor, weights: WeightSet,
                        cut_grads: Sequence[torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """Weight gradients of the prefix, summed over tiles (and batch chunks)."""
        grads: dict[str, torch.Tensor] = {}
        tiles = self.tiles
        chunks = self.chunks(image.shape[0])
        given = {name: g for name, g in zip(self.cut_names, cut_grads) if g is not None}
        if not given:
            return grads
        release = self.pool.options.release_sessions
        if release:
            # The baked forward sessions are of this step's weights, which the optimizer step
            # after this backward pass replaces: free them (and their weight copies) now.
            for cls in self.program.classes:
                self.pool.release(cls["forward"], baked=True)
        last = {tile["class"]: k for k, tile in enumerate(tiles)}
        with self.progress.bar(len(chunks) * len(tiles), "backward") as bar:
            for c, chunk in enumerate(chunks):
                x = image[chunk]
                for k, tile in enumerate(tiles):
                    cls = self.program.classes[tile["class"]]
                    if not cls["gradients"]:
                        _tick(bar)
                        continue
                    feeds = {self.input_name: x[region(tile["crop"])]}
                    for cut, cot in cls["cotangents"].items():
                        box = region(tile["kept"][cut])
                        if cut in given:
                            feeds[cot] = given[cut][chunk][box]
                        else:
                            shape = self.cut_shapes[cut]
                            size = [b - a for a, b in tile["kept"][cut]]
                            feeds[cot] = torch.zeros(list(shape[:2]) + size, device=self.device)
                    pairs = list(cls["gradients"].items())
                    runs = self.tiles_per_class[tile["class"]] * len(chunks)
                    values = self.pool.run(cls["backward"], weights, feeds,
                                           [out for _, out in pairs],
                                           self.pool.bakes(backward=True, runs=runs))
                    for (name, _), value in zip(pairs, values):
                        _accumulate(grads, name, value)
                    del values, feeds
                    if release and c == len(chunks) - 1 and last[tile["class"]] == k:
                        # This class's last tile: a baked backward session would only be
                        # rebuilt for the next step's weights; fed ones are kept (built once).
                        self.pool.release(cls["backward"], baked=True)
                    _tick(bar)
        return grads

    # -- head ----------------------------------------------------------------------------------
    def head_forward(self, cuts: Sequence[torch.Tensor], weights: WeightSet
                     ) -> list[torch.Tensor]:
        """The model's outputs (in ``output_names`` order) from the full cut tensors."""
        per_chunk = []
        graph_outputs = [self.head["outputs"][o] for o in self.output_names]
        for chunk in self.chunks(cuts[0].shape[0]):
            feeds = {name: c[chunk] for name, c in zip(self.cut_names, cuts)}
            per_chunk.append(self.pool.run(self.head["forward"], weights, feeds, graph_outputs,
                                           self.pool.bakes(backward=False)))
        return [_cat([c[k] for c in per_chunk]) for k in range(len(graph_outputs))]

    def head_backward(self, cuts: Sequence[torch.Tensor], weights: WeightSet,
                      output_grads: Sequence[torch.Tensor | None]
                      ) -> tuple[list[torch.Tensor | None], dict[str, torch.Tensor]]:
        """(gradients of the cut tensors, gradients of the head's trainable parameters)."""
        head = self.head
        pairs = list(head["gradients"].items())
        if not pairs:
            return [None] * len(self.cut_names), {}
        chunks = self.chunks(cuts[0].shape[0])
        baked = self.pool.bakes(backward=True, runs=len(chunks))
        session = self.pool.session(head["backward"], weights, baked)
        cut_parts: dict[str, list[torch.Tensor]] = {}
        param_grads: dict[str, torch.Tensor] = {}
        for chunk in chunks:
            feeds = {name: c[chunk] for name, c in zip(self.cut_names, cuts)}
            for out, grad in zip(self.output_names, output_grads):
                cot = head["cotangents"].get(head["outputs"][out])
                if cot is None:
                    continue
                if grad is None:
                    grad = torch.zeros(_input_shape(session.session, cot), device=self.device)
                else:
                    grad = grad[chunk]
                feeds[cot] = grad.to(torch.float32)
            values = self.pool.run(head["backward"], weights, feeds, [n for _, n in pairs], baked)
            for (wrt, _), value in zip(pairs, values):
                if wrt in self.cut_shapes:
                    cut_parts.setdefault(wrt, []).append(value)
                else:
                    _accumulate(param_grads, wrt, value)
        cut_grads = [_cat(cut_parts[name]) if name in cut_parts else None
                     for name in self.cut_names]
        return cut_grads, param_grads


def run_order(program: Program) -> list[dict]:
    """The program's tiles grouped by shape class, in :attr:`Program.class_order`."""
    rank = {k: i for i, k in enumerate(program.class_order)}
    return sorted(program.tiles, key=lambda tile: rank[tile["class"]])


def _input_shape(session, name: str) -> list[int]:
    for i in session.get_inputs():
        if i.name == name:
            return [int(d) for d in i.shape]
    raise InputError(f"internal: the head backward graph has no input {name!r}")


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _write(target: torch.Tensor, index: tuple[slice, ...], value: torch.Tensor) -> None:
    """``target[index] = value``; on CPU through numpy (one thread: no thread wake-ups)."""
    if target.device.type == "cpu":
        target.numpy()[index] = value.numpy()
    else:
        target[index] = value


def _accumulate(grads: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    if name not in grads:
        grads[name] = value
    elif value.device.type == "cpu":
        total = grads[name].numpy()
        np.add(total, value.numpy(), out=total)
    else:
        grads[name] += value


def _tick(bar: object) -> None:
    if bar is not None:
        bar.update(1)  # type: ignore[attr-defined]
