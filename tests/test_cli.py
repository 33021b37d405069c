import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from segohem.cli import main, run_train

from .conftest import tiny_config


@pytest.fixture(scope="module")
def trained_run(module_tmp_factory):
    tmp_path = module_tmp_factory("run")
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


def test_predict_never_overwrites_inputs_or_its_own_outputs(trained_run, tmp_path, capsys):
    checkpoint = str(trained_run / "last.pt")
    inputs = tmp_path / "in"
    inputs.mkdir()
    cv2.imwrite(str(inputs / "a.png"), np.full((40, 40, 3), 90, np.uint8))
    before = (inputs / "a.png").read_bytes()
    assert main(["predict", "--checkpoint", checkpoint, "--input", str(inputs), "--output", str(inputs)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert (inputs / "a.png").read_bytes() == before and sorted(p.name for p in inputs.iterdir()) == ["a.png"]

    cv2.imwrite(str(inputs / "a.jpg"), np.full((40, 40, 3), 90, np.uint8))
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", checkpoint, "--input", str(inputs), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "a.jpg and a.png would both be written as a.png" in err and not out.exists()
    (inputs / "a.jpg").unlink()
    cv2.imwrite(str(inputs / "a_color.png"), np.full((40, 40, 3), 90, np.uint8))
    assert main(["predict", "--checkpoint", checkpoint, "--input", str(inputs), "--output", str(out)]) == 2
    assert "would both be written as a_color.png" in capsys.readouterr().err

    a_file = tmp_path / "taken.txt"
    a_file.write_text("keep me")
    assert main(["predict", "--checkpoint", checkpoint, "--input", str(inputs), "--output", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "keep me"


def test_predict_reads_and_writes_file_names_that_are_not_utf8(trained_run, tmp_path):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    _, encoded = cv2.imencode(".png", np.full((30, 50, 3), 60, np.uint8))
    name = os.fsencode(inputs) + b"/caf\xe9.png"  # Latin-1 e-acute: not valid UTF-8
    with open(name, "wb") as handle:
        handle.write(encoded.tobytes())
    code = main(["predict", "--checkpoint", str(trained_run / "last.pt"), "--input", str(inputs),
                 "--output", str(outputs), "train.progress=false"])  # fmt: skip
    assert code == 0
    written = sorted(os.listdir(os.fsencode(outputs)))
    assert written == [b"caf\xe9.png", b"caf\xe9_color.png"]
    labels = cv2.imdecode(np.fromfile(os.fsencode(outputs) + b"/caf\xe9.png", np.uint8), cv2.IMREAD_UNCHANGED)
    assert labels.shape == (30, 50)


def test_version_and_print_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and "segohem 0." in capsys.readouterr().out
    assert main(["train", "--print-config", "ohem.mode=topk"]) == 0
    printed = capsys.readouterr().out
    assert "mode: topk" in printed and "eval_every" in printed


def test_overrides_may_come_before_and_after_options(capsys):
    assert main(["train", "--print-config", "ohem.mode=topk", "train.epochs=3"]) == 0
    together = capsys.readouterr().out
    assert main(["train", "ohem.mode=topk", "--print-config", "train.epochs=3"]) == 0  # argparse alone refuses
    assert capsys.readouterr().out == together
    assert "mode: topk" in together and "epochs: 3" in together
    for argv in (["train", "--print-config", "--no-such-option"], ["hard-pixels", "--run", "x", "ohem.mode=topk"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert f"unrecognized arguments: {argv[-1]}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [["--version"], ["--help"], ["eval", "--no-such-option"], ["train", "--print-config", "ohem.mode=topk"]]
)
def test_help_version_usage_errors_and_print_config_do_not_import_torch(argv):
    # the commands import torch (seconds); what argparse or the config answers alone must not wait for it
    code = (
        f"import sys; from segohem.cli import main\ntry: main({argv!r})\nexcept SystemExit: pass\n"
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_a_reader_that_goes_away_ends_the_command_quietly():
    # `segohem train --print-config | head -1`: the pipe's reader is gone before the config is written
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "segohem.cli", "train", "--print-config"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["hard-pixels", "--store", "x.sqlite", "--top", "-3"], "argument --top: expected a whole number >= 1, got -3"),
        (["viz", "--run", "r", "--num", "0"], "argument --num: expected a whole number >= 1, got 0"),
        (["check-data", "--workers", "two"], "argument --workers: expected a whole number, got 'two'"),
    ],
)
def test_counts_below_one_are_refused_with_the_option_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_class_filter_on_a_view_that_covers_every_class_is_refused(capsys):
    assert main(["hard-pixels", "--store", "x.sqlite", "--view", "pairs", "--class", "pole"]) == 2
    assert "--class selects images (--view images); --view pairs covers every class" in capsys.readouterr().err


def test_overrides_after_viz_ids_are_overrides(monkeypatch):
    from segohem.cli import commands

    seen = {}
    monkeypatch.setattr(commands, "run_viz", lambda run, **kwargs: seen.update(kwargs))
    assert main(["viz", "--run", "r", "--ids", "a", "b=c", "eval.flip=true", "--split", "val", "data.root=/x"]) == 0
    assert seen["ids"] == ["a", "b=c"]  # a sample id may hold '=': only dotted keys are overrides
    assert seen["overrides"] == ["eval.flip=true", "data.root=/x"]
