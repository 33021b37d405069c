import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from segohem.config import Config, ConfigError, describe_config, load_config, parse_override, save_config
from segohem.data import class_info
from segohem.ohem import parse_amount


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


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.eval_every=0", r"train.eval_every: 0 is out of range; use a value >= 1 \(epochs between"),
        ("train.log_every=0", r"train.log_every: 0 is out of range; use a value >= 1"),
        ("train.epochs=0", r"train.epochs: 0 is out of range; use a value >= 1"),
        ("train.max_steps=-1", r"train.max_steps: -1 is out of range; use a value >= 0"),
        ("data.num_train=0", r"data.num_train: 0 is out of range; use a value >= 1"),
        ("data.num_val=0", r"data.num_val: 0 is out of range; use a value >= 1"),
        ("data.batch_size=0", r"data.batch_size: 0 is out of range; use a value >= 1"),
        ("augment.pad_divisor=0", r"augment.pad_divisor: 0 is out of range; use a value >= 1"),
        ("augment.hflip=1.5", r"augment.hflip: 1.5 is out of range; use a value >= 0.0 and <= 1.0"),
        ("augment.std=[0.5, 0, 0.5]", r"augment.std\[1\]: 0.0 is out of range; use a value > 0.0"),
        ("augment.mean=[0.5, 0.5]", r"augment.mean: \[0.5, 0.5\] has 2 values; use 3"),
        ("augment.crop=[64]", r"augment.crop: \[64\] has 1 values; use 0 or 2"),
        ("augment.scale=[1.5, 0.5]", r"augment.scale: \[1.5, 0.5\] has low > high"),
        ("data.palette=[[0, 0, 256]]", r"data.palette: \[\[0, 0, 256\]\] needs one \[R, G, B\] per class"),
        ("bank.momentum=1", r"bank.momentum: 1.0 is out of range; use a value >= 0.0 and < 1.0"),
        ("ohem.thresh=0", r"ohem.thresh: 0.0 is out of range; use a value > 0.0 and <= 1.0"),
        ("ohem.top_k=0", r"ohem.top_k: 0 is not a pixel amount; write an integer count >= 1"),
        ("ohem.min_kept=1.0", r"ohem.min_kept: 1.0 is ambiguous; write '100%' to keep every valid pixel, or 1 for"),
        ("ohem.min_kept=120%", r"ohem.min_kept: '120%' is not a pixel amount"),
        ("optim.lr=0", r"optim.lr: 0.0 is out of range; use a value > 0.0"),
        ("run.device=tpu", r"run.device: 'tpu' is not a device; use auto, cpu, cuda or cuda:N"),
        ("run.device=cuda:x", r"run.device: 'cuda:x' is not a device"),
    ],
)
def test_limits_name_the_key_the_value_and_what_works(override, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        load_config(None, [override])


def test_values_inside_the_limits_are_accepted():
    cfg = load_config(
        None,
        ["run.device=cuda:1", "train.max_steps=0", "ohem.min_kept=0", "ohem.top_k=100%", "augment.crop=[32, 48]"],
    )
    assert cfg.run.device == "cuda:1" and cfg.ohem.min_kept == 0 and cfg.ohem.top_k == "100%"
    assert load_config(None, ["run.device=cpu"]).run.device == "cpu"


def test_min_lr_above_lr_is_an_error_naming_both():
    with pytest.raises(ConfigError, match=r"optim.min_lr: 0.01 is above optim.lr=0.001; use a min_lr <= lr"):
        load_config(None, ["optim.min_lr=0.01"])
    assert load_config(None, ["optim.min_lr=0.001"]).optim.min_lr == 0.001


def literal_fields():
    for section in dataclasses.fields(Config):
        for name, annotation in typing.get_type_hints(type(getattr(Config(), section.name))).items():
            if typing.get_origin(annotation) is typing.Literal:
                yield f"{section.name}.{name}", typing.get_args(annotation)


def test_choice_fields_are_literals_whose_errors_list_the_choices():
    found = dict(literal_fields())
    assert set(found) == {
        "data.kind", "ohem.mode", "ohem.scope", "optim.name", "refine.sampler", "train.amp", "wandb.mode", "eval.mode",
        "data.mask_format", "data.voc_train_set", "mining.sampler", "ohem.region_loss",
    }  # fmt: skip
    needs = {
        "data.kind": ["data.root=/data"], "eval.mode": ["eval.crop=[64, 64]", "eval.stride=[32, 32]"],
        "data.mask_format": ["data.kind=folder", "data.root=/data", "data.class_names=[a, b]",
                             "data.palette=[[0, 0, 0], [255, 255, 255]]"],
        "data.voc_train_set": ["data.kind=voc", "data.root=/data"],
    }  # fmt: skip
    for key, choices in found.items():
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: 'bogus' is not one of {', '.join(choices)}$"):
            load_config(None, [f"{key}=bogus"])
        extra = needs.get(key, [])
        for choice in choices:
            assert getattr(load_config(None, [f"{key}={choice}", *extra]), key.split(".")[0]) is not None


def test_test_split_folders_default_and_override():
    cfg = load_config()
    assert (cfg.data.test_images, cfg.data.test_masks) == ("test", "testannot")
    cfg = load_config(None, ["data.test_images=images/test", "data.test_masks=labels/test"])
    assert (cfg.data.test_images, cfg.data.test_masks) == ("images/test", "labels/test")


def test_exponent_floats_without_a_dot_in_overrides_and_files(tmp_path):
    assert load_config(None, ["optim.lr=1e-4"]).optim.lr == 1e-4
    assert load_config(None, ["optim.min_lr=1E-6", "optim.lr=+2e-3"]).optim.min_lr == 1e-6
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 3e-4\n  weight_decay: 5e-5\n")
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (3e-4, 5e-5)
    # a string that reads like such a float is written quoted, so it stays a string
    cfg = load_config(None, ["run.name='1e3'"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml").run.name == "1e3"


def test_every_field_is_documented():
    for section in dataclasses.fields(Config):
        for spec in dataclasses.fields(getattr(Config(), section.name)):
            doc = spec.metadata.get("doc", "")
            assert doc and "\n" not in doc, f"{section.name}.{spec.name} has no one-line doc"


def test_describe_config_comments_every_field_and_round_trips(tmp_path):
    cfg = load_config(
        None,
        [
            "run.name='1e3'", "optim.lr=1e-10", "optim.min_lr=1e-12", "ohem.top_k=20%", "ohem.min_kept=1000",
            "data.class_names=['a: b', '#x', 'yes', 'null', '3']", "data.palette=[[1, 2, 3], [4, 5, 6]]",
            "wandb.tags=['-x', '%y']", "model.encoder_weights=null", "train.snapshot_epochs=[2, 4]",
        ],
    )  # fmt: skip
    text = describe_config(cfg)
    assert "  lr: 1.0e-10  # peak learning rate\n" in text
    assert "  eval_every: 1  # epochs between evaluations\n" in text
    assert "train:  # Training length" in text
    for section in dataclasses.fields(Config):
        for spec in dataclasses.fields(getattr(cfg, section.name)):
            assert f"  {spec.name}: " in text and f"  # {spec.metadata['doc']}\n" in text
    path = tmp_path / "printed.yaml"
    path.write_text(text)
    assert load_config(path) == cfg
    assert load_config(None, base=yaml.safe_load(text)) == cfg  # plain safe_load reads it too


def test_eval_section_defaults_to_whole_images_and_slide_needs_a_window_and_stride():
    cfg = load_config()
    assert (cfg.eval.mode, cfg.eval.flip, cfg.eval.scales) == ("whole", False, [1.0])
    cfg = load_config(None, ["eval.mode=slide", "eval.crop=[512, 1024]", "eval.stride=[341, 682]", "eval.flip=true",
                             "eval.scales=[0.75, 1, 1.25]", "eval.batch_windows=9"])  # fmt: skip
    assert (cfg.eval.crop, cfg.eval.stride, cfg.eval.scales) == ([512, 1024], [341, 682], [0.75, 1.0, 1.25])
    assert cfg.eval.flip and cfg.eval.batch_windows == 9
    with pytest.raises(ConfigError, match=r"^eval.crop is required for eval.mode=slide; set \[H, W\]"):
        load_config(None, ["eval.mode=slide", "eval.stride=[8, 8]"])
    with pytest.raises(ConfigError, match=r"^eval.stride is required for eval.mode=slide"):
        load_config(None, ["eval.mode=slide", "eval.crop=[8, 8]"])
    with pytest.raises(ConfigError, match=r"^eval.stride: \[8, 9\] is larger than eval.crop=\[8, 8\]"):
        load_config(None, ["eval.mode=slide", "eval.crop=[8, 8]", "eval.stride=[8, 9]"])
    assert load_config(None, ["eval.crop=[8, 8]"]).eval.mode == "whole"  # a window alone does not slide


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.crop=[0, 8]", r"eval.crop\[0\]: 0 is out of range; use a value >= 1"),
        ("eval.stride=[8, -1]", r"eval.stride\[1\]: -1 is out of range; use a value >= 1"),
        ("eval.crop=[8]", r"eval.crop: \[8\] has 1 values; use 0 or 2"),
        ("eval.scales=[]", r"eval.scales: \[\] is empty; give at least one value"),
        ("eval.scales=[1.0, 0]", r"eval.scales\[1\]: 0.0 is out of range; use a value > 0.0"),
        ("eval.batch_windows=0", r"eval.batch_windows: 0 is out of range; use a value >= 1"),
        ("eval.flip=maybe", r"eval.flip: expected bool"),
    ],
)
def test_eval_limits_name_the_key(override, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        load_config(None, [override])


def test_every_config_file_loads():
    """The shipped configs load (loading reads no data, so a missing data.root is fine)."""
    folder = Path(__file__).resolve().parents[1] / "configs"
    loaded = {path.name: load_config(path) for path in sorted(folder.glob("*.yaml"))}
    assert set(loaded) >= {"synthetic.yaml", "camvid.yaml", "camvid_full.yaml", "cityscapes.yaml"}
    full, cityscapes = loaded["camvid_full.yaml"], loaded["cityscapes.yaml"]
    assert full.data.resize == [] and full.augment.scale == [0.5, 2.0] and full.eval.mode == "whole"
    assert cityscapes.eval.mode == "slide" and cityscapes.augment.crop == [512, 1024]
    assert cityscapes.data.kind == "cityscapes" and class_info(cityscapes.data).num_classes == 19


AMOUNTS: list[int | float | str] = [
    0,
    1,
    7,
    -1,
    0.5,
    0.0,
    1.0,
    1.5,
    2.0,
    "20%",
    "0%",
    "100%",
    "100.5%",
    "12.5%",
    " 5 % ",
    "20",
    "abc",
    "%",
]


@pytest.mark.parametrize("positive", [False, True])
def test_ohem_amounts_accepted_exactly_as_the_loss_accepts_them(positive):
    key = "ohem.top_k" if positive else "ohem.min_kept"
    for amount in AMOUNTS:
        try:
            parse_amount(amount, positive=positive)
            loss_ok = True
        except ValueError:
            loss_ok = False
        try:
            load_config(None, base={"ohem": {key.split(".")[1]: amount}})
            config_ok = True
        except ConfigError:
            config_ok = False
        assert config_ok == loss_ok, f"{key}={amount!r}: config {config_ok}, OhemCrossEntropy {loss_ok}"


def test_an_error_in_a_config_file_names_the_file_and_one_in_an_override_does_not(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("ohem:\n  tresh: 0.5\n  mode: topk\n")
    with pytest.raises(ConfigError, match=rf"unknown config key 'ohem.tresh'.* \(in {re.escape(str(path))}\)$"):
        load_config(path)
    path.write_text("ohem:\n  mode: topk\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'ohem.tresh'") as raised:
        load_config(path, ["ohem.tresh=0.5"])
    assert str(path) not in str(raised.value)
    path.write_text("ohem:\n  mode: bogus\n")
    assert load_config(path, ["ohem.mode=topk"]).ohem.mode == "topk"  # an override may mend the file
