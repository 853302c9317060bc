"""The optimizer registry: one :class:`Entry` per optimizer family or alias.

Everything that lists optimizers reads this table and nothing else:

* :func:`layerwise_optax.static_args` / :func:`layerwise_optax.inject_hyperparams`
  read each factory's static arguments (:func:`static_args_of`);
* :func:`layerwise_optax.failure_report` and
  :func:`layerwise_optax.raise_on_failure` name each state by its entry's
  ``algorithm`` (:func:`algorithm_of`);
* the test suite builds its lists from it: the conformance suite's
  configurations (``tests/_helpers.OPTIMIZERS``), the optax-contract settings,
  the public-API checks (every public factory must be registered) and the
  configuration-error table (an optimizer's own arguments carry their bad values
  here).

Adding an optimizer is therefore one module (``_<algo>.py`` with its state,
``scale_by_<algo>``, alias and ``_STATIC_ARGS``) plus one :class:`Entry` in
:data:`ENTRIES`, plus its dense-reference test; exporting it is a line in
``__init__`` and in the public-API snapshot. ``tests/test_registry.py`` holds a toy
optimizer that goes through the conformance suite, the configuration-error table
and the failure report by :func:`register` alone.

What is library knowledge and what is test knowledge. An entry holds both, on
purpose: the library needs the factories, state type, static arguments and
algorithm name; the tests need the conformance configurations, the contract
settings, the momentum argument's name, the extra update arguments a generic
test must supply, and the bad values of the optimizer's own arguments. Keeping
the second group beside the first is what makes "one entry" true: a test-side
registry would be a second place to edit, and the suite could not notice an
optimizer that is registered but untested. The test-only fields are plain data
and callables (no pytest, nothing built at import time) and the library never
reads them. ``conformance_extra_args`` is a callable rather than data because
it depends on the updates: K-FAC's generic tests have no model to capture
statistics from and get identity factors shaped like the updates (its
convergence tests pass each problem's true factors instead).

Arguments that several optimizers share (``learning_rate``, ``b1``,
``block_size``, ...) mean the same everywhere, so their bad values stay in the
configuration-error test's common table; an entry's ``bad_values`` lists only
arguments of its own (an argument in both fails that test). Three own arguments
whose bad values are arrays (PSGD's ``seed``, Shampoo's
``start_preconditioning_step`` and ``root_exponent``) stay in the test's table
too: this module builds no arrays at import time.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from layerwise_optax import (
    _dion,
    _grafting,
    _kfac,
    _kfac_adaptive,
    _muon,
    _psgd,
    _shampoo,
    _soap,
    _spike,
    _steepest,
)

BadValues = tuple[tuple[Any, type[Exception]], ...]


@dataclasses.dataclass(frozen=True)
class Config:
    """One configuration the conformance suite runs an optimizer with.

    Attributes:
      id: The test id (``'shampoo_newton_blocked'``); unique over the registry.
      kwargs: Keyword arguments of the entry's alias.
      slow: Whether it runs only in the slow tier (variants of a family whose
        base configuration already runs in the default tier).
    """

    id: str
    kwargs: Mapping[str, Any]
    slow: bool = False


@dataclasses.dataclass(frozen=True)
class Entry:
    """One optimizer family or alias.

    Attributes:
      name: The public alias name (``'shampoo'``), or the transform's name for an
        internal transform.
      alias: The alias factory (``learning_rate`` first), or ``None``.
      scale_by: The ``scale_by_*`` factory, or ``None``. Two aliases may share one
        (``muon`` and ``normuon``).
      state: The state type the transform's ``init`` returns; it carries a
        ``failures`` field (:class:`layerwise_optax.FailureCounts`).
      static_args: Arguments that fix shapes, modes or trees (the module's
        ``_STATIC_ARGS``); each factory keeps the ones it has.
      algorithm: The name the failure report gives this state.
      public: Whether the factories are public names of ``layerwise_optax`` (the
        public-API test checks registry and ``__all__`` agree on these).
      momentum_arg: The argument holding the momentum (first-moment) decay.
      conformance: The configurations the conformance suite runs.
      contract: The alias's keyword arguments for optax's contract tests, or
        ``None`` (not run).
      conformance_extra_args: ``updates -> dict`` of extra update arguments the
        generic tests pass (``None``: none needed).
      contract_extra_args: The same for the contract tests' small problems
        (defaults to ``conformance_extra_args``).
      bad_values: The configuration-error table's rows for this optimizer's own
        arguments: ``{argument: ((bad value, exception type), ...)}``.
    """

    name: str
    alias: Callable[..., Any] | None
    scale_by: Callable[..., Any] | None
    state: type
    static_args: tuple[str, ...]
    algorithm: str
    public: bool = True
    momentum_arg: str = "b1"
    conformance: tuple[Config, ...] = ()
    contract: Mapping[str, Any] | None = None
    conformance_extra_args: Callable[[Any], dict[str, Any]] | None = None
    contract_extra_args: Callable[[Any], dict[str, Any]] | None = None
    bad_values: Mapping[str, BadValues] = dataclasses.field(default_factory=dict)

    @property
    def factories(self) -> tuple[Callable[..., Any], ...]:
        """The alias and the ``scale_by_*`` factory (those that exist)."""
        return tuple(f for f in (self.alias, self.scale_by) if f is not None)

    def extra_args(self, updates: Any, *, contract: bool = False) -> dict[str, Any]:
        """The extra update arguments a generic test passes with ``updates``."""
        fn = self.conformance_extra_args
        if contract and self.contract_extra_args is not None:
            fn = self.contract_extra_args
        return fn(updates) if fn is not None else {}


# ----------------------------------------------------------------------------- K-FAC's test inputs


def _identity_kfac_stats(updates: Any) -> dict[str, Any]:
    """Identity K-FAC factors for every kernel (default layout), ``None`` elsewhere.

    Long dimensions (over 4096) get diagonal factors, as K-FAC stores them.
    """

    def one(x):
        if isinstance(x, optax.MaskedNode) or x.ndim < 2:
            return None
        dims = (int(np.prod(x.shape[:-1])), x.shape[-1])
        a, g = (jnp.eye(d) if d <= 4096 else jnp.ones(d) for d in dims)
        return _kfac.KfacFactors(a, g)

    stats = jax.tree.map(one, updates, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    return {"kfac_stats": stats}


def _identity_kfac_stats_vectors_as_biases(updates: Any) -> dict[str, Any]:
    """Identity factors for every non-scalar leaf, a vector as a bias ``(1, d)``.

    The contract's problems are vectors and small matrices with no kernels.
    """

    def one(x):
        if x.ndim == 0:
            return None
        d_in = int(np.prod(x.shape[:-1])) if x.ndim > 1 else 1
        return _kfac.KfacFactors(jnp.eye(d_in), jnp.eye(x.shape[-1]))

    return {"kfac_stats": jax.tree.map(one, updates)}


def _identity_outputs(params: Any, data: Any) -> Any:
    del data
    return params


def _half_squared_norm(outputs: Any, data: Any) -> jax.Array:
    del data
    return 0.5 * sum(
        (jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(outputs)),
        jnp.zeros([], jnp.float32),
    )


def _with_identity_curvature(stats_fn: Callable[[Any], dict[str, Any]]):
    """``stats_fn``'s K-FAC factors plus an identity curvature (adaptive K-FAC's inputs).

    The generic tests have no model: the curvature is that of ``½ |θ|²`` with the
    params as outputs, ``C = I`` (module-level functions, so the static part
    compares equal from step to step). Convergence tests pass each problem's own
    loss instead (its Hessian as the curvature).
    """

    def extra(updates: Any) -> dict[str, Any]:
        curvature = _kfac_adaptive.KfacCurvature(_identity_outputs, _half_squared_norm)
        return {**stats_fn(updates), "curvature": curvature}

    return extra


# ----------------------------------------------------------------------------- bad values

_VE, _TE = ValueError, TypeError
_MODE: BadValues = (("bogus", _VE), (3, _VE))
_BOOL: BadValues = (("yes", _TE), (1, _TE), (None, _TE))
_POSITIVE: BadValues = ((0.0, _VE), (-1.0, _VE), ("x", _TE))
_NON_NEGATIVE: BadValues = ((-1.0, _VE), (float("nan"), _VE), ("x", _TE), ([1e-3], _TE))
_UNIT: BadValues = ((-0.1, _VE), (1.0, _VE), (float("nan"), _VE), ("0.9", _TE), (None, _TE))
_TREE: BadValues = (("x", _TE), (3, _TE))

# Muon's and NorMuon's own arguments (one transform, two aliases).
_MUON_BAD_VALUES: dict[str, BadValues] = {
    "adam_learning_rate": _NON_NEGATIVE,
    "adam_weight_decay": _NON_NEGATIVE,
    "adam_b1": _UNIT,
    "adam_b2": _UNIT,
    "adam_mask": _TREE,
    "neuron_b2": ((1.0, _VE), (-0.5, _VE), ("x", _TE)),
    "neuron_eps": _NON_NEGATIVE,
    "element_b2": ((1.0, _VE), (-0.5, _VE), ("x", _TE)),
    "element_eps": _NON_NEGATIVE,
    "rms": _NON_NEGATIVE,
    "scaling": _MODE,
    "ns_method": _MODE,
    "ns_prescale": _MODE,
}

# ----------------------------------------------------------------------------- the entries

ENTRIES: tuple[Entry, ...] = (
    Entry(
        name="shampoo",
        alias=_shampoo.shampoo,
        scale_by=_shampoo.scale_by_shampoo,
        state=_shampoo.ScaleByShampooState,
        static_args=_shampoo._STATIC_ARGS,
        algorithm="shampoo",
        conformance=(
            Config("shampoo", dict(learning_rate=3e-2, precondition_frequency=2)),
            Config(
                "shampoo_newton_blocked",
                dict(
                    learning_rate=3e-2, precondition_frequency=2, root_method="newton", block_size=3
                ),
                slow=True,
            ),
            Config(
                "shampoo_sgd_graft_nesterov",
                dict(learning_rate=1e-2, precondition_frequency=3, grafting="sgd", nesterov=True),
                slow=True,
            ),
            # AdaGrad grafting's steps shrink like 1/sqrt(t): a larger rate.
            Config(
                "shampoo_adagrad_graft",
                dict(learning_rate=0.1, precondition_frequency=2, grafting="adagrad"),
                slow=True,
            ),
            Config(
                "shampoo_kl",
                dict(
                    learning_rate=3e-2,
                    precondition_frequency=2,
                    factor_estimation="kl",
                    damping=1e-3,
                ),
                slow=True,
            ),
            # Only the shorter side of each leaf, with L^{-1/2}.
            Config(
                "shampoo_one_sided",
                dict(learning_rate=3e-2, precondition_frequency=2, factor_exponents="one_sided"),
                slow=True,
            ),
            # Without grafting, where the normalization changes the update.
            Config(
                "shampoo_trace_normalized",
                dict(
                    learning_rate=1e-2,
                    precondition_frequency=2,
                    trace_normalize=True,
                    grafting="none",
                ),
                slow=True,
            ),
        ),
        contract=dict(learning_rate=3e-2, precondition_frequency=2),
        bad_values={
            "grafting": _MODE,
            "root_method": _MODE + (("cholesky", _VE),),
            "factor_estimation": _MODE,
            "relative_damping": _BOOL,
            "factor_bias_correction": _BOOL,
            "factor_exponents": _MODE + (((2, None), _VE),),
            "trace_normalize": _BOOL,
        },
    ),
    Entry(
        name="soap",
        alias=_soap.soap,
        scale_by=_soap.scale_by_soap,
        state=_soap.ScaleBySoapState,
        static_args=_soap._STATIC_ARGS,
        algorithm="soap",
        conformance=(
            Config("soap", dict(learning_rate=3e-2, precondition_frequency=2)),
            Config(
                "soap_blocked",
                dict(learning_rate=3e-2, precondition_frequency=2, block_size=3),
                slow=True,
            ),
            Config(
                "soap_refresh_tolerance",
                dict(learning_rate=3e-2, precondition_frequency=2, refresh_tolerance=0.05),
                slow=True,
            ),
            Config(
                "soap_kl",
                dict(
                    learning_rate=3e-2,
                    precondition_frequency=2,
                    factor_estimation="kl",
                    damping=1e-3,
                ),
                slow=True,
            ),
        ),
        contract=dict(learning_rate=3e-2, precondition_frequency=2),
        bad_values={
            "factor_estimation": _MODE,
            "refresh_tolerance": (
                (-0.1, _VE),
                (1.5, _VE),
                (float("nan"), _VE),
                ("0.1", _VE),
                (True, _VE),
            ),
        },
    ),
    Entry(
        name="kfac",
        alias=_kfac.kfac,
        scale_by=_kfac.scale_by_kfac,
        state=_kfac.ScaleByKfacState,
        static_args=_kfac._STATIC_ARGS,
        algorithm="kfac",
        momentum_arg="momentum",
        conformance=(
            Config("kfac", dict(learning_rate=3e-2, precondition_frequency=2)),
            # Without the fallback moment: the generic cases give every kernel
            # factors (identity statistics), vectors have no K-FAC layout.
            Config(
                "kfac_no_fallback",
                dict(learning_rate=3e-2, precondition_frequency=2, diagonal_fallback=False),
                slow=True,
            ),
            Config(
                "kfac_eigh_exact",
                dict(
                    learning_rate=3e-2,
                    precondition_frequency=2,
                    inverse="eigh",
                    damping_mode="exact",
                ),
            ),
        ),
        # Fed identity factors the contract's steps are heavy-ball SGD: a smaller
        # rate for the Rosenbrock target's curvature ~1000.
        contract=dict(learning_rate=1e-3, precondition_frequency=2),
        conformance_extra_args=_identity_kfac_stats,
        contract_extra_args=_identity_kfac_stats_vectors_as_biases,
        bad_values={
            "momentum": _UNIT,
            "damping_mode": _MODE,
            "sides": _MODE,
            "inverse": _MODE,
            # Static: it decides whether kfac_stats=None is a step without statistics.
            "statistics_frequency": ((0, _VE), (1.5, _TE), (True, _TE), (jnp.asarray(2), _TE)),
            "axis_name": ((3, _TE), (["batch"], _TE)),
            "diagonal_fallback": _BOOL,
        },
    ),
    Entry(
        name="kfac_adaptive",
        alias=_kfac_adaptive.kfac_adaptive,
        scale_by=None,
        state=_kfac_adaptive.ScaleByKfacAdaptiveState,
        static_args=_kfac_adaptive._STATIC_ARGS,
        algorithm="kfac_adaptive",
        # It has no momentum hyperparameter (μ is solved for each step): the generic
        # inject_hyperparams test varies the damping rule's decay instead.
        momentum_arg="damping_adaptation_decay",
        conformance=(
            Config(
                "kfac_adaptive",
                dict(learning_rate=1.0, precondition_frequency=2, damping_adaptation_interval=2),
            ),
        ),
        contract=dict(learning_rate=1.0, precondition_frequency=2),
        conformance_extra_args=_with_identity_curvature(_identity_kfac_stats),
        contract_extra_args=_with_identity_curvature(_identity_kfac_stats_vectors_as_biases),
        bad_values={
            "min_damping": _NON_NEGATIVE,
            "max_damping": _NON_NEGATIVE,
            "damping_adaptation_interval": ((0, _VE), (1.5, _TE), ("x", _TE)),
            "damping_adaptation_decay": _UNIT,
            "norm_constraint": _POSITIVE,
            "burnin_steps": ((-1, _VE), (1.5, _TE), ("x", _TE)),
            "burnin_learning_rate": _NON_NEGATIVE,
            "adaptive_momentum": _BOOL,
            "damping_mode": _MODE,
            "inverse": _MODE,
        },
    ),
    Entry(
        name="muon",
        alias=_muon.muon,
        scale_by=_muon.scale_by_muon,
        state=_muon.ScaleByMuonState,
        static_args=_muon._STATIC_ARGS,
        algorithm="muon",
        momentum_arg="beta",
        conformance=(
            Config("muon", dict(learning_rate=2e-2)),
            Config(
                "muon_rms_dion",
                dict(learning_rate=3e-2, scaling="rms", ns_coeffs="dion"),
                slow=True,
            ),
            # AdaMuon's element-wise second moment, with its RMS-aligned scaling.
            Config(
                "muon_adamuon",
                dict(learning_rate=3e-2, element_b2=0.95, scaling="rms"),
                slow=True,
            ),
            # Gram Newton-Schulz with AOL pre-scaling and its 4-step preset.
            Config(
                "muon_gram_aol",
                dict(learning_rate=2e-2, ns_method="gram", ns_prescale="aol", ns_coeffs="aol"),
            ),
        ),
        contract=dict(learning_rate=2e-2),
        bad_values=_MUON_BAD_VALUES,
    ),
    Entry(
        name="normuon",
        alias=_muon.normuon,
        scale_by=_muon.scale_by_muon,
        state=_muon.ScaleByMuonState,
        static_args=_muon._STATIC_ARGS,
        algorithm="muon",
        momentum_arg="beta",
        conformance=(
            Config("normuon", dict(learning_rate=3e-2, ns_coeffs="polar_express")),
            Config(
                "normuon_gram_aol",
                dict(learning_rate=3e-2, ns_method="gram", ns_prescale="aol", ns_coeffs="aol"),
                slow=True,
            ),
        ),
        contract=dict(learning_rate=3e-2),
        bad_values=_MUON_BAD_VALUES,
    ),
    Entry(
        name="dion",
        alias=_dion.dion,
        scale_by=_dion.scale_by_dion,
        state=_dion.ScaleByDionState,
        static_args=_dion._STATIC_ARGS,
        algorithm="dion",
        momentum_arg="mu",
        conformance=(
            Config("dion", dict(learning_rate=2e-2)),
            # Half the rank: the error feedback carries what the step leaves out.
            Config("dion_half_rank", dict(learning_rate=2e-2, rank_fraction=0.5), slow=True),
        ),
        contract=dict(learning_rate=2e-2),
        bad_values={
            "rank": ((0, _VE), (-2, _VE), (1.5, _TE), ("x", _TE), (True, _TE)),
            "rank_fraction": ((0.0, _VE), (1.5, _VE), (-0.5, _VE), (float("nan"), _VE), ("x", _TE)),
            "mu": _UNIT,
            "adam_learning_rate": _NON_NEGATIVE,
            "adam_weight_decay": _NON_NEGATIVE,
            "adam_b1": _UNIT,
            "adam_b2": _UNIT,
            "adam_mask": _TREE,
            "rms": _NON_NEGATIVE,
            "scaling": _MODE,
        },
    ),
    Entry(
        name="steepest_descent",
        alias=_steepest.steepest_descent,
        scale_by=_steepest.scale_by_steepest_descent,
        state=_steepest.ScaleBySteepestDescentState,
        static_args=_steepest._STATIC_ARGS,
        algorithm="steepest_descent",
        momentum_arg="beta",
        conformance=(Config("steepest", dict(learning_rate=2e-2)),),
        # Normalized steps: a smaller rate for the Rosenbrock target's curvature.
        contract=dict(learning_rate=3e-3),
        bad_values={
            "norms": (
                ("spectral", _TE),
                ({"bogus_role": "spectral"}, _VE),
                ({"matrix": "bogus"}, _VE),
            ),
            "scales": ((2.0, _TE), ({"bogus_role": 1.0}, _VE), ({"matrix": -1.0}, _VE)),
            "dual_scale": _BOOL,
        },
    ),
    Entry(
        name="psgd_kron",
        alias=_psgd.psgd_kron,
        scale_by=_psgd.scale_by_psgd_kron,
        state=_psgd.ScaleByPsgdKronState,
        static_args=_psgd._STATIC_ARGS,
        algorithm="psgd_kron",
        # max_precond_dim 1024 (not PSGD's 8192): the mixed tree's 5000-long axis then
        # takes the diagonal path the generic tests are meant to exercise, instead of a
        # 5000x5000 triangular factor (85 s per test on 2 cores).
        conformance=(
            Config(
                "psgd_kron",
                dict(learning_rate=3e-2, precond_update_prob=1.0, max_precond_dim=1024),
            ),
        ),
        contract=dict(learning_rate=1e-2, precond_update_prob=1.0),
        bad_values={
            "precond_lr": ((0.0, _VE), (1.5, _VE), ("x", _TE)),
            "precond_init_scale": _POSITIVE + ((None, _TE),),
            "clip_rms": _POSITIVE,
            "precond_update_prob": ((1.5, _VE), (-0.1, _VE), ("x", _TE)),
            "memory_save_mode": _MODE,
        },
    ),
    # Muon's diagonal part (its AdamW for embeddings, heads and vectors): not a
    # public factory, but its state appears in Muon's and is reported as 'adam'.
    Entry(
        name="adam",
        alias=None,
        scale_by=_grafting.scale_by_guarded_adam,
        state=_grafting.ScaleByGuardedAdamState,
        static_args=("mu_dtype", "nesterov"),
        algorithm="adam",
        public=False,
    ),
    # The spike guard: a wrapper, not an optimizer (public, but listed with the
    # wrappers in the tests, so public=False here keeps it out of the optimizer
    # lists). Registered for its static arguments (lo.inject_hyperparams), its
    # failure-report name and its own arguments' bad values.
    Entry(
        name="skip_step_on_spikes",
        alias=None,
        scale_by=_spike.skip_step_on_spikes,
        state=_spike.SkipStepOnSpikesState,
        static_args=_spike._STATIC_ARGS,
        algorithm="spike_guard",
        public=False,
        bad_values={
            "window": ((1, _VE), (0, _VE), (2.5, _TE), (jnp.asarray(8), _TE)),
            "threshold": _POSITIVE,
            "warmup": ((1, _VE), (1.5, _TE), ("x", _TE)),
            "watch": (((), _VE), (("bogus",), _VE), (("loss", "loss"), _VE), ("loss", _TE)),
        },
    ),
)

_registered: list[Entry] = list(ENTRIES)


def entries() -> tuple[Entry, ...]:
    """Every registered entry: :data:`ENTRIES`, then those added by :func:`register`."""
    return tuple(_registered)


def get(name: str) -> Entry:
    """The entry called ``name``.

    Raises:
      KeyError: If no entry has that name.
    """
    for e in _registered:
        if e.name == name:
            return e
    raise KeyError(name)


def entry_of_config(config_id: str) -> Entry:
    """The entry that holds conformance configuration ``config_id``.

    Raises:
      KeyError: If no entry holds it.
    """
    for e in _registered:
        if any(c.id == config_id for c in e.conformance):
            return e
    raise KeyError(config_id)


def static_args_of(factory: Callable[..., Any]) -> tuple[str, ...]:
    """The declared static arguments of a registered factory.

    Raises:
      KeyError: If ``factory`` is no entry's alias or ``scale_by_*`` function.
    """
    for e in _registered:
        if any(factory is f for f in e.factories):
            return e.static_args
    raise KeyError(factory)


def algorithm_of(state_type: type) -> str:
    """The failure report's name for a state type (its class name if unregistered)."""
    for e in _registered:
        if e.state is state_type:
            return e.algorithm
    return state_type.__name__


def _check_new(entry: Entry) -> None:
    if not isinstance(entry, Entry):
        raise TypeError(f"entry must be a layerwise_optax._registry.Entry, got {entry!r}.")
    if any(e.name == entry.name for e in _registered):
        raise ValueError(f"entry name {entry.name!r} is already registered.")
    ids = {c.id for e in _registered for c in e.conformance}
    clash = sorted(ids & {c.id for c in entry.conformance})
    if clash:
        raise ValueError(f"conformance ids {clash} of entry {entry.name!r} are already registered.")
    if (
        entry.alias is not None
        and entry.momentum_arg not in inspect.signature(entry.alias).parameters
    ):
        raise ValueError(
            f"entry {entry.name!r}: momentum_arg {entry.momentum_arg!r} is not an "
            f"argument of {entry.alias.__name__}."
        )


class Registration:
    """What :func:`register` returns: undo it with :meth:`undo` or a ``with`` block.

    Attributes:
      entry: The registered entry.
    """

    def __init__(self, entry: Entry):
        self.entry = entry

    def undo(self) -> None:
        """Removes the entry (a no-op when it is already gone)."""
        if self.entry in _registered:
            _registered.remove(self.entry)

    def __enter__(self) -> Entry:
        return self.entry

    def __exit__(self, *exc: Any) -> None:
        self.undo()


def register(entry: Entry) -> Registration:
    """Adds ``entry`` to the registry now; the result undoes it.

    For optimizers defined outside this package (and for the test suite's toy
    optimizer). A library optimizer is added to :data:`ENTRIES` instead.

    Args:
      entry: The new entry. Its name and conformance ids must be new.

    Returns:
      A :class:`Registration`, usable as ``with register(entry): ...``.

    Raises:
      TypeError: If ``entry`` is not an :class:`Entry`.
      ValueError: If its name or a conformance id is already registered, or its
        ``momentum_arg`` is not an argument of its alias.
    """
    _check_new(entry)
    _registered.append(entry)
    return Registration(entry)


def iter_factories(*, public_only: bool = False) -> Iterator[tuple[Entry, Callable[..., Any]]]:
    """``(entry, factory)`` for every registered factory, each factory once."""
    seen: set[int] = set()
    for e in _registered:
        if public_only and not e.public:
            continue
        for f in e.factories:
            if id(f) not in seen:
                seen.add(id(f))
                yield e, f
