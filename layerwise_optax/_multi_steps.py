"""Gradient accumulation that also accumulates K-FAC's layer statistics.

``optax.MultiSteps`` averages the gradients of ``k`` mini-steps and calls the
wrapped optimizer on every mini-step, but keeps its new state only on the last
one; extra arguments such as ``kfac_stats`` are passed through unaveraged. For
K-FAC that means the emitted update sees the last micro-batch's statistics only
(issue 20, item 3). :func:`multi_steps` is the same accumulation, except that
on the mini-steps that emit nothing it keeps K-FAC's ``pending`` statistics
(their running mean) from the wrapped optimizer's new state, and tells K-FAC
which mini-step emits, so that the emitted update uses the mean gradient *and*
the mean statistics of the whole accumulated batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from layerwise_optax import _checks, _kfac


def multi_steps(
    opt: optax.GradientTransformation,
    every_k_schedule: int | Callable[[jax.Array], jax.Array],
) -> optax.GradientTransformationExtraArgs:
    r"""Accumulates gradients and K-FAC statistics over ``k`` mini-steps, then updates.

    Like :class:`optax.MultiSteps` (mean of the gradients, zero updates on the
    first ``k - 1`` mini-steps, the wrapped optimizer's update on the ``k``-th),
    and for :func:`layerwise_optax.kfac` also the mean of the layer statistics:
    with statistics ``s_1 .. s_k`` passed as ``kfac_stats=`` on the mini-steps,
    the emitted update is K-FAC's update for the gradient ``(1/k) sum_i g_i`` and
    the statistics ``(1/k) sum_i s_i`` (the factors of the accumulated batch, when
    the micro-batches have equal sizes). ``optax.MultiSteps`` would use ``s_k``
    alone. Other optimizers behave exactly as under ``optax.MultiSteps``.

    Args:
      opt: The optimizer to wrap (any optax transformation, K-FAC inside a chain,
        ``partition`` or ``inject_hyperparams`` included).
      every_k_schedule: ``k``, a Python int ``>= 1``, or a function of the
        number of emitted updates returning ``k``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`optax.MultiStepsState`; extra arguments are passed to ``opt``.

    Raises:
      ValueError: If ``every_k_schedule`` is an int below 1.

    Examples:
      >>> import jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> params = {'w': jnp.zeros((2, 2))}
      >>> tx = lo.multi_steps(lo.kfac(1.0, momentum=0.0, damping=0.0, damping_mode='absolute'), 2)
      >>> state = tx.init(params)
      >>> g = {'w': jnp.ones((2, 2))}
      >>> s1 = {'w': lo.KfacFactors(jnp.eye(2), jnp.eye(2))}
      >>> s2 = {'w': lo.KfacFactors(3 * jnp.eye(2), jnp.eye(2))}
      >>> u, state = tx.update(g, state, params, kfac_stats=s1)
      >>> u, state = tx.update(g, state, params, kfac_stats=s2)
      >>> [round(float(v), 6) for v in u['w'][0]]  # -g / mean(1, 3)
      [-0.5, -0.5]

    .. seealso:: :class:`optax.MultiSteps`, :func:`layerwise_optax.kfac`
    """
    if not callable(every_k_schedule):
        _checks.positive_int("every_k_schedule", every_k_schedule)
        k_const = every_k_schedule
        every_k = lambda step: k_const  # noqa: E731
    else:
        every_k = every_k_schedule
    inner = optax.with_extra_args_support(opt)

    def init_fn(params):
        return optax.MultiStepsState(
            mini_step=jnp.zeros([], jnp.int32),
            gradient_step=jnp.zeros([], jnp.int32),
            inner_opt_state=_with_pending_buffers(inner.init(params)),
            acc_grads=optax.tree.zeros_like(params, dtype=jnp.float32),
            skip_state=(),
        )

    def update_fn(updates, state, params=None, **extra_args):
        emit = state.mini_step == every_k(state.gradient_step) - 1
        acc = jax.tree.map(
            lambda g, a: a + (g.astype(a.dtype) - a) / (state.mini_step + 1).astype(a.dtype),
            updates,
            state.acc_grads,
        )
        extra_args[_kfac.EMIT_ARG] = emit
        new_updates, new_inner = inner.update(
            optax.tree.cast_like(acc, updates), state.inner_opt_state, params, **extra_args
        )

        inner_state = _keep_on_mid_steps(emit, state.inner_opt_state, new_inner)
        return jax.tree.map(lambda u: jnp.where(emit, u, 0).astype(u.dtype), new_updates), (
            optax.MultiStepsState(
                mini_step=jnp.where(emit, 0, optax.safe_increment(state.mini_step)),
                gradient_step=jnp.where(
                    emit, optax.safe_increment(state.gradient_step), state.gradient_step
                ),
                inner_opt_state=inner_state,
                acc_grads=jax.tree.map(lambda a: jnp.where(emit, 0, a).astype(a.dtype), acc),
                skip_state=(),
            )
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _with_pending_buffers(state: Any) -> Any:
    """Every K-FAC state in ``state`` with its pending-statistics buffers allocated.

    K-FAC's own ``init`` leaves them as placeholders (nothing is pending outside an
    accumulation); the mean statistics of the mini-steps are kept there.
    """
    is_kfac = lambda x: isinstance(x, _kfac.ScaleByKfacState)  # noqa: E731
    return jax.tree.map(
        lambda x: _kfac.with_pending_buffers(x) if is_kfac(x) else x, state, is_leaf=is_kfac
    )


def _keep_on_mid_steps(emit: jax.Array, old: Any, new: Any) -> Any:
    """``new`` where ``emit``, else ``old`` with K-FAC's pending statistics from ``new``.

    Matched leaf by leaf in flattening order and rebuilt with ``new``'s structure:
    ``flax.nnx.Optimizer`` hands back the state with its tuples turned into
    int-keyed ``nnx.State`` mappings (same leaves, same order), which a
    structure-matching ``tree.map`` would reject.
    """
    is_kfac = lambda x: isinstance(x, _kfac.ScaleByKfacState)  # noqa: E731
    old_nodes = jax.tree.leaves(old, is_leaf=is_kfac)
    new_nodes, treedef = jax.tree.flatten(new, is_leaf=is_kfac)
    if len(old_nodes) != len(new_nodes):
        raise ValueError(
            f"multi_steps: the wrapped optimizer's state changed structure "
            f"({len(old_nodes)} leaves before the update, {len(new_nodes)} after)."
        )

    def where(o, n):
        o_leaves, n_leaves = jax.tree.leaves(o), jax.tree.leaves(n)
        return jax.tree.structure(n).unflatten(
            [jnp.where(emit, b, a).astype(a.dtype) for a, b in zip(o_leaves, n_leaves)]
        )

    merged = []
    for o, n in zip(old_nodes, new_nodes):
        if is_kfac(o) and is_kfac(n):
            o = o._replace(pending=n.pending, pending_count=n.pending_count)
        merged.append(where(o, n))
    return treedef.unflatten(merged)
