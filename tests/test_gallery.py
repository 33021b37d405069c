import re

from segohem.cli import main, run_train

from .conftest import tiny_config


def test_viz_writes_a_gallery_of_the_hardest_images_and_the_plots(tmp_path, capsys):
    run_train(tiny_config(tmp_path), resume_from=None)
    run_dir = tmp_path / "tiny"
    assert main(["viz", "--run", str(run_dir), "--num", "3", "train.progress=false"]) == 0
    page = (run_dir / "gallery" / "index.html").read_text()
    pictures = re.findall(r'<img src="(synthetic-train-\d+\.png)"', page)
    assert len(pictures) == 3 and all((run_dir / "gallery" / p).is_file() for p in pictures)
    plots = re.findall(r'<img src="(\.\./plots/\w+\.png)"', page)
    assert {p.split("/")[-1] for p in plots} == {"class_iou.png", "training_curves.png", "kept_fraction.png",
                                                 "class_hardness.png"}  # fmt: skip
    assert main(["viz", "--run", str(run_dir), "--ids", "synthetic-val-00001", "--split", "val",
                 "--output", str(tmp_path / "g"), "train.progress=false"]) == 0  # fmt: skip
    assert (tmp_path / "g" / "synthetic-val-00001.png").is_file()
    assert main(["viz", "--run", str(run_dir), "--ids", "nope", "train.progress=false"]) == 2
    assert "nope" in capsys.readouterr().err
    # a split the dictionary was not built on: its first images, said so, never an empty page
    assert main(["viz", "--run", str(run_dir), "--split", "val", "--num", "2", "--output", str(tmp_path / "v"),
                 "train.progress=false"]) == 0  # fmt: skip
    assert "holds none of these 4 images" in capsys.readouterr().out
    page = (tmp_path / "v" / "index.html").read_text()
    assert re.findall(r'<img src="(synthetic-val-\d+\.png)"', page) == [
        "synthetic-val-00000.png",
        "synthetic-val-00001.png",
    ]
