"""The public surface: a snapshot of __all__, no private optax imports, documented callables."""

import inspect
import pathlib

import jax
import numpy as np

import layerwise_optax as lo
from layerwise_optax import _registry, linalg
from tests._helpers import PARAM_AND_STATE_HELPERS, WRAPPERS_AND_SCHEDULES

PACKAGE = pathlib.Path(lo.__file__).parent

EXPECTED_ALL = {
    "DimensionNumbers",
    "DiagonalFactors",
    "FoldedBias",
    "KfacCurvature",
    "KfacDiagonal",
    "KfacFactors",
    "ScaleByKfacAdaptiveState",
    "ScaleByKfacState",
    "HIDDEN_ROLES",
    "ROLES",
    "ScaleByPsgdKronState",
    "precond_update_prob_schedule",
    "psgd_kron",
    "scale_by_psgd_kron",
    "DEFAULT_NORMS",
    "NORMS",
    "ScaleBySteepestDescentState",
    "scale_by_steepest_descent",
    "steepest_descent",
    "ScaleByMuonState",
    "ScaleByDionState",
    "dion",
    "scale_by_dion",
    "ScaleByShampooState",
    "ScaleBySoapState",
    "default_dimension_numbers",
    "default_kernel_dimension_numbers",
    "format_roles",
    "inject_hyperparams",
    "kfac",
    "kfac_adaptive",
    "kfac_adaptive_values",
    "layer_roles",
    "matrix_dimension_numbers",
    "linalg",
    "multi_steps",
    "muon",
    "normuon",
    "scale_by_kfac",
    "scale_by_muon",
    "scale_by_shampoo",
    "scale_by_soap",
    "shampoo",
    "soap",
    "static_args",
    "FailureCounts",
    "FailureReport",
    "OptimizerFailureError",
    "check_state",
    "checkpointable",
    "failure_counts",
    "failure_report",
    "raise_on_failure",
    "restore_state",
    "SkipStepOnSpikesState",
    "skip_step_on_spikes",
    "state_shardings",
}


def test_all_snapshot():
    assert set(lo.__all__) == EXPECTED_ALL
    for name in lo.__all__:
        assert hasattr(lo, name), name


def test_no_private_optax_imports():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "optax._src" not in text, path


def test_core_imports_only_jax_optax_numpy():
    allowed = {
        "jax",
        "optax",
        "numpy",
        "layerwise_optax",
        "__future__",
        "collections",
        "dataclasses",
        "fnmatch",
        "inspect",
        "functools",
        "importlib",
        "math",
        "types",
        "typing",
        # _io.py (output files and progress bars for the zoo, benchmarks and notebooks).
        "os",
        "pathlib",
        "secrets",
        "sys",
    }
    for path in PACKAGE.glob("*.py"):
        for line in path.read_text().splitlines():
            if line.startswith(("import ", "from ")):
                top = line.split()[1].split(".")[0]
                assert top in allowed, (path.name, line)


def test_public_callables_document_args_and_returns():
    callables = [getattr(lo, n) for n in lo.__all__ if callable(getattr(lo, n))]
    callables += [getattr(linalg, n) for n in linalg.__all__ if callable(getattr(linalg, n))]
    for fn in callables:
        if inspect.isclass(fn):
            assert "Attributes:" in (fn.__doc__ or ""), fn
            continue
        doc = fn.__doc__ or ""
        assert "Args:" in doc and "Returns:" in doc, fn.__name__


def _factory_list():
    """Every public optimizer factory, from the optimizer registry."""
    return tuple(f for _, f in _registry.iter_factories(public_only=True))


FACTORY_LIST = _factory_list()


def _public_factories():
    """Callables in ``lo.__all__`` that build an optimizer (not classes, helpers, wrappers)."""
    return {
        n: getattr(lo, n)
        for n in lo.__all__
        if callable(getattr(lo, n))
        and not inspect.isclass(getattr(lo, n))
        and n not in PARAM_AND_STATE_HELPERS | WRAPPERS_AND_SCHEDULES
    }


def test_every_public_factory_is_registered():
    # A factory exported without a registry entry would miss static_args, the failure
    # report's name, the conformance suite and the configuration-error table.
    registered = set(_factory_list())
    missing = sorted(n for n, f in _public_factories().items() if f not in registered)
    assert not missing, f"public factories without a registry entry: {missing}"


def test_registry_and_all_agree():
    public = _public_factories()
    for entry, factory in _registry.iter_factories(public_only=True):
        name = factory.__name__
        assert public.get(name) is factory, f"registry entry {entry.name!r}: {name} not exported"
        state = entry.state.__name__
        assert getattr(lo, state, None) is entry.state, f"{state} not exported"
    names = [e.name for e in _registry.entries()]
    assert len(names) == len(set(names)), names


def test_registry_entries_are_consistent():
    for entry in _registry.entries():
        for factory in entry.factories:
            params = inspect.signature(factory).parameters
            assert entry.momentum_arg in params or factory is entry.scale_by, (entry.name, factory)
            for arg in entry.bad_values:
                assert any(arg in inspect.signature(f).parameters for f in entry.factories), (
                    entry.name,
                    arg,
                )
            # A static argument is one of the module's declared ones.
            assert set(lo.static_args(factory)) <= set(entry.static_args)
        if entry.alias is not None:
            assert entry.momentum_arg in inspect.signature(entry.alias).parameters, entry.name


def test_static_args_cover_every_non_numeric_argument():
    for factory in FACTORY_LIST:
        static = set(lo.static_args(factory))
        for name, p in inspect.signature(factory).parameters.items():
            numeric = p.annotation in (
                "jax.typing.ArrayLike",
                "jax.typing.ArrayLike | None",
                "optax.ScalarOrSchedule",
                "optax.ScalarOrSchedule | None",
            )
            if not numeric:
                assert name in static, (factory.__name__, name)


def _optax_would_inject(value):
    """optax.inject_hyperparams's rule without static_args: bools stay, callables
    become schedules, numbers and arrays become traced state."""
    if isinstance(value, bool):
        return False
    return callable(value) or isinstance(value, (int, float, np.ndarray, jax.Array))


def test_static_defaults_are_not_injected_by_optax():
    # ``optax.inject_hyperparams(factory)(learning_rate=...)`` without static_args
    # must leave every static argument's default alone: a default int (block or
    # Newton-Schulz sizes) would arrive traced, a dtype class as a "schedule".
    for factory in FACTORY_LIST:
        sig = inspect.signature(factory)
        for name in lo.static_args(factory):
            default = sig.parameters[name].default
            assert not _optax_would_inject(default), (factory.__name__, name, default)


def test_static_args_rejects_foreign_factories():
    import optax
    import pytest

    with pytest.raises(ValueError, match="factory must be an optimizer factory"):
        lo.static_args(optax.adam)


def test_default_kernel_dimension_numbers_is_kfacs_default_layout():
    # Public since layerwise_optax.flax builds its specs from public names only:
    # inputs first, outputs last; a bias is a kernel with a unit input.
    f = lo.default_kernel_dimension_numbers
    assert f(()) is None
    assert f((7,)) == lo.DimensionNumbers(((), (0,)))
    assert f((4, 3)) == lo.DimensionNumbers(((0,), (1,)))
    assert f((3, 3, 4, 8)) == lo.DimensionNumbers(((0, 1, 2), (3,)))
    # Spelled out for every leaf it gives kfac's default updates (no biases to fold).
    import jax.numpy as jnp

    params = {"w": jnp.ones((4, 3)), "conv": jnp.ones((2, 2, 3, 5))}
    grads = {"w": jnp.arange(12.0).reshape(4, 3), "conv": jnp.ones((2, 2, 3, 5))}
    stats = {
        "w": lo.KfacFactors(2 * jnp.eye(4), jnp.eye(3)),
        "conv": lo.KfacFactors(jnp.eye(12), 3 * jnp.eye(5)),
    }
    spec = jax.tree.map(lambda p: f(p.shape), params)
    a, b = lo.kfac(1e-2), lo.kfac(1e-2, dimension_numbers=spec)
    ua, _ = a.update(grads, a.init(params), params, kfac_stats=stats)
    ub, _ = b.update(grads, b.init(params), params, kfac_stats=stats)
    for x, y in zip(jax.tree.leaves(ua), jax.tree.leaves(ub)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_matrix_dimension_numbers_is_the_role_matrix_view():
    # Public so that a comparison with optax.contrib.muon (benchmarks/step_time.py)
    # can give it the leaves and matrix views our Muon uses.
    f = lo.matrix_dimension_numbers
    assert lo.HIDDEN_ROLES == ("matrix", "conv", "stacked")
    assert set(lo.HIDDEN_ROLES) <= set(lo.ROLES)
    assert f("matrix", (4, 3)) == lo.DimensionNumbers(((0,), (1,)))
    assert f("conv", (3, 3, 4, 8)) == lo.DimensionNumbers(((0, 1, 2), (3,)))
    assert f("stacked", (5, 4, 3)) == lo.DimensionNumbers(((1,), (2,)), batch_axes=(0,))
    assert f("vector", (7,)) is None and f("matrix", (7,)) is None
