"""Packaging facts: one version, the PEP 561 marker, dependency floors that are tested."""

import importlib.metadata
import importlib.resources
import pathlib
import re
import tomllib

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
