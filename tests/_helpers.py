"""Test helpers: the optimizer catalogue, dense float64 references, tree asserts."""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import numpy as np
import optax
import scipy.linalg

import layerwise_optax as lo
from layerwise_optax import _registry


def optimizers():
    """Every conformance configuration in the optimizer registry: ``(id, alias, kwargs)``.

    Read at call time, so an entry added with ``_registry.register`` is included.
    """
    return [(c.id, e.alias, dict(c.kwargs)) for e in _registry.entries() for c in e.conformance]


def slow_variants():
    """Ids of the configurations that run only in the slow tier."""
    return frozenset(c.id for e in _registry.entries() for c in e.conformance if c.slow)


# The list the conformance suite iterates over, from the optimizer registry
# (layerwise_optax/_registry.py): adding an optimizer is adding its entry there.
OPTIMIZERS = optimizers()
OPTIMIZER_IDS = [o[0] for o in OPTIMIZERS]
# Variants of a family already covered by its base entry: they exercise other
# options (blocking, Newton roots, SGD grafting, presets) through the same generic
# tests, so they run in the slow tier (`make test-slow`) to keep the default tier
# within its ~10 minute budget on 2 cores. Each family's base entry stays default.
SLOW_VARIANTS = slow_variants()


def optimizer_params():
    """``OPTIMIZERS`` as pytest params, the variants marked slow."""
    import pytest

    return [
        pytest.param(*o, id=o[0], marks=[pytest.mark.slow] if o[0] in SLOW_VARIANTS else [])
        for o in OPTIMIZERS
    ]


# Public functions that take params or states rather than build a transform.
PARAM_AND_STATE_HELPERS = frozenset(
    {
        "layer_roles",
        "kfac_adaptive_values",
        "matrix_dimension_numbers",
        "format_roles",
        "default_dimension_numbers",
        "default_kernel_dimension_numbers",
        "static_args",
        "failure_report",
        "failure_counts",
        "check_state",
        "checkpointable",
        "restore_state",
        "state_shardings",
    }
)
# Public factories that wrap an optimizer or build a schedule: not optimizers, so
# not in the registry's optimizer lists (their arguments are in the configuration-error
# table; the spike guard has a non-public entry for its static arguments and report name).
WRAPPERS_AND_SCHEDULES = frozenset(
    {
        "inject_hyperparams",
        "multi_steps",
        "raise_on_failure",
        "precond_update_prob_schedule",
        "skip_step_on_spikes",
    }
)


class _ByConfig(Mapping):
    """A read-only ``{configuration id: value}`` view of the registry, read at lookup."""

    def __init__(self, value):
        self._value = value

    def __getitem__(self, config_id):
        try:
            entry = _registry.entry_of_config(config_id)
        except KeyError:
            raise KeyError(config_id) from None
        value = self._value(entry)
        if value is None:
            raise KeyError(config_id)
        return value

    def __iter__(self):
        return (o[0] for o in optimizers() if o[0] in self)

    def __len__(self):
        return sum(1 for _ in self)

    def __contains__(self, config_id):
        try:
            self[config_id]
        except KeyError:
            return False
        return True


# The momentum-decay argument of each configuration's optimizer (most call it b1).
MOMENTUM_ARG = _ByConfig(lambda e: e.momentum_arg)
# Extra update arguments an optimizer needs, computed from the updates it receives.
EXTRA_ARGS = _ByConfig(lambda e: e.extra_args if e.conformance_extra_args else None)


def main_state(name, state):
    """The registered ``ScaleByX`` state inside an alias's state (its first in tree order)."""
    kind = _registry.entry_of_config(name).state
    found = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kind))
        if isinstance(s, kind)
    ]
    assert found, f"no {kind.__name__} in the state of {name}"
    return found[0]


def skipped_count(name, state):
    """Non-finite gradient events recorded in an alias's state (all its transforms)."""
    del name  # every library state counts them in its ``failures`` field
    return int(lo.failure_counts(state)[0])


def identity_kfac_stats(updates):
    """Identity K-FAC factors for every kernel (default layout), None elsewhere.

    The conformance suite's generic tests have no model to capture statistics
    from; they exercise the machinery with these (K-FAC's registry entry's
    ``conformance_extra_args``). Convergence tests pass each problem's true
    factors instead.
    """
    return _registry.get("kfac").extra_args(updates)["kfac_stats"]


def with_extra_args(tx, fn):
    """Wraps ``tx`` so that its update gets ``fn(updates)`` as extra arguments.

    Explicit extra arguments given by the caller take precedence.
    """
    if fn is None:
        return tx

    def update(updates, state, params=None, **extra):
        return tx.update(updates, state, params, **{**fn(updates), **extra})

    return optax.GradientTransformationExtraArgs(tx.init, update)


def build(name, factory, kwargs, **overrides):
    """The conformance suite's way to make an optimizer from an OPTIMIZERS entry."""
    return with_extra_args(factory(**{**kwargs, **overrides}), EXTRA_ARGS.get(name))


def run_steps(tx, params, grads):
    """``tx.init`` then one jitted ``tx.update`` per gradient: ``(updates per step, state)``."""
    state = tx.init(params)
    step = jax.jit(tx.update)
    updates = []
    for g in grads:
        u, state = step(g, state, params)
        updates.append(u)
    return updates, state


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb, (ta, tb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(
            np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol
        )


def max_rel_err(a, b):
    """Largest ``max|x - y| / max|y|`` over the leaves of two trees (float64)."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-30)))
    return worst


def assert_tree_finite(a):
    for x in jax.tree.leaves(a):
        assert np.all(np.isfinite(np.asarray(x, np.float64))), x


def assert_recovers(update, state, params, grads_fn, steps=10):
    """After faults, ``steps`` finite gradients give finite updates and a finite state."""
    for i in range(steps):
        u, state = update(grads_fn(100 + i), state, params)
        assert_tree_finite(u)
    assert_tree_finite(state)
    return state


def random_psd(rng, n, cond, rank=None):
    """A random symmetric PSD matrix with eigenvalues log-spaced in [1/cond, 1]."""
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = np.logspace(0, -np.log10(cond), n)
    if rank is not None:
        w[rank:] = 0.0
    return (q * w) @ q.T


def np_inv_root(a, p, damping=0.0):
    """(A + damping I)^{-1/p} in float64 with SciPy."""
    a = np.asarray(a, np.float64)
    out = scipy.linalg.fractional_matrix_power(a + damping * np.eye(a.shape[0]), -1.0 / p)
    return np.real(out)


def unfold_cov(g, i):
    """G_(i) G_(i)^T for a numpy tensor."""
    gi = np.moveaxis(g, i, 0).reshape(g.shape[i], -1)
    return gi @ gi.T


def random_spd(rng, n, cond):
    """A random symmetric positive definite ``n x n`` matrix with condition number ``cond``."""
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.logspace(0, np.log10(cond), n)) @ q.T


def shampoo_reference(
    grads,
    *,
    b1,
    b2,
    eps,
    factor_decay,
    damping,
    freq,
    grafting,
    nesterov=False,
    root=None,
    factored=None,
    kl=False,
    roots=None,
    trace_normalize=False,
):
    """Naive dense Shampoo on one tensor: Kronecker product of fractional powers.

    ``kl``: KL-Shampoo's statistics, ``G_(i) kron_{j != i} (L_j + damping I)^{-1}
    G_(i)^T / n_i`` with explicit inverses of the factors of the last refresh.
    ``roots``: one root order per axis, ``None`` for an axis without a factor
    (identity; with ``kl`` its inverse is the identity too).
    ``trace_normalize``: roots of ``L_i / (tr(L_i) / d_i)``.

    The preconditioner is built explicitly as kron(P_1, ..., P_k) acting on the
    row-major vectorization, in float64 (absolute damping, no merging, no blocks).
    """
    shape = grads[0].shape
    k = len(shape)
    if roots is not None:
        factored = [i for i, r in enumerate(roots) if r is not None]
    factored = list(range(k)) if factored is None else factored
    p = root or (2 if kl else 2 * len(factored))
    orders = list(roots) if roots is not None else [p] * k
    stats = [np.zeros((d, d)) for d in shape]
    roots = [np.eye(d) for d in shape]
    invs = [np.eye(d) for d in shape]
    mu = np.zeros(shape)
    nu = np.zeros(shape)
    nu_sum = np.zeros(shape)  # AdaGrad's running sum
    out = []
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        mu = b1 * mu + (1 - b1) * g
        nu = b2 * nu + (1 - b2) * g**2
        nu_sum = nu_sum + g**2
        w = 1.0 if factor_decay == 1 else 1 - factor_decay
        for i in range(k):
            if kl:
                gi = np.moveaxis(g, i, 0).reshape(shape[i], -1)
                others = np.ones((1, 1))
                for j in range(k):
                    if j != i:
                        others = np.kron(others, invs[j])
                cov = gi @ others @ gi.T / (g.size // shape[i])
            else:
                cov = unfold_cov(g, i)
            stats[i] = factor_decay * stats[i] + w * cov
        if (t - 1) % freq == 0:
            scaled = [
                s / (np.trace(s) / len(s)) if trace_normalize and np.trace(s) > 0 else s
                for s in stats
            ]
            roots = [
                np_inv_root(s, orders[i], damping) if i in factored else np.eye(len(s))
                for i, s in enumerate(scaled)
            ]
            invs = [
                np.linalg.inv(s + damping * np.eye(len(s))) if i in factored else np.eye(len(s))
                for i, s in enumerate(stats)
            ]
        if nesterov:
            m_hat = b1 * mu / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t)
        else:
            m_hat = mu / (1 - b1**t)
        big = roots[0]
        for r in roots[1:]:
            big = np.kron(big, r)
        direction = (big @ m_hat.reshape(-1)).reshape(shape)
        if grafting == "adam":
            graft = m_hat / (np.sqrt(nu / (1 - b2**t)) + eps)
        elif grafting == "adagrad":
            graft = m_hat / (np.sqrt(nu_sum) + eps)
        elif grafting == "sgd":
            graft = m_hat
        else:
            graft = None
        if graft is not None:
            direction = direction * np.linalg.norm(graft) / np.linalg.norm(direction)
        out.append(direction)
    return out


def soap_reference(grads, *, b1, b2, eps, factor_decay, freq, tolerance=None, ratios=None):
    """Naive dense SOAP on a matrix in float64 (numpy eigh / QR).

    With ``tolerance`` a factor is refreshed only when its statistic in the current
    basis, ``B = Q^T L Q``, has ``||B - diag B||_F > tolerance ||B||_F``; each
    refresh's ``(t, axis, ||B - diag B||_F / ||B||_F)`` is appended to ``ratios``.
    """

    def needed(t, axis, s, q):
        if tolerance is None:
            return True
        b = q.T @ s @ q
        off, total = np.linalg.norm(b - np.diag(np.diag(b))), np.linalg.norm(b)
        if ratios is not None:
            ratios.append((t, axis, off / total if total > 0 else 0.0))
        return not off <= tolerance * total

    m, n = grads[0].shape
    stats = [np.zeros((m, m)), np.zeros((n, n))]
    qs = [np.eye(m), np.eye(n)]
    mu = np.zeros((m, n))
    nu = np.zeros((m, n))
    out = []
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        # Project with the bases from earlier gradients, then update the statistics.
        mu = b1 * mu + (1 - b1) * g
        rot = qs[0].T @ g @ qs[1]
        nu = b2 * nu + (1 - b2) * rot**2
        m_rot = qs[0].T @ mu @ qs[1]
        u = (m_rot / (1 - b1**t)) / (np.sqrt(nu / (1 - b2**t)) + eps)
        out.append(qs[0] @ u @ qs[1].T)
        stats[0] = factor_decay * stats[0] + (1 - factor_decay) * g @ g.T
        stats[1] = factor_decay * stats[1] + (1 - factor_decay) * g.T @ g
        if t == 1:
            qs = [
                np.linalg.eigh(s)[1][:, ::-1] if needed(t, axis, s, q) else q
                for axis, (s, q) in enumerate(zip(stats, qs))
            ]
        elif t % freq == 0:
            new = []
            for axis, (s, q) in enumerate(zip(stats, qs)):
                if not needed(t, axis, s, q):
                    new.append(q)
                    continue
                est = np.diag(q.T @ s @ q)
                perm = np.argsort(-est, kind="stable")
                q = q[:, perm]
                nu = np.take(nu, perm, axis=axis)
                qn, r = np.linalg.qr(s @ q)
                qn = qn * np.where(np.diag(r) < 0, -1.0, 1.0)
                new.append(qn)
            qs = new
    return out


def mixed_tree(key):
    """Params mixing a scalar, vectors, matrices, a conv kernel, unit dims, a 5000 axis."""
    shapes = {
        "scalar": (),
        "bias": (7,),
        "dense": (6, 5),
        "conv": (3, 3, 4, 8),
        "unit": (1, 6, 1),
        "long": (5000, 3),
    }
    keys = jax.random.split(key, len(shapes))
    return {n: 0.1 * jax.random.normal(k, s) for (n, s), k in zip(shapes.items(), keys)}


# ------------------------------------------------------------------ K-FAC capture tests (flax)

_STAT_ENTRIES = (lo.KfacFactors, lo.KfacDiagonal, lo.FoldedBias)


def stat_entries(stats) -> dict:
    """``'a/b/kernel' -> entry`` of a K-FAC statistics tree (``None`` entries kept)."""
    flat = jax.tree_util.tree_flatten_with_path(
        stats, is_leaf=lambda x: x is None or isinstance(x, _STAT_ENTRIES)
    )[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): e for p, e in flat}


def block_types(stats) -> dict[str, str]:
    """``path -> block type`` of every entry of a statistics tree (``'NoneType'`` kept)."""
    return {path: type(e).__name__ for path, e in stat_entries(stats).items()}


def kernel_factors(stats) -> dict:
    """``path -> KfacFactors`` of every kernel (and embedding) in a statistics tree."""
    return {p: e for p, e in stat_entries(stats).items() if isinstance(e, lo.KfacFactors)}


def unstack_into(stacked, modules) -> None:
    """Copies slice ``i`` of a stacked (``nnx.vmap``-created) module's params into ``modules[i]``."""
    from flax import nnx

    state = nnx.state(stacked, nnx.Param)
    for i, module in enumerate(modules):
        nnx.update(module, jax.tree.map(lambda a, i=i: a[i], state))


def next_token_data(key, n: int, t: int, vocab: int):
    """Sequences of the map ``t -> (5 t + 3) mod vocab``: ``(inputs, next tokens)``, ``(n, t)``."""
    seq = [jax.random.randint(key, (n, 1), 0, vocab)]
    for _ in range(t):
        seq.append((5 * seq[-1] + 3) % vocab)
    seq = jax.numpy.concatenate(seq, axis=1)
    return seq[:, :-1], seq[:, 1:]


# ------------------------------------------------------------------ LAPACK calls on CPU

_LAPACK_CALL = re.compile(r'custom_call_target="lapack_(\w+)_ffi"[^\n]*?num_batch_dims="(\d+)"')


def lapack_calls(fn, *args):
    """``[(routine, num_batch_dims)]`` of every LAPACK call in ``jit(fn)(*args)`` on CPU.

    The library keeps each call to one matrix (``linalg.one_at_a_time_on_cpu``):
    batched calls can hang a process on a 2-core machine (jaxlib splits the batch
    over the intra-op pool and blocks pool threads on the parts).
    """
    text = jax.jit(fn).lower(*args).compile().as_text()
    return [(m.group(1), int(m.group(2))) for m in _LAPACK_CALL.finditer(text)]


def assert_lapack_unbatched(fn, *args, expect_calls=True):
    calls = lapack_calls(fn, *args)
    if expect_calls:
        assert calls, "no LAPACK call compiled: the check would pass vacuously"
    batched = [c for c in calls if c[1] != 0]
    assert not batched, f"batched LAPACK calls: {batched}"
