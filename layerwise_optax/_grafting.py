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
* ``'sgd'``: ``m_hat``;
* ``'none'``: no grafting; the preconditioned direction is used as is and
  ``m_hat`` is the fallback.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from layerwise_optax import _kron

GRAFTING = ("adam", "rmsprop", "sgd", "none")


def needs_second_moment(grafting: str) -> bool:
    """Whether a graft method keeps an EMA of squared gradients."""
    return grafting in ("adam", "rmsprop")


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
    ok, g32 = _kron.finite_or_zero(g)
    mu_new = jnp.where(ok, b1 * mu.astype(g32.dtype) + (1 - b1) * g32, mu)
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
