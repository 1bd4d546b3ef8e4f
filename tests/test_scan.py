import shutil
import unicodedata

import pytest

from carclf.data.scan import os_leftover, read_sample_columns, scan_test, scan_train
from carclf.errors import CarclfError


def _touch_jpg(path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)


def test_korean_and_nfd_folder_names_become_nfc(tmp_path):
    nfc_name = "그랜저_6세대_하이브리드_2016_2019"
    nfd_name = unicodedata.normalize("NFD", "쏘나타_DN8_2020_2023")
    assert nfd_name != unicodedata.normalize("NFC", nfd_name)
    for name in (nfc_name, nfd_name):
        for i in range(2):
            _touch_jpg(tmp_path / "train" / name / f"{i}.jpg")
    ts = scan_train(tmp_path)
    assert ts.classes == sorted([nfc_name, "쏘나타_DN8_2020_2023"])
    assert all(unicodedata.is_normalized("NFC", c) for c in ts.classes)
    assert ts.folder_names["쏘나타_DN8_2020_2023"] == nfd_name
    assert len(ts) == 4
    assert ts.labels == [0, 0, 1, 1]


def test_same_name_in_two_unicode_forms_is_refused(tmp_path):
    name = "아반떼_CN7"
    _touch_jpg(tmp_path / "train" / name / "a.jpg")
    _touch_jpg(tmp_path / "train" / unicodedata.normalize("NFD", name) / "b.jpg")
    with pytest.raises(CarclfError, match="different Unicode forms"):
        scan_train(tmp_path)


def test_missing_and_empty_train(tmp_path):
    with pytest.raises(CarclfError, match="does not exist"):
        scan_train(tmp_path / "nope")
    with pytest.raises(CarclfError, match=r"train' not found"):
        scan_train(tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(CarclfError, match="no class folders"):
        scan_train(tmp_path)


def test_class_folder_without_images_is_named(tmp_path):
    _touch_jpg(tmp_path / "train" / "a" / "1.jpg")
    (tmp_path / "train" / "b").mkdir()
    (tmp_path / "train" / "b" / "notes.txt").write_text("x")
    with pytest.raises(CarclfError, match=r"1 class folder\(s\) hold no images.*train/b"):
        scan_train(tmp_path)


def test_csvs_in_utf8_bom_and_cp949(tmp_path):
    (tmp_path / "test.csv").write_bytes("ID,img_path\nTEST_0,./test/TEST_0.jpg\n".encode("utf-8-sig"))
    t = scan_test(tmp_path)
    assert t.ids == ["TEST_0"]
    assert t.paths == [(tmp_path / "test" / "TEST_0.jpg").resolve()]
    (tmp_path / "sample_submission.csv").write_bytes("ID,그랜저,K5\nTEST_0,0.5,0.5\n".encode("cp949"))
    assert read_sample_columns(tmp_path / "sample_submission.csv") == ["그랜저", "K5"]


def test_bad_csvs(tmp_path):
    (tmp_path / "test.csv").write_text("id,path\n")
    with pytest.raises(CarclfError, match="no 'ID' column"):
        scan_test(tmp_path)
    (tmp_path / "test.csv").write_text("ID,img_path\nA,a.jpg\nA,b.jpg\n")
    with pytest.raises(CarclfError, match="repeats IDs: A"):
        scan_test(tmp_path)
    (tmp_path / "s.csv").write_bytes(b"\xff\xfe\x00garbage\x81\xff")
    with pytest.raises(CarclfError, match="neither UTF-8 nor CP949"):
        read_sample_columns(tmp_path / "s.csv")


def test_os_leftover_names():
    for name in ("__MACOSX", "__macosx", ".DS_Store", "._0001.jpg", ".hidden", "Thumbs.db", "THUMBS.DB", "desktop.ini",
                 "Desktop.INI"):
        assert os_leftover(name).endswith(", ignored"), name
    assert "macOS zip leftover (__MACOSX)" in os_leftover("__MACOSX")
    for name in ("0001.jpg", "__MACOSX_photos", "Thumbs.db.jpg", "my.DS_Store.jpg", "그랜저"):
        assert os_leftover(name) == "", name


def test_os_and_zip_leftovers_are_not_classes_or_photos(tmp_path):
    from carclf.demo.synth import SynthSpec, make_dataset

    clean = tmp_path / "clean"
    make_dataset(clean, SynthSpec(n_classes=4, train_per_class=6, test_per_class=2, size=(96, 64), seed=3))
    data = tmp_path / "data"
    shutil.copytree(clean, data)
    cls = sorted(p.name for p in (data / "train").iterdir())[0]
    _touch_jpg(data / "train" / "__MACOSX" / cls / "._0000.jpg")  # decodable or not, never a photo
    _touch_jpg(data / "train" / cls / "._0001.jpg")
    (data / "train" / cls / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (data / "train" / cls / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (data / "test" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (data / "test" / "__MACOSX").mkdir()
    (data / "test" / "__MACOSX" / "x").write_bytes(b"\0")
    want, got = scan_train(clean), scan_train(data)
    assert got.classes == want.classes
    assert got.relpaths() == want.relpaths()
    assert got.labels == want.labels
    only_macosx = tmp_path / "only"
    _touch_jpg(only_macosx / "train" / "__MACOSX" / "a" / "._1.jpg")
    with pytest.raises(CarclfError, match="no class folders"):
        scan_train(only_macosx)


def test_a_link_back_to_the_class_folder_is_a_symlink_loop_not_a_folder(tmp_path):
    """Issue 16 item 16: ``cycle -> .`` (or a link to a folder above) inside a class folder was reported as "a folder
    inside a class folder"; it is a symlink loop, named with where it leads."""
    from carclf.data.scan import class_entry_note

    folder = tmp_path / "train" / "a"
    (folder / "sub").mkdir(parents=True)
    (folder / "cycle").symlink_to(".", target_is_directory=True)
    (folder / "up").symlink_to("../..", target_is_directory=True)
    (folder / "side").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    (folder / "self").symlink_to("self")
    (folder / "x.jpg").write_bytes(b"jpeg")
    note = lambda name: class_entry_note(folder / name, folder)  # noqa: E731
    assert note("cycle").startswith("symlink loop: 'cycle' links back to its own class folder (.)")
    assert note("up").startswith(f"symlink loop: 'up' links back to '{tmp_path.resolve()}', a folder above")
    assert note("sub").startswith("folder inside a class folder")
    assert note("side").startswith("folder inside a class folder")  # a link to a folder elsewhere: no loop
    assert note("self") == ""  # a link to itself: reading it says "symlink loop (too many levels ...)"
    assert note("x.jpg") == ""
