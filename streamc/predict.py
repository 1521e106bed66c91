"""Streaming inference into maps larger than memory: ``streamc predict`` and ``streamc saliency``.

:func:`predict` runs a program's prefix over a (lazy) image and writes a grid tensor into a
tiled TIFF, a zarr array or a ``.npy`` file tile by tile (:class:`~streamc.data.writers.MapWriter`),
never holding the whole map: for a fully local network (the whole graph is the prefix, e.g. a
segmentation network: its head only renames the cut tensor) the model's output, and for any
other network the prefix's feature map (``features=True``).

:func:`saliency` writes the gradient of one class score (or of the cross-entropy loss for a
label) with respect to the image, the same way: a saliency program's tile backward graphs give
each tile's share of the image gradient, which the writer adds up (tiles' crops overlap).

Both take a compiled program (or a program directory, or an ONNX model with a tile) and compile
the program they need for the image's size and purpose when it is not the one given
(inference or saliency; see :class:`~streamc.runtime.cache.ProgramCache`). They run on the
numpy backend (ONNX Runtime's CPU provider), with the program's parameters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from streamc.compiler import ProgramMode
from streamc.data.sources import ImageSource, describe
from streamc.data.writers import MapWriter, Written
from streamc.errors import InputError, StreamcError
from streamc.policy import DEFAULT_POLICY
from streamc.program import Program, load
from streamc.runtime.backend import NumpyBackend
from streamc.runtime.interpreter import Interpreter, check_image
from streamc.runtime.options import RuntimeOptions
from streamc.runtime.weights import WeightSet

ProgramLike = Program | str | Path


@dataclass
class MapResult:
    """What :func:`predict` or :func:`saliency` wrote and how: the output, the program that ran
    (and whether it was compiled for this image), the grid tensor written (predict) or the
    class whose score was differentiated and its value (saliency), tiles and seconds."""

    written: Written
    program: Program
    compiled: bool
    tensor: str | None
    tiles: int
    seconds: float
    target: int | None = None
    score: float | None = None
    #: what was differentiated, in words (saliency)
    objective: str | None = None


def fully_local_outputs(program: Program) -> dict[str, str]:
    """Model output -> the grid buffer it equals, for every output that the head only renames
    (Identity nodes); all outputs of a fully local network."""
    meta = program.meta
    head = program.graph(meta.head.forward).graph
    producer = {o: n for n in head.node for o in n.output}
    grid = {b.name for b in meta.buffers if b.kind == "grid"}
    found = {}
    for output, graph_output in meta.head.outputs.items():
        name = graph_output
        while name in producer and producer[name].op_type == "Identity":
            name = producer[name].input[0]
        if name in grid and name in meta.head.inputs:
            found[output] = name
    return found


def program_model(program: Program) -> onnx.ModelProto:
    """The program's model (``graphs/model.onnx``) with its parameters as initializers: what it
    can be compiled again from, for another size or purpose."""
    from streamc.runtime.module import _set_initializers

    model = onnx.ModelProto()
    model.CopyFrom(program.graph(program.meta.model))
    _set_initializers(model, {k: np.asarray(v) for k, v in program.parameters.items()})
    return model


def program_for(program: ProgramLike, size: tuple[int, ...], mode: ProgramMode, *,
                tile: int | str | None = None, cache_dir: str | Path | None = None
                ) -> tuple[Program, bool]:
    """A program for images of ``size`` that runs ``mode`` (an inference request takes a
    training program): ``program`` itself when it is one, else compiled from it (or from the
    ONNX model it names, with ``tile``). Returns (program, whether it was compiled)."""
    from streamc.runtime.cache import ProgramCache

    if isinstance(program, (str, Path)):
        path = Path(program)
        if path.is_file() or path.suffix == ".onnx":
            if tile is None:
                raise InputError(f"{path} is a model: give the tile to compile it with (--tile).")
            cache = ProgramCache(path, tile, cache_dir)
            return cache.get(size, mode), cache.stats.compiled > 0
        program = load(path)
    meta = program.meta
    fits = meta.mode == mode or (mode == "inference" and meta.mode == "train")
    if tuple(meta.image_size) == tuple(size) and fits and tile is None:
        return program, False
    cache = ProgramCache(program_model(program), tile or meta.requested_tile, cache_dir)
    try:
        return cache.get(size, mode), cache.stats.compiled > 0
    except StreamcError as exc:
        compiled = "x".join(map(str, meta.image_size))
        wanted = "x".join(map(str, size))
        raise InputError(
            f"this program was compiled for {compiled} images and its model cannot be compiled "
            f"for {wanted} ({exc}); compile the model, exported with dynamic spatial axes, for "
            "this size.") from None


def _features_program(program: Program, tile: int | str | None) -> Program:
    """``program`` compiled for inference with the head's reductions in the head, so that the
    map they reduce is a whole buffer (:func:`~streamc.compiler.compile`, ``reduce_final``)."""
    from streamc.compiler import compile as compile_program

    meta = program.meta
    return compile_program(program_model(program), tile or meta.requested_tile,
                           image=tuple(meta.image_size), with_flops=False, mode="inference",
                           reduce_final=False)


def _interpreter(program: Program, threads: int | None, progress: bool | None
                 ) -> tuple[Interpreter, WeightSet]:
    backend = NumpyBackend(program, RuntimeOptions(policy=DEFAULT_POLICY, threads=threads))
    values = {}
    for spec in program.meta.parameters:
        value = program.parameters.get(spec.name)
        values[spec.name] = (np.zeros(spec.shape, np.float32) if value is None
                             else np.ascontiguousarray(value, dtype=np.float32))
    return Interpreter(program, backend, progress), WeightSet(values)


def _check(program: Program, image: ImageSource) -> None:
    if image.shape[0] != 1:
        raise InputError(f"{describe(image)} is a batch of {image.shape[0]} images: write one "
                         "image's map at a time.")
    check_image(program, image.shape, np.float32, True)


def predict(program: ProgramLike, image: ImageSource, out: str | Path, *,
            tensor: str | None = None, features: bool = False, force: bool = False,
            tile: int | str | None = None, cache_dir: str | Path | None = None,
            threads: int | None = None, progress: bool | None = None,
            compression: str | None = None, preview: bool = True) -> MapResult:
    """Write the output map of a fully local network (or, with ``features``, the prefix's
    cut tensor; or the grid buffer named ``tensor``) on ``image`` to ``out`` (``.tif``,
    ``.zarr`` or ``.npy``, ``(H, W, C)`` float32), tile by tile."""
    started = time.perf_counter()
    size = tuple(int(d) for d in image.shape[2:])
    program, compiled = program_for(program, size, "inference", tile=tile, cache_dir=cache_dir)
    _check(program, image)
    meta = program.meta
    grid = {b.name: b for b in meta.buffers if b.kind == "grid"}
    local = fully_local_outputs(program)
    if tensor is not None:
        if tensor in local:
            tensor = local[tensor]
        if tensor not in grid:
            raise InputError(f"{tensor!r} is not a map this program computes; choose one of "
                             f"{', '.join(sorted(set(local) | set(grid)))}.")
    elif features:
        cuts = [n for n in meta.head.inputs if n in grid]
        if not cuts:
            # The head reduces the feature map tile by tile (a global pool): compile the
            # model again with the head reading the map whole.
            program = _features_program(program, tile)
            meta = program.meta
            grid = {b.name: b for b in meta.buffers if b.kind == "grid"}
            cuts = [n for n in meta.head.inputs if n in grid]
        if not cuts:
            raise InputError("this program's head reads no grid tensor: there is no feature map "
                             "to write.")
        tensor = cuts[0]
    elif len(local) == len(meta.outputs):
        tensor = local[meta.outputs[0]]
    else:
        ops = sorted({n.op_type for n in program.graph(meta.head.forward).graph.node})
        raise InputError(
            f"the model is not fully local: its head ({', '.join(ops)}) needs the whole cut "
            f"tensor, so its output cannot be written tile by tile; pass --features "
            f"(features=True) to write the prefix's feature map {meta.head.inputs[0]!r}.")
    interpreter, weights = _interpreter(program, threads, progress)
    writer = MapWriter(out, grid[tensor].shape, force=force, compression=compression,
                       preview="last" if preview else None)
    try:
        interpreter.prefix_forward(image, weights, outputs={tensor: writer}, keep=False)
        written = writer.finish(progress)
    except BaseException:
        writer.discard()
        raise
    return MapResult(written, program, compiled, tensor, len(meta.tiles),
                     time.perf_counter() - started)


def output_cotangent(output: np.ndarray, target: int | None, label: int | None
                     ) -> tuple[np.ndarray, int, float]:
    """The cotangent of a model output for a saliency map: one class's score (``target``,
    default the top class; a map's score is its sum over positions) or the cross-entropy loss
    of ``label`` (classification outputs). Returns (cotangent, class, score or loss)."""
    output = np.asarray(output, dtype=np.float64)
    classes = output.shape[1] if output.ndim >= 2 else 0
    if output.ndim < 2 or output.shape[0] != 1:
        raise InputError(f"saliency needs an output of shape (1, classes, ...), not "
                         f"{list(output.shape)}.")
    for name, value in (("class", target), ("label", label)):
        if value is not None and not 0 <= value < classes:
            raise InputError(f"{name} {value} does not exist: the output has {classes} classes "
                             f"(0..{classes - 1}).")
    cotangent = np.zeros(output.shape, np.float32)
    if label is not None:
        if output.ndim != 2:
            raise InputError("a label gives the loss of a classification output; for a map, "
                             "choose a class (--class).")
        logits = output[0]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        cotangent[0] = p
        cotangent[0, label] -= 1.0
        return cotangent, int(label), float(-np.log(max(p[label], 1e-300)))
    scores = output.reshape(1, classes, -1).sum(axis=2)[0]
    k = int(np.argmax(scores)) if target is None else int(target)
    cotangent[:, k] = 1.0
    return cotangent, k, float(scores[k])


def saliency(program: ProgramLike, image: ImageSource, out: str | Path, *,
             target: int | None = None, label: int | None = None, force: bool = False,
             tile: int | str | None = None, cache_dir: str | Path | None = None,
             threads: int | None = None, progress: bool | None = None,
             compression: str | None = None, preview: bool = True) -> MapResult:
    """Write the gradient of one class score (``target``, default the top class) or of the
    cross-entropy loss of ``label`` with respect to ``image`` to ``out``, ``(H, W, C)``
    float32, tile by tile (see the module docstring)."""
    if target is not None and label is not None:
        raise InputError("give a class or a label, not both.")
    started = time.perf_counter()
    size = tuple(int(d) for d in image.shape[2:])
    program, compiled = program_for(program, size, "saliency", tile=tile, cache_dir=cache_dir)
    _check(program, image)
    interpreter, weights = _interpreter(program, threads, progress)
    writer = MapWriter(out, image.shape, force=force, compression=compression,
                       preview="absmax" if preview else None)
    try:
        cuts, state = interpreter.prefix_forward(image, weights)
        outputs = interpreter.head_forward(cuts, weights)
        cotangent, k, score = output_cotangent(outputs[0], target, label)
        grads = [cotangent] + [None] * (len(outputs) - 1)
        cut_grads, _ = interpreter.head_backward(cuts, weights, grads)
        interpreter.prefix_backward(state, weights, cut_grads, image_grad=writer)
        written = writer.finish(progress)
    except BaseException:
        writer.discard()
        raise
    objective = (f"the cross-entropy loss of label {k}" if label is not None
                 else f"the score of class {k}")
    return MapResult(written, program, compiled, None, len(program.meta.tiles),
                     time.perf_counter() - started, k, score, objective)


__all__ = ["MapResult", "fully_local_outputs", "output_cotangent", "predict", "program_for",
           "program_model", "saliency"]
