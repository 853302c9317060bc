"""The API reference covers the whole public API, and public docstrings follow the template.

`make docs` builds the site with warnings as errors and checks the built inventory
(`docs/coverage.py --inventory`); these tests are the cheap half that runs in the
default tier without Sphinx: every name in the public `__all__`s appears in an object
directive of the `.rst` sources, and the checker itself catches a removed name.
"""

import importlib
import importlib.util
import inspect
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import zlib

import pytest

import layerwise_optax as lo

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _coverage():
    spec = importlib.util.spec_from_file_location("_docs_coverage", DOCS / "coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_public_name_has_an_autodoc_directive():
    pytest.importorskip("flax")  # layerwise_optax.flax and .zoo are public modules too
    cov = _coverage()
    public = cov.public_names()
    assert "layerwise_optax.muon" in public and "layerwise_optax.zoo.TwoLayerNet" in public
    missing = sorted(public - cov.documented_in_sources(DOCS))
    assert not missing, f"undocumented public names (add them to a page under docs/): {missing}"


def test_source_check_fails_when_a_directive_is_removed(tmp_path):
    pytest.importorskip("flax")
    cov = _coverage()
    for page in DOCS.rglob("*.rst"):
        if "_build" not in page.parts:
            target = tmp_path / page.relative_to(DOCS)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(page.read_text())
    muon_page = tmp_path / "optimizers" / "muon.rst"
    text = muon_page.read_text()
    assert ".. autofunction:: normuon\n" in text
    muon_page.write_text(text.replace(".. autofunction:: normuon\n", ""))
    missing = cov.public_names() - cov.documented_in_sources(tmp_path)
    assert missing == {"layerwise_optax.normuon"}
    assert cov.main(["--docs", str(tmp_path)]) == 1


def test_source_check_resolves_current_module(tmp_path):
    cov = _coverage()
    (tmp_path / "a.rst").write_text(
        ".. currentmodule:: layerwise_optax\n\n.. autofunction:: shampoo\n\n"
        ".. currentmodule:: layerwise_optax.linalg\n\n.. autofunction:: eigh_psd\n"
        ".. py:data:: NS_PRESETS\n\n.. autofunction:: layerwise_optax.soap\n"
    )
    assert cov.documented_in_sources(tmp_path) == {
        "layerwise_optax.shampoo",
        "layerwise_optax.linalg.eigh_psd",
        "layerwise_optax.linalg.NS_PRESETS",
        "layerwise_optax.soap",
    }


def _inventory(path, names):
    header = (
        b"# Sphinx inventory version 2\n# Project: x\n# Version: 0\n"
        b"# The remainder of this file is compressed using zlib.\n"
    )
    body = "".join(f"{name} py:function 1 api.html#$ -\n" for name in names)
    body += "index std:doc -1 index.html Home\n"
    path.write_bytes(header + zlib.compress(body.encode()))
    return path


def test_inventory_check_reads_python_objects_and_fails_on_a_missing_name(tmp_path):
    pytest.importorskip("flax")
    cov = _coverage()
    public = sorted(cov.public_names())
    complete = _inventory(tmp_path / "complete.inv", public)
    assert cov.documented_in_inventory(complete) == set(public)
    assert cov.main(["--inventory", str(complete)]) == 0
    partial = _inventory(tmp_path / "partial.inv", [n for n in public if not n.endswith(".kfac")])
    assert cov.public_names() - cov.documented_in_inventory(partial) == {"layerwise_optax.kfac"}
    assert cov.main(["--inventory", str(partial)]) == 1


def _code_blocks():
    for page in sorted(DOCS.rglob("*.rst")):
        if "_build" in page.parts:
            continue
        for block in re.findall(
            r"^\.\. code-block:: python\n\n((?:(?:   .*)?\n)+)", page.read_text(), re.M
        ):
            code = textwrap.dedent(block)
            yield pytest.param(code, id=f"{page.relative_to(DOCS)}:{code.splitlines()[0][:30]}")


CODE_BLOCKS = list(_code_blocks())


def test_the_docs_have_code_blocks():
    assert len(CODE_BLOCKS) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("code", CODE_BLOCKS)
def test_docs_code_block_runs_standalone(code, tmp_path):
    # Each code block of the site, alone in a fresh interpreter, as a reader would paste
    # it (a few seconds each, hence the slow tier; the README's twins run in the default).
    pytest.importorskip("orbax.checkpoint")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


TEMPLATE_SECTIONS = ("Args:", "Returns:", "Examples:", "References:")
ALIASES_AND_TRANSFORMS = (
    "shampoo",
    "scale_by_shampoo",
    "soap",
    "scale_by_soap",
    "kfac",
    "scale_by_kfac",
    "muon",
    "normuon",
    "scale_by_muon",
    "steepest_descent",
    "scale_by_steepest_descent",
    "psgd_kron",
    "scale_by_psgd_kron",
)


@pytest.mark.parametrize("name", ALIASES_AND_TRANSFORMS)
def test_optimizer_docstrings_follow_the_template(name):
    # Summary line, maths, Args, Returns, Raises, a doctested example, the source paper.
    doc = inspect.getdoc(getattr(lo, name))
    summary = doc.splitlines()[0]
    assert summary.strip() and len(summary) <= 100, name
    missing = [s for s in TEMPLATE_SECTIONS if f"\n{s}\n" not in f"\n{doc}\n"]
    assert not missing, f"{name} lacks {missing}"
    assert ">>> " in doc.split("Examples:", 1)[1], name


# Public functions whose docstrings have no doctested example yet: the failure-policy
# read-outs and inject_hyperparams' table are being rewritten (issue 14, items 2-3), and
# their examples belong with the new code. Anything public not listed here needs one.
WITHOUT_EXAMPLES = {
    "layerwise_optax.failure_counts",
    "layerwise_optax.failure_report",
    "layerwise_optax.raise_on_failure",
    "layerwise_optax.static_args",
}


def _public_functions(module_names):
    for module_name in module_names:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if callable(obj) and not inspect.isclass(obj):
                yield f"{module_name}.{name}", obj


def test_public_functions_have_args_returns_and_an_example():
    pytest.importorskip("flax")
    modules = ("layerwise_optax", "layerwise_optax.linalg", "layerwise_optax.flax")
    missing = []
    for name, fn in _public_functions(modules):
        doc = inspect.getdoc(fn) or ""
        sections = ["Args:", "Returns:"] + ([] if name in WITHOUT_EXAMPLES else ["Examples:"])
        missing += [f"{name}: {s}" for s in sections if f"\n{s}\n" not in f"\n{doc}\n"]
    assert not missing, missing


def test_zoo_functions_have_args_and_returns():
    pytest.importorskip("flax")
    missing = []
    for name, fn in _public_functions(("layerwise_optax.zoo",)):
        doc = inspect.getdoc(fn) or ""
        missing += [f"{name}: {s}" for s in ("Args:", "Returns:") if f"\n{s}\n" not in doc]
    assert not missing, missing


def test_shipped_files_do_not_point_to_files_outside_the_package():
    # PAPER.md is the team's working specification, not part of the package: shipped
    # docstrings cite the paper itself.
    for path in (ROOT / "layerwise_optax").rglob("*.py"):
        assert "PAPER.md" not in path.read_text(), path
