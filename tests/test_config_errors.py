"""Configuration errors, table-driven: every public factory × every argument.

For each factory the test walks its signature; every argument must have an entry
in ``BAD`` (a new argument without one fails ``test_every_argument_has_bad_values``).
Each bad value must raise ``ValueError`` or ``TypeError`` at construction, with a
message naming the argument. Incompatible combinations are listed apart.
"""

import inspect
import math

import jax.numpy as jnp
import pytest

import layerwise_optax as lo
from layerwise_optax import _registry
from tests._helpers import PARAM_AND_STATE_HELPERS

VE, TE = ValueError, TypeError
UNIT = [(-0.1, VE), (1.0, VE), (math.nan, VE), ("0.9", TE), (None, TE)]
UNIT_CLOSED = [(-0.1, VE), (1.5, VE), (math.nan, VE), ("x", TE)]
NON_NEGATIVE = [(-1.0, VE), (math.nan, VE), ("x", TE), ([1e-3], TE)]
POSITIVE = [(0.0, VE), (-1.0, VE), ("x", TE)]
POSITIVE_INT = [(0, VE), (-3, VE), (1.5, TE), ("8", TE), (True, TE)]
OPTIONAL_POSITIVE_INT = [(0, VE), (2.5, TE), ("x", TE)]
NON_NEGATIVE_INT = [(-1, VE), (1.5, TE), ("x", TE)]
# Shape-deciding ints cannot be traced: an array (what optax.inject_hyperparams
# passes for an int it was not told is static) is refused, naming the argument.
STATIC_INT = OPTIONAL_POSITIVE_INT + [(jnp.asarray(8), TE)]
# Step periods and seeds may be traced: integer scalar arrays pass, others do not.
BAD_INT_ARRAYS = [(jnp.asarray(2.5), TE), (jnp.ones(2, jnp.int32), TE)]
BOOL = [("yes", TE), (1, TE), (None, TE)]
MODE = [("bogus", VE), (3, VE)]
DTYPE = [("not-a-dtype", TE), (jnp.int32, TE)]
TREE = [("x", TE), (3, TE)]

# Argument -> bad values with the exception each must raise, for arguments several
# factories share: an argument means the same wherever it appears. An optimizer's
# own arguments have their bad values in its registry entry (layerwise_optax/_registry.py).
BAD = {
    "learning_rate": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE,
    "b1": UNIT,
    "b2": UNIT,
    "beta": UNIT,
    "factor_decay": UNIT_CLOSED,
    "eps": NON_NEGATIVE,
    "damping": NON_NEGATIVE,
    "decay": NON_NEGATIVE,
    "max_prob": UNIT_CLOSED,
    "min_prob": UNIT_CLOSED,
    "precondition_frequency": POSITIVE_INT + BAD_INT_ARRAYS,
    "max_precond_dim": STATIC_INT + [(True, TE)],
    "ns_steps": STATIC_INT + [(True, TE)],
    "block_size": STATIC_INT,
    "root_exponent": STATIC_INT,
    "start_preconditioning_step": NON_NEGATIVE_INT + BAD_INT_ARRAYS,
    "flat_start": NON_NEGATIVE_INT,
    "seed": [(1.5, TE), ("x", TE), (None, TE)] + BAD_INT_ARRAYS,
    "nesterov": BOOL,
    "merge_small_dims": BOOL,
    "distribute": BOOL,
    "ns_coeffs": [("bogus", VE)],
    "mu_dtype": DTYPE,
    "precond_dtype": DTYPE,
    "ns_dtype": DTYPE,
    "hyperparam_dtype": DTYPE,
    "mask": TREE,
    "dimension_numbers": TREE,
    "roles": TREE,
    "mode": MODE,
    "factory": [(None, VE), (lambda: None, VE)],
    "every_k_schedule": POSITIVE_INT,
    "state_layout": MODE + [(None, VE)],
    "owner_axes": [((), VE), (("data", 3), VE), (3, VE)],
}

# Factories that are not optimizers -> the arguments they cannot do without.
NON_OPTIMIZERS = {
    lo.precond_update_prob_schedule: {},
    lo.raise_on_failure: dict(inner=lo.shampoo(1e-2)),
    lo.inject_hyperparams: dict(factory=lo.shampoo),
    lo.multi_steps: dict(opt=lo.kfac(1e-2), every_k_schedule=2),
    lo.skip_step_on_spikes: dict(inner=lo.shampoo(1e-2)),
}


def _required(factory):
    """The arguments an optimizer factory cannot do without: its learning rate."""
    params = inspect.signature(factory).parameters
    required = {n for n, p in params.items() if p.default is inspect.Parameter.empty}
    assert required <= {"learning_rate"}, (factory.__name__, required)
    return {n: 1e-2 for n in required}


def factories(*, public_only=True):
    """Factory -> required arguments: every registered optimizer factory (read from
    the registry at call time), then the non-optimizers."""
    table = {
        f: _required(f)
        for _, f in _registry.iter_factories(public_only=public_only)
        if f not in NON_OPTIMIZERS  # a registered wrapper (the spike guard): listed below
    }
    return {**table, **NON_OPTIMIZERS}


def bad_values(factory, arg):
    """The bad values of ``arg`` for ``factory``: its registry entry's own, else ``BAD``."""
    for entry in _registry.entries():
        if factory in entry.factories and arg in entry.bad_values:
            return list(entry.bad_values[arg])
    return BAD.get(arg, [])


FACTORIES = factories()
# Arguments that are the object being wrapped, checked where they are used.
NOT_HYPERPARAMETERS = {"inner", "opt"}


def cases(table):
    """``(factory, required, arg, value, error)`` params for every factory of ``table``."""
    for factory, required in table.items():
        for arg in inspect.signature(factory).parameters:
            if arg in NOT_HYPERPARAMETERS:
                continue
            for i, (value, error) in enumerate(bad_values(factory, arg)):
                if arg in required and value is None and error is TE and arg != "seed":
                    continue
                yield pytest.param(
                    factory, required, arg, value, error, id=f"{factory.__name__}-{arg}-{i}"
                )


CASES = list(cases(FACTORIES))


def missing_bad_values(table):
    """``factory(arg)`` for every argument of ``table``'s factories without bad values."""
    return {
        f"{f.__name__}({a})"
        for f in table
        for a in inspect.signature(f).parameters
        if not bad_values(f, a) and a not in NOT_HYPERPARAMETERS
    }


def test_every_argument_has_bad_values():
    missing = missing_bad_values(FACTORIES)
    assert not missing, (
        f"add bad values for {sorted(missing)} to BAD (an argument several factories share) "
        "or to the optimizer's registry entry's bad_values (its own argument)"
    )


def test_registry_bad_values_do_not_shadow_the_common_table():
    # An argument means the same wherever it appears: it is either common (BAD) or
    # one optimizer's own (its entry), never both.
    for entry in _registry.entries():
        both = sorted(set(entry.bad_values) & set(BAD))
        assert not both, (entry.name, both)


def test_every_public_factory_is_in_the_table():
    factories = {
        getattr(lo, n)
        for n in lo.__all__
        if callable(getattr(lo, n))
        and not isinstance(getattr(lo, n), type)
        and n not in PARAM_AND_STATE_HELPERS
    }
    assert factories == set(FACTORIES), factories ^ set(FACTORIES)


@pytest.mark.parametrize("factory,required,arg,value,error", CASES)
def test_bad_argument_raises_naming_it(factory, required, arg, value, error):
    with pytest.raises(error) as info:
        factory(**{**required, arg: value})
    assert arg in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "factory,kwargs,fragment",
    [
        (
            lo.shampoo,
            dict(learning_rate=1e-2, factor_estimation="kl", root_exponent=3),
            "root_exponent",
        ),
        (lo.precond_update_prob_schedule, dict(max_prob=0.1, min_prob=0.5), "min_prob"),
        (lo.kfac, dict(learning_rate=1e-2, damping_mode="exact"), "inverse='eigh'"),
        (lo.scale_by_kfac, dict(damping_mode="exact", inverse="cholesky"), "damping_mode='exact'"),
        (lo.static_args, dict(factory=lambda: None), "factory"),
    ],
)
def test_incompatible_combinations(factory, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        factory(**kwargs)


def test_valid_extremes_are_accepted():
    # The edges of each range that are allowed must stay allowed.
    lo.shampoo(0.0, b1=0.0, b2=0.0, factor_decay=1.0, damping=0.0, start_preconditioning_step=0)
    lo.soap(1e-3, factor_decay=1.0, block_size=None)
    lo.kfac(1e-3, factor_decay=0.0, damping=0.0)
    lo.psgd_kron(1e-3, precond_update_prob=1.0, precond_lr=1.0, seed=-1)
    lo.muon(1e-3, adam_b1=0.0, neuron_b2=0.0, mu_dtype=jnp.bfloat16)
    lo.precond_update_prob_schedule(max_prob=0.5, min_prob=0.5, flat_start=0)
