"""Notebooks run the way Colab runs them, install what they import, and write only outputs/.

Colab opens the ``.ipynb`` in a fresh kernel whose working directory (``/content``) is
outside any checkout, and the first code cell installs the package. The run test does
the same: the ``.ipynb``'s code cells, top to bottom, in one process started in an empty
folder away from the repository, in quick mode. The install cell finds the package
importable there (``PYTHONPATH`` points at this checkout) and does nothing; what it would
install elsewhere is checked apart by running that cell with pip replaced.
"""

import ast
import importlib.metadata
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SCRIPTS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
REPOSITORY = "https://github.com/layerwise-optax/layerwise_optax"
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


def _params():
    return [pytest.param(p, id=p.stem) for p in SCRIPTS]


def _code_cells(script):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(script.with_suffix(".ipynb"), as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code"], nb


def test_there_are_notebooks():
    assert SCRIPTS, "no notebooks found"


@pytest.mark.parametrize("script", [_mark(p) for p in SCRIPTS])
def test_notebook_runs_like_colab(script, tmp_path):
    cells, _ = _code_cells(script)
    program = tmp_path / "program.py"
    program.write_text("\n\n".join(cells))
    work = tmp_path / "content"  # Colab's working directory: no checkout around it
    work.mkdir()
    env = {
        **os.environ,
        "LWO_QUICK": "1",
        "MPLBACKEND": "Agg",
        "PYTHONPATH": str(ROOT),
        "PYTHONWARNINGS": "default",
    }
    env.pop("LWO_SOURCE", None)
    out = subprocess.run(
        [sys.executable, str(program)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TqdmWarning" not in out.stderr, out.stderr[-3000:]
    assert [p.name for p in work.iterdir()] == ["outputs"], "wrote outside outputs/"
    assert list((work / "outputs").glob(f"{script.stem}__*.png")), "no figure written"


@pytest.mark.parametrize("script", _params())
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


@pytest.mark.parametrize("script", _params())
def test_first_cells_are_the_title_with_a_colab_badge_then_the_install(script):
    _, nb = _code_cells(script)
    title, install = nb.cells[0], nb.cells[1]
    assert title.cell_type == "markdown" and title.source.startswith("# ")
    badge = f"colab.research.google.com/github/{REPOSITORY.split('github.com/')[1]}/blob/main/notebooks/{script.stem}.ipynb"
    assert badge in title.source
    assert install.cell_type == "code" and "pip" in install.source
    assert all(c.source.strip() for c in nb.cells), "empty cell"


def _run_install_cell(script, monkeypatch, cwd, source=None):
    """Runs the install cell as a fresh kernel would, with pip recorded instead of run."""
    cells, _ = _code_cells(script)
    calls = []
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "layerwise_optax" else real_find_spec(name, *a),
    )
    monkeypatch.setattr(subprocess, "check_call", lambda args, **kw: calls.append(args))
    if source is None:
        monkeypatch.delenv("LWO_SOURCE", raising=False)
    else:
        monkeypatch.setenv("LWO_SOURCE", source)
    monkeypatch.chdir(cwd)
    namespace = {}
    exec(compile(cells[0], f"{script.name}:install", "exec"), namespace)
    assert len(calls) == 1, calls
    assert calls[0][:5] == [sys.executable, "-m", "pip", "install", "-q"]
    return calls[0][5], namespace["EXTRA"]


@pytest.mark.parametrize("script", _params())
def test_install_cell_source_in_colab_in_a_checkout_and_overridden(script, monkeypatch, tmp_path):
    # Colab: the working directory holds no checkout (the old default ".." meant "/").
    requirement, extra = _run_install_cell(script, monkeypatch, tmp_path)
    assert requirement == f"layerwise-optax[{extra}] @ git+{REPOSITORY}"
    packaging = pytest.importorskip("packaging.requirements")
    parsed = packaging.Requirement(requirement)
    assert (parsed.name, parsed.extras, parsed.url) == (
        "layerwise-optax",
        {extra},
        f"git+{REPOSITORY}",
    )
    # A kernel started in notebooks/ (or any folder of the checkout) installs the checkout.
    for where in (NOTEBOOKS, ROOT):
        assert _run_install_cell(script, monkeypatch, where)[0] == f"{ROOT}[{extra}]"
    # LWO_SOURCE wins: a path or a git address.
    assert _run_install_cell(script, monkeypatch, tmp_path, "/src/lo")[0] == f"/src/lo[{extra}]"
    fork = "git+https://example.org/fork@v1"
    got = _run_install_cell(script, monkeypatch, tmp_path, fork)[0]
    assert got == f"layerwise-optax[{extra}] @ {fork}"


def _requirement_names(specs):
    return {re.split(r"[<>=!~\[ ;@]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


@pytest.mark.parametrize("script", _params())
def test_install_cell_installs_what_the_notebook_imports(script):
    cells, _ = _code_cells(script)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = re.search(r'^EXTRA = "(\w+)"', cells[0], re.M).group(1)
    assert extra in project["optional-dependencies"], extra
    installed = _requirement_names(project["dependencies"])
    installed |= _requirement_names(project["optional-dependencies"][extra])
    modules = set()
    for tree in map(ast.parse, cells):
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                modules |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    # The optional subpackages need their extra's dependencies.
    needs = {"layerwise_optax.zoo": "zoo", "layerwise_optax.flax": "flax"}
    for module, other in needs.items():
        if module in modules:
            wanted = _requirement_names(project["optional-dependencies"][other])
            assert wanted <= installed, (module, wanted - installed)
    dists = importlib.metadata.packages_distributions()
    third_party = {
        m.split(".")[0]
        for m in modules
        if m.split(".")[0] not in sys.stdlib_module_names and m.split(".")[0] != "layerwise_optax"
    }
    for top in third_party:
        names = {d.lower().replace("_", "-") for d in dists.get(top, [top])}
        assert names & installed, f"{script.name} imports {top}, not in [{extra}]: {installed}"


def test_notebooks_write_only_under_an_ignored_outputs_folder():
    writes = re.compile(r"savefig\(|write_text\(|write_bytes\(|json\.dump\(|np\.save|open\(")
    for script in SCRIPTS:
        for line in script.read_text().splitlines():
            if writes.search(line):
                assert "OUT /" in line, f"{script.name} writes outside outputs/: {line.strip()}"
    for path in ("notebooks/outputs/x.png", "outputs/x.json"):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, capture_output=True)
        if ignored.returncode == 128:
            pytest.skip("not a git checkout")
        assert ignored.returncode == 0, f"{path} is not git-ignored"
