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
      >>> tx = lo.multi_steps(lo.kfac(1.0, b1=0.0, damping=0.0, damping_mode='absolute'), 2)
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
            inner_opt_state=inner.init(params),
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

        def where(old, new):
            return jax.tree.map(lambda o, n: jnp.where(emit, n, o).astype(o.dtype), old, new)

        def keep(old, new):
            # Mini-steps that emit nothing keep the old state, but K-FAC's pending
            # statistics from the new one.
            if isinstance(old, _kfac.ScaleByKfacState):
                old = old._replace(pending=new.pending, pending_count=new.pending_count)
            return where(old, new)

        inner_state = jax.tree.map(
            keep,
            state.inner_opt_state,
            new_inner,
            is_leaf=lambda x: isinstance(x, _kfac.ScaleByKfacState),
        )
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
