"""Linear representation learning (Zhang et al., ICML 2025): data, model and metrics.

The task: ``y = F_star G_star x + eps`` with a shared ``k``-dimensional
representation ``G_star`` (orthonormal rows, ``k × d_x``), a head ``F_star``
(``d_y × k``) and anisotropic inputs ``x = Sigma^{1/2} r``, ``r`` Rademacher (or
Gaussian), ``Sigma = U diag(lambda) U^T`` with ``U`` Haar-random and ``lambda``
log-spaced in ``[1, kappa]``. Keeping ``lambda_min = 1`` keeps the statistical
noise floor the same at every ``kappa``, so that runs at different ``kappa`` compare.

The model is the two-layer linear network ``f(x) = F G x`` as Flax NNX layers
(``nnx.Linear`` kernels are ``G^T`` and ``F^T``), optionally with a parameter-free
batch-norm on its inputs (the batch-norm baseline).

Metrics are population values, computed in closed form from the problem (both
input distributions have covariance exactly ``Sigma``), so curves carry no
evaluation noise:

* training loss ``1/2 E||y - F G x||^2 = 1/2 tr(E Sigma E^T) + d_y sigma^2 / 2``
  with ``E = F G - F_star G_star`` (floor ``d_y sigma^2 / 2``);
* subspace distance ``||(I - U_star U_star^T) U||_2`` between the row spaces of
  ``G`` and ``G_star`` (``sin`` of the largest principal angle, in ``[0, 1]``);
* transfer loss: a new task shares ``G_star`` but has its own head and isotropic
  inputs; the head on top of the learned ``G`` is refit by least squares on a few
  noisy samples, and the loss is ``||F_hat G - F_transfer G_star||_F^2`` (the mean
  squared error on noiseless test inputs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, TypeGuard

import jax
import jax.numpy as jnp

from layerwise_optax import _optional, linalg

if TYPE_CHECKING:  # the checker reads flax itself; at run time a missing extra is named
    from flax import nnx
else:
    nnx = _optional.require("flax.nnx", "layerwise_optax.zoo", extra="zoo")

HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a, b):
    return jnp.matmul(a, b, precision=HIGHEST)


def _is_number(v) -> TypeGuard[int | float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_sizes(**sizes: int) -> None:
    """Raises ``ValueError`` unless every size is a Python int ``>= 1``."""
    for name, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}.")


def check_condition_number(name: str, value) -> None:
    """Raises ``ValueError`` for a plain-number condition number below 1."""
    if _is_number(value) and not value >= 1:
        raise ValueError(f"{name} must be >= 1 (a condition number), got {value!r}.")


def haar_orthogonal(key: jax.Array, d: int, dtype=jnp.float32) -> jax.Array:
    """A Haar-distributed ``d × d`` orthogonal matrix (QR of a Gaussian, signs fixed)."""
    q, r = jnp.linalg.qr(jax.random.normal(key, (d, d), dtype))
    return q * jnp.sign(jnp.diagonal(r))[None, :]


def log_spectrum(kappa: jax.typing.ArrayLike, d: int, dtype=jnp.float32) -> jax.Array:
    """``kappa ** (i / (d - 1))`` for ``i = 0..d-1``: log-spaced in ``[1, kappa]``."""
    t = jnp.arange(d, dtype=dtype) / max(d - 1, 1)
    return jnp.asarray(kappa, dtype) ** t


def orthonormal_rows(key: jax.Array, rows: int, cols: int, dtype=jnp.float32) -> jax.Array:
    """A ``rows × cols`` matrix with orthonormal rows (``rows <= cols``), Haar-random."""
    q, _ = jnp.linalg.qr(jax.random.normal(key, (cols, rows), dtype))
    return q.T


class LinearRepProblem(NamedTuple):
    """One instance of the linear representation task (a pytree of arrays).

    Attributes:
      sigma: Training input covariance ``Sigma_x``, ``(d_x, d_x)``.
      sigma_sqrt: Its symmetric square root.
      g_star: True representation, orthonormal rows, ``(k, d_x)``.
      f_star: Training head, ``(d_y, k)``.
      f_transfer: Head of the transfer task, ``(d_y, k)``.
      noise: Label noise standard deviation (scalar).
    """

    sigma: jax.Array
    sigma_sqrt: jax.Array
    g_star: jax.Array
    f_star: jax.Array
    f_transfer: jax.Array
    noise: jax.Array


def linear_rep_problem(
    key: jax.Array,
    *,
    d_x: int = 50,
    d_y: int = 10,
    k: int = 5,
    kappa: jax.typing.ArrayLike = 1.0,
    kappa_f: jax.typing.ArrayLike | None = None,
    noise: jax.typing.ArrayLike = 0.1,
) -> LinearRepProblem:
    """Samples a linear representation learning task (the experiments' settings by default).

    Args:
      key: PRNG key; the task is a pure function of it and the settings.
      d_x: Input dimension.
      d_y: Output dimension (``>= k``, so the head can have full column rank).
      k: Representation dimension (``<= d_x``).
      kappa: Condition number of ``Sigma_x`` (eigenvalues log-spaced in
        ``[1, kappa]``); may be traced.
      kappa_f: ``None``: ``F_star`` has i.i.d. standard normal entries. A number:
        ``F_star = U diag(s) V^T`` with Haar ``U, V`` and singular values ``s``
        log-spaced in ``[1, kappa_f]`` (the head-conditioning sweep).
      noise: Label noise standard deviation.

    Returns:
      A :class:`LinearRepProblem`.

    Raises:
      ValueError: For sizes below 1, ``k > d_x``, ``k > d_y`` or a condition number
        below 1.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from layerwise_optax import zoo
      >>> problem = zoo.linear_rep_problem(jax.random.key(0), d_x=8, d_y=3, k=2, kappa=100.0)
      >>> round(float(jnp.linalg.cond(problem.sigma)))
      100
      >>> x, y = zoo.sample_linear_rep(problem, jax.random.key(1), 5)
      >>> x.shape, y.shape
      ((5, 8), (5, 3))

      The true factors reach the noise floor ``d_y sigma^2 / 2`` and distance 0:

      >>> round(float(zoo.train_loss(problem, problem.f_star, problem.g_star)), 6)
      0.015
      >>> round(float(zoo.subspace_distance(problem.g_star, problem.g_star)), 6)
      0.0
    """
    check_sizes(d_x=d_x, d_y=d_y, k=k)
    if k > d_x:
        raise ValueError(
            f"k must be <= d_x (a k-dimensional subspace of R^d_x), got k={k}, d_x={d_x}."
        )
    if k > d_y:
        raise ValueError(
            f"k must be <= d_y (the head needs full column rank), got k={k}, d_y={d_y}."
        )
    check_condition_number("kappa", kappa)
    if kappa_f is not None:
        check_condition_number("kappa_f", kappa_f)
    if _is_number(noise) and noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}.")
    ku, kg, kf, kt, kfu, kfv = jax.random.split(key, 6)
    u = haar_orthogonal(ku, d_x)
    lam = log_spectrum(kappa, d_x)
    sigma = _mm(u * lam[None, :], u.T)
    sigma_sqrt = _mm(u * jnp.sqrt(lam)[None, :], u.T)
    if kappa_f is None:
        f_star = jax.random.normal(kf, (d_y, k))
    else:
        uf = haar_orthogonal(kfu, d_y)[:, :k]
        vf = haar_orthogonal(kfv, k)
        f_star = _mm(uf * log_spectrum(kappa_f, k)[None, :], vf.T)
    return LinearRepProblem(
        sigma=sigma,
        sigma_sqrt=sigma_sqrt,
        g_star=orthonormal_rows(kg, k, d_x),
        f_star=f_star,
        f_transfer=jax.random.normal(kt, (d_y, k)),
        noise=jnp.asarray(noise, jnp.float32),
    )


def sample_linear_rep(
    problem: LinearRepProblem, key: jax.Array, n: int, *, inputs: str = "rademacher"
) -> tuple[jax.Array, jax.Array]:
    """Draws ``n`` training examples ``(x, y)``, shapes ``(n, d_x)`` and ``(n, d_y)``.

    Args:
      problem: The task.
      key: PRNG key.
      n: Number of examples.
      inputs: ``'rademacher'`` (``Sigma^{1/2} r``, ``r`` uniform on ``{±1}^d``, as
        in the paper's experiments) or ``'gaussian'``.

    Returns:
      Inputs and noisy labels.
    """
    check_sizes(n=n)
    if inputs not in ("rademacher", "gaussian"):
        raise ValueError(f"Unknown inputs {inputs!r}; expected 'gaussian' or 'rademacher'.")
    d_x = problem.sigma.shape[-1]
    kx, ke = jax.random.split(key)
    if inputs == "rademacher":
        r = jax.random.rademacher(kx, (n, d_x), jnp.float32)
    else:
        r = jax.random.normal(kx, (n, d_x))
    x = _mm(r, problem.sigma_sqrt)
    m = _mm(problem.f_star, problem.g_star)
    y = _mm(x, m.T) + problem.noise * jax.random.normal(ke, (n, m.shape[0]))
    return x, y


def subspace_distance(g: jax.Array, g_star: jax.Array) -> jax.Array:
    """``||(I - P_star) U||_2``: sine of the largest principal angle between row spaces.

    Args:
      g: ``(k, d)`` learned representation (any full-rank rows).
      g_star: ``(k_star, d)`` true representation with orthonormal rows.

    Returns:
      Scalar in ``[0, 1]``.
    """
    # U: orthonormal basis of row(G) by QR (stable for ill-conditioned G, unlike a
    # Gram-matrix inverse root in float32).
    # LAPACK calls go one matrix at a time on CPU (see linalg.one_at_a_time_on_cpu):
    # this metric runs under vmap over seeds and learning rates.
    u, _ = linalg.one_at_a_time_on_cpu(jnp.linalg.qr, g.astype(jnp.float32).T)
    resid = u - _mm(g_star.T, _mm(g_star, u))  # (I - P_star) U
    top = linalg.one_at_a_time_on_cpu(lambda r: jnp.linalg.svd(r, compute_uv=False), resid)[0]
    return jnp.clip(top, 0.0, 1.0)


def least_squares_head(z: jax.Array, y: jax.Array, ridge: float = 1e-6) -> jax.Array:
    """``argmin_F ||y - z F^T||^2`` (tiny ridge for safety), returned as ``(d_y, k)``.

    Args:
      z: ``(n, k)`` features.
      y: ``(n, d_y)`` targets.
      ridge: Added to the diagonal of ``z^T z`` relative to its mean eigenvalue.

    Returns:
      The head ``F`` in the paper's ``(d_y, k)`` layout.

    Examples:
      >>> import jax.numpy as jnp
      >>> from layerwise_optax import zoo
      >>> z = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
      >>> zoo.least_squares_head(z, z @ jnp.array([[2.0], [-1.0]])).round(4).tolist()
      [[2.0, -1.0]]
    """
    gram = _mm(z.T, z)
    scale = jnp.trace(gram) / gram.shape[0]
    reg = gram + ridge * (scale + 1e-12) * jnp.eye(gram.shape[0], dtype=gram.dtype)
    return linalg.one_at_a_time_on_cpu(jnp.linalg.solve, reg, _mm(z.T, y)).T


def train_loss(problem: LinearRepProblem, f: jax.Array, g: jax.Array) -> jax.Array:
    """Population training loss ``1/2 E||y - F G x||^2`` (paper layouts ``(d_y,k)``, ``(k,d_x)``).

    Args:
      problem: The task (its ``Sigma``, ``F_star G_star`` and noise level).
      f: The head ``F``, ``(d_y, k)``.
      g: The representation ``G``, ``(k, d_x)``.

    Returns:
      A scalar, in closed form (no sampling); its floor is ``d_y sigma^2 / 2``.
    """
    e = _mm(f, g) - _mm(problem.f_star, problem.g_star)
    d_y = e.shape[0]
    return 0.5 * jnp.sum(_mm(e, problem.sigma) * e) + 0.5 * d_y * problem.noise**2


def transfer_loss(
    problem: LinearRepProblem, g: jax.Array, key: jax.Array, n_fit: int = 30
) -> jax.Array:
    """Transfer-task loss of representation ``g`` after a least-squares head refit.

    The transfer task has isotropic Rademacher inputs and head ``f_transfer``; the
    head is fit on ``n_fit`` noisy samples drawn from ``key`` (keep ``key`` fixed
    along a run so the curve tracks ``g`` only).

    Args:
      problem: The task (its transfer head and ``G_star``).
      g: The learned representation ``(k, d_x)``.
      key: PRNG key of the refit's samples.
      n_fit: Number of samples the head is refit on.

    Returns:
      The mean squared error on noiseless inputs,
      ``||F_hat G - F_transfer G_star||_F^2``.
    """
    return transfer_loss_on(problem, g, transfer_sample(problem, key, n_fit))


def transfer_sample(
    problem: LinearRepProblem, key: jax.Array, n_fit: int = 30
) -> tuple[jax.Array, jax.Array]:
    """The transfer task's head-fitting samples ``(x, y)``, ``(n_fit, d_x)`` and ``(n_fit, d_y)``.

    Drawn once per run by the trainers (the key is fixed along a run), so a
    compiled loop samples them outside its step.
    """
    kx, ke = jax.random.split(key)
    d_x = problem.g_star.shape[-1]
    x = jax.random.rademacher(kx, (n_fit, d_x), jnp.float32)
    m = _mm(problem.f_transfer, problem.g_star)
    y = _mm(x, m.T) + problem.noise * jax.random.normal(ke, (n_fit, m.shape[0]))
    return x, y


def transfer_loss_on(
    problem: LinearRepProblem, g: jax.Array, sample: tuple[jax.Array, jax.Array]
) -> jax.Array:
    """:func:`transfer_loss` on given head-fitting samples (from :func:`transfer_sample`)."""
    x, y = sample
    m = _mm(problem.f_transfer, problem.g_star)
    f_hat = least_squares_head(_mm(x, g.T), y)
    return jnp.sum((_mm(f_hat, g) - m) ** 2)


def standardize(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Batch-norm without learned scale or shift: per-coordinate batch standardization."""
    mean = jnp.mean(x, axis=0, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=0, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def _orthonormal_columns_init(key, shape, dtype=jnp.float32):
    return orthonormal_rows(key, shape[1], shape[0], dtype).T


class LinearRepModel(nnx.Module):
    """``f(x) = F G x`` as two bias-free ``nnx.Linear`` layers (kernels ``G^T``, ``F^T``).

    Initialization as in the experiments: ``G_0`` has random orthonormal rows,
    ``F_0`` has i.i.d. ``N(0, 1/k)`` entries. With ``batch_norm=True`` the inputs
    are standardized per coordinate with the batch's statistics first (the
    batch-norm baseline, without learned scale/shift); its population effect is
    ``diag(Sigma)^{-1/2}``, which :meth:`representation` folds into ``G``.
    """

    def __init__(self, d_x: int, k: int, d_y: int, *, batch_norm: bool = False, rngs: nnx.Rngs):
        check_sizes(d_x=d_x, k=k, d_y=d_y)
        self.g = nnx.Linear(
            d_x, k, use_bias=False, kernel_init=_orthonormal_columns_init, rngs=rngs
        )
        self.f = nnx.Linear(
            k, d_y, use_bias=False, kernel_init=nnx.initializers.normal(k**-0.5), rngs=rngs
        )
        self.batch_norm = batch_norm

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.batch_norm:
            x = standardize(x)
        return self.f(self.g(x))

    def representation(self, sigma: jax.Array | None = None) -> jax.Array:
        """The learned ``G`` in the paper's ``(k, d_x)`` layout, in input coordinates."""
        g = self.g.kernel[...].T
        if self.batch_norm:
            if sigma is None:
                raise ValueError("a batch-norm model needs sigma to map G to input coordinates.")
            g = g * jax.lax.rsqrt(jnp.diagonal(sigma) + 1e-5)[None, :]
        return g

    def head(self) -> jax.Array:
        """The head ``F`` in the paper's ``(d_y, k)`` layout."""
        return self.f.kernel[...].T
