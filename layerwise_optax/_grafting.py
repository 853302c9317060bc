"""Diagonal moment estimates and layer-wise grafting, shared by the optimizers.

Grafting (Agarwal et al., 2020) takes the *direction* of one update and the
*norm* of another, block by block. Shampoo uses it with a diagonal method as the
magnitude source; the same diagonal method is also the update of leaves that have
no factors, and of every leaf before ``start_preconditioning_step``.

Graft methods, with ``m_hat`` the bias-corrected first moment (Nesterov when
asked) and ``nu`` the EMA of squared gradients:

* ``'adam'``: ``m_hat / (sqrt(nu_hat) + eps)`` (``nu_hat`` bias-corrected), i.e.
  exactly :func:`optax.adam`'s update;
* ``'rmsprop'``: ``m_hat / (sqrt(nu) + eps)`` (no bias correction of ``nu``);
* ``'adagrad'``: ``m_hat / (sqrt(nu) + eps)`` with ``nu`` the running *sum* of
  squared gradients instead of their EMA (AdaGrad, Duchi et al. 2011; the graft
  of the original Shampoo paper, Gupta et al. 2018, and of Meta's Distributed
  Shampoo);
* ``'sgd'``: ``m_hat``;
* ``'none'``: no grafting; the preconditioned direction is used as is and
  ``m_hat`` is the fallback.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from layerwise_optax import _axes, _failure, _kron

GRAFTING = ("adam", "rmsprop", "adagrad", "sgd", "none")


def needs_second_moment(grafting: str) -> bool:
    """Whether a graft method keeps an EMA of squared gradients."""
    return grafting in ("adam", "rmsprop", "adagrad")


def bias_corrected_first_moment(
    mu: jax.Array, g: jax.Array, b1: jax.Array, count_inc: jax.Array, nesterov: bool
) -> jax.Array:
    """``mu / (1 - b1^t)``, or the Nesterov (NAdam) estimate.

    Args:
      mu: Updated first moment (``b1 * mu + (1 - b1) * g``).
      g: The current gradient.
      b1: Momentum decay.
      count_inc: Step number ``t >= 1``.
      nesterov: Use the NAdam look-ahead
        ``b1 mu / (1 - b1^{t+1}) + (1 - b1) g / (1 - b1^t)``.

    Returns:
      The estimate, in ``mu``'s dtype promoted with ``g``'s.
    """
    t = count_inc.astype(jnp.float32)
    b1 = jnp.asarray(b1, jnp.float32)
    if nesterov:
        return b1 * mu / (1.0 - b1 ** (t + 1.0)) + (1.0 - b1) * g / (1.0 - b1**t)
    return mu / (1.0 - b1**t)


def guarded_momentum(
    g: jax.Array, mu: jax.Array, b1: jax.Array, count_inc: jax.Array, nesterov: bool
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One EMA momentum step that keeps a non-finite gradient leaf out.

    Shared by the momentum-first transforms (Muon, steepest descent, PSGD-Kron).

    Args:
      g: Gradient leaf.
      mu: Stored momentum (any float dtype).
      b1: Momentum decay.
      count_inc: Step number ``t >= 1``.
      nesterov: NAdam-style look-ahead (:func:`bias_corrected_first_moment`).

    Returns:
      ``(ok, g32, mu_new, m_hat)``: the all-finite flag, the gradient in at least
      float32 (zero if not finite), the new momentum (``mu`` unchanged if not
      finite) and its bias-corrected estimate.
    """
    ok, g32 = _failure.guard(g)
    b1 = jnp.asarray(b1, jnp.float32)  # one arithmetic for plain and injected values
    mu_new = _axes.select(ok, b1 * mu.astype(g32.dtype) + (1 - b1) * g32, mu)
    return ok, g32, mu_new, bias_corrected_first_moment(mu_new, g32, b1, count_inc, nesterov)


def graft_update(
    grafting: str,
    m_hat: jax.Array,
    nu: jax.Array | None,
    b2: jax.Array,
    eps: jax.Array,
    count_inc: jax.Array,
) -> jax.Array:
    """The diagonal update of a graft method (see the module docstring)."""
    if grafting in ("sgd", "none"):
        return m_hat
    assert nu is not None
    eps = jnp.asarray(eps, jnp.float32)  # one arithmetic for plain and injected values
    if grafting == "adam":
        t = count_inc.astype(jnp.float32)
        nu = nu / (1.0 - jnp.asarray(b2, jnp.float32) ** t)
    return m_hat / (jnp.sqrt(nu) + eps)


def graft_blocks(direction: jax.Array, magnitude_sq: jax.Array) -> jax.Array:
    """Rescales each block of ``direction`` to a given per-block norm.

    Args:
      direction: ``(stack, b_1, ..., b_k)`` block view of the direction.
      magnitude_sq: ``(stack, 1, ..., 1)`` squared block norms of the update whose
        norms are kept (see :meth:`layerwise_optax._axes.LeafPlan.block_sum_squares`).

    Returns:
      ``direction * ||magnitude_blk|| / ||direction_blk||`` block by block (zero
      where the direction's block is zero).
    """
    dn = _kron.block_norms(direction)
    scale = jnp.where(dn > 0, jnp.sqrt(magnitude_sq) / jnp.where(dn > 0, dn, 1.0), 0.0)
    return direction * scale


def moment_dtype(p: jax.Array) -> Any:
    """The storage dtype of a second moment: ``p``'s dtype, at least float32."""
    return jnp.promote_types(p.dtype, jnp.float32)


class _AdamLeaf(NamedTuple):
    update: jax.Array
    mu: jax.Array
    nu: jax.Array
    ok: jax.Array  # bool scalar: the gradient leaf was valid


class ScaleByGuardedAdamState(NamedTuple):
    """State for :func:`scale_by_guarded_adam`.

    Attributes:
      count: int32 scalar, number of updates so far.
      mu: First moment, params tree (``mu_dtype``, default the params' dtype
        promoted to float32).
      nu: Second moment, params tree, float32 or wider.
      failures: :class:`~layerwise_optax._failure.FailureCounts` (the failure
        policy's counters). ``skipped``: (leaf, step) pairs whose gradient was not valid
        (:func:`~layerwise_optax._failure.guard`); they got a zero update and left
        the moments unchanged. ``failed``: always 0 (nothing is refreshed).
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    failures: _failure.FailureCounts


def scale_by_guarded_adam(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """:func:`optax.scale_by_adam` under the library's failure policy.

    The update is optax's (``eps_root = 0``) to float32 round-off, with three
    differences that matter only when something goes wrong, and that make the
    diagonal part of Muon behave like every other transform here:

    * the policy is per leaf: an invalid gradient leaf (non-finite, or with an
      overflowing square) gets a zero update and leaves its moments unchanged,
      and is counted in ``skipped``; the other leaves step normally
      (:func:`optax.apply_if_finite` would drop the whole step);
    * the moments are stored in at least float32, so float16 params do not lose
      ``eps`` to underflow (``0 / (0 + 0)`` with optax's float16 moments);
    * the update is computed in float32 and cast to the gradient's dtype.

    Args:
      b1: First-moment decay.
      b2: Second-moment decay.
      eps: Added to the root of the second moment.
      mu_dtype: First-moment storage dtype.
      nesterov: NAdam-style first moment.

    Returns:
      An :class:`optax.GradientTransformation`.
    """

    def init_fn(params):
        def zeros(p, dtype=None):
            # zeros_like keeps the parameter's layout: moments sharded like it.
            return jnp.zeros_like(p, dtype or jnp.promote_types(p.dtype, jnp.float32))

        return ScaleByGuardedAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(lambda p: zeros(p, mu_dtype), params),
            nu=jax.tree.map(zeros, params),
            failures=_failure.zeros(),
        )

    def update_fn(updates, state, params=None):
        del params
        count_inc = _kron.increment(state.count)
        b2_ = jnp.asarray(b2, jnp.float32)

        def leaf(g, mu, nu):
            ok, g32, mu_new, m_hat = guarded_momentum(g, mu, b1, count_inc, nesterov)
            nu_new = _failure.keep(ok, b2_ * nu + (1 - b2_) * jnp.square(g32), nu)
            u = graft_update("adam", m_hat, nu_new, b2_, eps, count_inc)
            return _AdamLeaf(
                _failure.zero_unless(ok, u, g.dtype), mu_new.astype(mu.dtype), nu_new, ok
            )

        out = jax.tree.map(leaf, updates, state.mu, state.nu)
        u, mu, nu, oks = (_axes.unzip(out, field) for field in _AdamLeaf._fields)
        failures = _failure.add(state.failures, skipped=_failure.count_invalid(oks))
        return u, ScaleByGuardedAdamState(count_inc, mu, nu, failures)

    return optax.GradientTransformation(init_fn, update_fn)
