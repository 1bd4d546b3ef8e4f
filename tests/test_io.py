"""Atomic writes: the umask is applied by the kernel, never changed; a failed write leaves the old file alone."""

from __future__ import annotations

import errno
import io
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


# ------------------------------------------------------------------------------------------------- a full disk
class _FullDisk(io.FileIO):
    """A file on a disk with ``left[0]`` bytes free: writes what fits, then fails with ENOSPC as the kernel does."""

    left = [0]

    def write(self, b):
        data = memoryview(b).cast("B")
        if not self.left[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = min(len(data), self.left[0])
        self.left[0] -= n
        return super().write(data[:n])


def full_disk(monkeypatch, free: int, only=lambda path: True) -> None:
    """Make atomic writes whose temp file ``only(path)`` accepts land on a disk with ``free`` bytes left."""
    real = os.fdopen
    _FullDisk.left = [free]

    def fdopen(fd, mode="r", *args, **kw):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if "w" not in mode or not only(path):
            return real(fd, mode, *args, **kw)
        raw = io.BufferedWriter(_FullDisk(fd, "wb"))
        return raw if "b" in mode else io.TextIOWrapper(raw, **kw)

    monkeypatch.setattr(os, "fdopen", fdopen)


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd (Linux)")


@needs_proc
@pytest.mark.parametrize("kind", ["torch", "text", "npz"])
def test_disk_full_is_one_clear_error_and_leaves_the_old_file(tmp_path, monkeypatch, kind):
    import torch

    from carclf.errors import CarclfError
    from carclf.io import atomic_torch_save

    target = tmp_path / "last.pt"
    target.write_bytes(b"the previous epoch")
    write = {"torch": lambda: atomic_torch_save({"w": torch.zeros(200_000)}, target),
             "text": lambda: atomic_write_text(target, "x" * 200_000),
             "npz": lambda: atomic_savez(target, w=np.zeros(200_000))}[kind]
    full_disk(monkeypatch, free=50_000)
    with pytest.raises(CarclfError) as info:
        write()
    message = str(info.value)
    assert "\n" not in message
    assert str(target) in message
    assert "disk is full" in message
    assert "free" in message
    assert "--resume" in message
    assert target.read_bytes() == b"the previous epoch"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # the partial temp file is gone


def test_torchs_own_write_error_counts_as_disk_full_only_when_the_disk_is_full(tmp_path, monkeypatch):
    """torch.save can report a failed write as its own RuntimeError ('unexpected pos') with no errno: a full disk
    then, only if the disk really is (nearly) full."""
    import shutil

    from carclf.errors import CarclfError

    def write(fh):
        fh.write(b"part")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=100_000))
    with pytest.raises(CarclfError, match=r"best\.pt.*disk is full"):
        atomic_write(tmp_path / "best.pt", write, "wb")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=50 << 30))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        atomic_write(tmp_path / "best.pt", write, "wb")
    assert list(tmp_path.iterdir()) == []


def test_read_npz_names_the_file_and_never_unpickles(tmp_path):
    from carclf.errors import CarclfError
    from carclf.io import read_npz

    good = tmp_path / "good.npz"
    np.savez(good, a=np.arange(3), b=np.ones(2))
    got = read_npz(good, ("a",), "fix it", optional=("b", "c"))
    assert sorted(got) == ["a", "b"]
    with pytest.raises(CarclfError, match=r"good\.npz' lacks c: fix it"):
        read_npz(good, ("a", "c"), "fix it")
    objects = tmp_path / "objects.npz"
    np.savez(objects, a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(CarclfError, match=r"objects\.npz' holds an object array \('a'"):
        read_npz(objects, ("a",), "fix it")
    for name, data in (("garbage.npz", b"garbage" * 10), ("cut.npz", good.read_bytes()[:100])):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CarclfError, match=rf"{name}' is not a readable \.npz.*: fix it"):
            read_npz(tmp_path / name, ("a",), "fix it")
