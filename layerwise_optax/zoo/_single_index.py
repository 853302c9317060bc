"""Single-index learning with one large first-layer step (Zhang et al., ICML 2025).

Target ``y = tanh(<beta_star, x>) + eps`` with ``x ~ N(0, Sigma)``, ``Sigma = U
diag(lambda) U^T`` (Haar ``U``, ``lambda`` log-spaced in ``[1, kappa]`` and
rescaled to mean 1) and ``beta_star`` scaled so that ``beta^T Sigma beta = 1``.

The network is ``f(x) = N^{-1/2} sum_j a_j tanh(w_j^T x)`` with fixed second-layer
weights ``a_j = ±N^{-1/2}`` (so the output is small at initialization), first
layer ``W_0 ~ N(0, 1/d)``. The protocol: one large step ``W_1 = W_0 - c D /
||D||_op`` along a method's direction ``D``, then ridge regression of the second
layer on fresh samples. Directions come from the library's optax transforms fed
by the Flax capture (K-FAC's is ``grad (Sigma_hat + lambda I)^{-1}``, i.e.
:func:`layerwise_optax.kfac` with ``sides='input'``).

Why the methods differ: at initialization the gradient's spike is
``∝ a (Sigma beta_star)^T``, so SGD's spike direction is biased towards
``Sigma beta_star``; whitening by the input covariance turns it into a ridge
estimate of ``beta_star``. :func:`alignment_theory` gives the closed-form
predictions of the alignment ``cos(v, beta_star)`` for both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from layerwise_optax import _optional, linalg
from layerwise_optax.zoo._linear_rep import (
    _mm,
    check_condition_number,
    check_sizes,
    haar_orthogonal,
    log_spectrum,
)

if TYPE_CHECKING:  # the checker reads flax itself; at run time a missing extra is named
    from flax import nnx
else:
    nnx = _optional.require("flax.nnx", "layerwise_optax.zoo", extra="zoo")


class SingleIndexProblem(NamedTuple):
    """One single-index task (a pytree of arrays).

    Attributes:
      sigma: Input covariance ``(d, d)``, eigenvalues with mean 1.
      sigma_sqrt: Its symmetric square root.
      beta: Target direction ``(d,)`` with ``beta^T Sigma beta = 1``.
      noise: Label noise standard deviation.
    """

    sigma: jax.Array
    sigma_sqrt: jax.Array
    beta: jax.Array
    noise: jax.Array


def single_index_problem(
    key: jax.Array, *, d: int = 200, kappa: jax.typing.ArrayLike = 1.0, noise: float = 0.1
) -> SingleIndexProblem:
    """Samples a single-index task (the experiments' settings by default).

    Args:
      key: PRNG key.
      d: Input dimension.
      kappa: Condition number of ``Sigma``.
      noise: Label noise standard deviation.

    Returns:
      A :class:`SingleIndexProblem`.

    Raises:
      ValueError: For ``d < 1`` or ``kappa < 1``.

    Examples:
      >>> import jax
      >>> from layerwise_optax import zoo
      >>> problem = zoo.single_index_problem(jax.random.key(0), d=6, kappa=10.0)
      >>> x, y = zoo.sample_single_index(problem, jax.random.key(1), 4)
      >>> x.shape, y.shape
      ((4, 6), (4,))
    """
    check_sizes(d=d)
    check_condition_number("kappa", kappa)
    ku, kb = jax.random.split(key)
    u = haar_orthogonal(ku, d)
    lam = log_spectrum(kappa, d)
    lam = lam / jnp.mean(lam)
    sigma = _mm(u * lam[None, :], u.T)
    beta = jax.random.normal(kb, (d,))
    beta = beta / jnp.sqrt(beta @ sigma @ beta)
    return SingleIndexProblem(
        sigma, _mm(u * jnp.sqrt(lam)[None, :], u.T), beta, jnp.asarray(noise, jnp.float32)
    )


def sample_single_index(
    problem: SingleIndexProblem, key: jax.Array, n: int, *, noiseless: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Draws ``n`` examples: ``x ~ N(0, Sigma)`` ``(n, d)``, ``y = tanh(x beta) + eps`` ``(n,)``.

    Args:
      problem: The task.
      key: PRNG key.
      n: Number of examples.
      noiseless: Leave out the label noise ``eps`` (for test sets).

    Returns:
      ``(x, y)`` of shapes ``(n, d)`` and ``(n,)``.
    """
    check_sizes(n=n)
    kx, ke = jax.random.split(key)
    x = _mm(jax.random.normal(kx, (n, problem.beta.shape[0])), problem.sigma_sqrt)
    y = jnp.tanh(x @ problem.beta)
    if not noiseless:
        y = y + problem.noise * jax.random.normal(ke, (n,))
    return x, y


class Fixed(nnx.Variable):
    """A model constant that is neither trained nor given statistics (the fixed ``a``)."""


class TwoLayerNet(nnx.Module):
    """``f(x) = N^{-1/2} a^T tanh(W x)`` with fixed ``a_j = ±N^{-1/2}`` (Ba et al. 2022).

    ``W`` is ``first.kernel`` (Flax layout ``(d, N)`` = ``W^T``), initialized
    ``N(0, 1/d)``. With ``batch_norm=True`` each input coordinate is divided by its
    batch standard deviation first (inputs are zero-mean; the batch-norm
    baseline), and :meth:`input_scale` returns that scaling so results can be mapped
    back to input coordinates.
    """

    def __init__(self, d: int, width: int, *, batch_norm: bool = False, rngs: nnx.Rngs):
        check_sizes(d=d, width=width)
        self.first = nnx.Linear(
            d, width, use_bias=False, kernel_init=nnx.initializers.normal(d**-0.5), rngs=rngs
        )
        signs = jax.random.rademacher(rngs.params(), (width,), jnp.float32)
        self.a = Fixed(signs * width**-0.5)
        self.batch_norm = batch_norm

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.batch_norm:
            x = x * input_scale(x)[None, :]
        width = self.a.shape[0]
        return width**-0.5 * jnp.tanh(self.first(x)) @ self.a[...]


def input_scale(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Per-coordinate ``1 / std`` of a zero-mean batch ``(n, d) -> (d,)``."""
    return jax.lax.rsqrt(jnp.mean(x**2, axis=0) + eps)


def ridge_fit(features: jax.Array, y: jax.Array, ridge: jax.typing.ArrayLike) -> jax.Array:
    """``argmin_a (1/n)||y - features a||^2 + ridge ||a||^2``."""
    n, p = features.shape
    gram = _mm(features.T, features) / n + ridge * jnp.eye(p, dtype=features.dtype)
    return linalg.one_at_a_time_on_cpu(jnp.linalg.solve, gram, _mm(features.T, y[:, None]) / n)[
        :, 0
    ]


def features(w: jax.Array, x: jax.Array) -> jax.Array:
    """``N^{-1/2} tanh(x W^T)`` for ``W`` in the paper's ``(N, d)`` layout."""
    return w.shape[0] ** -0.5 * jnp.tanh(_mm(x, w.T))


def top_right_singular_vector(d_mat) -> np.ndarray:
    """The spike direction of a step ``D`` ``(N, d)``: its top right singular vector."""
    _, _, vt = np.linalg.svd(np.asarray(d_mat, np.float64), full_matrices=False)
    return vt[0]


def alignment(v, beta) -> float:
    """``|cos(v, beta)|``, the alignment of a learned direction with the target.

    Args:
      v: A direction ``(d,)``.
      beta: The target direction ``(d,)``.

    Returns:
      The absolute cosine, in ``[0, 1]`` (sign-free: a spike and its negative
      align equally).

    Examples:
      >>> import jax.numpy as jnp
      >>> from layerwise_optax import zoo
      >>> round(zoo.alignment(jnp.array([1.0, 1.0]), jnp.array([-2.0, 0.0])), 4)
      0.7071
    """
    v, beta = np.asarray(v, np.float64), np.asarray(beta, np.float64)
    return float(abs(v @ beta) / (np.linalg.norm(v) * np.linalg.norm(beta)))


def tanh_moments(num_points: int = 201) -> dict[str, float]:
    """``E tanh(z)^2`` and ``mu_1 = E tanh'(z)`` for ``z ~ N(0, 1)`` (Gauss-Hermite)."""
    z, w = np.polynomial.hermite_e.hermegauss(num_points)
    w = w / w.sum()
    return {
        "second": float(w @ np.tanh(z) ** 2),
        "mu1": float(w @ (1 - np.tanh(z) ** 2)),
    }


def alignment_theory(problem: SingleIndexProblem, n: int) -> dict[str, float]:
    """Closed-form predictions of ``cos(v, beta_star)`` after one step (the paper's Fig. 2).

    Args:
      problem: The task (only ``sigma``, ``beta`` and ``noise`` are used).
      n: Number of samples in the step's batch.

    Returns:
      ``{'kfac': ..., 'sgd': ..., 'sgd_limit': cos(Sigma beta, beta)}``; the K-FAC
      value is ``nan`` when ``n <= d + 1``.
    """
    sigma = np.asarray(problem.sigma, np.float64)
    beta = np.asarray(problem.beta, np.float64)
    noise2 = float(problem.noise) ** 2
    d = beta.shape[0]
    m = tanh_moments()
    mu1, ey2 = m["mu1"], m["second"] + noise2
    sigma_eff2 = m["second"] - mu1**2 + noise2
    b2 = beta @ beta
    s_beta = sigma @ beta
    if n > d + 1:
        tr_inv = np.trace(np.linalg.inv(sigma))
        kfac2 = mu1**2 * b2 / (mu1**2 * b2 + sigma_eff2 * tr_inv / (n - d - 1))
    else:
        kfac2 = np.nan
    sgd2 = (mu1 * (beta @ s_beta)) ** 2 / (
        b2 * (mu1**2 * (s_beta @ s_beta) + ey2 * np.trace(sigma) / n)
    )
    limit = (beta @ s_beta) / (np.sqrt(b2) * np.linalg.norm(s_beta))
    return {"kfac": float(np.sqrt(kfac2)), "sgd": float(np.sqrt(sgd2)), "sgd_limit": float(limit)}
