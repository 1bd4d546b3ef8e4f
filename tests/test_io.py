"""Atomic writes: the umask is applied by the kernel, never changed; a failed write leaves the old file alone."""

from __future__ import annotations

import os
import re
import stat

import numpy as np
import pytest

from carclf.io import atomic_savez, atomic_write, atomic_write_text

_real_umask = os.umask  # the tests below patch os.umask to fail; the fixture still restores the real mask


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = _real_umask(0o022)
    yield _real_umask
    _real_umask(old)


def _no_umask(*args):
    raise AssertionError("os.umask called: it changes the mask for every thread while a write is under way")


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["022", "077"])
def test_mode_follows_the_umask_without_touching_it(tmp_path, monkeypatch, umask, mask):
    umask(mask)
    monkeypatch.setattr(os, "umask", _no_umask)
    atomic_write_text(tmp_path / "a.txt", "héllo\n")
    atomic_savez(tmp_path / "b.npz", x=np.arange(3))
    for name in ("a.txt", "b.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    np.testing.assert_array_equal(np.load(tmp_path / "b.npz")["x"], np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.npz"]


def test_temp_file_is_hidden_unique_and_beside_the_target(tmp_path):
    seen: list[str] = []

    def write(fh):
        seen.extend(p.name for p in tmp_path.iterdir())
        fh.write("x")

    atomic_write(tmp_path / "s.csv", write)
    atomic_write(tmp_path / "s.csv", write)
    assert len(seen) == 3  # the first temp file, then the target and the second temp file
    temps = [n for n in seen if n != "s.csv"]
    for name in temps:
        assert re.fullmatch(rf"\.s\.csv\.{os.getpid()}\.[0-9a-f]{{16}}\.tmp", name), name
    assert temps[0] != temps[1]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, exc):
    target = tmp_path / "model.bin"
    target.write_bytes(b"old weights")

    def write(fh):
        fh.write(b"half of the new")
        raise exc("interrupted")

    with pytest.raises(exc, match="interrupted"):
        atomic_write(target, write, "wb")
    assert target.read_bytes() == b"old weights"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]
