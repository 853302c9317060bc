"""Adaptive K-FAC: automatic learning rate and momentum, Levenberg–Marquardt damping.

Martens and Grosse (2015), sections 6.5 and 7, and kfac-jax's adaptive mode, as
one optax transform that still runs inside the user's ``jit``. The Kronecker-
factored preconditioner is :func:`layerwise_optax.scale_by_kfac` (built inside
each update with the damping held in the state, and no momentum of its own); what
this module adds needs the *exact* curvature of the model, which the caller
passes per step as the extra argument ``curvature=`` (a :class:`KfacCurvature`:
the model's outputs as a function of the params, the loss on those outputs and
the batch, all traced with the step). From it:

* the quadratic model ``m(d) = g·d + ½ d·(C + λ I)·d``, with ``C`` the
  Gauss-Newton matrix ``J^T H J`` (``J`` the Jacobian of the outputs, ``H`` the
  loss's Hessian in the outputs), is evaluated on the span of the preconditioned
  direction ``Δ = -F̂^{-1} g`` and the previous update ``δ``: one Jacobian-vector
  product per vector (``jax.jvp`` of the model, no matrix is formed) gives the
  2×2 Gram matrix ``(J v_i)^T H (J v_j)``, and ``(α, μ)`` minimize ``m(αΔ + μδ)``;
* every ``k`` steps the reduction ratio ``ρ = (L(θ + d) − L(θ)) / m(d)`` on the
  same batch (one extra forward pass) moves ``λ`` by the Levenberg–Marquardt rule.

Why a Gram matrix of Jacobian-vector products rather than ``C·v`` products:
the 2×2 system needs only the quadratic forms ``v_i·C·v_j``, which cost one
forward-mode pass per vector, while ``C·v`` adds a reverse pass per vector.
:meth:`KfacCurvature.matvec` (``C·v`` itself) is there for other uses and for
the tests that check both against the explicit matrix.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from layerwise_optax import _axes, _checks, _failure, _kfac

_STATIC_ARGS = (
    "max_precond_dim",
    "dimension_numbers",
    "damping_mode",
    "mu_dtype",
    "precond_dtype",
    "inverse",
    "adaptive_momentum",
    "distribute",
    "state_layout",
    "owner_axes",
)

NO_CURVATURE_MSG = (
    "kfac_adaptive's update needs the model's curvature as a keyword extra argument: "
    "tx.update(grads, state, params, kfac_stats=stats, curvature=c), where c is a "
    "layerwise_optax.KfacCurvature (layerwise_optax.flax.kfac_curvature builds one for "
    "a Flax NNX model)."
)


def _vdot(a: Any, b: Any) -> jax.Array:
    """``Σ a·b`` over the leaves of two trees of one structure, in float32 or wider."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    total = jnp.zeros([], jnp.float32)
    for x, y in pairs:
        dtype = jnp.promote_types(jnp.promote_types(x.dtype, y.dtype), jnp.float32)
        total = total + jnp.sum(x.astype(dtype) * y.astype(dtype))
    return total


@jax.tree_util.register_pytree_node_class
class KfacCurvature:
    """The exact curvature of a model and loss at one batch, for :func:`kfac_adaptive`.

    With outputs ``z = f(θ)`` (``apply_fn(params, data)``, any tree of arrays) and
    loss ``L(θ) = ℓ(f(θ))`` (``loss_fn(outputs, data)``, a scalar), the
    Gauss-Newton matrix is ``C = J^T H J`` with ``J = ∂z/∂θ`` and ``H`` the
    Hessian of ``ℓ`` in ``z`` (or, with ``output_hvp``, any other PSD
    output-space matrix such as a loss's Fisher information). For the squared
    error and the softmax and sigmoid cross-entropies (canonical links) ``H`` is
    also their Fisher, so ``C`` is the exact Fisher of the model. No matrix is
    formed: products go through ``jax.jvp``/``jax.vjp`` of ``apply_fn`` and a
    Hessian-vector product of ``loss_fn``. A plain params-in, loss-out problem is
    ``apply_fn = lambda p, _: p``, whose ``C`` is the loss's Hessian.

    It is a pytree whose only leaves are ``data`` (the batch), so it can be
    passed through ``jit``; the functions are static (compared by identity:
    build them once, not per step, if ``update`` is jitted on its own).

    Attributes:
      apply_fn: ``apply_fn(params, data) -> outputs``.
      loss_fn: ``loss_fn(outputs, data) -> scalar``, the training loss.
      data: The batch (any pytree), passed to both.
      output_hvp: ``output_hvp(outputs, u, data) -> H u`` for a tree ``u`` shaped
        like the outputs; ``None``: the Hessian of ``loss_fn`` (forward-over-reverse).

    Examples:
      A linear model with the squared error: ``C = X^T X / n``.

      >>> import jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> x = jnp.array([[1.0, 0.0], [1.0, 2.0]])
      >>> c = lo.KfacCurvature(lambda w, x: x @ w,
      ...                      lambda z, x: 0.5 * jnp.mean(z ** 2), x)
      >>> c.matvec(jnp.zeros(2), jnp.array([1.0, 0.0])).tolist()
      [1.0, 1.0]
    """

    def __init__(
        self,
        apply_fn: Callable[[Any, Any], Any],
        loss_fn: Callable[[Any, Any], jax.Array],
        data: Any = None,
        output_hvp: Callable[[Any, Any, Any], Any] | None = None,
    ):
        self.apply_fn = apply_fn
        self.loss_fn = loss_fn
        self.data = data
        self.output_hvp = output_hvp

    def tree_flatten(self):
        return (self.data,), (self.apply_fn, self.loss_fn, self.output_hvp)

    @classmethod
    def tree_unflatten(cls, aux, children):
        apply_fn, loss_fn, output_hvp = aux
        return cls(apply_fn, loss_fn, children[0], output_hvp)

    def outputs(self, params: Any) -> Any:
        """``f(θ)``: the model's outputs at ``params``."""
        return self.apply_fn(params, self.data)

    def loss_at(self, params: Any) -> jax.Array:
        """``L(θ)``: the loss at ``params`` on this batch (one forward pass)."""
        return self.loss_fn(self.outputs(params), self.data)

    def hvp_outputs(self, outputs: Any, u: Any) -> Any:
        """``H u``: the output-space curvature at ``outputs`` times ``u``."""
        if self.output_hvp is not None:
            return self.output_hvp(outputs, u, self.data)
        grad = jax.grad(lambda z: self.loss_fn(z, self.data))
        return jax.jvp(grad, (outputs,), (u,))[1]

    def jvp(self, params: Any, v: Any) -> tuple[Any, Any]:
        """``(f(θ), J v)``; ``v`` is cast leaf by leaf to the params' dtypes."""
        v = jax.tree.map(lambda t, p: t.astype(p.dtype), v, params)
        return jax.jvp(self.outputs, (params,), (v,))

    def matvec(self, params: Any, v: Any) -> Any:
        """``C v = J^T H J v`` at ``params`` (one forward-mode and one reverse pass)."""
        z, jv = self.jvp(params, v)
        _, vjp = jax.vjp(self.outputs, params)
        return vjp(self.hvp_outputs(z, jv))[0]

    def gram(self, params: Any, vectors: Sequence[Any]) -> tuple[jax.Array, jax.Array]:
        """``(G, L(θ))`` with ``G[i, j] = v_i·C·v_j`` (float32 ``(k, k)``).

        One Jacobian-vector product per vector and one output-space product per
        vector; the loss at ``params`` comes from the same forward pass.
        """
        outs = [self.jvp(params, v) for v in vectors]
        z = outs[0][0]
        hjv = [self.hvp_outputs(z, jv) for _, jv in outs]
        k = len(vectors)
        rows = [[_vdot(outs[i][1], hjv[j]) for j in range(k)] for i in range(k)]
        g = jnp.stack([jnp.stack(r) for r in rows])
        return 0.5 * (g + g.T), jnp.asarray(self.loss_fn(z, self.data), jnp.float32)


class ScaleByKfacAdaptiveState(NamedTuple):
    """State of :func:`kfac_adaptive`.

    Attributes:
      count: int32 scalar, number of updates so far.
      kfac: The preconditioner's :class:`layerwise_optax.ScaleByKfacState`.
      mu: The previous update ``δ`` (the momentum direction); params tree,
        ``mu_dtype``.
      damping: float32 scalar, the current ``λ`` (used by the next step).
      learning_rate: float32 scalar, the coefficient ``α`` of the last step.
      momentum: float32 scalar, the coefficient ``μ`` of the last step.
      rho: float32 scalar, the last reduction ratio ``ρ`` (0 before the first).
      failures: :class:`~layerwise_optax._failure.FailureCounts`: the adaptive
        step's own counts only, in ``failed``: the steps whose quadratic model
        was not usable (non-finite or not positive curvature products: the
        previous ``α, μ`` were used) and the adaptations whose ``ρ`` was not
        finite (``λ`` kept). The preconditioner's skipped leaves and failed
        refreshes are in ``kfac.failures``; :func:`failure_report` and
        :func:`failure_counts` read both states and add them.
    """

    count: jax.Array
    kfac: _kfac.ScaleByKfacState
    mu: optax.Updates
    damping: jax.Array
    learning_rate: jax.Array
    momentum: jax.Array
    rho: jax.Array
    failures: _failure.FailureCounts

    @property
    def factors(self) -> Any:
        """The preconditioner's factor EMAs (``kfac.factors``)."""
        return self.kfac.factors


def kfac_adaptive_values(state: Any) -> dict[str, float]:
    """The current ``λ``, ``α``, ``μ`` and ``ρ`` of the adaptive K-FAC state in ``state``.

    Args:
      state: A state from :func:`kfac_adaptive`, or a chain's or an
        ``inject_hyperparams`` state holding one :class:`ScaleByKfacAdaptiveState`.
        Read on the host (not under ``jit``).

    Returns:
      ``{'damping', 'learning_rate', 'momentum', 'rho', 'failed'}`` as Python
      numbers (``failed``: the adaptive step's own failure count, without the
      preconditioner's).

    Raises:
      ValueError: If ``state`` holds no :class:`ScaleByKfacAdaptiveState`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> tx = lo.kfac_adaptive(damping=0.5)
      >>> lo.kfac_adaptive_values(tx.init({'w': jnp.zeros((2, 2))}))['damping']
      0.5
    """
    kind = ScaleByKfacAdaptiveState
    found = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kind))
        if isinstance(s, kind)
    ]
    if len(found) != 1:
        raise ValueError(
            f"kfac_adaptive_values needs a state holding exactly one ScaleByKfacAdaptiveState, "
            f"found {len(found)}."
        )
    s = found[0]
    return {
        "damping": float(s.damping),
        "learning_rate": float(s.learning_rate),
        "momentum": float(s.momentum),
        "rho": float(s.rho),
        "failed": int(s.failures.failed),
    }


@dataclasses.dataclass(frozen=True)
class _Coefficients:
    """The step's coefficients and its quadratic model."""

    alpha: jax.Array
    mu: jax.Array
    model: jax.Array
    ok: jax.Array


def solve_coefficients(
    gram: jax.Array, b: jax.Array, *, momentum: jax.Array | bool
) -> tuple[jax.Array, jax.Array]:
    """``(α, μ)`` minimizing ``[α μ]·b + ½ [α μ] M [α μ]^T``, and whether it is valid.

    ``M`` (``gram``, 2×2, already damped) and ``b`` (``(g·Δ, g·δ)``). The 2×2
    solve when ``momentum`` and ``M`` is positive definite (determinant above
    ``1e-6 M_00 M_11``, i.e. ``Δ`` and ``δ`` not nearly parallel in the ``M``
    inner product), else the 1-D solve ``α = -b_0 / M_00``, ``μ = 0``. Invalid
    (``ok`` false) when ``M_00 <= 0`` or the result is not finite.
    """
    m00, m01, m11 = gram[0, 0], gram[0, 1], gram[1, 1]
    b0, b1 = b[0], b[1]
    a1 = -b0 / m00
    ok1 = (m00 > 0) & jnp.isfinite(a1)
    det = m00 * m11 - m01 * m01
    safe = jnp.where(det > 0, det, 1.0)
    a2 = (-b0 * m11 + b1 * m01) / safe
    u2 = (-b1 * m00 + b0 * m01) / safe
    ok2 = (
        jnp.asarray(momentum)
        & ok1
        & (m11 > 0)
        & (det > 1e-6 * m00 * m11)
        & jnp.isfinite(a2)
        & jnp.isfinite(u2)
    )
    coef = jnp.where(ok2, jnp.stack([a2, u2]), jnp.stack([a1, jnp.zeros_like(a1)]))
    return jnp.where(ok1, coef, 0.0), ok1


def kfac_adaptive(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    damping: jax.typing.ArrayLike = 1.0,
    min_damping: jax.typing.ArrayLike = 1e-6,
    max_damping: jax.typing.ArrayLike = 1e6,
    damping_adaptation_interval: jax.typing.ArrayLike = 5,
    damping_adaptation_decay: jax.typing.ArrayLike = 0.95,
    norm_constraint: jax.typing.ArrayLike | None = None,
    burnin_steps: jax.typing.ArrayLike = 0,
    burnin_learning_rate: jax.typing.ArrayLike = 0.0,
    factor_decay: jax.typing.ArrayLike = 0.95,
    b2: jax.typing.ArrayLike = 0.999,
    precondition_frequency: jax.typing.ArrayLike = 5,
    max_precond_dim: int | None = None,
    dimension_numbers: _axes.DimNumsOrFn | None = None,
    damping_mode: Literal["absolute", "pi", "exact"] = "pi",
    mu_dtype: jax.typing.DTypeLike | None = None,
    precond_dtype: jax.typing.DTypeLike | None = None,
    *,
    inverse: Literal["cholesky", "eigh"] = "eigh",
    adaptive_momentum: bool = True,
    distribute: bool = True,
    state_layout: Literal["auto", "owner", "replicated"] = "auto",
    owner_axes: str | tuple[str, ...] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""K-FAC with automatic learning rate and momentum and adaptive damping.

    Each step, with gradient ``g``, the K-FAC direction ``Δ = -(F̂ + λ)^{-1} g``
    (:func:`scale_by_kfac` at the current damping ``λ``, no momentum) and the
    previous update ``δ``, the update is ``d = αΔ + μδ`` with the coefficients that
    minimize the quadratic model of the loss (Martens and Grosse 2015, §7)

    .. math::
      m(d) = g·d + \tfrac12 d·(C + λ I)·d, \qquad
      \begin{pmatrix} Δ^T C_λ Δ & Δ^T C_λ δ \\ δ^T C_λ Δ & δ^T C_λ δ \end{pmatrix}
      \begin{pmatrix} α \\ μ \end{pmatrix} = -\begin{pmatrix} g·Δ \\ g·δ \end{pmatrix},

    where ``C`` is the exact Gauss-Newton (or Fisher) matrix of the model on the
    batch, ``C_λ = C + λ I``, given by ``curvature=`` (:class:`KfacCurvature`; two
    Jacobian-vector products per step). On the first step (``δ = 0``), with
    ``adaptive_momentum=False``, or when the 2×2 matrix is singular, ``μ = 0`` and
    ``α = -g·Δ / Δ^T C_λ Δ``. Then:

    * norm constraint: if ``d·C_λ·d > norm_constraint``, ``d`` is scaled down to
      ``d·C_λ·d = norm_constraint`` (kfac-jax's ``norm_constraint``);
    * ``learning_rate`` multiplies ``d`` (``1``: the model's minimizer; a schedule
      may anneal it); the model value ``m(d)`` is that of the scaled step;
    * burn-in: for the first ``burnin_steps`` steps ``d = burnin_learning_rate ·
      Δ`` (``0``: the factors are estimated without moving, as kfac-jax's burn-in)
      and ``λ`` is not adapted;
    * adaptive damping (Levenberg–Marquardt, Martens and Grosse §6.5): on steps
      ``0, k, 2k, ...`` (``k = damping_adaptation_interval``) the reduction ratio
      ``ρ = (L(θ + d) − L(θ)) / (g·d + ½ d·C·d)`` on the same batch (one more
      forward pass; the undamped model, so ``ρ = 1`` when ``C`` is the Hessian of a
      quadratic loss)
      sets ``λ ← ωλ`` if ``ρ > 3/4`` and ``λ ← λ/ω`` if ``ρ < 1/4``, with
      ``ω = damping_adaptation_decay^k``, clipped to ``[min_damping,
      max_damping]``. The new ``λ`` is used from the next step: with
      ``inverse='eigh'`` (default) at once, since the damping is applied after
      the eigendecomposition; with ``'cholesky'`` only at the next refresh of the
      inverses (``precondition_frequency``).

    Failures never raise: a quadratic model whose products are not finite or not
    positive keeps the previous ``(α, μ)``, a ``ρ`` that is not finite keeps ``λ``;
    both are counted (``failures.failed``). Gradient leaves that are not finite
    enter neither ``g`` nor ``Δ`` (the preconditioner's policy). Read ``λ, α, μ,
    ρ`` with :func:`kfac_adaptive_values`.

    The update is the final step (it already has its sign and size): do not
    chain a learning rate after it. Weight decay is not offered: add an L2 term to
    the loss inside ``curvature``'s ``loss_fn`` and to the gradient instead, so
    that the quadratic model and ``ρ`` see it.

    Args:
      learning_rate: Multiplier of the model's step (float or schedule), ``>= 0``.
      damping: Initial ``λ`` (later values live in the state), ``>= 0``.
      min_damping: Lower clip of ``λ``, ``>= 0``.
      max_damping: Upper clip of ``λ``, ``>= 0``.
      damping_adaptation_interval: ``k``, steps between adaptations, an int ``>= 1``
        (may be traced).
      damping_adaptation_decay: ``ω^{1/k}``, in ``[0, 1)`` (Martens and Grosse's
        ``19/20``; ``0`` sends ``λ`` to its clips at each adaptation).
      norm_constraint: Bound on ``d·(C + λI)·d``, ``> 0``; ``None``: none.
      burnin_steps: Steps of fixed-rate updates before adaptation, an int ``>= 0``
        (may be traced).
      burnin_learning_rate: The burn-in's rate, ``>= 0``.
      factor_decay: As in :func:`scale_by_kfac`.
      b2: As in :func:`scale_by_kfac`.
      precondition_frequency: As in :func:`scale_by_kfac`, but 5 by default
        (kfac-jax's ``inverse_update_period``): with ``inverse='eigh'`` the
        eigendecompositions are refreshed every 5 steps while the adapted damping
        still acts at every step (on the digits MLP of ``time_to_target`` in
        quick mode, the same 42 steps to AdamW's loss as refreshing every step,
        at about a tenth of the step time).
      max_precond_dim: As in :func:`scale_by_kfac`.
      dimension_numbers: As in :func:`scale_by_kfac`.
      damping_mode: As in :func:`scale_by_kfac`.
      precond_dtype: As in :func:`scale_by_kfac`.
      inverse: As in :func:`scale_by_kfac`; ``'eigh'`` by default here.
      mu_dtype: Storage dtype of the previous update (``None``: the params').
      adaptive_momentum: Solve for ``μ`` (static); ``False``: ``μ = 0``.
      distribute: Spread the refresh over the mesh's devices (static; see
        :func:`scale_by_kfac`).
      state_layout: ``'auto'``, ``'owner'`` or ``'replicated'``: where the
        preconditioner's per-layer state lies under a mesh (static; see
        :func:`scale_by_kfac`). The adaptive scalars are replicated.
      owner_axes: The mesh axes the owner layout spreads over (static; see
        :func:`scale_by_kfac`).

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with state
      :class:`ScaleByKfacAdaptiveState`; its update requires ``params``,
      ``kfac_stats=`` and ``curvature=``.

    Raises:
      ValueError: At construction for bad hyperparameters (naming the argument);
        at ``update`` without ``params`` or ``curvature``, and as
        :func:`scale_by_kfac` for its statistics.

    Examples:
      A linear least-squares problem: its K-FAC factors and its curvature are
      exact, so the first step solves it (``α = 1`` at ``λ → 0``).

      >>> import jax, jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
      >>> y = jnp.array([[1.0], [2.0], [0.0]])
      >>> loss = lambda z, d: 0.5 * jnp.mean(jnp.sum((z - d[1]) ** 2, -1))
      >>> curv = lo.KfacCurvature(lambda p, d: d[0] @ p['w'], loss, (x, y))
      >>> stats = {'w': lo.KfacFactors(a=x.T @ x / 3, g=jnp.eye(1))}
      >>> tx = lo.kfac_adaptive(damping=1e-6, min_damping=0.0, damping_mode='absolute')
      >>> p = {'w': jnp.zeros((2, 1))}
      >>> g = jax.grad(lambda p: curv.loss_at(p))(p)
      >>> u, s = tx.update(g, tx.init(p), p, kfac_stats=stats, curvature=curv)
      >>> round(lo.kfac_adaptive_values(s)['learning_rate'], 4)
      1.0

    References:
      Martens and Grosse, `Optimizing Neural Networks with Kronecker-factored
      Approximate Curvature <https://arxiv.org/abs/1503.05671>`_, 2015, §6.5–7.
      Botev and Martens, `KFAC-JAX <https://github.com/google-deepmind/kfac-jax>`_, 2022.
    """
    _checks.alias_args(learning_rate, 0.0, None)
    for name, value in (
        ("damping", damping),
        ("min_damping", min_damping),
        ("max_damping", max_damping),
        ("burnin_learning_rate", burnin_learning_rate),
    ):
        _checks.non_negative(name, value)
    if isinstance(min_damping, (int, float)) and isinstance(max_damping, (int, float)):
        if min_damping > max_damping:
            raise ValueError(
                f"min_damping ({min_damping!r}) must be <= max_damping ({max_damping!r})."
            )
    _checks.in_unit_interval("damping_adaptation_decay", damping_adaptation_decay)
    if norm_constraint is not None:
        _checks.positive("norm_constraint", norm_constraint)
    _checks.traceable_int("damping_adaptation_interval", damping_adaptation_interval, minimum=1)
    _checks.traceable_int("burnin_steps", burnin_steps, minimum=0)
    _checks.boolean("adaptive_momentum", adaptive_momentum)
    mu_dtype = _checks.canonicalize_dtype(mu_dtype, "mu_dtype")
    # The preconditioner's own checks (built once here so they raise at construction).
    make_kfac = functools.partial(
        _kfac.scale_by_kfac,
        momentum=0.0,
        b2=b2,
        factor_decay=factor_decay,
        precondition_frequency=precondition_frequency,
        max_precond_dim=max_precond_dim,
        dimension_numbers=dimension_numbers,
        damping_mode=damping_mode,
        mu_dtype=mu_dtype,
        precond_dtype=precond_dtype,
        inverse=inverse,
        distribute=distribute,
        state_layout=state_layout,
        owner_axes=owner_axes,
    )
    base = make_kfac(damping=damping)

    def init_fn(params):
        leaf_dtype = lambda p: mu_dtype or p.dtype  # noqa: E731
        return ScaleByKfacAdaptiveState(
            count=jnp.zeros([], jnp.int32),
            kfac=cast(_kfac.ScaleByKfacState, base.init(params)),
            mu=jax.tree.map(lambda p: jnp.zeros(p.shape, leaf_dtype(p)), params),
            damping=jnp.asarray(damping, jnp.float32),
            learning_rate=jnp.zeros([], jnp.float32),
            momentum=jnp.zeros([], jnp.float32),
            rho=jnp.zeros([], jnp.float32),
            failures=_failure.zeros(),
        )

    def update_fn(updates, state, params=None, *, curvature=None, **extra_args):
        if params is None:
            raise ValueError("kfac_adaptive's update needs params (the point of the model).")
        if curvature is None:
            raise ValueError(NO_CURVATURE_MSG)
        with jax.named_scope("layerwise_optax.kfac_adaptive"):
            lam = state.damping
            inner = make_kfac(damping=lam)
            raw, kstate = inner.update(updates, state.kfac, params, **extra_args)
            kstate = cast(_kfac.ScaleByKfacState, kstate)
            valid = jax.tree.map(lambda x: _failure.guard(x)[0], updates)
            g = jax.tree.map(lambda x: _failure.guard(x)[1], updates)
            direction = jax.tree.map(lambda x: -x.astype(jnp.float32), raw)
            # A leaf whose gradient is not finite takes no step at all (Δ is zero
            # there): its previous update is left out of d and kept for later.
            prev = jax.tree.map(
                lambda x, ok: jnp.where(ok, x.astype(jnp.float32), 0.0), state.mu, valid
            )
            coef, loss0 = _coefficients(
                g, direction, prev, state, curvature, params, lam, hp=_hyper(state.count)
            )
            d = jax.tree.map(lambda a, b: coef.alpha * a + coef.mu * b, direction, prev)
            rho, new_lam, rho_failed = _adapt(curvature, params, d, coef, loss0, lam, state.count)
            failed = (~coef.ok).astype(jnp.int32) + rho_failed
            out = jax.tree.map(lambda x, u: x.astype(u.dtype), d, updates)
            new_state = ScaleByKfacAdaptiveState(
                count=jnp.asarray(optax.safe_increment(state.count)),
                kfac=kstate,
                mu=jax.tree.map(
                    lambda ok, x, m: _failure.keep(ok, x.astype(m.dtype), m), valid, d, state.mu
                ),
                # float32 scalars whatever the params' dtype (stable through lax.cond).
                damping=new_lam.astype(jnp.float32),
                learning_rate=coef.alpha.astype(jnp.float32),
                momentum=coef.mu.astype(jnp.float32),
                rho=jnp.where(jnp.isfinite(rho), rho, state.rho).astype(jnp.float32),
                # The adaptive step's own counts: the preconditioner's stay in
                # kfac.failures, which failure_report reads as a nested state.
                failures=_failure.add(state.failures, failed=failed),
            )
            return out, new_state

    def _hyper(count):
        lr = learning_rate(count) if callable(learning_rate) else learning_rate
        bound = jnp.inf if norm_constraint is None else norm_constraint
        return _checks.hyperparameters(lr, bound, burnin_learning_rate) + (
            jnp.asarray(burnin_steps, jnp.int32),
        )

    def _coefficients(g, direction, prev, state, curvature, params, lam, hp):
        lr, bound, burnin_lr, burnin = hp
        gram, loss0 = curvature.gram(params, [direction, prev])
        vv = jnp.array(
            [
                [_vdot(direction, direction), _vdot(direction, prev)],
                [_vdot(prev, direction), _vdot(prev, prev)],
            ]
        )
        m = gram + lam * vv
        b = jnp.stack([_vdot(g, direction), _vdot(g, prev)])
        coef, ok = solve_coefficients(m, b, momentum=adaptive_momentum)
        # A zero direction (a zero gradient) is a zero step, not a failure.
        still = (vv[0, 0] == 0) & jnp.all(jnp.isfinite(m)) & jnp.all(jnp.isfinite(b))
        coef, ok = jnp.where(still, 0.0, coef), ok | still
        in_burnin = state.count < burnin
        q = coef @ m @ coef
        scale = jnp.where(q > bound, jnp.sqrt(bound / jnp.where(q > 0, q, 1.0)), 1.0)
        coef = coef * jnp.where(jnp.isfinite(scale), scale, 1.0) * lr
        # A failed solve reuses the last step's coefficients as they were applied.
        coef = jnp.where(ok, coef, jnp.stack([state.learning_rate, state.momentum]))
        coef = jnp.where(in_burnin, jnp.stack([burnin_lr, jnp.zeros([], jnp.float32)]), coef)
        # rho's denominator: the undamped model (Martens and Grosse 6.5; kfac-jax's
        # default), so that rho = 1 exactly when C is the loss's Hessian.
        model = coef @ b + 0.5 * (coef @ gram @ coef)
        ok = ok | in_burnin
        coef_ok = ok & ~in_burnin
        return _Coefficients(coef[0], coef[1], jnp.where(coef_ok, model, jnp.nan), ok), loss0

    def _adapt(curvature, params, d, coef, loss0, lam, count):
        decay, lo_, hi = _checks.hyperparameters(damping_adaptation_decay, min_damping, max_damping)
        interval = jnp.asarray(damping_adaptation_interval, jnp.int32)
        burnin = jnp.asarray(burnin_steps, jnp.int32)
        due = (count % interval == 0) & (count >= burnin) & coef.ok & (coef.model < 0)

        def reduction(_):
            moved = jax.tree.map(lambda p, x: (p + x.astype(p.dtype)).astype(p.dtype), params, d)
            return jnp.asarray(curvature.loss_at(moved), jnp.float32) - loss0

        change = jax.lax.cond(due, reduction, lambda _: jnp.zeros([], jnp.float32), None)
        rho = jnp.where(due, change / jnp.where(due, coef.model, 1.0), jnp.nan)
        omega = decay ** interval.astype(jnp.float32)
        good = due & jnp.isfinite(rho)
        new = jnp.where(rho > 0.75, lam * omega, jnp.where(rho < 0.25, lam / omega, lam))
        new = jnp.clip(new, lo_, hi)
        new_lam = jnp.where(good, new, lam)
        failed = (due & ~jnp.isfinite(rho)).astype(jnp.int32)
        return rho, new_lam, failed

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
