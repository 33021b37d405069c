import json
import sys

import cv2
import numpy as np
import pytest
import torch

from segohem.cli import main, run_train
from segohem.cli.build import build_eval_loader
from segohem.cli.export import OPSET, open_session, read_model_info
from segohem.engine.run import TrainingRun

from .conftest import tiny_config

pytestmark = pytest.mark.slow  # a training run and two exports: about 30 s on 2 CPU cores
onnx = pytest.importorskip("onnx", reason="the export extra is not installed: pip install 'segohem[export]'")
pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install 'segohem[export]'")


@pytest.fixture(scope="module")
def trained_run(module_tmp_factory):
    tmp_path = module_tmp_factory("run")
    run_train(tiny_config(tmp_path, "train.max_steps=1"), resume_from=None)
    return tmp_path / "tiny"


@pytest.fixture(scope="module")
def torch_run(trained_run):
    run, _ = TrainingRun.for_inference(trained_run / "best.pt", [])
    return run


@pytest.fixture(scope="module")
def static_model(trained_run):
    """Exported at the default size: the synthetic 64x64 images, padded to 32."""
    assert main(["export", "--checkpoint", str(trained_run / "best.pt"), "--format", "onnx"]) == 0
    return trained_run / "best.onnx"


@pytest.fixture(scope="module")
def dynamic_model(trained_run):
    output = trained_run / "dynamic.onnx"
    assert main(["export", "--checkpoint", str(trained_run / "best.pt"), "--dynamic", "--output", str(output)]) == 0
    return output


def torch_logits(run, images):
    with torch.no_grad():
        return run.model(torch.from_numpy(images)).numpy()


def onnx_logits(path, images):
    return open_session(path).run(["logits"], {"images": images})[0]


def test_exported_logits_match_pytorch_and_the_val_predictions_are_identical(static_model, torch_run):
    images = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    assert np.abs(onnx_logits(static_model, images) - torch_logits(torch_run, images)).max() < 1e-4
    batch = next(iter(build_eval_loader(torch_run.config, split="val")))
    val_images = batch["image"].numpy()  # the 4 synthetic val images, normalized and padded as in evaluation
    assert val_images.shape == (4, 3, 64, 64)
    exported = onnx_logits(static_model, val_images).argmax(1)
    assert np.array_equal(exported, torch_logits(torch_run, val_images).argmax(1))
    assert len(np.unique(exported)) > 1  # a constant prediction would match trivially


def test_metadata_round_trips(static_model, torch_run):
    model = onnx.load(static_model)
    props = {entry.key: entry.value for entry in model.metadata_props}
    assert json.loads(props["class_names"]) == list(torch_run.classes.names)
    assert json.loads(props["palette"]) == [list(c) for c in torch_run.classes.palette]
    assert int(props["ignore_index"]) == torch_run.classes.ignore_index == 255
    assert json.loads(props["mean"]) == torch_run.config.augment.mean
    assert json.loads(props["std"]) == torch_run.config.augment.std
    assert json.loads(props["input_size"]) == [64, 64]
    assert json.loads(props["config"])["model"]["encoder"] == "resnet18"
    assert [opset.version for opset in model.opset_import if opset.domain in ("", "ai.onnx")] == [OPSET]
    info = read_model_info(open_session(static_model), static_model)
    assert info.names == torch_run.classes.names and info.palette == torch_run.classes.palette
    assert info.augment.mean == torch_run.config.augment.mean and info.augment.pad_divisor == 32


def test_dynamic_export_takes_other_sizes_and_batches_the_static_one_does_not(dynamic_model, static_model, torch_run):
    rng = np.random.default_rng(1)
    for shape in [(1, 3, 64, 64), (3, 3, 96, 160)]:
        images = rng.standard_normal(shape).astype(np.float32)
        logits = onnx_logits(dynamic_model, images)
        assert logits.shape == (shape[0], 7, *shape[2:])
        assert np.abs(logits - torch_logits(torch_run, images)).max() < 1e-4
    assert onnx_logits(static_model, rng.standard_normal((3, 3, 64, 64)).astype(np.float32)).shape[0] == 3
    with pytest.raises(Exception, match=r"(?i)dimension|shape"):
        onnx_logits(static_model, rng.standard_normal((1, 3, 96, 160)).astype(np.float32))


def test_export_refuses_sizes_evaluation_would_not_produce(trained_run, tmp_path, capsys):
    checkpoint = str(trained_run / "best.pt")
    output = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", checkpoint, "--height", "50", "--width", "64", "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--height 50" in err and "--height 64 --width 64" in err
    assert main(["export", "--checkpoint", checkpoint, "--dynamic", "--height", "64", "--width", "64"]) == 2
    assert "--dynamic" in capsys.readouterr().err
    assert not output.exists()


def test_a_missing_onnx_package_names_the_extra(trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    assert main(["export", "--checkpoint", str(trained_run / "best.pt"), "--output", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "onnx" in err and "pip install 'segohem[export]'" in err


def write_inputs(folder):
    folder.mkdir()
    rng = np.random.default_rng(2)
    for name, (height, width) in {"a.png": (50, 70), "b.jpg": (64, 64), "c.png": (33, 47)}.items():
        cv2.imwrite(str(folder / name), rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    (folder / "broken.png").write_bytes(b"not an image")


def test_predict_with_the_onnx_model_writes_what_torch_predict_writes(trained_run, dynamic_model, tmp_path, capsys):
    inputs = tmp_path / "in"
    write_inputs(inputs)
    checkpoint = str(trained_run / "best.pt")
    assert main(["predict", "--checkpoint", checkpoint, "--input", str(inputs), "--output", str(tmp_path / "torch"),
                 "train.progress=false"]) == 1  # fmt: skip
    model = str(dynamic_model)
    assert main(["predict", "--model", model, "--input", str(inputs), "--output", str(tmp_path / "onnx")]) == 1
    assert "broken.png" in capsys.readouterr().err
    written = sorted(p.name for p in (tmp_path / "torch").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "onnx").iterdir()) and len(written) == 6
    for name in written:
        expected = cv2.imread(str(tmp_path / "torch" / name), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(cv2.imread(str(tmp_path / "onnx" / name), cv2.IMREAD_UNCHANGED), expected), name
    labels = cv2.imread(str(tmp_path / "onnx" / "a.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape == (50, 70) and len(np.unique(labels)) > 1


def test_predict_with_the_onnx_model_refuses_bad_inputs(static_model, tmp_path, capsys):
    inputs = tmp_path / "in"
    write_inputs(inputs)
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}
    model = str(static_model)
    assert main(["predict", "--model", model, "--input", str(inputs), "--output", str(inputs)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in inputs.iterdir()} == before
    assert main(["predict", "--model", model, "--input", str(inputs), "--output", str(tmp_path / "o"), "a=1"]) == 2
    assert "no overrides" in capsys.readouterr().err
    # The static model takes 64x64 only: a.png (50x70, padded to 64x96) is skipped with the
    # reason, like the unreadable broken.png; b.jpg (64x64) and c.png (33x47 -> 64x64) are predicted.
    assert main(["predict", "--model", model, "--input", str(inputs), "--output", str(tmp_path / "o")]) == 1
    captured = capsys.readouterr()
    assert "a.png is 64x96 after resizing and padding" in captured.out and "--dynamic" in captured.out
    assert "skipped 2 file(s)" in captured.err and "a.png" in captured.err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["b.png", "b_color.png", "c.png", "c_color.png"]
    foreign = tmp_path / "foreign.onnx"
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["images"], ["logits"])], "identity",
        [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1, 3, 64, 64])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 3, 64, 64])],
    )  # fmt: skip
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)]), foreign)
    assert main(["predict", "--model", str(foreign), "--input", str(inputs), "--output", str(tmp_path / "o")]) == 2
    assert "no segohem metadata" in capsys.readouterr().err
