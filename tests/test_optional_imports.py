"""Optional dependencies: a missing one is named with the extra that installs it.

Each check runs in a fresh interpreter where the dependency is blocked
(``sys.modules[name] = None`` makes ``import name`` fail as if it were not
installed), as a user without the extra would meet it.
"""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from layerwise_optax import _optional

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "layerwise_optax"
CORE = {"jax", "jaxlib", "optax", "numpy", "layerwise_optax"}


def _is_type_checking_block(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``): never run, read by type checkers only."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_top_level_modules(path: Path) -> set[str]:
    """Top-level modules a file imports at run time (imports under TYPE_CHECKING excluded)."""
    tree = ast.parse(path.read_text())
    checking_only = {
        id(n)
        for block in ast.walk(tree)
        if _is_type_checking_block(block)
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    names = set()
    for node in ast.walk(tree):
        if id(node) in checking_only:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_imports_an_optional_dependency_directly():
    # Every import of something outside the core and the standard library goes
    # through _optional.require, so it says which extra to install.
    direct = {}
    for path in PACKAGE.rglob("*.py"):
        extra = _imported_top_level_modules(path) - CORE - set(sys.stdlib_module_names)
        if extra:
            direct[str(path.relative_to(ROOT))] = sorted(extra)
    assert not direct, f"import these through layerwise_optax._optional.require: {direct}"


def test_every_required_module_has_an_extra():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "require"
                and isinstance(node.args[0], ast.Constant)
            ):
                top = node.args[0].value.split(".")[0]
                assert top in _optional.EXTRAS, (str(path), top)


def _run_blocked(blocked: list[str], code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )


def test_without_flax_the_core_works_and_flax_and_zoo_name_their_extras(tmp_path):
    code = """
    import layerwise_optax as lo
    import jax.numpy as jnp
    params = {"w": jnp.ones((3, 2))}
    tx = lo.shampoo(1e-2)
    tx.update(params, tx.init(params), params)
    for name in ("layerwise_optax.flax", "layerwise_optax.zoo", "layerwise_optax.zoo._plots"):
        try:
            __import__(name)
        except ModuleNotFoundError as err:
            print(name, "->", err, "| name:", err.name)
        else:
            print(name, "imported")
    """
    out = _run_blocked(["flax"], code, tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3, out.stdout
    assert "layerwise_optax.flax needs the optional dependency 'flax'" in lines[0]
    assert "pip install 'layerwise-optax[flax]'" in lines[0]
    for line in lines[1:]:
        assert "layerwise_optax.zoo needs the optional dependency 'flax'" in line
        assert "pip install 'layerwise-optax[zoo]'" in line
        assert "| name: flax" in line


@pytest.mark.parametrize("blocked", ["matplotlib", "tqdm", "threadpoolctl"])
def test_reproduce_without_the_zoo_extra_stops_before_running_and_names_it(blocked, tmp_path):
    # The user's command, `python -m layerwise_optax.zoo reproduce ...`, with one of
    # the zoo extra's packages missing: a one-line error and exit status 2 before
    # any experiment runs (it used to end, after the runs, in a raw
    # `ModuleNotFoundError: No module named 'matplotlib'`).
    code = """
    import runpy, sys
    sys.argv = ["layerwise_optax.zoo", "reproduce", "linear-rep", "--quick", "--out", "out"]
    runpy.run_module("layerwise_optax.zoo", run_name="__main__")
    """
    out = _run_blocked([blocked], code, tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    assert f"needs the optional dependency {blocked!r}" in out.stderr
    assert "pip install 'layerwise-optax[zoo]'" in out.stderr
    assert not (tmp_path / "out").exists()


def test_figures_and_progress_bar_name_the_zoo_extra_when_called_directly(tmp_path):
    code = """
    from layerwise_optax.zoo import _experiments, _plots
    _experiments._Progress(3, "x", enabled=False).update(1)  # no bar, no tqdm needed
    for call in (lambda: _plots._plt(), lambda: _experiments._Progress(3, "x", enabled=True)):
        try:
            call()
        except ModuleNotFoundError as err:
            print(err)
    """
    out = _run_blocked(["matplotlib", "tqdm"], code, tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2, out.stdout
    assert "figures needs the optional dependency 'matplotlib'" in lines[0]
    assert "progress bar needs the optional dependency 'tqdm'" in lines[1]
    assert all("pip install 'layerwise-optax[zoo]'" in line for line in lines)
