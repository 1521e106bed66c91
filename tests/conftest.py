"""Shared pytest fixtures: the model zoo and temporary ONNX files."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import onnx
import pytest
from hypothesis import settings

import zoo as _zoo

# CI runs the same examples every time (a failure there is reproducible, and no run spends
# minutes shrinking a new one); locally hypothesis explores. HYPOTHESIS_PROFILE=dev overrides.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(scope="session")
def zoo() -> ModuleType:
    """The :mod:`zoo` package (``zoo.build(name)``, ``zoo.perturbation_field``, ...)."""
    return _zoo


@pytest.fixture(params=_zoo.LOCAL_NAMES)
def zoo_model(request: pytest.FixtureRequest) -> _zoo.ZooModel:
    """Each zoo model with a non-empty local prefix, at its default shape (cached, shared)."""
    return _zoo.build(request.param)


@pytest.fixture
def onnx_file(tmp_path: Path) -> Callable[..., Path]:
    """Factory ``onnx_file(model, name=None) -> Path``: save a model under ``tmp_path``.

    ``model`` is a :class:`zoo.ZooModel` or an ``onnx.ModelProto``; the file is named
    ``<name>.onnx`` (default: the zoo model's name, or ``model<k>``).
    """
    counter = itertools.count()

    def save(model: _zoo.ZooModel | onnx.ModelProto, name: str | None = None) -> Path:
        proto = model.onnx_model if isinstance(model, _zoo.ZooModel) else model
        if name is None:
            name = model.name if isinstance(model, _zoo.ZooModel) else f"model{next(counter)}"
        path = tmp_path / f"{name}.onnx"
        onnx.save_model(proto, path)
        return path

    return save
