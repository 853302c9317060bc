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

# Argument -> bad values with the exception each must raise. One table for every
# factory: an argument means the same wherever it appears.
BAD = {
    "learning_rate": NON_NEGATIVE,
    "adam_learning_rate": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE,
    "adam_weight_decay": NON_NEGATIVE,
    "b1": UNIT,
    "b2": UNIT,
    "beta": UNIT,
    "momentum": UNIT,
    "adam_b1": UNIT,
    "adam_b2": UNIT,
    "neuron_b2": [(1.0, VE), (-0.5, VE), ("x", TE)],
    "factor_decay": UNIT_CLOSED,
    "eps": NON_NEGATIVE,
    "neuron_eps": NON_NEGATIVE,
    "damping": NON_NEGATIVE,
    "rms": NON_NEGATIVE,
    "decay": NON_NEGATIVE,
    "precond_lr": [(0.0, VE), (1.5, VE), ("x", TE)],
    "precond_init_scale": POSITIVE + [(None, TE)],
    "clip_rms": POSITIVE,
    "precond_update_prob": [(1.5, VE), (-0.1, VE), ("x", TE)],
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
    "relative_damping": BOOL,
    "factor_bias_correction": BOOL,
    "dual_scale": BOOL,
    "distribute": BOOL,
    "axis_name": [(3, TE), (["batch"], TE)],
    "grafting": MODE,
    "root_method": MODE + [("cholesky", VE)],
    "factor_estimation": MODE,
    "damping_mode": MODE,
    "sides": MODE,
    "scaling": MODE,
    "memory_save_mode": MODE,
    "ns_coeffs": [("bogus", VE)],
    "mu_dtype": DTYPE,
    "precond_dtype": DTYPE,
    "ns_dtype": DTYPE,
    "hyperparam_dtype": DTYPE,
    "mask": TREE,
    "adam_mask": TREE,
    "dimension_numbers": TREE,
    "roles": TREE,
    "norms": [("spectral", TE), ({"bogus_role": "spectral"}, VE), ({"matrix": "bogus"}, VE)],
    "scales": [(2.0, TE), ({"bogus_role": 1.0}, VE), ({"matrix": -1.0}, VE)],
    "mode": MODE,
    "factory": [(None, VE), (lambda: None, VE)],
    "every_k_schedule": POSITIVE_INT,
}

# Factory -> the arguments it cannot do without (everything else is defaulted).
FACTORIES = {
    lo.shampoo: dict(learning_rate=1e-2),
    lo.scale_by_shampoo: {},
    lo.soap: dict(learning_rate=1e-2),
    lo.scale_by_soap: {},
    lo.kfac: dict(learning_rate=1e-2),
    lo.scale_by_kfac: {},
    lo.muon: dict(learning_rate=1e-2),
    lo.normuon: dict(learning_rate=1e-2),
    lo.scale_by_muon: {},
    lo.steepest_descent: dict(learning_rate=1e-2),
    lo.scale_by_steepest_descent: {},
    lo.psgd_kron: dict(learning_rate=1e-2),
    lo.scale_by_psgd_kron: {},
    lo.precond_update_prob_schedule: {},
    lo.raise_on_failure: dict(inner=lo.shampoo(1e-2)),
    lo.inject_hyperparams: dict(factory=lo.shampoo),
    lo.multi_steps: dict(opt=lo.kfac(1e-2), every_k_schedule=2),
}
# Arguments that are the object being wrapped, checked where they are used.
NOT_HYPERPARAMETERS = {"inner", "opt"}


def _cases():
    for factory, required in FACTORIES.items():
        for arg in inspect.signature(factory).parameters:
            if arg in NOT_HYPERPARAMETERS:
                continue
            for i, (value, error) in enumerate(BAD.get(arg, ())):
                if arg in required and value is None and error is TE and arg != "seed":
                    continue
                yield pytest.param(
                    factory, required, arg, value, error, id=f"{factory.__name__}-{arg}-{i}"
                )


CASES = list(_cases())


def test_every_argument_has_bad_values():
    missing = {
        f"{f.__name__}({a})"
        for f in FACTORIES
        for a in inspect.signature(f).parameters
        if a not in BAD and a not in NOT_HYPERPARAMETERS
    }
    assert not missing, f"add bad values for {sorted(missing)} to BAD"


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
