import numpy as np
from PIL import Image

from carclf.data.imageio import check_image, check_images, load_rgb


def test_draft_mode_decodes_large_jpegs_at_reduced_scale(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (2000, 1600), (10, 120, 200)).save(path, quality=90)
    assert load_rgb(path).size == (2000, 1600)
    small = load_rgb(path, target=160, draft_factor=2.0)
    assert 320 <= min(small.size) < 1600  # scaled by libjpeg, still >= target * draft_factor
    assert load_rgb(path, target=900).size == (2000, 1600)  # not much larger than the target: full decode


def test_modes_are_converted_to_rgb(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.save(tmp_path / "a.png")
    assert load_rgb(tmp_path / "a.png").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not black
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = load_rgb(tmp_path / "c.jpg").getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60
    grey16 = Image.fromarray(np.full((4, 4), 65535 // 2, dtype=np.uint16))
    grey16.save(tmp_path / "g.png")
    assert abs(load_rgb(tmp_path / "g.png").getpixel((0, 0))[0] - 127) <= 1
    Image.new("P", (4, 4), 3).save(tmp_path / "p.png")
    assert load_rgb(tmp_path / "p.png").mode == "RGB"


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_rgb(tmp_path / "r.jpg").size == (20, 40)


def test_check_finds_each_kind_of_bad_file_and_caches(tmp_path):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "ok.jpg")
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    (tmp_path / "trunc.jpg").write_bytes((tmp_path / "ok.jpg").read_bytes()[:200])
    assert check_image(str(tmp_path / "ok.jpg")) == ""
    paths = sorted(tmp_path.glob("*.jpg"))
    cache = tmp_path / "cache.json"
    bad = check_images(paths, cache_file=cache, workers=1)
    assert {p.rsplit("/", 1)[-1] for p in bad} == {"zero.jpg", "text.jpg", "trunc.jpg"}
    assert bad[str(tmp_path / "zero.jpg")] == "zero-byte file"
    # Cached: an unchanged file is not decoded again, a changed one is.
    (tmp_path / "zero.jpg").write_bytes((tmp_path / "ok.jpg").read_bytes())
    again = check_images(paths, cache_file=cache, workers=1)
    assert str(tmp_path / "zero.jpg") not in again and len(again) == 2
