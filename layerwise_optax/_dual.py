"""Momentum, then a dual map per leaf: the phases Muon and steepest descent share.

Both transforms take one guarded EMA momentum step per leaf, map the
bias-corrected momentum ``\\hat M_t`` to a steepest-descent direction under a norm
(the *dual map*; for the spectral norm it is the polar factor ``U V^T`` of
``\\hat M_t = U S V^T``, Bernstein and Newhouse 2024), and keep no preconditioner
to fall back on when that direction is not finite. The phases, in order:

1. :func:`momentum`: ``M_t = beta M_{t-1} + (1 - beta) G_t`` with the gradient
   guarded (:func:`layerwise_optax._grafting.guarded_momentum`), and the matrix
   view of ``\\hat M_t`` of each leaf that needs one;
2. :func:`polar_factors`: Newton-Schulz on every matrix view, same-shaped stacks
   of all leaves in one batch each (:func:`layerwise_optax._axes.map_grouped`;
   a tall ``(n, m)`` stack joins the ``(m, n)`` ones, transposed);
3. :func:`settle`: the failure policy for a leaf without stored fallback (a
   non-finite direction gives a zero update and keeps the momentum) and the
   leaf's :class:`Step`;
4. :func:`collect`: the updates, the momentum tree and the counters.

It also holds what Muon and Dion share around those phases: the matrix plans
(:func:`matrix_plans`), the shape scaling (:func:`shape_scale`) and the alias's
split into matrix leaves and AdamW (:func:`matrices_and_adam`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from layerwise_optax import _axes, _failure, _grafting, _linalg, _roles

_WHOLE = 2**62  # matrix views are never blocked nor diagonal: whole matrices


class Momentum(NamedTuple):
    """One leaf after :func:`momentum`.

    Attributes:
      ok: bool scalar, whether the gradient was valid (:func:`_failure.guard`).
      g32: The gradient in at least float32, zero if not valid.
      mu: The new momentum (the stored one where not valid).
      m_hat: Its bias-corrected (or Nesterov) estimate ``\\hat M_t``.
      blocks: ``(stack, m, n)`` matrix view of ``m_hat``, or ``None`` for a leaf
        that has none.
    """

    ok: jax.Array
    g32: jax.Array
    mu: jax.Array
    m_hat: jax.Array
    blocks: jax.Array | None


class Step(NamedTuple):
    """One leaf's result: update, momentum to store, its failure events, NorMuon's moment."""

    update: Any
    mu: Any
    skipped: Any
    failed: Any
    nu: Any = None


def momentum(
    g: jax.Array,
    mu: jax.Array,
    beta: jax.Array,
    count_inc: jax.Array,
    nesterov: bool,
    *,
    plan: _axes.LeafPlan | None = None,
    dtype: Any = None,
) -> Momentum:
    """Phase 1: ``M_t = beta M_{t-1} + (1 - beta) G_t`` and ``\\hat M_t``, guarded.

    Args:
      g: Gradient leaf.
      mu: Stored momentum.
      beta: Momentum decay (float32).
      count_inc: Step number ``t >= 1``.
      nesterov: NAdam-form look-ahead.
      plan: When given, ``blocks`` is ``plan.to_blocks(m_hat)``.
      dtype: Cast ``m_hat`` to this dtype first (``None``: keep it).

    Returns:
      The leaf's :class:`Momentum`.
    """
    ok, g32, mu_new, m_hat = _grafting.guarded_momentum(g, mu, beta, count_inc, nesterov)
    if dtype is not None:
        m_hat = m_hat.astype(dtype)
    return Momentum(ok, g32, mu_new, m_hat, None if plan is None else plan.to_blocks(m_hat))


def polar_factors(
    plans: Any,
    prepared: Any,
    coeffs: jax.Array,
    *,
    eps: Any,
    ns_dtype: Any,
    distribute: bool,
    method: str = "standard",
    prescale: str = "frobenius",
) -> Any:
    """Phase 2: ``NS(\\hat M_t) ~ U V^T`` for every matrix view, batched over all leaves.

    Same-shaped (and same-dtype) stacks of all leaves are one batch each (a tall
    ``(n, m)`` stack transposed into the ``(m, n)`` batch), spread
    over the devices of the current mesh when ``distribute``: each matrix is
    orthogonalized on one device (no collective inside the iteration). The
    inputs are finite (a non-valid gradient was zeroed, the momentum holds only
    finite values), so Newton-Schulz skips its own finiteness pass.

    Args:
      plans: The plans (from :func:`layerwise_optax._axes.resolve`).
      prepared: Per leaf a :class:`Momentum` or ``None``.
      coeffs: ``(steps, 3)`` Newton-Schulz coefficients.
      eps: Added to each matrix's Frobenius norm before dividing (``None``:
        :func:`layerwise_optax._linalg.newton_schulz`'s default).
      ns_dtype: Iteration dtype (``None``: float32).
      distribute: Spread the batches over the mesh's devices.
      method: Newton-Schulz ``method`` (``'standard'``, ``'gram'``, ``'auto'``).
      prescale: Newton-Schulz ``prescale`` (``'frobenius'``, ``'aol'``).

    Returns:
      A tree like ``plans``: per leaf a 1-tuple, ``(None,)`` where the leaf has no
      matrix view, else ``(polar,)`` shaped like its ``blocks``.
    """

    def prepare(plan, p):
        if p is None or p.blocks is None:
            return [None]
        # Tall stacks go in transposed (Newton-Schulz works on the wide view of a
        # tall matrix anyway): a (d, 4d) and a (4d, d) kernel are then one batch.
        blocks = _wide(p.blocks)
        return [((blocks.shape[1:], blocks.dtype), (blocks,))]

    options = {
        "compute_dtype": ns_dtype,
        "check_finite": False,
        "method": method,
        "prescale": prescale,
    }
    if eps is not None:
        options["eps"] = eps

    def batched(key):
        del key
        return lambda x: _linalg.newton_schulz(x, coeffs, **options)

    out = _axes.map_grouped(prepare, batched, plans, prepared, distribute=distribute)

    def restore(polar, plan, p):
        del plan
        if p is None or p.blocks is None or p.blocks.shape[-2] <= p.blocks.shape[-1]:
            return polar
        return (jnp.swapaxes(polar[0], -1, -2),)

    return _axes.map_leaves(restore, plans, out, prepared, local=True)


def _wide(blocks: jax.Array) -> jax.Array:
    """``(stack, m, n)`` blocks with ``m <= n`` (tall ones transposed)."""
    return jnp.swapaxes(blocks, -1, -2) if blocks.shape[-2] > blocks.shape[-1] else blocks


def settle(direction: jax.Array, prep: Momentum) -> tuple[jax.Array, jax.Array]:
    """Phase 3a: the failure verdict of a leaf whose direction has no fallback.

    Returns:
      ``(ok, failed)``: whether the gradient was valid and ``direction`` finite
      (the update may be taken and the momentum stored), and whether a valid
      gradient gave a non-finite direction (counted as *failed*).
    """
    finite = jnp.all(jnp.isfinite(direction))
    return prep.ok & finite, prep.ok & ~finite


def step(
    g: jax.Array,
    mu: jax.Array,
    prep: Momentum,
    ok: jax.Array,
    failed: jax.Array,
    update: jax.Array,
    mu_dtype: Any,
    nu: Any = None,
) -> Step:
    """Phase 3b: the leaf's :class:`Step` under the verdict of :func:`settle`.

    The update is zero and the stored momentum ``mu`` kept (cast to ``mu_dtype``,
    default its own) where ``ok`` is false; a non-valid gradient counts as
    *skipped*, a non-finite direction as *failed*.
    """
    mu_new = _failure.keep(ok, prep.mu, mu.astype(prep.mu.dtype)).astype(mu_dtype or mu.dtype)
    skipped = (~prep.ok).astype(jnp.int32)
    return Step(
        _failure.zero_unless(ok, update, g.dtype), mu_new, skipped, failed.astype(jnp.int32), nu
    )


def collect(out: Any, failures: _failure.FailureCounts) -> tuple[Any, Any, _failure.FailureCounts]:
    """Phase 4: ``(updates, momentum, failures)`` from a tree of :class:`Step`."""
    return (
        _axes.unzip(out, "update"),
        _axes.unzip(out, "mu"),
        _failure.add(
            failures,
            skipped=_failure.total(_axes.unzip(out, "skipped")),
            failed=_failure.total(_axes.unzip(out, "failed")),
        ),
    )


def matrix_plans(dimension_numbers: Any, tree: Any, name: str) -> Any:
    """The leaves' plans, each spec checked to be one matrix view (fan-in, fan-out).

    Whole matrices: no blocking, no diagonal factors, no merged dimensions.
    ``name`` is the optimizer the error names (Muon's and Dion's plans).

    Raises:
      ValueError: For a spec without exactly two factor groups, naming the path.
    """

    def check(path, plan):
        if isinstance(plan, _axes.LeafPlan) and plan.spec is not None:
            if len(plan.spec.factor_axes) != 2 or plan.spec.identity_axes:
                raise ValueError(
                    f"param {jax.tree_util.keystr(path)} with shape {plan.shape}: {name} "
                    f"needs exactly two factor groups (fan-in, fan-out), got "
                    f"{tuple(plan.spec)}."
                )
        return plan

    plans = _axes.resolve(
        dimension_numbers, tree, max_precond_dim=_WHOLE, block_size=None, merge_small_dims=False
    )
    return jax.tree_util.tree_map_with_path(check, plans, is_leaf=_axes.is_plan_leaf)


def shape_scale(
    o: jax.Array, plan: _axes.LeafPlan, scaling: str, rms: jax.Array, *, measured: bool
) -> jax.Array:
    """``s(W) O`` for ``(slices, fan_in, fan_out)`` directions (Muon's and Dion's shape scaling).

    ``'width'``: ``s = sqrt(max(1, fan_out / fan_in))`` (optax's); ``'rms'``:
    ``s = rms * sqrt(max(fan_in, fan_out))``, which gives a polar factor RMS
    ``rms`` (Liu et al. 2025); ``'none'``: ``s = 1``.

    ``measured``: with ``scaling='rms'``, rescale each slice to RMS ``rms`` by its
    measured Frobenius norm instead of assuming ``||O||_F = sqrt(min(m, n))`` (a
    polar factor's). Shared with :mod:`layerwise_optax._dion`, whose low-rank
    directions have norm ``sqrt(rank)``.
    """
    fan_in, fan_out = plan.dims[0], plan.dims[1]
    if scaling == "width":
        return o * max(1.0, fan_out / fan_in) ** 0.5
    if scaling == "rms" and not measured:
        return o * (rms * max(fan_in, fan_out) ** 0.5)
    if scaling == "rms":
        norm = jnp.sqrt(jnp.sum(o * o, axis=(1, 2), keepdims=True))
        return o * (rms * (fan_in * fan_out) ** 0.5 / (norm + 1e-30))
    return o


def matrices_and_adam(
    label: str,
    scale_by: optax.GradientTransformation,
    *,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: Any,
    mask: Any,
    dimension_numbers: Any,
    roles: Any,
    adam_learning_rate: optax.ScalarOrSchedule | None,
    adam_b1: Any,
    adam_b2: Any,
    eps: Any,
    adam_weight_decay: Any,
    adam_mask: Any,
    mu_dtype: Any,
    nesterov: bool,
) -> optax.GradientTransformation:
    """``optax.partition``: matrix leaves to ``scale_by`` (as ``label``), the rest to AdamW.

    The matrix leaves are those with a spec (``dimension_numbers``, else the
    hidden ``roles``) and take the alias chain ``scale_by``, decoupled weight
    decay (``weight_decay``, ``mask``), ``learning_rate``; the rest take the
    guarded Adam with ``adam_weight_decay`` and ``adam_learning_rate``
    (``None``: ``learning_rate``). Shared by :func:`muon` and
    :func:`layerwise_optax.dion`.
    """
    specs_of = dimension_numbers or _roles.dimension_numbers_for(roles, _roles.HIDDEN_ROLES)

    def labels(params):
        specs = specs_of(params) if callable(specs_of) else specs_of
        _, treedef = jax.tree_util.tree_flatten(params, is_leaf=_axes.is_masked)
        flat = treedef.flatten_up_to(specs)
        return treedef.unflatten([label if s is not None else "adam" for s in flat])

    if adam_learning_rate is None:
        adam_learning_rate = learning_rate
    return optax.partition(
        {
            label: optax.chain(
                scale_by,
                optax.add_decayed_weights(weight_decay, mask),
                optax.scale_by_learning_rate(learning_rate),
            ),
            # optax.adamw's own moments would keep a NaN forever (and underflow eps
            # with float16 params); the guarded Adam skips and counts per leaf, as
            # every other transform here does, and equals optax.adam otherwise.
            "adam": optax.chain(
                _grafting.scale_by_guarded_adam(
                    b1=adam_b1, b2=adam_b2, eps=eps, mu_dtype=mu_dtype, nesterov=nesterov
                ),
                optax.add_decayed_weights(adam_weight_decay, adam_mask),
                optax.scale_by_learning_rate(adam_learning_rate),
            ),
        },
        labels,
    )
