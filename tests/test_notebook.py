from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from segohem.cli import run_train

from .conftest import tiny_config

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_run.ipynb"


@pytest.mark.slow
def test_the_notebook_runs_on_a_tiny_run(tmp_path, monkeypatch):
    run_train(tiny_config(tmp_path), resume_from=None)
    monkeypatch.setenv("SEGOHEM_RUN", str(tmp_path / "tiny"))
    monkeypatch.setenv("MPLBACKEND", "Agg")  # a headless default must not hide the inline figures
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the plots and the hardness maps
    text = "".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "synthetic-train-" in text  # the hardest-images query
    assert "person" in text and "val/miou" in text  # the class pivot and the epoch table
