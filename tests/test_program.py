"""The compiled artifact: save/load round trip, refusals of damaged programs, atomic save, and a
golden check that every emitted graph is a valid ONNX model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import streamc
import zoo
from streamc import program as program_module
from streamc.check import run_program
from streamc.compiler import compile as compile_program
from streamc.errors import ProgramError
from streamc.program import FORMAT_VERSION, Program, load
from tests.test_analysis import HANDBUILT


@pytest.fixture(scope="module")
def small_program() -> Program:
    """zeropad at tile 16: a handful of tiles and shape classes."""
    program = compile_program(zoo.build("zeropad").onnx_model, 16)
    assert len(program.tiles) > 1 and len(program.classes) > 1
    return program


@pytest.fixture
def saved(small_program: Program, tmp_path: Path) -> Path:
    return small_program.save(tmp_path / "prog.streamc")


def _leftovers(directory: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


# --------------------------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------------------------


def test_save_load_round_trip(small_program: Program, saved: Path) -> None:
    assert (saved / "program.json").is_file() and (saved / "parameters.npz").is_file()
    loaded = load(saved)
    assert loaded.path == saved
    stored = json.loads((saved / "program.json").read_text())
    assert stored["format_version"] == FORMAT_VERSION
    assert set(stored["files"]) == set(small_program.graphs) | {"parameters.npz"}
    assert loaded.meta == small_program.meta
    assert set(loaded.graphs) == set(small_program.graphs)
    for name, graph in small_program.graphs.items():
        assert loaded.serialized(name) == graph.SerializeToString(), name
        assert loaded.graph(name).SerializeToString() == graph.SerializeToString()
    assert set(loaded.parameters) == set(small_program.parameters)
    for name, value in small_program.parameters.items():
        np.testing.assert_array_equal(loaded.parameters[name], value)
        assert loaded.parameters[name].dtype == np.asarray(value).dtype
    assert streamc.load(str(saved)).meta == loaded.meta  # the public API, a str path


def test_loaded_program_runs_identically(small_program: Program, saved: Path) -> None:
    loaded = load(saved)
    image = zoo.random_image(small_program.input_shape, seed=1)
    params = {k: np.asarray(v) for k, v in small_program.parameters.items()}
    cot = {"logits": np.random.default_rng(0).standard_normal((1, 10)).astype(np.float32)}
    out_a, grad_a = run_program(small_program, image, params, lambda _: cot, threads=1)
    out_b, grad_b = run_program(loaded, image, params, lambda _: cot, threads=1)
    np.testing.assert_array_equal(out_a["logits"], out_b["logits"])
    assert set(grad_a) == set(grad_b)
    for name in grad_a:
        np.testing.assert_array_equal(grad_a[name], grad_b[name])


def test_save_replaces_an_existing_program(small_program: Program, tmp_path: Path) -> None:
    target = tmp_path / "prog.streamc"
    small_program.save(target)
    (target / "stray.txt").write_text("left over from an older program")
    other = compile_program(zoo.build("zeropad").onnx_model, 20, with_flops=False)
    other.save(target)
    assert not (target / "stray.txt").exists()
    assert load(target).meta.requested_tile == (20, 20)
    assert _leftovers(tmp_path, {"prog.streamc"}) == []  # no temporary or backup dirs


def test_save_twice_is_stable(small_program: Program, tmp_path: Path) -> None:
    a = small_program.save(tmp_path / "a")
    b = load(a).save(tmp_path / "b")
    assert json.loads((a / "program.json").read_text()) == json.loads(
        (b / "program.json").read_text())


# --------------------------------------------------------------------------------------------
# Load refuses damaged programs, one clear ProgramError each
# --------------------------------------------------------------------------------------------


def _refused(path: Path, *fragments: str) -> str:
    with pytest.raises(ProgramError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_load_missing_directory(tmp_path: Path) -> None:
    _refused(tmp_path / "nothing_here", "no such program directory")


def test_load_a_file_is_not_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save_model(zoo.build("vgg").onnx_model, path)
    _refused(path, "no such program directory")


def test_load_missing_program_json(saved: Path) -> None:
    (saved / "program.json").unlink()
    _refused(saved, "program.json is missing")


def test_load_program_json_not_json(saved: Path) -> None:
    (saved / "program.json").write_text("{ this is not json")
    _refused(saved, "not valid JSON", "recompile")


def test_load_program_json_of_something_else(saved: Path) -> None:
    (saved / "program.json").write_text(json.dumps({"format": "other-tool", "version": 3}))
    _refused(saved, "not a streamc program")


def test_load_altered_graph_byte_flip(saved: Path) -> None:
    meta = json.loads((saved / "program.json").read_text())
    relative = next(f for f in meta["files"] if f.endswith("forward.onnx"))
    path = saved / relative
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    _refused(saved, relative, "altered or truncated", "recompile")


def test_load_missing_graph(saved: Path) -> None:
    meta = json.loads((saved / "program.json").read_text())
    relative = next(f for f in meta["files"] if f.endswith("backward.onnx"))
    (saved / relative).unlink()
    _refused(saved, "incomplete", relative)


@pytest.mark.parametrize("field, value", [("tile", [8, 8]), ("image_size", [33, 36]),
                                          ("grid", [1, 1])])
def test_load_altered_program_json(saved: Path, field: str, value) -> None:
    meta = json.loads((saved / "program.json").read_text())
    assert meta[field] != value
    meta[field] = value
    (saved / "program.json").write_text(json.dumps(meta, indent=1))
    _refused(saved, "altered after compilation", "checksum")


def test_load_altered_tile_kept_region(saved: Path) -> None:
    """A subtle edit (one tile's kept region) is caught too: the checksum covers all of it."""
    meta = json.loads((saved / "program.json").read_text())
    part = meta["tiles"][0]["parts"][0]
    cut = next(iter(part["kept"]))
    part["kept"][cut][0][1] += 1
    (saved / "program.json").write_text(json.dumps(meta, indent=1))
    _refused(saved, "altered after compilation")


@pytest.mark.parametrize("version", [0, FORMAT_VERSION + 1, "1", None])
def test_load_wrong_format_version(saved: Path, version) -> None:
    meta = json.loads((saved / "program.json").read_text())
    meta["format_version"] = version
    (saved / "program.json").write_text(json.dumps(meta, indent=1))
    _refused(saved, "format version", f"version {FORMAT_VERSION}", "recompile")


def test_load_truncated_parameters(saved: Path) -> None:
    path = saved / "parameters.npz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _refused(saved, "parameters.npz", "altered or truncated")


def test_load_missing_parameters(saved: Path) -> None:
    (saved / "parameters.npz").unlink()
    _refused(saved, "parameters.npz", "incomplete")


# --------------------------------------------------------------------------------------------
# Atomic save
# --------------------------------------------------------------------------------------------


class _Boom(RuntimeError):
    pass


def _fail_on_call(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Make the n-th file write of a save raise midway (after writing half of it)."""
    real = program_module._write
    calls = {"count": 0}

    def flaky(path: Path, data: bytes) -> None:
        calls["count"] += 1
        if calls["count"] == n:
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            raise _Boom(f"disk full while writing {path.name}")
        real(path, data)

    monkeypatch.setattr(program_module, "_write", flaky)


@pytest.mark.parametrize("fail_at", [1, 3, "last"])
def test_interrupted_save_leaves_no_target(small_program: Program, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, fail_at) -> None:
    n = len(small_program.graphs) + 2 if fail_at == "last" else fail_at  # program.json last
    _fail_on_call(monkeypatch, n)
    with pytest.raises(_Boom):
        small_program.save(tmp_path / "prog.streamc")
    assert _leftovers(tmp_path, set()) == []  # neither the target nor a temporary directory


def test_interrupted_save_keeps_the_old_program(small_program: Program, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    target = small_program.save(tmp_path / "prog.streamc")
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    other = compile_program(zoo.build("zeropad").onnx_model, 20, with_flops=False)
    _fail_on_call(monkeypatch, 2)
    with pytest.raises(_Boom):
        other.save(target)
    after = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before
    assert _leftovers(tmp_path, {"prog.streamc"}) == []
    monkeypatch.undo()
    assert load(target).meta.requested_tile == (16, 16)


def test_serialization_failure_leaves_nothing(small_program: Program, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """ONNX serialization raising midway (the second graph) aborts the save cleanly."""
    seen = []
    real = Program.serialized

    def flaky(self, relative: str) -> bytes:
        seen.append(relative)
        if len(seen) == 2:
            raise _Boom("protobuf refused to serialize")
        return real(self, relative)

    fresh = Program(copy.deepcopy(small_program.meta), small_program.graphs,
                    small_program.parameters)
    monkeypatch.setattr(Program, "serialized", flaky)
    with pytest.raises(_Boom):
        fresh.save(tmp_path / "prog.streamc")
    assert _leftovers(tmp_path, set()) == []


# --------------------------------------------------------------------------------------------
# Golden check: every emitted graph is a valid ONNX model
# --------------------------------------------------------------------------------------------

GOLDEN_TILES = {
    "vgg": 40, "resnet": 56, "unet": 28, "dilated": 32, "nonsquare": (24, 36), "zeropad": 16,
    "twocut": 40, "conv3d": 16, "mixed_act": 32,
}


def _check_graphs(program: Program) -> None:
    opset = None
    for name, graph in program.graphs.items():
        onnx.checker.check_model(graph, full_check=True)
        versions = {o.domain: o.version for o in graph.opset_import}
        assert versions.get("", versions.get("ai.onnx")) is not None, name
        opset = opset or versions
        assert versions == opset, name  # one opset for the whole program
        # Every graph input the interpreter feeds is declared with a full static shape.
        for vi in graph.graph.input:
            dims = vi.type.tensor_type.shape.dim
            assert all(d.HasField("dim_value") for d in dims), (name, vi.name)
    for cls in program.classes:
        forward = program.graphs[cls.forward]
        assert [i.name for i in forward.graph.input][0] == program.input_name
        assert set(cls.outputs.values()) <= {o.name for o in forward.graph.output}


@pytest.mark.parametrize("name", zoo.LOCAL_NAMES)
def test_golden_zoo_graphs_pass_the_checker(name: str) -> None:
    program = compile_program(zoo.build(name).onnx_model, GOLDEN_TILES[name])
    assert len(program.tiles) > 1
    _check_graphs(program)


@pytest.mark.parametrize("name", list(HANDBUILT))
def test_golden_handbuilt_graphs_pass_the_checker(name: str) -> None:
    built = HANDBUILT[name]()
    program = compile_program(built.model, built.tiles[0], with_flops=False)
    _check_graphs(program)


def test_golden_loaded_graphs_pass_the_checker(saved: Path) -> None:
    _check_graphs(load(saved))
