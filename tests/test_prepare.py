"""prepare: a synthetic data set with every planted problem found, classified and nothing else flagged."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carclf.data import manifest as manifest_mod
from carclf.data.dedup import DupGroup, Member
from carclf.data.manifest import IGNORED, probe_file, read_manifest
from carclf.data.names import class_aliases, read_classes_csv
from carclf.data.prepare import Prepared, prepare
from carclf.demo.synth import SynthSpec, make_dataset
from carclf.errors import CarclfError

UNREADABLE = "unreadable.jpg"


def load_prepared(out_dir: Path | str) -> Prepared:
    """Read back what prepare wrote in ``out_dir`` without reading any photo: the files hold all it found."""
    out = Path(out_dir)
    needed = ["manifest.csv", "duplicates.csv", "classes.csv", "summary.json"]
    missing = [n for n in needed if not (out / n).is_file()]
    if missing:
        raise CarclfError(f"'{out}' has no {', '.join(missing)}: run prepare on the data set first")
    rows = [r for r in read_manifest(out / "manifest.csv") if r["status"] != IGNORED]
    for r in rows:
        r["group"] = int(r["group"])
    groups: dict[int, DupGroup] = {}
    for r in _read_csv(out / "duplicates.csv"):
        g = groups.setdefault(int(r["group_id"]), DupGroup(int(r["group_id"]), r["kind"]))
        g.members.append(Member(r["path"], r["split"], r["class"], r["id"], int(r["distance_to_first"])))
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    classes, aliases = read_classes_csv(out / "classes.csv")
    train = [r for r in rows if r["split"] == "train"]
    return Prepared(
        dir=out, manifest=rows, groups=[groups[k] for k in sorted(groups)],
        excluded={r["path"]: r["excluded"] for r in train if r["excluded"]},
        group_of={r["path"]: r["group"] for r in train},
        threshold=int(summary["threshold"]), classes=classes, aliases=aliases, summary=summary,
    )


def _blob(seed: int, size: tuple[int, int]) -> Image.Image:
    """A smooth random picture: distinct content, so distinct perceptual hashes."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray((rng.random((5, 7, 3)) * 255).astype(np.uint8))
    return low.resize(size, Image.Resampling.BICUBIC)


def _deny(path: str) -> bytes:
    if path.endswith(UNREADABLE):
        raise PermissionError(13, "Permission denied", path)
    with open(path, "rb") as fh:
        return fh.read()


def _read_csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def build(root: Path) -> dict:
    """Synthetic data (NFD class folders) plus planted duplicates, leaks, bad files and awkward-but-valid photos."""
    info = make_dataset(root, SynthSpec(n_classes=4, train_per_class=6, test_per_class=2, size=(128, 96),
                                        n_duplicates=0, merged_pair=False, nfd_names=True, seed=3))
    a, b, c, d = info.classes
    folder = {name: root / "train" / unicodedata.normalize("NFD", name) for name in info.classes}
    plant: dict = {"classes": info.classes}

    shutil.copyfile(folder[a] / "0000.jpg", folder[a] / "copy.jpg")  # exact, within class
    with Image.open(folder[a] / "0001.jpg") as im:  # near: resized to 90 % and re-encoded at another quality
        im.resize((115, 86), Image.Resampling.LANCZOS).save(folder[a] / "near.jpg", quality=55)
    shutil.copyfile(folder[b] / "0002.jpg", folder[c] / "cross.jpg")  # the same photo under two classes
    with Image.open(folder[d] / "0003.jpg") as im:  # a test photo that is a lossless re-save of a train photo
        im.save(root / "test" / "TEST_LEAK.png")
    (root / "test" / "loop.jpg").symlink_to("loop.jpg")
    with (root / "test.csv").open("a", encoding="utf-8") as fh:  # and rows scan_test would choke on
        fh.write("TEST_LOOP,./test/loop.jpg\nTEST_OUT,../elsewhere.jpg\nTEST_LEAK,./test/TEST_LEAK.png\n")
    (root / "test" / "TEST_00000.jpg").rename(root / "test" / "gone.jpg")  # listed in test.csv, missing

    bad = folder[a]
    (bad / "zero.jpg").write_bytes(b"")
    good = (folder[a] / "0002.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (bad / "text.jpg").write_text("<html>not a photo</html>\n")
    (bad / "notes.txt").write_text("shot on a phone\n")
    (bad / "phone.jpg").write_bytes(b"\0\0\0\x18ftypheic" + b"\0" * 64)
    (bad / "loop.jpg").symlink_to("loop.jpg")
    (bad / "cycle").symlink_to(".", target_is_directory=True)
    Image.new("1", (10_000, 10_000)).save(bad / "bomb.png")  # 100 MP, ~13 kB on disk
    _blob(99, (64, 48)).save(bad / UNREADABLE)
    (bad / ".DS_Store").write_bytes(b"\0junk")  # an OS leftover: listed in manifest.csv as ignored, nowhere else
    plant["bad"] = {
        "zero.jpg": "zero-byte", "truncated.jpg": "truncated", "text.jpg": "text", "notes.txt": "unsupported file type",
        "phone.jpg": "HEIC", "loop.jpg": "symlink loop",
        "cycle": "symlink loop: 'cycle' links back to its own class folder",
        "bomb.png": "max_pixels", UNREADABLE: "permission denied",
    }

    odd = folder[b]  # unusual but valid: all must decode
    _blob(1, (80, 60)).convert("CMYK").save(odd / "cmyk.jpg")
    _blob(2, (80, 60)).convert("P", palette=Image.Palette.ADAPTIVE).save(odd / "palette.png")
    grey = (np.asarray(_blob(3, (80, 60)).convert("L"), np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey).save(odd / "grey16.png")
    rgba = _blob(4, (80, 60)).convert("RGBA")
    rgba.putalpha(200)
    rgba.save(odd / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees
    _blob(5, (160, 100)).save(odd / "rotated.jpg", exif=exif)
    plant["odd"] = {"cmyk.jpg": "CMYK", "palette.png": "P", "grey16.png": "I;16", "rgba.png": "RGBA",
                    "rotated.jpg": "RGB"}
    plant.update(a=a, b=b, c=c, d=d)
    return plant


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, dict, object]:
    root = tmp_path_factory.mktemp("prep") / "data"
    plant = build(root)
    out = root.parent / "prepare"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(manifest_mod, "_read_bytes", _deny)  # tests run as root, who can read anything
        prepared = prepare(root, out, workers=1, log=lambda s: None)
    return root, plant, prepared


def _t(cls: str, name: str) -> str:
    return f"train/{cls}/{name}"


def test_manifest_paths_are_nfc_and_complete(planted):
    root, plant, p = planted
    paths = [r["path"] for r in p.manifest]
    assert all(unicodedata.is_normalized("NFC", x) for x in paths)
    assert len(paths) == len(set(paths))
    assert not any(".DS_Store" in x for x in paths)
    n_train = 4 * 6 + 1 + 1 + 1 + len(plant["bad"]) + len(plant["odd"])
    assert sum(r["split"] == "train" for r in p.manifest) == n_train
    test = [r for r in p.manifest if r["split"] == "test"]
    assert len(test) == 4 * 2 + 3
    assert test[-1]["id"] == "TEST_LEAK"
    on_disk = (root / "manifest.csv").exists()
    assert not on_disk  # artefacts go to out_dir, never into DATA
    rows = _read_csv(p.dir / "manifest.csv")
    assert [r["path"] for r in rows if r["status"] != "ignored"] == paths
    assert [(r["path"], r["split"]) for r in rows if r["status"] == "ignored"] == \
        [(_t(plant["a"], ".DS_Store"), "ignored")]


def test_every_bad_file_is_listed_with_its_reason_and_nothing_else(planted):
    _, plant, p = planted
    a = plant["a"]
    bad = {r["path"]: r["error"] for r in p.manifest if r["status"] != "ok"}
    expected = {_t(a, name): why for name, why in plant["bad"].items()}
    expected["test/TEST_00000.jpg"] = "not found"
    expected["test/loop.jpg"] = "symlink loop"
    expected["../elsewhere.jpg"] = "outside DATA"
    assert set(bad) == set(expected)
    for path, why in expected.items():
        assert why.lower() in bad[path].lower(), (path, bad[path])
    bomb = bad[_t(a, "bomb.png")]
    assert "100.0 megapixels" in bomb
    assert "max_pixels=0" in bomb
    quarantine = {r["path"]: r["reason"] for r in _read_csv(p.dir / "quarantine.csv")}
    assert set(bad) <= set(quarantine)


def test_unusual_modes_decode_with_displayed_size(planted):
    _, plant, p = planted
    rows = {r["path"]: r for r in p.manifest}
    for name, mode in plant["odd"].items():
        r = rows[_t(plant["b"], name)]
        assert r["status"] == "ok", (name, r["error"])
        assert r["mode"] == mode
    rot = rows[_t(plant["b"], "rotated.jpg")]
    assert (rot["width"], rot["height"], rot["exif_orientation"]) == (100, 160, 6)
    assert rows[_t(plant["b"], "cmyk.jpg")]["format"] == "JPEG"


def test_duplicates_are_found_and_classified_and_nothing_else(planted):
    _, plant, p = planted
    a, b, c, d = plant["a"], plant["b"], plant["c"], plant["d"]
    groups = {frozenset(m.path for m in g.members): g for g in p.groups}
    exact_within = frozenset({_t(a, "0000.jpg"), _t(a, "copy.jpg")})
    near_within = frozenset({_t(a, "0001.jpg"), _t(a, "near.jpg")})
    cross = frozenset({_t(b, "0002.jpg"), _t(c, "cross.jpg")})
    leak = frozenset({_t(d, "0003.jpg"), "test/TEST_LEAK.png"})
    assert set(groups) == {exact_within, near_within, cross, leak}  # no false groups among distinct photos
    flags = {k: (g.kind, g.within_class, g.cross_class, g.train_test) for k, g in groups.items()}
    assert flags[exact_within] == ("exact", True, False, False)
    assert flags[near_within] == ("near", True, False, False)
    assert flags[cross] == ("exact", False, True, False)
    assert flags[leak] == ("exact", False, False, True)  # pixel-identical PNG re-save: exact despite other bytes
    assert groups[near_within].members[1].distance <= p.threshold

    dup = _read_csv(p.dir / "duplicates.csv")
    assert len(dup) == 8
    assert {r["kind"] for r in dup} == {"exact", "near"}
    conflicts = _read_csv(p.dir / "conflicts.csv")
    assert {r["path"] for r in conflicts} == set(cross)
    assert all(r["excluded"] == "1" for r in conflicts)
    (lk,) = _read_csv(p.dir / "leaks.csv")
    assert (lk["test_id"], lk["train_paths"], lk["label_hint"]) == ("TEST_LEAK", _t(d, "0003.jpg"), d)


def test_exclusions_and_groups_for_kfold(planted):
    _, plant, p = planted
    a, b, c, d = plant["a"], plant["b"], plant["c"], plant["d"]
    dupes = {_t(a, "copy.jpg"), _t(a, "near.jpg")}
    conflicts = {_t(b, "0002.jpg"), _t(c, "cross.jpg")}
    bad = {_t(a, n) for n in plant["bad"]}
    assert set(p.excluded) == dupes | conflicts | bad
    assert "duplicate of train/" in p.excluded[_t(a, "copy.jpg")]
    assert "label conflict" in p.excluded[_t(c, "cross.jpg")]
    assert _t(d, "0003.jpg") not in p.excluded  # a leak is reported, the training photo stays
    assert p.group_of[_t(a, "0000.jpg")] == p.group_of[_t(a, "copy.jpg")]
    assert p.group_of[_t(a, "0000.jpg")] != p.group_of[_t(a, "0001.jpg")]
    train = [r["path"] for r in p.manifest if r["split"] == "train"]
    assert set(p.group_of) == set(train)
    assert len(set(p.group_of.values())) == len(train) - 3
    classes = _read_csv(p.dir / "classes.csv")
    assert [r["name"] for r in classes] == plant["classes"]
    assert int(next(r for r in classes if r["name"] == a)["n_used"]) == 6
    summary = json.loads((p.dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["counts"]["excluded"] == len(p.excluded)
    assert summary["threshold"] == p.threshold


def test_load_prepared_reads_back_without_recomputing(planted):
    _, _, p = planted
    q = load_prepared(p.dir)
    assert q.excluded == p.excluded
    assert q.group_of == p.group_of
    assert q.threshold == p.threshold
    assert [(g.id, g.kind, [m.path for m in g.members]) for g in q.groups] == \
        [(g.id, g.kind, [m.path for m in g.members]) for g in p.groups]
    assert q.classes == p.classes
    assert q.aliases == p.aliases
    with pytest.raises(CarclfError, match="run prepare"):
        load_prepared(p.dir / "nothing")


def test_policies_keep_everything_but_bad_files(planted, tmp_path, monkeypatch):
    root, plant, _ = planted
    monkeypatch.setattr(manifest_mod, "_read_bytes", _deny)
    p = prepare(root, tmp_path / "keep", within_class="keep_all", cross_class="keep", workers=1, log=lambda s: None)
    assert set(p.excluded) == {_t(plant["a"], n) for n in plant["bad"]}
    with pytest.raises(CarclfError, match=r"within_class=.*'keep_one', 'keep_all'"):
        prepare(root, tmp_path / "x", within_class="drop")
    with pytest.raises(CarclfError, match=r"cross_class=.*'exclude', 'keep'"):
        prepare(root, tmp_path / "x", cross_class="first")
    with pytest.raises(CarclfError, match="near_threshold"):
        prepare(root, tmp_path / "x", near_threshold=40)


def test_incremental_rereads_only_changed_and_bad_files(planted, tmp_path, monkeypatch):
    root, plant, _ = planted
    data = tmp_path / "data"
    shutil.copytree(root, data, symlinks=True)
    out = tmp_path / "prep"
    monkeypatch.setattr(manifest_mod, "_read_bytes", _deny)
    first = prepare(data, out, workers=2, log=lambda s: None)  # through the process pool
    read: list[str] = []
    real = manifest_mod.probe_file

    def counting(path, *args):
        read.append(Path(path).name)
        return real(path, *args)

    monkeypatch.setattr(manifest_mod, "probe_file", counting)
    again = prepare(data, out, workers=1, log=lambda s: None)
    n_bad = sum(r["status"] != "ok" for r in first.manifest)
    assert again.summary["n_probed"] == len(read) == n_bad  # bad files are always re-checked, the rest reused
    assert again.manifest == first.manifest
    b_dir = data / "train" / unicodedata.normalize("NFD", plant["b"])
    _blob(7, (90, 70)).save(b_dir / "0004.jpg")  # changed content
    _blob(8, (90, 70)).save(b_dir / "added.jpg")
    read.clear()
    third = prepare(data, out, workers=1, log=lambda s: None)
    assert sorted(set(read) - set(plant["bad"]) - {"TEST_00000.jpg", "elsewhere.jpg"}) == ["0004.jpg", "added.jpg"]
    assert third.summary["n_reused"] == len(third.manifest) - len(read)
    row = next(r for r in third.manifest if r["path"] == _t(plant["b"], "0004.jpg"))
    assert (row["width"], row["height"]) == (90, 70)


APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00" + b"Mac OS X        " + b"\0" * 58  # a ._ resource fork


def plant_leftovers(data: Path) -> set[str]:
    """What a macOS zip (and a Windows folder view) leave in the data set; returns their manifest paths."""
    a, b = sorted(p.name for p in (data / "train").iterdir())[:2]
    (data / "train" / "__MACOSX" / a).mkdir(parents=True)
    (data / "train" / "__MACOSX" / a / "._0000.jpg").write_bytes(APPLEDOUBLE)
    (data / "train" / a / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + b"\0" * 32)
    (data / "train" / a / "._0001.jpg").write_bytes(APPLEDOUBLE)
    (data / "train" / a / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 32)
    (data / "train" / b / "DESKTOP.INI").write_text("[.ShellClassInfo]\n")
    (data / "test" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (data / "test" / "__MACOSX").mkdir()
    (data / "test" / "__MACOSX" / "x").write_bytes(APPLEDOUBLE)
    a, b = unicodedata.normalize("NFC", a), unicodedata.normalize("NFC", b)
    return {"train/__MACOSX", _t(a, ".DS_Store"), _t(a, "._0001.jpg"), _t(a, "Thumbs.db"), _t(b, "DESKTOP.INI"),
            "test/.DS_Store", "test/__MACOSX"}


def test_os_and_zip_leftovers_are_listed_as_ignored_and_otherwise_absent(tmp_path_factory, tmp_path):
    clean = tmp_path_factory.mktemp("clean") / "data"
    make_dataset(clean, SynthSpec(n_classes=4, train_per_class=6, test_per_class=2, size=(96, 64), seed=3))
    data = tmp_path / "data"
    shutil.copytree(clean, data)
    leftovers = plant_leftovers(data)
    base = prepare(clean, tmp_path / "clean-prep", workers=1, log=lambda s: None)
    p = prepare(data, tmp_path / "prep", workers=1, log=lambda s: None)

    assert p.classes == base.classes
    assert [r["path"] for r in p.manifest] == [r["path"] for r in base.manifest]  # Prepared.manifest: absent
    assert (p.excluded, p.group_of) == (base.excluded, base.group_of)
    assert [[m.path for m in g.members] for g in p.groups] == [[m.path for m in g.members] for g in base.groups]
    counts, base_counts = dict(p.summary["counts"]), dict(base.summary["counts"])
    assert (counts.pop("ignored"), base_counts.pop("ignored")) == (len(leftovers), 0)
    assert counts == base_counts  # files, bad, used, ...: as if the leftovers were not there
    assert counts["bad"] == 0
    quarantine = _read_csv(p.dir / "quarantine.csv")
    assert quarantine == _read_csv(base.dir / "quarantine.csv")
    assert not {r["path"] for r in quarantine} & leftovers
    assert (p.dir / "classes.csv").read_bytes() == (base.dir / "classes.csv").read_bytes()

    rows = _read_csv(p.dir / "manifest.csv")
    ignored = {r["path"]: r for r in rows if r["status"] == "ignored"}
    assert set(ignored) == leftovers
    for r in ignored.values():
        assert (r["split"], r["class"], r["group"], r["excluded"]) == ("ignored", "", "", "")
        assert r["error"].endswith(", ignored")
    assert "macOS zip leftover (__MACOSX)" in ignored["train/__MACOSX"]["error"]
    assert "Windows thumbnail cache" in next(r["error"] for k, r in ignored.items() if k.endswith("Thumbs.db"))
    assert [r for r in rows if r["status"] != "ignored"] == _read_csv(base.dir / "manifest.csv")

    q = load_prepared(p.dir)
    assert q.manifest == p.manifest
    assert (q.excluded, q.group_of) == (p.excluded, p.group_of)

    again = prepare(data, tmp_path / "prep", workers=1, log=lambda s: None)  # incremental: reuses manifest rows
    assert again.summary["n_probed"] == 0
    assert again.manifest == p.manifest
    assert (again.excluded, again.group_of) == (p.excluded, p.group_of)
    assert _read_csv(p.dir / "manifest.csv") == rows
    assert again.summary["counts"] == p.summary["counts"]


def test_bomb_guard_override_and_warning_band(tmp_path):
    Image.new("L", (1000, 1000)).save(tmp_path / "big.png")
    refused = probe_file(str(tmp_path / "big.png"), max_pixels=600_000)  # 1 MP: in Pillow's warning band
    assert refused["status"] == "bad"
    assert "max_pixels=600,000" in refused["error"]
    refused = probe_file(str(tmp_path / "big.png"), max_pixels=400_000)  # beyond twice the limit: Pillow's error
    assert refused["status"] == "bad"
    assert "1.0 megapixels" in refused["error"]
    assert probe_file(str(tmp_path / "big.png"), max_pixels=0)["status"] == "ok"
    assert Image.MAX_IMAGE_PIXELS not in (400_000, 600_000, None)  # the global limit is restored


def test_aliases_are_ascii_unique_and_romanised():
    names = ["그랜저_6세대_2016_2019", "그랜저 6세대 2016 2019", "K5_3세대_하이브리드", "팰리세이드", "Ünïcode/car",
             unicodedata.normalize("NFD", "싼타페_TM")]
    aliases = class_aliases(names)
    assert aliases["그랜저_6세대_2016_2019"] == "geuraenjeo_6sedae_2016_2019"
    assert aliases["그랜저 6세대 2016 2019"] == "geuraenjeo_6sedae_2016_2019_2"
    assert aliases["K5_3세대_하이브리드"] == "K5_3sedae_haibeurideu"
    assert aliases["싼타페_TM"] == "ssantape_TM"  # keyed and romanised by the NFC name
    assert aliases["Ünïcode/car"] == "Unicode_car"
    for alias in aliases.values():
        assert re.fullmatch(r"[A-Za-z0-9_-]+", alias)
    assert len({a.lower() for a in aliases.values()}) == len(aliases)


def test_report_writes_html_with_existing_pngs_and_thumbnails(planted, tmp_path):
    root, plant, p = planted
    html_path = tmp_path / "rep" / "report.html"
    from carclf.analyze.prepare_report import write_report

    assert write_report(p, root, html_path) == html_path
    text = html_path.read_text(encoding="utf-8")
    srcs = re.findall(r"src=['\"]([^'\"]+)['\"]", text)
    pngs = [s for s in srcs if s.endswith(".png")]
    thumbs = [s for s in srcs if s.startswith("thumbs/")]
    assert len(pngs) == 3
    assert len(thumbs) >= 8
    for s in srcs:
        assert (html_path.parent / s).is_file(), s
    assert plant["a"] in text  # original (Hangul) names in the HTML
    for heading in ("Exact duplicate groups", "Near-duplicate pairs", "Label conflicts", "Train/test leaks",
                    "Quarantined files"):
        assert heading in text
    assert "TEST_LEAK" in text
    assert "symlink loop" in text
    assert os.path.getsize(html_path.parent / pngs[0]) > 1000
