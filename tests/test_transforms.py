import numpy as np
import torch
from PIL import Image

from carclf.config import AugConfig
from carclf.data.transforms import backbone_data_config, batch_normalize, eval_transform, train_transform


def test_transforms_follow_the_backbone_config_and_batch_normalisation_matches_per_image():
    lite = backbone_data_config("tf_efficientnet_lite0", img_size=96)
    assert lite["mean"] == (0.5, 0.5, 0.5)
    assert lite["input_size"] == (3, 96, 96)
    convnext = backbone_data_config("convnextv2_base.fcmae_ft_in22k_in1k_384")
    assert convnext["input_size"] == (3, 384, 384)
    assert convnext["mean"][0] == 0.485
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    x = eval_transform(lite)(img)
    assert x.dtype == torch.uint8
    assert x.shape == (3, 96, 96)
    assert train_transform(lite, AugConfig())(img).shape == (3, 96, 96)
    got = batch_normalize(lite)(x[None])
    expected = (x.float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=0)
    assert batch_normalize(lite)(got) is got  # already float: left alone
