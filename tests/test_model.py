import pytest
import torch

from segohem.config import ConfigError, ModelConfig, OptimConfig
from segohem.engine.optim import build_optimizer, load_optimizer_state
from segohem.model import RefinedModel, build_model, load_model_state


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


def test_a_fresh_refinement_head_leaves_the_base_predictions_unchanged():
    torch.manual_seed(0)
    base = build_model(ModelConfig(encoder="resnet18"), num_classes=4).eval()
    refined = build_model(ModelConfig(encoder="resnet18", refine_head=8), num_classes=4).eval()
    assert isinstance(refined, RefinedModel)
    assert load_model_state(refined, base.state_dict()) == "base"
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.allclose(refined(images), base(images), atol=1e-6)
    # once the head has weights, it changes the logits and round-trips through its own state dict
    with torch.no_grad():
        refined.head[-1].weight.normal_()
    again = build_model(ModelConfig(encoder="resnet18", refine_head=8), num_classes=4).eval()
    assert load_model_state(again, refined.state_dict()) == "full"
    with torch.no_grad():
        assert not torch.allclose(refined(images), base(images), atol=1e-3)
        assert torch.equal(again(images), refined(images))
    with pytest.raises(ConfigError, match="refine_head must be 0"):
        build_model(ModelConfig(refine_head=-1), num_classes=4)


def test_optimizer_state_extends_to_a_new_head():
    torch.manual_seed(0)
    base = build_model(ModelConfig(encoder="resnet18"), num_classes=3)
    optimizer = build_optimizer(base, OptimConfig(lr=0.1))
    base(torch.randn(2, 3, 32, 32)).mean().backward()
    optimizer.step()
    refined = build_model(ModelConfig(encoder="resnet18", refine_head=4), num_classes=3)
    load_model_state(refined, base.state_dict())
    extended = build_optimizer(refined, OptimConfig(lr=0.1))
    with pytest.raises(ValueError, match="parameter groups of sizes"):  # only where a head was attached
        load_optimizer_state(extended, optimizer.state_dict())
    added = load_optimizer_state(extended, optimizer.state_dict(), allow_new=True)
    assert added == len(list(refined.head.parameters()))
    moments = [extended.state[p]["exp_avg"] for p in refined.base.parameters() if p in extended.state]
    saved = [optimizer.state[p]["exp_avg"] for p in base.parameters() if p in optimizer.state]
    assert len(moments) == len(saved) > 0 and all(torch.equal(a, b) for a, b in zip(moments, saved, strict=True))
    assert not any(p in extended.state for p in refined.head.parameters())
    with pytest.raises(ValueError, match="parameter groups of sizes"):
        load_optimizer_state(build_optimizer(base, OptimConfig()), extended.state_dict(), allow_new=True)
