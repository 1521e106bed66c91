"""The weight work hoisted out of the tile backward graphs (streamc.passes.hoist): every tile
class's rewritten backward graph, fed the prepare graph's tensors and followed by the gradient
layout graph, gives exactly what the graph the autodiff pass built gives."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import zoo
from streamc.analysis.analyze import analyze_checked
from streamc.compiler import compile_state, source_of
from streamc.export import export_torch
from streamc.passes.autodiff import BackwardGraph
from streamc.passes.hoist import hoist_weight_work
from streamc.passes.memory.allocator import value_bytes
from tests.blocks import SENet
from zoo.models import MiniResNet


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _random_feeds(session: ort.InferenceSession, rng: np.random.Generator, params: set[str],
                  weights: dict[str, np.ndarray]) -> dict:
    """Random inputs; a parameter keeps one value across graphs (in ``weights``)."""
    feeds = {}
    for i in session.get_inputs():
        if i.name in weights:
            feeds[i.name] = weights[i.name]
            continue
        value = rng.standard_normal(i.shape).astype(np.float32)
        if "running_var" in i.name:
            value = np.abs(value) + 0.5  # a variance: positive
        feeds[i.name] = value
        if i.name in params:
            weights[i.name] = value
    return feeds


def _state(module: nn.Module, shape, tile, halo: str = "reuse"):
    model = export_torch(module.eval(), shape)
    analysis = analyze_checked(model, tuple(shape[2:]))
    return compile_state(analysis, tile, source_of(model, model.SerializeToString()),
                         with_flops=False, with_memory_plan=False, halo=halo, grid_end=None)


def _check_classes(original: list[BackwardGraph], params: set[str]) -> None:
    hoisted = hoist_weight_work(original, params)
    rng = np.random.default_rng(0)
    prepare = _session(hoisted.prepare) if hoisted.prepare is not None else None
    layout = _session(hoisted.layout) if hoisted.layout is not None else None
    weights: dict[str, np.ndarray] = {}
    if prepare is not None:
        _random_feeds(prepare, rng, params, weights)
    for old, new in zip(original, hoisted.backward, strict=True):
        before = _session(old.model)
        feeds = _random_feeds(before, rng, params, weights)
        names = list(old.gradients.values())
        expected = dict(zip(old.gradients, before.run(names, feeds)))
        prepared = {}
        if prepare is not None:
            values = prepare.run(hoisted.prepared, {i.name: weights[i.name]
                                                    for i in prepare.get_inputs()})
            prepared = dict(zip(hoisted.prepared, values))
        after = _session(new.model)
        got = dict(zip(new.gradients, after.run(
            list(new.gradients.values()),
            {i.name: feeds[i.name] if i.name in feeds else prepared[i.name]
             for i in after.get_inputs()})))
        if layout is not None:
            raw = {hoisted.raw[p]: got[p] for p in hoisted.raw if p in got}
            zero = {i.name: np.zeros(i.shape, np.float32) for i in layout.get_inputs()}
            outs = dict(zip(hoisted.laid_out, layout.run(list(hoisted.laid_out.values()),
                                                         {**zero, **raw})))
            got.update({p: outs[p] for p in hoisted.raw if p in got})
        for name, value in expected.items():
            assert got[name].shape == value.shape, name
            np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize("halo", ["reuse", "recompute"])
def test_hoisted_backward_graphs_give_the_same_gradients(halo):
    torch.manual_seed(0)
    module = zoo.resnet18(classes=2, width=8) if halo == "reuse" else MiniResNet()
    state = _state(module, (1, 3, 192, 192), 96, halo)
    graphs = state["backward_graphs"]
    assert len(graphs) > 1  # several shape classes share one prepare graph
    params = set(state["parameters"].names)
    _check_classes(graphs, params)
    hoisted = state["hoisted"]
    # the Conv weights flipped for their input gradients, and the convs' weight gradients in
    # their Gemm layout, strided ones too (their taps reordered by a Gather, once per pass)
    assert hoisted.prepare is not None and len(hoisted.prepared) >= 10
    assert "layer1.0.conv1.weight" in hoisted.raw or "layer1.conv1.weight" in hoisted.raw
    if halo == "reuse":
        assert {"conv1.weight", "layer2.0.conv1.weight"} <= set(hoisted.raw)
        assert any(n.op_type == "Gather" for n in hoisted.layout.graph.node)
        for graph in hoisted.backward:  # the whole layout chain left the tiles
            assert not {"Gather", "Transpose"} & {n.op_type for n in graph.model.graph.node}
    # each weight's work is done once for all classes: no two prepare nodes alike
    signatures = [(n.op_type, tuple(n.input), tuple(a.SerializeToString() for a in n.attribute))
                  for n in hoisted.prepare.graph.node]
    assert len(set(signatures)) == len(signatures)
    assert len(hoisted.prepare.graph.node) < sum(
        len(hoist_weight_work([g], params).prepare.graph.node) for g in graphs)
    # and no class does it again
    for graph in hoisted.backward:
        ops = [n.op_type for n in graph.model.graph.node]
        flips = [n for n in graph.model.graph.node if n.op_type == "Transpose"
                 and any(i in params for i in n.input)]
        assert not flips, ops


def test_hoisting_squeeze_excite_and_saliency_graphs():
    torch.manual_seed(0)
    state = _state(SENet(), (1, 3, 64, 64), 32)
    _check_classes(state["backward_graphs"], set(state["parameters"].names))


def test_the_prepared_tensors_are_rearranged_weights():
    torch.manual_seed(0)
    state = _state(zoo.resnet18(classes=2, width=8), (1, 3, 96, 96), 48)
    hoisted = state["hoisted"]
    weights = {p.name: p for p in state["program"].meta.parameters}
    flipped = [n for n in hoisted.prepared if n.startswith("prepared:grad/")]
    assert flipped
    # every prepared tensor here is a rearranged weight: at most the weights' bytes in all
    prepared = sum(value_bytes(o) for o in hoisted.prepare.graph.output)
    assert 0 < prepared <= sum(p.nbytes for p in weights.values())
    program = state["program"]
    assert program.meta.weight_work.prepare == "graphs/prepare.onnx"
    assert set(program.meta.weight_work.raw) == set(hoisted.raw)


def test_a_gradient_summed_from_two_uses_keeps_its_layout():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

        def forward(self, x):
            x = torch.relu(self.stem(x))
            return self.head(self.conv(torch.relu(self.conv(x))))

    torch.manual_seed(0)
    state = _state(Shared(), (1, 3, 32, 32), 16)
    hoisted = state["hoisted"]
    assert "conv.weight" not in hoisted.raw  # Sum of two products: nothing to move
    _check_classes(state["backward_graphs"], set(state["parameters"].names))
