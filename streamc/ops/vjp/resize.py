"""VJP rules of Resize and Upsample (nearest and linear, any separable map)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from streamc.errors import UnsupportedModelError
from streamc.ops.attrs import attribute
from streamc.ops.geometry import is_block_upsampling, resize_matrix
from streamc.ops.vjp.common import input_at
from streamc.ops.vjp.table import vjp


def _resize_grad(ctx, node, dy: str, scales: Sequence[float] | None, mode: str, transform: str,
                 rounding: str) -> str:
    x, y = node.input[0], node.output[0]
    in_shape, out_shape = ctx.shape(x), ctx.shape(y)
    rank = len(in_shape)
    if mode not in ("nearest", "linear"):
        raise UnsupportedModelError(
            f"{node.op_type} node {node.name!r} uses mode {mode!r}; streamc differentiates "
            "nearest and linear resizing only."
        )
    block_axes, matrices = {}, {}
    for a in range(rank):
        n_in, n_out = in_shape[a], out_shape[a]
        scale = scales[a] if scales is not None else n_out / n_in
        matrix = resize_matrix(mode, transform, rounding, n_in, n_out, scale)
        if n_in == n_out and np.array_equal(matrix, np.eye(n_in)):
            continue
        factor = n_out // n_in
        if mode == "nearest" and is_block_upsampling(matrix, factor):
            block_axes[a] = factor
        else:
            matrices[a] = matrix
    if block_axes:  # nearest by an integer factor: sum the f×f... blocks
        split_shape, summed = [], []
        for a in range(rank):
            if a in block_axes:
                split_shape += [in_shape[a], block_axes[a]]
                summed.append(len(split_shape) - 1)
            else:
                split_shape.append(out_shape[a])
        dy = ctx.reduce_sum(ctx.reshape(dy, split_shape), summed, keepdims=False)
    for a, matrix in matrices.items():  # any other separable map: a MatMul along the axis
        perm = [*range(a), *range(a + 1, rank), a]
        moved = dy if a == rank - 1 else ctx.op("Transpose", dy, perm=perm)
        moved = ctx.op("MatMul", moved, ctx.const(matrix, like=x))
        dy = moved if a == rank - 1 else ctx.op("Transpose", moved,
                                                perm=[int(i) for i in np.argsort(perm)])
    return dy


@vjp("Resize")
def resize(ctx, node, dys):
    x = node.input[0]
    if attribute(node, "antialias", 0) or attribute(node, "keep_aspect_ratio_policy",
                                                    "stretch") != "stretch":
        raise UnsupportedModelError(
            f"Resize node {node.name!r} uses antialias or keep_aspect_ratio_policy; streamc does "
            "not differentiate them."
        )
    scales = ctx.value(input_at(node, 2))
    scales = [float(s) for s in scales] if scales is not None and scales.size else None
    axes = attribute(node, "axes")
    if scales is not None and axes is not None:
        full = [1.0] * ctx.rank(x)
        for axis, s in zip(axes, scales, strict=False):
            full[axis % ctx.rank(x)] = s
        scales = full
    transform = attribute(node, "coordinate_transformation_mode", "half_pixel")
    if transform == "tf_crop_and_resize":
        raise UnsupportedModelError(
            f"Resize node {node.name!r} uses tf_crop_and_resize; streamc cannot differentiate it."
        )
    dx = _resize_grad(ctx, node, dys[0], scales, attribute(node, "mode", "nearest"), transform,
                      attribute(node, "nearest_mode", "round_prefer_floor"))
    return [dx, None, None, None]


@vjp("Upsample")
def upsample(ctx, node, dys):
    scales = attribute(node, "scales")
    if scales is None:
        scales = ctx.require_value(node.input[1], "scales").tolist()
    mode = attribute(node, "mode", "nearest")
    dx = _resize_grad(ctx, node, dys[0], [float(s) for s in scales],
                      "linear" if mode in ("linear", "bilinear") else mode, "asymmetric", "floor")
    return [dx, None]
