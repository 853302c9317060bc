"""Fails when a public name of layerwise_optax is missing from the API reference.

The public names are the ``__all__`` of :data:`PUBLIC_MODULES`. Two checks:

* :func:`documented_in_sources` reads the ``.rst`` sources under ``docs/`` for
  ``auto*``/``py:*`` object directives (with their ``currentmodule``); it needs no
  build, so ``tests/test_docs.py`` runs it in the default test tier;
* :func:`documented_in_inventory` reads the built site's ``objects.inv`` (what
  Sphinx actually documented, so a directive that failed to import shows up as
  missing); ``make docs`` runs it after the build::

      python docs/coverage.py --inventory docs/_build/html/objects.inv

Exit status 1, with the missing names listed, when anything public is undocumented.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import zlib
from pathlib import Path

PUBLIC_MODULES = (
    "layerwise_optax",
    "layerwise_optax.flax",
    "layerwise_optax.linalg",
    "layerwise_optax.zoo",
)
DOCS = Path(__file__).resolve().parent

_DIRECTIVE = re.compile(
    r"^\s*\.\.\s+(?P<kind>currentmodule|automodule|py:module|py:currentmodule"
    r"|auto(?:function|class|data|exception|attribute|method)"
    r"|py:(?:function|class|data|exception|attribute|method))::\s*(?P<name>[\w.]+)",
    re.MULTILINE,
)


def public_names(modules: tuple[str, ...] = PUBLIC_MODULES) -> set[str]:
    """Fully qualified public names: ``module.name`` for each ``name`` in ``__all__``."""
    names = set()
    for module in modules:
        mod = importlib.import_module(module)
        names.update(f"{module}.{name}" for name in mod.__all__)
    return names


def documented_in_sources(docs_dir: Path = DOCS) -> set[str]:
    """Fully qualified names that some object directive of the ``.rst`` sources documents.

    ``.. currentmodule:: m`` (or ``automodule``/``py:module``) sets the module that
    the following relative names are resolved in, until the next one or the end
    of the file; a module directive also documents the module itself.
    """
    found = set()
    for path in sorted(Path(docs_dir).rglob("*.rst")):
        if "_build" in path.parts:
            continue
        module = None
        for match in _DIRECTIVE.finditer(path.read_text(encoding="utf-8")):
            kind, name = match["kind"], match["name"]
            if kind in ("currentmodule", "py:currentmodule"):
                module = name
            elif kind in ("automodule", "py:module"):
                module = name
                found.add(name)
            elif module is None or name.startswith("layerwise_optax."):
                found.add(name)
            else:
                found.add(f"{module}.{name}")
    return found


def documented_in_inventory(inventory: Path) -> set[str]:
    """Fully qualified names of the Python objects in a Sphinx ``objects.inv``."""
    raw = Path(inventory).read_bytes()
    header_end = 0
    for _ in range(4):  # four plain-text header lines, then the zlib-compressed body
        header_end = raw.index(b"\n", header_end) + 1
    if not raw.startswith(b"# Sphinx inventory version 2"):
        raise ValueError(f"{inventory}: not a Sphinx version 2 inventory")
    body = zlib.decompress(raw[header_end:]).decode("utf-8")
    names = set()
    for line in body.splitlines():
        match = re.match(r"(?P<name>.+?)\s+(?P<domain>\w+):(?P<role>[\w-]+)\s", line)
        if match and match["domain"] == "py":
            names.add(match["name"])
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inventory", type=Path, help="a built objects.inv to check")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the .rst sources to check")
    args = parser.parse_args(argv)
    public = public_names()
    if args.inventory is not None:
        documented, where = documented_in_inventory(args.inventory), str(args.inventory)
    else:
        documented, where = documented_in_sources(args.docs), str(args.docs)
    missing = sorted(public - documented)
    if missing:
        print(f"{len(missing)} public name(s) not documented in {where}:", file=sys.stderr)
        for name in missing:
            print(f"  {name}", file=sys.stderr)
        return 1
    print(f"docs coverage: all {len(public)} public names documented in {where}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(DOCS.parent))
    sys.exit(main())
