"""Malformed inputs, many of them: truncated and bit-flipped models, edited program
descriptions, random command lines from a grammar. Each is answered with exit status 0 (when
the input happens to still be valid) or 1/2 and one line on stderr: never an internal error,
never a traceback, never a file outside the target touched."""

from __future__ import annotations

import json
import random
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

import streamc
from streamc.cli import main
from streamc.demo import demo_model
from streamc.errors import ProgramError
from streamc.program import _meta_checksum, load

SEED = 20261201


def invoke(args: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def assert_clean(code: int, stderr: str) -> None:
    assert code in (0, 1, 2), (code, stderr)
    assert "Traceback" not in stderr
    if code == 2:
        assert len(stderr.strip().splitlines()) == 1, stderr


def snapshot(directory: Path, skip: str) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*")
            if p.is_file() and not str(p.relative_to(directory)).startswith(skip)}


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return demo_model(channels=4).SerializeToString()


def test_damaged_models(model_bytes: bytes, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    cases = []
    for _ in range(30):
        cases.append(model_bytes[: rng.randrange(1, len(model_bytes))])
    for _ in range(30):
        data = bytearray(model_bytes)
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(0, min(len(data), 2000))  # the graph structure
            data[position] ^= 1 << rng.randrange(8)
        cases.append(bytes(data))
    rejected = 0
    for k, data in enumerate(cases):
        path = tmp_path / f"m{k}.onnx"
        path.write_bytes(data)
        before = snapshot(tmp_path, "out")
        for args in (["inspect", str(path), "--image", "96x96"],
                     ["compile", str(path), "--image", "96x96", "--tile", "64", "-o",
                      str(tmp_path / "out")]):
            code, _, err = invoke(args)
            assert_clean(code, err)
            rejected += code == 2
        assert snapshot(tmp_path, "out") == before
    assert rejected >= 50, rejected


EDITS = {
    "drop a key": lambda m, r: m.pop(r.choice(sorted(m))),
    "tiles not a list": lambda m, r: m.__setitem__("tiles", "all of them"),
    "class of a tile": lambda m, r: m["tiles"][0]["parts"][0].__setitem__("class", "zero"),
    "crop shape": lambda m, r: m["tiles"][0]["parts"][0].__setitem__("crops", {"image": [[0]]}),
    "cut shape": lambda m, r: m["buffers"][0].__setitem__("shape", None),
    "stride": lambda m, r: m["buffers"][0].__setitem__("stride", ["one"]),
    "buffer kind": lambda m, r: m["buffers"][0].__setitem__("kind", "somewhere"),
    "stage of a class": lambda m, r: m["classes"][0].__setitem__("stage", 5),
    "parameter entry": lambda m, r: m["parameters"].__setitem__(0, 7),
    "head": lambda m, r: m.__setitem__("head", []),
    "no classes": lambda m, r: m.__setitem__("classes", []),
    "graph file": lambda m, r: m["classes"][0].__setitem__("forward", "graphs/nope.onnx"),
    "input": lambda m, r: m["input"].__setitem__("shape", "1x3"),
    "run order": lambda m, r: m["stages"][0].__setitem__("run_order", {"a": 1}),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_edited_program_descriptions(tmp_path: Path, edit: str) -> None:
    """Edits with a recomputed checksum (the checksum alone catches any other edit): the
    description itself is checked, and a bad one is one ProgramError, not a KeyError."""
    program = streamc.compile(demo_model(channels=4), 64, image=(96, 96), with_flops=False)
    target = program.save(tmp_path / "p")
    meta = json.loads((target / "program.json").read_text())
    EDITS[edit](meta, random.Random(SEED))
    meta.pop("checksum", None)
    meta["checksum"] = _meta_checksum(meta)
    (target / "program.json").write_text(json.dumps(meta))
    try:
        load(target)
    except ProgramError as exc:
        assert "\n" not in str(exc) and "recompile" in str(exc)


GRAMMAR = {
    "command": ["inspect", "compile", "check", "plan", "demo", "example-model", "nonsense"],
    "option": ["--image", "--tile", "--memory-budget", "--input", "-o", "--seed",
               "--tolerance", "--max-tiles", "--channels", "--plot", "--bogus"],
    "value": ["", "0", "-1", "abc", "12x", "x12", "1.5", "1e30", "99999999999999999999",
              "64x64x64x64", "NaN", "8GiB", "1B", "-5GiB", "🙂", "--tile", "/", "/dev/null",
              "/sys/x/y"],
}


def _command_line(rng: random.Random, model: str, out: str) -> list[str]:
    args = [rng.choice(GRAMMAR["command"])]
    if rng.random() < 0.8:
        args.append(rng.choice([model, "missing.onnx", "", out]))
    for _ in range(rng.randint(1, 4)):
        option = rng.choice(GRAMMAR["option"])
        value = rng.choice(GRAMMAR["value"])
        args += [option, out if option == "-o" else value]
    return args


def test_random_command_lines(tmp_path: Path, model_bytes: bytes) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(model_bytes)
    out = str(tmp_path / "out")
    rng = random.Random(SEED)
    failed = 0
    for _ in range(60):
        args = _command_line(rng, str(model), out)
        before = snapshot(tmp_path, "out")
        code, _, err = invoke(args)
        assert_clean(code, err)
        assert snapshot(tmp_path, "out") == before, args
        failed += code != 0
    assert failed >= 50, failed
    assert onnx.load(str(model)).SerializeToString() == model_bytes
