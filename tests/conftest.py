"""Shared fixtures: zoo exports and compilations cached for the whole test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from eecompile.keys import MasterKey


class ZooCache:
    """Exports and compiles zoo models once per test session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._exports: dict[tuple, Path] = {}
        self._compiled: dict[tuple, object] = {}

    def export(self, name: str, exporter: str, opset: int) -> Path:
        """Path of the exported zoo model."""
        from eecompile.models import export_model

        key = (name, exporter, opset)
        if key not in self._exports:
            self._exports[key] = export_model(name, self.root / f"{name}-{exporter}{opset}.onnx",
                                              exporter=exporter, opset=opset)
        return self._exports[key]

    def compile(self, name: str, exporter: str, opset: int, key: MasterKey, tag: str = "a"):
        """CompileResult of the zoo model under ``key`` (cached by ``tag``)."""
        from eecompile import compile_model

        cache_key = (name, exporter, opset, tag)
        if cache_key not in self._compiled:
            out = self.root / f"out-{name}-{exporter}{opset}-{tag}"
            self._compiled[cache_key] = compile_model(self.export(name, exporter, opset), key, out)
        return self._compiled[cache_key]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> ZooCache:
    """Session-wide cache of zoo exports and compilations."""
    return ZooCache(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def key_a() -> MasterKey:
    """A fixed test key."""
    return MasterKey(bytes(range(32)))


@pytest.fixture(scope="session")
def key_b() -> MasterKey:
    """A second, different test key."""
    return MasterKey(bytes(range(100, 132)))
