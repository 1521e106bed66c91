"""The torch runtime: StreamingModel against torch on the full image, and its torch contract.

Reference: each zoo model's torch twin (same parameter names as the ONNX initializers), run on
the whole image in eval mode (frozen BatchNorm), is what a streamed training step must equal.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import io
import pickle
import sys
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch.nn import functional as F

import zoo
from streamc.compiler import compile as compile_program
from streamc.errors import InputError, StreamcError
from streamc.runtime.module import ESCAPED, MODEL_GRAPH, StreamingModel, escape, unescape
from streamc.runtime.providers import DeviceError
from streamc.runtime.sessions import SessionPool
from streamc.runtime.weights import snapshot_weights

# (zoo name, image size, tile): several tiles each, few shape classes (fast session builds).
CONFIGS = {
    "resnet": ((128, 128), 96),  # frozen BN, residual DAG, stride 16: 3x3 tiles
    "twocut": ((64, 64), 40),  # two cut tensors read by the head: 2x2 tiles
    "vgg": ((48, 48), 32),  # max pools: 4x4 tiles
}

_PROGRAMS: dict = {}


def program_for(name: str, reduce_final: bool = True, grid_end: str | None = "auto"):
    key = (name, reduce_final, grid_end)
    if key not in _PROGRAMS:
        size, tile = CONFIGS[name]
        z = zoo.build(name, (1, 3, *size))
        _PROGRAMS[key] = compile_program(z.onnx_model, tile=tile, image=size, with_flops=False,
                                         reduce_final=reduce_final, grid_end=grid_end)
    return _PROGRAMS[key]


def twin(name: str) -> torch.nn.Module:
    """A fresh copy of the zoo model's torch module (eval mode: BatchNorm frozen)."""
    size, _ = CONFIGS[name]
    return copy.deepcopy(zoo.build(name, (1, 3, *size)).module).eval()


def images(name: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size, _ = CONFIGS[name]
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 3, *size), generator=g)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.detach().abs().max().item()
    diff = (a.detach() - b.detach()).abs().max().item()
    return diff / scale if scale > 0 else diff


# --------------------------------------------------------------------------------------------
# Training equals torch on the full image


@pytest.mark.parametrize("name", ["resnet", "twocut"])
def test_training_steps_match_torch(name: str) -> None:
    program = program_for(name)
    assert len(program.tiles) > 1
    model = StreamingModel(program)
    reference = twin(name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-3)
    ref_params = dict(reference.named_parameters())
    assert set(model.onnx_parameters) <= set(ref_params)
    targets = torch.tensor([1, 7])
    for step in range(5):
        x = images(name, seed=step)
        loss = F.cross_entropy(model(x), targets)
        ref_loss = F.cross_entropy(reference(x), targets)
        assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()), step
        opt.zero_grad()
        ref_opt.zero_grad()
        loss.backward()
        ref_loss.backward()
        if step == 0:
            for pname, p in model.onnx_parameters.items():
                assert p.grad is not None, pname
                assert rel(p.grad, ref_params[pname].grad) <= 1e-4, pname
        opt.step()
        ref_opt.step()
        if step == 0:
            for pname, p in model.onnx_parameters.items():
                assert rel(p, ref_params[pname]) <= 1e-5, pname
    for pname, p in model.onnx_parameters.items():
        assert rel(p, ref_params[pname]) <= 1e-4, pname
    # Buffers (BatchNorm statistics) are not trained.
    ref_buffers = dict(reference.named_buffers())
    for bname, b in model.onnx_buffers.items():
        assert torch.equal(b, ref_buffers[bname])


def test_weights_as_inputs_equal_initializers_and_sessions_rebuild_once_per_step() -> None:
    program = program_for("twocut")
    a = StreamingModel(program, weights="initializers")
    b = StreamingModel(program, weights="inputs")
    x = images("twocut")
    outs = []
    for model in (a, b):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
        outs.append(model(x).detach())
    assert rel(outs[0], outs[1]) <= 1e-5
    pool_a = a._runtime.interpreter(a.device).backend.pool
    pool_b = b._runtime.interpreter(b.device).backend.pool
    # Per tile class, the global graph that combines the pooled partials, and the head; and
    # the strided conv's gradient layout graph, which reads no weights (no prepare graph).
    forward_graphs = len(program.classes) + len(program.meta.globals) + 1
    work = program.meta.weight_work
    assert work.layout and not work.prepare
    n_graphs = 2 * forward_graphs
    assert pool_b.builds == n_graphs + 1  # built once
    # initializers: every graph with weights per step (2 steps), then the forward graphs for
    # the last call; the layout graph once.
    assert pool_a.builds == 2 * n_graphs + forward_graphs + 1
    with torch.no_grad():
        a(x)  # the unit that keeps its activations runs its plain forward graph here
        built = pool_a.builds
        for _ in range(2):
            a(x)
    assert built == 2 * n_graphs + forward_graphs + 1 + len(program.meta.kept)
    assert pool_a.builds == built  # unchanged weights: reused


def test_auto_weights_feed_unoptimised_backward_graphs() -> None:
    program = program_for("twocut")  # 2x2 tiles, each its own shape class
    model = StreamingModel(program)  # weights="auto", backward_optimization="none"
    pool = model._runtime.interpreter(model.device).backend.pool
    graphs = len(program.classes) + len(program.meta.globals) + 1  # with the pool's and head
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # batch 4: four runs per backward graph and step, still fed
        opt.zero_grad()
        model(images("twocut", batch=4)).square().sum().backward()
        opt.step()
    # Every session is fed and built once (the hoisted weight work's graphs too).
    work = program.meta.weight_work
    assert pool.builds == 2 * graphs + bool(work.prepare) + bool(work.layout)
    assert {baked for (_name, baked) in pool.live} == {False}


def test_system_allocator_turns_the_arena_off() -> None:
    program = program_for("twocut")
    options = StreamingModel(program, allocator="system")._runtime.options
    assert options.arena is False and options.malloc_threshold == 64 * 2**10
    assert StreamingModel(program)._runtime.options.arena == "shared"
    with pytest.raises(StreamcError, match="allocator='malloc'"):
        StreamingModel(program, allocator="malloc")  # type: ignore[arg-type]


def test_auto_weights_bake_only_often_run_optimised_backward_graphs() -> None:
    program = program_for("twocut")  # 2x2 tiles, each its own shape class
    model = StreamingModel(program)  # weights="auto"
    options = model._runtime.options
    model._runtime.options = dataclasses.replace(
        options, policy=dataclasses.replace(options.policy, backward_optimization="all"))
    pool = model._runtime.interpreter(model.device).backend.pool
    graphs = len(program.classes) + len(program.meta.globals) + 1  # with the pool's and head
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # batch 2: each backward graph runs twice per step: weights fed
        opt.zero_grad()
        model(images("twocut", batch=2)).square().sum().backward()
        opt.step()
    work = program.meta.weight_work
    assert pool.builds == 2 * graphs + bool(work.prepare) + bool(work.layout)
    assert {baked for (_name, baked) in pool.live} == {False}
    builds = pool.builds
    opt.zero_grad()  # batch 4: four runs per step: the backward graphs are baked
    model(images("twocut", batch=4)).square().sum().backward()
    assert pool.builds == builds + graphs
    reference = twin("twocut")
    reference.load_state_dict(model.state_dict())
    x = images("twocut", batch=4)
    reference(x).square().sum().backward()
    grads = dict(reference.named_parameters())
    for pname, p in model.onnx_parameters.items():
        assert rel(p.grad, grads[pname].grad) <= 1e-4, pname


def test_arena_shrinkage_gives_the_same_step() -> None:
    program = program_for("twocut")
    grads = []
    for shrink in (False, True):
        model = StreamingModel(program)
        model._runtime.options = dataclasses.replace(model._runtime.options,
                                                     shrink_arena=shrink)
        model(images("twocut", batch=2)).square().sum().backward()
        pool = model._runtime.interpreter(model.device).backend.pool
        assert (pool._run_options is not None) == shrink
        grads.append({n: p.grad.clone() for n, p in model.onnx_parameters.items()})
    for name, value in grads[0].items():
        assert torch.equal(value, grads[1][name]), name


def test_session_threads_spin_only_while_their_session_runs() -> None:
    program = program_for("twocut")
    grads = []
    expected = {"run": ("1", "1"), "always": ("1", "0"), "never": ("0", "0")}
    for spin, (allow, stop) in expected.items():
        model = StreamingModel(program)
        model._runtime.options = dataclasses.replace(model._runtime.options, spin_threads=spin)
        pool = model._runtime.interpreter(model.device).backend.pool
        for role in ("forward", "backward"):
            options = pool._session_options(role)
            assert options.get_session_config_entry("session.intra_op.allow_spinning") == allow
            assert options.get_session_config_entry("session.force_spinning_stop") == stop
        model(images("twocut", batch=2)).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.onnx_parameters.items()})
    assert StreamingModel(program)._runtime.options.spin_threads == "run"
    for other in grads[1:]:
        for name, value in grads[0].items():
            assert torch.equal(value, other[name]), name


def test_stream_gradients_match_torch() -> None:
    # the head reads the feature map whole; the whole grid: stream() returns what it ends with
    program = program_for("vgg", reduce_final=False, grid_end=None)
    model = StreamingModel(program)
    reference = twin("vgg")
    x = images("vgg", batch=2)
    cut = model.stream(x)
    assert isinstance(cut, torch.Tensor) and cut.requires_grad
    ref_cut = reference.features(x)
    assert cut.shape == ref_cut.shape
    assert rel(cut, ref_cut) <= 1e-5
    cotangent = torch.randn(cut.shape, generator=torch.Generator().manual_seed(3))
    (cut * cotangent).sum().backward()
    (ref_cut * cotangent).sum().backward()
    ref_params = dict(reference.named_parameters())
    for pname, p in model.onnx_parameters.items():
        if pname.startswith("head."):
            assert p.grad is None  # the head is not used by stream()
        else:
            assert rel(p.grad, ref_params[pname].grad) <= 1e-4, pname


def test_stream_of_a_pooled_program_gives_the_pooled_features() -> None:
    model = StreamingModel(program_for("vgg", grid_end=None))  # the pool runs tile by tile
    reference = twin("vgg")
    x = images("vgg", batch=2)
    pooled = model.stream(x)
    ref_pooled = reference.features(x).mean(dim=(2, 3), keepdim=True)
    assert pooled.shape == ref_pooled.shape == (2, 16, 1, 1)
    assert rel(pooled, ref_pooled) <= 1e-5
    pooled.sum().backward()
    ref_pooled.sum().backward()
    ref_params = dict(reference.named_parameters())
    for pname, p in model.onnx_parameters.items():
        if not pname.startswith("head."):
            assert rel(p.grad, ref_params[pname].grad) <= 1e-4, pname


def test_two_cut_stream_returns_a_tuple() -> None:
    model = StreamingModel(program_for("twocut", grid_end=None))
    cuts = model.stream(images("twocut", batch=1))
    assert isinstance(cuts, tuple) and len(cuts) == 2 == len(model.cut_names)
    sum(c.sum() for c in cuts).backward()
    assert model.onnx_parameters["stem.0.weight"].grad is not None


# --------------------------------------------------------------------------------------------
# Inference, inputs, batches


def test_no_grad_keeps_nothing() -> None:
    model = StreamingModel(program_for("twocut"))
    x = images("twocut")
    ref = weakref.ref(x)
    with torch.no_grad():
        y = model(x)
    assert y.grad_fn is None and not y.requires_grad
    pool = model._runtime.interpreter(model.device).backend.pool
    meta = model.program.meta
    assert pool.builds == len(meta.classes) + len(meta.globals) + 1  # forward graphs only
    assert pool.live and not any("backward" in name for name, _ in pool.live)
    del x
    gc.collect()
    assert ref() is None  # nothing holds the image
    # With gradients on, the image is kept for the backward pass, and released after it.
    x = images("twocut")
    ref = weakref.ref(x)
    y = model(x)
    del x
    gc.collect()
    assert ref() is not None
    y.sum().backward()
    del y
    gc.collect()
    assert ref() is None


def test_numpy_input_and_batches() -> None:
    model = StreamingModel(program_for("twocut"))
    reference = twin("twocut")
    x = images("twocut", batch=3)
    with torch.no_grad():
        y = model(x.numpy())
        y_read_only = model(np.require(x.numpy(), requirements="C").copy())
        expected = reference(x)
    assert y.shape == (3, 10)
    assert rel(y, expected) <= 1e-5
    assert torch.equal(y, y_read_only)
    # A batch of 3 equals 3 batches of 1 (outputs concatenated, gradients summed).
    with torch.no_grad():
        singles = torch.cat([model(x[i:i + 1]) for i in range(3)])
    assert rel(y, singles) <= 1e-6


def test_requires_grad_false_parameters_get_no_grad() -> None:
    model = StreamingModel(program_for("twocut"))
    for pname, p in model.onnx_parameters.items():
        p.requires_grad_(pname.startswith("fc."))
    model(images("twocut")).sum().backward()
    for pname, p in model.onnx_parameters.items():
        assert (p.grad is not None) == pname.startswith("fc."), pname


# --------------------------------------------------------------------------------------------
# Errors


@pytest.fixture(scope="module")
def small_model() -> StreamingModel:
    return StreamingModel(program_for("twocut"))


@pytest.mark.parametrize(
    "image, message",
    [
        (torch.zeros(1, 1, 64, 64), "1 channels, the program was compiled for 3"),
        (torch.zeros(1, 3, 64, 48), "64x48 but this program was compiled for 64x64"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.float64), "float32"),
        (np.zeros((1, 3, 64, 64), dtype=np.uint8), "float32"),
        (torch.zeros(3, 64, 64), "3 axes"),
        (torch.zeros(0, 3, 64, 64), "batch is 0"),
        ([[0.0]], "torch tensor or a numpy array"),
    ],
)
def test_input_errors(small_model: StreamingModel, image, message: str) -> None:
    with pytest.raises(InputError, match=message):
        small_model(image)


def test_program_compiled_for_another_size() -> None:
    z = zoo.build("twocut", (1, 3, 48, 48))
    program = compile_program(z.onnx_model, tile=32, image=(48, 48), with_flops=False)
    model = StreamingModel(program)
    with pytest.raises(InputError, match=r"64x64 but this program was compiled for 48x48.*"
                                         r"compile another program"):
        model(torch.zeros(1, 3, 64, 64))
    assert isinstance(InputError("x"), StreamcError)


def test_cuda_without_gpu_or_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    program = program_for("twocut")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="torch.cuda.is_available"):
            StreamingModel(program, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(DeviceError, match="onnxruntime-gpu instead"):
        StreamingModel(program, device="cuda")
    assert issubclass(DeviceError, StreamcError)


def _cuda_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not _cuda_ready(), reason="needs a GPU, CUDA torch and onnxruntime-gpu")
@pytest.mark.parametrize("weights", ["initializers", "inputs"])
def test_cuda_training_step_matches_cpu(weights: str) -> None:
    program = program_for("resnet")
    cpu = StreamingModel(program, weights=weights)
    gpu = StreamingModel(program, device="cuda", weights=weights)
    assert all(p.is_cuda for p in gpu.parameters())
    x = images("resnet")
    targets = torch.tensor([1, 7])
    for model, device in ((cpu, "cpu"), (gpu, "cuda")):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x.to(device)), targets.to(device)).backward()
            opt.step()
    for pname, p in cpu.onnx_parameters.items():
        assert rel(gpu.onnx_parameters[pname].cpu(), p) <= 1e-4, pname


# --------------------------------------------------------------------------------------------
# torch contract: state_dict, optimizers, copies, export


def test_state_dict_round_trip() -> None:
    program = program_for("resnet")
    model = StreamingModel(program)
    keys = list(model.state_dict())
    names = [p.name for p in program.meta.parameters]
    assert sorted(keys) == sorted(names)  # keys are the ONNX initializer names
    assert dict(model.named_parameters()).keys() == model.onnx_parameters.keys()
    assert "bn1.running_mean" in model.onnx_buffers
    assert "bn1.running_mean" not in dict(model.named_parameters())
    assert model.conv1.weight is model.onnx_parameters["conv1.weight"]
    # Train a step, save, load into a fresh model: same outputs.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = images("resnet")
    model(x).square().sum().backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fresh = StreamingModel(program)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # The torch twin's state_dict loads directly (its extra num_batches_tracked aside).
    fresh.load_state_dict(twin("resnet").state_dict(), strict=False)
    with torch.no_grad():
        assert rel(fresh(x), twin("resnet")(x)) <= 1e-5


def test_escaped_names() -> None:
    model = StreamingModel(program_for("twocut"))
    for name in ["a..b", ".a", "forward.weight", "stream", "training", "fc"]:
        assert model._module_path(name) is None, name
    assert model._module_path("fc.extra") == ("fc", "extra")
    assert model._module_path("new.0.weight") == ("new", "0", "weight")
    assert unescape(escape("a.b%2E.c%")) == "a.b%2E.c%"
    assert escape("a..b") == "%a%2E%2Eb"
    model._register("forward", torch.zeros(3), trainable=False)
    assert model.state_key("forward") == f"{ESCAPED}.%forward"
    model._register("forward.x", torch.ones(2), trainable=True)
    key = model.state_key("forward.x")
    assert key == f"{ESCAPED}.{escape('forward.x')}" == f"{ESCAPED}.%forward%2Ex"
    assert key in model.state_dict()
    assert model.onnx_parameters["forward.x"] is dict(model.named_parameters())[key]
    state = model.state_dict()
    state[key] = torch.full((2,), 3.0)
    model.load_state_dict(state)
    assert torch.equal(model.onnx_parameters["forward.x"].detach(), torch.full((2,), 3.0))


def test_optimizers_schedulers_and_fused_updates_are_seen() -> None:
    program = program_for("twocut")
    model = StreamingModel(program)
    x = images("twocut")
    targets = torch.tensor([1, 7])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), targets)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert sched.get_last_lr()[0] == pytest.approx(0.0125)
    # Fused optimizers update in place without bumping tensor versions: still detected.
    fused = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    with torch.no_grad():
        before = model(x)
    versions = [p._version for p in model.parameters()]
    model(x).sum().backward()
    fused.step()
    assert [p._version for p in model.parameters()] == versions
    with torch.no_grad():
        after = model(x)
    reference = twin("twocut")
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.equal(before, after)
        assert rel(after, reference(x)) <= 1e-5
    # .data writes are seen as well.
    with torch.no_grad():
        model.onnx_parameters["fc.bias"].data.add_(1.0)
        assert rel(model(x), after + 1.0) <= 1e-5


def test_snapshot_reuses_unchanged_weights() -> None:
    tensors = {"w": torch.ones(3), "b": torch.zeros(2)}
    first = snapshot_weights(tensors, None)
    assert snapshot_weights(tensors, first) is first
    tensors["w"].add_(1)
    second = snapshot_weights(tensors, first)
    assert second is not first and second.generation > first.generation
    assert torch.equal(first.tensors["w"], torch.ones(3))  # a private copy


def test_deepcopy_pickle_train_eval() -> None:
    model = StreamingModel(program_for("twocut"))
    x = images("twocut")
    with torch.no_grad():
        y = model(x)
    clone = copy.deepcopy(model)
    assert clone.program is model.program
    with torch.no_grad():
        assert torch.equal(clone(x), y)
    restored = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert torch.equal(restored(x), y)
    model.eval()
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(x), y)  # BatchNorm is frozen in both modes
    model.train()
    assert model.training


def test_export_onnx(tmp_path: Path) -> None:
    import onnxruntime as ort

    z = zoo.build("twocut", (1, 3, 64, 64))
    program = compile_program(z.onnx_model, tile=40, image=(64, 64), with_flops=False)
    model = StreamingModel(program)
    assert MODEL_GRAPH in program.graphs
    x = images("twocut", batch=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).square().sum().backward()
    opt.step()
    path = model.export_onnx(tmp_path / "trained.onnx")
    onnx.checker.check_model(onnx.load(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [program.input_name]
    (exported,) = session.run(None, {program.input_name: x.numpy()})
    with torch.no_grad():
        assert rel(torch.from_numpy(exported), model(x)) <= 1e-5


# --------------------------------------------------------------------------------------------
# Memory and progress


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_memory_flat_over_training_steps() -> None:
    z = zoo.build("vgg", (1, 3, 256, 256))
    program = compile_program(z.onnx_model, tile=128, image=(256, 256), with_flops=False)
    model = StreamingModel(program)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(1, 3, 256, 256)
    targets = torch.tensor([3])
    rss = []
    for _ in range(12):
        opt.zero_grad()
        F.cross_entropy(model(x), targets).backward()
        opt.step()
        gc.collect()
        rss.append(_rss_mib())
    warm = rss[3:]
    # No growth step to step: the last steps hold no more than the first warm ones (plus noise).
    assert max(warm[-3:]) - min(warm[:3]) < 8.0, rss


def test_progress_is_silent_off_terminal(capsys: pytest.CaptureFixture) -> None:
    model = StreamingModel(program_for("vgg"))
    assert not sys.stderr.isatty()
    with torch.no_grad():
        model(images("vgg", batch=1))
    assert capsys.readouterr().err == ""
    shown = StreamingModel(program_for("vgg"), progress=True)
    with torch.no_grad():
        shown(images("vgg", batch=1))
    assert "tile" in capsys.readouterr().err


def test_the_shared_arena_is_sized_from_the_plan() -> None:
    """The default CPU arena grows by powers of two from a first region that holds the largest
    planned graph run (docs/memory.md); without a plan ORT's default."""
    from streamc.runtime.allocators import MAX_ARENA_REGION, arena_reserve_for
    from streamc.runtime.options import RuntimeOptions

    options = RuntimeOptions()
    assert options.arena_extend == "pow2" and options.arena_reserve == "auto"
    mib = 2**20
    assert arena_reserve_for(273 * mib) == 512 * mib
    assert arena_reserve_for(1038 * mib) == MAX_ARENA_REGION
    assert arena_reserve_for(40 * mib) == 64 * mib and arena_reserve_for(0) == 0
    # from the stored plan, or planned at once for a program compiled without one
    program = program_for("twocut")
    stored = program.meta.memory_plan
    planned = max(stored["backward_peak"], stored["forward_peak"])
    pool = SessionPool(program)
    assert pool._largest_graph_peak() == planned
    assert planned < arena_reserve_for(planned) <= 2 * planned
    size, tile = CONFIGS["twocut"]
    bare = compile_program(zoo.build("twocut", (1, 3, *size)).onnx_model, tile=tile, image=size,
                           with_flops=False, with_memory_plan=False)
    assert bare.meta.memory_plan is None
    assert SessionPool(bare)._largest_graph_peak() == planned
