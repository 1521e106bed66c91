"""Ending the grid early (``compile(..., grid_end=...)``): the moved layers run whole in the
head, the gradients stay those of torch, and ``"auto"`` picks the shallowest candidate whose
planned peak is within the allowance (checked against plans made one cut at a time)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import streamc
import zoo
from streamc.analysis.analyze import grid_end_candidates, with_grid_end
from streamc.compiler import GRID_END_ALLOWANCE
from streamc.compiler import compile as compile_program
from streamc.demo import demo_model
from streamc.errors import StreamcError
from streamc.export import export_torch
from streamc.graph import prepare
from streamc.passes.memory import head_memory
from tests.test_cli import assert_one_line_error, run
from tests.test_exactness import _CeilPools, assert_matches_torch
from tests.test_multistage import CASES, built

IMAGE = (1, 3, 96, 96)
TILE = 32


@pytest.fixture(scope="module")
def resnet():
    return zoo.build("resnet", IMAGE)


@pytest.fixture(scope="module")
def ceil_pools():
    """(module, image shape, exported model): two ceil_mode pools whose last windows would
    start in the end padding."""
    torch.manual_seed(0)
    module = _CeilPools().eval()
    shape = (1, 2, 29, 26)
    return module, shape, export_torch(module, shape, dynamic=False)


def test_candidates_are_the_stage_ends(resnet) -> None:
    analysis = streamc.analyze(resnet.onnx_model, IMAGE[2:])
    candidates = grid_end_candidates(analysis)
    strides = [analysis.tensors[t].stride for t in candidates]
    assert candidates and strides == sorted(set(strides)), strides
    deepest = max(analysis.tensors[t].stride for t in analysis.ends)
    assert all(s < deepest for s in strides)
    for tensor in candidates:
        program = compile_program(resnet.onnx_model, TILE, with_flops=False,
                                  with_memory_plan=False, grid_end=tensor)
        assert [c.name for c in program.meta.cut_tensors] == [tensor]
        assert program.meta.grid_end == (tensor,)


def test_every_candidate_cut_matches_torch(resnet) -> None:
    analysis = streamc.analyze(resnet.onnx_model, IMAGE[2:])
    for tensor in grid_end_candidates(analysis):
        program = compile_program(resnet.onnx_model, TILE, with_flops=False,
                                  with_memory_plan=False, grid_end=tensor)
        assert len(program.tiles) >= 4
        worst = assert_matches_torch(program, resnet.module, resnet.onnx_model,
                                     resnet.image(seed=2))
        assert worst < 2e-6, (tensor, worst)


def test_auto_ends_at_the_shallowest_cut_within_the_allowance(resnet) -> None:
    whole = compile_program(resnet.onnx_model, TILE, with_flops=False, grid_end=None)
    analysis = streamc.analyze(resnet.onnx_model, IMAGE[2:])
    limit = whole.memory_plan["peak"] * (1 + GRID_END_ALLOWANCE)
    expected = ()
    for tensor in grid_end_candidates(analysis):
        peak = compile_program(resnet.onnx_model, TILE, with_flops=False,
                               grid_end=tensor).memory_plan["peak"]
        if peak <= limit:
            expected = (tensor,)
            break
    assert expected, "the test wants an image small enough for some cut to fit"
    auto = compile_program(resnet.onnx_model, TILE, with_flops=False)  # auto is the default
    assert auto.meta.grid_end == expected
    assert auto.memory_plan["peak"] <= limit
    worst = assert_matches_torch(auto, resnet.module, resnet.onnx_model, resnet.image(seed=3))
    assert worst < 2e-6
    unplanned = compile_program(resnet.onnx_model, TILE, with_flops=False,
                                with_memory_plan=False, grid_end="auto")
    assert unplanned.meta.grid_end == expected and unplanned.memory_plan is None


def test_head_memory_bounds_the_planned_head_phase_from_below(resnet) -> None:
    # auto skips compiling a cut whose head_memory already passes the limit: sound only while
    # head_memory is below what the plan gives that program's head phase.
    analysis = streamc.analyze(resnet.onnx_model, IMAGE[2:])
    for tensor in grid_end_candidates(analysis):
        plan = compile_program(resnet.onnx_model, TILE, with_flops=False,
                               grid_end=tensor).memory_plan
        estimate = plan["resident"]["total"] + head_memory(with_grid_end(analysis, tensor))
        assert 0 < estimate <= plan["phases"]["head backward"], tensor


def test_auto_leaves_the_grid_whole_when_keeping_is_steered(resnet) -> None:
    program = compile_program(resnet.onnx_model, TILE, with_flops=False,
                              with_memory_plan=False, grid_end="auto", keep_tiles=2)
    assert program.meta.grid_end == ()


def test_auto_leaves_a_multistage_grid_whole_and_names_refuse_it() -> None:
    _, model, whole = built("se_efficientnet")
    image = CASES["se_efficientnet"][1][2:]
    program = compile_program(model, 32, image=image, with_flops=False,
                              with_memory_plan=False, grid_end="auto")
    assert program.meta.grid_end == () and len(program.meta.stages) == len(whole.meta.stages) > 1
    split = streamc.analyze(model, image).split
    last_stage = [t for t in split.prefix_tensors if split.phase[t] == split.stages - 1]
    with pytest.raises(StreamcError, match="whole-image statistics inside"):
        compile_program(model, 32, image=image, with_flops=False, grid_end=last_stage[0])


def test_a_name_outside_the_grid_is_refused(resnet) -> None:
    with pytest.raises(StreamcError, match="'nosuch', which is not a tensor of the streamed"):
        compile_program(resnet.onnx_model, TILE, grid_end="nosuch")


def test_cli_grid_end(tmp_path, resnet) -> None:
    path = tmp_path / "resnet.onnx"
    onnx.save(resnet.onnx_model, str(path))
    code, out, err = run("compile", str(path), "--tile", str(TILE), "-o", str(tmp_path / "p"))
    assert code == 0, err
    assert "grid end:     ended early at" in out and "--grid-end none" in out
    code, out, err = run("compile", str(path), "--tile", str(TILE), "--grid-end", "none",
                         "-o", str(tmp_path / "q"))
    assert code == 0 and "grid end:" not in out, err
    code, out, err = run("plan", str(path), "--tile", str(TILE))
    assert code == 0 and "grid end        ended early at" in out, err
    code, out, err = run("plan", str(path), "--tile", str(TILE), "--grid-end", "none", "--json")
    assert code == 0 and json.loads(out)["grid_end"] == [], err
    code, _, err = run("compile", str(path), "--tile", str(TILE), "--grid-end", "nosuch",
                       "-o", str(tmp_path / "r"))
    assert_one_line_error(code, err, "nosuch", "streamc inspect", status=code or 2)
    assert code != 0


def test_keep_tiles_auto_keeps_a_named_grid_end(resnet) -> None:
    from streamc.tile_search import search_tiles

    tensor = grid_end_candidates(streamc.analyze(resnet.onnx_model, IMAGE[2:]))[-1]
    search = search_tiles(resnet.onnx_model, None, tiles=[TILE], budget="64GiB",
                          keep_tiles="auto", grid_end=tensor)
    assert search.chosen.program.meta.kept_tiles > 1  # keep_within compiled it again
    assert search.chosen.program.meta.grid_end == (tensor,)


def test_ceil_mode_pools_moved_into_the_head_match_torch(ceil_pools) -> None:
    """Pools whose last window would start in the end padding run whole in the head: ORT
    loads and runs their graphs (it checked them against ONNX shape inference, which counts
    that window, until prepare gave them the end pad without it)."""
    module, shape, model = ceil_pools
    candidates = grid_end_candidates(streamc.analyze(model))
    assert len(candidates) == 2  # before pool1 and before pool2
    for tensor in candidates:
        program = compile_program(model, 18, with_flops=False, with_memory_plan=False,
                                  grid_end=tensor)
        assert len(program.tiles) > 1
        assert assert_matches_torch(program, module, model, zoo.random_image(shape)) < 2e-6


def test_prepare_drops_the_windows_ort_drops(ceil_pools) -> None:
    """After prepare, plain ONNX shape inference gives the pools the sizes ORT computes, and
    the prepared model computes what the exported one does."""
    module, shape, model = ceil_pools
    prepared = prepare(model, shape[2:], batch=1)
    bare = onnx.ModelProto()
    bare.CopyFrom(prepared)
    del bare.graph.value_info[:]  # prepare's, inferred on stand-ins: infer afresh
    inferred = onnx.shape_inference.infer_shapes(bare)
    sizes = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
             for v in inferred.graph.value_info}
    with torch.no_grad():
        p1 = module.pool1(torch.tanh(module.conv1(torch.zeros(shape))))
        p2 = module.pool2(torch.tanh(module.conv2(p1)))
    pools = [n.output[0] for n in prepared.graph.node if n.op_type.endswith("Pool")]
    assert [sizes[t] for t in pools] == [tuple(p1.shape), tuple(p2.shape)]
    image = zoo.random_image(shape)
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
           .run(None, {m.graph.input[0].name: image})[0] for m in (model, prepared)]
    np.testing.assert_array_equal(run[0], run[1])


class _CeilPool3d(torch.nn.Module):
    """A 1x1x1 conv, then a ceil_mode pool without padding, then a classifier."""

    def __init__(self, kernel, stride) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 1)
        self.pool = torch.nn.AvgPool3d(kernel, stride=stride, ceil_mode=True,
                                       count_include_pad=False)
        self.fc = torch.nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv(x)).mean(dim=(2, 3, 4)))


# Pools the random 3-D nets found on 6^3 images: a last window that would start past the input
# (no end pad to take away: floor mode), and that on one axis with a partial last window on
# another (floor mode with an end pad of one there).
@pytest.mark.parametrize("kernel, stride, pads", [
    (1, (1, 1, 2), [0] * 6),
    ((1, 1, 3), (1, 2, 2), [0, 0, 0, 0, 0, 1]),
])
def test_a_ceil_mode_pool_without_padding_runs_whole_in_the_head(kernel, stride, pads) -> None:
    torch.manual_seed(0)
    module = _CeilPool3d(kernel, stride).eval()
    shape = (1, 1, 6, 6, 6)
    model = export_torch(module, shape, dynamic=False)
    pool = next(n for n in prepare(model, shape[2:], batch=1).graph.node
                if n.op_type == "AveragePool")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in pool.attribute}
    assert attrs["ceil_mode"] == 0 and list(attrs.get("pads", [0] * 6)) == pads
    conv = streamc.analyze(model).split.prefix_tensors[1]
    program = compile_program(model, 2, with_flops=False, with_memory_plan=False,
                              grid_end=conv)
    assert len(program.tiles) > 1
    assert assert_matches_torch(program, module, model, zoo.random_image(shape)) < 2e-6


def test_auto_passes_over_a_cut_the_tile_cannot_compile(resnet, monkeypatch) -> None:
    # A tile can be too small for an ended grid's alignment where the whole grid takes it (the
    # random 3-D nets found one): auto then weighs the next cut instead of failing.
    import streamc.compiler as compiler

    chosen = compile_program(resnet.onnx_model, TILE, with_flops=False).meta.grid_end
    assert chosen
    real = compiler._run_passes

    def refusing(analysis, *args):
        if analysis.grid_end == chosen:
            raise compiler.CompileError("schedule: tile too small for this grid")
        return real(analysis, *args)

    monkeypatch.setattr(compiler, "_run_passes", refusing)
    program = compile_program(resnet.onnx_model, TILE, with_flops=False)
    assert program.meta.grid_end != chosen


def test_plan_with_a_budget_reports_the_chosen_programs_grid(tmp_path) -> None:
    path = tmp_path / "demo.onnx"
    onnx.save(demo_model(channels=16), str(path))
    code, out, err = run("plan", str(path), "--image", "512x512", "--memory-budget", "60MiB")
    assert code == 0, err
    assert "the grid ends at stem.relu_out" in out
    assert "streamed: 53% of the forward FLOPs" in out  # the chosen grid's share, not 100 %
