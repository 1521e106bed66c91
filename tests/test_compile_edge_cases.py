"""Compiler edge cases: each one a clear error or a documented, exact behaviour."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import streamc
import zoo
from streamc.compiler import compile as compile_program
from streamc.errors import CompileError, StreamcError
from streamc.export import export_torch
from streamc.passes.schedule import make_schedule, parse_tile
from tests.test_exactness import assert_matches_torch


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message and message.endswith("."), message
    return message


# --------------------------------------------------------------------------------------------
# Tile sizes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vgg", "resnet", "nonsquare", "conv3d"])
def test_too_small_tile_names_the_minimum(name: str) -> None:
    zm = zoo.build(name)
    with pytest.raises(CompileError) as info:
        compile_program(zm.onnx_model, 3, with_flops=False, halo="recompute")
    message = _one_line(info.value)
    match = re.search(r"tile \d+ along axis (\d+) is too small to make progress.*"
                      r"Use a tile of at least (\d+)\.", message)
    assert match, message
    axis, minimum = int(match.group(1)), int(match.group(2))
    a = streamc.analyze(zm.onnx_model)
    assert minimum % a.alignment[axis] == 0  # an aligned size, so it is not rounded down
    # The named minimum works on that axis (and one aligned step less does not).
    tile = [max(minimum, 3)] * a.n_spatial
    for _ in range(a.n_spatial):
        while True:
            try:
                make_schedule(a, tile, halo="recompute")
                break
            except CompileError as exc:
                found = re.search(r"along axis (\d+) .* at least (\d+)\.", str(exc))
                assert found and int(found.group(1)) != axis
                tile[int(found.group(1))] = int(found.group(2))
    schedule = make_schedule(a, tile, halo="recompute")
    assert len(schedule.tiles) > 1
    smaller = list(tile)
    smaller[axis] = minimum - a.alignment[axis]
    with pytest.raises(CompileError, match="too small to make progress"):
        make_schedule(a, smaller, halo="recompute")


def test_minimum_tile_compiles_exactly() -> None:
    """The smallest tile that makes progress keeps one aligned step per tile; still exact."""
    zm = zoo.build("twocut")
    with pytest.raises(CompileError) as info:
        compile_program(zm.onnx_model, 4, with_flops=False)
    minimum = int(re.search(r"at least (\d+)\.", str(info.value)).group(1))
    assert minimum == 8  # the alignment: halo reuse needs no more
    program = compile_program(zm.onnx_model, minimum, with_flops=False)
    assert program.meta.grid == (8, 8)  # 64 px / alignment 8
    for tile in program.tiles:
        assert all(b - a <= t for (a, b), t in zip(tile.crop, program.meta.tile))
    assert_matches_torch(program, zm.module, zm.onnx_model, zm.image(seed=2))


def test_tile_larger_than_image_is_one_tile() -> None:
    zm = zoo.build("vgg")
    program = compile_program(zm.onnx_model, 4096, with_flops=False)
    assert len(program.tiles) == 1 and program.meta.grid == (1, 1)
    (tile,) = program.tiles
    assert tile.crop == ((0, 64), (0, 64))
    assert_matches_torch(program, zm.module, zm.onnx_model, zm.image(seed=3))


def test_tile_equal_to_image_is_one_tile() -> None:
    zm = zoo.build("nonsquare")  # 40×56, alignment (4, 6)
    program = compile_program(zm.onnx_model, "40x60", with_flops=False)
    assert len(program.tiles) == 1
    program = compile_program(zm.onnx_model, "40x56", with_flops=False)
    assert program.meta.tile == (40, 56) and program.meta.grid == (1, 1)
    # Recomputing halos, the request is rounded *down* to the alignment first, so a tile
    # equal to an unaligned image size (56 -> 54) no longer covers it.
    program = compile_program(zm.onnx_model, "40x56", with_flops=False, halo="recompute",
                              grid_end=None)  # the whole grid's alignment
    assert program.meta.tile == (40, 54) and program.meta.grid == (1, 2)


def test_unaligned_tile_is_rounded_with_a_note() -> None:
    zm = zoo.build("resnet")  # alignment 8
    program = compile_program(zm.onnx_model, "61x59", with_flops=False, halo="recompute",
                              grid_end=None)  # the whole grid's alignment
    assert program.meta.requested_tile == (61, 59)
    assert program.meta.tile == (56, 56)
    notes = program.meta.notes
    assert any("61 along axis 0" in n and "alignment 8" in n and "rounded to 56" in n
               for n in notes), notes
    assert any("59 along axis 1" in n for n in notes), notes
    for tile in program.tiles:
        assert all(b - a <= 56 for a, b in tile.crop)
    aligned = compile_program(zm.onnx_model, 56, with_flops=False, halo="recompute")
    assert aligned.meta.notes == []
    # Halo reuse reads a halo on every tile anyway: the request is used as it is.
    reused = compile_program(zm.onnx_model, "61x59", with_flops=False)
    assert reused.meta.tile == (61, 59) and reused.meta.notes == []
    assert all(b - a <= t for tile in reused.tiles for (a, b), t in zip(tile.crop, (61, 59)))


def test_tile_below_alignment_is_rounded_up_to_it() -> None:
    a = streamc.analyze(zoo.build("twocut").onnx_model)  # alignment 8, field 15 at stride 8
    with pytest.raises(CompileError, match="tile 8 along axis 0 is too small"):
        # rounded up to one alignment step, which is still too small
        make_schedule(a, 5, halo="recompute")
    assert make_schedule(a, 100, halo="recompute").tile == (96, 96)


@pytest.mark.parametrize(
    "tile, expected",
    [
        ("16x16x16", (16, 16, 16)), ("16", (16, 16, 16)), (16, (16, 16, 16)),
        ("8x12x16", (8, 12, 16)), ((8, 12, 16), (8, 12, 16)), ("8×12×16", (8, 12, 16)),
        ("8X12X16", (8, 12, 16)),
    ],
)
def test_3d_tile_strings(tile, expected) -> None:
    assert parse_tile(tile, 3) == expected


def test_3d_compile_with_tile_string() -> None:
    zm = zoo.build("conv3d")
    program = compile_program(zm.onnx_model, "16x16x24", with_flops=False)
    assert program.meta.grid == (2, 2, 1)
    assert_matches_torch(program, zm.module, zm.onnx_model, zm.image(seed=4))


@pytest.mark.parametrize(
    "tile, message",
    [
        ("abc", "not a number or NxM"), ("16x", "not a number or NxM"),
        ("", "not a number or NxM"), ("16x16x16", "has 3 axes but the image has 2"),
        ("16x16x16x16", "has 4 axes"), ((16, 16, 16), "has 3 axes"), ("0", "must be positive"),
        ("-4", "must be positive"), ("16x0", "must be positive"), (2.5, "whole number"),
        ((16.5, 16), "whole number"), (None, "whole number"), (True, "whole number"),
    ],
)
def test_bad_tile_sizes(tile, message: str) -> None:
    with pytest.raises(CompileError, match=re.escape(message)) as info:
        compile_program(zoo.build("vgg").onnx_model, tile, with_flops=False)
    _one_line(info.value)


# --------------------------------------------------------------------------------------------
# Image sizes
# --------------------------------------------------------------------------------------------


def test_dynamic_model_needs_an_image_size() -> None:
    zm = zoo.build("resnet", dynamic=True)
    with pytest.raises(CompileError, match="spatial size is dynamic") as info:
        compile_program(zm.onnx_model, 32, with_flops=False)
    assert "image" in _one_line(info.value)
    program = compile_program(zm.onnx_model, 56, image=(72, 48), with_flops=False)
    assert program.image_size == (72, 48) and len(program.tiles) > 1
    assert_matches_torch(program, zm.module, zm.onnx_model,
                         zoo.random_image((1, 3, 72, 48), seed=5))


def test_image_smaller_than_receptive_field() -> None:
    """vgg's field is 24 px; at 20×20 every cut position reads padding. One tile, exact."""
    zm = zoo.build("vgg", dynamic=True)
    program = compile_program(zm.onnx_model, 64, image=(20, 20), with_flops=False)
    assert len(program.tiles) == 1
    analysis = streamc.analyze(zm.onnx_model, image=(20, 20))
    assert analysis.tensors[analysis.ends[0]].receptive_field == (24, 24)
    assert_matches_torch(program, zm.module, zm.onnx_model,
                         zoo.random_image((1, 3, 20, 20), seed=6))


def test_one_pixel_image() -> None:
    zm = zoo.build("resnet", dynamic=True)
    program = compile_program(zm.onnx_model, 16, image=(1, 1), with_flops=False)
    assert len(program.tiles) == 1
    assert_matches_torch(program, zm.module, zm.onnx_model,
                         zoo.random_image((1, 3, 1, 1), seed=8))


@pytest.mark.parametrize("name, image", [("vgg", (3, 3)), ("zeropad", (1, 1))])
def test_image_too_small_for_the_network(name: str, image: tuple[int, int]) -> None:
    zm = zoo.build(name, dynamic=True)
    with pytest.raises(StreamcError) as info:
        compile_program(zm.onnx_model, 16, image=image, with_flops=False)
    message = _one_line(info.value)
    assert "too small" in message and "empty" in message


# --------------------------------------------------------------------------------------------
# The prefix stops at an op the table lacks
# --------------------------------------------------------------------------------------------


class _SliceInTheMiddle(nn.Module):
    """conv, relu, conv, a spatial slice (local, but not in streamc's table), conv, head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.conv1(x)))
        x = self.conv3(x[:, :, 1:, 2:])
        return self.fc(x.mean(dim=(2, 3)))


def test_prefix_stops_at_unsupported_op_and_head_runs_it() -> None:
    torch.manual_seed(1)
    module = _SliceInTheMiddle().eval()
    shape = (1, 3, 40, 36)
    model = export_torch(module, shape, dynamic=False)
    a = streamc.analyze(model)
    (stop,) = a.stops
    assert stop.op == "Slice" and "not in streamc's table" in stop.reason
    assert [a.tensors[c].op for c in a.cut_tensors] == ["Conv"]
    head_ops = {a.graph.nodes[n].op_type for n in a.head}
    assert {"Slice", "Conv", "ReduceMean", "Gemm"} <= head_ops
    program = compile_program(model, 16, with_flops=False)
    assert len(program.tiles) > 1
    # conv3's weights live in the head; their gradients come from the head's backward.
    assert "conv3.weight" in program.meta.head.gradients
    assert_matches_torch(program, module, model, zoo.random_image(shape, seed=9))


def test_no_head_model_output_is_the_cut() -> None:
    """unet: the whole graph is local; the output is the stitched cut tensor itself."""
    zm = zoo.build("unet")
    program = compile_program(zm.onnx_model, 20, with_flops=False)
    assert program.cut_tensors == ["logits"] and len(program.tiles) > 1
    assert_matches_torch(program, zm.module, zm.onnx_model, zm.image(seed=10))


def test_compile_notes_are_empty_for_aligned_requests() -> None:
    program = compile_program(zoo.build("zeropad").onnx_model, 16, with_flops=False)
    assert program.meta.notes == []
    assert np.all(np.array(program.meta.tile) == 16)


class _FreshBatchNorms(nn.Module):
    """Two freshly initialised BatchNorms: equal weights (ones) and biases (zeros), which the
    torch exporter merges into one initializer each, aliased by Identity nodes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(2), nn.BatchNorm2d(2)
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn2(torch.relu(self.bn1(self.conv(x)))).mean(dim=(2, 3)))


def test_merged_initializers_are_noted() -> None:
    model = export_torch(_FreshBatchNorms().eval(), (1, 1, 16, 16), dynamic=False)
    notes = compile_program(model, 8, with_flops=False).meta.notes
    merged = [n for n in notes if "merged initializers" in n]
    assert len(merged) == 2, notes
    assert any("'bn2.weight'" in n and "of 'bn1.weight'" in n for n in merged), merged
    assert all("train as one parameter" in n and "\n" not in n for n in merged)
