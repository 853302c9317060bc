"""Packaging facts: one version, the PEP 561 marker, dependency floors that are tested."""

import importlib.metadata
import importlib.resources
import pathlib
import re
import tomllib

from packaging.requirements import Requirement
from packaging.version import Version

import layerwise_optax as lo

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_lives_in_one_place():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    dynamic = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "layerwise_optax.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]\d+|rc\d+|\.dev\d+)?", lo.__version__)


def test_installed_metadata_agrees_with_the_package_version():
    installed = importlib.metadata.version("layerwise-optax")
    assert installed == lo.__version__, (
        f"installed metadata says {installed}, layerwise_optax.__version__ is "
        f"{lo.__version__}: reinstall (pip install -e .) after changing the version"
    )


def test_py_typed_marker_ships():
    assert importlib.resources.files("layerwise_optax").joinpath("py.typed").is_file()
    package_data = PYPROJECT["tool"]["setuptools"]["package-data"]["layerwise_optax"]
    assert "py.typed" in package_data


def _pins(name):
    pins = {}
    for line in (ROOT / ".ci" / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name] = Version(spec.version)
    return pins


def _floors(requirements):
    floors = {}
    for text in requirements:
        req = Requirement(text)
        lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
        if lower:
            floors[req.name] = max(lower)
    return floors


def test_declared_floors_are_the_versions_make_test_oldest_runs():
    # `make test-oldest` installs .ci/oldest-*.txt; the floors in pyproject.toml must be
    # exactly those versions, so a floor is never declared without having been run.
    project = PYPROJECT["project"]
    core, flax = _pins("oldest-core.txt"), _pins("oldest-flax.txt")
    assert _floors(project["dependencies"]) == {n: core[n] for n in ("jax", "optax", "numpy")}
    for extra in ("flax", "zoo"):
        assert _floors(project["optional-dependencies"][extra])["flax"] == flax["flax"]
    # The second step keeps the core floors except what flax's own floor moves up.
    assert flax["optax"] == core["optax"] and flax["numpy"] == core["numpy"]
    assert core["jaxlib"] == core["jax"] and flax["jaxlib"] == flax["jax"] >= core["jax"]
