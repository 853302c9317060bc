"""Adding an optimizer is one module plus one registry entry: a toy one, end to end.

The toy below (normalized-momentum SGD whose per-leaf normalizer is refreshed
every few steps, under the library's failure policy) is defined here, in a test
module, and registered with :func:`layerwise_optax._registry.register` only.
Nothing else is edited, and it goes through a fast subset of the conformance
suite, the configuration-error table, ``static_args``/``inject_hyperparams`` and
the failure report, all of which read the registry at call time.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import pytest

import layerwise_optax as lo
from layerwise_optax import _checks, _failure, _registry
from tests import _helpers, test_config_errors, test_conformance, test_public_api

# ----------------------------------------------------------------------------- the toy module

_STATIC_ARGS = ("mu_dtype",)


class ScaleByToyState(NamedTuple):
    """State of :func:`scale_by_toy`.

    Attributes:
      count: int32 scalar, updates so far.
      mu: First moment, params tree (``mu_dtype``, default the params' dtype
        promoted to float32).
      scale: Per leaf, the float32 normalizer ``1 / rms(mu_hat)`` of the last good
        refresh (1 at first).
      failures: The failure policy's counters.
    """

    count: jax.Array
    mu: optax.Updates
    scale: optax.Updates
    failures: _failure.FailureCounts


def scale_by_toy(
    b1: jax.typing.ArrayLike = 0.9,
    refresh_every: jax.typing.ArrayLike = 2,
    mu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
    """``mu_hat * s``, ``s = 1 / rms(mu_hat)`` refreshed every ``refresh_every`` steps.

    Args:
      b1: Momentum decay in ``[0, 1)``.
      refresh_every: Steps between refreshes of ``s``, an int >= 1 (may be traced).
      mu_dtype: Dtype of the first moment.

    Returns:
      The transform.
    """
    _checks.in_unit_interval("b1", b1)
    _checks.traceable_int("refresh_every", refresh_every, minimum=1)
    mu_dtype = _checks.canonicalize_dtype(mu_dtype, "mu_dtype")

    def init_fn(params):
        def mu(p):
            return jnp.zeros(p.shape, mu_dtype or jnp.promote_types(p.dtype, jnp.float32))

        return ScaleByToyState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(mu, params),
            scale=jax.tree.map(lambda _: jnp.ones([], jnp.float32), params),
            failures=_failure.zeros(),
        )

    def update_fn(updates, state, params=None):
        del params
        (b1_,) = _checks.hyperparameters(b1)
        count = state.count + 1
        refresh = state.count % refresh_every == 0
        correction = 1 - b1_**count

        def leaf(g, mu, s):
            ok, g32 = _failure.guard(g)
            mu_new = _failure.keep(ok, (b1_ * mu + (1 - b1_) * g32).astype(mu.dtype), mu)
            mu_hat = mu_new.astype(jnp.float32) / correction
            s_new = jax.lax.rsqrt(jnp.mean(jnp.square(mu_hat)))  # inf for a zero moment
            good = jnp.isfinite(s_new)
            s = jnp.where(refresh & good, s_new, s)
            update = _failure.zero_unless(ok, mu_hat * s, g.dtype)
            return update, mu_new, s, ok, refresh & ~good

        out = jax.tree.map(leaf, updates, state.mu, state.scale)
        parts = jax.tree.transpose(jax.tree.structure(updates), jax.tree.structure((0,) * 5), out)
        new_updates, mu, scale, ok, failed = parts
        failures = _failure.add(
            state.failures,
            skipped=_failure.count_invalid(ok),
            failed=sum(jax.tree.leaves(failed), jnp.zeros([], jnp.int32)),
        )
        return new_updates, ScaleByToyState(count, mu, scale, failures)

    return optax.GradientTransformation(init_fn, update_fn)


def toy(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    refresh_every: jax.typing.ArrayLike = 2,
    mu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The toy alias: :func:`scale_by_toy`, then the learning rate.

    Args:
      learning_rate: Step size, >= 0, or a schedule.
      b1: See :func:`scale_by_toy`.
      refresh_every: See :func:`scale_by_toy`.
      mu_dtype: See :func:`scale_by_toy`.

    Returns:
      The optimizer.
    """
    _checks.non_negative("learning_rate", learning_rate)
    return optax.chain(
        scale_by_toy(b1, refresh_every, mu_dtype), optax.scale_by_learning_rate(learning_rate)
    )


# ----------------------------------------------------------------------------- its registry entry

TOY = _registry.Entry(
    name="toy",
    alias=toy,
    scale_by=scale_by_toy,
    state=ScaleByToyState,
    static_args=_STATIC_ARGS,
    algorithm="toy_normalized_sgd",
    public=False,
    conformance=(_registry.Config("toy", dict(learning_rate=1e-2, refresh_every=2)),),
    contract=dict(learning_rate=1e-2),
    bad_values={
        "refresh_every": ((0, ValueError), (-2, ValueError), (1.5, TypeError), ("2", TypeError))
    },
)


@pytest.fixture
def registered():
    with _registry.register(TOY) as entry:
        yield entry
    assert TOY not in _registry.entries()


def _toy_config():
    (config,) = [o for o in _helpers.optimizers() if o[0] == "toy"]
    return config


# ----------------------------------------------------------------------------- the suites


def test_unregistered_toy_is_unknown():
    # Without its entry nothing knows the toy: the registry is what makes it work.
    assert "toy" not in [o[0] for o in _helpers.optimizers()]
    with pytest.raises(ValueError, match="factory must be an optimizer factory"):
        lo.static_args(toy)
    state = toy(1e-2).init({"w": jnp.ones((2, 2))})
    assert lo.failure_report(state).entries[0].algorithm == "ScaleByToyState"


# A fast subset: compilation, dtypes through lax.cond, optax wrappers (inject,
# MultiSteps, masked/partition, vmap), mixed shapes, non-finite gradients.
CONFORMANCE_SUBSET = [
    test_conformance.test_update_compiles_once,
    functools.partial(
        test_conformance.test_state_is_stable_across_steps_and_through_cond, dtype="bfloat16"
    ),
    test_conformance.test_inject_hyperparams_gives_identical_results,
    functools.partial(
        test_conformance.test_plain_and_injected_hyperparameters_agree_bit_for_bit, x64=False
    ),
    test_conformance.test_decaying_schedule_is_applied,
    test_conformance.test_ignores_unknown_extra_args,
    test_conformance.test_multisteps_accumulates,
    test_conformance.test_masked_and_partition,
    test_conformance.test_vmap_over_independent_states,
    test_conformance.test_mu_dtype_is_honoured,
    test_conformance.test_mixed_tree_shapes_and_policy,
    test_conformance.test_recovers_after_non_finite_gradients,
]


@pytest.mark.parametrize(
    "test",
    CONFORMANCE_SUBSET,
    ids=lambda t: (
        getattr(t, "func", t).__name__.removeprefix("test_")
        + "".join(f"-{v}" for v in getattr(t, "keywords", {}).values())
    ),
)
def test_toy_passes_the_conformance_suite(registered, test):
    name, factory, kwargs = _toy_config()
    test(name, factory, kwargs)


@pytest.mark.parametrize(
    "test",
    [
        test_conformance.test_contract_accepts_extra_args_without_recompiling,
        test_conformance.test_contract_inject_hyperparams_without_static_args,
        functools.partial(
            test_conformance.test_contract_update_dtype_and_multisteps, dtype="bfloat16"
        ),
    ],
    ids=lambda t: getattr(t, "func", t).__name__.removeprefix("test_contract_"),
)
def test_toy_meets_optax_contract(registered, test):
    test("toy")


def test_toy_passes_the_config_error_table(registered):
    table = {
        f: r
        for f, r in test_config_errors.factories(public_only=False).items()
        if f in TOY.factories
    }
    assert set(table) == {toy, scale_by_toy}
    assert not test_config_errors.missing_bad_values(table)
    cases = list(test_config_errors.cases(table))
    # learning_rate, b1 and mu_dtype from the common table; refresh_every from the entry.
    assert {c.values[2] for c in cases} == {"learning_rate", "b1", "refresh_every", "mu_dtype"}
    for case in cases:
        test_config_errors.test_bad_argument_raises_naming_it(*case.values)


def test_config_error_table_notices_missing_bad_values():
    # The same toy registered without bad values for its own argument: the table's
    # completeness check names it.
    bare = _registry.Entry(
        name="toy_bare",
        alias=toy,
        scale_by=scale_by_toy,
        state=ScaleByToyState,
        static_args=_STATIC_ARGS,
        algorithm="toy",
        public=False,
    )
    with _registry.register(bare):
        table = {
            f: r
            for f, r in test_config_errors.factories(public_only=False).items()
            if f in bare.factories
        }
        assert test_config_errors.missing_bad_values(table) == {
            "toy(refresh_every)",
            "scale_by_toy(refresh_every)",
        }


def test_toy_static_args_and_inject_hyperparams(registered):
    assert lo.static_args(toy) == ("mu_dtype",)
    tx = lo.inject_hyperparams(toy)(learning_rate=1e-2, mu_dtype=jnp.bfloat16)
    state = tx.init({"w": jnp.ones((3, 2))})
    assert set(state.hyperparams) == {"learning_rate", "b1", "refresh_every"}


def test_toy_failure_report_and_counts(registered):
    tx = optax.chain(optax.identity(), toy(1e-2))
    params = {"w": jnp.ones((3, 2)), "dead": jnp.ones(4)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    # Step 1 refreshes: the 'dead' leaf's zero gradient gives a zero moment, whose
    # normalizer is not finite: one failed refresh. Step 2: 'w' is NaN: one skip.
    _, state = update({"w": jnp.ones((3, 2)), "dead": jnp.zeros(4)}, state, params)
    _, state = update({"w": jnp.full((3, 2), jnp.nan), "dead": jnp.zeros(4)}, state, params)
    report = lo.failure_report(state)
    (entry,) = report.entries
    assert (entry.algorithm, entry.steps, entry.skipped, entry.failed) == (
        "toy_normalized_sgd",
        2,
        1,
        1,
    )
    assert "toy_normalized_sgd" in str(report)
    skipped, failed = jax.jit(lo.failure_counts)(state)
    assert (int(skipped), int(failed)) == (1, 1)
    checked = lo.raise_on_failure(toy(1e-2))
    s = checked.init(params)
    with pytest.raises(Exception, match="failed refresh: 1 refresh of toy_normalized_sgd"):
        checked.update({"w": jnp.ones((3, 2)), "dead": jnp.zeros(4)}, s, params)


def test_register_refuses_clashes(registered):
    with pytest.raises(ValueError, match="already registered"):
        _registry.register(TOY)
    with pytest.raises(TypeError, match="Entry"):
        _registry.register("toy")
    bad = _registry.Entry(
        name="toy_momentum",
        alias=toy,
        scale_by=None,
        state=ScaleByToyState,
        static_args=(),
        algorithm="toy",
        momentum_arg="beta",
    )
    with pytest.raises(ValueError, match="momentum_arg 'beta'"):
        _registry.register(bad)


def test_public_api_test_fails_for_an_unregistered_public_factory(monkeypatch):
    # Dropping SOAP's entry (as if lo.soap had been exported without one) makes the
    # public-API check name both of its factories.
    kept = [e for e in _registry.entries() if e.name != "soap"]
    monkeypatch.setattr(_registry, "_registered", kept)
    with pytest.raises(AssertionError, match=r"\['scale_by_soap', 'soap'\]"):
        test_public_api.test_every_public_factory_is_registered()
