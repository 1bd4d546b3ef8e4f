"""TTA policies and views, and the per-view out-of-fold logits and features training keeps."""

import numpy as np
import pytest
import torch

from carclf.config import load_config
from carclf.errors import CarclfError
from carclf.models.forward import apply_view, batch_view_logits
from carclf.tta import parse_policy, policy_views
from tests.conftest import tiny_overrides


def test_policy_names_expand_to_views():
    assert parse_policy("none") == ["orig"]
    assert parse_policy("hflip") == ["orig", "flip"]
    assert parse_policy("hflip+multiscale") == ["orig", "flip", "zoom1.15", "zoom1.15+flip"]
    assert len(parse_policy("hflip+fivecrop")) == 10
    assert parse_policy("orig, zoom1.3 ,orig") == ["orig", "zoom1.3"]


@pytest.mark.parametrize("bad", ["bogus", "zoom9", "flip+flip", "", "orig,crop_x"])
def test_unknown_policies_and_views_are_refused(bad):
    with pytest.raises(CarclfError, match="TTA"):
        parse_policy(bad)


def test_config_validates_tta_and_auto_follows_tta_hflip():
    cfg = load_config(None, ["predict.tta=auto", "predict.tta_hflip=false"])
    assert policy_views(cfg.predict) == ["orig"]
    with pytest.raises(CarclfError, match="predict.tta"):
        load_config(None, ["predict.tta=sideways"])
    with pytest.raises(CarclfError, match="oof_views"):
        load_config(None, ["predict.oof_views=zoom7"])


def test_views_transform_the_batch_as_named():
    x = torch.arange(2 * 3 * 16 * 24, dtype=torch.float32).view(2, 3, 16, 24)
    assert torch.equal(apply_view(x, "orig"), x)
    assert torch.equal(apply_view(x, "flip"), torch.flip(x, dims=[3]))
    assert apply_view(x, "zoom1.25").shape[-2:] == (20, 30)
    assert torch.equal(apply_view(x, "zoom1.25+flip"), torch.flip(apply_view(x, "zoom1.25"), dims=[3]))
    crops = {v: apply_view(x, v) for v in parse_policy("fivecrop")}
    assert all(c.shape == x.shape for c in crops.values())
    # the top-left crop starts at the photo's top-left pixel, the bottom-right one ends at its last pixel
    assert crops["crop_tl"][..., 0, 0].equal(x[..., 0, 0])
    assert crops["crop_br"][..., -1, -1].equal(x[..., -1, -1])
    assert not crops["crop_tl"].equal(crops["crop_br"])


def test_view_logits_average_to_the_policy_and_features_feed_the_classifier():
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=5).eval()
    x = torch.randint(0, 255, (2, 3, 64, 96), dtype=torch.uint8)
    views = ["orig", "flip", "zoom1.15"]
    with torch.no_grad():
        logits, feats = batch_view_logits(model, x, torch.device("cpu"), lambda t: t.float() / 255, views,
                                          features=True)
        direct = model(x.float() / 255)
        flipped = model(torch.flip(x.float() / 255, dims=[3]))
    assert logits.shape == (3, 2, 5)
    assert feats.shape == (2, model.num_features)
    torch.testing.assert_close(logits[0], direct, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], flipped, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.get_classifier()(feats), direct, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_training_keeps_every_oof_view_and_the_features(synth_data, tmp_path):
    from carclf.train.loop import train

    cfg = load_config(None, tiny_overrides(synth_data, tmp_path, **{"predict.tta": "hflip",
                                                                   "predict.oof_views": "multiscale"}))
    run = train(cfg, log=lambda s: None)
    with np.load(run / "fold0" / "oof.npz") as z:
        views = list(z["views"])
        assert views == ["orig", "flip", "zoom1.15"]  # the policy's views first, then oof_views' new ones
        n = len(z["indices"])
        assert z["view_logits"].shape == (3, n, 6)
        # the stored logits are the policy's average of its views
        np.testing.assert_allclose(z["view_logits"][:2].astype(np.float32).mean(0), z["logits"], atol=2e-2)
        assert z["features"].shape[0] == n
        assert z["features"].shape[1] > 0
        assert not np.allclose(z["view_logits"][0], z["view_logits"][2])
