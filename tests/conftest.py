import importlib.util
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest

from segohem.config import Config, load_config

# Tests run with W&B off; the one real offline run turns it on with monkeypatch.
os.environ["WANDB_MODE"] = "disabled"
# The project's shared data sits beside the checkout; SEGOHEM_CAMVID points elsewhere.
SHARED_CAMVID = Path(
    os.environ.get("SEGOHEM_CAMVID", Path(__file__).resolve().parents[2] / "shared" / "datasets" / "camvid")
)


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """A benchmark or diagnostic script of scripts/ (not a package) imported as a module."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(tmp_path: Path, *overrides: str) -> Config:
    """A config that trains in seconds on the CPU: 8 synthetic 64x64 images."""
    return load_config(
        None,
        [
            f"run.output_dir={tmp_path}", "run.name=tiny", "run.device=cpu",
            "data.num_train=8", "data.num_val=4", "data.image_size=[64, 64]", "data.batch_size=4",
            "data.val_batch_size=4", "train.epochs=2", "train.progress=false", "train.log_every=1",
            "model.encoder=resnet18", *overrides,
        ],
    )  # fmt: skip


@pytest.fixture(scope="module")
def module_tmp_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    """New folders for one test module's shared fixtures, deleted once the module is done.

    A tiny run's checkpoints are about 170 MB each; kept to the end of the session, the shared
    runs of every module would add up to gigabytes.
    """
    made: list[Path] = []

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def camvid_root() -> Path:
    if not (SHARED_CAMVID / "train").is_dir():
        pytest.skip(f"CamVid copy not found at {SHARED_CAMVID} (set SEGOHEM_CAMVID to a copy to run this)")
    return SHARED_CAMVID


@contextmanager
def interrupted_after_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> Iterator[None]:
    """Inside: a training run stops (KeyboardInterrupt) right after writing epoch ``epoch``'s last.pt."""
    from segohem.engine import loop

    original = loop.save_checkpoint

    def save_then_stop(state, path):
        original(state, path)
        if path.name == "last.pt" and state["progress"]["epoch"] == epoch:
            raise KeyboardInterrupt(f"stopped after epoch {epoch}")

    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.undo()
