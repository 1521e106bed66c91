"""Ending the grid early (``compile(..., grid_end=...)``): the moved layers run whole in the
head, the gradients stay those of torch, and ``"auto"`` picks the shallowest candidate whose
planned peak is within the allowance (checked against plans made one cut at a time)."""

from __future__ import annotations

import pytest

import streamc
import zoo
from streamc.analysis.analyze import grid_end_candidates
from streamc.compiler import GRID_END_ALLOWANCE
from streamc.compiler import compile as compile_program
from streamc.errors import StreamcError
from tests.test_cli import assert_one_line_error, run
from tests.test_exactness import assert_matches_torch
from tests.test_multistage import CASES, built

IMAGE = (1, 3, 96, 96)
TILE = 32


@pytest.fixture(scope="module")
def resnet():
    return zoo.build("resnet", IMAGE)


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
    whole = compile_program(resnet.onnx_model, TILE, with_flops=False)
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
    auto = compile_program(resnet.onnx_model, TILE, with_flops=False, grid_end="auto")
    assert auto.meta.grid_end == expected
    assert auto.memory_plan["peak"] <= limit
    assert any("the grid ends at" in note for note in auto.meta.notes)
    worst = assert_matches_torch(auto, resnet.module, resnet.onnx_model, resnet.image(seed=3))
    assert worst < 2e-6
    unplanned = compile_program(resnet.onnx_model, TILE, with_flops=False,
                                with_memory_plan=False, grid_end="auto")
    assert unplanned.meta.grid_end == expected and unplanned.memory_plan is None


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
    import onnx

    path = tmp_path / "resnet.onnx"
    onnx.save(resnet.onnx_model, str(path))
    code, out, err = run("compile", str(path), "--tile", str(TILE), "--grid-end", "auto",
                         "-o", str(tmp_path / "p"))
    assert code == 0, err
    assert "grid end:     ended early at" in out
    code, out, err = run("compile", str(path), "--tile", str(TILE), "-o", str(tmp_path / "q"))
    assert code == 0 and "grid end:" not in out, err
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
