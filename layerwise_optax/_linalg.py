"""Matrix functions for preconditioners: arrays in, arrays out.

Every function takes ``(..., n, n)`` arrays (leading axes are a batch) and knows
nothing of pytrees or optimizers. Computation runs in at least float32 (float64
inputs stay float64) and results come back in that compute dtype; callers cast.
Matmuls inside iterations use ``Precision.HIGHEST``: TF32 on GPUs ruins Newton
iterations.

Robustness is defined behaviour, never an exception:

* symmetric inputs are re-symmetrized, eigenvalues of PSD inputs are clipped at 0;
* a matrix containing NaN or Inf gives a NaN result (callers detect it and keep
  their previous good result), never a hang inside LAPACK;
* inverse roots floor the damped eigenvalues at ``eps(dtype) * lambda_max`` (and
  at the smallest normal number), so singular and zero matrices give finite,
  bounded roots.

Batched LAPACK on CPU: jaxlib's CPU ``eigh``/``qr`` kernels split a batch over
XLA's intra-op thread pool and block a pool thread while waiting for it; on small
machines (2 cores) this deadlocks when another op holds the other thread (seen
with jax 0.10.2 inside ``lax.cond``). On CPU we therefore factor a batch one
matrix at a time with ``lax.map`` (CPU LAPACK runs them one after another anyway);
other backends keep their native batched solvers (``lax.platform_dependent``).

Damping (``damping``, ``relative_damping``): the matrix function is applied to
``A + delta * I`` with ``delta = damping`` (absolute) or
``delta = damping * lambda_max(A)`` (relative).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg  # noqa: F401 - jax.scipy.linalg.cho_solve

HIGHEST = jax.lax.Precision.HIGHEST


def _compute_dtype(a: jax.Array) -> jnp.dtype:
    return jnp.promote_types(a.dtype, jnp.float32)


def _eye_like(a: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=HIGHEST)


def one_at_a_time_on_cpu(fn, *args: jax.Array):
    """Applies a matrix function ``fn`` over leading axes, one matrix per call on CPU.

    ``fn`` takes one matrix per argument (``(m_i, n_i)``, as on CPU) or stacks of
    them (``(k, m_i, n_i)``, as elsewhere), returns a tree of arrays with the
    same leading axis, and treats the matrices apart (a Cholesky factor, a
    triangular solve, an eigendecomposition, a QR or an LU solve): the
    ``jax.numpy`` linear-algebra functions do. ``args`` are ``(..., m_i, n_i)``
    arrays with the same leading axes ``...``; the result has them too. On CPU the
    matrices are fed to ``fn`` one at a time (``lax.map``), also under
    ``jax.vmap``; on other platforms ``fn`` is called once on all of them.

    Why: jaxlib's CPU LAPACK kernels split a batch of matrices over XLA's
    intra-op thread pool and block a pool thread until the parts are done. When
    as many batched calls run at once as the pool has threads (two on a 2-core
    machine, the usual Colab and CI size), every thread waits for work that no
    thread is free to run and the program hangs with the CPU idle (jaxlib
    0.10.2; six independent batched Cholesky factors in a loop hang within
    seconds). A call on one matrix never waits on the pool. Batches come from
    leading axes (stacked blocks, layer-stacked parameters) and from ``jax.vmap``
    over a training step (a learning-rate grid, seeds); the latter is caught by a
    batching rule (``jax.custom_batching.custom_vmap``) that folds the mapped
    axis into the leading ones. Every matrix function of this module that calls
    LAPACK goes through here.

    Derivatives are those of ``fn`` (``jax.custom_jvp``); under ``vmap`` of a
    derivative the LAPACK calls are batched again.

    Args:
      fn: The matrix function (see above).
      *args: ``(..., m_i, n_i)`` arrays with common leading axes.

    Returns:
      ``fn``'s outputs with the leading axes ``...`` of ``args``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from layerwise_optax import linalg
      >>> a = jnp.stack([4.0 * jnp.eye(2), 9.0 * jnp.eye(2)])
      >>> chol = jax.vmap(lambda m: linalg.one_at_a_time_on_cpu(jnp.linalg.cholesky, m))
      >>> chol(a)[:, 0, 0].tolist()
      [2.0, 3.0]
    """
    batch = args[0].shape[:-2]
    flat = [x.reshape((-1,) + x.shape[-2:]) for x in args]
    out = _sequential_on_cpu(fn)(*flat)
    return jax.tree.map(lambda y: y.reshape(batch + y.shape[1:]), out)


def _sequential_on_cpu(fn):
    """``fn`` on ``(k, ...)`` arrays, run by ``lax.map`` on CPU, also under ``vmap``."""

    def direct(*flat):
        if flat[0].shape[0] == 1:
            return jax.tree.map(lambda y: y[None], fn(*(x[0] for x in flat)))
        if flat[0].shape[0] == 0:
            return fn(*flat)

        def sequential(*xs):
            return jax.lax.map(lambda ys: fn(*ys), xs)

        return jax.lax.platform_dependent(*flat, cpu=sequential, default=fn)

    mapped = jax.custom_batching.custom_vmap(direct)

    @mapped.def_vmap
    def _rule(axis_size, in_batched, *flat):
        # Batched inputs carry the vmapped axis first; unbatched ones are shared.
        k = max(x.shape[1] if b else x.shape[0] for x, b in zip(flat, in_batched))
        merged = [
            (x if b else jnp.broadcast_to(x, (axis_size,) + x.shape)).reshape(
                (axis_size * k,) + x.shape[(2 if b else 1) :]
            )
            for x, b in zip(flat, in_batched)
        ]
        out = mapped(*merged)
        out = jax.tree.map(lambda y: y.reshape((axis_size, k) + y.shape[1:]), out)
        return out, jax.tree.map(lambda _: True, out)

    # custom_vmap has no reverse mode; derivatives are those of ``direct`` (whose
    # own batching under vmap of a derivative is LAPACK's batched one).
    differentiable = jax.custom_jvp(mapped)
    differentiable.defjvp(lambda primals, tangents: jax.jvp(direct, primals, tangents))
    return differentiable


def symmetrize(a: jax.Array) -> jax.Array:
    """Returns ``(a + a^T) / 2`` over the last two axes.

    Args:
      a: ``(..., n, n)`` array.

    Returns:
      The symmetric part of ``a``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from layerwise_optax import linalg
      >>> linalg.symmetrize(jnp.array([[1.0, 2.0], [0.0, 1.0]])).tolist()
      [[1.0, 1.0], [1.0, 1.0]]
    """
    return 0.5 * (a + jnp.swapaxes(a, -1, -2))


def _finite_matrices(a: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(a), axis=(-2, -1))


def eigh_psd(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigendecomposition of symmetric PSD matrices.

    Args:
      a: ``(..., n, n)`` symmetric positive semi-definite matrices.

    Returns:
      ``(w, v)``: eigenvalues ``(..., n)`` in ascending order, clipped at 0, and
      eigenvectors ``(..., n, n)`` as columns. A matrix with a non-finite entry
      gives NaN ``w`` and ``v``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from layerwise_optax import linalg
      >>> w, v = linalg.eigh_psd(jnp.array([[4.0, 0.0], [0.0, 1.0]]))
      >>> w.tolist()
      [1.0, 4.0]
    """
    a = symmetrize(a.astype(_compute_dtype(a)))
    ok = _finite_matrices(a)
    safe = jnp.where(ok[..., None, None], a, _eye_like(a))
    w, v = one_at_a_time_on_cpu(jnp.linalg.eigh, safe)
    w = jnp.maximum(w, 0.0)
    nan = jnp.asarray(jnp.nan, w.dtype)
    return jnp.where(ok[..., None], w, nan), jnp.where(ok[..., None, None], v, nan)


def _damped_floor(w: jax.Array, damping: jax.Array, relative_damping: bool) -> jax.Array:
    """Damped eigenvalues with the documented floor; ``w`` is ``(..., n)``."""
    lam_max = jnp.max(w, axis=-1, keepdims=True)
    delta = damping * lam_max if relative_damping else damping
    floor = jnp.maximum(jnp.finfo(w.dtype).eps * lam_max, jnp.finfo(w.dtype).tiny)
    return jnp.maximum(w + delta, floor)


def inv_root_eigh(
    a: jax.Array,
    p: float,
    *,
    damping: jax.typing.ArrayLike = 0.0,
    relative_damping: bool = False,
) -> jax.Array:
    """Inverse ``p``-th root ``(A + delta I)^{-1/p}`` by eigendecomposition.

    Args:
      a: ``(..., n, n)`` symmetric PSD matrices.
      p: Root order, any positive number (``2`` for the inverse square root).
      damping: Ridge added to the eigenvalues (see the module docstring).
      relative_damping: Whether ``damping`` is relative to ``lambda_max(A)``.

    Returns:
      ``(..., n, n)`` symmetric positive definite roots; NaN for non-finite inputs.

    Examples:
      ``(A + delta I)^{-1/2}``, undamped and with ``delta = 0.25 lambda_max``:

      >>> import jax.numpy as jnp
      >>> from layerwise_optax import linalg
      >>> a = jnp.array([[4.0, 0.0], [0.0, 1.0]])
      >>> linalg.inv_root_eigh(a, 2).tolist()
      [[0.5, 0.0], [0.0, 1.0]]
      >>> r = linalg.inv_root_eigh(a, 2, damping=0.25, relative_damping=True)
      >>> [[round(v, 4) + 0.0 for v in row] for row in r.tolist()]
      [[0.4472, 0.0], [0.0, 0.7071]]

    References:
      Higham, *Functions of Matrices: Theory and Computation*, SIAM, 2008.
    """
    w, v = eigh_psd(a)
    w = _damped_floor(w, jnp.asarray(damping, w.dtype), relative_damping)
    scaled = v * (w ** (-1.0 / p))[..., None, :]
    return _mm(scaled, jnp.swapaxes(v, -1, -2))


def inv_root_diag(
    s: jax.Array, root: float, damping: jax.Array, relative_damping: bool = True
) -> jax.Array:
    """Damped inverse ``root``-th roots of diagonal statistics, ``(s + delta)^{-1/p}``.

    The diagonal counterpart of :func:`inv_root_eigh` (its eigenvalues are the
    entries): negative round-off is clipped to zero, ``delta = damping * max(s)``
    per row (relative) or ``damping`` (absolute), and the result is floored at
    ``eps * max(s)`` (or the smallest normal number) before the power, so a zero
    row gives finite roots.

    Args:
      s: ``(..., n)`` non-negative diagonals (any float dtype; computed in at
        least float32).
      root: ``p > 0``.
      damping: Ridge ``>= 0``.
      relative_damping: ``damping`` relative to each row's largest entry.

    Returns:
      ``(..., n)`` inverse roots in at least float32.
    """
    s32 = s.astype(jnp.promote_types(s.dtype, jnp.float32))
    lam_max = jnp.max(s32, axis=-1, keepdims=True)
    delta = damping * lam_max if relative_damping else damping
    floor = jnp.maximum(jnp.finfo(s32.dtype).eps * lam_max, jnp.finfo(s32.dtype).tiny)
    return jnp.maximum(jnp.maximum(s32, 0.0) + delta, floor) ** (-1.0 / root)


def inv_psd_cholesky(
    a: jax.Array,
    *,
    damping: jax.typing.ArrayLike = 0.0,
    relative_damping: bool = False,
) -> jax.Array:
    """Inverse ``(A + delta I)^{-1}`` of symmetric positive definite matrices by Cholesky.

    About an order of magnitude cheaper than :func:`inv_root_eigh` with ``p = 1``
    (K-FAC's inverses), but with no eigenvalue floor: the damped matrix must be
    positive definite in floating point. A matrix for which the factorization
    fails (not positive definite, or non-finite) gives NaN, so callers keep their
    previous inverse; use ``eigh`` where factors may be exactly singular and
    undamped. ``lambda_max`` for relative damping is estimated by
    :func:`max_eigenvalue`.

    Args:
      a: ``(..., n, n)`` symmetric PSD matrices.
      damping: Ridge added to the diagonal (see the module docstring).
      relative_damping: Whether ``damping`` is relative to ``lambda_max(A)``.

    Returns:
      ``(..., n, n)`` symmetric inverses; NaN where the factorization failed.

    Examples:
      >>> import jax.numpy as jnp
      >>> from layerwise_optax import linalg
      >>> inv = linalg.inv_psd_cholesky(jnp.array([[4.0, 0.0], [0.0, 1.0]]), damping=1.0)
      >>> [[round(v, 4) + 0.0 for v in row] for row in inv.tolist()]
      [[0.2, 0.0], [0.0, 0.5]]
    """
    a = symmetrize(a.astype(_compute_dtype(a)))
    ok = _finite_matrices(a)
    a = jnp.where(ok[..., None, None], a, _eye_like(a))
    delta = jnp.asarray(damping, a.dtype)
    if relative_damping:
        delta = delta * max_eigenvalue(a)
    damped = a + delta[..., None, None] * _eye_like(a) if delta.ndim else a + delta * _eye_like(a)

    def solve(m):
        return jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(m), True), _eye_like(m))

    inv = symmetrize(one_at_a_time_on_cpu(solve, damped))
    good = ok & _finite_matrices(inv)
    return jnp.where(good[..., None, None], inv, jnp.asarray(jnp.nan, inv.dtype))


def cholesky_psd(
    a: jax.Array,
    *,
    damping: jax.typing.ArrayLike = 0.0,
    relative_damping: bool = False,
) -> jax.Array:
    """Lower Cholesky factor ``L`` of ``A + delta I = L L^T`` for symmetric PSD ``A``.

    The factorization that :func:`cholesky_solve` applies: solving with ``L`` is
    backward stable, so ``(A + delta I)^{-1} b`` computed that way is accurate to
    about ``eps * kappa`` relative to the solution, where multiplying by the
    explicit inverse of :func:`inv_psd_cholesky` can be off by up to
    ``eps * kappa^2`` (when ``b`` lies along the large eigenvalues). It is also a
    third of the cost of the inverse (``n^3 / 3`` flops against ``n^3``). As for
    :func:`inv_psd_cholesky`, there is no eigenvalue floor: a damped matrix that is
    not positive definite in floating point, or a non-finite one, gives NaN, so
    callers keep their previous factor.

    Args:
      a: ``(..., n, n)`` symmetric PSD matrices.
      damping: Ridge added to the diagonal (see the module docstring).
      relative_damping: Whether ``damping`` is relative to ``lambda_max(A)``
        (estimated by :func:`max_eigenvalue`).

    Returns:
      ``(..., n, n)`` lower-triangular factors (zero above the diagonal); NaN
      where the factorization failed.
    """
    a = symmetrize(a.astype(_compute_dtype(a)))
    ok = _finite_matrices(a)
    a = jnp.where(ok[..., None, None], a, _eye_like(a))
    delta = jnp.asarray(damping, a.dtype)
    if relative_damping:
        delta = delta * max_eigenvalue(a)
    damped = a + delta[..., None, None] * _eye_like(a) if delta.ndim else a + delta * _eye_like(a)
    chol = jnp.tril(one_at_a_time_on_cpu(jnp.linalg.cholesky, damped))
    good = ok & _finite_matrices(chol)
    return jnp.where(good[..., None, None], chol, jnp.asarray(jnp.nan, chol.dtype))


def cholesky_solve(chol: jax.Array, b: jax.Array, *, left: bool = True) -> jax.Array:
    """``(L L^T)^{-1} B`` (``left``) or ``B (L L^T)^{-1}`` by two triangular solves.

    Costs the same flops as one product with an explicit inverse (``2 n^2 m``
    for ``m`` right-hand sides) and is backward stable (see :func:`cholesky_psd`).

    Args:
      chol: ``(..., n, n)`` lower Cholesky factors (from :func:`cholesky_psd`).
      b: ``(..., n, m)`` right-hand sides (``left``) or ``(..., m, n)`` (not
        ``left``), with the same leading axes as ``chol``.
      left: Solve from the left (``L L^T X = B``) or from the right
        (``X L L^T = B``).

    Returns:
      ``X``, the shape of ``b``, in the common compute dtype of both inputs.
    """
    dtype = jnp.promote_types(_compute_dtype(chol), _compute_dtype(b))
    chol, b = chol.astype(dtype), b.astype(dtype)
    solve = jax.lax.linalg.triangular_solve

    def both(low, x):
        if left:
            y = solve(low, x, left_side=True, lower=True)  # L Y = B
            return solve(low, y, left_side=True, lower=True, transpose_a=True)  # L^T X = Y
        y = solve(low, x, left_side=False, lower=True, transpose_a=True)  # Y L^T = B
        return solve(low, y, left_side=False, lower=True)  # X L = Y

    return one_at_a_time_on_cpu(both, chol, b)


def max_eigenvalue(a: jax.Array, num_iters: int = 30) -> jax.Array:
    """Largest eigenvalue of symmetric PSD matrices by power iteration.

    Starts from the all-ones vector normalized (a deterministic start); the
    estimate is a lower bound that converges at rate ``lambda_2 / lambda_1``.

    Args:
      a: ``(..., n, n)`` symmetric PSD matrices.
      num_iters: Number of power iterations (static).

    Returns:
      ``(...)`` eigenvalue estimates (Rayleigh quotients).

    Examples:
      >>> import jax.numpy as jnp
      >>> from layerwise_optax import linalg
      >>> round(float(linalg.max_eigenvalue(jnp.array([[2.0, 1.0], [1.0, 2.0]]))), 4)
      3.0
    """
    a = symmetrize(a.astype(_compute_dtype(a)))
    # Iterate on A / max|A_ij| so that the vector norms cannot overflow (entries
    # above ~1e19 in float32) or underflow; the estimate is scaled back at the end.
    scale = jnp.max(jnp.abs(a), axis=(-2, -1))
    scale = jnp.where(scale > 0, scale, 1.0)
    a = a / scale[..., None, None]
    x = jnp.ones(a.shape[:-1], a.dtype) / jnp.sqrt(a.shape[-1])

    def body(_, x):
        y = jnp.einsum("...ij,...j->...i", a, x, precision=HIGHEST)
        return y / jnp.maximum(jnp.linalg.norm(y, axis=-1, keepdims=True), jnp.finfo(a.dtype).tiny)

    x = jax.lax.fori_loop(0, num_iters, body, x)
    return scale * jnp.einsum("...i,...ij,...j->...", x, a, x, precision=HIGHEST)


def spectral_norm_lower_bound(a: jax.Array) -> jax.Array:
    """A cheap lower bound of the spectral norm of symmetric matrices, within sqrt(n).

    Takes the row ``x`` of largest ℓ2 norm and returns ``||A² x|| / ||A x||``:
    two steps of power iteration started from ``x``, the bound of the PSGD
    papers and psgd-jax (Li 2018, 2024). For symmetric ``A``,
    Cauchy–Schwarz (``||A y||² = <y, A² y> <= ||y|| ||A² y||``) gives
    ``||x|| <= ||A x|| / ||x|| <= ||A² x|| / ||A x|| <= ||A||_2``; since the
    largest row norm is at least ``||A||_F / sqrt(n) >= ||A||_2 / sqrt(n)``, the
    bound is within ``sqrt(n)`` of the truth, usually within a few percent. Two
    matrix-vector products, no iteration (PSGD's step-size normalization).

    Args:
      a: ``(..., n, n)`` symmetric matrices.

    Returns:
      ``(...)`` bounds; 0 for zero matrices.

    Examples:
      For ``[[2, 1], [1, 2]]`` (spectral norm 3):

      >>> import jax.numpy as jnp
      >>> from layerwise_optax import linalg
      >>> round(float(linalg.spectral_norm_lower_bound(jnp.array([[2.0, 1.0], [1.0, 2.0]]))), 3)
      2.984

    References:
      Li, `Stochastic Hessian Fittings with Lie Groups
      <https://arxiv.org/abs/2402.11858>`_, 2024.
    """
    a = a.astype(_compute_dtype(a))
    # Work on A / max|A_ij| (squares of entries above ~1e19 overflow float32).
    scale = jnp.max(jnp.abs(a), axis=(-2, -1))
    scale = jnp.where(scale > 0, scale, 1.0)
    a = a / scale[..., None, None]
    rows = jnp.sum(a * a, axis=-1)
    i = jnp.argmax(rows, axis=-1)
    x = jnp.take_along_axis(a, i[..., None, None], axis=-2)[..., 0, :]
    ax = jnp.einsum("...ij,...j->...i", a, x, precision=HIGHEST)
    axn = jnp.linalg.norm(ax, axis=-1)
    # Normalize before the second product (as psgd-jax does) so it cannot overflow.
    y = ax / jnp.where(axn > 0, axn, 1)[..., None]
    aay = jnp.einsum("...ij,...j->...i", a, y, precision=HIGHEST)
    return scale * jnp.where(axn > 0, jnp.linalg.norm(aay, axis=-1), 0.0)


def solve_upper_transposed(u: jax.Array, b: jax.Array) -> jax.Array:
    """``U^{-T} B`` for upper triangular ``U``: the solution ``X`` of ``U^T X = B``.

    ``U^T`` is lower triangular, so this is one forward substitution (``n^2 m``
    flops for ``m`` right-hand sides, no inverse formed) and backward stable: the
    computed ``X`` solves ``(U + E)^T X = B`` with ``|E| <= n eps |U|``, so its
    relative error is of order ``eps * kappa(U)``. PSGD uses it to map a probe
    through ``Q^{-T}`` (Li 2018, 2024).

    Args:
      u: ``(..., n, n)`` upper triangular matrices (the strictly lower part is
        not read).
      b: ``(..., n, m)`` right-hand sides, with the same leading axes as ``u``.

    Returns:
      ``X``, the shape of ``b``, in the common compute dtype of both inputs.
      A singular ``U`` gives non-finite entries (callers keep their previous
      result, see :mod:`layerwise_optax._failure`).
    """
    dtype = jnp.promote_types(_compute_dtype(u), _compute_dtype(b))

    def solve(uu, bb):
        return jax.scipy.linalg.solve_triangular(uu, bb, trans="T", lower=False)

    return one_at_a_time_on_cpu(solve, u.astype(dtype), b.astype(dtype))


def psgd_step_triangular(q: jax.Array, aa: jax.Array, bb: jax.Array, lr: Any) -> jax.Array:
    r"""One step of PSGD's fit of upper triangular factors on their Lie group.

    .. math::
      Q \leftarrow Q - \frac{\mu}{\|A A^T + B B^T\|_{lb}}\,
      \mathrm{triu}(A A^T - B B^T)\, Q

    with ``aa = A A^T`` and ``bb = B B^T`` the factor's statistics of the
    preconditioned gradient ``A = Q g`` and the mapped probe ``B = Q^{-T} v``,
    and ``||.||_lb`` :func:`spectral_norm_lower_bound`. The step multiplies ``Q``
    by the upper triangular ``I - mu triu(aa - bb) / ||aa + bb||_lb``; the bound
    is at least the largest row norm of ``aa + bb``, hence at least every
    ``|aa_jj - bb_jj|``, so that factor's diagonal lies in ``[1 - mu, 1 + mu]``
    and ``Q`` stays on the group of invertible upper triangular matrices for
    ``mu < 1``. The step is zero at the whitening fixed point ``aa == bb`` and
    scale free: scaling ``aa`` and ``bb`` by ``c > 0`` does not change it
    (Li 2018, 2024).

    Args:
      q: ``(..., n, n)`` upper triangular factors.
      aa: ``(..., n, n)`` symmetric PSD statistics ``A A^T``.
      bb: ``(..., n, n)`` symmetric PSD statistics ``B B^T``.
      lr: Step size ``mu`` in ``(0, 1]`` (a scalar, may be traced).

    Returns:
      The new factors, upper triangular, the shape of ``q``. Default matmul
      precision (the fit is stochastic, as in psgd-jax).
    """
    bound = spectral_norm_lower_bound(aa + bb)
    step = jnp.triu(aa - bb) / (bound[..., None, None] + 1e-30)
    return q - lr * jnp.matmul(step, q)


def psgd_step_diagonal(d: jax.Array, aa: jax.Array, bb: jax.Array, lr: Any) -> jax.Array:
    r"""One step of PSGD's fit of diagonal factors: the diagonal case of :func:`psgd_step_triangular`.

    .. math::
      d \leftarrow d - \mu\, \frac{a - b}{\max_j |a_j + b_j|} \odot d

    with ``a``, ``b`` the diagonals of ``A A^T`` and ``B B^T``; for diagonal
    matrices the max-abs entry is the spectral norm exactly.

    Args:
      d: ``(..., n)`` diagonals of the factors.
      aa: ``(..., n)`` diagonal statistics ``diag(A A^T)``.
      bb: ``(..., n)`` diagonal statistics ``diag(B B^T)``.
      lr: Step size ``mu`` in ``(0, 1]``.

    Returns:
      The new diagonals, the shape of ``d``.
    """
    bound = jnp.max(jnp.abs(aa + bb), axis=-1, keepdims=True)
    return d - lr * (aa - bb) / (bound + 1e-30) * d


def balance_factors(
    factors: Sequence[jax.Array], masks: Sequence[jax.Array | None] | None = None
) -> tuple[jax.Array, ...]:
    r"""Rescales Kronecker factors to equal max-abs entries, their product unchanged.

    ``Q_1 ⊗ ... ⊗ Q_k = (c_1 Q_1) ⊗ ... ⊗ (c_k Q_k)`` whenever ``prod c_i = 1``.
    With ``m_i = max|Q_i|`` and ``c_i = (prod_j m_j)^{1/k} / m_i`` every factor
    ends with max-abs ``(prod_j m_j)^{1/k}`` (the geometric mean), computed in
    logarithms so that it cannot overflow. A fit that does not see this freedom
    (PSGD's) would otherwise let one factor drift large and another small;
    balancing keeps them all well inside float range (Li 2024; psgd-jax).
    Zero factors count as max-abs ``1e-30``.

    Args:
      factors: ``(stack, ...)`` arrays (matrices or diagonals), balanced per
        entry of the leading stack axis.
      masks: Per factor ``None`` or a boolean array broadcastable to it: the
        entries where it is false are left out of ``m_i`` (the zero-padded
        corner of a blocked factor, which must not set the scale of its real
        entries). ``None``: every entry counts.

    Returns:
      The rescaled factors (the input unchanged when there are fewer than two).
    """
    if len(factors) < 2:
        return tuple(factors)
    masks = [None] * len(factors) if masks is None else list(masks)
    maxes = [
        jnp.max(jnp.abs(jnp.reshape(f if m is None else jnp.where(m, f, 0), (f.shape[0], -1))), 1)
        for f, m in zip(factors, masks)
    ]
    logs = jnp.log(jnp.maximum(jnp.stack(maxes), 1e-30))
    target = jnp.mean(logs, axis=0)
    return tuple(
        f * jnp.reshape(jnp.exp(target - logs[j]), (-1,) + (1,) * (f.ndim - 1))
        for j, f in enumerate(factors)
    )


def trace_normalize(s: jax.Array, *, diagonal: bool = False) -> jax.Array:
    r"""PSD matrices divided by their mean eigenvalue, ``L / (tr(L) / n)``.

    The result has trace ``n`` (mean eigenvalue 1) whatever the scale of ``L``,
    so a root ``(L / (tr L / n))^{-1/p}`` is independent of that scale
    (Shampoo's ``trace_normalize``). A matrix with zero trace (all zero) is
    returned unchanged, so an empty statistic stays zero instead of NaN.

    Args:
      s: ``(..., n, n)`` PSD matrices, or with ``diagonal`` their ``(..., n)``
        diagonals (any float dtype; the result keeps it).
      diagonal: ``s`` holds diagonals (the mean entry is divided out).

    Returns:
      An array like ``s``.
    """
    n = s.shape[-1]
    tr = jnp.sum(s, axis=-1) if diagonal else jnp.trace(s, axis1=-2, axis2=-1)
    scale = jnp.where(tr > 0, n / jnp.where(tr > 0, tr, 1.0), 1.0).astype(s.dtype)
    return s * (scale[..., None] if diagonal else scale[..., None, None])


def matrix_power(m: jax.Array, p: int) -> jax.Array:
    """``m^p`` for a static integer ``p >= 1``, by repeated squaring.

    ``ceil(log2 p) + popcount(p) - 1`` matmuls at ``Precision.HIGHEST`` (so
    ``m^2 = m m`` and ``m^3 = m (m m)``); no damping, no symmetrization. Used for
    the residual of the coupled Newton iteration and for KL-Shampoo's
    ``L^{-1/2} = (L^{-1/p})^{p/2}`` (:func:`layerwise_optax._kron.kl_axis_stats`).

    Args:
      m: ``(..., n, n)`` matrices (any float dtype; the product keeps it).
      p: The exponent, a Python int ``>= 1``.

    Returns:
      ``(..., n, n)`` powers, same dtype as ``m``.

    Raises:
      ValueError: If ``p`` is not an integer ``>= 1``.
    """
    if not isinstance(p, int) or isinstance(p, bool) or p < 1:
        raise ValueError(f"matrix_power needs an integer exponent p >= 1, got {p!r}.")
    result = None
    base = m
    while p:
        if p & 1:
            result = base if result is None else _mm(result, base)
        p >>= 1
        if p:
            base = _mm(base, base)
    assert result is not None
    return result


def _max_abs(r: jax.Array) -> jax.Array:
    """``max |r|`` over the last two axes, ``inf`` where any entry is not finite.

    XLA's max-reduction may skip NaNs (an all-NaN matrix can reduce to ``-inf``),
    which would make a diverged Newton iterate look converged.
    """
    err = jnp.max(jnp.abs(r), axis=(-2, -1))
    return jnp.where(_finite_matrices(r), err, jnp.inf)


def _residual(x: jax.Array, a: jax.Array, p: int) -> jax.Array:
    """``max |X^p A - I|`` per matrix: the true residual of an inverse root."""
    return _max_abs(_mm(matrix_power(x, p), a) - _eye_like(a))


def inv_root_newton(
    a: jax.Array,
    p: int,
    *,
    damping: jax.typing.ArrayLike = 0.0,
    relative_damping: bool = False,
    warm_start: jax.Array | None = None,
    max_iters: int = 100,
    tol: float = 1e-6,
) -> tuple[jax.Array, jax.Array]:
    """Inverse ``p``-th root by the coupled Newton iteration.

    Cold start (Guo and Higham, 2006; as in Distributed Shampoo): with
    ``A' = A + delta I`` and ``z = (1 + p) / (2 ||A'||_F)``, start from
    ``X = z^{1/p} I``, ``M = z A'`` and iterate
    ``T = ((p + 1) I - M) / p``, ``X <- X T``, ``M <- T^p M`` until
    ``max |M - I| < tol``, the error stops decreasing, or ``max_iters``.

    Warm start: given a previous root ``X_0``, the iteration starts from
    ``X_0`` and ``M = X_0^p A'``. This is exact only while ``X_0`` commutes with
    ``A'`` (slowly drifting factors nearly do), so the warm result is accepted only
    if its true residual ``max |X^p A' - I|`` is below ``max(tol, 1e-3)``;
    otherwise the cold start is used.

    Args:
      a: ``(..., n, n)`` symmetric PSD matrices.
      p: Root order, a static positive int.
      damping: Ridge (see the module docstring); with ``relative_damping`` the
        largest eigenvalue is estimated by :func:`max_eigenvalue`.
      relative_damping: Whether ``damping`` is relative to ``lambda_max(A)``.
      warm_start: Optional ``(..., n, n)`` previous roots.
      max_iters: Iteration cap (static).
      tol: Stopping tolerance on ``max |M - I|``.

    Returns:
      ``(root, residual)``: the roots ``(..., n, n)`` and the true residuals
      ``max |X^p A' - I|`` of shape ``(...)``. Non-finite inputs give NaN roots.

    Examples:
      >>> import jax.numpy as jnp
      >>> from layerwise_optax import linalg
      >>> root, residual = linalg.inv_root_newton(jnp.array([[4.0, 0.0], [0.0, 1.0]]), 2)
      >>> [[round(v, 4) + 0.0 for v in row] for row in root.tolist()], bool(residual < 1e-5)
      ([[0.5, 0.0], [0.0, 1.0]], True)

    References:
      Guo and Higham, A Schur-Newton Method for the Matrix p-th Root and its
      Inverse, SIAM J. Matrix Anal. Appl. 28(3), 2006.
      Anil et al., `Scalable Second Order Optimization for Deep Learning
      <https://arxiv.org/abs/2002.09018>`_, 2020.
    """
    if not isinstance(p, int) or p < 1:
        raise ValueError(f"p must be a positive int for the Newton iteration, got {p!r}.")
    ad, s, ok, zero = _newton_operand(a, damping, relative_damping)
    dtype = ad.dtype
    root = symmetrize(_newton_root(ad, s, p, warm_start, max_iters, tol))
    residual = _residual(root, ad, p)
    zero_root = jnp.finfo(dtype).tiny ** (-1.0 / p) * _eye_like(ad)
    root = jnp.where(zero[..., None, None], zero_root, root * (s ** (-1.0 / p))[..., None, None])
    residual = jnp.where(zero, 0.0, residual)
    nan = jnp.asarray(jnp.nan, dtype)
    return jnp.where(ok[..., None, None], root, nan), jnp.where(ok, residual, nan)


def _newton_operand(
    a: jax.Array, damping: jax.typing.ArrayLike, relative_damping: bool
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The damped, scaled matrices ``A' = A / s + delta I`` the Newton iteration runs on.

    ``s = max |A_ij|`` (1 for a zero matrix): ``(A + delta I)^{-1/p} = s^{-1/p}
    (A/s + delta/s I)^{-1/p}``, so the Frobenius norms and power iterations do
    not overflow for entries above ~1e19 and the cold start behaves for tiny
    ones. The same floor as the eigendecomposition path, ``eps ||A'||_F`` on the
    diagonal, bounds the conditioning; an all-zero ``A'`` becomes ``I`` (its root
    is set apart by the caller), a non-finite ``A`` becomes ``I`` too.

    Returns:
      ``(ad, s, ok, zero)``: ``A'`` in the compute dtype, the scales ``s``, the
      finite-input flags and the all-zero flags, each of shape ``(...)``.
    """
    dtype = _compute_dtype(a)
    a = symmetrize(a.astype(dtype))
    ok = _finite_matrices(a)
    a = jnp.where(ok[..., None, None], a, _eye_like(a))
    s = jnp.max(jnp.abs(a), axis=(-2, -1))
    s = jnp.where(s > 0, s, 1.0)
    a = a / s[..., None, None]
    damping = jnp.asarray(damping, dtype)
    delta = (
        damping * max_eigenvalue(a)
        if relative_damping
        else jnp.broadcast_to(damping, a.shape[:-2]) / s
    )
    ad = a + delta[..., None, None] * _eye_like(a)
    frob = jnp.linalg.norm(ad, axis=(-2, -1))
    zero = frob <= jnp.finfo(dtype).tiny
    ad = jnp.where(zero[..., None, None], _eye_like(ad), ad)
    ad = ad + (jnp.finfo(dtype).eps * frob)[..., None, None] * _eye_like(ad)
    return ad, s, ok, zero


def _newton_root(
    ad: jax.Array,
    s: jax.Array,
    p: int,
    warm_start: jax.Array | None,
    max_iters: int,
    tol: float,
) -> jax.Array:
    """``A'^{-1/p}`` by :func:`_coupled_newton`, from the cold or the warm start.

    Cold: ``z = (1 + p) / (2 ||A'||_F)``, ``X = z^{1/p} I``, ``M = z A'``. Warm:
    ``X = X_0 s^{1/p}`` (the previous root of the unscaled matrix), ``M = X^p
    A'``, accepted per matrix only where finite with true residual ``max |X^p A' -
    I| < max(tol, 1e-3)``; the cold iteration runs only when some matrix needs it.
    """
    z = (1.0 + p) / (2.0 * jnp.linalg.norm(ad, axis=(-2, -1)))
    x_cold0 = (z ** (1.0 / p))[..., None, None] * _eye_like(ad)
    m_cold0 = z[..., None, None] * ad
    if warm_start is None:
        return _coupled_newton(x_cold0, m_cold0, p, max_iters, tol)
    x_warm0 = symmetrize(warm_start.astype(ad.dtype)) * (s ** (1.0 / p))[..., None, None]
    warm_ok = _finite_matrices(x_warm0)
    x_warm0 = jnp.where(warm_ok[..., None, None], x_warm0, x_cold0)
    root_warm = _coupled_newton(x_warm0, _mm(matrix_power(x_warm0, p), ad), p, max_iters, tol)
    warm_good = warm_ok & (_residual(root_warm, ad, p) < max(tol, 1e-3))
    return jax.lax.cond(
        jnp.all(warm_good),
        lambda: root_warm,
        lambda: jnp.where(
            warm_good[..., None, None],
            root_warm,
            _coupled_newton(x_cold0, m_cold0, p, max_iters, tol),
        ),
    )


def _coupled_newton(x0: jax.Array, m0: jax.Array, p: int, max_iters: int, tol: float) -> jax.Array:
    """The coupled iteration ``T = ((p + 1) I - M) / p``, ``X <- X T``, ``M <- T^p M``.

    Per matrix of the ``(..., n, n)`` stacks ``x0``, ``m0``: runs until ``max |M -
    I| < tol``, ``max_iters``, or the error grows by more than 20% in a step (it
    may rise briefly before converging; Distributed Shampoo's rule), in which case
    the iterate before that step is returned.
    """
    n = x0.shape[-1]
    ident = jnp.eye(n, dtype=x0.dtype)

    def cond(c):
        i, _, _, _, err, run = c
        return (i < max_iters) & (err > tol) & run

    def body(c):
        i, x, m, _, err, _ = c
        t = ((p + 1) * ident - m) / p
        x_new = _mm(x, t)
        m_new = _mm(matrix_power(t, p), m)
        err_new = _max_abs(m_new - ident)
        return i + 1, x_new, m_new, x, err_new, err_new < 1.2 * err

    def one(x0, m0):
        err0 = _max_abs(m0 - ident)
        init = (jnp.zeros([], jnp.int32), x0, m0, x0, err0, jnp.asarray(True))
        _, x, _, x_prev, _, run = jax.lax.while_loop(cond, body, init)
        return jnp.where(run, x, x_prev)

    flat = jax.vmap(one)(x0.reshape((-1, n, n)), m0.reshape((-1, n, n)))
    return flat.reshape(x0.shape[:-2] + (n, n))


def eigenbasis(a: jax.Array) -> jax.Array:
    """Eigenvectors of symmetric PSD matrices, ordered by descending eigenvalue.

    Args:
      a: ``(..., n, n)`` symmetric PSD matrices.

    Returns:
      ``(..., n, n)`` orthogonal matrices whose columns are eigenvectors; NaN for
      non-finite inputs.

    Examples:
      >>> import jax.numpy as jnp
      >>> from layerwise_optax import linalg
      >>> q = linalg.eigenbasis(jnp.array([[1.0, 0.0], [0.0, 3.0]]))
      >>> [[round(v, 4) + 0.0 for v in row] for row in abs(q).tolist()]
      [[0.0, 1.0], [1.0, 0.0]]

    References:
      Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
      <https://arxiv.org/abs/2409.11321>`_, 2024 (the eigenbasis SOAP runs Adam in).
    """
    _, v = eigh_psd(a)
    return v[..., ::-1]


def basis_off_diagonal(a: jax.Array, q: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""How far a basis is from diagonalizing a matrix: ``(||B - diag B||_F, ||B||_F)``.

    With ``B = Q^T A Q`` (``A`` symmetrized, computed in at least float32 at the
    highest matmul precision) the first norm is also ``||A - Q diag(B) Q^T||_F``
    for orthogonal ``Q``, the error of keeping ``Q`` as ``A``'s eigenbasis, and
    the second is ``||A||_F``. The adaptive refresh criterion of SOAP's
    ``refresh_tolerance`` compares the two (as Meta's Distributed Shampoo does
    with its eigendecomposition ``tolerance``). Matrix products only, no LAPACK.

    Args:
      a: ``(..., n, n)`` symmetric matrices.
      q: ``(..., n, n)`` orthogonal bases.

    Returns:
      ``(off, total)``, two ``(...,)`` arrays (NaN where an input is not finite).

    Examples:
      >>> import jax.numpy as jnp
      >>> from layerwise_optax import _linalg
      >>> off, total = _linalg.basis_off_diagonal(jnp.array([[2.0, 1.0], [1.0, 2.0]]), jnp.eye(2))
      >>> round(float(off) ** 2, 4), round(float(total) ** 2, 4)
      (2.0, 10.0)

    References:
      Shi et al., `A Distributed Data-Parallel PyTorch Implementation of the
      Distributed Shampoo Optimizer <https://arxiv.org/abs/2309.06497>`_, 2023;
      the criterion is its implementation's ``EigendecompositionConfig.tolerance``
      (Eschenhagen et al., "Purifying Shampoo", 2025, motivate it).
    """
    dtype = _compute_dtype(a)
    a = symmetrize(a.astype(dtype))
    q = q.astype(dtype)
    b = _mm(_mm(jnp.swapaxes(q, -1, -2), a), q)
    off_diag = b * (1.0 - _eye_like(b))
    off = jnp.sqrt(jnp.sum(jnp.square(off_diag), axis=(-2, -1)))
    return off, jnp.sqrt(jnp.sum(jnp.square(b), axis=(-2, -1)))


def refresh_eigenbasis(a: jax.Array, q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One power-iteration step plus QR towards the eigenbasis of ``a`` (SOAP).

    The columns of ``q`` are first sorted by their Rayleigh quotients
    ``diag(Q^T A Q)`` in descending order, then ``Q <- qr(A Q)``. Optimizers that
    hold statistics in the old basis (SOAP's second moment) apply the same
    permutation to them.

    Args:
      a: ``(..., n, n)`` symmetric PSD matrices.
      q: ``(..., n, n)`` current orthogonal bases.

    Returns:
      ``(q_new, perm)``: the refreshed bases and the ``(..., n)`` int32 column
      permutation applied before the power step. Non-finite inputs give NaN
      ``q_new``.

    Examples:
      From the identity, the columns are reordered by Rayleigh quotient (largest
      first), then one power step and QR:

      >>> import jax.numpy as jnp
      >>> from layerwise_optax import linalg
      >>> q, perm = linalg.refresh_eigenbasis(jnp.array([[1.0, 0.0], [0.0, 3.0]]), jnp.eye(2))
      >>> [[round(v, 4) + 0.0 for v in row] for row in abs(q).tolist()], perm.tolist()
      ([[0.0, 1.0], [1.0, 0.0]], [1, 0])

    References:
      Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
      <https://arxiv.org/abs/2409.11321>`_, 2024.
    """
    dtype = _compute_dtype(a)
    a = symmetrize(a.astype(dtype))
    q = q.astype(dtype)
    ok = _finite_matrices(a) & _finite_matrices(q)
    a = jnp.where(ok[..., None, None], a, _eye_like(a))
    q = jnp.where(ok[..., None, None], q, _eye_like(q))
    est = jnp.einsum("...ji,...jk,...ki->...i", q, a, q, precision=HIGHEST)
    perm = jnp.argsort(-est, axis=-1, stable=True).astype(jnp.int32)
    q = jnp.take_along_axis(q, perm[..., None, :], axis=-1)
    q_new, r = one_at_a_time_on_cpu(jnp.linalg.qr, _mm(a, q))
    # Fix QR's sign ambiguity so that columns keep the orientation of ``q``.
    sign = jnp.where(jnp.diagonal(r, axis1=-2, axis2=-1) < 0, -1.0, 1.0).astype(dtype)
    q_new = q_new * sign[..., None, :]
    nan = jnp.asarray(jnp.nan, dtype)
    return jnp.where(ok[..., None, None], q_new, nan), perm


# Newton-Schulz orthogonalization -------------------------------------------------------

NS_PRESETS: dict[str, tuple[tuple[float, float, float], ...]] = {
    # Jordan's quintic (modded-nanogpt Muon), the same (a, b, c) at every step.
    "standard": ((3.4445, -4.7750, 2.0315),),
    # A per-step schedule (Ahn et al. 2025, "Dion"; the one optax ships as 'dion'):
    # steep early steps, then steps that settle the singular values near 1.
    "dion": (
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ),
    # Polar Express (Amsel et al. 2025): the greedy minimax-optimal quintic for each
    # step, designed from a lower singular-value bound of 1e-3; the first 5 steps map
    # [1e-3, 1] into [0.85, 1.13], 8 steps to 1 within 1e-15 (tested). Every step
    # but the last is divided by the paper's safety factor 1.01 (p(x/1.01)), which
    # keeps round-off from pushing singular values above the design interval.
    "polar_express": tuple(
        (a / 1.01, b / 1.01**3, c / 1.01**5) if i < 7 else (a, b, c)
        for i, (a, b, c) in enumerate(
            (
                (8.28721201814563, -23.595886519098837, 17.300387312530933),
                (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
                (3.948690853482295, -2.908902115962949, 0.5518191394370137),
                (3.3184196573706015, -2.488488024314874, 0.51004894012372),
                (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
                (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
                (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
                (1.875, -1.25, 0.375),
            )
        )
    ),
    # For prescale='aol' (Turbo-Muon's one step fewer): 4 greedy minimax-optimal
    # quintics (Polar Express's construction, computed here by a linear program on
    # a grid) for singular values in [1e-2, 1] after the AOL scaling, each but the
    # last divided by the safety factor 1.01; they map [1e-2, 1] into
    # [0.985, 1.015] (tested). Past 4 steps the last triple repeats.
    "aol": (
        (8.013236656453433, -22.925758186906435, 16.59941547779885),
        (3.6070243614100033, -2.6485981076142697, 0.5119241394307661),
        (2.6536276308597437, -1.93923293043495, 0.43503912724578),
        (1.9691433423237754, -1.357350677629386, 0.3906724176728899),
    ),
    # The cubic Newton-Schulz iteration (a, b, c) = (3/2, -1/2, 0): converges to the
    # exact polar factor, slowly for small singular values.
    "cubic": ((1.5, -0.5, 0.0),),
}


def ns_coefficients(preset: str | Any, steps: int) -> jax.Array:
    """Per-step quintic coefficients ``(steps, 3)`` from a preset name or an array.

    A preset with one triple repeats it. A schedule is greedy (each step is designed
    for the interval the previous steps leave), so a longer schedule is cut to its
    first ``steps`` triples and a shorter one repeats its last triple. An array of
    shape ``(3,)`` or ``(n, 3)`` is used the same way. (``optax.contrib.muon``
    instead runs a whole ``(n, 3)`` table whatever ``ns_steps`` is; the two agree
    when ``steps == n``.)

    Args:
      preset: A name in :data:`NS_PRESETS` or an array ``(3,)`` / ``(n, 3)``.
      steps: Number of Newton-Schulz steps.

    Returns:
      A float32 array ``(steps, 3)``.


    Examples:
      >>> import jax.numpy as jnp
      >>> from layerwise_optax import linalg
      >>> linalg.ns_coefficients('polar_express', 5).shape
      (5, 3)
      >>> r = linalg.ns_coefficients('standard', 2)
      >>> [[round(v, 4) + 0.0 for v in row] for row in r.tolist()]
      [[3.4445, -4.775, 2.0315], [3.4445, -4.775, 2.0315]]

    References:
      Amsel et al., The Polar Express: Optimal Matrix Sign Methods and Their
      Application to the Muon Algorithm, 2025.
    Raises:
      ValueError: For an unknown preset name or a badly shaped array.
    """
    if isinstance(preset, str):
        if preset not in NS_PRESETS:
            raise ValueError(
                f"Unknown ns_coeffs preset {preset!r}; expected one of {sorted(NS_PRESETS)} "
                "or an array of shape (3,) or (n, 3)."
            )
        table = jnp.asarray(NS_PRESETS[preset], jnp.float32)
    else:
        table = jnp.asarray(preset, jnp.float32)
        if table.ndim == 1:
            table = table[None]
        if table.ndim != 2 or table.shape[-1] != 3:
            raise ValueError(f"ns_coeffs must have shape (3,) or (n, 3), got {table.shape}.")
    n = table.shape[0]
    if n >= steps:
        return table[:steps]
    return jnp.concatenate([table, jnp.broadcast_to(table[-1:], (steps - n, 3))])


NS_METHODS = ("standard", "gram", "auto")
NS_PRESCALES = ("frobenius", "aol")


def _gram_segments(steps: int, restarts: Sequence[int]) -> list[range]:
    """The steps ``0..steps-1`` cut before each restart index (indices ``1..steps-1``)."""
    cuts = sorted({int(r) for r in restarts if 0 < int(r) < steps})
    bounds = [0, *cuts, steps]
    return [range(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


def default_gram_restarts(steps: int) -> tuple[int, ...]:
    """Where :func:`newton_schulz`'s Gram iteration re-forms ``X`` and ``R = X X^T``.

    Every third step (``(3, 6, ...)``; none for ``steps <= 3``): long enough to
    keep most of the Gram saving, short enough that the float32 recurrence stays
    within round-off of the standard iteration on the tests' inputs (condition
    numbers up to ``1e6``; ``tests/test_gram_ns.py``).

    Args:
      steps: Number of Newton-Schulz steps.

    Returns:
      The restart step indices, a tuple of ints in ``[1, steps)``.

    Examples:
      >>> from layerwise_optax import linalg
      >>> linalg.default_gram_restarts(5), linalg.default_gram_restarts(8)
      ((3,), (3, 6))
    """
    return tuple(range(3, steps, 3))


def newton_schulz_flops(
    m: int, n: int, steps: int, method: str = "standard", restarts: Sequence[int] | None = None
) -> int:
    """Matmul flops (2 per multiply-add) of :func:`newton_schulz` on one ``m x n`` matrix.

    With ``k = min(m, n)``, ``l = max(m, n)``: ``'standard'`` costs
    ``steps * (4 k^2 l + 2 k^3)``; ``'gram'`` costs ``2 k^2 l`` for ``R_0``, per
    restart ``4 k^2 l`` (re-forming ``X`` and ``R``), ``2 k^2 l`` for the final
    ``Q X_0`` and per step at most ``8 k^3`` (``R^2``, ``P Q``, ``P R P``; the first
    step of a segment has ``Q = P``, the last needs no ``R``). ``'auto'`` picks the
    cheaper of the two. (The elementwise work of the scalings is not counted.)

    Args:
      m: Rows.
      n: Columns.
      steps: Newton-Schulz steps.
      method: ``'standard'``, ``'gram'`` or ``'auto'``.
      restarts: The Gram iteration's restart steps (``None``:
        :func:`default_gram_restarts`).

    Returns:
      The flop count (an int).

    Examples:
      >>> from layerwise_optax import linalg
      >>> linalg.newton_schulz_flops(512, 2048, 5, 'standard') / 1e9
      12.07959552
      >>> linalg.newton_schulz_flops(512, 2048, 5, 'gram') / 1e9
      8.05306368

    Raises:
      ValueError: For an unknown ``method``.
    """
    if method not in NS_METHODS:
        raise ValueError(f"method must be one of {NS_METHODS}, got {method!r}.")
    k, ell = min(m, n), max(m, n)
    standard = steps * (4 * k * k * ell + 2 * k**3)
    if method == "standard":
        return standard
    restarts = default_gram_restarts(steps) if restarts is None else restarts
    segments = _gram_segments(steps, restarts)
    gram = 2 * k * k * ell * (1 + 2 * (len(segments) - 1) + 1)
    for seg in segments:
        gram += len(seg) * 2 * k**3  # R^2
        gram += (len(seg) - 1) * 2 * k**3  # P Q (the first step sets Q = P)
        gram += (len(seg) - 1) * 4 * k**3  # R <- P R P (not after the last step)
    if method == "gram":
        return gram
    return min(standard, gram)


def _resolve_method(method: str, m: int, n: int, steps: int, restarts: Sequence[int]) -> str:
    if method != "auto":
        return method
    gram = newton_schulz_flops(m, n, steps, "gram", restarts)
    return "gram" if gram < newton_schulz_flops(m, n, steps, "standard") else "standard"


def _aol_scale(x: jax.Array, gram: jax.Array, eps: Any) -> tuple[jax.Array, jax.Array]:
    """AOL rescaling ``D X``, ``D G D`` with ``D = diag(1 / sqrt(sum_j |G_ij|))``, ``G = X X^T``.

    Prach and Lampert (2022), Theorem 1: ``||D X||_2 <= 1``. ``eps`` is added to
    the root (a zero row stays zero).
    """
    d = 1.0 / (jnp.sqrt(jnp.sum(jnp.abs(gram), axis=-1)) + eps)
    return x * d[..., :, None], gram * d[..., :, None] * d[..., None, :]


def newton_schulz(
    x: jax.Array,
    coeffs: jax.Array,
    *,
    eps: float = 1e-8,
    compute_dtype: Any = None,
    check_finite: bool = True,
    method: str = "standard",
    prescale: str = "frobenius",
    gram_restarts: Sequence[int] | None = None,
) -> jax.Array:
    r"""Approximate polar factor ``U V^T`` of ``(..., m, n)`` matrices by Newton-Schulz.

    Each matrix is scaled so that every singular value is at most 1, then each
    step applies the odd quintic ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``
    (on the smaller side). The result is ``U p(S') V^T`` for the SVD
    ``X' = U S' V^T`` of the scaled matrix and ``p`` the composition of the step
    polynomials: the singular vectors are exact, the singular values are mapped
    towards 1. For the ``'standard'`` preset with 5 steps and the Frobenius
    scaling, singular values above ``~1e-3 ||X||_F`` map into ``[0.68, 1.13]``;
    smaller ones stay small (``p(s) ~ 3.4445^5 s``).

    Scalings (``prescale``):

    * ``'frobenius'``: ``X' = X / (||X||_F + eps)``.
    * ``'aol'`` (almost-orthogonal-layer rescaling, Prach and Lampert 2022, as
      Turbo-Muon uses it, Boissin et al. 2025): ``X' = D X`` with
      ``D = diag(1 / (sqrt(sum_j |G_ij|) + eps))``, ``G = X X^T`` on the smaller
      side, which guarantees ``||X'||_2 <= 1`` and is usually much closer to 1
      than the Frobenius scaling (small singular values start larger: one step
      fewer reaches the same band). ``G`` is the first step's Gram matrix, so the
      scaling costs no extra matmul. **``D`` is not a multiple of the identity:
      the result approximates the polar factor of ``D X``, not of ``X``**; the
      two agree when the rows (on the smaller side) of ``X`` have balanced
      absolute Gram sums, as gradients and momenta mostly do, and differ
      otherwise (``tests/test_gram_ns.py`` measures it).

    Methods (``method``), for ``m <= n`` (a tall matrix is transposed):

    * ``'standard'``: the iteration above, ``steps * (4 m^2 n + 2 m^3)`` flops.
    * ``'gram'`` (Gram Newton-Schulz; Dao AI Lab 2026): since ``X_{k+1} =
      h_k(R_k) X_k`` with ``R_k = X_k X_k^T`` and ``h_k(r) = a_k + b_k r + c_k
      r^2``, the iteration is carried on the ``m x m`` side only,
      ``Q_{k+1} = h_k(R_k) Q_k`` and ``R_{k+1} = h_k(R_k) R_k h_k(R_k)`` (all
      polynomials of one symmetric matrix, so they commute), and ``X = Q X_0``
      is formed once at the end: ``O(m^2 n)`` work three times instead of twice
      per step. The ``R`` recurrence accumulates round-off relative to the
      iterate (the small eigenvalues are amplified by ``h^2`` each step), so the
      iteration *restarts* before the steps in ``gram_restarts``: ``X <- Q X``,
      ``R <- X X^T``, ``Q <- I`` (:func:`default_gram_restarts`: every third
      step). In exact arithmetic the result is that of ``'standard'``.
    * ``'auto'``: ``'gram'`` where it has fewer flops
      (:func:`newton_schulz_flops`; aspect ratios ``n / m`` above ``~1.5`` at 5
      steps), else ``'standard'``; decided from the static shape.

    Zero matrices give zero; a matrix with a non-finite entry gives zeros (callers
    count it as a failure).

    Args:
      x: ``(..., m, n)`` matrices (leading axes are a batch).
      coeffs: ``(steps, 3)`` per-step coefficients (:func:`ns_coefficients`).
      eps: Added to the norm (``'aol'``: to each row's root) before dividing.
      compute_dtype: Iteration dtype (e.g. ``jnp.bfloat16`` for speed); default
        float32 (float64 inputs stay float64). The result has this dtype.
      check_finite: Zero matrices with non-finite entries first (callers whose
        input is already finite may skip the extra pass).
      method: ``'standard'``, ``'gram'`` or ``'auto'`` (static).
      prescale: ``'frobenius'`` or ``'aol'`` (static).
      gram_restarts: Step indices (``1 .. steps - 1``) before which the Gram
        iteration restarts (static; ``None``: :func:`default_gram_restarts`;
        ``()``: never). Ignored by ``'standard'``.

    Returns:
      ``(..., m, n)`` array.

    Raises:
      ValueError: For an unknown ``method`` or ``prescale``.

    Examples:
      The singular values go to 1, the singular vectors stay:

      >>> import jax.numpy as jnp
      >>> from layerwise_optax import linalg
      >>> x = jnp.array([[3.0, 0.0], [0.0, 0.5]])
      >>> r = linalg.newton_schulz(x, linalg.ns_coefficients('polar_express', 8))
      >>> [[round(v, 4) + 0.0 for v in row] for row in r.tolist()]
      [[1.0, 0.0], [0.0, 1.0]]

      The Gram iteration on a wide matrix gives the standard result to round-off:

      >>> import jax
      >>> w = jax.random.normal(jax.random.key(0), (8, 32))
      >>> c = linalg.ns_coefficients('standard', 5)
      >>> d = linalg.newton_schulz(w, c, method='gram') - linalg.newton_schulz(w, c)
      >>> bool(jnp.max(jnp.abs(d)) < 1e-4)
      True

    References:
      Jordan et al., `Muon: An optimizer for hidden layers in neural networks
      <https://kellerjordan.github.io/posts/muon/>`_, 2024 (the ``'standard'``
      quintic).
      Amsel et al., The Polar Express: Optimal Matrix Sign Methods and Their
      Application to the Muon Algorithm, 2025 (``'polar_express'``).
      Dao AI Lab (Amsel, Chen, Dao et al.), `Gram Newton-Schulz
      <https://tridao.me/blog/2026/gram-newton-schulz/>`_, 2026 (``'gram'``,
      restarts).
      Prach and Lampert, `Almost-Orthogonal Layers for Efficient General-Purpose
      Lipschitz Networks <https://arxiv.org/abs/2208.03160>`_, ECCV 2022; Boissin
      et al., `Turbo-Muon <https://arxiv.org/abs/2512.04632>`_, 2025 (``'aol'``).
    """
    if method not in NS_METHODS:
        raise ValueError(f"method must be one of {NS_METHODS}, got {method!r}.")
    if prescale not in NS_PRESCALES:
        raise ValueError(f"prescale must be one of {NS_PRESCALES}, got {prescale!r}.")
    dtype = jnp.dtype(compute_dtype) if compute_dtype is not None else _compute_dtype(x)
    if check_finite:
        ok = _finite_matrices(x)
        x = jnp.where(ok[..., None, None], x, 0)
    x = x.astype(jnp.promote_types(dtype, jnp.float32))
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:
        x = jnp.swapaxes(x, -1, -2)
    coeffs = jnp.asarray(coeffs).astype(dtype)
    steps = coeffs.shape[0]
    restarts = default_gram_restarts(steps) if gram_restarts is None else tuple(gram_restarts)
    method = _resolve_method(method, x.shape[-2], x.shape[-1], steps, restarts)

    # Default matmul precision, as optax.contrib.muon: the iteration is itself an
    # approximation and HIGHEST costs ~1.5x on CPU (and forbids TF32 on GPUs).
    first_gram = None
    if prescale == "aol":
        # The scaling is computed in the (at least float32) input dtype; the first
        # step's Gram matrix is the scaled one, formed without another matmul.
        x, first_gram = _aol_scale(x, _gram(x), eps)
        x, first_gram = x.astype(dtype), first_gram.astype(dtype)
    else:
        norm = jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True))
        x = (x / (norm + eps)).astype(dtype)

    if method == "gram":
        x = _gram_newton_schulz(x, coeffs, restarts, first_gram)
    else:
        for k in range(steps):
            gram = first_gram if k == 0 and first_gram is not None else _gram(x)
            a, b, c = coeffs[k, 0], coeffs[k, 1], coeffs[k, 2]
            x = a * x + jnp.matmul(b * gram + c * jnp.matmul(gram, gram), x)
    if not wide:
        x = jnp.swapaxes(x, -1, -2)
    return x


def _gram(x: jax.Array) -> jax.Array:
    return jnp.matmul(x, jnp.swapaxes(x, -1, -2))


def _gram_newton_schulz(
    x: jax.Array, coeffs: jax.Array, restarts: Sequence[int], first_gram: jax.Array | None
) -> jax.Array:
    """Gram Newton-Schulz on wide ``(..., m, n)`` scaled matrices (see :func:`newton_schulz`)."""
    steps = coeffs.shape[0]
    segments = _gram_segments(steps, restarts)
    # The m x m recurrence runs in at least float32: in bfloat16 its round-off
    # gives R spurious negative eigenvalues, which the odd quintic sends to -inf.
    small = jnp.promote_types(x.dtype, jnp.float32)
    coeffs = coeffs.astype(small)
    for s, seg in enumerate(segments):
        if s == 0 and first_gram is not None:
            r = first_gram.astype(small)
        else:
            r = jnp.matmul(x, jnp.swapaxes(x, -1, -2), preferred_element_type=small)
        q = None
        for k in seg:
            a, b, c = coeffs[k, 0], coeffs[k, 1], coeffs[k, 2]
            r2 = jnp.matmul(r, r)
            p = a * _eye_like(r) + b * r + c * r2  # h_k(R_k), symmetric
            q = p if q is None else jnp.matmul(p, q)
            if k != seg[-1]:
                # R_{k+1} = h R h = h (a R + b R^2 + c R^3); symmetrized against drift.
                r = symmetrize(jnp.matmul(p, a * r + b * r2 + c * jnp.matmul(r2, r)))
        assert q is not None  # every segment has a step
        x = jnp.matmul(q.astype(x.dtype), x)
    return x


def pi_damping(
    a: jax.Array,
    b: jax.Array,
    damping: jax.Array,
    *,
    a_diagonal: bool = False,
    b_diagonal: bool = False,
) -> tuple[jax.Array, jax.Array]:
    r"""Martens and Grosse's factored Tikhonov damping: ``lambda`` split between two factors.

    Damping a Kronecker-factored curvature ``A ⊗ B`` by ``lambda I`` is
    approximated by damping each factor,
    ``(A + delta_A I) ⊗ (B + delta_B I) = A ⊗ B + delta_B A ⊗ I + delta_A I ⊗ B
    + delta_A delta_B I``, with ``delta_A delta_B = lambda`` and the split
    chosen to minimise the trace of the two cross terms
    (``delta_B d_B tr A + delta_A d_A tr B``); the minimiser is

    .. math::
      \delta_A = \pi \sqrt{\lambda}, \quad \delta_B = \sqrt{\lambda} / \pi,
      \quad \pi = \sqrt{\frac{\operatorname{tr} A / d_A}{\operatorname{tr} B / d_B}}

    (Martens and Grosse 2015, section 6.3). Where either mean eigenvalue is not
    positive (an all-zero factor, as before any statistics arrive) ``pi = 1``:
    the damping is split evenly, ``sqrt(lambda)`` each.

    Args:
      a: ``(..., d_A, d_A)`` PSD factors, or their ``(..., d_A)`` diagonals
        (``a_diagonal``).
      b: ``(..., d_B, d_B)`` PSD factors, or ``(..., d_B)`` diagonals
        (``b_diagonal``); same batch shape as ``a``.
      damping: ``lambda >= 0``, a scalar.
      a_diagonal: Whether ``a`` holds diagonals.
      b_diagonal: Whether ``b`` holds diagonals.

    Returns:
      ``(delta_A, delta_B)``, each of the batch shape, ``delta_A delta_B = lambda``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from layerwise_optax import _linalg
      >>> a, b = 4.0 * jnp.eye(3)[None], jnp.eye(2)[None]
      >>> da, db = _linalg.pi_damping(a, b, jnp.asarray(0.01))
      >>> round(float(da[0]), 6), round(float(db[0]), 6)
      (0.2, 0.05)
    """

    def mean_eig(f, diagonal):
        return jnp.mean(f if diagonal else jnp.diagonal(f, axis1=-2, axis2=-1), axis=-1)

    return pi_split(mean_eig(a, a_diagonal), mean_eig(b, b_diagonal), damping)


def pi_split(ta: jax.Array, tb: jax.Array, damping: jax.Array) -> tuple[jax.Array, jax.Array]:
    """:func:`pi_damping` from the factors' mean eigenvalues ``tr A / d_A`` and ``tr B / d_B``.

    For factors stored apart (K-FAC's per-factor owner layout) only these
    scalars travel. ``pi = 1`` where either is not positive.

    Examples:
      >>> import jax.numpy as jnp
      >>> from layerwise_optax import _linalg
      >>> da, db = _linalg.pi_split(jnp.asarray([4.0]), jnp.asarray([1.0]), jnp.asarray(0.01))
      >>> round(float(da[0]), 6), round(float(db[0]), 6)
      (0.2, 0.05)
    """
    pi = jnp.sqrt(jnp.where((ta > 0) & (tb > 0), ta / jnp.where(tb > 0, tb, 1.0), 1.0))
    return pi * jnp.sqrt(damping), jnp.sqrt(damping) / pi


def add_ridge(a: jax.Array, delta: jax.Array, *, diagonal: bool = False) -> jax.Array:
    """``A + delta I`` per matrix of a batch (Tikhonov damping with a per-matrix ridge).

    Args:
      a: ``(..., n, n)`` matrices, or their ``(..., n)`` diagonals (``diagonal``).
      delta: ``(...)`` ridges, one per matrix (the batch shape of ``a``).
      diagonal: Whether ``a`` holds diagonals (the ridge is then added to every
        entry).

    Returns:
      ``a`` with ``delta`` added on the diagonal, same shape and dtype as ``a``
      (for float ``delta`` of at most ``a``'s precision).

    Examples:
      >>> import jax.numpy as jnp
      >>> from layerwise_optax import _linalg
      >>> _linalg.add_ridge(jnp.ones((1, 2, 2)), jnp.asarray([0.5]))[0].tolist()
      [[1.5, 1.0], [1.0, 1.5]]
    """
    if diagonal:
        return a + delta[..., None]
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)[(None,) * (a.ndim - 2)]
    return a + delta[..., None, None] * eye


CHOLESKY_QR_SHIFT = 10.0


def cholesky_qr(x: jax.Array, *, passes: int = 2, shift: float = CHOLESKY_QR_SHIFT) -> jax.Array:
    r"""Column-orthonormal factor of tall ``(..., m, r)`` matrices by shifted Cholesky QR.

    One pass is

    .. math::
      C = X^T X,\quad \delta = s\,\varepsilon\,\mathrm{tr}(C) + \mathrm{tiny},\quad
      L L^T = C + \delta I,\quad X \leftarrow X L^{-T},

    with ``s = shift``, ``eps`` the machine epsilon of the compute dtype and
    ``tiny`` its smallest normal number; ``passes=2`` (the default) is CholeskyQR2.
    The only reduction over the long side ``m`` is the small ``r x r`` Gram matrix
    ``C``; ``L^{-1}`` is formed once per matrix (``r x r``, on replicated data) and
    applied by a matmul, so under a mesh that shards ``X`` by rows nothing of size
    ``m`` is gathered.

    Accuracy (measured by ``tests/test_linalg.py``): in float64, for condition
    numbers ``kappa(X)`` up to ``1e6``, ``||Q^T Q - I|| < 1e-12`` and ``Q`` equals
    Householder QR's factor up to column signs to ``~1e-16 kappa``. In float32 both
    hold to a few ``1e-5`` (Frobenius norm) for ``kappa <~ 1e3``; beyond it (``kappa^2 eps >~ 1``)
    the shift dominates the small directions, and their columns come out shrunk
    instead of unit. Every pass is a contraction (``C \preceq C + delta I``), so the
    singular values of the result lie in ``[0, 1]`` up to round-off whatever the
    input. Rank deficiency: the first pass measures each column's norm after the
    shifted factorization (``||x_j||^2 = 1 - delta ||(L^{-1})_{j,:}||^2``, near 0
    for a column whose residual energy after the previous columns is below
    ``delta``); columns below ``1/2`` are set to exactly zero and the pass is
    factored again. A rank-``k`` or zero ``X`` thus gives ``k`` orthonormal
    columns and zero ones, deterministically (not round-off amplified). A
    non-finite input gives NaN.

    Args:
      x: ``(..., m, r)`` matrices (usually ``m >= r``).
      passes: Number of passes (static, ``>= 1``).
      shift: Relative diagonal shift ``s`` (static, ``>= 0``).

    Returns:
      ``(..., m, r)`` in the compute dtype (at least float32): the orthonormal
      factor ``Q`` of ``X = Q R`` with ``R`` upper triangular, positive diagonal.

    Examples:
      >>> import jax.numpy as jnp
      >>> from layerwise_optax import linalg
      >>> q = linalg.cholesky_qr(jnp.array([[3.0, 1.0], [4.0, 2.0], [0.0, 5.0]]))
      >>> bool(jnp.allclose(q.T @ q, jnp.eye(2), atol=1e-5))
      True

    References:
      Fukaya, Nakatsukasa, Yanagisawa and Yamamoto, `CholeskyQR2: A simple and
      communication-avoiding algorithm for computing a tall-skinny QR
      factorization on a large-scale parallel system
      <https://doi.org/10.1109/ScalA.2014.11>`_, 2014.
    """
    dtype = _compute_dtype(x)
    x = x.astype(dtype)
    info = jnp.finfo(dtype)

    def inverse_factor(c):
        low = jnp.linalg.cholesky(c)
        return jax.lax.linalg.triangular_solve(
            low, _eye_like(low), left_side=True, lower=True
        )  # L^{-1}

    def apply(x, inv):
        return jnp.einsum("...mj,...ij->...mi", x, inv, precision=HIGHEST)  # X L^{-T}

    for k in range(passes):
        c = symmetrize(jnp.einsum("...mi,...mj->...ij", x, x, precision=HIGHEST))
        delta = shift * info.eps * jnp.trace(c, axis1=-2, axis2=-1) + info.tiny
        inv = one_at_a_time_on_cpu(inverse_factor, add_ridge(c, delta))
        if k == 0:
            # Columns that the shift shrank below norm 1/2 add no direction of
            # energy above delta: drop them (zero) and factor again, so that they
            # are exactly zero rather than round-off amplified.
            # ||(X L^{-T})_j||^2 = (L^{-1} C L^{-T})_jj: r x r work, no reduction over m.
            gram = jnp.einsum("...ik,...kl,...jl->...ij", inv, c, inv, precision=HIGHEST)
            keep = jnp.diagonal(gram, axis1=-2, axis2=-1) > 0.5  # (..., r)
            x = x * keep[..., None, :]
            c = c * (keep[..., :, None] & keep[..., None, :])
            inv = one_at_a_time_on_cpu(inverse_factor, add_ridge(c, delta))
        x = apply(x, inv)
    return x


def normalize_columns(x: jax.Array, eps: Any, fallback: jax.Array | None = None) -> jax.Array:
    """Each column divided by its Euclidean norm plus ``eps``: ``X_j / (||X_j|| + eps)``.

    Args:
      x: ``(..., n, r)`` matrices.
      eps: Added to each norm (``>= 0``; may be traced).
      fallback: ``(..., n, r)``, or ``None``: where given, a column of ``x`` that
        is exactly zero takes ``fallback``'s column instead (Dion keeps its
        previous right factor for a zero gradient).

    Returns:
      ``(..., n, r)`` in ``x``'s compute dtype (at least float32).

    Examples:
      >>> import jax.numpy as jnp
      >>> from layerwise_optax import _linalg
      >>> _linalg.normalize_columns(jnp.array([[3.0, 0.0], [4.0, 0.0]]), 0.0,
      ...                           jnp.ones((2, 2))).tolist()
      [[0.6000000238418579, 1.0], [0.800000011920929, 1.0]]
    """
    x = x.astype(_compute_dtype(x))
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-2, keepdims=True))
    out = x / (norm + jnp.asarray(eps, x.dtype))
    if fallback is None:
        return out
    return jnp.where(norm > 0, out, fallback.astype(x.dtype))
