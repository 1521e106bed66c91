"""Memory plans: liveness on hand-built graphs, program plans under runtime policies, the tile
search, sizes."""

from __future__ import annotations

import builtins
import json
import re
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import streamc
from streamc.check import run_program
from streamc.compiler import compile
from streamc.errors import CompileError, StreamcError
from streamc.passes.memory import (
    MemoryPlan,
    execution_order,
    plan_conventional,
    plan_graph,
    plan_program,
)
from streamc.passes.memory.allocator import RUNTIME_ONCE, RUNTIME_PER_NODE, fold_constants
from streamc.policy import RuntimePolicy
from streamc.runtime.backend import NumpyBackend
from streamc.steps import phase_label
from streamc.tile_search import plot_plans, search_tiles
from streamc.units import format_bytes, parse_bytes

F = TensorProto.FLOAT
S = [1, 1, 10, 10]  # 100 floats: every tensor of this shape is 400 bytes
B = 400


def _model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, F, shape) for n, shape in inputs],
        [helper.make_tensor_value_info(n, F, shape) for n, shape in outputs],
        list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _node(op, ins, outs, **attrs):
    return helper.make_node(op, ins, outs, name=outs[0], **attrs)


# ------------------------------------------------------------------------------------------------
# Liveness, exact byte counts


def test_chain_frees_each_tensor_after_its_last_reader():
    # X -> Neg -> a -> Exp -> b -> Sqrt -> y. Fed X lives throughout; at Exp, a and b are both
    # alive (the output is allocated before the input is freed); a is gone by Sqrt.
    model = _model([_node("Neg", ["x"], ["a"]), _node("Exp", ["a"], ["b"]),
                    _node("Sqrt", ["b"], ["y"])], [("x", S)], [("y", S)])
    plan = plan_graph(model, order="graph")
    assert plan.inputs == B
    assert plan.peak == 3 * B
    assert plan.peak_node == "b"
    assert plan.activations == 3 * B  # a, b, y
    assert plan.outputs == B
    assert [b for _, b in plan.curve] == [2 * B, 3 * B, 3 * B, 2 * B]


def test_fan_out_keeps_a_tensor_until_its_last_reader():
    # a is read by Exp and by Add: it lives until Add, where x, a, b, y are all alive.
    model = _model([_node("Neg", ["x"], ["a"]), _node("Exp", ["a"], ["b"]),
                    _node("Add", ["a", "b"], ["y"])], [("x", S)], [("y", S)])
    assert plan_graph(model, order="graph").peak == 4 * B


def test_resident_inputs_are_not_counted():
    model = _model([_node("Add", ["x", "w"], ["y"])], [("x", S), ("w", S)], [("y", S)])
    assert plan_graph(model, order="graph").peak == 3 * B
    assert plan_graph(model, resident={"w"}, order="graph").peak == 2 * B


def test_views_share_their_input_buffer():
    # Reshape is a view of a: a's buffer lives until Exp reads the view.
    model = _model([_node("Neg", ["x"], ["a"]), _node("Reshape", ["a", "shape"], ["r"]),
                    _node("Exp", ["r"], ["y"])], [("x", S)], [("y", [100])],
                   [numpy_helper.from_array(np.array([100], np.int64), "shape")])
    plan = plan_graph(model, order="graph")
    assert plan.activations == 2 * B  # a (shared with r) and y
    assert plan.peak == 3 * B
    assert plan.constants == 8  # the int64 shape initializer


def test_activation_writes_into_its_dying_input():
    # Relu reads a for the last time: it writes into a's buffer (ORT's MayInplace).
    nodes = [_node("Neg", ["x"], ["a"]), _node("Relu", ["a"], ["b"]), _node("Neg", ["b"], ["y"])]
    model = _model(nodes, [("x", S)], [("y", S)])
    assert plan_graph(model, order="graph").activations == 2 * B
    assert plan_graph(model, order="graph", inplace=False).activations == 3 * B
    # While a is still read later, Relu needs its own buffer.
    nodes = [_node("Neg", ["x"], ["a"]), _node("Relu", ["a"], ["b"]),
             _node("Add", ["a", "b"], ["y"])]
    model = _model(nodes, [("x", S)], [("y", S)])
    plan = plan_graph(model, order="graph")
    assert plan.activations == 3 * B
    assert plan.peak == 4 * B


def test_freed_buffer_kept_for_a_later_tensor_of_the_same_shape():
    # a dies after step 1; c (same shape) is born at step 3 and takes a's buffer, which ORT's
    # allocation planner keeps allocated in between, while z (double size) is alive.
    nodes = [
        _node("Neg", ["x"], ["a"]),                      # 0: a
        _node("Neg", ["a"], ["b"]),                      # 1: b (a dies)
        _node("Concat", ["x", "x"], ["z"], axis=1),      # 2: z, 800 bytes
        _node("Neg", ["b"], ["c"]),                      # 3: c reuses a's buffer (b dies)
        _node("ReduceSum", ["z"], ["s"], keepdims=1),    # 4: s (4 bytes), z dies
        _node("Add", ["c", "s"], ["y"]),                 # 5: y
    ]
    model = _model(nodes, [("x", S)], [("y", S)])
    model = onnx.shape_inference.infer_shapes(model)
    # Without reuse: step 2 holds x, b, z = 1600; step 3 holds x, b, z, c = 2000.
    assert plan_graph(model, order="graph", reuse=False).peak == 2000
    # With reuse, a's buffer is held from step 0 to step 5: step 2 holds x, a/c, b, z = 2000,
    # and step 3 the same 2000 (c lives in a's buffer).
    with_reuse = plan_graph(model, order="graph")
    assert with_reuse.peak == 2000
    assert [b for _, b in with_reuse.curve][:4] == [800, 1200, 2000, 2000]
    assert [b for _, b in plan_graph(model, order="graph", reuse=False).curve][:4] == [
        800, 1200, 1600, 2000]


def test_workspace_of_conv_transpose_counts_during_the_node():
    # ConvTranspose(x: 1x4x5x5, w: 4x2x3x3) keeps a column buffer of (2*3*3) x (5*5) floats.
    w = numpy_helper.from_array(np.ones((4, 2, 3, 3), np.float32), "w")
    model = _model([_node("ConvTranspose", ["x", "w"], ["y"])], [("x", [1, 4, 5, 5])],
                   [("y", [1, 2, 7, 7])], [w])
    plan = plan_graph(model, order="graph")
    assert plan.workspace == 4 * 18 * 25
    assert plan.peak == 4 * (100 + 98) + 4 * 18 * 25
    assert plan.constants == 4 * 72


def test_constant_folding_moves_zeros_into_session_constants():
    # ConstantOfShape of a constant shape is folded by ORT when the session is built.
    shape = numpy_helper.from_array(np.array(S, np.int64), "shape")
    nodes = [_node("ConstantOfShape", ["shape"], ["zeros"]), _node("Add", ["x", "zeros"], ["y"])]
    model = _model(nodes, [("x", S)], [("y", S)], [shape])
    folded = plan_graph(model, order="graph")
    assert folded.constants == 32 + B
    assert folded.peak == 2 * B
    unfolded = plan_graph(model, order="graph", fold=False)
    assert unfolded.constants == 32
    assert unfolded.peak == 3 * B


def test_folding_ignores_omitted_optional_inputs():
    # Clip(c, "", hi) of constants folds; a node whose inputs are all omitted does not, and a
    # graph output is never folded.
    nodes = [_node("Clip", ["c", "", "hi"], ["k"]), _node("RandomNormal", [], ["r"]),
             _node("Neg", ["c"], ["y"]), _node("Add", ["x", "k"], ["z"])]
    steps, folded = fold_constants(nodes, ["c", "hi"], ["y", "z"])
    assert folded == ["k"]
    assert [node.name for node, _ins, _outs in steps] == ["r", "y", "z"]
    assert steps[2][1:] == (("x", "k"), ("z",))


def test_ort_default_order_is_a_reverse_dfs_from_the_leaves():
    # ORT (GraphViewer): from the leaf y, producers pushed by ascending index, so the highest
    # index producer runs first.
    nodes = [_node("Neg", ["x"], ["a"]), _node("Exp", ["x"], ["b"]),
             _node("Add", ["a", "b"], ["y"])]
    assert execution_order(nodes, "ort") == [1, 0, 2]
    assert execution_order(nodes, "graph") == [0, 1, 2]
    # Two leaves: the last one is expanded first.
    nodes = [_node("Neg", ["x"], ["a"]), _node("Exp", ["a"], ["y1"]),
             _node("Sqrt", ["x"], ["y2"])]
    assert execution_order(nodes, "ort") == [2, 0, 1]


def test_worst_order_takes_the_larger_peak():
    nodes = [_node("Neg", ["x"], ["a"]), _node("Exp", ["x"], ["b"]),
             _node("Add", ["a", "b"], ["y"])]
    model = _model(nodes, [("x", S)], [("y", S)])
    plans = {o: plan_graph(model, order=o) for o in ("ort", "graph", "worst")}
    assert plans["worst"].peak == max(plans["ort"].peak, plans["graph"].peak)
    with pytest.raises(ValueError):
        plan_graph(model, order="random")


# ------------------------------------------------------------------------------------------------
# Programs


@pytest.fixture(scope="module")
def vgg(zoo):
    return zoo.build("vgg").onnx_model


@pytest.fixture(scope="module")
def vgg_plans(vgg):
    return search_tiles(vgg, (64, 64), tiles=[24, 36, 64]).plans


def _choose(vgg, budget, tiles=(24, 36, 64)):
    search = search_tiles(vgg, (64, 64), tiles=tiles, budget=budget)
    return search.chosen.tile, search.chosen


def test_program_plan_adds_up(vgg):
    # The head reads the feature map whole (its pool not streamed): the classic cut.
    program = compile(vgg, tile=36, image=(64, 64), with_flops=False, reduce_final=False,
                      halo="recompute", grid_end=None)
    plan = plan_program(program, plan_conventional(streamc.analyze(vgg, (64, 64))))
    assert isinstance(plan, MemoryPlan)
    r = plan.resident
    assert r.image == 1 * 3 * 64 * 64 * 4
    assert r.parameters == sum(v.nbytes for v in program.parameters.values())
    trainable = set(program.meta.trainable)
    assert r.gradients == sum(v.nbytes for k, v in program.parameters.items() if k in trainable)
    assert r.optimizer == 2 * r.gradients
    cut_bytes = sum(4 * int(np.prod(c.shape)) for c in program.meta.cut_tensors)
    # The cut tensor lives from the tiles' forward to the head's backward, its gradient from
    # there to the tiles' backward: both are alive during the head's backward.
    assert plan.buffers == 2 * cut_bytes
    assert plan.peak == max(plan.phases.values()) == plan.phases[plan.peak_phase]
    backward = [c.backward.peak for c in plan.classes]
    assert plan.peak >= r.total + cut_bytes + max(backward)
    assert plan.session_arenas >= plan.peak
    assert plan.tiles == len(program.tiles) and len(plan.classes) == len(program.classes)
    assert plan.conventional is not None and plan.conventional.activations > 0
    assert plan.saving == pytest.approx(plan.conventional.total / plan.peak)
    json.dumps(plan.to_dict())  # serialisable as is
    assert any("predicted peak" in line for line in plan.summary())
    assert plan.to_dict()["policy"] == RuntimePolicy().to_json()
    # By default the pool runs tile by tile: the map and its gradient are never whole, only
    # one row of partials per tile, the pooled vector and their gradients.
    pooled = compile(vgg, tile=36, image=(64, 64), with_flops=False, halo="recompute",
                     grid_end=None)
    pooled_plan = plan_program(pooled)
    kinds = {b.kind: b.nbytes for b in pooled.meta.buffers}
    assert set(kinds) == {"partials", "global"}
    rows, vector = kinds["partials"], kinds["global"]
    assert rows == len(pooled.tiles) * vector
    assert rows + vector <= pooled_plan.buffers <= 2 * (rows + vector) < plan.buffers
    # Halo reuse adds the bands (strips handed on between tiles): kept from the forward pass
    # to the backward pass, with their gradients.
    reused = compile(vgg, tile=36, image=(64, 64), with_flops=False)
    bands = sum(b.nbytes for b in reused.meta.buffers if b.kind == "band")
    partials = sum(b.nbytes for b in reused.meta.buffers if b.kind != "band")
    assert bands > 0
    assert bands + partials <= plan_program(reused).buffers <= 2 * (bands + partials)


POLICIES = {
    "default": RuntimePolicy(),
    "fed": RuntimePolicy(weights="inputs"),
    "baked": RuntimePolicy(weights="initializers"),
    "optimised backward": RuntimePolicy(backward_optimization="all", auto_min_runs=2),
    "kept sessions": RuntimePolicy(weights="initializers", release_sessions=False),
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_planned_sessions_are_the_runtimes(vgg, name):
    """The plan's baked sessions at every phase are the ones the runtime really holds when it
    runs that phase (asked of the session pool during a real step, not re-derived)."""
    policy = POLICIES[name]
    program = compile(vgg, tile=36, image=(64, 64), with_flops=False)
    plan = plan_program(program, policy=policy)
    seen: dict[str, set[tuple[str, ...]]] = {}
    real_run = NumpyBackend.run

    def recording_run(backend, step, weights, feeds, outputs):
        result = real_run(backend, step, weights, feeds, outputs)
        live = tuple(sorted(g for g, baked in backend.pool.live if baked))
        seen.setdefault(phase_label(program.meta, step), set()).add(live)
        return result

    image = np.random.default_rng(0).standard_normal(program.input_shape).astype(np.float32)
    params = {k: np.asarray(v) for k, v in program.parameters.items()}
    cot = {"logits": np.ones((1, 10), np.float32)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(NumpyBackend, "run", recording_run)
        run_program(program, image, params, lambda _: cot, policy=policy, threads=1)
    assert set(seen) == set(plan.phases)
    for label, lives in seen.items():
        assert lives == {tuple(plan.sessions[label])}, label
    if policy.weights == "inputs":
        assert plan.baked_sessions == 0 and not any(plan.sessions.values())


def test_baked_sessions_cost_their_weights_and_state(vgg):
    """A baked session holds a copy of its graph's weights and ORT's per-node state while it
    lives; a fed one is resident for the whole step."""
    program = compile(vgg, tile=36, image=(64, 64), with_flops=False)
    # (the kept unit's two graphs aside: counted like any other, tested in test_keep.py)
    auto = plan_program(program, policy=replace(POLICIES["baked"], keep_activations=False))
    fed = plan_program(program, policy=replace(POLICIES["fed"], keep_activations=False))
    sizes = {k: v.nbytes for k, v in program.parameters.items()}
    nodes = {c.id: (c.forward.nodes, c.backward.nodes) for c in auto.classes}
    copies = [sum(sizes[n] for n in program.classes[k].parameters)
              + RUNTIME_PER_NODE * nodes[k][0] for k in program.class_order]
    head_inputs = {i.name for i in program.graph(program.meta.head.forward).graph.input}
    head = sum(b for n, b in sizes.items() if n in head_inputs)
    assert fed.baked_sessions == 0
    pools = sum(RUNTIME_PER_NODE * f.nodes for f, _ in auto.globals)  # the pool's combine
    assert auto.baked_sessions == sum(copies) + head + pools
    # baked sessions released after their pass: the tiles' and the global graphs', both ways
    released = sum(f + b for f, b in nodes.values()) + sum(f.nodes + b.nodes
                                                           for f, b in auto.globals)
    assert fed.resident.runtime - auto.resident.runtime == RUNTIME_PER_NODE * released
    assert fed.resident.runtime >= RUNTIME_ONCE + RUNTIME_PER_NODE * sum(
        f + b for f, b in nodes.values())
    with pytest.raises(StreamcError, match="weights='some'"):
        RuntimePolicy(weights="some")


def test_folded_constants_follow_the_runtime_choice(vgg):
    # vgg's MaxPool backward scatters into zeros that ORT folds into session constants.
    program = compile(vgg, tile=64, image=(64, 64), with_flops=False)

    def constants(**policy) -> int:
        return plan_program(program, policy=RuntimePolicy(**policy)).resident.constants

    # Backward graphs fold only where the policy lets ORT fold them.
    kept_forward = constants()  # the runtime's default
    assert constants(fold_constants="forward", backward_optimization="basic") == kept_forward
    assert constants(fold_constants="none") <= kept_forward
    assert constants(fold_constants="all") > kept_forward
    with pytest.raises(StreamcError):
        RuntimePolicy(fold_constants="some")
    with pytest.raises(StreamcError):
        RuntimePolicy(backward_optimization="some")


def test_plan_grows_with_tile_size(vgg_plans):
    assert [p.tile for p in vgg_plans] == [24, 36, 64]
    for smaller, larger in zip(vgg_plans, vgg_plans[1:]):
        assert smaller.forward_peak <= larger.forward_peak
        assert smaller.backward_peak <= larger.backward_peak
        assert smaller.overhead >= larger.overhead
        # Above what stays resident and the baked sessions' weight copies (both grow with the
        # number of shape classes: each session keeps its constants, run state and, baked, a
        # copy of its weights), the peak grows with the tile.
        assert (smaller.peak - smaller.plan.resident.total - smaller.plan.baked_sessions
                <= larger.peak - larger.plan.resident.total - larger.plan.baked_sessions)
        assert smaller.plan.baked_sessions >= larger.plan.baked_sessions
    # one tile keeps its activations: no recompute, fewer FLOPs than untiled with one
    one = vgg_plans[-1]
    assert one.forward_overhead == pytest.approx(1.0) and one.backward_overhead < 1.0
    json.dumps([p.to_dict() for p in vgg_plans])


def test_search_respects_the_budget_and_compiles_each_candidate_once(vgg, vgg_plans):
    middle = sorted(p.peak for p in vgg_plans)[1]
    search = search_tiles(vgg, (64, 64), tiles=[24, 36, 64], budget=middle)
    plan = search.chosen
    assert plan.peak <= middle
    fitting = [p for p in vgg_plans if p.peak <= middle]
    assert plan.overhead == min(p.overhead for p in fitting)
    # From the largest tile down to the first that fits, each compiled once; the chosen
    # program is the compiled one.
    assert search.compiled == len(search.plans) == len([p for p in vgg_plans
                                                        if p.tile >= plan.tile])
    assert plan.program.meta.memory_plan["peak"] == plan.peak
    # A budget that holds everything buys the whole image in one tile: no recompute.
    tile, plan = _choose(vgg, "1GiB")
    assert tile == 64 and plan.forward_overhead == pytest.approx(1.0) and plan.overhead < 1.0


def test_too_small_a_budget_names_the_smallest_that_works(vgg, vgg_plans):
    least = min(p.peak for p in vgg_plans)
    with pytest.raises(CompileError) as info:
        _choose(vgg, least - 1)
    message = str(info.value)
    assert f"at least {least} bytes" in message
    assert "too small" in message
    tile, plan = _choose(vgg, least)
    assert plan.peak == least
    # With the default candidates: every one is planned, and the least of them named.
    everything = search_tiles(vgg, (64, 64)).plans
    least = min(p.peak for p in everything)
    with pytest.raises(CompileError) as info:
        search_tiles(vgg, (64, 64), budget=least - 1)
    message = str(info.value)
    match = re.search(r"needs is .* \((\d+) bytes, tile (\d+)\)", message)
    assert match and "planned tile size" in message, message
    tile, plan = _choose(vgg, int(match.group(1)), tiles=None)
    assert plan.peak == int(match.group(1))


def test_with_halo_reuse_a_budget_gets_tiles_smaller_than_the_receptive_field():
    """Recomputing halos, the candidates start at twice the halo (here all of the 512² image);
    with halo reuse a tile costs no recompute, so they go down to 256² and a budget below the
    one-tile plan gets a 2x2 grid instead of an error. Tiles giving the same grid are planned
    once."""
    import torch

    from streamc.export import export_torch
    from streamc.tile_search import candidate_tiles

    torch.manual_seed(0)
    layers: list = []
    for k in range(4):
        layers += [torch.nn.Conv2d(3 if k == 0 else 4, 4, 3, 2, 1), torch.nn.ReLU()]
    for _ in range(10):                     # at stride 16: the receptive field reaches 351 px
        layers += [torch.nn.Conv2d(4, 4, 3, 1, 1), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 2)).eval()
    model = export_torch(net, (1, 3, 512, 512))
    analysis = streamc.analyze(model, (512, 512))
    assert candidate_tiles(analysis, halo="recompute") == [512]
    assert candidate_tiles(analysis, halo="reuse") == [256, 512]
    one_tile = search_tiles(model, (512, 512), tiles=[512], optimizer_copies=0).plans[0]
    with pytest.raises(CompileError, match="too small"):
        search_tiles(model, (512, 512), budget=one_tile.peak - 1, optimizer_copies=0,
                     halo="recompute")
    search = search_tiles(model, (512, 512), budget=one_tile.peak - 1, optimizer_copies=0)
    assert search.chosen.tile == 256 and search.chosen.grid == [2, 2]
    assert search.chosen.peak < one_tile.peak and search.compiled == 2


def test_a_hopeless_budget_is_refused_before_compiling(vgg, monkeypatch):
    """What every tiling keeps resident (image, weights, gradients, optimizer state, cut
    tensors) above the budget: refused at once, naming it, with no compilation."""
    from streamc import tile_search

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled a candidate for a hopeless budget")

    monkeypatch.setattr(tile_search, "compile_state", no_compile)
    with pytest.raises(CompileError, match="cannot fit this model.*alone take"):
        search_tiles(vgg, (64, 64), budget=1000)


def test_conventional_keeps_what_autograd_keeps():
    # x (1x1x10x10) -> Conv 3x3 (2 ch) -> Relu -> GlobalAveragePool -> Flatten -> Gemm (3).
    inits = [numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "conv.weight"),
             numpy_helper.from_array(np.ones((3, 2), np.float32), "fc.weight"),
             numpy_helper.from_array(np.zeros(3, np.float32), "fc.bias")]
    nodes = [_node("Conv", ["x", "conv.weight"], ["c"], pads=[1, 1, 1, 1]),
             _node("Relu", ["c"], ["r"]), _node("GlobalAveragePool", ["r"], ["g"]),
             _node("Flatten", ["g"], ["f"]), _node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"],
                                                   transB=1)]
    model = _model(nodes, [("x", S)], [("y", [1, 3])], inits)
    plan = plan_conventional(streamc.analyze(model))
    assert plan.image == B
    assert plan.parameters == plan.gradients == 4 * (18 + 6 + 3)
    assert plan.optimizer == 2 * plan.gradients
    # Kept for backward: the Relu's output r (also the pool's input) and the Gemm's input f;
    # the Conv's input is the image, its weight a parameter.
    assert plan.activations == 800 + 8
    # Backward peak at the Relu's backward: r kept, the gradients of r and of c (800 each).
    assert plan.backward == 3 * 800 - plan.activations
    assert plan.all_activations == 800 + 800 + 8 + 12  # c, r, g, y (f is a view)
    assert plan.total == (plan.image + plan.parameters + plan.gradients + plan.optimizer
                          + plan.activations + plan.backward)


# ------------------------------------------------------------------------------------------------
# Sizes and plots


@pytest.mark.parametrize("text, expected", [
    ("4GiB", 4 * 2**30), ("512MiB", 512 * 2**20), ("8GB", 8 * 10**9), ("1000000", 10**6),
    ("1.5 GiB", 3 * 2**29), ("64kib", 65536), ("2k", 2000), ("  7 B ", 7), (12345, 12345),
    ("3T", 3 * 10**12), ("1gi", 2**30), ("1PiB", 2**50), ("2PB", 2 * 10**15),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "4 GiBs", "-1", "0", "1e9", "GiB", "0.1B", 0, -5])
def test_parse_bytes_rejects_nonsense(text):
    with pytest.raises(StreamcError, match="memory size"):
        parse_bytes(text)


def test_format_bytes():
    assert format_bytes(3 * 2**29) == "1.50 GiB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 2**50) == "3.00 PiB"


def test_plot_needs_matplotlib(monkeypatch, vgg_plans, tmp_path):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(StreamcError, match="pip install"):
        plot_plans(vgg_plans, vgg_plans[0].conventional, "2MiB", tmp_path / "plot.png")
    assert not (tmp_path / "plot.png").exists()


def test_plot_writes_a_file(vgg_plans, tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_plans(vgg_plans, vgg_plans[0].conventional, "2MiB", tmp_path / "plot.png")
    assert path.exists() and path.stat().st_size > 1000
