"""Sanity tests for the model zoo (the `zoo` package) and its helpers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import zoo


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _nodes(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _dims(vi: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def _assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-4) -> None:
    scale = max(float(np.abs(expected).max()), 1e-6)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("name", zoo.NAMES)
def test_export_checks_and_matches_torch(name: str) -> None:
    zm = zoo.build(name)
    model = zm.onnx_model
    onnx.checker.check_model(model, full_check=True)
    assert zm.name == name and zm.cut_hint
    assert zm.image_shape == zoo.DEFAULT_SHAPES[name]
    assert not zm.module.training
    assert all(p.dtype == torch.float32 for p in zm.module.parameters())
    assert [i.name for i in model.graph.input] == ["image"]
    assert zm.output_names == ["logits"]
    assert _dims(model.graph.input[0]) == list(zm.image_shape)
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {17}
    # Torch replaces duplicate initializers by Identity nodes; the zoo must not trigger that.
    assert "Identity" not in _ops(model)
    x = zm.image(seed=1)
    expected = zm.torch_forward(x)
    actual = zm.ort_forward(x)
    assert _dims(model.graph.output[0]) == list(expected.shape)
    _assert_close(actual, expected)


@pytest.mark.parametrize("name", zoo.NAMES)
def test_initializer_names_are_state_dict_names(name: str) -> None:
    zm = zoo.build(name)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in zm.onnx_model.graph.initializer}
    state = {
        k: v.detach().numpy()
        for k, v in zm.module.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    assert set(inits) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(inits[key].reshape(value.shape), value, err_msg=key)
    assert {k for k, _ in zm.module.named_parameters()} <= set(inits)


def test_weights_are_deterministic() -> None:
    a = zoo.make_module("resnet").state_dict()
    b = zoo.make_module("resnet").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Seeds differ per model: vgg and dilated share their first conv's shape, not its values.
    w_vgg = zoo.make_module("vgg").state_dict()["features.0.weight"]
    w_dil = zoo.make_module("dilated").state_dict()["features.0.weight"]
    assert w_vgg.shape == w_dil.shape and not torch.equal(w_vgg, w_dil)


@pytest.mark.parametrize("name", ["resnet", "conv3d"])
def test_batchnorm_stays_in_inference_form(name: str) -> None:
    zm = zoo.build(name)
    bns = _nodes(zm.onnx_model, "BatchNormalization")
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in zm.module.modules())
    assert len(bns) == n_bn > 0
    for node in bns:
        assert _attrs(node).get("training_mode", 0) == 0
        assert len(node.output) == 1
        assert node.input[3].endswith("running_mean") and node.input[4].endswith("running_var")
    for m in zm.module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            assert not torch.allclose(m.running_mean, torch.zeros_like(m.running_mean))
            assert not torch.allclose(m.running_var, torch.ones_like(m.running_var))


def test_model_specific_structure() -> None:
    unet = zoo.build("unet").onnx_model
    (resize,) = _nodes(unet, "Resize")
    assert _attrs(resize)["mode"] == b"nearest"
    assert _attrs(resize)["coordinate_transformation_mode"] == b"asymmetric"
    assert "Concat" in _ops(unet) and "GlobalAveragePool" not in _ops(unet)

    (pad,) = _nodes(zoo.build("zeropad").onnx_model, "Pad")
    assert _attrs(pad)["mode"] == b"constant"

    nonsquare = zoo.build("nonsquare").onnx_model
    kernels = {tuple(_attrs(n)["kernel_shape"]) for n in _nodes(nonsquare, "Conv")}
    assert {(3, 5), (1, 7), (2, 4)} <= kernels
    assert any(_attrs(n).get("auto_pad") == b"SAME_UPPER" for n in _nodes(nonsquare, "Conv"))

    dilated = zoo.build("dilated").onnx_model
    convs = [_attrs(n) for n in _nodes(dilated, "Conv")]
    assert {tuple(a["dilations"]) for a in convs} >= {(2, 2), (3, 3)}
    assert {a["group"] for a in convs} >= {2, 16}

    mixed = zoo.build("mixed_act").onnx_model
    (avg,) = _nodes(mixed, "AveragePool")
    assert _attrs(avg)["ceil_mode"] == 1 and _attrs(avg)["count_include_pad"] == 0
    for op in ("LeakyRelu", "PRelu", "Sigmoid", "HardSwish", "Elu", "Erf", "Tanh", "Add", "Mul"):
        assert op in _ops(mixed), op

    twocut = zoo.build("twocut").onnx_model
    reads = {n.input[0] for n in _nodes(twocut, "ReduceMean")}
    assert len(reads) == 2

    assert len(zoo.build("conv3d").onnx_model.graph.input[0].type.tensor_type.shape.dim) == 5
    first = [op for op in _ops(zoo.build("nonlocal_first").onnx_model) if op != "Constant"][0]
    assert first == "CumSum"


@pytest.mark.parametrize("name", zoo.NAMES)
def test_dynamic_export_runs_at_other_sizes(name: str) -> None:
    zm = zoo.build(name, dynamic=True)
    onnx.checker.check_model(zm.onnx_model, full_check=True)
    assert isinstance(_dims(zm.onnx_model.graph.input[0])[-1], str)
    shape = list(zm.image_shape)
    shape[0], shape[-2], shape[-1] = 2, shape[-2] + 8, shape[-1] + 4
    x = zoo.random_image(shape, seed=2)
    _assert_close(zm.ort_forward(x), zm.torch_forward(x))


def test_build_is_cached_and_shape_independent_weights() -> None:
    a = zoo.build("vgg")
    assert zoo.build("vgg", (1, 3, 64, 64)) is a
    b = zoo.build("vgg", (1, 3, 40, 48))
    assert b is not a and b.image_shape == (1, 3, 40, 48)
    assert _dims(b.onnx_model.graph.input[0]) == [1, 3, 40, 48]
    assert torch.equal(a.module.features[0].weight, b.module.features[0].weight)
    with pytest.raises(KeyError, match="unknown zoo model"):
        zoo.build("alexnet")


def test_expose_tensor_matches_torch_intermediate() -> None:
    zm = zoo.build("vgg")
    (gap,) = _nodes(zm.onnx_model, "GlobalAveragePool")
    cut = gap.input[0]
    exposed = zoo.expose_tensor(zm.onnx_model, cut)
    onnx.checker.check_model(exposed, full_check=True)
    assert [o.name for o in exposed.graph.output] == ["logits", cut]
    assert _dims(exposed.graph.output[1]) == [1, 16, 16, 16]
    assert len(zm.onnx_model.graph.output) == 1  # the original is untouched
    x = zm.image(seed=3)
    out = zoo.run_onnx(exposed, {"image": x})
    with torch.no_grad():
        expected = zm.module.features(torch.from_numpy(x)).numpy()
    _assert_close(out[cut], expected)
    with pytest.raises(KeyError):
        zoo.expose_tensor(zm.onnx_model, "no_such_tensor")


def _vgg_cone(pixel: int) -> tuple[int, int]:
    """Rows of vgg's last conv output (stride 4, 16 rows) that read input row ``pixel``.

    Layers conv-conv-pool-conv-conv-pool-conv (3×3 pad 1, pool 2): receptive field
    r = 1 + Σ (k − 1)·S = 1 + 2 + 2 + 1 + 4 + 4 + 2 + 8 = 24 and offset P = Σ p·S = 10, so output
    row j reads input rows [4j − 10, 4j + 13].
    """
    lo = -(-(pixel - 13) // 4)  # ceil((pixel - 13) / 4)
    hi = (pixel + 10) // 4
    return max(lo, 0), min(hi, 15)


@pytest.mark.parametrize("pixel", [(30, 33), (0, 63), (5, 17)])
def test_perturbation_field_vgg_fills_the_cone(pixel: tuple[int, int]) -> None:
    zm = zoo.build("vgg")
    (gap,) = _nodes(zm.onnx_model, "GlobalAveragePool")
    mask = zoo.perturbation_field(zm.onnx_model, "image", gap.input[0], zm.image_shape, pixel)
    assert mask.shape == (16, 16) and mask.dtype == bool
    assert mask.any()
    expected = np.zeros_like(mask)
    (r0, r1), (c0, c1) = _vgg_cone(pixel[0]), _vgg_cone(pixel[1])
    expected[r0 : r1 + 1, c0 : c1 + 1] = True
    np.testing.assert_array_equal(mask, expected)


def test_perturbation_field_shapes() -> None:
    unet = zoo.build("unet")
    mask = zoo.perturbation_field(unet.onnx_model, "image", "logits", unet.image_shape, (20, 21))
    assert mask.shape == (48, 48) and mask[20, 21] and not mask[0, 0]
    vol = zoo.build("conv3d")
    (gap,) = _nodes(vol.onnx_model, "GlobalAveragePool")
    mask = zoo.perturbation_field(vol.onnx_model, "image", gap.input[0], vol.image_shape, (9, 9, 9))
    assert mask.shape == (6, 6, 6) and mask[2, 2, 2]
    logits = zoo.perturbation_field(
        zoo.build("vgg").onnx_model, "image", "logits", (1, 3, 64, 64), (0, 0)
    )
    assert logits.shape == () and bool(logits)
    with pytest.raises(ValueError):
        zoo.perturbation_field(unet.onnx_model, "image", "logits", unet.image_shape, (48, 0))


def test_onnx_file_fixture(onnx_file: Callable[..., Path], zoo_model: zoo.ZooModel) -> None:
    path = onnx_file(zoo_model)
    assert path.name == f"{zoo_model.name}.onnx"
    loaded = onnx.load_model(path)
    assert [i.name for i in loaded.graph.initializer] == [
        i.name for i in zoo_model.onnx_model.graph.initializer
    ]
    assert onnx_file(loaded).name == "model0.onnx"
