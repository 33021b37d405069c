import pytest
import torch

from segohem.config import ConfigError, ModelConfig
from segohem.model import build_model


def test_encoder_weights_from_a_local_state_dict(tmp_path):
    source = build_model(ModelConfig(encoder="resnet18"), num_classes=3)
    path = tmp_path / "encoder.pth"
    torch.save(source.encoder.state_dict(), path)
    model = build_model(ModelConfig(encoder="resnet18", encoder_weights=str(path)), num_classes=3)
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_bad_model_configs_name_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="no file at"):
        build_model(ModelConfig(encoder_weights=str(tmp_path / "missing.pth")), num_classes=3)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ConfigError, match="does not match encoder 'resnet18'"):
        build_model(ModelConfig(encoder_weights=str(wrong)), num_classes=3)
    with pytest.raises(ConfigError, match="cannot build Unet with encoder 'no-such-encoder'"):
        build_model(ModelConfig(encoder="no-such-encoder"), num_classes=3)
