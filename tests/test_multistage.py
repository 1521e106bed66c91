"""Whole-image statistics inside the network (issue 14): multi-stage programs are exact.

Squeeze-and-excitation, GroupNorm, InstanceNorm and channels-last ConvNeXt blocks
(:mod:`tests.blocks`, written here as torch modules) are exported with
:func:`streamc.export_torch`, compiled into several tiles, run by the interpreter and compared
with torch autograd on the full image: outputs and every weight gradient, within the bounds of
:func:`tests.test_exactness.assert_matches_torch` (torch float64 as the reference, 1e-5 or 4x
torch float32's own error).
"""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
from torch.nn import functional as F

import streamc
import zoo
from streamc.compiler import compile as compile_program
from streamc.export import export_torch
from streamc.runtime.module import StreamingModel
from tests import blocks
from tests.test_exactness import assert_matches_torch

# name -> (module factory, input shape, tile, stages: how many tile passes the program makes)
CASES = {
    "se_efficientnet": (lambda: blocks.SENet("efficientnet"), (1, 3, 64, 64), 32, 4),
    "se_mobilenetv3": (lambda: blocks.SENet("mobilenet"), (1, 3, 48, 40), 32, 4),
    "convnext": (blocks.ConvNeXtNet, (1, 3, 192, 160), 112, 1),
    "groupnorm_unet_2d": (lambda: blocks.NormUNet("group", 2), (1, 1, 48, 48), 24, 5),
    "instancenorm_unet_2d": (lambda: blocks.NormUNet("instance", 2), (1, 1, 40, 48), 24, 5),
    "groupnorm_unet_3d": (lambda: blocks.NormUNet("group", 3, linear_upsampling=True),
                          (1, 1, 16, 20, 16), 12, 5),
    "instancenorm_unet_3d": (lambda: blocks.NormUNet("instance", 3), (1, 1, 16, 16, 20), 12, 5),
    "padded_convs": (blocks.PaddedConvs, (1, 3, 40, 36), 24, 1),
}

_BUILT: dict = {}


def built(name: str):
    """(torch module, ONNX export, program) of a case, compiled once per session."""
    if name not in _BUILT:
        factory, shape, tile, _ = CASES[name]
        torch.manual_seed(0)
        module = zoo.randomize_parameters(factory())
        model = export_torch(module, shape)
        program = compile_program(model, tile=tile, image=shape[2:], with_flops=False)
        _BUILT[name] = module, model, program
    return _BUILT[name]


@pytest.mark.parametrize("name", sorted(CASES))
def test_block_matches_torch(name: str) -> None:
    module, model, program = built(name)
    shape, stages = CASES[name][1], CASES[name][3]
    assert len(program.tiles) > 1
    assert len(program.meta.stages) == stages
    # Every torch parameter is a program parameter under its state_dict name (PReLU slopes
    # and GroupNorm's affine weights included, though the graph reshapes them).
    assert set(program.meta.trainable) == {n for n, _ in module.named_parameters()}
    assert_matches_torch(program, module, model, zoo.random_image(shape, seed=3))


def test_streaming_model_training_step_matches_torch() -> None:
    """Two Adam steps through :class:`StreamingModel` (several stages, batch of two) match
    the torch module's."""
    module, _, program = built("se_efficientnet")
    model = StreamingModel(program, threads=1)
    reference = copy.deepcopy(module)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-3)
    ref_params = dict(reference.named_parameters())
    g = torch.Generator().manual_seed(0)
    targets = torch.tensor([0, 2])
    for step in range(2):
        x = torch.randn((2, 3, 64, 64), generator=g)
        loss = F.cross_entropy(model(x), targets)
        ref_loss = F.cross_entropy(reference(x), targets)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
        opt.zero_grad()
        ref_opt.zero_grad()
        loss.backward()
        ref_loss.backward()
        for pname, p in model.onnx_parameters.items():
            ref = ref_params[pname].grad
            scale = ref.abs().max().item() or 1.0
            assert (p.grad - ref).abs().max().item() <= 1e-4 * scale, (step, pname)
        opt.step()
        ref_opt.step()


def test_saved_multistage_program_runs_the_same(tmp_path) -> None:
    module, model, program = built("se_mobilenetv3")
    loaded = streamc.load(program.save(tmp_path / "p"))
    assert loaded.meta.to_json() == program.meta.to_json()
    assert_matches_torch(loaded, module, model, zoo.random_image(CASES["se_mobilenetv3"][1]))


def test_border_ops_stream() -> None:
    """Reflect and replicate padding, a zero-width replicate pad and bilinear upsampling are
    local: the whole network is one stage whose output is the model's."""
    _, model, program = built("padded_convs")
    assert program.cut_tensors == ["logits"]
    assert {n.op_type for n in model.graph.node} >= {"Pad", "Resize"}
    assert not streamc.analyze(model, CASES["padded_convs"][1][2:]).stops


def test_low_streamed_share_is_said() -> None:
    """A network whose grid ends after the stem: compile says streaming buys little, and why."""

    class StemOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.body = torch.nn.Sequential(*[torch.nn.Conv2d(8, 8, 3, padding=1)
                                              for _ in range(4)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.stem(x)[:, :, 1:, 1:]  # a Slice: not in the table, the grid ends here
            return self.body(y).mean((2, 3))

    model = export_torch(StemOnly().eval(), (1, 3, 32, 32))
    program = compile_program(model, tile=24, image=(32, 32))
    assert program.meta.streamed["flops"] < 0.5
    assert any("streaming buys little" in n and "Slice" in n for n in program.meta.notes)
    full = built("se_efficientnet")[2].meta.streamed
    assert full["flops"] > 0.99 and full["activations"] > 0.95


def test_command_line_reports_stages_and_share(tmp_path) -> None:
    """`inspect` lists the stages and reductions, `compile` the stages and what they keep,
    both the streamed share."""
    from tests.test_cli import run

    _, model, _ = built("groupnorm_unet_2d")
    path = tmp_path / "gn.onnx"
    onnx.save(model, path)
    code, out, err = run("inspect", str(path), "--image", "48x48")
    assert code == 0, err
    assert "stages:       5" in out and "whole-image reductions: ReduceMean" in out
    assert "streamed:     100% of the forward FLOPs" in out
    code, out, err = run("compile", str(path), "--image", "48x48", "--tile", "24",
                         "-o", str(tmp_path / "gn.streamc"))
    assert code == 0, err
    assert "stages:       5, with 4 global graphs" in out and "kept whole between stages" in out
    assert "streamed:     100% of the forward FLOPs" in out


@pytest.mark.parametrize("name", ["instancenorm_unet_2d", "groupnorm_unet_3d"])
def test_stages_keep_float32_activations(name: str) -> None:
    """A normalisation's float64 path casts its input in the stage that reads it: what stays
    whole between the stages is the float32 activation, never a float64 copy of it."""
    _, _, program = built(name)
    kept = [b for b in program.meta.buffers if b.kind == "grid"]
    assert kept
    assert {b.elem_type for b in kept} == {onnx.TensorProto.FLOAT}


def test_buffers_are_freed_after_their_last_use(monkeypatch) -> None:
    """Backward frees each whole buffer and gradient buffer after the last step that uses it,
    and the memory plan counts the same lives: what the interpreter holds at each tile's
    backward never exceeds the plan's buffer peak, which is below keeping every buffer and
    its gradient to the end; nothing is left when backward returns."""
    from streamc.runtime.interpreter import Interpreter

    module, _, program = built("instancenorm_unet_2d")
    held: list[int] = []
    states = []
    original = Interpreter._tile_backward

    def spy(self, step, state, c, grads, *rest):
        held.append(sum(t.nbytes for store in (state.buffers[c], grads)
                        for t in store.values()))
        if not states or states[-1] is not state:
            states.append(state)
        return original(self, step, state, c, grads, *rest)

    monkeypatch.setattr(Interpreter, "_tile_backward", spy)
    model = StreamingModel(program, progress=False)
    model.load_state_dict(module.state_dict(), strict=False)
    shape = CASES["instancenorm_unet_2d"][1]
    model(zoo.random_image(shape, seed=1)).square().sum().backward()
    planned = program.memory_plan["buffers"]
    everything = 2 * sum(b.nbytes for b in program.meta.buffers)
    assert held and max(held) <= planned < everything
    assert states and not any(states[0].buffers)


@pytest.mark.parametrize("name,tile", [("se_mobilenetv3", 8), ("instancenorm_unet_2d", 8)])
def test_tiles_smaller_than_a_later_stages_halo(name: str, tile: int) -> None:
    """Under halo reuse the tile counts what a tile owns of the image: a later stage's crop
    (its input buffer's halo, widened by the skew of the owned boundaries at depth) may be far
    wider than the tile, and the step is still exact."""
    factory, shape, _, stages = CASES[name]
    torch.manual_seed(0)
    module = zoo.randomize_parameters(factory())
    model = export_torch(module, shape)
    program = compile_program(model, tile=tile, image=shape[2:], with_flops=False)
    meta = program.meta
    assert meta.halo == "reuse" and len(meta.stages) == stages
    assert meta.grid == tuple(-(-s // tile) for s in shape[2:])
    strides = {b.name: b.stride for b in meta.buffers}
    widest = max((b - a) * strides[name][axis] for t in meta.tiles for part in t.parts[1:]
                 if part for name, box in part.crops.items()
                 for axis, (a, b) in enumerate(box))
    assert widest > tile  # in image pixels: a later stage's crop is wider than the tile
    assert_matches_torch(program, module, model, zoo.random_image(shape, seed=3))
