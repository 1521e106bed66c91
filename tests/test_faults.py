"""Fault tests of the program directory: a crash at each step of a save, two writers at once,
read-only places. The invariant: a complete program loads, or a clear error says what to do,
and nothing the user owned is deleted."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import streamc
from streamc import atomic_dir
from streamc import program as program_module
from streamc.demo import demo_model
from streamc.errors import ProgramError
from streamc.program import Program, load


@pytest.fixture(scope="module")
def programs() -> tuple[Program, Program]:
    """Two different small programs (tiles 64 and 96 of the demo model)."""
    model = demo_model(channels=4)
    return (streamc.compile(model, 64, image=(128, 128), with_flops=False),
            streamc.compile(model, 96, image=(128, 128), with_flops=False))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_dead_writers_temporary_directory_is_cleaned(programs, tmp_path: Path) -> None:
    first, second = programs
    target = first.save(tmp_path / "p.streamc")
    leftover = tmp_path / f".p.streamc.streamc-tmp-{_dead_pid()}-abcd"
    leftover.mkdir()
    (leftover / "half.onnx").write_bytes(b"half")
    mine = tmp_path / ".p.streamc.mine"  # not of our naming: never touched
    mine.mkdir()
    second.save(target)
    assert _entries(tmp_path) == [".p.streamc.mine", "p.streamc"]
    assert load(target).meta.requested_tile == (96, 96)


def test_a_crash_between_the_renames_is_recovered(programs, tmp_path: Path) -> None:
    """Without an atomic exchange the old program is renamed aside first: a writer that dies
    right then leaves only the aside copy, which the next load puts back."""
    first, _ = programs
    target = first.save(tmp_path / "p.streamc")
    aside = tmp_path / f".p.streamc.streamc-old-{_dead_pid()}-wxyz"
    target.rename(aside)
    assert load(target).meta.requested_tile == (64, 64)
    assert _entries(tmp_path) == ["p.streamc"]


def test_a_failed_second_rename_puts_the_old_program_back(programs, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    first, second = programs
    target = first.save(tmp_path / "p.streamc")
    monkeypatch.setattr(atomic_dir, "exchange", lambda a, b: False)  # no renameat2
    real = atomic_dir.os.rename
    calls = {"n": 0}

    def flaky(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # old -> aside went through; new -> target fails
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(atomic_dir.os, "rename", flaky)
    with pytest.raises(ProgramError, match="No space left on device"):
        second.save(target)
    monkeypatch.undo()
    assert load(target).meta.requested_tile == (64, 64)
    assert _entries(tmp_path) == ["p.streamc"]


def test_the_exchange_path_and_the_rename_path_give_the_same_directory(
        programs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = programs
    a = first.save(tmp_path / "a")
    second.save(a)
    monkeypatch.setattr(atomic_dir, "exchange", lambda x, y: False)
    b = first.save(tmp_path / "b")
    second.save(b)
    assert sorted(p.name for p in a.rglob("*")) == sorted(p.name for p in b.rglob("*"))
    assert load(a).meta == load(b).meta
    assert _entries(tmp_path) == ["a", "b"]


@pytest.mark.parametrize("step", ["graphs", "parameters", "program.json", "install"])
def test_a_failure_at_each_step_of_a_save(programs, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    first, second = programs
    target = first.save(tmp_path / "p.streamc")
    if step == "install":
        def boom(tmp, dst):
            raise OSError(5, "Input/output error", str(dst))

        monkeypatch.setattr(atomic_dir, "install", boom)
    else:
        real = program_module._write

        def failing(path: Path, data: bytes) -> None:
            if (step == "graphs" and path.suffix == ".onnx") or path.name == step or (
                    step == "parameters" and path.name == "parameters.npz"):
                path.write_bytes(data[: len(data) // 2])
                raise OSError(28, "No space left on device", str(path))
            real(path, data)

        monkeypatch.setattr(program_module, "_write", failing)
    with pytest.raises(ProgramError, match="cannot write the program"):
        second.save(target)
    monkeypatch.undo()
    assert load(target).meta.requested_tile == (64, 64)
    assert _entries(tmp_path) == ["p.streamc"]


_SLOW_SAVE = textwrap.dedent("""
    import sys, time
    import streamc
    from streamc import program as pm
    program = streamc.load(sys.argv[1])
    real, calls = pm._write, {"n": 0}
    def slow(path, data):
        real(path, data)
        calls["n"] += 1
        if calls["n"] == int(sys.argv[3]):
            print("writing", flush=True)
            time.sleep(float(sys.argv[4]))
    pm._write = slow
    program.save(sys.argv[2])
    print("saved", flush=True)
""")


def _slow_save(source: Path, target: Path, after: int, pause: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(source), str(target),
                             str(after), str(pause)], stdout=subprocess.PIPE, text=True)


def test_kill_9_during_a_save(programs, tmp_path: Path) -> None:
    first, second = programs
    source = second.save(tmp_path / "source")
    target = first.save(tmp_path / "p.streamc")
    process = _slow_save(source, target, after=3, pause=60)
    assert process.stdout.readline().strip() == "writing"
    process.kill()
    process.wait()
    leftovers = [name for name in _entries(tmp_path) if "streamc-tmp" in name]
    assert len(leftovers) == 1  # the dead writer's half-written directory
    assert load(target).meta.requested_tile == (64, 64)  # the old program, complete
    second.save(target)  # the next save cleans up
    assert _entries(tmp_path) == ["p.streamc", "source"]
    assert load(target).meta.requested_tile == (96, 96)


def test_two_writers_at_once(programs, tmp_path: Path) -> None:
    first, second = programs
    a = first.save(tmp_path / "a")
    b = second.save(tmp_path / "b")
    target = tmp_path / "p.streamc"
    writers = [_slow_save(a, target, after=2, pause=1.0), _slow_save(b, target, after=2,
                                                                     pause=1.5)]
    outputs = [w.communicate(timeout=120)[0] for w in writers]
    assert all(w.returncode == 0 for w in writers), outputs
    assert load(target).meta.requested_tile in {(64, 64), (96, 96)}
    assert _entries(tmp_path) == ["a", "b", "p.streamc"]


def test_a_read_only_place_is_one_clear_error(programs) -> None:
    first, _ = programs
    with pytest.raises(ProgramError, match="cannot write the program to /sys/streamc-test"):
        first.save("/sys/streamc-test/p.streamc")


def test_load_says_what_to_do(tmp_path: Path) -> None:
    for path, fragment in ((tmp_path / "none", "no such program directory"),
                           (tmp_path, "program.json is missing")):
        with pytest.raises(ProgramError, match=fragment) as info:
            load(path)
        assert "\n" not in str(info.value)


def test_program_directories_follow_the_umask(programs, tmp_path: Path) -> None:
    first, _ = programs
    import os

    old = os.umask(0o022)
    try:
        target = first.save(tmp_path / "p.streamc")
    finally:
        os.umask(old)
    assert oct(target.stat().st_mode & 0o777) == oct(0o755)
