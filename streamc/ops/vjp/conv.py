"""VJP rules of Conv and ConvTranspose: the input gradient as a Conv or ConvTranspose, the weight
gradient as Gemms over an im2col matrix built from contiguous slices."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from streamc.errors import UnsupportedModelError
from streamc.ops.attrs import attribute
from streamc.ops.geometry import NodeWindow, Window, node_windows
from streamc.ops.vjp.common import input_at, spatial
from streamc.ops.vjp.table import vjp

INT64_MIN = -(2**63)


def node_window(node: onnx.NodeProto, kernel: Sequence[int], in_size: Sequence[int],
                out_size: Sequence[int]) -> NodeWindow:
    """The windows of a Conv or pooling node with its static input and output sizes."""
    return NodeWindow(node_windows(node, kernel, in_size), tuple(in_size), tuple(out_size))


def _flip_swap_weight(ctx, w: str, w_shape: Sequence[int], group: int) -> str:
    """(M, C/g, k...) -> (C, M/g, k...), spatially flipped: the weights of dX = Conv(dY, ·)."""
    m, cg, *kernel = w_shape
    rank = len(kernel)
    if group == 1:
        swapped = ctx.op("Transpose", w, perm=[1, 0, *range(2, rank + 2)])
    else:
        grouped = ctx.reshape(w, [group, m // group, cg, *kernel])
        grouped = ctx.op("Transpose", grouped, perm=[0, 2, 1, *range(3, rank + 3)])
        swapped = ctx.reshape(grouped, [group * cg, m // group, *kernel])
    axes = [2 + a for a in range(rank) if kernel[a] > 1]
    if not axes:
        return swapped
    return ctx.op("Slice", swapped, ctx.ints([-1] * len(axes)), ctx.ints([INT64_MIN] * len(axes)),
                  ctx.ints(axes), ctx.ints([-1] * len(axes)))


def conv_input_grad(ctx, dy: str, w: str, w_shape: Sequence[int], win: NodeWindow,
                    group: int) -> str:
    """dX of Y = Conv(X, W): a Conv with flipped weights (stride 1) or a ConvTranspose."""
    rank = win.rank
    spatial = list(range(2, rank + 2))
    if all(s == 1 for s in win.strides):
        begin = [win.span(a) - 1 - win.pads_begin[a] for a in range(rank)]
        end = [win.span(a) - 1 - win.pads_end[a] + win.trailing(a) for a in range(rank)]
        if any(b < 0 for b in begin) or any(e < 0 for e in end):
            dy = ctx.op("Slice", dy, ctx.ints([max(-b, 0) for b in begin]),
                        ctx.ints([win.out_size[a] - max(-end[a], 0) for a in range(rank)]),
                        ctx.ints(spatial))
        weights = _flip_swap_weight(ctx, w, w_shape, group)
        return ctx.op("Conv", dy, weights, dilations=list(win.dilations), group=group,
                      pads=[max(b, 0) for b in begin] + [max(e, 0) for e in end])
    pads_end, output_padding, extra = [], [], []
    for a in range(rank):
        target = win.pads_end[a] - win.trailing(a)
        if target >= 0:
            pads_end.append(target)
            output_padding.append(0)
            extra.append(0)
        else:
            pads_end.append(0)
            fits = -target < win.strides[a]
            output_padding.append(-target if fits else 0)
            extra.append(0 if fits else -target)
    dx = ctx.op("ConvTranspose", dy, w, strides=list(win.strides),
                dilations=list(win.dilations), group=group,
                pads=list(win.pads_begin) + pads_end,
                output_padding=output_padding if any(output_padding) else None)
    if any(extra):
        dx = ctx.op("Pad", dx, ctx.ints([0] * (rank + 2) + [0, 0] + extra))
    return dx


DW_CHUNK_BYTES = 16 << 20  # aim for this much im2col data per Gemm...
DW_MAX_CHUNKS = 8  # ...but split one image's rows into at most this many Gemms
DW_TAPS_PER_GEMM: int | None = None  # kernel taps stacked per Gemm (None: all of them)
DW_SHIFT_DY = True  # ungrouped convs: move last-axis taps onto dY (see _dense_weight_grad)


def _stride_phases(ctx, x: str, n: int, c: int, q: Sequence[int], win: NodeWindow) -> str:
    """X padded (or cropped) to ``q[a]·s[a]`` positions per axis and split into its stride
    phases: (N, s0, s1, ..., C, q0, q1, ...) (as (N, s·s·C, q0, q1) in 2-D)."""
    rank, s = win.rank, win.strides
    begin = list(win.pads_begin)
    end = [q[a] * s[a] - begin[a] - win.in_size[a] for a in range(rank)]
    if any(e < 0 for e in end):  # the windows stop before the end of X: crop it
        x = ctx.op("Slice", x, ctx.ints([0] * rank),
                   ctx.ints([win.in_size[a] + min(end[a], 0) for a in range(rank)]),
                   ctx.ints(range(2, rank + 2)))
    if any(begin) or any(e > 0 for e in end):
        x = ctx.op("Pad", x, ctx.ints([0, 0, *begin, 0, 0, *(max(e, 0) for e in end)]))
    if math.prod(s) > 1 and rank == 2 and s[0] == s[1]:  # (N, C, q0·s, q1·s) -> (N, s·s·C, ..)
        x = ctx.op("SpaceToDepth", x, blocksize=s[0])  # much faster than the 6-D Transpose
    elif math.prod(s) > 1:  # (N, C, q0·s0, ...) -> (N, s0, s1, ..., C, q0, q1, ...)
        split = [n, c] + [v for a in range(rank) for v in (q[a], s[a])]
        perm = [0] + [3 + 2 * a for a in range(rank)] + [1] + [2 + 2 * a for a in range(rank)]
        x = ctx.op("Transpose", ctx.reshape(x, split), perm=perm)
    return x


def conv_weight_grad(ctx, x: str, dy: str, x_shape: Sequence[int], w_shape: Sequence[int],
                     win: NodeWindow, group: int, like: str) -> str:
    """dW of Y = Conv(X, W) as Gemms over an im2col matrix built from contiguous slices.

    dW[m, c, o] = Σ_{n, j} dY[n, m, j] · Xpad[n, c, j·s + o·d]. The padded input is split once
    into its s^r stride phases (one Reshape + Transpose; nothing for stride 1), so that tap o
    reads phase (o·d mod s) at the unit-stride offset o·d // s. With every phase flattened over
    its spatial axes and dY zero-padded to the phase's row length, the view of tap o is one
    contiguous window of the flattened phase: k^r cheap Slices, one Concat, then one
    Gemm(P, dY, transB=1) per image and chunk of output rows (chunks keep P under
    ``DW_CHUNK_BYTES``). dtype of ``like`` sizes the chunks.
    """
    n, c, *_ = x_shape
    m, cg, *kernel = w_shape
    rank = win.rank
    taps = math.prod(kernel)
    s, d, out = win.strides, win.dilations, win.out_size
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(ctx.dtype(like))).itemsize
    # Phase grid: Q[a] positions per phase along axis a, plus one spare row on axis 0 so that
    # the last window of the flattened phase never runs past its end.
    reads = [(out[a] - 1) * s[a] + win.span(a) for a in range(rank)]  # padded extent read
    q = [-(-reads[a] // s[a]) for a in range(rank)]
    q[0] += 1
    x = _stride_phases(ctx, x, n, c, q, win)
    phases = math.prod(s)
    row = math.prod(q[1:])  # flattened length of one row of a phase
    x = ctx.reshape(x, [n, phases * c, q[0] * row])
    # dY zero-padded to the phase rows: (N, M, out0, q1, ...) flattened. With dY shifted
    # (_dense_weight_grad), one leading zero row lets a shift look before the first row.
    shift_dy = group == 1 and DW_SHIFT_DY and rank >= 2
    lead = 1 if shift_dy else 0
    grow = [q[a] - out[a] for a in range(1, rank)]
    if lead or any(grow):
        dy = ctx.op("Pad", dy, ctx.ints([0, 0, lead] + [0] * (rank - 1) + [0, 0, 0] + grow))
    dy_length = (out[0] + lead) * row
    dy = ctx.reshape(dy, [n, m, dy_length])
    rows = max(1, DW_CHUNK_BYTES // max(taps * c * row * itemsize, 1), -(-out[0] // DW_MAX_CHUNKS))
    rows = min(rows, out[0])
    if group > 1 and cg == 1:
        rows = out[0]  # depthwise: no im2col matrix, only one product per tap
    images = []  # (X phases of one image (phases·C, q0·row), its dY (M, dy_length))
    for image in range(n):
        if n == 1:
            images.append((ctx.reshape(x, [phases * c, q[0] * row]),
                           ctx.reshape(dy, [m, dy_length])))
            continue
        pick = (ctx.ints([image]), ctx.ints([image + 1]), ctx.ints([0]))
        images.append((ctx.reshape(ctx.op("Slice", x, *pick), [phases * c, q[0] * row]),
                       ctx.reshape(ctx.op("Slice", dy, *pick), [m, dy_length])))
    if shift_dy:
        return _dense_weight_grad(ctx, images, rows, c, m, kernel, s, d, q, out[0])
    chunks = []  # (x rows of one image, dY rows, first output row, end output row)
    for x_n, dy_n in images:
        for r0 in range(0, out[0], rows):
            r1 = min(out[0], r0 + rows)
            dy_rows = dy_n if (r0, r1) == (0, out[0]) else ctx.op(
                "Slice", dy_n, ctx.ints([r0 * row]), ctx.ints([r1 * row]), ctx.ints([1]))
            chunks.append((x_n, dy_rows, r0, r1))
    partials = []
    for x_n, dy_rows, r0, r1 in chunks:
        views = []
        for offset in itertools.product(*(range(k) for k in kernel)):
            phase, shift = 0, r0 * row
            for a in range(rank):
                phase = phase * s[a] + (offset[a] * d[a]) % s[a]
                shift += (offset[a] * d[a]) // s[a] * math.prod(q[a + 1:])
            views.append(ctx.op("Slice", x_n, ctx.ints([phase * c, shift]),
                                ctx.ints([(phase + 1) * c, shift + (r1 - r0) * row]),
                                ctx.ints([0, 1])))
        partials.append(_weight_grad_product(ctx, views, dy_rows, c, m, group, taps))
    total = partials[0] if len(partials) == 1 else ctx.op("Sum", *partials)
    return _weight_grad_layout(ctx, total, w_shape, group, taps)


def _dense_weight_grad(ctx, images, rows: int, c: int, m: int, kernel: Sequence[int],
                       s: Sequence[int], d: Sequence[int], q: Sequence[int], out0: int) -> str:
    """Weight gradient of an ungrouped conv (rank >= 2), with the last-axis taps moved onto dY.

    Tap (o', j) (j along the last axis) reads X at window start base(o') + shift(j). Instead of
    one X window per tap, take one X window per o' (and last-axis phase) and shift dY by
    shift(j): Gemm(X windows (n_o'·C, L), shifted dY (n_j·M, L), transB=1) yields every
    (o', j) pair at once, copying the big input k_last times less, with a squarer Gemm.
    A shift never moves real dY values across a row: each dY row ends with at least
    shift(j) zero columns (q_last − out_last ≥ ⌊(k−1)·d/s⌋), and dY has a leading zero row.
    """
    rank = len(kernel)
    last = rank - 1
    row = math.prod(q[1:])
    lanes: dict[int, list[int]] = {}  # last-axis phase -> kernel indices j with that phase
    for j in range(kernel[last]):
        lanes.setdefault(j * d[last] % s[last], []).append(j)
    keys = list(itertools.product(*(range(k) for k in kernel[:last])))
    per_lane = {}
    for lane, js in lanes.items():
        shifts = [j * d[last] // s[last] for j in js]
        partials = []
        for x_n, dy_n in images:
            for r0 in range(0, out0, rows):
                length = (min(out0, r0 + rows) - r0) * row
                views = []
                for key in keys:
                    phase, base = 0, r0 * row
                    for a in range(last):
                        phase = phase * s[a] + key[a] * d[a] % s[a]
                        base += key[a] * d[a] // s[a] * math.prod(q[a + 1:])
                    phase = phase * s[last] + lane
                    views.append(ctx.op("Slice", x_n, ctx.ints([phase * c, base]),
                                        ctx.ints([(phase + 1) * c, base + length]),
                                        ctx.ints([0, 1])))
                patches = views[0] if len(views) == 1 else ctx.op("Concat", *views, axis=0)
                start = row + r0 * row  # skip the leading zero row
                shifted = [ctx.op("Slice", dy_n, ctx.ints([start - sh]),
                                  ctx.ints([start - sh + length]), ctx.ints([1]))
                           for sh in shifts]
                moved = shifted[0] if len(shifted) == 1 else ctx.op("Concat", *shifted, axis=0)
                partials.append(ctx.op("Gemm", patches, moved, transB=1))  # (keys·C, js·M)
        per_lane[lane] = partials[0] if len(partials) == 1 else ctx.op("Sum", *partials)
    # Every lane's product is (keys·C, js·M): side by side they hold every tap j, in lane
    # order. What follows is one chain of layout nodes on the tile's product, which
    # passes.hoist moves out of the tile graphs (run once on the sum over tiles).
    order = [j for lane in lanes for j in lanes[lane]]
    product = per_lane[0] if len(lanes) == 1 else ctx.op("Concat", *per_lane.values(), axis=1)
    if order != sorted(order):  # taps j from lane order to kernel order, rows of M values
        product = ctx.op("Gather", ctx.reshape(product, [len(keys) * c, kernel[last], m]),
                         ctx.ints(list(np.argsort(order))), axis=1)
    joined = _m_first(ctx, product, len(keys), c, kernel[last], m)  # (M, C, keys, taps j)
    return ctx.reshape(joined, [m, c, *kernel])


def _weight_grad_product(ctx, views: list[str], dy: str, c: int, m: int, group: int,
                         taps: int) -> str:
    """Σ over positions of dY ⊗ tap views, laid out as (taps, C, M/g) (or per group)."""
    cg, mg = c // group, m // group
    if group == 1:  # (taps·C, L) · (M, L)ᵀ -> (taps·C, M), DW_TAPS_PER_GEMM taps at a time
        step = DW_TAPS_PER_GEMM or taps
        products = []
        for first in range(0, taps, step):
            batch = views[first : first + step]
            patches = batch[0] if len(batch) == 1 else ctx.op("Concat", *batch, axis=0)
            products.append(ctx.op("Gemm", patches, dy, transB=1))
        return products[0] if len(products) == 1 else ctx.op("Concat", *products, axis=0)
    length_dy = ctx.reshape(dy, [group, mg, -1])
    if cg == 1:  # depthwise: (C, 1, L) ⊙ (C, M/g, L) summed over L, per tap
        columns = [ctx.reduce_sum(ctx.op("Mul", ctx.op("Unsqueeze", v, ctx.ints([1])),
                                         length_dy), [2], keepdims=False) for v in views]
        return ctx.op("Concat", *[ctx.op("Unsqueeze", col, ctx.ints([0])) for col in columns],
                      axis=0)  # (taps, C, M/g)
    patches = ctx.op("Concat", *[ctx.reshape(v, [1, group, cg, -1]) for v in views], axis=0)
    patches = ctx.reshape(ctx.op("Transpose", patches, perm=[1, 0, 2, 3]), [group, taps * cg, -1])
    product = ctx.op("MatMul", patches, ctx.op("Transpose", length_dy, perm=[0, 2, 1]))
    return product  # (g, taps·Cg, M/g)


def _m_first(ctx, product: str, a: int, b: int, r: int, m: int) -> str:
    """A product laid out as (A, B, R, M), in W's order (M, B, A, R): the (A, B) swap moves
    whole rows of R·M values, then one 2-D Transpose puts M first. ONNX Runtime runs these two
    5-8x faster than the one Transpose with the combined permutation (a 512x512x3x3 weight:
    4.5 against 28 ms; ``python benchmarks/weight_layout.py``)."""
    rows = ctx.op("Transpose", ctx.reshape(product, [a, b, r * m]), perm=[1, 0, 2])
    flat = ctx.op("Transpose", ctx.reshape(rows, [b * a * r, m]), perm=[1, 0])
    return ctx.reshape(flat, [m, b, a, r])


def _weight_grad_layout(ctx, total: str, w_shape: Sequence[int], group: int, taps: int) -> str:
    """From the product layout of :func:`_weight_grad_product` to W's (M, C/g, k...)."""
    m, cg, *kernel = w_shape
    mg = m // group
    if group == 1:  # (taps, C, M) -> (M, C, taps)
        moved = _m_first(ctx, total, taps, cg, 1, m)
    elif cg == 1:  # (taps, C, M/g) -> (C, M/g, taps) = (M, 1, taps)
        moved = ctx.op("Transpose", total, perm=[1, 2, 0])
    else:  # (g, taps, Cg, M/g) -> (g, M/g, Cg, taps)
        moved = ctx.op("Transpose", ctx.reshape(total, [group, taps, cg, mg]), perm=[0, 3, 2, 1])
    return ctx.reshape(moved, w_shape)


@vjp("Conv", trainable=(1, 2))
def conv(ctx, node, dys):
    x, w = node.input[:2]
    dy = dys[0]
    x_shape, w_shape = ctx.shape(x), ctx.shape(w)
    group = attribute(node, "group", 1)
    win = node_window(node, w_shape[2:], x_shape[2:], spatial(ctx, node.output[0]))
    dx = conv_input_grad(ctx, dy, w, w_shape, win, group)
    dw = conv_weight_grad(ctx, x, dy, x_shape, w_shape, win, group, like=w)
    db = None
    if input_at(node, 2):
        db = ctx.reduce_sum(dy, [0, *range(2, len(x_shape))], keepdims=False)
    return [dx, dw, db]


def _conv_transpose_window(ctx, node, x_shape, w_shape) -> NodeWindow:
    """The Conv whose adjoint this ConvTranspose is: input = Y's grid, output = X's grid."""
    kernel = w_shape[2:]
    rank = len(kernel)
    y_size = spatial(ctx, node.output[0])
    strides = attribute(node, "strides") or [1] * rank
    dilations = attribute(node, "dilations") or [1] * rank
    out_pad = attribute(node, "output_padding") or [0] * rank
    auto_pad = attribute(node, "auto_pad", "NOTSET")
    if attribute(node, "output_shape") is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for a in range(rank):
            total = (strides[a] * (x_shape[2 + a] - 1) + out_pad[a]
                     + (kernel[a] - 1) * dilations[a] + 1 - y_size[a])
            half = total // 2
            begin.append(half if auto_pad == "SAME_UPPER" else total - half)
            end.append(total - begin[-1])
    elif auto_pad == "VALID":
        begin, end = [0] * rank, [0] * rank
    else:
        pads = attribute(node, "pads") or [0] * (2 * rank)
        begin, end = pads[:rank], pads[rank:]
    axes = tuple(Window(kernel[a], strides[a], dilations[a], begin[a], end[a])
                 for a in range(rank))
    return NodeWindow(axes, tuple(y_size), tuple(x_shape[2:]))


@vjp("ConvTranspose", trainable=(1, 2))
def conv_transpose(ctx, node, dys):
    """ConvTranspose(X, W) is the adjoint of Conv(·, W): dX = Conv(dY, W), dW by roles swapped."""
    x, w = node.input[:2]
    dy = dys[0]
    x_shape, w_shape = ctx.shape(x), ctx.shape(w)
    group = attribute(node, "group", 1)
    win = _conv_transpose_window(ctx, node, x_shape, w_shape)
    if any(p < 0 for p in win.pads_begin + win.pads_end):
        raise UnsupportedModelError(
            f"ConvTranspose node {node.name!r}: its output_shape implies negative padding, "
            "which streamc cannot differentiate; use explicit pads and output_padding."
        )
    # Conv over dY with the ConvTranspose's weights gives dX.
    dx = ctx.op("Conv", dy, w, strides=list(win.strides), dilations=list(win.dilations),
                group=group, pads=list(win.pads_begin + win.pads_end))
    # ⟨dY, ConvT_W(X)⟩ = ⟨Conv_W(dY), X⟩: dW is the Conv weight gradient with input dY, cot X.
    dw = conv_weight_grad(ctx, dy, x, ctx.shape(node.output[0]), w_shape, win, group, like=w)
    db = None
    if input_at(node, 2):
        db = ctx.reduce_sum(dy, [0, *range(2, len(x_shape))], keepdims=False)
    return [dx, dw, db]
