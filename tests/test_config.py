import pytest

from segohem.config import Config, ConfigError, load_config, parse_override, save_config


def test_defaults_are_the_synthetic_demo():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.data.kind == "synthetic" and cfg.ohem.mode == "threshold"


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.01\nohem:\n  mode: topk\n")
    cfg = load_config(path, ["ohem.top_k=0.3", "data.image_size=[64, 96]", "model.encoder_weights=null"])
    assert cfg.optim.lr == 0.01 and cfg.ohem.mode == "topk" and cfg.ohem.top_k == 0.3
    assert cfg.data.image_size == [64, 96] and cfg.model.encoder_weights is None
    assert isinstance(load_config(None, ["ohem.min_kept=1000"]).ohem.min_kept, int)
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0  # int accepted where float is expected


def test_round_trip_through_saved_yaml(tmp_path):
    cfg = load_config(None, ["run.name=x", "ohem.class_weight=[1, 2, 3, 1, 1, 1, 1]"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_unknown_key_names_path_and_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'ohem.tresh'; did you mean 'ohem.thresh'\?"):
        load_config(None, ["ohem.tresh=0.5"])
    with pytest.raises(ConfigError, match=r"'optimizer'; did you mean 'optim'\?"):
        load_config(None, ["optimizer.lr=0.1"])


def test_wrong_type_and_bad_choice_name_the_path():
    with pytest.raises(ConfigError, match=r"optim.lr: expected float, got 'fast'"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"ohem.mode: 'hardest' is not one of threshold, topk, none"):
        load_config(None, ["ohem.mode=hardest"])
    with pytest.raises(ConfigError, match=r"data.batch_size: expected int"):
        load_config(None, ["data.batch_size=2.5"])
    with pytest.raises(ConfigError, match=r"ohem.thresh"):
        load_config(None, ["ohem.thresh=1.5"])
    with pytest.raises(ConfigError, match=r"data.root is required"):
        load_config(None, ["data.kind=camvid"])


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"key\.sub=value"):
        parse_override("optim.lr")
