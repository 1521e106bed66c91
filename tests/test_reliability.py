"""What a new user hit: one number for every axis of a volume, a short repr, an export that
keeps the source model's dynamic axes, compile notes shown by check, and the fewest tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import streamc
from streamc.cli import main
from streamc.demo import demo_model
from streamc.passes.schedule import _crops, _even_bounds, make_schedule, min_tile


def _volume_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((2, 1, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 6, strides=[2, 2, 2]),
             helper.make_node("Relu", ["c"], ["y"]),
             helper.make_node("GlobalAveragePool", ["y"], ["out"])]
    graph = helper.make_graph(
        nodes, "volume",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, "D", "H", "W"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, 1, 1, 1])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_one_number_is_every_axis_of_a_volume(tmp_path: Path) -> None:
    path = tmp_path / "v.onnx"
    onnx.save(_volume_model(), str(path))
    result = CliRunner().invoke(main, ["inspect", str(path), "--image", "32", "--json"])
    assert result.exit_code == 0, result.stderr
    assert '"image_shape": [\n  1,\n  1,\n  32,\n  32,\n  32\n ]' in result.stdout
    program = streamc.compile(_volume_model(), 16, image=(32,), with_flops=False)
    assert program.image_size == (32, 32, 32)


def test_a_program_prints_short() -> None:
    program = streamc.compile(demo_model(channels=4), 64, image=(256, 256), with_flops=False)
    text = repr(program)
    assert len(text) < 300 and "tiles=" in text and "256x256" in text


def test_export_keeps_the_source_models_dynamic_axes(tmp_path: Path) -> None:
    program = streamc.compile(demo_model(channels=4), 64, image=(128, 128), with_flops=False)
    model = streamc.StreamingModel(program)
    path = model.export_onnx(tmp_path / "trained.onnx")
    exported = onnx.load(str(path))
    dims = exported.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[2:]] == ["H", "W"]
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": np.zeros((1, 3, 200, 96), np.float32)})
    assert logits.shape == (1, 2)


def test_check_prints_the_compile_notes(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(demo_model(channels=4), str(path))
    # 100 is not a multiple of the network's alignment (8): a note says it was rounded.
    result = CliRunner().invoke(main, ["check", str(path), "--image", "128x128", "--tile", "100",
                                       "--halo", "recompute", "--grid-end", "none",
                                       "--no-finite-differences"])
    assert result.exit_code == 0, result.stdout
    assert "note: tile 100 along axis 0 is not a multiple" in result.stdout


@pytest.mark.parametrize("size, tile", [(512, 272), (512, 300), (640, 200), (1024, 330),
                                        (999, 157), (512, 120)])
def test_the_schedule_uses_the_fewest_tiles_that_fit(size: int, tile: int) -> None:
    """No even split into fewer tiles keeps every crop within the tile (brute force)."""
    analysis = streamc.analyze(demo_model(channels=4), (size, size))
    schedule = make_schedule(analysis, tile, halo="recompute")
    align = analysis.alignment[0]
    tile_aligned = schedule.tile[0]
    used = schedule.grid[0]
    assert min_tile(analysis, 0) <= tile_aligned
    for n in range(1, used):
        bounds = _even_bounds(analysis, 0, size, n, align) if n > 1 else [0, size]
        widest = max(span.width for span in _crops(analysis, 0, bounds, size))
        assert widest > tile_aligned, (n, bounds, widest)
