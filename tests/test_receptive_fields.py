"""Receptive fields against the perturbation oracle (docs/architecture.md, region transfer).

Position ``j`` of a tensor with stride ``S``, field ``r`` and offset ``P`` reads image pixels
``[j·S − P, j·S − P + r)`` per axis; equivalently pixel ``x`` can only affect positions ``j`` with
``j·S − P ≤ x < j·S − P + r``. The oracle needs no trust in these formulas: perturb input pixels
and see which values change.

Two oracles are used:

- :func:`zoo.perturbation_field` (ONNX Runtime, float32) for *containment*: the positions
  that one perturbed pixel changes lie inside the predicted field.
- A float64 torch oracle (:class:`Probe`) for *tightness*: the edge pixel of a deep network's
  field changes a position by a product of one weight per layer, far below float32 resolution
  but plain in float64. It runs the torch module, in float64, up to the tensor that ONNX calls
  ``name`` (found by matching values), on a batch of perturbed images at once.

``Analysis.regions_for`` is checked per position ``j`` of a cut tensor: perturbing every pixel
outside the predicted image box leaves ``j`` unchanged (float64 forward), and the pixels where
the float64 gradient of ``j`` is non-zero (exact zeros mark pixels it cannot depend on) span the
whole box: the box is exactly the bounding box of what ``j`` depends on. That tightness holds
for the zoo and for dense random chains; across branches of different shapes (a k×1 and a 1×k
branch) and dilated taps clipped at the border, region transfer is conservative by design
(bounding-box unions), and only containment is asserted.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import streamc
import zoo
from streamc.analysis import Analysis
from streamc.export import export_torch
from tests import randnet

# Changes below this (relative to 1 + max |value|) are float64 noise; a genuine dependency
# through ten layers of small random weights is still many orders of magnitude larger.
TOL64 = 1e-10


# --------------------------------------------------------------------------------------------
# The float64 torch oracle
# --------------------------------------------------------------------------------------------


def _tensors(module: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every intermediate tensor of a forward pass, in a fixed order (the same on every run):
    each layer value for a :class:`randnet.RandNet`, else every submodule's input and output
    (forward hooks), then the module's outputs."""
    if isinstance(module, randnet.RandNet):
        values = module.features(x)
        y = module(x)
        return values + (list(y) if isinstance(y, tuple) else [y])
    record: list[torch.Tensor] = []

    def pre(_m, args):
        if args and isinstance(args[0], torch.Tensor):
            record.append(args[0])

    def post(_m, _args, out):
        if isinstance(out, torch.Tensor):
            record.append(out)

    handles = []
    for sub in module.modules():
        handles.append(sub.register_forward_pre_hook(pre))
        handles.append(sub.register_forward_hook(post))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = module(x)
    finally:
        for h in handles:
            h.remove()
    return record + (list(y) if isinstance(y, tuple) else [y])


class Probe:
    """The value of ONNX tensor ``name`` computed by ``module`` in float64, for a batch."""

    def __init__(self, module: torch.nn.Module, onnx_model, name: str,
                 image_shape: Sequence[int]) -> None:
        x = zoo.random_image(image_shape, seed=7)
        expected = zoo.run_onnx(zoo.expose_tensor(onnx_model, name), {"image": x})[name]
        with torch.no_grad():
            values = _tensors(module, torch.from_numpy(x))
        scale = 1e-4 * (1 + float(np.abs(expected).max()))
        matches = [
            i for i, v in enumerate(values)
            if tuple(v.shape) == expected.shape
            and float(np.abs(v.numpy() - expected).max()) <= scale
        ]
        assert matches, f"no torch tensor matches ONNX tensor {name!r}"
        self.index = matches[0]
        self.module = copy.deepcopy(module).double().eval()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            values = _tensors(self.module, torch.from_numpy(np.asarray(images, np.float64)))
        return values[self.index].numpy()

    def support(self, images: np.ndarray, positions: Sequence[Sequence[int]]) -> np.ndarray:
        """Per image ``k``: pixels where the gradient of position ``positions[k]`` (a random
        mix of its channels) is non-zero. Exact zeros mark pixels it cannot depend on."""
        x = torch.from_numpy(np.asarray(images, np.float64)).requires_grad_(True)
        y = _tensors(self.module, x)[self.index]
        weights = torch.from_numpy(np.random.default_rng(3).uniform(0.5, 1.5, y.shape[1]))
        picked = torch.stack([y[(k, slice(None), *p)] for k, p in enumerate(positions)])
        (picked * weights).sum().backward()
        return (x.grad.abs() > 0).any(dim=1).numpy()


def _bases(image_shape: Sequence[int], count: int = 2) -> np.ndarray:
    rng = np.random.default_rng(11)
    return rng.standard_normal((count, *image_shape[1:]))


def changed_by_pixels(probe: Probe, image_shape: Sequence[int],
                      pixels: Sequence[Sequence[int]],
                      deltas: Sequence[float] = (3.0, -3.0, 0.5)) -> list[np.ndarray]:
    """Per pixel, a boolean mask over the tensor's grid: the positions that perturbing that
    pixel changes (OR over two random images and three perturbations)."""
    bases = _bases(image_shape)
    perturbed = []
    for pixel, base, delta in itertools.product(pixels, bases, deltas):
        xp = base.copy()
        xp[(slice(None), *pixel)] += delta
        perturbed.append(xp)
    y0 = probe(bases)
    y1 = probe(np.stack(perturbed)).reshape(len(pixels), len(bases), len(deltas), *y0.shape[1:])
    tol = TOL64 * (1 + np.abs(y0).max())
    diff = np.abs(y1 - y0[None, :, None])
    return list((diff > tol).any(axis=(1, 2, 3)))


def predicted_by_pixel(analysis: Analysis, tensor: str, pixel: Sequence[int]) -> np.ndarray:
    """Closed form: positions j with j·S − P ≤ x < j·S − P + r on every axis."""
    info = analysis.tensors[tensor]
    extent = analysis.extent(tensor)
    masks = []
    for axis, n in enumerate(extent):
        j = np.arange(n)
        start = j * float(info.stride[axis]) - info.offset[axis]
        x = pixel[axis]
        masks.append((start <= x) & (x < start + info.receptive_field[axis]))
    out = masks[0]
    for m in masks[1:]:
        out = np.logical_and.outer(out, m)
    return out


def _bounding_box(mask: np.ndarray) -> tuple[tuple[int, int], ...] | None:
    where = np.argwhere(mask)
    if not len(where):
        return None
    return tuple((int(lo), int(hi) + 1) for lo, hi in zip(where.min(0), where.max(0)))


def check_regions(probe: Probe, analysis: Analysis, tensor: str,
                  positions: Sequence[Sequence[int]], trials: int = 2, tight: bool = True
                  ) -> None:
    """``regions_for`` of each single position holds everything it depends on: perturbing
    every pixel outside the box leaves it unchanged (float64 forward). With ``tight``, the box
    is also exactly the bounding box of what it depends on: the pixels where its gradient is
    non-zero (OR over random images) span the whole box.

    Tightness needs a network without holes in its fields: a dilated tap that falls in the
    padding is clipped away, and the box then ends at a pixel the dilation skips."""
    boxes = [analysis.regions_for({tensor: tuple((p, p + 1) for p in position)}).get(
        analysis.input_name) for position in positions]
    bases = _bases(analysis.image_shape, trials)
    rng = np.random.default_rng(5)
    outside, outside_at, grad_images, grad_at = [], [], [], []
    for position, box in zip(positions, boxes):
        inside = np.zeros(analysis.image_size, dtype=bool)
        if box is not None:
            inside[tuple(slice(a, b) for a, b in box)] = True
        for base in bases:
            outside.append(base + 10 * rng.standard_normal(base.shape) * ~inside)
            outside_at.append(position)
            grad_images.append(base)
            grad_at.append(position)
    y0 = probe(bases)
    y1 = probe(np.stack(outside))
    tol = TOL64 * (1 + np.abs(y0).max())
    for k, position in enumerate(outside_at):
        at = (slice(None), *position)
        change = float(np.abs(y1[k][at] - y0[k % trials][at]).max())
        assert change <= tol, f"{tensor} {tuple(position)}: a pixel outside {boxes[k // trials]}"
    support = probe.support(np.stack(grad_images), grad_at)
    for i, (position, box) in enumerate(zip(positions, boxes)):
        seen = _bounding_box(support[i * trials:(i + 1) * trials].any(axis=0))
        if tight:
            assert seen == box, (tensor, tuple(position), seen, box)
        else:
            assert seen is None or all(
                a <= lo and hi <= b for (lo, hi), (a, b) in zip(seen, box)
            ), (tensor, tuple(position), seen, box)


def _pixels(size: Sequence[int]) -> list[tuple[int, ...]]:
    """Centre, near a corner, near the opposite corner, and an off-centre pixel."""
    return [
        tuple(n // 2 for n in size),
        tuple(min(1, n - 1) for n in size),
        tuple(max(n - 2, 0) for n in size),
        tuple(min(n // 3 + 1, n - 1) for n in size),
    ]


def _positions(extent: Sequence[int]) -> list[tuple[int, ...]]:
    """Positions of a cut tensor to test: corners, centre, an edge midpoint."""
    corners = {tuple(c) for c in itertools.product(*[(0, n - 1) for n in extent])}
    centre = tuple(n // 2 for n in extent)
    edge = tuple([extent[0] // 3] + [0] * (len(extent) - 1))
    return sorted(corners | {centre, edge})


# --------------------------------------------------------------------------------------------
# Zoo models
# --------------------------------------------------------------------------------------------


def _zoo_cut_cases() -> list[tuple[str, int]]:
    cases = []
    for name in zoo.LOCAL_NAMES:
        a = streamc.analyze(zoo.build(name).onnx_model)
        cases += [(name, k) for k in range(len(a.ends))]
    return cases


ZOO_CUTS = _zoo_cut_cases()


@pytest.mark.parametrize("name, cut_index", ZOO_CUTS)
def test_zoo_perturbation_inside_field(name: str, cut_index: int) -> None:
    """ORT oracle (the zoo helper): a perturbed pixel changes only positions inside its field,
    and it does change some (the field is not empty or misplaced)."""
    zm = zoo.build(name)
    a = streamc.analyze(zm.onnx_model)
    cut = a.ends[cut_index]
    for pixel in _pixels(zm.image_shape[2:]):
        mask = zoo.perturbation_field(zm.onnx_model, "image", cut, zm.image_shape, pixel)
        predicted = predicted_by_pixel(a, cut, pixel)
        assert mask.any(), pixel
        assert not (mask & ~predicted).any(), (pixel, np.argwhere(mask & ~predicted)[:5])


@pytest.mark.parametrize("name, cut_index", ZOO_CUTS)
def test_zoo_regions_for_is_exact(name: str, cut_index: int) -> None:
    """float64 oracle: ``regions_for`` of one position is exactly the bounding box of the
    pixels it depends on: nothing outside matters, every face matters."""
    zm = zoo.build(name)
    a = streamc.analyze(zm.onnx_model)
    cut = a.ends[cut_index]
    probe = Probe(zm.module, zm.onnx_model, cut, zm.image_shape)
    check_regions(probe, a, cut, _positions(a.extent(cut)))


@pytest.mark.parametrize("name, cut_index", ZOO_CUTS)
def test_zoo_field_float64(name: str, cut_index: int) -> None:
    """float64 oracle, per pixel: containment, and the changed set reaches the edge of the
    predicted field (its bounding box equals that of the prediction) for interior pixels."""
    zm = zoo.build(name)
    a = streamc.analyze(zm.onnx_model)
    cut = a.ends[cut_index]
    probe = Probe(zm.module, zm.onnx_model, cut, zm.image_shape)
    pixels = _pixels(zm.image_shape[2:])
    for pixel, mask in zip(pixels, changed_by_pixels(probe, zm.image_shape, pixels)):
        predicted = predicted_by_pixel(a, cut, pixel)
        assert not (mask & ~predicted).any(), (pixel, np.argwhere(mask & ~predicted)[:5])
        assert mask.any()


def test_vgg_closed_form() -> None:
    """vgg by hand: r = 1 + 2 + 2 + 1 + 4 + 4 + 2 + 8 = 24, P = 10, S = 4 (see test_zoo)."""
    a = streamc.analyze(zoo.build("vgg").onnx_model)
    info = a.tensors[a.ends[0]]
    assert (info.stride, info.receptive_field, info.offset) == ((4, 4), (24, 24), (10, 10))
    box = a.regions_for({a.ends[0]: ((5, 6), (0, 1))})["image"]
    assert box == ((10, 34), (0, 14))  # [4·5 − 10, 4·5 + 14) and clipped [−10, 14)


def test_unet_field_covers_both_phases() -> None:
    """After pool 2 and upsample 2, even and odd output positions read windows shifted by one
    pixel; the closed form must cover both (r = 15, not the 14 of either phase)."""
    a = streamc.analyze(zoo.build("unet").onnx_model)
    info = a.tensors["logits"]
    assert info.stride == (1, 1)
    for j in (10, 11, 12, 13):
        box = a.regions_for({"logits": ((j, j + 1), (j, j + 1))})["image"]
        lo, hi = box[0]
        assert hi - lo == 14
        assert j - info.offset[0] <= lo and hi <= j - info.offset[0] + info.receptive_field[0]
    assert info.receptive_field == (15, 15)


# --------------------------------------------------------------------------------------------
# Random networks
# --------------------------------------------------------------------------------------------

RANDOM_SETTINGS = settings(
    max_examples=10, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _random_net(data, dims: int, dense: bool) -> randnet.RandomNet:
    src = randnet.HypothesisSource(data.draw)
    # Dense nets are chains: the tightness they check does not hold across branches of
    # different shapes (the bounding-box union of a k×1 and a 1×k branch is conservative).
    net = randnet.random_net(src, dims=dims, dense=dense, max_blocks=5 if dims == 2 else 3,
                             chain=dense)
    note(net.spec.describe())
    return net


def _check_random_net(net: randnet.RandomNet, dense: bool) -> None:
    size = net.image_shape[2:]
    a = streamc.analyze(net.onnx_model, image=size)  # (why image=: see test_exactness.py)
    for cut in a.ends:
        probe = Probe(net.module, net.onnx_model, cut, net.image_shape)
        pixels = _pixels(size)[:3]
        for pixel, mask in zip(pixels, changed_by_pixels(probe, net.image_shape, pixels)):
            predicted = predicted_by_pixel(a, cut, pixel)
            assert not (mask & ~predicted).any(), (cut, pixel, np.argwhere(mask & ~predicted)[:5])
            if dense:
                # The changed set is exactly the set of positions whose region
                # (``regions_for``) holds the pixel. Positions outside the closed form cannot
                # hold it: regions lie inside the closed form.
                expected = np.zeros_like(mask)
                for j in map(tuple, np.argwhere(predicted)):
                    box = a.regions_for({cut: tuple((p, p + 1) for p in j)}).get(a.input_name)
                    expected[j] = box is not None and all(
                        lo <= x < hi for x, (lo, hi) in zip(pixel, box))
                assert np.array_equal(mask, expected), (cut, pixel)
        check_regions(probe, a, cut, _positions(a.extent(cut)), tight=dense)


@RANDOM_SETTINGS
@given(st.data())
def test_random_nets_2d(data) -> None:
    _check_random_net(_random_net(data, 2, dense=False), dense=False)


@RANDOM_SETTINGS
@given(st.data())
def test_random_dense_nets_fill_the_field(data) -> None:
    _check_random_net(_random_net(data, 2, dense=True), dense=True)


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_random_nets_3d(data) -> None:
    _check_random_net(_random_net(data, 3, dense=data.draw(st.booleans())), dense=False)


def test_dense_field_is_tight_in_the_interior() -> None:
    """A fixed dense net: for an interior pixel the changed set is exactly the closed-form
    field (it reaches every edge of it)."""
    spec = randnet.NetSpec(2)
    spec.layers = [
        randnet.Layer("input", (), {}, 2, (40, 40)),
        randnet.Layer("conv", (0,), {"kernel": [3, 5], "stride": [1, 2], "dilation": [1, 1],
                                     "padding": [1, 2], "groups": 1, "bias": True}, 3, (40, 20)),
        randnet.Layer("act", (1,), {"fn": "tanh"}, 3, (40, 20)),
        randnet.Layer("pool", (2,), {"type": "avg", "kernel": [2, 3], "stride": [2, 2],
                                     "padding": [0, 1], "dilation": [1, 1], "ceil_mode": False,
                                     "count_include_pad": False}, 3, (20, 10)),
        randnet.Layer("conv", (3,), {"kernel": [4, 3], "stride": [1, 1], "dilation": [1, 1],
                                     "padding": [2, 1], "groups": 3, "bias": False}, 3, (21, 10)),
    ]
    spec.cuts = [4]
    spec.head = "map"
    module = randnet.build_module(spec)
    model = export_torch(module, spec.image_shape, dynamic=False)
    a = streamc.analyze(model)
    cut = a.ends[0]
    info = a.tensors[cut]
    # By hand: S = (2, 4); r = 1 + 2 + 1·1 + 3·2 = 10 rows, 1 + 4 + 2·2 + 2·4 = 17 columns;
    # P = 1 + 0 + 2·2 = 5 rows, 2 + 1·2 + 1·4 = 8 columns.
    assert info.stride == (2, 4)
    assert info.receptive_field == (10, 17) and info.offset == (5, 8)
    probe = Probe(module, model, cut, spec.image_shape)
    pixels = [(20, 20), (17, 23), (22, 18)]
    for pixel, mask in zip(pixels, changed_by_pixels(probe, spec.image_shape, pixels)):
        assert np.array_equal(mask, predicted_by_pixel(a, cut, pixel)), pixel
