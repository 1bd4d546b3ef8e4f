import numpy as np
from PIL import Image

from carclf.data.imageio import load_rgb


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
    assert r > 200
    assert g < 60
    assert b < 60
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


def test_dataset_applies_the_configured_pixel_limit(tmp_path):
    import torch

    from carclf.data.dataset import ImageDataset

    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")

    def tf(img):
        return torch.zeros(3, 4, 4, dtype=torch.uint8)

    original = Image.MAX_IMAGE_PIXELS
    try:
        strict = ImageDataset([tmp_path / "a.png"], [0], tf, 4, max_pixels=100)  # 10,000 px > 2 x 100: refused
        assert strict[0][3] is False
        relaxed = ImageDataset([tmp_path / "a.png"], [0], tf, 4, max_pixels=0)  # 0: no limit
        assert relaxed[0][3] is True
    finally:
        Image.MAX_IMAGE_PIXELS = original
