"""Steepest descent under a norm chosen per layer role ("Old Optimizer, New Norm").

For a norm ``||.||`` the steepest-descent direction of a gradient ``g`` is the
*dual map* (the linear minimization oracle up to sign)

    d(g) = argmax_{||d|| <= 1} <g, d>,

and the step is ``-lr * d(g)`` (the normalized form used by Scion and Muon) or,
with ``dual_scale=True``, ``-lr * ||g||_* d(g)`` (the minimizer of the linear
model plus ``||d||^2 / 2``, Bernstein and Newhouse 2024). Choosing the norm per
layer gives the known methods: the spectral norm gives Muon's ``U V^T``, the
max-abs (ℓ∞) norm gives sign descent, the ℓ2/RMS norm normalized SGD. Each
leaf's norm comes from its role (:func:`layerwise_optax.layer_roles`) through a
``norms`` table, with a per-role scale.

The norms (``d`` for a leaf ``g``; matrices in Flax ``(fan_in, fan_out)`` layout):

================  ==========================================================
``spectral``      ``U V^T`` of ``g = U S V^T`` (Newton-Schulz; per matrix view)
``rms_spectral``  ``sqrt(fan_out / fan_in) U V^T``: the RMS→RMS operator norm
``row_l2``        each row ``g[i, :]`` (last axis) scaled to unit ℓ2 norm
``sign``          ``sign(g)``: the max-abs (ℓ∞) norm
``rms``           ``sqrt(size) g / ||g||_2``: unit RMS
``l2``            ``g / ||g||_2``
``none``          ``g`` itself (momentum SGD)
================  ==========================================================
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from layerwise_optax import _axes, _checks, _dual, _failure, _kron, _linalg, _roles

_STATIC_ARGS = (
    "norms",
    "scales",
    "roles",
    "ns_coeffs",
    "ns_steps",
    "ns_dtype",
    "nesterov",
    "dual_scale",
    "mask",
    "mu_dtype",
)
NORMS = ("spectral", "rms_spectral", "row_l2", "sign", "rms", "l2", "none")
DEFAULT_NORMS = {
    "matrix": "rms_spectral",
    "conv": "rms_spectral",
    "stacked": "rms_spectral",
    "embedding": "row_l2",
    "head": "sign",
    "vector": "rms",
    "scalar": "sign",
}
_SPECTRAL = ("spectral", "rms_spectral")
_HUGE = 2**62


def default_scale(role: str, shape: tuple[int, ...]) -> float:
    """The default multiplier of a role's unit-norm direction.

    ``head``: ``1 / fan_in``, so a sign step changes each output by at most
    ``lr`` for inputs in ``[-1, 1]`` (Scion's output layer); ``embedding``:
    ``sqrt(features)``, so each updated row has RMS 1 like its initialization;
    every other role: 1.
    """
    if role == "head" and len(shape) >= 2:
        return 1.0 / math.prod(shape[:-1])
    if role == "embedding" and len(shape) >= 2:
        return float(shape[-1]) ** 0.5
    return 1.0


class ScaleBySteepestDescentState(NamedTuple):
    """State for :func:`scale_by_steepest_descent`.

    Attributes:
      count: int32 scalar, number of updates so far.
      mu: Momentum, params tree.
      failures: :class:`~layerwise_optax._failure.FailureCounts` (the failure
        policy's counters). ``skipped``: (leaf, step) pairs with an invalid (non-finite)
        gradient (kept out of the momentum; the update is zero there). ``failed``: (leaf, step) pairs whose dual map was not finite
        (e.g. a float16 Newton-Schulz overflow); there is no stored preconditioner
        to fall back on, so the leaf's update is zero and its momentum is kept.
    """

    count: jax.Array
    mu: optax.Updates
    failures: _failure.FailureCounts


def _safe_div(x: jax.Array, n: jax.Array) -> jax.Array:
    return jnp.where(n > 0, x / jnp.where(n > 0, n, 1.0), 0.0)


def dual_map(
    g: jax.Array,
    norm: str,
    *,
    plan: _axes.LeafPlan | None = None,
    polar: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Unit-norm steepest-descent direction of ``g`` and the dual norm ``||g||_*``.

    The spectral norms need ``plan`` (a two-group matrix view) and ``polar``, the
    polar factors ``U V^T`` of ``plan.to_blocks(g)`` (``(stack, m, n)``, from
    :func:`layerwise_optax._dual.polar_factors`, which batches them over all
    leaves). Zero gradients give zero directions.
    """
    g = g.astype(jnp.float32)
    if norm in _SPECTRAL:
        assert polar is not None  # spectral norms come with their polar factors
        blocks = plan.to_blocks(g)
        d = polar.astype(jnp.float32)
        # Dual of the spectral norm: the nuclear norm <g, U V^T>, summed over slices.
        dual = jnp.sum(blocks * d)
        if norm == "rms_spectral":
            r = (plan.dims[1] / plan.dims[0]) ** 0.5
            d, dual = d * r, dual * r
        return plan.from_blocks(d), dual
    if norm == "row_l2":
        rows = jnp.sqrt(jnp.sum(g * g, axis=-1, keepdims=True))
        return _safe_div(g, rows), jnp.sum(rows)
    if norm == "sign":
        return jnp.sign(g), jnp.sum(jnp.abs(g))
    l2 = jnp.sqrt(jnp.sum(g * g))
    if norm == "rms":
        r = float(g.size) ** 0.5
        return _safe_div(g, l2) * r, l2 * r
    if norm == "l2":
        return _safe_div(g, l2), l2
    return g, jnp.sum(g * g) ** 0.5  # 'none'


class _Config(NamedTuple):
    """Static settings of one :func:`scale_by_steepest_descent`."""

    table: dict[str, str]  # role -> norm
    scales: dict[str, float]  # role -> multiplier (else default_scale)
    coeffs: Any
    nesterov: bool
    dual_scale: bool
    ns_dtype: Any
    mu_dtype: Any


def _validate(
    norms: Any,
    scales: Any,
    roles: Any,
    beta: Any,
    nesterov: bool,
    dual_scale: bool,
    ns_coeffs: Any,
    ns_steps: int | None,
    ns_dtype: Any,
    mu_dtype: Any,
) -> _Config:
    """Checks :func:`scale_by_steepest_descent`'s arguments into a config.

    Raises:
      TypeError: ``norms`` or ``scales`` not a mapping.
      ValueError: An unknown role or norm, a negative scale, a bad ``beta`` or
        ``ns_steps`` (naming the argument and value).
    """
    for arg, value in (("norms", norms), ("scales", scales)):
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(
                f"{arg} must be a dict from role to value, got {type(value).__name__} {value!r}."
            )
    table = dict(DEFAULT_NORMS)
    for role, norm in (norms or {}).items():
        _checks.one_of("norms key", role, _roles.ROLES)
        _checks.one_of(f"norms[{role!r}]", norm, NORMS)
        table[role] = norm
    scales = dict(scales or {})
    for role, s in scales.items():
        _checks.one_of("scales key", role, _roles.ROLES)
        _checks.non_negative(f"scales[{role!r}]", s)
    if roles is not None:
        _checks.tree_or_callable("roles", roles)
    _checks.in_unit_interval("beta", beta)
    _checks.boolean("nesterov", nesterov)
    _checks.boolean("dual_scale", dual_scale)
    _checks.positive_int("ns_steps", ns_steps, allow_none=True)
    mu_dtype = _checks.canonicalize_dtype(mu_dtype, "mu_dtype")
    ns_dtype = _checks.canonicalize_dtype(ns_dtype, "ns_dtype")
    coeffs = _linalg.ns_coefficients(ns_coeffs, 5 if ns_steps is None else ns_steps)
    return _Config(table, scales, coeffs, nesterov, dual_scale, ns_dtype, mu_dtype)


def _plans(tree: Any, tree_roles: Any, cfg: _Config) -> Any:
    """Per leaf its plan: the matrix view for a spectral norm, else no factors.

    Raises:
      ValueError: A spectral norm on a leaf that is not a matrix, or ``row_l2``
        on one without rows, naming the leaf's path and shape.
    """

    def spec(path, x, role):
        if _axes.is_masked(x):
            return None
        shape, norm, where = tuple(x.shape), cfg.table[role], _roles.path_string(path)
        if norm in _SPECTRAL:
            spec = _roles.matrix_dimension_numbers(role, shape, path)
            if spec is None:
                raise ValueError(
                    f"param {where} with shape {shape} and role {role!r}: norm {norm!r} "
                    "needs a matrix (role matrix, conv, stacked, embedding or head)."
                )
            return spec
        if norm == "row_l2" and len(shape) < 2:
            raise ValueError(f"param {where} with shape {shape}: norm 'row_l2' needs rows.")
        return None

    specs = jax.tree_util.tree_map_with_path(spec, tree, tree_roles, is_leaf=_axes.is_masked)
    return _axes.resolve(
        specs, tree, max_precond_dim=_HUGE, block_size=None, merge_small_dims=False
    )


def _leaf_step(g, plan, prep, polar, mu, role, *, cfg: _Config) -> _dual.Step:
    """One leaf's step: ``c_role d(\\hat M_t)`` (times ``||\\hat M_t||_*`` with ``dual_scale``).

    A direction that is not finite gives the leaf a zero update and keeps its
    momentum (:func:`layerwise_optax._dual.settle`).
    """
    d, dual = dual_map(prep.m_hat, cfg.table[role], plan=plan, polar=polar[0])
    if cfg.dual_scale:
        d = d * dual
    ok, failed = _dual.settle(d, prep)
    scale = float(cfg.scales.get(role, default_scale(role, plan.shape)))
    return _dual.step(g, mu, prep, ok, failed, d * scale, cfg.mu_dtype)


def scale_by_steepest_descent(
    norms: Mapping[str, str] | None = None,
    scales: Mapping[str, float] | None = None,
    beta: jax.typing.ArrayLike = 0.9,
    *,
    nesterov: bool = False,
    roles: _roles.RolesOrFn | None = None,
    dual_scale: bool = False,
    ns_coeffs: str | Any = "polar_express",
    ns_steps: int | None = None,
    ns_dtype: jax.typing.DTypeLike | None = None,
    mu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
    """Momentum, then the dual map of each leaf's role norm; see :func:`steepest_descent`.

    Args:
      norms: ``{role: norm}`` over :data:`DEFAULT_NORMS` (static); norms are those
        of :data:`NORMS`.
      scales: ``{role: multiplier}`` replacing :func:`default_scale` (static).
      beta: Momentum decay in ``[0, 1)``; 0 steps on the raw gradient.
      nesterov: Nesterov (NAdam-form) momentum.
      roles: Role tree or callable (default :func:`layerwise_optax.layer_roles`).
      dual_scale: Multiply each direction by the dual norm of the momentum.
      ns_coeffs: Newton-Schulz preset or coefficients for the spectral norms.
      ns_steps: Newton-Schulz steps (static; ``None``: 5).
      ns_dtype: Newton-Schulz iteration dtype.
      mu_dtype: Momentum storage dtype.

    Returns:
      A :class:`optax.GradientTransformation` with state
      :class:`ScaleBySteepestDescentState`.


    Examples:
      Every role mapped to ``'sign'`` with ``beta=0`` is sign descent:

      >>> import jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> roles = ('matrix', 'conv', 'stacked', 'embedding', 'head', 'vector', 'scalar')
      >>> tx = lo.scale_by_steepest_descent(norms={r: 'sign' for r in roles},
      ...                                   scales={r: 1.0 for r in roles}, beta=0.0)
      >>> params = {'w': jnp.ones((2, 3))}
      >>> grads = {'w': jnp.array([[0.5, -2.0, 0.0], [3.0, -1e-3, 1.0]])}
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> updates['w'].tolist()
      [[1.0, -1.0, 0.0], [1.0, -1.0, 1.0]]

    References:
      Bernstein and Newhouse, `Old Optimizer, New Norm: An Anthology
      <https://arxiv.org/abs/2409.20325>`_, 2024.
      Pethick et al., `Training Deep Learning Models with Norm-Constrained LMOs
      <https://arxiv.org/abs/2502.07529>`_ (Scion), 2025.
    Raises:
      ValueError: At construction for an unknown role or norm, a bad ``beta`` or
        ``ns_steps``; at ``init`` for a spectral norm on a leaf that is not a
        matrix (naming its path).
    """
    cfg = _validate(
        norms, scales, roles, beta, nesterov, dual_scale, ns_coeffs, ns_steps, ns_dtype, mu_dtype
    )

    def init_fn(params):
        _plans(params, _roles.resolve_roles(roles, params), cfg)  # validates, naming paths
        return ScaleBySteepestDescentState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=cfg.mu_dtype),
            failures=_failure.zeros(),
        )

    def update_fn(updates, state, params=None):
        del params
        with jax.named_scope("layerwise_optax.steepest_descent"):
            tree_roles = _roles.resolve_roles(roles, updates)
            plans = _plans(updates, tree_roles, cfg)
            count_inc = _kron.increment(state.count)
            (beta_,) = _checks.hyperparameters(beta)

            def momentum(g, plan, mu, role):
                return _dual.momentum(
                    g,
                    mu,
                    beta_,
                    count_inc,
                    cfg.nesterov,
                    plan=plan if cfg.table[role] in _SPECTRAL else None,
                    dtype=jnp.float32,
                )

            prepared = _axes.map_leaves(momentum, plans, updates, state.mu, tree_roles)
            polar = _dual.polar_factors(
                plans, prepared, cfg.coeffs, eps=None, ns_dtype=cfg.ns_dtype, distribute=False
            )
            leaf = functools.partial(_leaf_step, cfg=cfg)
            out = _axes.map_leaves(leaf, plans, updates, prepared, polar, state.mu, tree_roles)
            new_updates, mu, failures = _dual.collect(out, state.failures)
            return new_updates, ScaleBySteepestDescentState(count_inc, mu, failures)

    return optax.GradientTransformation(init_fn, update_fn)


def steepest_descent(
    learning_rate: optax.ScalarOrSchedule,
    norms: Mapping[str, str] | None = None,
    scales: Mapping[str, float] | None = None,
    beta: jax.typing.ArrayLike = 0.9,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: optax.MaskOrFn = None,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    nesterov: bool = False,
    roles: _roles.RolesOrFn | None = None,
    dual_scale: bool = False,
    ns_coeffs: str | Any = "polar_express",
    ns_steps: int | None = None,
    ns_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
    r"""Steepest descent under per-layer norms, with momentum (Scion-style).

    Each leaf steps along the unit-norm steepest-descent direction of its momentum
    under the norm of its role:

    .. math::
      M_t = \beta M_{t-1} + (1 - \beta) G_t, \qquad
      W \leftarrow W - \eta\, c_{\mathrm{role}}\, d_{\mathrm{norm}}(\hat M_t) - \eta\lambda W.

    Defaults (:data:`DEFAULT_NORMS`): hidden matrices, conv kernels and stacked
    layers use the RMS→RMS operator norm (``sqrt(fan_out/fan_in) U V^T``, Muon's
    direction); embeddings row-wise ℓ2 (each token's row normalized, scaled to RMS
    1); the output head sign descent scaled by ``1/fan_in``; biases and norm
    scales unit-RMS steps; scalars sign steps. ``norms={'matrix': 'spectral'}``
    with ``beta`` and ``nesterov`` as Muon's is Muon with ``scaling='none'``;
    ``norms`` mapping every role to ``'sign'`` with ``beta=0`` is sign descent
    (both are tests). What to tune: ``learning_rate`` (one rate for all roles,
    which is the point of choosing the norms; typical 0.01-0.05), ``beta``,
    ``scales`` per role if one kind of layer needs a different radius.

    Args:
      learning_rate: Step size or schedule.
      norms: ``{role: norm}`` overriding :data:`DEFAULT_NORMS` (static).
      scales: ``{role: multiplier}`` overriding :func:`default_scale` (static).
      beta: Momentum decay.
      weight_decay: Decoupled weight decay.
      mask: Weight-decay mask.
      mu_dtype: Momentum storage dtype.
      nesterov: Nesterov momentum.
      roles: Role tree or callable (default :func:`layerwise_optax.layer_roles`).
      dual_scale: Multiply the direction by the dual norm (unnormalized steepest
        descent) instead of taking unit-norm steps.
      ns_coeffs: Newton-Schulz preset or coefficients (static).
      ns_steps: Newton-Schulz steps (static; ``None``: 5).
      ns_dtype: Newton-Schulz iteration dtype.

    Returns:
      An :class:`optax.GradientTransformation`; ``state[0]`` is the
      :class:`ScaleBySteepestDescentState`.

    Raises:
      ValueError: At construction for an unknown role or norm, a negative scale,
        ``beta`` outside ``[0, 1)`` or ``ns_steps < 1``; at ``init`` for a spectral
        norm on a leaf that is not a matrix (naming its path).
      TypeError: If ``norms`` or ``scales`` is not a dict.

    Examples:
      With the defaults, the head takes sign steps of size ``lr / fan_in`` and a
      bias a step of RMS ``lr``:

      >>> import jax, jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> params = {'w': jnp.ones((4, 16)), 'head': jnp.ones((16, 3)), 'b': jnp.zeros(16)}
      >>> grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(0), p.shape), params)
      >>> tx = lo.steepest_descent(learning_rate=1.0)
      >>> updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
      >>> bool(jnp.allclose(updates['head'], -jnp.sign(grads['head']) / 16))
      True
      >>> round(float(jnp.sqrt(jnp.mean(updates['b'] ** 2))), 4)
      1.0

    References:
      Bernstein and Newhouse, `Old Optimizer, New Norm: An Anthology
      <https://arxiv.org/abs/2409.20325>`_, 2024.
      Pethick et al., `Training Deep Learning Models with Norm-Constrained LMOs
      <https://arxiv.org/abs/2502.07529>`_ (Scion), 2025.

    .. seealso:: :func:`layerwise_optax.muon`, :func:`layerwise_optax.scale_by_steepest_descent`
    """
    _checks.alias_args(learning_rate, weight_decay, mask)
    return optax.chain(
        scale_by_steepest_descent(
            norms,
            scales,
            beta,
            nesterov=nesterov,
            roles=roles,
            dual_scale=dual_scale,
            ns_coeffs=ns_coeffs,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            mu_dtype=mu_dtype,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
