"""Bad inputs a careful new user would try, as one table run through ``segohem.cli.main(argv)``.

Each row builds its inputs in ``tmp_path`` and states the exit code (0 done, 1 predict skipped
unreadable images, 2 bad input, 3 training diverged), fragments of the message that name the
file, key or value (stderr, exactly one line, for a failure; stdout for a success) and, where
something must survive the mistake, the files that must come out byte-identical or a check run
afterwards. Rows marked xfail are product defects: the expectation is what the product should do.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pickle
import shutil
import sqlite3
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from segohem.cli import main, run_train

from .conftest import tiny_config

pytestmark = pytest.mark.slow

# The overrides of conftest.tiny_config as command-line arguments: 8 synthetic 64x64 images, 2 epochs.
TINY = [
    "run.device=cpu", "train.progress=false", "data.num_train=8", "data.num_val=4", "data.image_size=[64, 64]",
    "data.batch_size=4", "data.val_batch_size=4", "train.epochs=2", "train.log_every=1", "model.encoder=resnet18",
]  # fmt: skip
# A folder dataset of 32x32 images and 3 classes; one optimizer step over both training images.
FOLDER = [
    "data.kind=folder", "data.class_names=[a, b, c]", "data.batch_size=2", "data.val_batch_size=2",
    "train.epochs=1", "train.max_steps=1",
]  # fmt: skip
SYNTHETIC_CLASSES = "sky, building, road, car, pole, sign, person"


@pytest.fixture(scope="module")
def trained_run(module_tmp_factory: Callable[[str], Path]) -> Path:
    """A tiny synthetic run folder (one optimizer step); rows that change a run work on a copy."""
    tmp_path = module_tmp_factory("trained")
    run_train(tiny_config(tmp_path, "train.max_steps=1"), resume_from=None)
    return tmp_path / "tiny"


@pytest.fixture(scope="module")
def folder_run(module_tmp_factory: Callable[[str], Path]) -> Path:
    """A run trained on a folder dataset that has train and val folders but no test folder."""
    tmp_path = module_tmp_factory("folder")
    write_dataset(tmp_path / "data")
    argv = ["train", f"run.output_dir={tmp_path}", "run.name=folder", f"data.root={tmp_path / 'data'}"]
    assert main([*argv, *TINY, *FOLDER]) == 0
    return tmp_path / "folder"


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Ctx:
    """What a row's setup builds and its checks read: ``vars`` fill the ``{name}`` slots of fragments."""

    tmp: Path
    request: pytest.FixtureRequest
    capsys: pytest.CaptureFixture[str]
    vars: dict[str, str] = field(default_factory=dict)
    kept: dict[Path, str] = field(default_factory=dict)  # file -> digest it must still have afterwards
    listings: dict[Path, list[Path]] = field(default_factory=dict)  # folder -> the files it must still hold
    open_files: list[Any] = field(default_factory=list)

    @property
    def trained(self) -> Path:
        return self.request.getfixturevalue("trained_run")

    def keep(self, *paths: Path) -> None:
        """These files (or every file under these folders) must come out byte-identical, none added."""
        for path in paths:
            files = files_under(path) if path.is_dir() else [path]
            self.kept.update({p: digest(p) for p in files})
            if path.is_dir():
                self.listings[path] = files

    def run_copy(self) -> Path:
        """A run folder of its own: the trained run's config.yaml, last.pt and hard_pixels.sqlite."""
        run = self.tmp / "run"
        run.mkdir()
        for name in ("config.yaml", "last.pt", "hard_pixels.sqlite"):
            shutil.copy2(self.trained / name, run / name)
        self.vars["run"] = str(run)
        return run


Setup = Callable[[Ctx], list[str]]


@dataclass(frozen=True)
class Case:
    id: str
    setup: Setup  # builds the inputs under ctx.tmp, returns the argv
    code: int
    fragments: tuple[str, ...]  # in stderr (one line) when code != 0, in stdout when code == 0
    warns: str = ""  # fragment of a warning the command must give
    check: Callable[[Ctx], None] | None = None  # what must hold afterwards
    xfail: str = ""  # what is wrong in the product, for rows that fail today


# ---------------------------------------------------------------- building inputs


def train_argv(ctx: Ctx, *overrides: str) -> list[str]:
    return ["train", f"run.output_dir={ctx.tmp / 'runs'}", "run.name=new", *TINY, *overrides]


def train_with(*overrides: str) -> Setup:
    return lambda ctx: train_argv(ctx, *overrides)


def print_config(*extra: str) -> Setup:
    return lambda ctx: ["train", "--print-config", *extra]


def config_file(text: str, *extra: str) -> Setup:
    def setup(ctx: Ctx) -> list[str]:
        path = ctx.tmp / "config.yaml"
        path.write_text(text)
        return ["train", "--config", str(path), *extra, f"run.output_dir={ctx.tmp / 'runs'}"]

    return setup


def labels(height: int = 32, width: int = 32, *, values: int = 3) -> np.ndarray:
    """(H, W) uint8 class ids in horizontal bands, first row ignored (255)."""
    mask = (np.arange(height)[:, None] * values // height).repeat(width, 1).astype(np.uint8)
    mask[0] = 255
    return mask


def image(height: int = 32, width: int = 32) -> np.ndarray:
    return np.random.default_rng(height * 1000 + width).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_encoded(path: Path, array: np.ndarray) -> None:
    """Encode by the suffix and write bytes (any file name, unlike cv2.imwrite)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cv2.imencode(path.suffix, array)[1].tobytes())


def write_pair(root: Path, split: str, stem: str, *, height: int = 32, width: int = 32) -> None:
    write_encoded(root / split / f"{stem}.png", image(height, width))
    write_encoded(root / f"{split}annot" / f"{stem}.png", labels(height, width))


def write_dataset(root: Path) -> Path:
    """root/train/{a,b}.png, root/trainannot/{a,b}.png, root/val/{c,d}.png, root/valannot/{c,d}.png."""
    for split, stems in (("train", "ab"), ("val", "cd")):
        for stem in stems:
            write_pair(root, split, stem)
    return root


def folder_train(ctx: Ctx, *overrides: str) -> list[str]:
    return train_argv(ctx, *FOLDER, f"data.root={ctx.tmp / 'data'}", *overrides)


def on_folder(change: Callable[[Path], None], *overrides: str) -> Setup:
    """Write the folder dataset, apply ``change`` to it, train on it."""

    def setup(ctx: Ctx) -> list[str]:
        change(write_dataset(ctx.tmp / "data"))
        return folder_train(ctx, *overrides)

    return setup


def palette_masks(root: Path) -> None:
    for path in sorted((root / "trainannot").glob("*.png")) + sorted((root / "valannot").glob("*.png")):
        picture = Image.fromarray(labels(), mode="P")
        picture.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [224, 224, 192] * 253)  # VOC-like colours
        picture.save(path)
        assert Image.open(path).mode == "P"


NON_UTF8 = os.fsdecode(b"caf\xe9")  # the stem b"caf\xe9" (Latin-1 e-acute): not valid UTF-8


def non_utf8_name(root: Path) -> None:
    (root / "train" / "b.png").unlink()
    (root / "trainannot" / "b.png").unlink()
    write_pair(root, "train", NON_UTF8)


def mixed_sizes(root: Path) -> None:
    write_pair(root, "train", "b", height=48, width=40)


def mask_as(array: np.ndarray) -> Callable[[Path], None]:
    return lambda root: write_encoded(root / "trainannot" / "b.png", array)


def bad_image(data: bytes) -> Callable[[Path], None]:
    return lambda root: (root / "train" / "b.png").write_bytes(data)


def add_image(name: str) -> Callable[[Path], None]:
    return lambda root: write_encoded(root / "train" / name, image())


def empty_train_folder(root: Path) -> None:
    for path in [*(root / "train").iterdir(), *(root / "trainannot").iterdir()]:
        path.unlink()


def label_value_7(root: Path) -> None:
    mask = labels()
    mask[5, 5] = 7
    write_encoded(root / "trainannot" / "b.png", mask)


def missing_root(ctx: Ctx) -> list[str]:
    return folder_train(ctx, f"data.root={ctx.tmp / 'nowhere'}")


def absent_test_split(ctx: Ctx) -> list[str]:
    run = ctx.request.getfixturevalue("folder_run")
    ctx.vars["root"] = str(run.parent / "data")
    return ["eval", "--checkpoint", str(run / "last.pt"), "--split", "test"]


def colliding_ignore(ctx: Ctx) -> list[str]:
    write_dataset(ctx.tmp / "data")
    return folder_train(ctx, "data.ignore_index=1")


def no_class_names(ctx: Ctx) -> list[str]:
    write_dataset(ctx.tmp / "data")
    return folder_train(ctx, "data.class_names=[]")


def no_cuda(ctx: Ctx) -> list[str]:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: run.device=cuda is valid")
    return train_argv(ctx, "run.device=cuda")


# ---------------------------------------------------------------- checkpoints


def checkpoint_file(name: str, write: Callable[[Ctx, Path], None], *, command: str = "eval") -> Setup:
    def setup(ctx: Ctx) -> list[str]:
        path = ctx.tmp / name
        write(ctx, path)
        ctx.keep(path)
        return [command, "--checkpoint", str(path)]

    return setup


class OpensAFile:
    """Pickles as a call to ``open(path, "w")``: loading it unsafely would create ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def crafted_zip(ctx: Ctx, path: Path) -> None:
    ctx.vars["marker"] = str(ctx.tmp / "pwned")
    torch.save({"format": 2, "model": OpensAFile(ctx.tmp / "pwned")}, path)


def crafted_raw(ctx: Ctx, path: Path) -> None:
    ctx.vars["marker"] = str(ctx.tmp / "pwned")
    path.write_bytes(pickle.dumps({"format": 2, "model": OpensAFile(ctx.tmp / "pwned")}))


def marker_not_created(ctx: Ctx) -> None:
    assert not Path(ctx.vars["marker"]).exists(), "loading the checkpoint ran code from it"


def run_folder_without_config(ctx: Ctx) -> list[str]:
    (ctx.tmp / "notarun").mkdir()
    return ["train", "--resume", str(ctx.tmp / "notarun")]


def resume_truncated(ctx: Ctx) -> list[str]:
    run = ctx.run_copy()
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])
    ctx.keep(run / "config.yaml", run / "last.pt", run / "hard_pixels.sqlite")
    return ["train", "--resume", str(run)]


def resume_without_last(ctx: Ctx) -> list[str]:
    run = ctx.run_copy()
    (run / "last.pt").unlink()
    ctx.keep(run / "config.yaml")
    return ["train", "--resume", str(run)]


def resume_other_encoder(ctx: Ctx) -> list[str]:
    run = ctx.run_copy()
    ctx.keep(run / "config.yaml", run / "last.pt", run / "hard_pixels.sqlite")
    return ["train", "--resume", str(run), "model.encoder=resnet34"]


def plain_resume_works(ctx: Ctx) -> None:
    for path, before in ctx.kept.items():  # checked here, before the resume below rewrites them
        assert digest(path) == before, f"{path} changed"
    ctx.kept.clear()
    ctx.capsys.readouterr()
    assert main(["train", "--resume", ctx.vars["run"], "train.max_steps=2"]) == 0
    assert f"continuing from {ctx.vars['run']}/last.pt after epoch 1" in ctx.capsys.readouterr().out


def resume_lower_lr(ctx: Ctx) -> list[str]:
    """What the divergence message advises: continue the run with a lower optim.lr."""
    return ["train", "--resume", str(ctx.run_copy()), "optim.lr=1e-7", "train.max_steps=2"]


def lower_lr_used(ctx: Ctx) -> None:
    checkpoint = torch.load(Path(ctx.vars["run"]) / "last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["config"]["optim"]["lr"] == 1e-7
    assert checkpoint["scheduler"]["base_lrs"] == [1e-7], "the run went on with the checkpoint's learning rate"
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] <= 1e-7


def resume_with_config(ctx: Ctx) -> list[str]:
    run = ctx.run_copy()
    (ctx.tmp / "other.yaml").write_text("optim:\n  lr: 0.01\n")
    ctx.keep(run / "config.yaml")
    return ["train", "--config", str(ctx.tmp / "other.yaml"), "--resume", str(run)]


def train_over_a_run(ctx: Ctx) -> list[str]:
    run = ctx.run_copy()
    ctx.keep(run)
    return ["train", f"run.output_dir={run.parent}", f"run.name={run.name}", *TINY]


def resume_busy(ctx: Ctx) -> list[str]:
    run = ctx.run_copy()
    handle = (run / ".lock").open("a+")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.write("process 4242 on elsewhere\n")
    handle.flush()
    ctx.open_files.append(handle)
    ctx.keep(run / "config.yaml", run / "last.pt")
    return ["train", "--resume", str(run)]


def refine_missing_checkpoint(ctx: Ctx) -> list[str]:
    run = ctx.run_copy()
    return ["refine", "--run", str(run), "--checkpoint", "nope.pt"]


# ---------------------------------------------------------------- hard-pixel stores


def store_file(write: Callable[[Path], None]) -> Setup:
    def setup(ctx: Ctx) -> list[str]:
        path = ctx.tmp / "stores" / "store.sqlite"
        path.parent.mkdir()
        write(path)
        ctx.keep(path.parent)  # the file unchanged, and no journal or WAL file beside it
        return ["hard-pixels", "--store", str(path)]

    return setup


def foreign_sqlite(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE users(id INTEGER PRIMARY KEY, name TEXT)")
    db.execute("INSERT INTO users(name) VALUES ('ada')")
    db.commit()
    db.close()


def random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8).tobytes())


def corrupt_store_then_resume(ctx: Ctx) -> list[str]:
    run = ctx.run_copy()
    store = run / "hard_pixels.sqlite"
    data = bytearray(store.read_bytes())
    data[100:] = b"\xff" * (len(data) - 100)  # header intact, every page overwritten (disk damage)
    store.write_bytes(bytes(data))
    return ["train", "--resume", str(run), "train.epochs=3", "train.max_steps=2"]


def store_rebuilt(ctx: Ctx) -> None:
    ctx.capsys.readouterr()
    assert main(["hard-pixels", "--run", ctx.vars["run"]]) == 0
    out, err = ctx.capsys.readouterr()
    assert "synthetic-train-" in out and err == ""


def store_of_trained_run(ctx: Ctx) -> list[str]:
    return ["hard-pixels", "--run", str(ctx.trained), "--class", "nosuch"]


def checkpoint_as_store(ctx: Ctx) -> list[str]:
    ctx.vars["last"] = str(ctx.trained / "last.pt")
    return ["hard-pixels", "--store", str(ctx.trained / "last.pt")]


# ---------------------------------------------------------------- predict


def predict_inputs(ctx: Ctx, names: dict[str, np.ndarray | bytes]) -> Path:
    inputs = ctx.tmp / "in"
    inputs.mkdir()
    for name, content in names.items():
        if isinstance(content, bytes):
            (inputs / name).write_bytes(content)
        else:
            write_encoded(inputs / name, content)
    return inputs


def predict(names: dict[str, np.ndarray | bytes], output: Callable[[Ctx, Path], Path]) -> Setup:
    def setup(ctx: Ctx) -> list[str]:
        inputs = predict_inputs(ctx, names)
        out = output(ctx, inputs)
        ctx.keep(inputs)
        ctx.vars["out"] = str(out)
        return ["predict", "--checkpoint", str(ctx.trained / "last.pt"), "--input", str(inputs), "--output", str(out)]

    return setup


def out_folder(ctx: Ctx, inputs: Path) -> Path:
    return ctx.tmp / "out"


def out_is_input(ctx: Ctx, inputs: Path) -> Path:
    return inputs


def out_is_file(ctx: Ctx, inputs: Path) -> Path:
    path = ctx.tmp / "taken.txt"
    path.write_text("keep me")
    ctx.keep(path)
    return path


def nothing_written(ctx: Ctx) -> None:
    assert not (ctx.tmp / "out").exists()


def good_ones_written(ctx: Ctx) -> None:
    out = ctx.tmp / "out"
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a_color.png", "c.png", "c_color.png"]
    assert cv2.imread(str(out / "a.png"), cv2.IMREAD_UNCHANGED).shape == (50, 70)
    assert cv2.imread(str(out / "a_color.png")).shape == (50, 70, 3)


def predict_missing_input(ctx: Ctx) -> list[str]:
    return ["predict", "--checkpoint", str(ctx.trained / "last.pt"), "--input", str(ctx.tmp / "nowhere"),
            "--output", str(ctx.tmp / "out")]  # fmt: skip


# ---------------------------------------------------------------- after a successful training row


def trained_on_folder(ctx: Ctx) -> None:
    assert (ctx.tmp / "runs" / "new" / "last.pt").is_file()


def non_utf8_id_stored(ctx: Ctx) -> None:
    db = sqlite3.connect(ctx.tmp / "runs" / "new" / "hard_pixels.sqlite")
    ids = sorted(row[0] for row in db.execute("SELECT sample_id FROM samples"))
    db.close()
    assert ids == ["a", "caf\\xe9"]


def saved_weights_finite(ctx: Ctx) -> None:
    for path in sorted((ctx.tmp / "runs" / "new").glob("*.pt")):
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
        bad = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        assert not bad, f"{path.name} holds non-finite {bad[:3]}"


def output_dir_is_a_file(ctx: Ctx) -> list[str]:
    (ctx.tmp / "afile").write_text("x")
    ctx.keep(ctx.tmp / "afile")
    return [*train_argv(ctx), f"run.output_dir={ctx.tmp / 'afile'}"]


def run_name_is_a_file(ctx: Ctx) -> list[str]:
    (ctx.tmp / "runs").mkdir()
    (ctx.tmp / "runs" / "new").write_text("x")
    ctx.keep(ctx.tmp / "runs")
    return train_argv(ctx)


def eval_output_is_a_folder(ctx: Ctx) -> list[str]:
    (ctx.tmp / "out").mkdir()
    ctx.keep(ctx.tmp / "out")
    return ["eval", "--checkpoint", str(ctx.run_copy() / "last.pt"), "--output", str(ctx.tmp / "out")]


# ---------------------------------------------------------------- the table

PNG = np.full((40, 40, 3), 90, np.uint8)
CASES = [
    # config: keys, types, limits, choices; files
    Case("config-unknown-key", train_with("ohem.tresh=0.5"), 2,
         ("unknown config key 'ohem.tresh'", "did you mean 'ohem.thresh'?")),
    Case("config-unknown-section-in-yaml", config_file("optm:\n  lr: 0.01\n"), 2,
         ("unknown config key 'optm'", "did you mean 'optim'?", "(in {tmp}/config.yaml)")),
    Case("config-wrong-type", train_with("train.epochs=two"), 2, ("train.epochs: expected int, got 'two' (str)",)),
    Case("config-float-for-int", train_with("data.batch_size=2.5"), 2,
         ("data.batch_size: expected int, got 2.5 (float)",)),
    Case("config-not-a-bool", train_with("train.progress=maybe"), 2,
         ("train.progress: expected bool, got 'maybe' (str)",)),
    Case("config-eval-every-0", train_with("train.eval_every=0"), 2,
         ("train.eval_every: 0 is out of range; use a value >= 1",)),
    Case("config-log-every-0", train_with("train.log_every=0"), 2,
         ("train.log_every: 0 is out of range; use a value >= 1",)),
    Case("config-num-train-0", train_with("data.num_train=0"), 2,
         ("data.num_train: 0 is out of range; use a value >= 1",)),
    Case("config-num-val-0", train_with("data.num_val=0"), 2, ("data.num_val: 0 is out of range; use a value >= 1",)),
    Case("config-max-steps-negative", train_with("train.max_steps=-1"), 2,
         ("train.max_steps: -1 is out of range; use a value >= 0",)),
    Case("config-top-k-0", train_with("ohem.top_k=0"), 2,
         ("ohem.top_k: 0 is not a pixel amount", "integer count >= 1")),
    Case("config-top-k-1.0-ambiguous", train_with("ohem.top_k=1.0"), 2,
         ("ohem.top_k: 1.0 is ambiguous", "write '100%'")),
    Case("config-min-lr-above-lr", train_with("optim.lr=1e-4", "optim.min_lr=1e-3"), 2,
         ("optim.min_lr: 0.001 is above optim.lr=0.0001",)),
    Case("config-lr-nan", train_with("optim.lr=.nan"), 2, ("optim.lr: nan is out of range; use a value > 0.0",)),
    Case("config-device-tpu", train_with("run.device=tpu"), 2,
         ("run.device: 'tpu' is not a device; use auto, cpu, cuda or cuda:N",)),
    Case("config-device-cuda-without-cuda", no_cuda, 2, ("run.device=cuda but CUDA is not available",)),
    Case("config-pad-divisor-0", train_with("augment.pad_divisor=0"), 2,
         ("augment.pad_divisor: 0 is out of range; use a value >= 1",)),
    Case("config-resize-one-value", train_with("data.resize=[64]"), 2,
         ("data.resize: [64] has 1 values; use 0 or 2",)),
    Case("config-mode-bogus", train_with("ohem.mode=bogus"), 2,
         ("ohem.mode: 'bogus' is not one of threshold, topk, none",)),
    Case("config-override-without-equals", train_with("ohem.thresh"), 2,
         ("override 'ohem.thresh' is not of the form key.sub=value",)),
    Case("config-value-for-a-section", train_with("ohem=0.5"), 2, ("ohem: expected a mapping of its keys, got 0.5",)),
    Case("config-key-below-a-value", train_with("ohem.thresh.low=1"), 2,
         ("ohem.thresh: expected float, got {{'low': 1}} (dict)",)),
    Case("config-override-invalid-yaml", train_with("data.resize=[64, 64"), 2,
         ("override 'data.resize=[64, 64': the value is not valid YAML",)),
    Case("config-lr-1e-4-on-command-line", print_config("optim.lr=1e-4"), 0, ("  lr: 0.0001  # peak learning rate",)),
    Case("config-lr-3e-4-in-yaml", config_file("optim:\n  lr: 3e-4\n", "--print-config"), 0,
         ("  lr: 0.0003  # peak learning rate",)),
    Case("config-top-k-percent", print_config("ohem.top_k=20%"), 0, ("  top_k: 20%  #",)),
    Case("config-file-missing", lambda ctx: ["train", "--config", str(ctx.tmp / "missing.yaml")], 2,
         ("cannot read config file {tmp}/missing.yaml: No such file or directory",)),
    Case("config-file-not-a-mapping", config_file("- optim\n- lr\n"), 2,
         ("config file {tmp}/config.yaml must hold a mapping of sections",)),
    Case("config-file-invalid-yaml", config_file("optim: {lr: 1e-3\n"), 2,
         ("config file {tmp}/config.yaml is not valid YAML",)),
    Case("config-section-not-a-mapping", config_file("optim: 0.01\n"), 2,
         ("optim: expected a mapping of its keys, got 0.01",)),
    # data: folder datasets
    Case("data-folder-without-root", train_with("data.kind=folder"), 2,
         ("data.root is required for data.kind=folder",)),
    Case("data-folder-without-class-names", no_class_names, 2, ("data.class_names is required for data.kind=folder",)),
    Case("data-ignore-index-is-a-class", colliding_ignore, 2, ("data.ignore_index 1 collides with class 'b'",)),
    Case("data-corrupt-image", on_folder(bad_image(b"not an image")), 2,
         ("cannot read image {tmp}/data/train/b.png: corrupt or not an image",)),
    Case("data-zero-byte-image", on_folder(bad_image(b"")), 2,
         ("cannot read image {tmp}/data/train/b.png: the file is empty (0 bytes)",)),
    Case("data-mask-wrong-size", on_folder(mask_as(labels(32, 31))), 2,
         ("label file {tmp}/data/trainannot/b.png is 32x31 but its image {tmp}/data/train/b.png is 32x32",
          "(height x width)")),
    Case("data-label-outside-classes", on_folder(label_value_7), 2,
         ("{tmp}/data/trainannot/b.png: label values [7] are outside the classes 0..2",
          "not the ignore id 255")),
    Case("data-colour-mask", on_folder(mask_as(np.stack([labels()] * 3, axis=-1))), 2,
         ("label file {tmp}/data/trainannot/b.png has 3 channels",)),
    Case("data-palette-mask-trains", on_folder(palette_masks), 0, ("done in",), check=trained_on_folder),
    Case("data-one-stem-two-extensions", on_folder(add_image("b.jpg")), 2,
         ("{tmp}/data/train", "(b.jpg and b.png)", "keep one file per stem")),
    Case("data-image-without-mask", on_folder(add_image("c.png")), 2,
         ("have no label file of the same stem in {tmp}/data/trainannot", "['c']")),
    Case("data-empty-train-folder", on_folder(empty_train_folder), 2, ("no images (.png", "in {tmp}/data/train")),
    Case("data-sizes-differ-without-resize", on_folder(mixed_sizes), 2,
         ("a 32x32", "b 64x64 (read as 48x40)", "set data.resize=[H, W]")),
    Case("data-sizes-differ-with-resize-trains", on_folder(mixed_sizes, "data.resize=[32, 32]"), 0, ("done in",),
         check=trained_on_folder),
    Case("data-missing-folder", missing_root, 2,
         ("the train split's image folder {tmp}/nowhere/train does not exist",
          "set data.train_images and data.train_masks")),
    Case("data-test-split-absent", absent_test_split, 2,
         ("the test split's image folder {root}/test does not exist", "data.test_images")),
    Case("data-non-utf8-file-name-trains", on_folder(non_utf8_name), 0, ("done in",), check=non_utf8_id_stored),
    Case("data-corrupt-image-in-a-worker", on_folder(bad_image(b"not an image"), "data.num_workers=1"), 2,
         ("cannot read image {tmp}/data/train/b.png: corrupt or not an image",)),
    # checkpoints
    Case("checkpoint-empty", checkpoint_file("empty.pt", lambda ctx, p: p.write_bytes(b"")), 2,
         ("checkpoint {tmp}/empty.pt is empty (0 bytes)",)),
    Case("checkpoint-truncated-on-resume", resume_truncated, 2, ("checkpoint {run}/last.pt is truncated or corrupt",)),
    Case("checkpoint-random-bytes", checkpoint_file("random.pt", lambda ctx, p: random_bytes(p), command="mine"), 2,
         ("checkpoint {tmp}/random.pt is truncated or corrupt",)),
    Case("checkpoint-crafted-pickle", checkpoint_file("crafted.pt", crafted_zip), 2,
         ("checkpoint {tmp}/crafted.pt holds objects that safe loading refuses",), check=marker_not_created),
    Case("checkpoint-crafted-raw-pickle", checkpoint_file("crafted.pt", crafted_raw), 2,
         ("checkpoint {tmp}/crafted.pt holds objects that safe loading refuses",), check=marker_not_created),
    Case("checkpoint-plain-state-dict",
         checkpoint_file("weights.pt", lambda ctx, p: torch.save({"weight": torch.zeros(2)}, p)), 2,
         ("checkpoint {tmp}/weights.pt is not a segohem checkpoint: it holds 'weight' (a plain state_dict?)",)),
    Case("checkpoint-text-file", checkpoint_file("notes.pt", lambda ctx, p: p.write_text("hello world\n")), 2,
         ("checkpoint {tmp}/notes.pt is not a checkpoint file: torch.load cannot read it",)),
    Case("checkpoint-yaml-file", checkpoint_file("c.pt", lambda ctx, p: p.write_text("a: 1\nb: [1, 2]\n")), 2,
         ("checkpoint {tmp}/c.pt is not a checkpoint file: torch.load cannot read it",)),
    Case("checkpoint-not-a-dict", checkpoint_file("list.pt", lambda ctx, p: torch.save([1, 2], p)), 2,
         ("checkpoint {tmp}/list.pt holds a list, not a segohem checkpoint",)),
    Case("checkpoint-missing", lambda ctx: ["eval", "--checkpoint", str(ctx.tmp / "nope.pt")], 2,
         ("no checkpoint at {tmp}/nope.pt",)),
    Case("checkpoint-is-a-run-folder", lambda ctx: ["eval", "--checkpoint", str(ctx.run_copy())], 2,
         ("{run} is a folder, not a checkpoint; pass {run}/last.pt",)),
    Case("resume-folder-without-config", run_folder_without_config, 2,
         ("--resume {tmp}/notarun: no config.yaml there",)),
    Case("resume-without-last-pt", resume_without_last, 2, ("no checkpoint at {run}/last.pt",)),
    Case("resume-other-encoder", resume_other_encoder, 2,
         ("checkpoint {run}/last.pt does not fit the configured model", "model.*"), check=plain_resume_works),
    Case("resume-with-lower-lr", resume_lower_lr, 0, ("continuing from {run}/last.pt",), check=lower_lr_used),
    Case("resume-with-config", resume_with_config, 2, ("--config cannot be combined with --resume",)),
    Case("resume-while-in-use", resume_busy, 2, ("run folder {run} is in use by process 4242 on elsewhere",)),
    Case("train-into-a-run-folder", train_over_a_run, 2,
         ("run folder {run} already holds a run; resume it with `segohem train --resume {run}`",)),
    Case("refine-missing-checkpoint", refine_missing_checkpoint, 2, ("no checkpoint at {run}/nope.pt",)),
    # hard-pixel stores
    Case("store-foreign-sqlite", store_file(foreign_sqlite), 2,
         ("{tmp}/stores/store.sqlite is not a segohem hard-pixel store: it lacks the table(s) meta",)),
    Case("store-random-bytes", store_file(random_bytes), 2, ("{tmp}/stores/store.sqlite is not an SQLite database",)),
    Case("store-empty-file", store_file(lambda p: p.write_bytes(b"")), 2,
         ("{tmp}/stores/store.sqlite is empty (0 bytes)",)),
    Case("store-missing", lambda ctx: ["hard-pixels", "--store", str(ctx.tmp / "none.sqlite")], 2,
         ("no hard-pixel store at {tmp}/none.sqlite",)),
    Case("store-is-a-checkpoint", checkpoint_as_store, 2, ("{last} is not an SQLite database",)),
    Case("store-neither-run-nor-store", lambda ctx: ["hard-pixels"], 2,
         ("give exactly one of --run DIR and --store FILE",)),
    Case("store-unknown-class", store_of_trained_run, 2, (f"unknown class 'nosuch'; classes: {SYNTHETIC_CLASSES}",)),
    Case("store-corrupt-then-resume", corrupt_store_then_resume, 0, ("continuing from {run}/last.pt",),
         warns="it will be rebuilt from the checkpoint's dictionary", check=store_rebuilt),
    # predict
    Case("predict-output-is-input", predict({"a.png": PNG}, out_is_input), 2,
         ("would overwrite the input {tmp}/in/a.png; choose another --output",)),
    Case("predict-same-stem-png-jpg", predict({"same.png": PNG, "same.jpg": PNG}, out_folder), 2,
         ("same.jpg and same.png would both be written as same.png",), check=nothing_written),
    Case("predict-foo-and-foo-color", predict({"foo.png": PNG, "foo_color.png": PNG}, out_folder), 2,
         ("foo.png and foo_color.png would both be written as foo_color.png",), check=nothing_written),
    Case("predict-output-is-a-file", predict({"a.png": PNG}, out_is_file), 2,
         ("--output {tmp}/taken.txt is a file",)),
    Case("output-dir-is-a-file", output_dir_is_a_file, 2, ("Not a directory: '{tmp}/afile",)),
    Case("run-name-is-a-file", run_name_is_a_file, 2, ("File exists: '{tmp}/runs/new'",)),
    Case("eval-output-is-a-folder", eval_output_is_a_folder, 2, ("Is a directory: '{tmp}/out'",)),
    Case("predict-missing-input", predict_missing_input, 2,
         ("--input {tmp}/nowhere does not exist; give a folder of images",)),
    Case("predict-unreadable-among-good",
         predict({"a.png": image(50, 70), "broken.jpg": b"garbage", "c.png": PNG}, out_folder), 1,
         ("skipped 1 file(s): {tmp}/in/broken.jpg",), check=good_ones_written),
    # divergence
    Case("train-diverges", train_with("optim.lr=1e6", "train.max_nonfinite_steps=2", "data.num_train=16",
                                      "train.epochs=3"), 3,
         ("lower optim.lr",), check=saved_weights_finite),
]  # fmt: skip


def params() -> list[Any]:
    rows = []
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
        rows.append(pytest.param(case, id=case.id, marks=marks))
    return rows


@pytest.mark.parametrize("case", params())
def test_bad_input(case: Case, tmp_path: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]):
    ctx = Ctx(tmp_path, request, capsys)
    ctx.vars["tmp"] = str(tmp_path)
    try:
        argv = case.setup(ctx)
        capsys.readouterr()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = main(argv)
        out, err = capsys.readouterr()
        assert code == case.code, f"exit {code}, expected {case.code}; stderr: {err}"
        if case.code == 0:
            text = out
            assert err == "", f"a success printed to stderr: {err}"
        else:
            text = err
            assert err.endswith("\n") and err.count("\n") == 1, f"not one line on stderr:\n{err}"
            if case.code != 1:
                assert err.startswith(f"segohem {argv[0]}: error: "), err
        for fragment in case.fragments:
            expected = fragment.format(**ctx.vars)
            assert expected in text, f"{expected!r} not in {text!r}"
        if case.warns:
            messages = [str(w.message) for w in caught]
            assert any(case.warns in m for m in messages), f"no warning with {case.warns!r} in {messages}"
        if case.check is not None:
            case.check(ctx)
        for path, before in ctx.kept.items():
            assert path.is_file() and digest(path) == before, f"{path} was changed"
        for folder, files in ctx.listings.items():
            assert files_under(folder) == files, f"files were added to or removed from {folder}"
    finally:
        for handle in ctx.open_files:
            handle.close()
