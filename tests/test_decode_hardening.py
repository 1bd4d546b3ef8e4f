"""Hostile and careless files on every decoding path (issue 16): aspect-ratio bombs, formats outside the list,
truncated JPEGs that end in an EOI marker, photos too small to learn from."""

from __future__ import annotations

import csv
import io
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from carclf.data.imageio import UnreadablePhoto, load_rgb
from carclf.data.manifest import probe_file
from carclf.data.prepare import prepare
from carclf.demo.synth import SynthSpec, make_dataset


def bomb_png(width: int, height: int) -> bytes:
    """A valid greyscale PNG of width x height black pixels, compressed to a few KB (written with zlib rather than
    Pillow, which would hold the whole image in memory to write it)."""
    raw = zlib.compress((b"\0" + b"\0" * width) * height, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def photo_jpeg(size=(400, 300), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    low = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    low.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def truncated_with_eoi(data: bytes) -> bytes:
    """The first quarter of the scan data, then an EOI marker: libjpeg fills the rest with grey and only warns."""
    sos = data.find(b"\xff\xda")
    return data[: sos + (len(data) - sos) // 4] + b"\xff\xd9"


def taller_header(data: bytes, extra: int = 200) -> bytes:
    """The same JPEG whose SOF header claims ``extra`` more rows than its data holds."""
    sof = data.find(b"\xff\xc0")
    (h,) = struct.unpack(">H", data[sof + 5 : sof + 7])
    return data[: sof + 5] + struct.pack(">H", h + extra) + data[sof + 7 :]


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")


def test_an_aspect_ratio_bomb_is_refused_before_the_eval_resize_in_bounded_memory():
    """A 2,000,000 x 20 PNG (under the pixel limit) through the eval transform of the wide recipe's input: refused
    from its header. Run in a fresh process whose peak memory is read back: the old path grew by gigabytes."""
    code = r"""
import json, resource, sys
sys.path.insert(0, %r)
from test_decode_hardening import bomb_png
from carclf.config import load_config
from carclf.data.dataset import ImageDataset
from carclf.data.transforms import data_config_for, eval_transform
dcfg = data_config_for(load_config(None, ["data.img_size=144", "data.aspect=1.89"]))
ds = ImageDataset([bomb_png(2_000_000, 20), bomb_png(10, 4_000_000)], None, eval_transform(dcfg), 144,
                  max_pixels=90_000_000)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ok = [ds[i][3] for i in range(len(ds))]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"ok": ok, "grew_mb": (after - before) / 1024}))
""" % str(__import__("pathlib").Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ok"] == [False, False]  # listed as bad photos, never resized
    assert result["grew_mb"] < 200, result


def test_aspect_ratio_bombs_are_refused_with_the_reason_and_ordinary_panoramas_are_not():
    with pytest.raises(UnreadablePhoto, match="aspect-ratio bomb"):
        load_rgb(bomb_png(2_000_000, 20))
    assert load_rgb(bomb_png(400, 100)).size == (400, 100)  # 4:1, a wide photo of a car


def test_formats_outside_the_list_never_reach_their_plugin():
    with Image.open(io.BytesIO(EPS)) as img:  # what Pillow would do unrestricted: EPS, rendered by Ghostscript
        assert img.format == "EPS"
    with pytest.raises(UnidentifiedImageError):
        load_rgb(EPS)
    dds = b"DDS " + struct.pack("<7I", 124, 0x1007, 16, 16, 0, 0, 0) + b"\0" * 100  # malformed DDS header
    with pytest.raises(UnidentifiedImageError):
        load_rgb(dds)
    assert probe_file  # and in prepare: see test_prepare_lists_every_hostile_file_with_its_reason


def test_truncated_jpegs_ending_in_eoi_are_refused_and_complete_ones_are_not(tmp_path):
    good = photo_jpeg()
    assert load_rgb(good).size == (400, 300)
    for bad in (truncated_with_eoi(good), taller_header(good)):
        with Image.open(io.BytesIO(bad)) as img:  # Pillow alone accepts it, mostly grey
            img.load()
        with pytest.raises(UnreadablePhoto, match="truncated JPEG"):
            load_rgb(bad)
        (tmp_path / "t.jpg").write_bytes(bad)
        with pytest.raises(UnreadablePhoto, match="truncated JPEG"):
            load_rgb(tmp_path / "t.jpg", target=64)  # from disk, draft mode too
    # A genuine photo whose last row is flat mid-grey is not a false alarm.
    grey = Image.new("RGB", (64, 48), (128, 128, 128))
    buf = io.BytesIO()
    grey.save(buf, format="JPEG", quality=95)
    assert load_rgb(buf.getvalue()).size == (64, 48)


def test_large_non_jpeg_photos_are_shrunk_before_the_transform_like_jpegs(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (2000, 1600), (10, 120, 200)).save(path)
    assert load_rgb(path).size == (2000, 1600)
    small = load_rgb(path, target=160, draft_factor=2.0)
    assert 320 <= min(small.size) < 1600
    assert load_rgb(path, target=900).size == (2000, 1600)


def test_prepare_lists_every_hostile_file_with_its_reason(tmp_path):
    root = tmp_path / "data"
    info = make_dataset(root, SynthSpec(n_classes=3, train_per_class=5, test_per_class=1, size=(96, 72), seed=5))
    folder = root / "train" / info.classes[0]
    (folder / "tiny.png").write_bytes(b"")
    Image.new("RGB", (1, 1), (200, 0, 0)).save(folder / "tiny.png")
    (folder / "strip.png").write_bytes(bomb_png(2_000_000, 20))
    (folder / "grey_tail.jpg").write_bytes(truncated_with_eoi(photo_jpeg(seed=1)))
    (folder / "drawing.tif").write_bytes(EPS)  # a PostScript file with a photo's extension
    p = prepare(root, tmp_path / "prep", log=lambda _: None)
    bad = {r["path"].rsplit("/", 1)[-1]: r["error"] for r in p.manifest if r["status"] != "ok"}
    assert "too small to learn from (1x1" in bad["tiny.png"]
    assert "aspect-ratio bomb" in bad["strip.png"]
    assert "truncated JPEG" in bad["grey_tail.jpg"]
    assert "not an image" in bad["drawing.tif"]
    with (p.dir / "quarantine.csv").open(encoding="utf-8", newline="") as fh:
        quarantined = {r["path"].rsplit("/", 1)[-1] for r in csv.DictReader(fh)}
    assert {"tiny.png", "strip.png", "grey_tail.jpg", "drawing.tif"} <= quarantined


def test_a_prepare_folder_probed_under_older_rules_is_read_again(tmp_path):
    """An EOI-truncated JPEG listed "ok" by a prepare from before its check is probed again, not reused."""
    root = tmp_path / "data"
    info = make_dataset(root, SynthSpec(n_classes=3, train_per_class=5, test_per_class=1, size=(96, 72), seed=6))
    (root / "train" / info.classes[0] / "grey_tail.jpg").write_bytes(truncated_with_eoi(photo_jpeg(seed=2)))
    p = prepare(root, tmp_path / "prep", log=lambda _: None)
    manifest = p.dir / "manifest.csv"
    with manifest.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = reader.fieldnames, list(reader)
    for r in rows:  # what an older carclf wrote: every row probed under rules "1", the truncated photo "ok"
        r["checks"] = "1"
        if r["path"].endswith("grey_tail.jpg"):
            r["status"], r["error"] = "ok", ""
    with manifest.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fields)
        writer.writeheader()
        writer.writerows(rows)
    logs: list[str] = []
    again = prepare(root, tmp_path / "prep", log=logs.append)
    row = next(r for r in again.manifest if r["path"].endswith("grey_tail.jpg"))
    assert row["status"] == "bad"
    assert "truncated JPEG" in row["error"]
    assert any(f"reading {len(rows)} of {len(rows)} files" in line for line in logs), logs
    unchanged: list[str] = []
    prepare(root, tmp_path / "prep", log=unchanged.append)  # the rows written now are reused (bad ones: read again)
    assert any(f"reading 1 of {len(rows)} files" in line for line in unchanged), unchanged
