"""The step-through notebooks execute top to bottom, each in a fresh kernel, on the tiny artefacts.

The tiny artefacts (notebooks/artefacts.py: a 320-image world, its teacher, knowledge, two short
Faster R-CNN runs and a 120-step AdaMixer run for 04, built through train.py) are built first when
missing, a few minutes on 2 cores (the AdaMixer run about 2 of them), and cached in
data/notebooks_tiny and runs/notebooks_tiny_*; each notebook then takes up to a few minutes. These
are the slowest tests: skip them with ``python -m pytest -q tests --ignore=tests/test_notebooks.py``.
CI (.ci/run) runs them.
"""
import os
import sys
import time
from pathlib import Path

import pytest

from notebooks import run_all  # notebooks/run_all.py: the runner that also regenerates them

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"

NOTEBOOKS = run_all.NOTEBOOKS


@pytest.fixture(scope="module")
def tiny_artefacts():
    """Build (or find) the tiny artefacts of both students in a subprocess, and point the
    notebooks' kernels at them through HDOVD_ARTEFACTS."""
    import subprocess

    start = time.time()
    subprocess.run([sys.executable, str(NOTEBOOKS_DIR / "artefacts.py"), "tiny"], check=True)
    print(f"tiny artefacts ready in {time.time() - start:.0f} s")
    previous = os.environ.get("HDOVD_ARTEFACTS")
    os.environ["HDOVD_ARTEFACTS"] = "tiny"  # inherited by the kernels nbclient starts
    yield
    if previous is None:
        del os.environ["HDOVD_ARTEFACTS"]
    else:
        os.environ["HDOVD_ARTEFACTS"] = previous


def test_notebooks_exist_in_reading_order():
    names = [p.stem for p in NOTEBOOKS]
    assert names[:5] == ["00_tour", "01_instance", "02_class", "03_image", "04_adamixer"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tiny_artefacts):
    """Every cell runs without error (nbclient raises CellExecutionError with the traceback), and
    the notebook draws at least one figure."""
    nb, seconds = run_all.execute(path)
    print(f"{path.name}: {seconds:.0f} s")
    figures = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if "image/png" in o.get("data", {})]
    assert figures, f"{path.name} drew no figure"
    assert run_all.figure_png(nb) is not None, f"{path.name} has no cell tagged {run_all.FIGURE_TAG}"
