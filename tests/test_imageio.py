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


def test_photos_in_memory_and_on_disk_give_the_same_pixels(tmp_path):
    """One decoding path: a large JPEG read from disk (draft mode) and the same bytes uploaded to a server give
    identical model inputs."""
    import io

    import torch

    from carclf.config import load_config
    from carclf.data.dataset import ImageDataset
    from carclf.data.transforms import data_config_for, eval_transform

    rng = np.random.default_rng(0)
    path = tmp_path / "large.jpg"
    Image.fromarray(rng.integers(0, 255, (1600, 2100, 3), dtype=np.uint8)).save(path, quality=85)
    data = path.read_bytes()
    dcfg = data_config_for(load_config(None, ["data.img_size=160"]))
    ds = ImageDataset([path, data, io.BytesIO(data), Image.open(path)], None, eval_transform(dcfg), 160)
    tensors = [ds[i][0] for i in range(4)]
    assert all(ds[i][3] for i in range(4))
    for t in tensors[1:]:
        assert torch.equal(t, tensors[0])
    # Draft mode really was used: a full decode resized the same way gives different pixels.
    full = eval_transform(dcfg)(load_rgb(path))
    assert not torch.equal(full, tensors[0])
