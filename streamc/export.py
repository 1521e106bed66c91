"""Export a torch module to ONNX the way streamc expects: :func:`export_torch`.

The choices, found by inspecting what torch's TorchScript exporter (``dynamo=False``, opset 17)
emits:

- ``do_constant_folding=False`` and ``training=TrainingMode.EVAL``: BatchNorm stays a
  ``BatchNormalization`` node in inference form (its scale and bias train, its running
  statistics stay frozen) and every initializer keeps its torch ``state_dict`` name. With
  folding on, torch folds eval-mode BatchNorm into the preceding Conv and renames the folded
  weights ``onnx::Conv_NN``.
- torch de-duplicates initializers with equal values into ``Identity`` nodes: a freshly
  initialised BatchNorm (weight = running_var = 1, bias = running_mean = 0) loses its names.
  Pretrained weights never look like that; give random ones distinct values before exporting.
- Without constant folding some constants come out as small subgraphs (``Resize`` scales, the
  ``pads`` of ``ZeroPad2d``); streamc folds them once the image size is fixed.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from streamc.errors import StreamcError

if TYPE_CHECKING:
    import torch

_SPATIAL = ("D", "H", "W")


def export_torch(
    module: torch.nn.Module,
    example_shape: Sequence[int],
    path: str | Path | None = None,
    *,
    dynamic: bool = True,
    dynamic_batch: bool = False,
    opset: int = 17,
    input_name: str = "image",
    output_names: Sequence[str] | None = None,
) -> onnx.ModelProto:
    """Export ``module`` (switched to eval mode, in place) on a zero image of ``example_shape``
    ``(N, C, *spatial)`` and return the ONNX model; also save it to ``path`` when given.

    ``dynamic``: the input's spatial axes are symbolic (``H``, ``W``; ``D``, ``H``, ``W`` for
    volumes), as are those of every output that is a spatial map (``<output>_H``...).
    ``dynamic_batch``: the batch axis of the input and of every output is symbolic (``N``).
    Fully static exports pin every output to the shape torch computed. Outputs are named
    ``output_names``, by default ``["logits"]`` for one output and ``out0``, ``out1``... for a
    tuple. Raises :class:`~streamc.errors.StreamcError` when the module cannot be run or exported.
    """
    import torch

    shape = tuple(int(s) for s in example_shape)
    if len(shape) < 3:
        raise StreamcError(
            f"example_shape {shape} must be (N, C, *spatial) with at least one spatial axis.")
    module.eval()
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    x = torch.zeros(shape, dtype=torch.float32, device=device)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. padding='same' with an even kernel
            y = module(x)
    except Exception as exc:
        raise StreamcError(
            f"{type(module).__name__} fails on an input of shape {list(shape)}, so it cannot be "
            f"exported: {type(exc).__name__}: {_first_line(exc)}") from exc
    outs = list(y) if isinstance(y, (tuple, list)) else [y]
    names = (["logits"] if len(outs) == 1 else [f"out{i}" for i in range(len(outs))]) \
        if output_names is None else list(output_names)
    if len(names) != len(outs):
        raise StreamcError(
            f"{type(module).__name__} returns {len(outs)} outputs but {len(names)} output names "
            "were given.")

    dynamic_axes = _dynamic_axes(len(shape), input_name, names, [o.dim() for o in outs],
                                 dynamic, dynamic_batch)
    f = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            torch.onnx.export(
                module,
                (x,),
                f,
                dynamo=False,
                opset_version=opset,
                do_constant_folding=False,
                training=torch.onnx.TrainingMode.EVAL,
                input_names=[input_name],
                output_names=names,
                dynamic_axes=dynamic_axes,
            )
    except Exception as exc:
        raise StreamcError(
            f"torch.onnx.export could not export {type(module).__name__}: "
            f"{type(exc).__name__}: {_first_line(exc)}") from exc
    model = onnx.load_model_from_string(f.getvalue())
    if dynamic_axes is None:
        # torch may name an output axis symbolically even in a static export (the batch axis
        # of a Gemm output): pin every output to the shape torch computed.
        for vi, out in zip(model.graph.output, outs):
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for size in out.shape:
                dims.add().dim_value = int(size)
    if path is not None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(model, target)
    return model


def _dynamic_axes(rank: int, input_name: str, names: Sequence[str], ranks: Sequence[int],
                  dynamic: bool, dynamic_batch: bool) -> dict[str, dict[int, str]] | None:
    """torch's ``dynamic_axes`` for an input of ``rank`` and outputs of ``ranks``: the spatial
    axes (``dynamic``) of the input and of every output that is a spatial map, the batch axis
    (``dynamic_batch``) of all; None for a fully static export."""
    if not dynamic and not dynamic_batch:
        return None
    spatial = _SPATIAL[-(rank - 2):] if dynamic else ()
    batch = {0: "N"} if dynamic_batch else {}
    axes_of = {input_name: {**batch, **{i + 2: s for i, s in enumerate(spatial)}}}
    for name, out_rank in zip(names, ranks):
        axes = dict(batch)
        if out_rank == rank:  # a spatial map: its spatial axes follow the input's
            axes.update({i + 2: f"{name}_{s}" for i, s in enumerate(spatial)})
        if axes:
            axes_of[name] = axes
    return axes_of


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


__all__ = ["export_torch"]
