import json

import cv2
import numpy as np
import pytest

from segohem.cli import main, run_train

from .conftest import tiny_config


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("run")
    run_train(tiny_config(tmp_path, "train.max_steps=1"), resume_from=None)
    return tmp_path / "tiny"


def test_eval_prints_table_and_writes_json(trained_run, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert (
        main(["eval", "--checkpoint", str(trained_run / "best.pt"), "--output", str(out), "train.progress=false"]) == 0
    )
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "pole" in printed
    metrics = json.loads(out.read_text())
    assert len(metrics["iou"]) == len(metrics["class_names"]) == 7


def test_predict_writes_labels_and_colour_and_skips_unreadable(trained_run, tmp_path, capsys):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    cv2.imwrite(str(inputs / "a.png"), np.full((50, 70, 3), 120, np.uint8))
    (inputs / "broken.jpg").write_bytes(b"garbage")
    cv2.imwrite(str(inputs / "c.png"), np.full((64, 64, 3), 30, np.uint8))
    code = main(["predict", "--checkpoint", str(trained_run / "last.pt"), "--input", str(inputs),
                 "--output", str(outputs), "train.progress=false"])  # fmt: skip
    assert code == 1
    assert "broken.jpg" in capsys.readouterr().err
    labels = cv2.imread(str(outputs / "a.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape == (50, 70) and labels.max() < 7
    assert cv2.imread(str(outputs / "a_color.png")).shape == (50, 70, 3)
    assert (outputs / "c.png").is_file()


def test_config_errors_exit_with_a_message(tmp_path, capsys):
    assert main(["train", f"run.output_dir={tmp_path}", "ohem.tresh=0.5"]) == 2
    assert "did you mean 'ohem.thresh'" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "no config.yaml" in capsys.readouterr().err
