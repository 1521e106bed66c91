"""Units that keep their activations from forward to backward (streamc.passes.keep): which units
keep, that their backward graphs recompute nothing, and that a training step gives exactly the
gradients of one that recomputes (and torch's)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import streamc
from streamc.errors import CompileError
from streamc.export import export_torch
from streamc.passes.keep import kept_units
from streamc.passes.memory import plan_program
from streamc.policy import RuntimePolicy
from streamc.runtime.backend import NumpyBackend
from streamc.runtime.interpreter import Interpreter
from streamc.runtime.module import StreamingModel
from streamc.runtime.options import RuntimeOptions
from streamc.runtime.weights import WeightSet
from streamc.steps import StepKind, program_steps
from streamc.tile_search import search_tiles
from tests.blocks import SENet
from zoo.models import MiniResNet


def _program(module, size: int, tile: int, halo: str = "reuse", keep_tiles: int | None = None,
             keep_stride: int | None = None):
    torch.manual_seed(0)
    module = module.eval()
    model = export_torch(module, (1, 3, size, size))
    # The whole grid (auto may end it early): these tests compare what tiles keep.
    return module, streamc.compile(model, tile, image=(size, size), halo=halo,
                                   keep_tiles=keep_tiles, keep_stride=keep_stride, grid_end=None)


def _step(program, image, keep: bool):
    model = StreamingModel(program, keep_activations=keep)
    out = model(image)
    out.float().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None}


def _assert_keeping_changes_nothing(program, torch_module, size: int) -> None:
    """The step with the kept units keeping is bitwise the all-recompute step, and the output
    is torch's."""
    image = torch.randn(1, 3, size, size)
    kept_out, kept_grads = _step(program, image, keep=True)
    out, grads = _step(program, image, keep=False)
    assert torch.equal(kept_out, out)
    assert kept_grads.keys() == grads.keys() and grads
    for name in grads:
        assert torch.equal(kept_grads[name], grads[name]), name
    assert torch.allclose(kept_out, torch_module(image), atol=1e-4)


def test_kept_units():
    # grid order: the last tile of the last stage; one tile per stage: every stage's
    assert kept_units([[0, 0], [1, 1], [2, None]], grid_order=True) == [(1, 1)]
    assert kept_units([[0, 0]], grid_order=True) == [(0, 0), (1, 0)]
    assert kept_units([[0], [1]], grid_order=False) == []
    assert kept_units([[0]], grid_order=False) == [(0, 0)]
    # a count: the last stage's tiles whose backward runs first
    grid = [[0, 0], [1, 1], [2, 2]]
    assert kept_units(grid, grid_order=True, count=2) == [(1, 1), (1, 2)]
    assert kept_units(grid, grid_order=False, count=2) == [(1, 0), (1, 1)]
    assert kept_units(grid, grid_order=True, count=5) == [(1, 0), (1, 1), (1, 2)]
    assert kept_units(grid, grid_order=True, count=0) == []
    assert kept_units([[0]], grid_order=True, count=0) == []
    with pytest.raises(ValueError):
        kept_units(grid, grid_order=True, count=-1)


@pytest.mark.parametrize("module,size,tile,halo,keep_tiles", [
    (MiniResNet, 128, 32, "reuse", None),  # 4x4 tiles: the last keeps (MaxPool's indices too)
    (MiniResNet, 96, 96, "reuse", None),   # one tile: no recompute at all
    (MiniResNet, 96, 96, "recompute", None),
    (SENet, 64, 64, "reuse", None),        # four stages of one tile each
    (SENet, 64, 32, "reuse", None),        # several tiles: the last stage's last tile
    (MiniResNet, 128, 32, "reuse", 16),    # every tile keeps: nothing recomputed
    (MiniResNet, 192, 64, "recompute", 3),  # the first three (their backward runs first)
    (SENet, 64, 32, "reuse", 3),           # three tiles of the last stage
])
def test_keeping_gives_the_same_step(module, size, tile, halo, keep_tiles):
    torch_module, program = _program(module(), size, tile, halo, keep_tiles)
    meta = program.meta
    assert meta.kept
    if keep_tiles is not None:
        assert len(meta.kept) == keep_tiles
        assert {s for s, _ in meta.kept} == {len(meta.stages) - 1}
    for stage, i in meta.kept:
        cls = meta.classes[meta.tiles[i].parts[stage].class_id]
        assert cls.residuals and cls.kept_forward and cls.kept_backward
        forward_ops = {n.output[0]: n.op_type for n in program.graph(cls.forward).graph.node}
        backward = program.graph(cls.kept_backward).graph
        recomputed = [n for n in backward.node if n.op_type in ("Conv", "MaxPool")
                      and n.output[0] in forward_ops]
        assert not recomputed, f"class {cls.id} recomputes {recomputed[0].name}"
        assert set(cls.residuals) <= {i.name for i in backward.input}
    _assert_keeping_changes_nothing(program, torch_module, size)


def test_steps_and_plan():
    _, program = _program(MiniResNet(), 128, 32)
    meta = program.meta
    (stage, tile), = meta.kept
    steps = program_steps(meta, RuntimePolicy())
    forward = [s for s in steps["prefix_forward"] if s.kind is StepKind.TILE_FORWARD]
    backward = [s for s in steps["prefix_backward"] if s.kind is StepKind.TILE_BACKWARD]
    assert forward[-1].keeps and forward[-1].tile == tile and not any(s.keeps for s in forward[:-1])
    assert backward[0].keeps and backward[0].tile == tile
    cls = meta.classes[meta.tiles[tile].parts[stage].class_id]
    assert forward[-1].graph == cls.kept_forward and backward[0].graph == cls.kept_backward
    plain = program_steps(meta, RuntimePolicy(keep_activations=False))
    assert not any(s.keeps for phase in plain.values() for s in phase)
    # the plan holds the residuals through the head
    kept_plan = plan_program(program, policy=RuntimePolicy())
    plain_plan = plan_program(program, policy=RuntimePolicy(keep_activations=False))
    assert kept_plan.phases["head forward"] > plain_plan.phases["head forward"]


def test_more_kept_tiles_trade_memory_for_recompute():
    _, default = _program(MiniResNet(), 128, 32)
    _, four = _program(MiniResNet(), 128, 32, keep_tiles=4)
    _, every = _program(MiniResNet(), 128, 32, keep_tiles=16)
    _, none = _program(MiniResNet(), 128, 32, keep_tiles=0)
    assert len(default.meta.kept) == 1 and len(four.meta.kept) == 4 and not none.meta.kept
    assert four.meta.kept[-1] == default.meta.kept[0]  # the last tile keeps in both
    backward = [p.meta.flops.tiled_backward for p in (none, default, four, every)]
    assert backward == sorted(backward, reverse=True) and len(set(backward)) == 4
    # no recompute at all: the untiled backward without its forward, plus the few per cent of
    # the input gradients that land on the strips around each tile
    flops = every.meta.flops
    assert flops.tiled_backward < 1.05 * (flops.untiled_backward - flops.untiled_forward)
    assert default.meta.flops.tiled_backward > flops.untiled_backward - flops.untiled_forward / 8
    peaks = [plan_program(p).peak for p in (none, default, four, every)]
    assert peaks == sorted(peaks) and peaks[1] < peaks[2] < peaks[3]


@pytest.mark.parametrize("module,size,tile,keep_stride,shallow", [
    (MiniResNet, 128, 32, 4, True),  # strides 1, 2, 4, 8: the two deepest kept
    (MiniResNet, 128, 32, 8, True),
    (SENet, 64, 32, 4, False),       # four stages; the last one's Conv is at stride 4
])
def test_keeping_deep_activations_gives_the_same_step(module, size, tile, keep_stride, shallow):
    torch_module, program = _program(module(), size, tile, keep_stride=keep_stride)
    meta = program.meta
    last = len(meta.stages) - 1
    tiles = [i for i, t in enumerate(meta.tiles) if t.parts[last] is not None]
    assert sorted(i for _, i in meta.kept) == tiles and {s for s, _ in meta.kept} == {last}
    analysis = streamc.analyze(export_torch(torch_module, (1, 3, size, size)), (size, size))
    stride = {t: min(info.stride) for t, info in analysis.tensors.items()}
    partial = 0
    for stage, i in meta.kept:
        cls = meta.classes[meta.tiles[i].parts[stage].class_id]
        forward_ops = {n.output[0] for n in program.graph(cls.forward).graph.node}
        convs = [n.output[0] for n in program.graph(cls.kept_backward).graph.node
                 if n.op_type == "Conv" and n.output[0] in forward_ops]
        assert all(stride[c] < keep_stride for c in convs), cls.id  # only shallow recomputed
        partial += bool(convs)
    assert bool(partial) == shallow  # tiles other than the last recompute the shallow layers
    _assert_keeping_changes_nothing(program, torch_module, size)


def test_keeping_deeper_activations_trades_less_memory_for_less_recompute():
    programs = [_program(MiniResNet(), 128, 32)[1]]
    programs += [_program(MiniResNet(), 128, 32, keep_stride=s)[1] for s in (8, 4, 2)]
    programs.append(_program(MiniResNet(), 128, 32, keep_tiles=16)[1])
    backward = [p.meta.flops.tiled_backward for p in programs]
    assert backward == sorted(backward, reverse=True) and len(set(backward)) == len(backward)
    peaks = [plan_program(p).peak for p in programs]
    # Between the partial keeps, ORT's per-node session state (more recompute, more nodes)
    # outweighs these small residuals, so only the ends are ordered.
    assert peaks[0] < min(peaks[1:-1]) and max(peaks[1:-1]) < peaks[-1]
    with pytest.raises(CompileError, match="keep_stride=0"):
        _program(MiniResNet(), 128, 32, keep_stride=0)


def test_one_tile_flops_have_no_recompute():
    _, program = _program(MiniResNet(), 96, 96)
    flops = program.meta.flops
    assert flops.tiled_forward == flops.untiled_forward
    # the untiled backward count includes one recompute of the forward; the kept unit has none
    assert flops.tiled_backward == flops.untiled_backward - flops.untiled_forward


def test_forward_without_backward_keeps_nothing():
    _, program = _program(MiniResNet(), 96, 32)
    backend = NumpyBackend(program, RuntimeOptions())
    interpreter = Interpreter(program, backend, progress=False)
    weights = WeightSet({s.name: np.asarray(program.parameters.get(s.name, np.zeros(s.shape)),
                                            np.float32) for s in program.meta.parameters})
    image = np.random.default_rng(0).standard_normal((1, 3, 96, 96)).astype(np.float32)
    cuts, state = interpreter.prefix_forward(image, weights, keep=False)
    assert not state.kept
    kept_cuts, state = interpreter.prefix_forward(image, weights)
    assert len(state.kept) == 1
    for a, b in zip(cuts, kept_cuts):
        np.testing.assert_array_equal(a, b)


def test_a_budget_that_fits_the_whole_step_gets_one_kept_tile():
    """The tile search tries the largest tile first: with room for the whole step, one tile
    that keeps its activations (no recompute at all); with less, smaller tiles."""
    torch.manual_seed(0)
    model = export_torch(MiniResNet().eval(), (1, 3, 512, 512))
    plans = {p.tile: p for p in search_tiles(model, (512, 512), tiles=[256, 512],
                                             optimizer_copies=0).plans}
    assert plans[512].tiles == 1 and plans[512].overhead < plans[256].overhead < 1.0
    assert plans[256].peak < plans[512].peak
    roomy = search_tiles(model, (512, 512), tiles=[256, 512], budget=plans[512].peak,
                         optimizer_copies=0)
    assert roomy.chosen.tile == 512 and roomy.chosen.program.meta.kept == ((0, 0),)
    tight = search_tiles(model, (512, 512), tiles=[256, 512], budget=plans[512].peak - 1,
                         optimizer_copies=0)
    assert tight.chosen.tile == 256


def test_keep_tiles_auto_fills_the_budget():
    """With keep_tiles='auto' the chosen tile keeps as many tiles as the budget leaves room
    for: one more would not fit."""
    torch.manual_seed(0)
    model = export_torch(MiniResNet().eval(), (1, 3, 128, 128))

    def plan(**kwargs):
        return search_tiles(model, (128, 128), tiles=[32], optimizer_copies=0, grid_end=None,
                            **kwargs)

    default, every = plan().plans[0], plan(keep_tiles=16).plans[0]
    assert default.kept_tiles == 1 and every.kept_tiles == 16 and default.peak < every.peak
    budget = (default.peak + every.peak) // 2
    chosen = plan(budget=budget, keep_tiles="auto").chosen
    assert 1 < chosen.kept_tiles < 16 and chosen.peak <= budget
    assert chosen.program.meta.kept[-1] == default.program.meta.kept[0]
    assert plan(keep_tiles=chosen.kept_tiles + 1).plans[0].peak > budget
    assert plan(budget=every.peak, keep_tiles="auto").chosen.kept_tiles == 16
    assert plan(budget=default.peak, keep_tiles="auto").chosen.kept_tiles == 1
    with pytest.raises(streamc.StreamcError, match="budget"):
        plan(keep_tiles="auto")

