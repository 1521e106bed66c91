"""streamc.export.export_torch: names, dynamic axes, static output shapes and errors."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

import zoo
from streamc.errors import StreamcError
from streamc.export import export_torch


def _dims(vi: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def test_dynamic_spatial_axes_by_default(tmp_path: Path) -> None:
    module = zoo.make_module("vgg")
    path = tmp_path / "sub" / "vgg.onnx"
    model = export_torch(module, (1, 3, 32, 32), path)
    assert [i.name for i in model.graph.input] == ["image"]
    assert _dims(model.graph.input[0]) == [1, 3, "H", "W"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert onnx.load_model(path).SerializeToString() == model.SerializeToString()
    assert not module.training
    assert "BatchNormalization" in {n.op_type for n in export_torch(
        zoo.make_module("resnet"), (1, 3, 32, 32)).graph.node}


def test_batch_volume_and_spatial_outputs() -> None:
    conv3d = export_torch(zoo.make_module("conv3d"), (1, 1, 16, 16, 16), dynamic_batch=True,
                          input_name="volume")
    assert _dims(conv3d.graph.input[0]) == ["N", 1, "D", "H", "W"]
    assert conv3d.graph.input[0].name == "volume"
    assert _dims(conv3d.graph.output[0]) == ["N", 3]
    unet = export_torch(zoo.make_module("unet"), (1, 3, 16, 16), output_names=["mask"])
    assert _dims(unet.graph.output[0]) == [1, 2, "mask_H", "mask_W"]


def test_static_export_pins_output_shapes() -> None:
    model = export_torch(zoo.make_module("twocut"), (2, 3, 32, 32), dynamic=False)
    assert _dims(model.graph.input[0]) == [2, 3, 32, 32]
    assert _dims(model.graph.output[0]) == [2, 10]


def test_errors_are_streamc_errors() -> None:
    with pytest.raises(StreamcError, match="fails on an input of shape"):
        export_torch(nn.Conv2d(3, 4, 3), (1, 5, 8, 8))
    with pytest.raises(StreamcError, match="returns 1 outputs but 2 output names"):
        export_torch(nn.Conv2d(3, 4, 3), (1, 3, 8, 8), output_names=["a", "b"])

    class Unexportable(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.fft.fft2(x).real

    with pytest.raises(StreamcError, match="torch.onnx.export could not export Unexportable"):
        export_torch(Unexportable(), (1, 1, 8, 8))
    with pytest.raises(StreamcError, match="at least one spatial axis"):
        export_torch(nn.Linear(3, 4), (1, 3))
