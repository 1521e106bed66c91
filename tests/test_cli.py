"""The command line: every command's success path, and every class of bad input answered with
one line on stderr and the documented exit status (2 for user errors, 1 for a failed check,
130 when interrupted), never a traceback, never a file of the user's touched."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from streamc import load
from streamc.cli import main
from streamc.demo import demo_model
from streamc.ops.vjp import VJP
from streamc.ops.vjp.table import VjpRule

STREAMC = [sys.executable, "-m", "streamc.cli"]


def run(*args: str, cwd: Path | None = None):
    """The command in-process (click's runner): (exit code, stdout, stderr)."""
    runner = CliRunner()
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        result = runner.invoke(main, list(args), catch_exceptions=False)
    finally:
        os.chdir(old)
    return result.exit_code, result.stdout, result.stderr


def assert_one_line_error(code: int, stderr: str, *fragments: str, status: int = 2) -> str:
    assert code == status, (code, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "demo.onnx"
    onnx.save(demo_model(channels=4), str(path))
    return path


# --------------------------------------------------------------------------------------------
# Success paths


def test_version_and_help() -> None:
    code, out, _ = run("--version")
    assert code == 0 and "version" in out
    for command in ("demo", "inspect", "compile", "check", "plan", "example-model"):
        code, out, _ = run(command, "--help")
        assert code == 0 and "Usage" in out


def test_example_model_and_inspect(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    code, out, _ = run("example-model", str(path), "--channels", "4")
    assert code == 0 and path.is_file()
    code, out, _ = run("inspect", str(path), "--image", "256x256")
    assert code == 0 and "cut tensors:" in out and "receptive field" in out
    code, out, _ = run("inspect", str(path), "--image", "256", "--json")
    data = json.loads(out)
    assert code == 0 and data["image_shape"] == [1, 3, 256, 256]


def test_compile_then_load(model_file: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "prog.streamc"
    code, out, err = run("compile", str(model_file), "--image", "256x256", "--tile", "128",
                         "-o", str(out_dir))
    assert code == 0, err
    assert "tiles:" in out and f"written to:   {out_dir}" in out
    meta = load(out_dir).meta
    # 2x2 tiles of 128 owned; a crop adds the halo of the ops reading the image
    assert meta.requested_tile == (128, 128) and meta.grid == (2, 2)
    assert all(128 <= t <= 140 for t in meta.tile)
    # A program in place is replaced.
    code, _, err = run("compile", str(model_file), "--image", "256x256", "--tile", "96",
                       "-o", str(out_dir))
    assert code == 0, err
    assert load(out_dir).meta.requested_tile == (96, 96)


def test_compile_keep_tiles(model_file: Path, tmp_path: Path) -> None:
    code, out, err = run("compile", str(model_file), "--image", "256x256", "--tile", "64",
                         "--keep-tiles", "3", "-o", str(tmp_path / "p"))
    assert code == 0, err
    assert "kept:         3 tiles keep their activations" in out
    assert len(load(tmp_path / "p").meta.kept) == 3
    code, out, err = run("compile", str(model_file), "--image", "256x256", "--tile", "64",
                         "--keep-tiles", "99", "-o", str(tmp_path / "p"))
    assert code == 0 and "every tile keeps its activations" in out, err
    code, out, err = run("compile", str(model_file), "--image", "256x256", "--tile", "64",
                         "--keep-stride", "4", "-o", str(tmp_path / "s"))
    assert code == 0, err
    assert "tiles keep their activations at stride 4 or more" in out
    assert load(tmp_path / "s").meta.keep_stride == 4
    code, out, err = run("plan", str(model_file), "--image", "256x256", "--tile", "64",
                         "--keep-stride", "4", "--json")
    assert code == 0, err
    deep_peak = json.loads(out)["peak"]
    code, out, err = run("plan", str(model_file), "--image", "256x256", "--tile", "64", "--json")
    assert code == 0 and json.loads(out)["peak"] < deep_peak, err
    code, _, err = run("plan", str(model_file), "--image", "256x256", "--memory-budget", "1GiB",
                       "--keep-tiles", "auto", "--keep-stride", "4")
    assert_one_line_error(code, err, "--keep-tiles auto", "--keep-stride")
    for extra in (["--inference"], ["--keep-stride", "0"]):
        code, _, err = run("compile", str(model_file), "--image", "256x256", "--tile", "64",
                           "--keep-stride", "4", *extra, "-o", str(tmp_path / "q"))
        assert code != 0 and "--keep-stride" in err and not (tmp_path / "q").exists(), extra
    code, _, err = run("compile", str(model_file), "--image", "256x256", "--tile", "64",
                       "--keep-tiles", "auto", "-o", str(tmp_path / "q"))
    assert_one_line_error(code, err, "--keep-tiles auto", "--memory-budget")
    for bad in ("-1", "many"):
        code, _, err = run("compile", str(model_file), "--image", "256x256", "--tile", "64",
                           "--keep-tiles", bad, "-o", str(tmp_path / "q"))
        assert code == 2 and "--keep-tiles" in err and not (tmp_path / "q").exists()
    code, _, err = run("compile", str(model_file), "--image", "256x256", "--tile", "64",
                       "--keep-tiles", "2", "--inference", "-o", str(tmp_path / "q"))
    assert_one_line_error(code, err, "--keep-tiles", "inference")
    # with a budget: the tile first, then as many kept tiles as fit
    code, out, err = run("plan", str(model_file), "--image", "256x256", "--tile", "64", "--json")
    default = json.loads(out)["peak"]
    budget = str(default + (64 << 20))
    code, out, err = run("plan", str(model_file), "--image", "256x256", "--memory-budget",
                         budget, "--keep-tiles", "auto")
    assert code == 0, err
    code, out, err = run("compile", str(model_file), "--image", "256x256", "--memory-budget",
                         budget, "--keep-tiles", "auto", "-o", str(tmp_path / "r"))
    assert code == 0, err
    assert load(tmp_path / "r").meta.memory_plan["peak"] <= int(budget)


def test_compile_with_a_budget_compiles_each_candidate_once(model_file: Path, tmp_path: Path
                                                            ) -> None:
    code, out, err = run("compile", str(model_file), "--image", "512x512",
                         "--memory-budget", "1GiB", "-o", str(tmp_path / "p"))
    assert code == 0, err
    assert "chose tile" in out and "compiled, each once" in out
    assert "planning tile" in err  # progress on stderr


def test_plan_and_budget_choose_the_same_tile(model_file: Path, tmp_path: Path) -> None:
    code, out, _ = run("plan", str(model_file), "--image", "512x512")
    assert code == 0 and "conventional" in out
    code, out, _ = run("plan", str(model_file), "--image", "512x512", "--json")
    peaks = sorted(p["peak"] for p in json.loads(out)["plans"])
    budget = str(peaks[len(peaks) // 2])
    code, out, _ = run("plan", str(model_file), "--image", "512x512", "--memory-budget", budget)
    planned = re.search(r": tile (\d+)", out.splitlines()[-1]).group(1)
    code, out, _ = run("compile", str(model_file), "--image", "512x512", "--memory-budget",
                       budget, "-o", str(tmp_path / "p"))
    assert code == 0
    assert f"chose tile {planned} " in out


def test_check_passes_and_reports_finite_differences(model_file: Path) -> None:
    code, out, _ = run("check", str(model_file), "--image", "192x160", "--tile", "96")
    assert code == 0, out
    assert "OK:" in out and "finite differences" in out
    code, out, _ = run("check", str(model_file), "--image", "192x160", "--tile", "96", "--json")
    report = json.loads(out)
    assert report["ok"] and len(report["finite_differences"]) == 3


def test_check_catches_an_autodiff_bug(model_file: Path, monkeypatch: pytest.MonkeyPatch
                                       ) -> None:
    """A wrong VJP rule is wrong on both the tiled and the untiled side (they share autodiff);
    the finite differences, which do not, catch it."""
    wrong = VjpRule(lambda ctx, node, dys: [dys[0]])  # Relu's rule without its mask

    def lookup(op, opset=None, domain="", node_name=None, real=VJP.lookup):
        return wrong if op == "Relu" else real(op, opset, domain, node_name)

    monkeypatch.setattr(VJP, "lookup", lookup)
    code, out, _ = run("check", str(model_file), "--image", "128x128", "--tile", "96")
    assert code == 1
    assert "MISMATCH" in out and "  <" in out


def test_demo_runs_from_a_subprocess(tmp_path: Path) -> None:
    """The README's first command, as a user runs it."""
    result = subprocess.run([*STREAMC, "demo", "-o", str(tmp_path / "demo"), "--image",
                             "256x256", "--tile", "128", "--channels", "4"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "OK:" in result.stdout and result.stderr == ""


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2


def _int_input_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Relu", ["f"], ["y"])], "ints",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 16, 16])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def if_in_head_model() -> onnx.ModelProto:
    """A conv prefix, then If(ReduceSum(y) > 0) whose branches read ``y`` from the outer scope:
    the gradient into the prefix flows only through the captured tensor."""
    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    then = helper.make_graph([helper.make_node("ReduceMean", ["y"], ["t"], keepdims=0)],
                             "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT,
                                                                        [])])
    other = helper.make_graph([helper.make_node("ReduceMax", ["y"], ["e"], keepdims=0)],
                              "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT,
                                                                         [])])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"]),
             helper.make_node("ReduceSum", ["y"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["out"], then_branch=then, else_branch=other)]
    graph = helper.make_graph(
        nodes, "if_head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [])],
        [w, numpy_helper.from_array(np.zeros((), np.float32), "zero")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


BAD_MODEL_CASES = {
    "missing file": (lambda d: d / "nope.onnx", "no such file"),
    "a directory": (lambda d: d, "is a directory"),
    "not onnx": (lambda d: _write(d / "x.onnx", b"hello, not a model"), "not a readable ONNX"),
    "truncated": (lambda d: _write(d / "t.onnx", demo_model().SerializeToString()[:300]),
                  "ONNX"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", sorted(BAD_MODEL_CASES))
def test_bad_model_files(case: str, tmp_path: Path) -> None:
    make, fragment = BAD_MODEL_CASES[case]
    path = make(tmp_path)
    for command in (["inspect", str(path)], ["compile", str(path), "--tile", "64",
                                              "--image", "64x64", "-o", str(tmp_path / "o")]):
        code, _, err = run(*command)
        assert_one_line_error(code, err, fragment)


def test_missing_external_data_is_named(tmp_path: Path) -> None:
    path = tmp_path / "ext.onnx"
    onnx.save_model(demo_model(channels=4), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    (tmp_path / "weights.bin").unlink()
    code, _, err = run("inspect", str(path))
    assert_one_line_error(code, err, "external data", "weights.bin")


@pytest.mark.parametrize("image, fragment", [
    ("abc", "not a number or NxM"), ("0x64", "must be positive"), ("64x", "not a number"),
    ("1000000000000x1000000000000", "too large"), ("99999999999999999999", "too large"),
    ("64x64x64", "3 spatial axes"), ("0", "must be positive"),
])
def test_bad_image_sizes(model_file: Path, tmp_path: Path, image: str, fragment: str) -> None:
    code, _, err = run("compile", str(model_file), "--image", image, "--tile", "64",
                       "-o", str(tmp_path / "o"))
    assert_one_line_error(code, err)
    assert fragment in err or "spatial axes" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--tile", "x"], "tile size"), (["--tile", "-4"], "must be positive"),
    (["--tile", "64", "--memory-budget", "1GiB"], "not both"), ([], "give a tile size"),
    (["--memory-budget", "lots"], "memory size"),
    (["--memory-budget", "1KiB"], "cannot fit this model"),
    (["--tile", "2"], "too small to make progress"),
    (["--tile", "64", "--max-tiles", "4"], "more than the limit of 4"),
    (["--tile", "64", "--input", "nope"], "no input named"),
])
def test_bad_compile_arguments(model_file: Path, tmp_path: Path, args: list[str],
                               fragment: str) -> None:
    code, _, err = run("compile", str(model_file), "--image", "256x256", *args,
                       "-o", str(tmp_path / "o"))
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "o").exists()


def test_non_float_input_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ints.onnx"
    onnx.save(_int_input_model(), str(path))
    code, _, err = run("compile", str(path), "--tile", "8", "--input", "ids", "-o",
                       str(tmp_path / "o"))
    assert_one_line_error(code, err, "'ids'", "int64", "not an image")


def test_control_flow_in_the_head_is_refused(tmp_path: Path) -> None:
    """An If whose branches read a prefix tensor would get no gradient: refused, not 'OK'."""
    path = tmp_path / "if.onnx"
    onnx.save(if_in_head_model(), str(path))
    for command in ("compile", "check"):
        extra = ["-o", str(tmp_path / "o")] if command == "compile" else []
        code, out, err = run(command, str(path), "--tile", "16", *extra)
        assert_one_line_error(code, err, "If")
        assert "OK" not in out


# --------------------------------------------------------------------------------------------
# Output paths: nothing of the user's replaced


def test_output_into_a_directory_that_is_not_a_program(model_file: Path, tmp_path: Path
                                                       ) -> None:
    target = tmp_path / "x"
    target.mkdir()
    (target / "notes.txt").write_text("notes")
    onnx.save(demo_model(channels=4), str(target / "demo.onnx"))
    before = tree(target)
    code, _, err = run("compile", str(target / "demo.onnx"), "--image", "128x128", "--tile",
                       "64", "-o", str(target))
    assert_one_line_error(code, err, "not a streamc program", "notes.txt", "--force")
    assert tree(target) == before
    code, _, err = run("compile", str(target / "demo.onnx"), "--image", "128x128", "--tile",
                       "64", "-o", str(target / "sub"))
    assert code == 0, err
    code, _, err = run("compile", str(model_file), "--image", "128x128", "--tile", "64",
                       "-o", str(target), "--force")
    assert code == 0, err
    assert load(target).meta.requested_tile == (64, 64)


def test_output_onto_a_file_or_under_one(model_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "file.txt"
    path.write_text("keep me")
    for target, fragment in ((path, "not a directory"), (path / "sub", "cannot write"),
                             (path, "not a directory")):
        args = ["compile", str(model_file), "--image", "128x128", "--tile", "64", "-o",
                str(target)]
        code, _, err = run(*args, "--force") if target == path else run(*args)
        assert_one_line_error(code, err, fragment)
        assert path.read_text() == "keep me"


def test_output_into_the_current_directory(model_file: Path, tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("mine")
    for target in (".", str(tmp_path), ".."):
        code, _, err = run("compile", str(model_file), "--image", "128x128", "--tile", "64",
                           "-o", target, "--force", cwd=tmp_path)
        assert_one_line_error(code, err, "current directory")
    assert (tmp_path / "mine.txt").read_text() == "mine"


def test_output_under_a_read_only_place(model_file: Path) -> None:
    code, _, err = run("compile", str(model_file), "--image", "128x128", "--tile", "64",
                       "-o", "/sys/streamc-test/prog")
    assert_one_line_error(code, err, "cannot write")


def test_plot_problems_are_found_before_planning(model_file: Path, tmp_path: Path) -> None:
    code, _, err = run("plan", str(model_file), "--image", "128x128", "--plot",
                       str(tmp_path / "no" / "such" / "dir" / "p.png"))
    assert_one_line_error(code, err)
    assert "matplotlib" in err or "writable" in err


# --------------------------------------------------------------------------------------------
# Interrupts


def test_ctrl_c_is_one_line_and_installs_nothing(model_file: Path, tmp_path: Path) -> None:
    target = tmp_path / "big.streamc"
    process = subprocess.Popen([*STREAMC, "compile", str(model_file), "--image", "8192x8192",
                                "--memory-budget", "900MiB", "-o", str(target)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The tile search's first progress line: past the imports (a fixed wait was not, on a
    # fresh venv compiling its bytecode), and the first candidate's compile has begun.
    first = process.stderr.readline()
    assert first.startswith("streamc: planning tile"), first
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)  # what follows the progress line
    if process.returncode == 0:
        pytest.skip("the compile finished before the interrupt")
    assert_one_line_error(process.returncode, err, "interrupted", status=130)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == []
