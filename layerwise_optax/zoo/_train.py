"""Methods and training loops for the zoo's problems.

Every method is an optax transform applied to a Flax NNX model through one loop,
so the paper's baselines and the library's optimizers are compared on equal
terms. A :class:`Method` says what the transform needs besides gradients:
K-FAC statistics from :func:`layerwise_optax.flax.kfac_value_and_grad`, the full
Gauss-Newton matrix (the NGD baseline), an input batch-norm, or the
alternating-minimization form (head refit by least squares before each step).

The loops are pure functions of a PRNG key, ``lax.scan`` over steps and compiled
once per method (learning rate, task and key are traced), so sweeps over
learning rates, seeds and condition numbers reuse one executable and a run makes
one host transfer, at its end. Sweeps run one configuration at a time rather
than under ``vmap``: batched LAPACK calls on CPU can deadlock on small machines
(see :mod:`layerwise_optax._linalg`). Run them inside
:func:`layerwise_optax.zoo._experiments.serial_blas` (the experiment runners do):
with OpenBLAS's default threads each LAPACK call of a step costs tens of
milliseconds on a 2-core machine.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import layerwise_optax as lo
from layerwise_optax import _optional, linalg
from layerwise_optax import flax as lof
from layerwise_optax.zoo import _linear_rep as lr_
from layerwise_optax.zoo import _single_index as si_

if TYPE_CHECKING:  # the checker reads flax itself; at run time a missing extra is named
    from flax import nnx
else:
    nnx = _optional.require("flax.nnx", "layerwise_optax.zoo", extra="zoo")


def full_gauss_newton(
    learning_rate: jax.typing.ArrayLike, damping: jax.typing.ArrayLike = 1e-2
) -> optax.GradientTransformationExtraArgs:
    """Damped full Gauss-Newton step on all parameters jointly (the NGD baseline).

    ``update(grads, state, params, gauss_newton=M)`` returns ``-lr (M + damping
    I)^{-1} g`` with ``g`` the gradient flattened by ``jax.flatten_util.ravel_pytree``
    and ``M`` the ``(P, P)`` Gauss-Newton matrix in the same order (see
    :func:`gauss_newton_matrix`). Only sensible for small models.

    Args:
      learning_rate: Step size.
      damping: Ridge added to ``M`` (needed: the two-layer linear net's
        Gauss-Newton matrix is singular).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.
    """
    if isinstance(damping, (int, float)) and damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping!r}.")

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, gauss_newton=None, **extra):
        del params, extra
        if gauss_newton is None:
            raise ValueError("full_gauss_newton needs update(..., gauss_newton=matrix).")
        flat, unravel = ravel_pytree(updates)
        m = gauss_newton + damping * jnp.eye(flat.shape[0], dtype=gauss_newton.dtype)
        step = linalg.one_at_a_time_on_cpu(jnp.linalg.solve, m, flat.astype(m.dtype)[:, None])[:, 0]
        return unravel((-(step * learning_rate)).astype(flat.dtype)), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gauss_newton_matrix(model: nnx.Module, x: jax.Array) -> jax.Array:
    """``J^T J / n`` of the model's outputs w.r.t. its ``nnx.Param`` leaves (squared error).

    The parameter order is ``ravel_pytree`` of ``nnx.state(model, nnx.Param)``, the
    order :func:`full_gauss_newton` uses for the gradients.

    For a :class:`~layerwise_optax.zoo.LinearRepModel` ``f(x) = F G x`` the matrix is
    assembled from its Kronecker blocks (``vec`` column-major, which is
    ``ravel_pytree``'s row-major order of the kernels ``F^T``, ``G^T``)::

        [[Sz ⊗ I,        (G Sx) ⊗ F  ],
         [(G Sx)^T ⊗ F^T, Sx ⊗ (F^T F)]]   with Sx = X^T X / n, Sz = G Sx G^T

    (``X`` batch-standardized for the batch-norm variant), in ``O(n d_x^2 + P^2)``
    instead of the ``O(n d_y P^2)`` of forming ``J``; any other model goes through
    ``jax.jacfwd``. Both give the same matrix up to float round-off (tested).

    Args:
      model: The model.
      x: A batch of inputs, ``(n, ...)``.

    Returns:
      The ``(P, P)`` Gauss-Newton matrix, ``P`` the number of parameters.
    """
    if isinstance(model, lr_.LinearRepModel):
        return _linear_rep_gauss_newton(model, x)
    return _autodiff_gauss_newton(model, x)


def _linear_rep_gauss_newton(model: lr_.LinearRepModel, x: jax.Array) -> jax.Array:
    if model.batch_norm:
        x = lr_.standardize(x)
    g, f = model.g.kernel[...].T, model.f.kernel[...].T  # (k, d_x), (d_y, k)
    s_x = lr_._mm(x.T, x) / x.shape[0]
    g_sx = lr_._mm(g, s_x)
    s_z = lr_._mm(g_sx, g.T)
    cross = jnp.kron(g_sx, f)  # (k d_y, d_x k)
    top = jnp.concatenate([jnp.kron(s_z, jnp.eye(f.shape[0], dtype=f.dtype)), cross], axis=1)
    bottom = jnp.concatenate([cross.T, jnp.kron(s_x, lr_._mm(f.T, f))], axis=1)
    return jnp.concatenate([top, bottom], axis=0)


def _autodiff_gauss_newton(model: nnx.Module, x: jax.Array) -> jax.Array:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat, unravel = ravel_pytree(params)

    def outputs(f):
        return jnp.reshape(nnx.merge(graphdef, unravel(f), rest)(x), (-1,))

    jac = jax.jacfwd(outputs)(flat)
    return jnp.matmul(jac.T, jac, precision=jax.lax.Precision.HIGHEST) / x.shape[0]


@dataclasses.dataclass(frozen=True)
class Method:
    """A training method: an optax transform and what it needs besides gradients.

    Attributes:
      name: Short identifier (used in JSON records and on the command line).
      label: Legend label.
      optimizer: ``learning_rate -> optax transform``.
      learning_rates: The tuning grid.
      statistics: ``None`` or the capture mode for K-FAC statistics
        (``'empirical'``, ``'fisher'``, ``'gauss_newton'``), passed as ``kfac_stats``.
      full_gauss_newton: Pass the full Gauss-Newton matrix as ``gauss_newton``.
      batch_norm: Train the batch-norm variant of the model.
      head: ``'joint'`` (all layers step together) or ``'least_squares'``
        (alternating min-descent: the head is refit exactly on each batch, then
        only the representation steps).
    """

    name: str
    label: str
    optimizer: Callable[[Any], optax.GradientTransformation]
    learning_rates: tuple[float, ...]
    statistics: Literal["empirical", "fisher", "gauss_newton"] | None = None
    full_gauss_newton: bool = False
    batch_norm: bool = False
    head: Literal["joint", "least_squares"] = "joint"


def _kfac_paper(lr, sides: Literal["both", "input", "output"] = "both"):
    # The paper's stylized update: current-batch factors, absolute damping 1e-3, no momentum.
    return lo.kfac(
        lr, momentum=0.0, factor_decay=0.0, damping=1e-3, damping_mode="absolute", sides=sides
    )


SGD_GRID = (0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4)
ADAM_GRID = (0.1, 0.03, 0.01, 3e-3)
DFW_GRID = (0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3)

LINEAR_REP_METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("sgd", "SGD", optax.sgd, SGD_GRID),
        Method("adam", "Adam", optax.adam, ADAM_GRID),
        Method("batchnorm", "SGD + input batch-norm", optax.sgd, SGD_GRID, batch_norm=True),
        Method(
            "dfw",
            "DFW-style (P=I, Q=Σ̂)",
            functools.partial(_kfac_paper, sides="input"),
            DFW_GRID,
            statistics="empirical",
        ),
        Method("kfac", "K-FAC", _kfac_paper, (1.0, 0.5, 0.3), statistics="gauss_newton"),
        Method(
            "ngd",
            "NGD (full Gauss-Newton)",
            full_gauss_newton,
            (1.0, 0.5, 0.3, 0.1),
            full_gauss_newton=True,
        ),
        Method("shampoo", "Shampoo (library)", lo.shampoo, ADAM_GRID),
        Method("soap", "SOAP (library)", lo.soap, ADAM_GRID),
    )
}
"""Joint-training methods of the linear representation experiments (Fig. 1)."""

AMD_METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("sgd", "AMD + SGD", optax.sgd, SGD_GRID, head="least_squares"),
        Method(
            "dfw",
            "AMD + DFW (P=I, Q=Σ̂)",
            functools.partial(_kfac_paper, sides="input"),
            DFW_GRID,
            statistics="empirical",
            head="least_squares",
        ),
        Method(
            "kfac",
            "AMD + K-FAC",
            _kfac_paper,
            (1.0, 0.5, 0.3),
            statistics="gauss_newton",
            head="least_squares",
        ),
    )
}
"""Alternating min-descent methods (head = least squares) of the head-conditioning sweep."""


def _is_head(path) -> bool:
    return str(getattr(path[0], "key", path[0])) == "f"


@functools.cache
def linear_rep_trainer(
    method: Method, *, steps: int, batch_size: int, d_x: int, k: int, d_y: int
) -> Callable[..., dict[str, jax.Array]]:
    """A compiled ``run(problem, learning_rate, key) -> metrics`` for one method.

    Args:
      method: The method.
      steps: Number of iterations.
      batch_size: Fresh samples per iteration.
      d_x: Input dimension.
      k: Representation width.
      d_y: Output dimension.

    Returns:
      A jitted function returning ``{'train_loss', 'distance', 'transfer_loss'}``,
      each ``(steps + 1,)`` (index 0 is the initialization).
    """
    lr_.check_sizes(steps=steps, batch_size=batch_size)
    capture = (
        lof.kfac_value_and_grad(lambda m, x: m(x), "mse", statistics=method.statistics)
        if method.statistics
        else None
    )

    @jax.jit
    def run(problem: lr_.LinearRepProblem, learning_rate, key):
        k_init, k_data, k_eval = jax.random.split(key, 3)
        model = lr_.LinearRepModel(d_x, k, d_y, batch_norm=method.batch_norm, rngs=nnx.Rngs(k_init))
        graphdef, params = nnx.split(model, nnx.Param)
        # Plain arrays at the leaves, as nnx.Optimizer hands them to optax.
        params = nnx.as_pure(params)
        tx = optax.with_extra_args_support(method.optimizer(learning_rate))
        opt_state = tx.init(params)

        # Fixed along the run, so sampled once, outside the loop.
        transfer_fit = lr_.transfer_sample(problem, k_eval)

        def metrics(params):
            m = nnx.merge(graphdef, params)
            g = m.representation(problem.sigma)
            return {
                "train_loss": lr_.train_loss(problem, m.head(), g),
                "distance": lr_.subspace_distance(g, problem.g_star),
                "transfer_loss": lr_.transfer_loss_on(problem, g, transfer_fit),
            }

        def step(carry, key):
            params, opt_state = carry
            x, y = lr_.sample_linear_rep(problem, key, batch_size)
            m = nnx.merge(graphdef, params)
            if method.head == "least_squares":
                z = m.g(lr_.standardize(x) if method.batch_norm else x)
                m.f.kernel[...] = lr_.least_squares_head(z, y).T
                params = nnx.as_pure(nnx.state(m, nnx.Param))
            extra = {}
            if capture is not None:
                _, grads, extra["kfac_stats"] = capture(m, x, y)
            else:
                grads = nnx.grad(lambda m: lof.mse(m(x), y))(m)
            grads = nnx.as_pure(grads)
            if method.full_gauss_newton:
                extra["gauss_newton"] = gauss_newton_matrix(m, x)
            updates, opt_state = tx.update(grads, opt_state, params, **extra)
            if method.head == "least_squares":
                updates = jax.tree_util.tree_map_with_path(
                    lambda p, u: jnp.zeros_like(u) if _is_head(p) else u, updates
                )
            params = optax.apply_updates(params, updates)
            return (params, opt_state), metrics(params)

        first = metrics(params)
        _, history = jax.lax.scan(step, (params, opt_state), jax.random.split(k_data, steps))
        return jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, history)

    return run


def hitting_time(curve, target: float) -> float:
    """First index where ``curve <= target`` (``inf`` if never).

    Args:
      curve: A 1-D sequence of values (e.g. the subspace distance per iteration).
      target: The threshold.

    Returns:
      The first index as a float, or ``inf`` when the curve never reaches it.

    Examples:
      >>> from layerwise_optax import zoo
      >>> zoo.hitting_time([1.0, 0.5, 0.05, 0.2], 0.1), zoo.hitting_time([1.0], 0.1)
      (2.0, inf)
    """
    hits = np.flatnonzero(np.asarray(curve) <= target)
    return float(hits[0]) if hits.size else float("inf")


SINGLE_INDEX_METHODS = ("sgd", "kfac", "adam", "batchnorm")
SINGLE_INDEX_LABELS = {
    "sgd": "SGD",
    "kfac": "K-FAC (Σ̂ whitening)",
    "adam": "Adam (first step)",
    "batchnorm": "SGD + input batch-norm",
}


@functools.cache
def single_index_direction(
    method: str, *, n: int, d: int, width: int, damping: float = 1e-2
) -> Callable[..., dict[str, jax.Array]]:
    """A compiled ``direction(problem, key) -> {'w0', 'direction', 'scale'}``.

    The direction ``D`` is minus the method's first update with learning rate 1,
    from the Flax model's gradient on ``n`` samples: SGD ``grad``; Adam's first
    step ``grad / (|grad| + eps)``; K-FAC ``grad (Sigma_hat + damping I)^{-1}``
    (:func:`layerwise_optax.kfac` with ``sides='input'`` fed by the capture);
    batch-norm: SGD on per-coordinate standardized inputs. ``w0`` and ``direction``
    are in the paper's ``(N, d)`` layout and in model coordinates; multiply columns
    by ``scale`` (the batch-norm input scaling, ones otherwise) to map to inputs.

    Args:
      method: ``'sgd'``, ``'adam'``, ``'kfac'`` or ``'batchnorm'``.
      n: Number of samples of the step.
      d: Input dimension.
      width: Hidden width ``N``.
      damping: K-FAC's ridge ``damping`` (absolute).

    Returns:
      A jitted ``direction(problem, key)`` returning ``w0``, ``direction`` (both
      ``(N, d)``) and ``scale`` (``(d,)``).

    Raises:
      ValueError: For an unknown method.
    """
    if method not in SINGLE_INDEX_METHODS:
        raise ValueError(f"Unknown method {method!r}; expected one of {SINGLE_INDEX_METHODS}.")
    txs = {
        "sgd": lambda: optax.sgd(1.0),
        "batchnorm": lambda: optax.sgd(1.0),
        "adam": lambda: optax.adam(1.0),
        "kfac": lambda: lo.kfac(
            1.0,
            momentum=0.0,
            factor_decay=0.0,
            damping=damping,
            damping_mode="absolute",
            sides="input",
        ),
    }
    capture = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")

    @jax.jit
    def direction(problem: si_.SingleIndexProblem, key):
        k_init, k_data = jax.random.split(key)
        model = si_.TwoLayerNet(d, width, batch_norm=method == "batchnorm", rngs=nnx.Rngs(k_init))
        x, y = si_.sample_single_index(problem, k_data, n)
        _, grads, stats = capture(model, x, y)
        params, grads = nnx.as_pure(nnx.state(model, nnx.Param)), nnx.as_pure(grads)
        tx = optax.with_extra_args_support(txs[method]())
        updates, _ = tx.update(grads, tx.init(params), params, kfac_stats=stats)
        updates = cast(dict[str, Any], updates)  # the model's {'first': ..., ...} tree
        scale = si_.input_scale(x) if method == "batchnorm" else jnp.ones((d,))
        return {
            "w0": model.first.kernel[...].T,
            "direction": -updates["first"]["kernel"].T,
            "scale": scale,
        }

    return direction
