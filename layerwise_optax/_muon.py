"""Muon: momentum, then Newton-Schulz orthogonalization of each matrix.

The update of a weight matrix is the (approximate) polar factor ``U V^T`` of its
momentum, i.e. the steepest-descent direction under the spectral norm
(Bernstein and Newhouse 2024); Newton-Schulz iterations (:func:`layerwise_optax.
linalg.newton_schulz`) compute it with matmuls only. The shared per-axis machinery
gives each leaf's matrix view: its :class:`layerwise_optax.DimensionNumbers` has
two factor groups, ``(rows, cols)`` = (fan-in axes, fan-out axes), and
batch axes, each batch slice (stacked layers, heads, a conv kernel's window)
orthogonalized on its own.

The alias :func:`muon` sends leaves that are not matrices (vectors, scalars, and
any leaf the ``dimension_numbers`` map to ``None``) to AdamW through
``optax.partition``, with its own learning rate.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from layerwise_optax import _axes, _checks, _dual, _failure, _kron, _linalg, _roles

_STATIC_ARGS = (
    "ns_steps",
    "ns_coeffs",
    "ns_dtype",
    "dimension_numbers",
    "scaling",
    "mu_dtype",
    "mask",
    "nesterov",
    "adam_mask",
    "roles",
    "neuron_b2",
    "element_b2",
    "distribute",
    "ns_method",
    "ns_prescale",
)
_SCALINGS = ("width", "rms", "none")


class ScaleByMuonState(NamedTuple):
    """State for :func:`scale_by_muon`.

    Attributes:
      count: int32 scalar, number of updates so far.
      mu: Momentum, params tree, ``mu_dtype``.
      failures: :class:`~layerwise_optax._failure.FailureCounts` (the failure
        policy's counters). ``skipped``: (leaf, step) pairs whose gradient was not finite
        (kept out of the momentum; the update is zero there). ``failed``: (leaf, step) pairs whose orthogonalized update was
        not finite (e.g. overflow with ``ns_dtype=float16``). Muon stores no
        preconditioner to fall back on: such a leaf gets a zero update, and its
        momentum and NorMuon moment are kept.
      nu: NorMuon (``neuron_b2`` set): per-neuron second moments of the
        orthogonalized update, ``(slices, fan_out)`` float32 per matrix leaf;
        AdaMuon (``element_b2`` set): element-wise ones, ``(slices, fan_in,
        fan_out)`` float32; a 0-d placeholder at other leaves; ``None`` for Muon.

    .. note::
      Memory: one params-sized momentum; NorMuon adds one float per output neuron,
      AdaMuon one float32 per matrix entry.
    """

    count: jax.Array
    mu: optax.Updates
    failures: _failure.FailureCounts
    nu: Any = None


class _Config(NamedTuple):
    """Static settings of one :func:`scale_by_muon` (they fix shapes and branches)."""

    coeffs: Any
    nesterov: bool
    scaling: str
    ns_dtype: Any
    mu_dtype: Any
    normuon: bool
    distribute: bool
    adamuon: bool = False
    ns_method: str = "auto"
    ns_prescale: str = "frobenius"


class _Hyper(NamedTuple):
    """The float hyperparameters, as float32 arrays (one arithmetic for injected ones)."""

    beta: jax.Array
    eps: jax.Array
    rms: jax.Array
    neuron_eps: jax.Array
    neuron_b2: jax.Array | None
    element_b2: jax.Array | None = None
    element_eps: jax.Array | None = None
    element_correction: jax.Array | None = None  # 1 - element_b2**t


def _validate(
    *,
    ns_coeffs: Any,
    ns_steps: int | None,
    beta: Any,
    eps: Any,
    mu_dtype: Any,
    nesterov: bool,
    dimension_numbers: Any,
    scaling: str,
    rms: Any,
    ns_dtype: Any,
    roles: Any,
    neuron_b2: Any,
    neuron_eps: Any,
    distribute: bool,
    element_b2: Any = None,
    element_eps: Any = 1e-8,
    ns_method: str = "auto",
    ns_prescale: str = "frobenius",
) -> _Config:
    """Checks :func:`scale_by_muon`'s arguments (``ValueError`` naming one) into a config."""
    if dimension_numbers is not None:
        _checks.tree_or_callable("dimension_numbers", dimension_numbers)
    if roles is not None:
        _checks.tree_or_callable("roles", roles)
    _checks.positive_int("ns_steps", ns_steps, allow_none=True)
    _checks.in_unit_interval("beta", beta)
    _checks.non_negative("eps", eps)
    _checks.one_of("scaling", scaling, _SCALINGS)
    _checks.boolean("nesterov", nesterov)
    _checks.non_negative("rms", rms)
    mu_dtype = _checks.canonicalize_dtype(mu_dtype, "mu_dtype")
    ns_dtype = _checks.canonicalize_dtype(ns_dtype, "ns_dtype")
    if neuron_b2 is not None:
        _checks.in_unit_interval("neuron_b2", neuron_b2)
    _checks.non_negative("neuron_eps", neuron_eps)
    if element_b2 is not None:
        _checks.in_unit_interval("element_b2", element_b2)
        if neuron_b2 is not None:
            raise ValueError(
                f"element_b2={element_b2!r} (AdaMuon's element-wise second moment) and "
                f"neuron_b2={neuron_b2!r} (NorMuon's per-neuron one) exclude each other; "
                "set one of them."
            )
    _checks.non_negative("element_eps", element_eps)
    _checks.boolean("distribute", distribute)
    _checks.one_of("ns_method", ns_method, _linalg.NS_METHODS)
    _checks.one_of("ns_prescale", ns_prescale, _linalg.NS_PRESCALES)
    if ns_steps is None:
        ns_steps = 4 if ns_prescale == "aol" else 5  # AOL saves one step
    coeffs = _linalg.ns_coefficients(ns_coeffs, ns_steps)
    normuon = neuron_b2 is not None
    adamuon = element_b2 is not None
    return _Config(
        coeffs,
        nesterov,
        scaling,
        ns_dtype,
        mu_dtype,
        normuon,
        distribute,
        adamuon,
        ns_method,
        ns_prescale,
    )


def _matrix_plans(dimension_numbers: Any, tree: Any) -> Any:
    """The leaves' plans, each spec one matrix view (:func:`layerwise_optax._dual.matrix_plans`)."""
    return _dual.matrix_plans(dimension_numbers, tree, "muon")


def _init_nu(x: jax.Array, plan: _axes.LeafPlan) -> jax.Array:
    """NorMuon's per-neuron moment: ``(slices, fan_out)`` zeros (0-d off the matrices)."""
    if plan.spec is None:
        return jnp.zeros([], jnp.float32)
    return jnp.zeros((plan.stack, plan.dims[1]), jnp.float32)


def _init_element_nu(x: jax.Array, plan: _axes.LeafPlan) -> jax.Array:
    """AdaMuon's element-wise moment: ``(slices, fan_in, fan_out)`` zeros (0-d off the matrices)."""
    if plan.spec is None:
        return jnp.zeros([], jnp.float32)
    return jnp.zeros((plan.stack, plan.dims[0], plan.dims[1]), jnp.float32)


def _normalize_elements(
    o: jax.Array, nu: jax.Array, ok: jax.Array, hp: _Hyper
) -> tuple[jax.Array, jax.Array]:
    r"""AdaMuon's element-wise second moment on the polar factor ``O``.

    ``V <- b_2 V + (1 - b_2) O * O``; ``O' = O / (sqrt(V / (1 - b_2^t)) + eps)``,
    then ``O'`` rescaled per slice to ``O``'s Frobenius norm, so that the update
    keeps the size Muon's would have (the shape scaling follows as for Muon).

    ``o``: ``(slices, fan_in, fan_out)``; ``nu`` the same shape, kept where ``ok``
    is false. Returns ``(o', nu)``.
    """
    o = o.astype(jnp.float32)
    b2, eps, correction = hp.element_b2, hp.element_eps, hp.element_correction
    assert b2 is not None and eps is not None and correction is not None  # AdaMuon only
    nu = _failure.keep(ok, b2 * nu + (1 - b2) * o * o, nu)
    adapted = o / (jnp.sqrt(nu / correction) + eps)
    norm = jnp.sqrt(jnp.sum(adapted * adapted, axis=(1, 2), keepdims=True))
    target = jnp.sqrt(jnp.sum(o * o, axis=(1, 2), keepdims=True))
    return adapted * (target / (norm + 1e-30)), nu


def _normalize_neurons(
    o: jax.Array, nu: jax.Array, ok: jax.Array, hp: _Hyper
) -> tuple[jax.Array, jax.Array]:
    r"""NorMuon: ``v_j <- b_2 v_j + (1 - b_2) mean_i O_ij^2``, then ``O_ij / (sqrt(v_j) + eps)``.

    ``o``: ``(slices, fan_in, fan_out)`` polar factors; ``nu``: the ``(slices,
    fan_out)`` moments, kept where ``ok`` is false. Returns ``(o, nu)``.
    """
    o = o.astype(jnp.float32)
    b2 = hp.neuron_b2
    assert b2 is not None  # NorMuon only (neuron_b2 set)
    nu = _failure.keep(ok, b2 * nu + (1 - b2) * jnp.mean(o * o, axis=1), nu)
    return o / (jnp.sqrt(nu)[:, None, :] + hp.neuron_eps), nu


def _shape_scale(o: jax.Array, plan: _axes.LeafPlan, cfg: _Config, hp: _Hyper) -> jax.Array:
    """``s(W) O`` for ``(slices, fan_in, fan_out)`` directions ``O``.

    ``'width'``: ``s = sqrt(max(1, fan_out / fan_in))`` (optax's); ``'rms'``:
    ``s = rms * sqrt(max(fan_in, fan_out))``, which gives ``U V^T`` RMS ``rms``
    (Liu et al. 2025), except after NorMuon's per-neuron or AdaMuon's element-wise
    division, whose result no longer has norm ``sqrt(min(m, n))``: each slice is
    then rescaled to RMS ``rms`` by its measured norm (AdaMuon's "RMS-aligned
    rescaling", ``0.2 sqrt(m n) / ||O'||_F`` at ``rms=0.2``); ``'none'``: ``s = 1``.
    """
    return _dual.shape_scale(o, plan, cfg.scaling, hp.rms, measured=cfg.normuon or cfg.adamuon)


def _leaf_step(g, plan, prep, polar, mu, nu=None, *, cfg: _Config, hp: _Hyper) -> _dual.Step:
    """One leaf's Muon step from its momentum and polar factor (NorMuon, scaling, policy).

    Leaves that are not matrices pass through. A polar factor that is not finite
    gives the leaf a zero update and keeps its momentum and NorMuon moment
    (:func:`layerwise_optax._dual.settle`).
    """
    if plan.spec is None:
        zero = jnp.zeros([], jnp.int32)
        return _dual.Step(g, mu, zero, zero, nu)
    (o,) = polar
    ok, failed = _dual.settle(o, prep)
    if cfg.normuon:
        assert nu is not None  # NorMuon's state holds the per-neuron moments
        o, nu = _normalize_neurons(o, nu, ok, hp)
    elif cfg.adamuon:
        assert nu is not None  # AdaMuon's state holds the element-wise moments
        o, nu = _normalize_elements(o, nu, ok, hp)
    update = plan.from_blocks(_shape_scale(o, plan, cfg, hp).astype(prep.g32.dtype))
    return _dual.step(g, mu, prep, ok, failed, update, cfg.mu_dtype, nu)


def scale_by_muon(
    ns_coeffs: str | Any = "standard",
    ns_steps: int | None = None,
    beta: jax.typing.ArrayLike = 0.95,
    eps: jax.typing.ArrayLike = 1e-8,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    nesterov: bool = True,
    dimension_numbers: _axes.DimNumsOrFn | None = None,
    scaling: Literal["width", "rms", "none"] = "width",
    rms: jax.typing.ArrayLike = 0.2,
    ns_dtype: jax.typing.DTypeLike | None = None,
    roles: _roles.RolesOrFn | None = None,
    neuron_b2: jax.typing.ArrayLike | None = None,
    neuron_eps: jax.typing.ArrayLike = 1e-8,
    distribute: bool = True,
    element_b2: jax.typing.ArrayLike | None = None,
    element_eps: jax.typing.ArrayLike = 1e-8,
    ns_method: Literal["auto", "standard", "gram"] = "auto",
    ns_prescale: Literal["frobenius", "aol"] = "frobenius",
) -> optax.GradientTransformation:
    """Orthogonalized momentum for matrices; see :func:`muon` and :func:`normuon`.

    Args:
      ns_coeffs: Newton-Schulz coefficients: a preset name (``'standard'``,
        ``'dion'``, ``'polar_express'``, ``'cubic'``, ``'aol'`` for
        ``ns_prescale='aol'``; see ``linalg.NS_PRESETS``) or an array ``(3,)`` /
        ``(n, 3)`` (static).
      ns_steps: Newton-Schulz steps (static, ``>= 1``; ``None``: 5, or 4 with
        ``ns_prescale='aol'``).
      beta: Momentum decay, in ``[0, 1)``.
      eps: Added to the Frobenius norm before normalizing.
      mu_dtype: Storage dtype of the momentum.
      nesterov: Nesterov (NAdam-form) momentum, as ``optax.contrib.muon``.
      dimension_numbers: Spec tree or callable giving each leaf's ``(fan-in group,
        fan-out group)`` and batch axes. ``None``: from the leaves' roles (hidden
        ``matrix``, ``conv`` and ``stacked`` leaves; see
        :func:`layerwise_optax.layer_roles`). Leaves whose spec is ``None`` are
        passed through unchanged (the alias routes them to AdamW).
      scaling: ``'width'`` multiplies by ``sqrt(max(1, fan_out / fan_in))``
        (optax's default); ``'rms'`` by ``rms * sqrt(max(fan_in, fan_out))``, which
        gives updates AdamW's RMS so AdamW learning rates transfer (Liu et al.
        2025; with ``neuron_b2`` the measured norm is used, as NorMuon does);
        ``'none'`` leaves ``U V^T`` as is.
      rms: Target update RMS for ``scaling='rms'``.
      ns_dtype: Iteration dtype (``jnp.bfloat16`` for speed; default float32).
      roles: Tree of role strings, or a callable ``params -> roles`` (default
        :func:`layerwise_optax.layer_roles`); used when ``dimension_numbers`` is
        ``None``.
      neuron_b2: NorMuon (Li et al. 2025): when set, the EMA decay of each output
        neuron's mean squared orthogonalized update, which then divides that
        neuron's update (``None``: plain Muon).
      neuron_eps: Added to the root of NorMuon's second moment.
      distribute: Under a mesh set with :func:`jax.set_mesh`, batch the
        same-shaped matrices of all leaves and split them over its devices, each
        matrix orthogonalized on one device from a gathered copy (no collective
        inside the Newton-Schulz iteration); no effect without a mesh.
      element_b2: AdaMuon (Si et al. 2025): when set, the EMA decay of an
        element-wise second moment ``V`` of the orthogonalized update ``O``; the
        update becomes ``O / (sqrt(V / (1 - element_b2^t)) + element_eps)``
        rescaled to ``O``'s Frobenius norm (then the shape scaling; with
        ``scaling='rms'`` to RMS ``rms``, AdaMuon's rescaling). ``None``: off.
        Excludes ``neuron_b2``. The paper also orthogonalizes the sign of the
        momentum rather than the momentum; this option keeps Muon's momentum and
        adds the second moment only.
      element_eps: Added to the root of AdaMuon's second moment.
      ns_method: ``'gram'`` iterates on the small ``m x m`` Gram side of an
        ``m x n`` matrix (Gram Newton-Schulz, restarted every third step; the
        same result to float32 round-off, fewer flops when ``n / m >~ 1.5``);
        ``'standard'`` the plain iteration; ``'auto'`` (default) picks by flop
        count per matrix shape (static; see
        :func:`layerwise_optax.linalg.newton_schulz`).
      ns_prescale: ``'frobenius'`` (default) divides by the Frobenius norm;
        ``'aol'`` rescales by AOL (Turbo-Muon), which lets ``ns_steps=None``
        mean 4 steps instead of 5 (use ``ns_coeffs='aol'``, designed for it;
        the result approximates the polar factor of the row-rescaled matrix;
        static).

    Returns:
      A :class:`optax.GradientTransformation` with state :class:`ScaleByMuonState`.

    Raises:
      ValueError: At construction for bad hyperparameters (unknown preset,
        ``ns_steps < 1``, ...); at ``init`` for a spec without exactly two factor
        groups, naming the leaf's path, and for default roles whose head the
        shapes leave ambiguous (:func:`layerwise_optax.layer_roles`).

    Examples:
      The bare transform (no learning rate, no fallback): hidden matrices become
      ``U V^T`` times the shape scaling, other leaves pass through unchanged.

      >>> import jax, jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> params = {'w': jnp.ones((8, 32)), 'b': jnp.zeros(32)}
      >>> grads = {'w': jax.random.normal(jax.random.key(0), (8, 32)), 'b': jnp.ones(32)}
      >>> tx = lo.scale_by_muon(scaling='none', ns_coeffs='polar_express', ns_steps=8)
      >>> updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
      >>> s = jnp.linalg.svd(updates['w'], compute_uv=False)
      >>> bool(jnp.all(jnp.abs(s - 1) < 1e-3)), updates['b'].tolist() == grads['b'].tolist()
      (True, True)

    References:
      Jordan et al., `Muon: An optimizer for hidden layers in neural networks
      <https://kellerjordan.github.io/posts/muon/>`_, 2024.
      Bernstein and Newhouse, `Old Optimizer, New Norm: An Anthology
      <https://arxiv.org/abs/2409.20325>`_, 2024.
      Liu et al., `Muon is Scalable for LLM Training
      <https://arxiv.org/abs/2502.16982>`_, 2025 (``scaling='rms'``).
      Li et al., NorMuon: Making Muon more efficient and scalable, 2025 (the
      per-neuron second moment).
      Si, Zhang and Shen, `AdaMuon: Adaptive Muon Optimizer
      <https://arxiv.org/abs/2507.11005>`_, 2025 (``element_b2``).
    """
    cfg = _validate(**locals())  # every argument above, checked
    if dimension_numbers is None:
        dimension_numbers = _roles.dimension_numbers_for(roles, _roles.HIDDEN_ROLES)
    plans_for = functools.partial(_matrix_plans, dimension_numbers)

    def init_fn(params):
        plans = plans_for(params)  # validates the specs, naming paths
        return ScaleByMuonState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=cfg.mu_dtype),
            failures=_failure.zeros(),
            nu=(
                _axes.map_leaves(_init_nu, plans, params)
                if cfg.normuon
                else _axes.map_leaves(_init_element_nu, plans, params)
                if cfg.adamuon
                else None
            ),
        )

    def update_fn(updates, state, params=None):
        del params
        with jax.named_scope("layerwise_optax.muon"):
            plans = plans_for(updates)
            count_inc = _kron.increment(state.count)
            hp = _Hyper(
                *_checks.hyperparameters(beta, eps, rms, neuron_eps),
                neuron_b2=_checks.hyperparameters(neuron_b2)[0] if cfg.normuon else None,
            )
            if cfg.adamuon:
                b2_e, eps_e = _checks.hyperparameters(element_b2, element_eps)
                t = count_inc.astype(jnp.float32)
                hp = hp._replace(element_b2=b2_e, element_eps=eps_e, element_correction=1 - b2_e**t)

            def momentum(g, plan, mu):
                if plan.spec is None:
                    return None
                return _dual.momentum(g, mu, hp.beta, count_inc, cfg.nesterov, plan=plan)

            prepared = _axes.map_leaves(momentum, plans, updates, state.mu)
            polar = _dual.polar_factors(
                plans,
                prepared,
                cfg.coeffs,
                eps=hp.eps,
                ns_dtype=cfg.ns_dtype,
                distribute=cfg.distribute,
                method=cfg.ns_method,
                prescale=cfg.ns_prescale,
            )
            leaf = functools.partial(_leaf_step, cfg=cfg, hp=hp)
            nus = () if state.nu is None else (state.nu,)
            out = _axes.map_leaves(leaf, plans, updates, prepared, polar, state.mu, *nus)
            new_updates, mu, failures = _dual.collect(out, state.failures)
            return new_updates, ScaleByMuonState(
                count=count_inc,
                mu=mu,
                failures=failures,
                nu=None if state.nu is None else _axes.unzip(out, "nu"),
            )

    return optax.GradientTransformation(init_fn, update_fn)


def muon(
    learning_rate: optax.ScalarOrSchedule,
    ns_coeffs: str | Any = "standard",
    ns_steps: int | None = None,
    beta: jax.typing.ArrayLike = 0.95,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: optax.MaskOrFn = None,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    nesterov: bool = True,
    dimension_numbers: _axes.DimNumsOrFn | None = None,
    roles: _roles.RolesOrFn | None = None,
    scaling: Literal["width", "rms", "none"] = "width",
    rms: jax.typing.ArrayLike = 0.2,
    ns_dtype: jax.typing.DTypeLike | None = None,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: jax.typing.ArrayLike = 0.9,
    adam_b2: jax.typing.ArrayLike = 0.999,
    adam_weight_decay: optax.ScalarOrSchedule = 0.0,
    adam_mask: optax.MaskOrFn = None,
    neuron_b2: jax.typing.ArrayLike | None = None,
    distribute: bool = True,
    element_b2: jax.typing.ArrayLike | None = None,
    ns_method: Literal["auto", "standard", "gram"] = "auto",
    ns_prescale: Literal["frobenius", "aol"] = "frobenius",
) -> optax.GradientTransformation:
    r"""Muon (Jordan et al. 2024): orthogonalized momentum for matrices, AdamW elsewhere.

    For a matrix leaf ``W`` (fan-in × fan-out) with gradient ``G``:

    .. math::
      M_t = \beta M_{t-1} + (1 - \beta) G_t, \qquad
      W \leftarrow W - \eta\, s(W)\, \mathrm{NS}(\hat M_t) - \eta \lambda W,

    where ``\hat M_t`` is the bias-corrected (Nesterov by default) momentum,
    ``NS`` the Newton-Schulz approximation of the polar factor ``U V^T`` of its SVD
    (the steepest-descent direction under the spectral norm), and ``s(W)`` the
    shape scaling.

    Which leaves are matrices, and which matrix each one is, comes from
    :func:`layerwise_optax.layer_roles`: hidden ``matrix`` leaves of any ndim (a
    Flax kernel's input axes against its output axes, unit axes absorbed), ``conv``
    (window and input axes against the output axis) and ``stacked`` leaves (each
    leading index its own matrix). Embeddings, the output head (named so, or else
    found from the shapes: the one matrix fed by another layer that feeds none),
    biases, norm scales and scalars go to ``optax.adamw`` with
    ``adam_learning_rate`` (default: ``learning_rate``), as Muon's authors advise.
    A head the shapes leave ambiguous is a ``ValueError`` at ``init`` saying how to
    choose. See the roles with ``print(lo.format_roles(params))``; change them
    with ``roles=lambda p: lo.layer_roles(p, overrides={...})`` (or
    ``infer_head=False``) or pass ``dimension_numbers`` to decide per leaf
    yourself.

    With ``roles=lambda p: lo.layer_roles(p, infer_head=False)`` and leaves named
    as plain hidden matrices this is ``optax.contrib.muon`` (the tests check it to
    float32 round-off; optax decides by ``ndim`` instead of roles). What to tune: the learning rate (spectral
    steps: ~0.02 with ``scaling='width'``; with ``scaling='rms'`` use your AdamW
    rate), ``beta``, ``weight_decay``; ``ns_steps``/``ns_coeffs`` trade accuracy
    of ``U V^T`` for matmuls (``'polar_express'`` is the most accurate at 5 steps);
    ``ns_dtype=jnp.bfloat16`` halves their cost on accelerators.

    Args:
      learning_rate: Learning rate or schedule of the matrix leaves.
      ns_coeffs: Newton-Schulz preset name or coefficients (static).
      ns_steps: Newton-Schulz steps (static; ``None``: 5).
      beta: Momentum decay.
      eps: Norm epsilon (also AdamW's ``eps``).
      weight_decay: Decoupled weight decay of the matrix leaves.
      mask: Weight-decay mask of the matrix leaves.
      mu_dtype: Momentum storage dtype.
      nesterov: Nesterov momentum (both parts).
      dimension_numbers: Which leaves are matrices and how (see
        :func:`scale_by_muon`); overrides ``roles``.
      roles: Role tree or callable (default :func:`layerwise_optax.layer_roles`).
      scaling: ``'width'``, ``'rms'`` or ``'none'`` (see :func:`scale_by_muon`).
      rms: Target RMS for ``scaling='rms'``.
      ns_dtype: Newton-Schulz iteration dtype.
      adam_learning_rate: AdamW's learning rate; default ``learning_rate``.
      adam_b1: AdamW's ``b1``.
      adam_b2: AdamW's ``b2``.
      adam_weight_decay: AdamW's weight decay.
      adam_mask: AdamW's weight-decay mask.
      neuron_b2: NorMuon's per-neuron second-moment decay (``None``: Muon); see
        :func:`normuon`.
      distribute: Spread Newton-Schulz over the mesh's devices (see
        :func:`scale_by_muon`).
      element_b2: AdaMuon's element-wise second-moment decay (``None``: off; e.g.
        0.95 with ``scaling='rms'``, AdaMuon's setting); ``eps`` is added to its
        root. See :func:`scale_by_muon`.
      ns_method: ``'auto'``, ``'standard'`` or ``'gram'`` (Gram Newton-Schulz;
        see :func:`scale_by_muon`).
      ns_prescale: ``'frobenius'`` or ``'aol'`` (see :func:`scale_by_muon`).

    Returns:
      An :class:`optax.GradientTransformation` (an ``optax.partition`` of the two):
      ``state.inner_states['muon'].inner_state[0]`` is the :class:`ScaleByMuonState`;
      ``state.inner_states['adam'].inner_state[0]`` the guarded Adam's state, which
      skips (and counts) each leaf whose gradient is not finite.

    Raises:
      ValueError: At construction for an unknown preset or ``scaling``, a decay
        outside ``[0, 1)``, ``ns_steps < 1`` or a non-positive ``eps``; at ``init``
        for a ``dimension_numbers`` spec without exactly two factor groups and for
        default roles whose head the shapes leave ambiguous (naming the paths).

    Examples:
      With ``scaling='none'`` the update of a hidden matrix is ``-lr U V^T``: all
      its singular values are 1 (Polar Express coefficients, 8 steps; plain
      momentum, so that the first AdamW step below is simple):

      >>> import jax, jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> params = {'w': jnp.ones((16, 16)), 'head': jnp.ones((16, 3)), 'b': jnp.zeros(16)}
      >>> grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(0), p.shape), params)
      >>> tx = lo.muon(1.0, scaling='none', ns_coeffs='polar_express', ns_steps=8,
      ...              nesterov=False)
      >>> updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
      >>> s = jnp.linalg.svd(-updates['w'], compute_uv=False)
      >>> bool(jnp.all(jnp.abs(s - 1) < 1e-3))
      True

      ``head`` (named so) and ``b`` went to AdamW, whose first step is ``-lr`` times
      the sign of the gradient:

      >>> bool(jnp.allclose(updates['b'], -jnp.sign(grads['b']), atol=1e-5))
      True

    References:
      Jordan et al., `Muon: An optimizer for hidden layers in neural networks
      <https://kellerjordan.github.io/posts/muon/>`_, 2024.
      Bernstein and Newhouse, `Old Optimizer, New Norm: An Anthology
      <https://arxiv.org/abs/2409.20325>`_, 2024.
      Liu et al., `Muon is Scalable for LLM Training
      <https://arxiv.org/abs/2502.16982>`_, 2025 (``scaling='rms'``).

    .. seealso:: :func:`layerwise_optax.normuon`, :func:`layerwise_optax.scale_by_muon`,
      :func:`layerwise_optax.steepest_descent`
    """
    _checks.alias_args(learning_rate, weight_decay, mask)
    if adam_learning_rate is not None:
        _checks.non_negative("adam_learning_rate", adam_learning_rate)
    _checks.alias_args(0.0, adam_weight_decay, adam_mask, prefix="adam_")
    _checks.in_unit_interval("adam_b1", adam_b1)
    _checks.in_unit_interval("adam_b2", adam_b2)
    inner = scale_by_muon(
        ns_coeffs,
        ns_steps,
        beta,
        eps,
        mu_dtype,
        nesterov=nesterov,
        dimension_numbers=dimension_numbers,
        roles=roles,
        scaling=scaling,
        rms=rms,
        ns_dtype=ns_dtype,
        neuron_b2=neuron_b2,
        neuron_eps=eps,
        distribute=distribute,
        element_b2=element_b2,
        element_eps=eps,
        ns_method=ns_method,
        ns_prescale=ns_prescale,
    )
    return _dual.matrices_and_adam(
        "muon",
        inner,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        mask=mask,
        dimension_numbers=dimension_numbers,
        roles=roles,
        adam_learning_rate=adam_learning_rate,
        adam_b1=adam_b1,
        adam_b2=adam_b2,
        eps=eps,
        adam_weight_decay=adam_weight_decay,
        adam_mask=adam_mask,
        mu_dtype=mu_dtype,
        nesterov=nesterov,
    )


def normuon(
    learning_rate: optax.ScalarOrSchedule,
    ns_coeffs: str | Any = "standard",
    ns_steps: int | None = None,
    beta: jax.typing.ArrayLike = 0.95,
    b2: jax.typing.ArrayLike = 0.95,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: optax.MaskOrFn = None,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    nesterov: bool = True,
    dimension_numbers: _axes.DimNumsOrFn | None = None,
    roles: _roles.RolesOrFn | None = None,
    rms: jax.typing.ArrayLike = 0.2,
    ns_dtype: jax.typing.DTypeLike | None = None,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: jax.typing.ArrayLike = 0.9,
    adam_b2: jax.typing.ArrayLike = 0.999,
    adam_weight_decay: optax.ScalarOrSchedule = 0.0,
    adam_mask: optax.MaskOrFn = None,
    distribute: bool = True,
    ns_method: Literal["auto", "standard", "gram"] = "auto",
    ns_prescale: Literal["frobenius", "aol"] = "frobenius",
) -> optax.GradientTransformation:
    r"""NorMuon (Li et al. 2025): Muon with a per-neuron second moment, AdamW elsewhere.

    Orthogonalization equalizes a matrix update's singular values but not its
    rows: after it some output neurons still get much larger updates than others.
    NorMuon keeps, per output neuron ``j`` (a column of a Flax ``(in, out)``
    kernel), an EMA of the mean squared orthogonalized update,

    .. math::
      O_t = \mathrm{NS}(\hat M_t),\quad
      v_{t,j} = b_2 v_{t-1,j} + (1 - b_2)\,\mathrm{mean}_i O_{t,ij}^2,\quad
      \hat O_{t,ij} = O_{t,ij} / (\sqrt{v_{t,j}} + \epsilon),

    and applies ``\hat O_t`` rescaled to RMS ``rms`` (0.2, AdamW's typical update
    RMS, so AdamW learning rates transfer). It is :func:`scale_by_muon` with
    ``neuron_b2=b2, scaling='rms'``; every other argument is :func:`muon`'s.
    Memory: one float per output neuron beyond Muon.

    Args:
      learning_rate: Learning rate of the matrix leaves (an AdamW-like rate).
      ns_coeffs: Newton-Schulz preset name or coefficients (static).
      ns_steps: Newton-Schulz steps (static; ``None``: 5).
      beta: Momentum decay.
      b2: Decay of the per-neuron second moment.
      eps: Norm epsilon (also AdamW's ``eps`` and NorMuon's).
      weight_decay: Decoupled weight decay of the matrix leaves.
      mask: Weight-decay mask of the matrix leaves.
      mu_dtype: Momentum storage dtype.
      nesterov: Nesterov momentum.
      dimension_numbers: Which leaves are matrices (see :func:`scale_by_muon`).
      roles: Role tree or callable (default :func:`layerwise_optax.layer_roles`).
      rms: Update RMS of the matrix leaves.
      ns_dtype: Newton-Schulz iteration dtype.
      adam_learning_rate: AdamW's learning rate; default ``learning_rate``.
      adam_b1: AdamW's ``b1``.
      adam_b2: AdamW's ``b2``.
      adam_weight_decay: AdamW's weight decay.
      adam_mask: AdamW's weight-decay mask.
      distribute: Spread Newton-Schulz over the mesh's devices.
      ns_method: ``'auto'``, ``'standard'`` or ``'gram'`` (see :func:`scale_by_muon`).
      ns_prescale: ``'frobenius'`` or ``'aol'`` (see :func:`scale_by_muon`).

    Returns:
      An :class:`optax.GradientTransformation`, laid out as :func:`muon`'s.

    Raises:
      ValueError: As :func:`muon`, and for ``b2`` outside ``[0, 1)``.

    Examples:
      Each matrix leaf's update has RMS ``lr * rms`` (0.2 by default), like an
      AdamW step, whatever the gradient's scale:

      >>> import jax, jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> params = {'w': jnp.ones((16, 16)), 'head': jnp.ones((16, 3))}
      >>> noise = lambda p: 1e3 * jax.random.normal(jax.random.key(0), p.shape)
      >>> grads = jax.tree.map(noise, params)
      >>> tx = lo.normuon(learning_rate=1.0)
      >>> updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
      >>> round(float(jnp.sqrt(jnp.mean(updates['w'] ** 2))), 3)
      0.2

    References:
      Jordan et al., `Muon: An optimizer for hidden layers in neural networks
      <https://kellerjordan.github.io/posts/muon/>`_, 2024.
      Bernstein and Newhouse, `Old Optimizer, New Norm: An Anthology
      <https://arxiv.org/abs/2409.20325>`_, 2024.
      Liu et al., `Muon is Scalable for LLM Training
      <https://arxiv.org/abs/2502.16982>`_, 2025 (``scaling='rms'``).
      Li et al., NorMuon: Making Muon more efficient and scalable, 2025 (the
      per-neuron second moment).

    .. seealso:: :func:`layerwise_optax.muon`
    """
    _checks.in_unit_interval("b2", b2)  # named as normuon's caller knows it
    return muon(
        learning_rate,
        ns_coeffs,
        ns_steps,
        beta,
        eps,
        weight_decay,
        mask,
        mu_dtype,
        nesterov=nesterov,
        dimension_numbers=dimension_numbers,
        roles=roles,
        scaling="rms",
        rms=rms,
        ns_dtype=ns_dtype,
        adam_learning_rate=adam_learning_rate,
        adam_b1=adam_b1,
        adam_b2=adam_b2,
        adam_weight_decay=adam_weight_decay,
        adam_mask=adam_mask,
        neuron_b2=b2,
        distribute=distribute,
        ns_method=ns_method,
        ns_prescale=ns_prescale,
    )
