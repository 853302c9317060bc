"""Notebooks run in quick mode and their .ipynb pair is in sync with the .py source."""

import os
import pathlib
import subprocess
import sys

import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
SCRIPTS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
# The quickstart and the paper-figure notebooks (quick mode: under a minute each) run in
# the default tier; heavier notebooks go under -m slow.
DEFAULT_TIER = {
    "00_quickstart.py",
    "01_linear_rep.py",
    "02_single_index_alignment.py",
    "03_single_index_test_loss.py",
}


def _mark(path):
    marks = [] if path.name in DEFAULT_TIER else [pytest.mark.slow]
    return pytest.param(path, id=path.stem, marks=marks)


def test_there_are_notebooks():
    assert SCRIPTS, "no notebooks found"


@pytest.mark.parametrize("script", [_mark(p) for p in SCRIPTS])
def test_notebook_runs_in_quick_mode(script, tmp_path):
    env = {**os.environ, "LWO_QUICK": "1", "MPLBACKEND": "Agg"}
    out = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert list((tmp_path / "figures").glob(f"{script.stem}__*.png")), "no figure written"


@pytest.mark.parametrize("script", [pytest.param(p, id=p.stem) for p in SCRIPTS])
def test_ipynb_pair_in_sync_and_without_outputs(script):
    jupytext = pytest.importorskip("jupytext")
    nb_path = script.with_suffix(".ipynb")
    assert nb_path.exists(), f"{nb_path.name} missing: run jupytext --sync {script.name}"
    from_py = jupytext.read(script)
    from_nb = jupytext.read(nb_path)
    cells = lambda nb: [(c.cell_type, c.source.strip()) for c in nb.cells]  # noqa: E731
    assert cells(from_py) == cells(from_nb), f"{nb_path.name} out of sync with {script.name}"
    for cell in from_nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs"), f"{nb_path.name} has committed outputs"
