"""The package's layers (docs/architecture.md), enforced on the import graph.

Every module of ``layerwise_optax`` belongs to one layer; a module may import
modules of its own layer and of the layers below it, never above. The few
imports across that rule are listed in ``EXCEPTIONS`` with their reason. The
extensions (``flax/``, ``zoo/``) and the repository's benchmarks, notebooks and
examples use public names only, plus the support modules listed in
``SUPPORT_FOR_EXTENSIONS``. Imports are read from the source (AST), including
those inside functions.
"""

from __future__ import annotations

import ast
import pathlib

import layerwise_optax as lo

PACKAGE = pathlib.Path(lo.__file__).parent
ROOT = PACKAGE.parent

# Lowest first. A module may import its own layer and the layers before it.
LAYERS = {
    # Per-axis maths and the vocabulary every optimizer is written in: factor plans,
    # per-axis statistics, matrix functions, the failure policy, validators, mesh
    # spreading, and layer roles (which leaves are matrices, and how a kernel is
    # viewed as one: a per-leaf plan decision that Muon and steepest descent use).
    "core": {
        "_checks",
        "_linalg",
        "_distribute",
        "_axes",
        "_owner",
        "_failure",
        "_kron",
        "_roles",
        "linalg",
    },
    # One module per paper, written against the core, plus the pieces families
    # share: ``_grafting`` (grafting, guarded Adam), ``_factored`` (the phases
    # Shampoo and SOAP both run) and ``_dual`` (Muon's and steepest descent's
    # guarded momentum and batched polar factors). Algorithms may import those and nothing else of
    # their layer.
    "algorithms": {
        "_grafting",
        "_factored",
        "_dual",
        "_shampoo",
        "_soap",
        "_kfac",
        "_muon",
        "_dion",
        "_steepest",
        "_psgd",
        "_kfac_adaptive",
    },
    # What runs around an optimizer: the registry (the only runtime module that
    # imports the algorithms), static args, failure report, checkpoint checks,
    # state shardings, gradient accumulation.
    "runtime": {
        "_registry",
        "_inject",
        "_health",
        "_checkpoint",
        "_sharding",
        "_multi_steps",
        "_spike",
    },
    # The public facade: re-exports every layer.
    "facade": {"__init__"},
}
# Support utilities outside the maths: optional imports that name their extra, and
# output files/progress bars. They import nothing of the library but each other.
SUPPORT = {"_optional", "_io"}

# Algorithms may import these algorithm modules (shared pieces, not a family).
SHARED_ALGORITHM_MODULES = {"_grafting", "_factored", "_dual"}

# (importer, imported) -> why the layering allows it.
EXCEPTIONS = {
    ("_kfac_adaptive", "_kfac"): (
        "adaptive K-FAC (Martens and Grosse 2015, section 7) is K-FAC's direction with "
        "the learning rate, momentum and damping chosen from the quadratic model: it "
        "wraps scale_by_kfac at the current damping and reads its state"
    ),
    ("_multi_steps", "_kfac"): (
        "multi_steps accumulates K-FAC's statistics over micro-batches: it passes K-FAC's "
        "emit argument and recognizes its state, which is K-FAC's own protocol, not a "
        "property every registry entry has"
    ),
}

# Private modules the extensions (and benchmarks, notebooks, examples) may import,
# with the reason; everything else they use is a public name of layerwise_optax.
SUPPORT_FOR_EXTENSIONS = {
    "_checks": "argument validators: flax's and zoo's errors read like the library's",
    "_optional": "optional imports that name the extra to install (flax, matplotlib, tqdm)",
    "_io": "atomic output files and progress bars of the zoo, benchmarks and notebooks",
}
EXTENSIONS = {"flax", "zoo"}

# Repository scripts that still import algorithm internals, with the reason. Each is
# a debt: the test fails when the import is gone, so the entry is removed with it.
SCRIPT_EXCEPTIONS = {
    ("benchmarks/sharded_refresh.py", "layerwise_optax._axes"): (
        "measures the inverse-root refresh alone, replicated and spread over a mesh, on "
        "Shampoo's block plans; the public update mixes the refresh with the rest of the "
        "step (and its lax.cond), so no public name isolates it"
    ),
    (
        "benchmarks/sharded_refresh.py",
        "layerwise_optax._kron",
    ): "as above: _kron.inverse_roots_tree",
    ("benchmarks/sharded_state.py", "layerwise_optax._kfac"): (
        "builds identity K-FAC statistics for K-FAC's default layout of a whole tree "
        "(_kfac.default_layout: which biases fold into which kernels); no public name "
        "gives that tree-level layout yet"
    ),
}


def _layer_of(module: str) -> str:
    for layer, modules in LAYERS.items():
        if module in modules:
            return layer
    if module in SUPPORT:
        return "support"
    raise AssertionError(f"layerwise_optax/{module}.py is in no layer: add it to LAYERS")


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """``(line, dotted target)`` of every ``layerwise_optax`` import in a file.

    ``from layerwise_optax import X`` gives ``layerwise_optax.X`` when ``X`` is a
    module or package of the library, else ``layerwise_optax`` (a public name).
    """
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [
                (node.lineno, a.name)
                for a in node.names
                if a.name.split(".")[0] == "layerwise_optax"
            ]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "layerwise_optax":
                continue
            base = PACKAGE.parent.joinpath(*node.module.split("."))
            for a in node.names:
                sub = base / a.name
                is_module = sub.with_suffix(".py").exists() or (sub / "__init__.py").exists()
                out.append((node.lineno, f"{node.module}.{a.name}" if is_module else node.module))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import")
    return out


def _top_module(dotted: str) -> str:
    """``layerwise_optax._kfac.x`` -> ``_kfac``; ``layerwise_optax`` -> ``''``."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_has_a_layer():
    for path in PACKAGE.glob("*.py"):
        _layer_of(path.stem)


def test_core_algorithms_runtime_import_only_downwards():
    order = list(LAYERS)
    bad = []
    for path in PACKAGE.glob("*.py"):
        me = path.stem
        mine = _layer_of(me)
        for line, target in _imports(path):
            other = _top_module(target)
            if other in EXTENSIONS or other == "":
                bad.append(f"{path.name}:{line} imports {target} (the facade or an extension)")
                continue
            theirs = _layer_of(other)
            if (me, other) in EXCEPTIONS:
                continue
            if mine == "support":
                ok = theirs == "support"
            elif theirs == "support":
                ok = mine != "core"
            elif mine == "facade":
                ok = True
            else:
                ok = order.index(theirs) <= order.index(mine)
            if ok and mine == theirs == "algorithms":
                ok = other in SHARED_ALGORITHM_MODULES
            if ok and mine == "runtime" and theirs == "algorithms":
                ok = me == "_registry"  # the rest reach the algorithms through the registry
            if not ok:
                bad.append(f"{path.name}:{line} ({mine}) imports {target} ({theirs})")
    assert not bad, "\n".join(bad)


def test_exceptions_are_still_needed():
    for me, other in EXCEPTIONS:
        targets = {_top_module(t) for _, t in _imports(PACKAGE / f"{me}.py")}
        assert other in targets, f"{me} no longer imports {other}: drop the exception"


def _check_public_only(paths, own_package: str | None = None) -> list[str]:
    bad = []
    for path in paths:
        for line, target in _imports(path):
            if (str(path.relative_to(ROOT)), target) in SCRIPT_EXCEPTIONS:
                continue
            parts = target.split(".")
            if len(parts) == 1:
                continue  # import layerwise_optax / from layerwise_optax import <public name>
            top = parts[1]
            if top in SUPPORT_FOR_EXTENSIONS:
                continue
            if top in EXTENSIONS:
                # A public extension package, or the importer's own package's modules.
                if len(parts) == 2 or top == own_package:
                    continue
            if top in {"linalg"} and len(parts) == 2:
                continue
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    return bad


def test_extensions_use_public_names_only():
    bad = []
    for ext in EXTENSIONS:
        bad += _check_public_only(sorted((PACKAGE / ext).rglob("*.py")), own_package=ext)
    assert not bad, "\n".join(bad)


def test_benchmarks_notebooks_examples_use_public_names_only():
    paths = []
    for folder in ("benchmarks", "notebooks", "examples"):
        paths += sorted((ROOT / folder).rglob("*.py"))
    assert paths
    bad = _check_public_only(paths)
    assert not bad, "\n".join(bad)


def test_script_exceptions_are_still_needed():
    for where, target in SCRIPT_EXCEPTIONS:
        targets = {t for _, t in _imports(ROOT / where)}
        assert target in targets, f"{where} no longer imports {target}: drop the exception"
