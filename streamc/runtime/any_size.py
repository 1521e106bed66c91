"""One torch module for images of every size: :class:`AnySizeModel`.

A :class:`~streamc.runtime.module.StreamingModel` runs one program, compiled for one image
size. :class:`AnySizeModel` is a StreamingModel whose program follows the image: on each call
it takes the program for the image's size and the kind of call from a
:class:`~streamc.runtime.cache.ProgramCache` (compiled on first sight, then reused), while the
parameters, the optimizer and everything torch sees stay the same. Which program:

- ``"train"`` when autograd is on, the module is in ``train()`` mode and a parameter requires a
  gradient;
- ``"saliency"`` when the image is a tensor that requires a gradient (``image.grad`` is then
  the image's gradient; the weights get none);
- ``"inference"`` otherwise (``torch.no_grad()``, ``eval()``): forward graphs only, and the
  outputs carry no gradient. The program computes the same in both modes (BatchNorm is frozen),
  so ``eval()`` only chooses the cheaper program.

A batch of images of different sizes (a list, as :func:`~streamc.data.dataset.collate_slides`
gives) runs image by image and the outputs are joined along the batch axis.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import onnx
import torch

from streamc.compiler import GridEnd, ProgramMode
from streamc.errors import InputError
from streamc.runtime.cache import ProgramCache
from streamc.runtime.module import StreamingModel, _Runtime


class AnySizeModel(StreamingModel):
    """A :class:`StreamingModel` for images of any size (see the module docstring).

    ``model``: an ONNX file or ModelProto with dynamic spatial axes; ``tile``: the largest tile;
    ``cache_dir``: where compiled programs persist (None: memory only); or ``cache``: a
    :class:`ProgramCache` to share. ``template_size``: the size whose program supplies the
    initial parameters (default: one tile; pass a size the data has to save a compile).
    ``keep_runtimes``: sizes whose ONNX Runtime sessions stay built. ``grid_end``: as
    :func:`streamc.compile`, for every size's program (``"auto"`` chooses per size, so
    :meth:`stream` may end at different tensors for different sizes; None keeps them alike).
    Other keyword arguments are :class:`StreamingModel`'s (``device``, ``weights``,
    ``threads``, ``allocator``...).
    """

    def __init__(self, model: str | Path | onnx.ModelProto | None = None,
                 tile: int | str | tuple[int, ...] | None = None,
                 cache_dir: str | Path | None = None, *, cache: ProgramCache | None = None,
                 template_size: tuple[int, ...] | None = None, keep_runtimes: int = 2,
                 input: str | None = None, grid_end: GridEnd = "auto",
                 **options: Any) -> None:
        if cache is None:
            if model is None or tile is None:
                raise InputError("AnySizeModel needs a model and a tile (or a ProgramCache).")
            cache = ProgramCache(model, tile, cache_dir, input=input, grid_end=grid_end)
        size = template_size or _tile_size(cache)
        super().__init__(cache.get(tuple(size), "inference"), **options)
        self.cache = cache
        self.keep_runtimes = max(1, int(keep_runtimes))
        self._runtimes: OrderedDict[tuple, _Runtime] = OrderedDict()

    # -- choosing the program ----------------------------------------------------------------------
    def mode_for(self, image: Any) -> ProgramMode:
        """The kind of program a call on ``image`` runs (module docstring)."""
        if not torch.is_grad_enabled():
            return "inference"
        if isinstance(image, torch.Tensor) and image.requires_grad:
            return "saliency"
        if self.training and any(p.requires_grad for p in self.parameters()):
            return "train"
        return "inference"

    def _select(self, image: Any) -> None:
        shape = getattr(image, "shape", None)
        if shape is None or len(shape) < 3:
            raise InputError("the image must be a tensor, an array or an image source of shape "
                             f"(N, C, *size), not {type(image).__name__}.")
        size = tuple(int(d) for d in shape[2:])
        program = self.cache.get(size, self.mode_for(image))
        if program is self.program:
            return
        key = (size, program.meta.mode)
        runtime = self._runtimes.pop(key, None)
        if runtime is None or runtime.program is not program:
            runtime = _Runtime(program, self._runtime.options, self._runtime.progress)
        current = self._runtime
        runtime.interpreter(self.device)
        runtime.weights = current.weights  # one weight snapshot for every size
        self._runtimes[key] = runtime
        while len(self._runtimes) > self.keep_runtimes:
            self._runtimes.popitem(last=False)  # its sessions go with it
        self.program = program
        self._runtime = runtime

    def _begin(self, image: Any):
        self._select(image)
        return super()._begin(image)

    # -- running -----------------------------------------------------------------------------------
    def forward(self, image: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The model's outputs; ``image`` may also be a list of images of different sizes."""
        if isinstance(image, (list, tuple)):
            return _joined([super(AnySizeModel, self).forward(x) for x in _items(image)])
        return super().forward(image)

    def stream(self, image: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Prefix only (see :meth:`StreamingModel.stream`); one image size per call."""
        return super().stream(image)

    @property
    def programs(self) -> str:
        """How many programs the image sizes seen so far produced, in one line."""
        return self.cache.stats.summary()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.programs}"


def _tile_size(cache: ProgramCache) -> tuple[int, ...]:
    from streamc.graph.prepare import choose_image_input

    tile = cache.tile
    name = choose_image_input(cache.model, cache.input)
    rank = next(len(i.type.tensor_type.shape.dim) for i in cache.model.graph.input
                if i.name == name)
    if isinstance(tile, (tuple, list)):
        return tuple(int(t) for t in tile)
    return (int(tile),) * (rank - 2)


def _items(images: Any) -> list[Any]:
    if not images:
        raise InputError("an empty list of images.")
    return list(images)


def _joined(outputs: list[Any]) -> Any:
    if isinstance(outputs[0], tuple):
        return tuple(torch.cat([o[k] for o in outputs]) for k in range(len(outputs[0])))
    return torch.cat(outputs)


__all__ = ["AnySizeModel"]
