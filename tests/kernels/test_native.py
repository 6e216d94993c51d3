"""The C++ kernel's build is announced only when a build is due (issue 21)."""

from __future__ import annotations

import logging
import os

import pytest

from cait.kernels import native


def test_a_cached_kernel_loads_without_a_message_about_compiling(caplog, monkeypatch):
    if os.environ.get("CAIT_NATIVE", "1") == "0":
        pytest.skip("CAIT_NATIVE=0")
    native._load()  # builds it when this machine has not yet
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cait.kernels.native"):
        loaded = native._load()  # as a second `cait predict` does
    if not loaded:
        pytest.skip("the kernel cannot be built here")
    assert not [r for r in caplog.records if "compil" in r.getMessage()], caplog.text


def test_a_build_is_due_without_a_library_or_with_an_older_one(tmp_path, monkeypatch):
    source = tmp_path / "k.cpp"
    source.write_text("")
    monkeypatch.setattr(native, "SOURCES", [source])
    assert native._needs_build(tmp_path)  # nothing built
    assert native._needs_build(None)  # torch's cache layout unknown: announce it
    library = tmp_path / f"{native.NAME}.so"
    library.write_bytes(b"")
    os.utime(source, (1_000, 1_000))
    assert not native._needs_build(tmp_path)
    os.utime(source, (library.stat().st_mtime + 10,) * 2)  # the source edited since
    assert native._needs_build(tmp_path)
