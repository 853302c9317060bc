"""K-FAC: Kronecker-factored natural gradient from layer statistics.

The transform never looks at a model: the layer statistics arrive as a keyword
extra argument ``kfac_stats`` of ``update`` (see :class:`KfacFactors`), produced
by any capture code (``layerwise_optax.flax`` for Flax NNX models, or your own).
Kernels are mapped to factors by the shared per-axis machinery: each kernel's
:class:`layerwise_optax.DimensionNumbers` has exactly two factor groups, the input
group (``A``'s axis) and the output group (``B``'s axis); batch axes are stacked
layers, each with its own factors.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from layerwise_optax import _axes, _checks, _distribute, _failure, _kron, _linalg, _owner

_STATIC_ARGS = (
    "max_precond_dim",
    "dimension_numbers",
    "damping_mode",
    "sides",
    "mu_dtype",
    "precond_dtype",
    "mask",
    "nesterov",
    "distribute",
    "axis_name",
    "state_layout",
    "owner_axes",
    "inverse",
    "statistics_frequency",
    "diagonal_fallback",
)

_SIDES = ("both", "input", "output")
_DAMPING_MODES = ("absolute", "pi", "exact")
_INVERSES = ("cholesky", "eigh")

EMIT_ARG = "kfac_emit"

NO_STATS_MSG = (
    "kfac's update needs the layer statistics as a keyword extra argument: "
    "tx.update(grads, state, params, kfac_stats=stats), where stats mirrors the params "
    "with a KfacFactors(a, g) at each kernel and None elsewhere."
)


class KfacFactors(NamedTuple):
    """One kernel's Kronecker factors, as estimated on a batch.

    With ``n`` examples and ``T`` positions per example (tokens, output pixels;
    ``T = 1`` for a dense layer on flat inputs) and rows ``r`` = examples ×
    positions, the convention of :func:`layerwise_optax.flax.kfac_value_and_grad`
    (KFC, Grosse and Martens 2016) is ``a = (1/n) Σ_r x_r x_r^T`` and
    ``g = (1/(n T)) Σ_r δ_r δ_r^T`` with ``δ = n dL/dz``.

    A kernel whose bias is *folded* (:class:`FoldedBias`, the default for Flax
    ``kernel``/``bias`` pairs) takes ``a`` in homogeneous coordinates: each input
    row gets a constant 1 appended, ``x̂_r = [x_r; 1]``, so ``a`` is
    ``(d_in + 1) × (d_in + 1)``: ``[[Σ x x^T, Σ x], [Σ x^T, n T]] / n``, whose
    last row holds the kernel–bias cross term ``E[x]`` and whose corner is ``T``.

    Attributes:
      a: Input covariance ``E[x x^T]``, shape ``(*batch, d_in, d_in)``, where
        ``d_in`` is the product of the kernel's input axes (for a conv kernel, the
        patch size ``kh * kw * c_in``), or ``(*batch, d_in + 1, d_in + 1)`` with a
        folded bias (last coordinate: the constant input 1).
      g: Output-gradient covariance ``E[delta delta^T]``, shape
        ``(*batch, d_out, d_out)``; shared by the kernel and its folded bias.
    """

    a: jax.Array
    g: jax.Array


@dataclasses.dataclass(frozen=True)
class FoldedBias:
    """Marks a bias that K-FAC preconditions together with its kernel.

    The layer ``z = x W + b`` is the kernel ``[W; b]`` acting on the input
    ``[x; 1]`` (homogeneous coordinates, Martens and Grosse 2015, section 3): the
    kernel's :class:`KfacFactors` carry the ``(d_in + 1)``-dimensional input
    factor, the bias shares the kernel's output factor ``g``, and
    :func:`kfac` preconditions ``[G_W; g_b]`` jointly, then splits the result.

    It is used in two trees, at the bias's position:

    * ``kfac(dimension_numbers=...)``: fold this bias into the kernel at
      ``kernel`` (the default layout does so for every leaf named ``bias`` next to
      a leaf named ``kernel``, the Flax naming);
    * ``kfac_stats=``: the statistics of this bias are in its kernel's
      homogeneous factors.

    It is a pytree with no leaves (it passes through ``jit`` and ``tree.map``).

    Attributes:
      kernel: The kernel's tree path, ``'/'``-joined (``'layers/0/kernel'``;
        dict keys, attributes and indices as plain strings, a Flax
        ``Variable``'s ``.value`` dropped).

    Examples:
      >>> import jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> params = {'w': jnp.zeros((3, 2)), 'b': jnp.zeros(2)}
      >>> tx = lo.kfac(1.0, momentum=0.0, damping=0.0, damping_mode='absolute',
      ...              dimension_numbers={'w': lo.DimensionNumbers(((0,), (1,))),
      ...                                 'b': lo.FoldedBias('w')})
      >>> stats = {'w': lo.KfacFactors(a=jnp.eye(4), g=jnp.eye(2)), 'b': lo.FoldedBias('w')}
      >>> grads = {'w': jnp.ones((3, 2)), 'b': jnp.full(2, 2.0)}
      >>> u, _ = tx.update(grads, tx.init(params), params, kfac_stats=stats)
      >>> u['b'].tolist()
      [-2.0, -2.0]
    """

    kernel: str

    def __post_init__(self):
        if not isinstance(self.kernel, str):
            raise TypeError(
                f"FoldedBias.kernel must be the kernel's '/'-joined path (a str), got "
                f"{type(self.kernel).__name__} {self.kernel!r}."
            )


jax.tree_util.register_static(FoldedBias)


class KfacDiagonal(NamedTuple):
    """One parameter's diagonal Fisher block, as estimated on a batch.

    For parameters whose curvature block is not a Kronecker product of an input
    and an output factor, e.g. the scale and shift of a normalization layer
    (kfac-jax's scale-and-shift blocks): with ``n`` examples and per-example
    gradients ``g_i`` of the parameter (``δ = n dL/dz`` summed over the
    example's positions, as for :class:`KfacFactors`), ``fisher = (1/n) Σ_i
    g_i ⊙ g_i``, the exact diagonal of the block ``E[g g^T]``. For a LayerNorm
    ``y = x̂ ⊙ γ + β``: ``g_γ = Σ_t δ_t ⊙ x̂_t`` and ``g_β = Σ_t δ_t``.

    :func:`kfac` keeps its EMA with the factors' decay and bias correction,
    ``F̄ <- β F̄ + (1 - β) F_t`` (stored in ``ScaleByKfacState.nu``, which a leaf
    with a diagonal block does not use for the fallback), and the update is
    ``U = G / (c F̄ + λ)`` (``c``: the bias correction ``1 / (1 - β^t)``,
    ``λ = damping`` in both damping modes: one block, nothing to split), applied
    from the current EMA every step (the inverse of a diagonal is elementwise:
    nothing to refresh). Non-finite statistics or gradients leave the EMA as it
    was and give a zero update (counted in ``failures.skipped``).

    Attributes:
      fisher: The diagonal, shaped like the parameter, non-negative.

    Examples:
      >>> import jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> params = {'scale': jnp.ones(2)}
      >>> tx = lo.kfac(1.0, momentum=0.0, factor_decay=0.0, damping=1.0)
      >>> stats = {'scale': lo.KfacDiagonal(jnp.array([1.0, 3.0]))}
      >>> u, _ = tx.update({'scale': jnp.ones(2)}, tx.init(params), params, kfac_stats=stats)
      >>> u['scale'].tolist()
      [-0.5, -0.25]

    References:
      Martens and Grosse, `Optimizing Neural Networks with Kronecker-factored
      Approximate Curvature <https://arxiv.org/abs/1503.05671>`_, 2015.
    """

    fisher: jax.Array


@dataclasses.dataclass(frozen=True)
class DiagonalFactors:
    """A K-FAC kernel layout whose factors of some groups keep only their diagonal.

    Used in :func:`kfac`'s ``dimension_numbers`` in place of a
    :class:`layerwise_optax.DimensionNumbers`: the kernel is laid out by
    ``dimension_numbers`` and the factor of each group in ``groups`` (``0``: the
    input group ``A``, ``1``: the output group ``B``) is stored and inverted as
    a diagonal, ``d`` floats instead of ``d × d``, whatever ``max_precond_dim``.
    For an embedding table ``(V, d)`` looked up by one-hot ids, the input
    covariance ``A = diag(counts) / n`` is exactly diagonal, so
    ``DiagonalFactors(DimensionNumbers(((0,), (1,))), (0,))`` preconditions the
    table as ``diag(A)^{-1} ⊗ B^{-1}`` without a ``V × V`` matrix (what
    :func:`layerwise_optax.flax.kfac_dimension_numbers` gives ``nnx.Embed``).
    The statistics may give such a factor as its diagonal ``(*batch, d)`` or as
    a full matrix (its diagonal is kept).

    It is static (hashable, no pytree leaves).

    Attributes:
      dimension_numbers: The kernel's layout, two factor groups.
      groups: The factor groups kept diagonal, a tuple of ``0`` and/or ``1``.

    Raises:
      ValueError: If ``groups`` is not a tuple of distinct ``0``/``1``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> spec = lo.DiagonalFactors(lo.DimensionNumbers(((0,), (1,))), (0,))
      >>> tx = lo.kfac(1.0, momentum=0.0, damping=0.0, damping_mode='absolute',
      ...              dimension_numbers={'table': spec})
      >>> params = {'table': jnp.zeros((3, 2))}
      >>> stats = {'table': lo.KfacFactors(a=jnp.array([1.0, 2.0, 4.0]), g=jnp.eye(2))}
      >>> u, _ = tx.update({'table': jnp.ones((3, 2))}, tx.init(params), params,
      ...                  kfac_stats=stats)
      >>> u['table'][:, 0].tolist()
      [-1.0, -0.5, -0.25]
    """

    dimension_numbers: _axes.DimensionNumbers
    groups: tuple[int, ...] = (0,)

    def __post_init__(self):
        groups = self.groups
        if (
            not isinstance(groups, tuple)
            or len(set(groups)) != len(groups)
            or any(not isinstance(g, int) or isinstance(g, bool) or g not in (0, 1) for g in groups)
        ):
            raise ValueError(
                f"DiagonalFactors.groups must be a tuple of distinct factor groups 0 (input) "
                f"and 1 (output), got {groups!r}."
            )


jax.tree_util.register_static(DiagonalFactors)


class ScaleByKfacState(NamedTuple):
    """State for :func:`scale_by_kfac`.

    Attributes:
      count: int32 scalar, number of updates so far.
      mu: Momentum of the preconditioned updates; params tree, ``mu_dtype``.
      nu: EMA of squared gradients, used by leaves that have no statistics
        (diagonal fallback); params tree, float32. With
        ``diagonal_fallback=False`` an empty ``(0, ..., 0)`` array of the leaf's
        rank at every leaf with a K-FAC layout (and each bias folded into one).
      factors: Per kernel the EMAs ``(A, B)`` as ``(batch, d, d)`` arrays, dtype
        ``precond_dtype`` (``A``
        homogeneous, ``d_in + 1``, for a kernel with a folded bias); per other
        leaf ``(stack, 0)`` placeholders; ``optax.MaskedNode`` at folded biases
        (their factors are their kernel's).
      inverses: Per kernel the damped factors' inverses in factored form, same
        layout as ``factors``: for a full factor the inverse ``(A + d_A I)^{-1}``
        of the damped factor (by Cholesky,
        :func:`layerwise_optax.linalg.inv_psd_cholesky`; applied by one matrix
        product per side, so an ordinary step is matmuls only), for a diagonal
        one the inverse of the damped diagonal; identity for
        a factor that ``sides`` does not apply. With ``inverse='eigh'`` the
        undamped factors' eigendecompositions instead: per full factor one
        ``(batch, d + 1, d)`` array, the eigenvectors ``U`` (columns) in its first
        ``d`` rows and the eigenvalues (ascending, clipped at 0) in its last; per
        diagonal factor the diagonal itself.
      failures: :class:`~layerwise_optax._failure.FailureCounts` (the failure
        policy's counters). ``skipped``: (leaf, step) pairs whose gradient or statistics
        were not finite and were kept out of the state. ``failed``: (factor, refresh) pairs whose factorization failed
        (not positive definite in float32, or not finite), so the previous one
        was kept.
      pending: Per kernel the mean of the statistics of the mini-steps of an
        accumulation not yet emitted, same layout as ``factors``, when the state
        is wrapped by :func:`layerwise_optax.multi_steps` (which allocates it at
        ``init``); otherwise ``(stack, 0, ...)`` placeholders (no memory).
      pending_count: int32 scalar, the number of mini-steps in ``pending``.
      diagonal: Per leaf a bool scalar, whether its last statistics were a
        :class:`KfacDiagonal` block (params tree): on a step without statistics
        (``statistics_frequency > 1``) such a leaf steps with its kept EMA in
        ``nu``, not the fallback.

    In the owner layout (``state_layout`` of :func:`scale_by_kfac`)
    ``factors``, ``inverses`` and ``pending`` are grouped
    (``layerwise_optax._owner.Grouped``): per bucket of factor lengths one
    stack of single factors, each in the leading corner of an entry of the
    bucket's largest length (``layerwise_optax._owner.FactorGroup``; with
    ``sides`` other than ``'both'``, ``inverse='eigh'`` or inside ``jax.pmap``:
    per group of kernels with the same factor shapes one stack of layer
    slices, a folded kernel's slice holding its bias as the last input row),
    sharded along the stack axis, and per leaf without factors its entry as
    above. ``mu`` and ``nu`` stay params trees,
    sharded like their parameters (:func:`layerwise_optax.state_shardings`).

    .. note::
      Memory per kernel with ``d_in × d_out`` factors: ``2 (d_in^2 + d_out^2)``
      floats per layer slice (factors and inverses; ``3 (...)`` under
      :func:`layerwise_optax.multi_steps`, with the pending statistics), plus
      two params-sized moments.
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    factors: optax.Updates
    inverses: optax.Updates
    failures: _failure.FailureCounts
    pending: optax.Updates
    pending_count: jax.Array
    diagonal: Any = None


def default_kernel_dimension_numbers(shape: tuple[int, ...]) -> _axes.DimensionNumbers | None:
    """K-FAC's default layout: Flax kernels, inputs first and outputs last.

    A dense kernel ``(in, out)`` is ``((0,), (1,))``; a conv kernel
    ``(*window, in, out)`` is ``((0, ..., n-2), (n-1,))``; a bias ``(out,)`` is
    ``((), (0,))``, a kernel with a unit input (its constant-1 input), so it is
    preconditioned by its layer's output factor when statistics are given (the
    *separate* bias block); scalars have no factors. Stacked layers need
    ``batch_axes`` given explicitly. On a whole tree, :func:`kfac`'s default
    layout also folds every leaf named ``bias`` into a sibling leaf named
    ``kernel`` (:class:`FoldedBias`) when the bias has the kernel's output shape,
    and gives a norm layer's ``scale`` and ``bias`` (siblings without a kernel)
    no factors (``None``).

    Args:
      shape: The leaf's shape.

    Returns:
      A :class:`layerwise_optax.DimensionNumbers`, or ``None``.

    Examples:
      >>> import layerwise_optax as lo
      >>> lo.default_kernel_dimension_numbers((3, 3, 8, 16))  # conv: (window·in) x out
      DimensionNumbers(factor_axes=((0, 1, 2), (3,)), batch_axes=(), identity_axes=())
      >>> lo.default_kernel_dimension_numbers((16,))  # a bias: unit input, output factor
      DimensionNumbers(factor_axes=((), (0,)), batch_axes=(), identity_axes=())
      >>> lo.default_kernel_dimension_numbers(()) is None
      True
    """
    if not shape:
        return None
    return _axes.DimensionNumbers((tuple(range(len(shape) - 1)), (len(shape) - 1,)))


class _Hyper(NamedTuple):
    """The numeric hyperparameters as float32 arrays (plain and injected alike)."""

    momentum: jax.Array
    b2: jax.Array
    factor_decay: jax.Array
    damping: jax.Array


@dataclasses.dataclass(frozen=True)
class _Static:
    """The static (shape- and branch-fixing) options of one :func:`scale_by_kfac`."""

    sides: str
    damping_mode: str
    nesterov: bool
    distribute: bool
    axis_name: Any
    mu_dtype: Any
    precond_dtype: Any
    inverse: str = "cholesky"
    statistics_frequency: int = 1
    diagonal_fallback: bool = True


class _Accumulated(NamedTuple):
    """One leaf after :func:`_accumulate`: validity, factor EMAs, pending statistics mean."""

    ok: Any
    factors: Any
    stats: Any = None


class _LeafOut(NamedTuple):
    """One leaf after :func:`_directions`: its update, moments and validity."""

    update: Any
    mu: Any
    nu: Any
    ok: Any


def scale_by_kfac(
    momentum: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    factor_decay: jax.typing.ArrayLike = 0.95,
    damping: jax.typing.ArrayLike = 1e-1,
    precondition_frequency: jax.typing.ArrayLike = 1,
    max_precond_dim: int | None = None,
    dimension_numbers: _axes.DimNumsOrFn | None = None,
    damping_mode: Literal["absolute", "pi", "exact"] = "pi",
    sides: Literal["both", "input", "output"] = "both",
    mu_dtype: jax.typing.DTypeLike | None = None,
    precond_dtype: jax.typing.DTypeLike | None = None,
    *,
    nesterov: bool = False,
    distribute: bool = True,
    axis_name: str | tuple[str, ...] | None = None,
    state_layout: Literal["auto", "owner", "replicated"] = "auto",
    owner_axes: str | tuple[str, ...] | None = None,
    inverse: Literal["cholesky", "eigh"] = "cholesky",
    statistics_frequency: int | None = None,
    diagonal_fallback: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Preconditions kernels by ``A^{-1} G B^{-1}`` from layer statistics; see :func:`kfac`.

    Each update runs four phases, in the order of Martens and Grosse (2015):
    :func:`_accumulate` (the given statistics into the factor EMAs),
    :func:`_refresh` (the damped factors' inverses by Cholesky, or with
    ``inverse='eigh'`` the factors' eigendecompositions, :func:`_eigh_tree`,
    under ``lax.cond`` every ``precondition_frequency`` steps), :func:`_directions` (the
    preconditioned gradient, or the diagonal fallback) with :func:`_momentum`,
    and :func:`_outputs` (the new state, back in the params' layout).

    Args:
      momentum: Momentum: decay of the EMA of the preconditioned updates, ``m <-
        momentum m + (1 - momentum) U`` (an average, not optax's heavy-ball
        ``trace``, and not bias-corrected: not Adam's ``b1``), in ``[0, 1)``.
      b2: Decay of the diagonal fallback's squared-gradient EMA, in ``[0, 1)``.
      factor_decay: EMA decay of ``A`` and ``B``, in ``[0, 1]`` (``0``: the current
        batch's factors only, as in the paper's stylized update; ``1``: sum).
      damping: Tikhonov damping ``lambda`` of the Kronecker-factored curvature
        (it bounds the step at about ``|G| / lambda``; see :func:`kfac`).
      precondition_frequency: Steps between refreshes of the inverses, an int
        ``>= 1`` (may be traced).
      max_precond_dim: Factor dimensions longer than this keep only the diagonal
        of their factor (static; ``None``: 4096).
      dimension_numbers: Spec tree or callable giving each kernel's
        ``(input group, output group)``, and :class:`FoldedBias` at each bias
        folded into its kernel; ``None``: :func:`default_layout` (Flax layouts,
        ``bias`` folded into its sibling ``kernel``, an ``embedding`` table's
        input factor kept diagonal, no factors for a norm layer's ``scale`` and
        ``bias``).
      damping_mode: ``'pi'`` (Martens and Grosse's factored damping: ``A + pi
        sqrt(lambda) I`` and ``B + sqrt(lambda) / pi I`` with
        ``pi = sqrt((tr A / d_A) / (tr B / d_B))``) or ``'absolute'``
        (``A + lambda I`` and ``B + lambda I``). With one side applied
        (``sides='input'`` or ``'output'``) both modes damp that factor by
        ``lambda``: the other factor is the identity and ``A ⊗ I + lambda I = (A +
        lambda I) ⊗ I`` exactly; a damping never depends on a factor that is not
        applied. ``'exact'`` (``inverse='eigh'`` only): the inverse of the
        Kronecker sum ``A ⊗ B + lambda I`` itself, ``U_A [(U_A^T G U_B) ⊘ (s_A
        s_B^T + lambda)] U_B^T``, without the factored damping's cross terms
        ``delta_B A ⊗ I + delta_A I ⊗ B``.
      sides: ``'both'`` (K-FAC), ``'input'`` (``A^{-1} G``: one-sided whitening,
        the paper's single-index update and DFW's ``P = I, Q = Sigma``) or
        ``'output'`` (``G B^{-1}``).
      mu_dtype: Storage dtype of the momentum.
      precond_dtype: Storage dtype of the factor EMAs, the pending statistics
        of :func:`layerwise_optax.multi_steps` and the inverses
        (``None``: float32). Accumulation and factorization always run in
        float32 (the stored values are cast up on read); a narrower dtype such
        as ``jnp.bfloat16`` halves those arrays (about half of K-FAC's state:
        ``d_in^2 + d_out^2`` per layer each for factors and inverses, and
        pending statistics under :func:`layerwise_optax.multi_steps`). The EMAs are stored with stochastic rounding
        (:func:`layerwise_optax._kron.stochastic_round`): rounded to nearest,
        an EMA with ``1 - factor_decay`` below bfloat16's resolution would stop
        moving; stochastically rounded it follows the float32 EMA within
        ``2^{-9} / sqrt(2 (1 - factor_decay))`` relative noise per entry at
        most (0.6% at the default 0.95, 4% at 0.999; the project's ``benchmarks.compressed_state``
        measures the cost in steps to target). A dtype that is not a float
        raises ``TypeError`` naming the argument.
      nesterov: Nesterov momentum.
      distribute: Under a mesh set with :func:`jax.set_mesh`, batch the
        same-sized factors of all layers and split their inverses over its
        devices (each factor inverted on one device); no effect without a mesh.
      axis_name: Inside ``jax.pmap`` (or ``shard_map``) over data shards: the
        axis over which the captured statistics are averaged (``lax.pmean``)
        before they enter the factors, so that every device keeps the factors
        of the whole batch. ``None``: the statistics are used as given (already
        global, e.g. under ``jit`` with sharded batches).
      state_layout: Where the per-layer state (factor EMAs, inverses,
        pending statistics) lives on a device mesh. ``'auto'``
        (default): the *owner layout* when ``init`` runs under a mesh of more
        than one device (:func:`jax.set_mesh`, or params sharded over one;
        :func:`layerwise_optax.state_shardings` sets it), else replicated.
        ``'owner'``: every factor (``A``: ``d_in``, or ``d_in + 1`` with a
        folded bias; ``G``: ``d_out``) is stored on its own, factors whose
        lengths are within 4/3 of each other stacked together, each in the
        leading corner of an entry of the largest length with the identity
        around it (exact), and each stack sharded along its stack axis over
        the mesh (padded to a multiple of the device count). Each device
        stores, accumulates and factorizes only its own factors; a layer's
        gradient is solved with ``A`` on ``A``'s owner and then with ``G`` on
        ``G``'s owner (two all-reduces of the kernels per step), and the state
        per device shrinks with the device count (6.85x at 8 devices on a
        784-1024-1024-1024-10 MLP). With ``sides`` other than ``'both'``,
        ``inverse='eigh'`` or inside ``jax.pmap`` the layer slices of all
        kernels with the same factor shapes are stacked instead (fewer stack
        entries, so less spread over the devices). Without a mesh the stacks
        are kept whole. The moments ``mu`` and ``nu`` stay
        params-shaped in every layout (sharded like their parameters by
        :func:`layerwise_optax.state_shardings`). ``'replicated'``: per leaf,
        every factor on every device (the layout of earlier versions). The updates are the
        same in every layout. Static; checkpoints restore into the layout they
        were saved in.
      owner_axes: Mesh axes the owner layout shards the slice axis over
        (``None``: all of them; a name or a tuple of names). Under ``jax.pmap``
        (or ``jax.shard_map``) with ``state_layout='owner'`` it names the mapped
        axis (pmap's ``axis_name``): ``init`` runs inside the pmap and each
        device's state holds only its ``padded / devices`` layer slices of every group;
        ``update`` runs inside a pmap over the same axis and device count, takes
        each device's layer slices at ``lax.axis_index`` and gathers the preconditioned
        ones with one ``lax.all_gather`` per group. Static.
      inverse: How the damped factors are inverted at each refresh. ``'cholesky'``
        (default): the inverses of the *damped* factors by Cholesky, applied by
        one matrix product per side (cheapest; a changed ``damping`` acts at the
        next refresh). ``'eigh'``: the eigendecompositions ``A = U_A diag(s_A) U_A^T``
        of the *undamped* (bias-corrected) factors, with the damping applied at
        every step in the eigenbases, ``(A + delta_A I)^{-1} = U_A diag(1 / (s_A +
        delta_A)) U_A^T`` (``pi`` from the eigenvalues' sums, the traces): a
        ``damping`` changed between refreshes (a schedule, ``inject_hyperparams``,
        adaptive damping) needs no new factorization, and ``damping_mode='exact'``
        is available. Equal to ``'cholesky'`` up to float32 round-off at the same
        damping; an ``eigh`` costs about 10x a Cholesky factorization and stores
        ``d^2 + d`` floats per factor. Damped eigenvalue products are floored at
        ``eps * max`` per layer, so undamped singular factors give finite steps.
        A decomposition that is not finite keeps the previous one and is counted
        (``failed``). Static.
      statistics_frequency: Statistics arrive every ``k`` steps (the steps whose
        count is ``0, k, 2k, ...``); static int ``>= 1``. With ``k > 1``,
        ``kfac_stats=None`` is a step without statistics (not the diagonal
        fallback): the factor EMAs and pending statistics are kept, every kernel
        whose factors have had statistics is preconditioned by its current
        inverses (refreshed on the ``precondition_frequency`` schedule, except
        on a step without statistics when the last step with statistics
        refreshed already: its factors have not changed since; so with
        ``inverse='cholesky'`` a changed ``damping`` waits for the next
        refresh), the others take the diagonal fallback; the EMAs are
        debiased by their number of updates, ``(count - 1) // k + 1``. With
        ``k = 1`` (``None``, the default) ``kfac_stats`` is required on every
        step, as before.
        Not yet supported in the owner layout (``ValueError`` at the step).
        Under :func:`layerwise_optax.multi_steps` give statistics on all
        mini-steps of an accumulation or on none: the statistics pending from
        earlier mini-steps enter the factors only with new ones.
        The capture cost then falls by about ``k``x (capture with
        :func:`layerwise_optax.flax.kfac_value_and_grad` only on those steps,
        a plain ``nnx.value_and_grad`` on the others; a separately jitted step).
      diagonal_fallback: ``True`` (default): every leaf keeps the params-shaped
        second moment ``nu`` of the diagonal fallback, so a kernel may be given
        ``None`` statistics (or none) on any step. ``False``: ``nu`` is
        allocated only for the leaves without a K-FAC layout (norms, vectors,
        leaves whose ``dimension_numbers`` entry is ``None``), which saves one
        float per kernel (and folded bias) parameter, as kfac-jax keeps no such
        moment: then every leaf with a K-FAC layout needs its
        :class:`KfacFactors` on every step with statistics (``ValueError`` at
        the step, naming the leaf, otherwise), and on a step without
        statistics (``statistics_frequency``) a kernel that has never had
        statistics is preconditioned by its initial (identity) inverses.
        Static bool.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with state
      :class:`ScaleByKfacState`; its update requires ``kfac_stats=``.

    Raises:
      ValueError: At construction for bad hyperparameters; at ``init`` if a
        kernel's spec does not have exactly two factor groups, a
        :class:`FoldedBias` names no kernel of the right shape or ``owner_axes``
        names an axis the mesh does not have; at ``update`` if
        ``kfac_stats`` is missing, has an entry that matches no parameter, omits a
        leaf of a layer it has statistics for, or a factor's shape does not fit
        its kernel (see :func:`kfac` for the matching rule). Each names the path.
        At construction with ``damping_mode='exact'`` and ``inverse='cholesky'``,
        and at ``update`` with ``kfac_stats=None`` in the owner layout.
        Also at ``init`` with ``state_layout='owner'`` inside ``jax.pmap``
        without ``owner_axes`` or with one that is not mapped there, or outside
        any mesh and pmap with ``owner_axes``; at ``update`` of a state built
        inside pmap outside a pmap over its axis or over another device count.

    Examples:
      Undamped, the direction is ``A^{-1} G B^{-1}``: here each row of ``G`` is
      divided by its input's variance (the momentum only scales it).

      >>> import jax, jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> params = {'w': jnp.zeros((2, 2))}
      >>> stats = {'w': lo.KfacFactors(a=jnp.diag(jnp.array([4.0, 1.0])), g=jnp.eye(2))}
      >>> tx = lo.scale_by_kfac(damping=0.0, damping_mode='absolute')
      >>> updates, state = jax.jit(tx.update)({'w': jnp.ones((2, 2))}, tx.init(params),
      ...                                     params, kfac_stats=stats)
      >>> (updates['w'] / updates['w'][1, 0]).tolist()
      [[0.25, 0.25], [1.0, 1.0]]

    References:
      Martens and Grosse, `Optimizing Neural Networks with Kronecker-factored
      Approximate Curvature <https://arxiv.org/abs/1503.05671>`_, 2015.
    """
    _validate(momentum, b2, factor_decay, damping, precondition_frequency, max_precond_dim)
    _validate_static(dimension_numbers, damping_mode, sides, nesterov, distribute, axis_name)
    _validate_inverse(inverse, damping_mode)
    _checks.positive_int("statistics_frequency", statistics_frequency, allow_none=True)
    statistics_frequency = 1 if statistics_frequency is None else statistics_frequency
    _checks.boolean("diagonal_fallback", diagonal_fallback)
    _checks.one_of("state_layout", state_layout, _owner.LAYOUTS)
    _checks.axis_names("owner_axes", owner_axes)
    max_precond_dim = 4096 if max_precond_dim is None else max_precond_dim
    mu_dtype = _checks.canonicalize_dtype(mu_dtype, "mu_dtype")
    precond_dtype = _checks.canonicalize_dtype(precond_dtype, "precond_dtype") or jnp.float32
    static = _Static(
        sides,
        damping_mode,
        nesterov,
        distribute,
        axis_name,
        mu_dtype,
        precond_dtype,
        inverse,
        statistics_frequency,
        diagonal_fallback,
    )
    if dimension_numbers is None:
        dimension_numbers = default_layout

    def plans_for(tree):
        """The tree's static :class:`_Layout` (working plans and folded biases)."""
        return _layout(dimension_numbers, tree, max_precond_dim)

    def init_fn(params):
        layout = plans_for(params)
        plans = layout.work_plans
        work = _fold(layout, params)
        owner = _owner.decide(state_layout, owner_axes, plans, work)
        if owner is None:
            state = _init(params, plans, mu_dtype, precond_dtype, inverse)
        elif _per_factor_eligible(owner, plans, static):
            state = _per_factor_init(owner, plans, params, work, mu_dtype, precond_dtype)
        else:
            state = _owned_init(owner, plans, params, work, mu_dtype, precond_dtype, inverse)
        if diagonal_fallback:
            return state
        return state._replace(nu=_without_fallback_moment(layout, state.nu))

    def update_fn(updates, state, params=None, *, kfac_stats=None, **extra_args):
        # Set by layerwise_optax.multi_steps: False on the mini-steps that only
        # accumulate statistics (the caller keeps only ``pending`` of that state).
        emit = jnp.asarray(extra_args.get(EMIT_ARG, True), jnp.bool_)
        accumulating = EMIT_ARG in extra_args
        del params, extra_args
        if kfac_stats is None and statistics_frequency == 1:
            raise ValueError(NO_STATS_MSG)
        with jax.named_scope("layerwise_optax.kfac"):
            hp = _Hyper(*_checks.hyperparameters(momentum, b2, factor_decay, damping))
            layout = plans_for(updates)
            plans = layout.work_plans
            if kfac_stats is None:
                # A step without statistics: no diagonal blocks are known (see
                # _no_new_stats); leaves without a K-FAC layout take the fallback.
                stats, diagonal = _no_new_stats(updates, layout, state), None
                held = state.diagonal
            else:
                stats = _match_stats(kfac_stats, updates, layout, static.axis_name)
                if not diagonal_fallback:
                    _require_factors(layout, stats)
                # Diagonal blocks (KfacDiagonal) skip the factor phases: only their fisher goes on.
                stats, diagonal = _split_diagonal(stats, updates)
                if accumulating:
                    _refuse_accumulated_diagonal(diagonal)
                held = None
            # Folded kernel-bias pairs are one homogeneous leaf at the kernel's
            # position (the bias's is masked) until _outputs splits them.
            grads = _fold(layout, updates)
            owner = _owner.layout_of(state)
            if owner is not None:
                owned_update = _per_factor_update if owner.per_factor else _owned_update
                out, owned = owned_update(
                    owner,
                    layout,
                    updates,
                    grads,
                    stats,
                    state,
                    diagonal=diagonal,
                    hp=hp,
                    frequency=precondition_frequency,
                    static=static,
                    emit=emit,
                )
                return out, owned._replace(diagonal=_diagonal_flags(updates, diagonal, state))
            run = functools.partial(
                _step,
                hp=hp,
                frequency=precondition_frequency,
                static=static,
                emit=emit,
                no_stats=kfac_stats is None,
            )
            nu = _fold(layout, state.nu, skip_placeholders=not diagonal_fallback)
            work_state = state._replace(mu=_fold(layout, state.mu), nu=nu)
            new = run(grads, stats, work_state, plans, diagonal=diagonal, held=held)
            back = functools.partial(_unfold, layout)
            new_state = _new_state(plans, work_state, new, static.mu_dtype)
            new_state = new_state._replace(
                mu=back(new_state.mu, state.mu),
                nu=_unfold(layout, new_state.nu, state.nu, skip_placeholders=not diagonal_fallback),
                diagonal=_diagonal_flags(updates, diagonal, state),
            )
            return back(_axes.unzip(new.out, "update"), updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _validate(momentum, b2, factor_decay, damping, precondition_frequency, max_precond_dim):
    """Range checks of the numeric hyperparameters (skipped for traced values)."""
    _checks.in_unit_interval("momentum", momentum)
    _checks.in_unit_interval("b2", b2)
    _checks.in_unit_interval("factor_decay", factor_decay, right_closed=True)
    _checks.non_negative("damping", damping)
    _checks.traceable_int("precondition_frequency", precondition_frequency, minimum=1)
    _checks.positive_int("max_precond_dim", max_precond_dim, allow_none=True)


def _validate_static(dimension_numbers, damping_mode, sides, nesterov, distribute, axis_name):
    """Checks of the static (non-numeric) arguments."""
    if dimension_numbers is not None:
        _checks.tree_or_callable("dimension_numbers", dimension_numbers)
    _checks.one_of("damping_mode", damping_mode, _DAMPING_MODES)
    _checks.one_of("sides", sides, _SIDES)
    _checks.boolean("nesterov", nesterov)
    _checks.boolean("distribute", distribute)
    if axis_name is not None and not (
        isinstance(axis_name, str)
        or (isinstance(axis_name, tuple) and all(isinstance(a, str) for a in axis_name))
    ):
        raise TypeError(
            f"axis_name must be None, a str or a tuple of str, got "
            f"{type(axis_name).__name__} {axis_name!r}."
        )


def _init(
    params: Any, plans: Any, mu_dtype: Any, precond_dtype: Any, inverse: str = "cholesky"
) -> ScaleByKfacState:
    """Zero moments and factor EMAs, identity inverses (per kernel in the working layout).

    Factor EMAs, pending statistics and inverses are stored in ``precond_dtype``;
    with ``inverse='eigh'`` the inverses are the packed eigendecompositions of
    the identity (:func:`_eigh_init`).
    """

    def factors(p, plan):
        return _kron.init_factors(_kernel_plan(plan), precond_dtype)

    def eyes(p, plan):
        if inverse == "eigh":
            return _eigh_init(_kernel_plan(plan), precond_dtype)
        return _kron.init_factors(_kernel_plan(plan), precond_dtype, identity=True)

    return ScaleByKfacState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=jax.tree.map(
            lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params
        ),
        # Per-leaf factor tuples are stored bare (see _axes.bare).
        factors=_axes.bare(plans, _axes.map_leaves(factors, plans, params)),
        inverses=_axes.bare(plans, _axes.map_leaves(eyes, plans, params)),
        failures=_failure.zeros(),
        pending=_no_pending(_axes.bare(plans, _axes.map_leaves(factors, plans, params))),
        pending_count=jnp.zeros([], jnp.int32),
        diagonal=jax.tree.map(lambda p: jnp.zeros([], jnp.bool_), params),
    )


def _match_stats(kfac_stats: Any, updates: Any, layout: _Layout, axis_name: Any) -> Any:
    """The statistics matched to the updates' leaves and checked (:func:`_stats_like`).

    With ``axis_name`` (inside ``pmap``/``shard_map`` over data shards) they are
    averaged over that axis, ``A = mean_k A_k`` and ``B = mean_k B_k``, so every
    device builds the factors of the whole batch.
    """
    stats = _stats_like(kfac_stats, updates, layout)
    if axis_name is not None:
        stats = jax.tree.map(lambda x: jax.lax.pmean(x, axis_name), stats)
    return stats


def _accumulate(
    grads: Any, stats: Any, state: ScaleByKfacState, plans: Any, decay: jax.Array
) -> Any:
    """Phase 1: this step's statistics into the factor EMAs, per kernel.

    ``A_bar <- beta A_bar + (1 - beta) A_t`` and ``B_bar <- beta B_bar + (1 -
    beta) B_t`` (``beta = factor_decay``; at ``beta = 1`` a running sum), where
    ``(A_t, B_t)`` is the mean of the statistics of this step and of the
    mini-steps pending in an accumulation (:func:`_with_pending`). A leaf whose
    gradient or statistics are not finite keeps its EMAs and pending mean
    (:mod:`layerwise_optax._failure`). Returns per leaf an :class:`_Accumulated`
    (validity, new EMAs, new pending mean).
    """
    leaf = functools.partial(_accumulate_leaf, pending_count=state.pending_count, decay=decay)
    return _axes.map_leaves(
        leaf,
        plans,
        grads,
        stats,
        _kron.normalize(plans, state.factors),
        _kron.normalize(plans, state.pending),
    )


def _accumulate_leaf(g, plan, s, fac, pend, *, pending_count, decay) -> _Accumulated:
    """:func:`_accumulate` for one leaf (no statistics: validity only).

    An owner-layout group (``plan.per_block``) has one flag per block; blocks
    without statistics (:class:`_Partial`) keep their EMAs and pending mean.
    """
    ok, _ = _failure.guard(g, per_block=plan.per_block)
    if plan.spec is None or s is None or isinstance(s, _NoNewStats):
        return _Accumulated(ok, fac, pend)
    s, present = _present(s)
    new = _stats_view(s, plan)
    ok = ok & _failure.fit(_kron.all_finite(new, per_block=plan.per_block), ok)
    use = ok if present is None else ok & _failure.fit(present, ok)
    new = _with_pending(new, pend, pending_count, use)
    return _Accumulated(ok, _kron.ema(fac, new, decay, valid=use), new)


def _with_pending(new: Any, pending: Any, count: jax.Array, ok: jax.Array) -> Any:
    """The mean of ``count`` pending mini-steps' statistics and this step's ``new``.

    ``P <- P + (N - P) / (count + 1)``; where ``ok`` is false (statistics or
    gradient not finite) the pending mean is kept as it is.
    Without accumulation buffers (a placeholder ``pending``, see
    :func:`_no_pending`) nothing is pending: ``P = 0`` and ``count = 0``, so
    ``N`` itself, computed by the same expression (bit-identical to a zero buffer).
    """
    w = 1.0 / (count.astype(jnp.float32) + 1.0)
    out = []
    for n, p in zip(new, _kron.as_factors(pending)):
        c = jnp.promote_types(jnp.promote_types(n.dtype, p.dtype), jnp.float32)
        if p.size == 0 and n.size > 0:
            # No buffer: P = 0, a traced zero (w * 0 is not folded away), so the
            # expression and its rounding (fused multiply-adds) are the buffer's.
            p32 = jnp.broadcast_to((w * 0.0).astype(c), n.shape)
        else:
            p32 = p.astype(c)
        out.append(_failure.keep(ok, p32 + w * (n.astype(c) - p32), p32))
    return tuple(out)


def _no_pending(factors: Any) -> Any:
    """Placeholders for the pending statistics: per factor a ``(stack, 0, ...)`` array.

    Only an accumulation (:func:`layerwise_optax.multi_steps`) has statistics
    pending between updates; it allocates the buffers
    (:func:`with_pending_buffers`). Without it they would be a third copy of
    the factors that is always zero.
    """
    return jax.tree.map(lambda f: jnp.zeros((f.shape[0],) + (0,) * (f.ndim - 1), f.dtype), factors)


def _has_pending(pending: Any) -> bool:
    """Whether the state holds pending-statistics buffers (static: from the shapes)."""
    return any(x.size > 0 for x in jax.tree.leaves(pending))


def with_pending_buffers(state: ScaleByKfacState) -> ScaleByKfacState:
    """``state`` with zero pending-statistics buffers shaped like its factors.

    Called by :func:`layerwise_optax.multi_steps` at ``init`` on every K-FAC
    state it wraps: the mean of the statistics of the mini-steps of an
    accumulation is kept there between updates (:func:`_with_pending`).
    """
    return state._replace(pending=jax.tree.map(jnp.zeros_like, state.factors))


def _new_pending(plans: Any, acc: Any, pending: Any, emit: jax.Array, count: jax.Array) -> Any:
    """The new pending statistics: reset where ``emit``, stored like the factors.

    Placeholders (no accumulation, :func:`_no_pending`) stay as they are.
    """
    if not _has_pending(pending):
        return pending
    new = _axes.map_leaves(
        lambda a, plan: tuple(jnp.where(emit, 0, x).astype(x.dtype) for x in a.stats), plans, acc
    )
    return _kron.store(_axes.bare(plans, new), pending, count)


def _correction(decay: jax.Array, count: jax.Array) -> jax.Array:
    """Bias correction ``1 / (1 - beta^t)`` of factor EMAs started at zero (1 for sums)."""
    t = count.astype(jnp.float32)
    return jnp.where((decay == 1.0) | (decay == 0.0), 1.0, 1.0 / (1.0 - decay**t))


def _applied_plans(plans: Any, stats: Any, sides: str) -> Any:
    """Per kernel with statistics its applied plan (:func:`_applied_plan`), else masked."""

    def applied(s, plan):
        return optax.MaskedNode() if plan.spec is None or s is None else _applied_plan(plan, sides)

    return _axes.map_leaves(applied, plans, stats)


def _refresh(refresh, acc, state, plans, stats, hp, count, static):
    """Phase 2, every ``precondition_frequency`` steps: the damped factors' inverses.

    Under ``lax.cond(refresh, ...)``: ``(c A_bar + delta_A I)^{-1}`` and
    ``(c B_bar + delta_B I)^{-1}`` by Cholesky
    (:func:`layerwise_optax.linalg.inv_psd_cholesky`; ``c``: :func:`_correction`; deltas:
    :func:`_damped`) for every kernel with statistics (the factors that
    ``sides`` applies), same-sized factors of all layers batched
    (:func:`layerwise_optax._kron.inverse_roots_tree`, split over the mesh's
    devices when ``distribute``). With ``inverse='eigh'`` the undamped
    factors' eigendecompositions instead (:func:`_eigh_tree`). A factorization
    that fails keeps the previous one and is counted. Returns ``(inverses,
    failed)``.
    """
    applied = _applied_plans(plans, stats, static.sides)
    correction = _correction(hp.factor_decay, _statistics_count(count, static))
    if static.inverse == "eigh":
        prepare = functools.partial(_corrected, correction=correction)
        transform = _eigh_tree
    else:
        prepare = functools.partial(
            _damped, damping=hp.damping, mode=static.damping_mode, correction=correction
        )
        transform = _inverses_tree

    def recompute(facs, invs):
        ready = _axes.map_leaves(
            lambda f, kplan, s: prepare(_identity_unless_present(f, kplan, s), kplan),
            applied,
            facs,
            stats,
        )
        new, failed = transform(ready, invs, applied, distribute=static.distribute)
        new = _axes.map_leaves(
            lambda n, kplan, old, s: _keep_unless_present(n, old, s), applied, new, invs, stats
        )
        return _axes.keep_masked(applied, new, invs), failed

    def keep(facs, invs):
        return invs, jnp.zeros([], jnp.int32)

    factors, inverses = _axes.unzip(acc, "factors"), _kron.normalize(plans, state.inverses)
    return jax.lax.cond(refresh, recompute, keep, factors, inverses)


def _inverses_tree(damped: Any, prev: Any, plans: Any, *, distribute: bool) -> tuple[Any, Any]:
    """Inverses of the damped factors by Cholesky (diagonals: reciprocals), keeping good ones."""
    return _kron.inverse_roots_tree(
        damped,
        prev,
        plans,
        root=lambda kplan: 1,
        damping=jnp.zeros([], jnp.float32),
        relative_damping=False,
        method="cholesky",
        distribute=distribute,
    )


def _identity_unless_present(fac: Any, kplan: _axes.LeafPlan, s: Any) -> Any:
    """The factors, with the identity in the blocks of a group that have no statistics.

    Those blocks keep their inverses (:func:`_keep_unless_present`); the
    identity keeps their factorization finite, so it is never counted as failed.
    """
    _, present = _present(s)
    if present is None:
        return fac
    eyes = _kron.init_factors(_kernel_plan(kplan), jnp.float32, identity=True)
    return tuple(
        f if k == "none" else _failure.keep(present, f, e.astype(f.dtype))
        for f, e, k in zip(_kron.as_factors(fac), eyes, kplan.kinds)
    )


def _keep_unless_present(new: Any, old: Any, s: Any) -> Any:
    """The new inverses in the blocks with statistics, the old ones elsewhere."""
    _, present = _present(s)
    new = _kron.as_factors(new)
    if present is None:
        return new
    return tuple(_failure.keep(present, n, o) for n, o in zip(new, _kron.as_factors(old)))


def _damped(fac, kplan, damping, mode, correction):
    """``A + d_A I, B + d_B I`` of the bias-corrected EMAs (diagonals: ``+ d``).

    ``kplan`` is the applied plan (:func:`_applied_plan`): a factor of kind
    ``'none'`` is not applied and is returned as is. Every damping depends only
    on the factors that are applied. With both applied, ``'pi'`` splits
    ``lambda`` as ``pi sqrt(lambda)`` and ``sqrt(lambda) / pi``
    (:func:`layerwise_optax._linalg.pi_damping`; Martens and Grosse, 2015,
    section 6.3). With one applied (``sides='input'`` or ``'output'``) the other
    factor is the identity, and ``A ⊗ I + lambda I = (A + lambda I) ⊗ I``
    exactly: the applied factor gets ``lambda`` in either mode (the pi rule would
    bring in the scale of a factor that is never applied).

    Damped factors are positive definite, so a Cholesky factorization exists (an
    order of magnitude cheaper than eigh); a failed factorization keeps the
    previous one (:func:`layerwise_optax._kron.inverse_roots_tree`).
    """
    fac = tuple(f * correction for f in _kron.as_factors(fac))
    damping = jnp.asarray(damping, jnp.float32)
    if mode == "pi" and "none" not in kplan.kinds:
        diag = tuple(k == "diag" for k in kplan.kinds)
        deltas = _linalg.pi_damping(*fac, damping, a_diagonal=diag[0], b_diagonal=diag[1])
    else:
        deltas = (jnp.broadcast_to(damping, fac[0].shape[:1]),) * 2
    return tuple(
        f if k == "none" else _linalg.add_ridge(f, dl, diagonal=k == "diag")
        for f, dl, k in zip(fac, deltas, kplan.kinds)
    )


def _directions(
    grads, stats, acc, mu, nu, inverses, plans, hp, count, static, diagonal=None, held=None
):
    """Phase 3: per leaf the step direction and the new moments (:class:`_LeafOut`).

    A kernel with statistics: ``U = (A + delta_A I)^{-1} G (B + delta_B I)^{-1}``
    by the products of :func:`_precondition`. Any other leaf: the damped
    diagonal empirical Fisher, ``nu <- b2 nu + (1 - b2) g^2`` and ``U = g /
    (nu_hat + lambda)``. Then :func:`_momentum`. An invalid leaf (gradient or
    statistics not finite) gets a zero update and keeps its moments. A leaf with
    a diagonal block (``diagonal``: the :class:`KfacDiagonal` fishers, a tree
    like ``grads`` with ``None`` elsewhere) takes :func:`_diagonal_direction`; on a
    step without statistics ``held`` (bool scalars, :attr:`ScaleByKfacState.diagonal`)
    marks the leaves that do so with their kept EMA.
    """
    leaf = functools.partial(_direction_leaf, hp=hp, count=count, static=static)
    none = jax.tree.map(lambda _: None, plans, is_leaf=_axes.is_plan_leaf)
    diagonal = none if diagonal is None else diagonal
    held = none if held is None else held
    return _axes.map_leaves(leaf, plans, grads, stats, acc, mu, nu, inverses, diagonal, held)


def _diagonal_direction(g32, f, nu, ok, hp, count, static):
    """A diagonal block's ``nu <- beta nu + (1 - beta) F`` and ``U = G / (c nu + lambda)``.

    ``beta = factor_decay`` and ``c`` its bias correction (:func:`_correction`) by
    the number of statistics updates (:func:`_statistics_count`), as for the factor
    EMAs; where ``ok`` is false ``nu`` is kept. ``f=None``: a step without
    statistics, ``nu`` kept and the step taken with it.
    """
    if f is not None:
        nu = _failure.keep(ok, hp.factor_decay * nu + (1 - hp.factor_decay) * f, nu)
    c = _correction(hp.factor_decay, _statistics_count(count, static))
    return nu, g32 / (c * nu + hp.damping)


def _direction_leaf(
    g, plan, s, a, mu, nu, inv, f=None, held=None, *, hp, count, static
) -> _LeafOut:
    """:func:`_directions` for one leaf (an owner-layout group: per block).

    ``f``: a diagonal block's fisher (:class:`KfacDiagonal`). ``held`` (a step
    without statistics): a bool scalar, whether the leaf's last statistics were a
    diagonal block, which then steps with its kept EMA instead of the fallback.
    """
    ok, g32 = _failure.guard(g, per_block=plan.per_block)
    ok = ok & a.ok
    if f is not None:
        f = jnp.asarray(f, jnp.float32)
        ok = ok & jnp.all(jnp.isfinite(f))
        nu, u = _diagonal_direction(g32, jnp.where(ok, f, 0), nu, ok, hp, count, static)
        mu, d = _momentum(u, mu, hp.momentum, static.nesterov, ok)
        return _LeafOut(_failure.zero_unless(ok, d, g.dtype), mu, nu, ok)

    def fallback(nu):
        # Diagonal fallback: the inverse of a damped diagonal empirical Fisher.
        nu_fb = _failure.keep(ok, hp.b2 * nu + (1 - hp.b2) * g32**2, nu)
        u_fb = g32 / (optax.tree.bias_correction(nu_fb, hp.b2, count) + hp.damping)
        if held is None:
            return nu_fb, u_fb
        # A step without statistics at a diagonal block: its kept EMA, not the fallback.
        _, u_held = _diagonal_direction(g32, None, nu, ok, hp, count, static)
        return jnp.where(held, nu, nu_fb), jnp.where(held, u_held, u_fb)

    if plan.spec is None or s is None:
        nu, u = fallback(nu)
    else:
        s, present = _present(s)
        u = _precondition(g32, inv, plan, static, hp.damping)
        if present is not None and static.diagonal_fallback:
            # A group with blocks without statistics: those take the fallback (without
            # it, they are preconditioned by their current, initially identity, inverses).
            nu_fb, u_fb = fallback(nu)
            u = _failure.keep(present, u, u_fb)
            nu = _failure.keep(present, nu, nu_fb)
    mu, d = _momentum(u, mu, hp.momentum, static.nesterov, ok)
    return _LeafOut(_failure.zero_unless(ok, d, g.dtype), mu, nu, ok)


def _precondition(
    g: jax.Array, invs: Any, plan: _axes.LeafPlan, static: _Static, damping: jax.Array
) -> jax.Array:
    """``(A + d_A I)^{-1} G (B + d_B I)^{-1}`` (the applied sides) by the stored inverses.

    One matrix product per applied full side
    (:func:`layerwise_optax._kron.apply_axis_matrices`), no triangular solve: XLA's
    CPU triangular solve takes ~3x a product of the same shape, and in float32 the
    inverse formed by Cholesky and applied by a product is as accurate as two
    triangular solves with the Cholesky factor (both ``~ eps * kappa``;
    ``tests/test_kfac_apply.py``).

    With ``inverse='eigh'`` the stored eigendecompositions are applied with the
    damping of this step instead (:func:`_apply_eigh`). An owner-layout group is
    solved where its blocks lie: each device solves with the blocks it owns
    (:func:`layerwise_optax._distribute.local`).
    """
    sides = static.sides

    def solve(blocks, damp, *invs):
        applied = _applied_plan(plan.as_batch(blocks.shape[0]) if plan.per_block else plan, sides)
        if static.inverse == "eigh":
            return _apply_eigh(blocks, invs, applied, damp, static.damping_mode)
        return _kron.apply_axis_matrices(blocks, invs, applied)

    blocks, invs = plan.to_blocks(g), _kron.as_factors(invs)
    if plan.per_block:
        # The damping goes in per block, as an argument: shard_map cannot close
        # over a traced scalar sharded on Explicit axes (kfac_adaptive's damping).
        damp = jnp.broadcast_to(jnp.asarray(damping, jnp.float32), (blocks.shape[0],))
        local = _distribute.local(lambda b, d, *i: solve(b, d[0], *i), blocks, damp, *invs)
        return plan.from_blocks(local)
    return plan.from_blocks(solve(blocks, damping, *invs))


def _momentum(u, mu, momentum, nesterov, ok):
    """EMA momentum ``m <- momentum m + (1 - momentum) u`` and the step direction.

    An average of the preconditioned updates, not a heavy-ball sum: natural-gradient
    steps are already O(1), and the heavy ball's ``u / (1 - momentum)`` (10x at
    0.9) made the default step diverge (issue 20 item 16). Nesterov: ``momentum m
    + (1 - momentum) u`` with the new ``m``. Invalid leaves (``ok`` false) keep
    ``m``.
    """
    mu = _failure.keep(ok, momentum * mu.astype(u.dtype) + (1 - momentum) * u, mu)
    return mu, (momentum * mu + (1 - momentum) * u if nesterov else mu)


class _Step(NamedTuple):
    """What one update computed, for :func:`_new_state`."""

    count: jax.Array
    out: Any
    acc: Any
    inverses: Any
    failed: jax.Array
    emit: jax.Array


def _step(
    grads,
    stats,
    state,
    plans,
    *,
    hp,
    frequency,
    static,
    emit,
    no_stats=False,
    diagonal=None,
    held=None,
) -> _Step:
    """Phases 1 to 3 on a tree in the working layout (folded pairs as one leaf).

    ``state`` holds the moments in the same layout as ``grads``; in the owner
    layout every tree is the grouped tree (:mod:`layerwise_optax._owner`) and
    ``plans`` are its plans. ``no_stats``: a step without statistics
    (:func:`_no_new_stats`), whose refresh is skipped when the last step with
    statistics refreshed (:func:`_refresh_due`).
    """
    count = _kron.increment(state.count)
    acc = _accumulate(grads, stats, state, plans, hp.factor_decay)
    refresh = _refresh_due(state.count, frequency, static, no_stats)
    inverses, failed = _refresh(refresh, acc, state, plans, stats, hp, count, static)
    out = _directions(
        grads, stats, acc, state.mu, state.nu, inverses, plans, hp, count, static, diagonal, held
    )
    return _Step(count, out, acc, inverses, failed, emit)


def _new_state(plans, state, new: _Step, mu_dtype) -> ScaleByKfacState:
    """Phase 4: the new state, its moments in the working layout of ``state``'s.

    The pending statistics of :func:`layerwise_optax.multi_steps` are reset on the
    step that emits (``emit``) and kept on the mini-steps that only accumulate.
    Factor EMAs and pending statistics, computed in float32, are stored in the
    dtype of ``state``'s (``precond_dtype``) with stochastic rounding
    (:func:`layerwise_optax._kron.store`, salted with the step count).
    """
    out, acc, emit = new.out, new.acc, new.emit
    mu = _axes.unzip(out, "mu")
    pending = _new_pending(plans, acc, state.pending, emit, state.count)
    factors = _kron.store(
        _axes.bare(plans, _axes.unzip(acc, "factors")), state.factors, state.count
    )
    return ScaleByKfacState(
        count=new.count,
        mu=optax.tree.cast(mu, mu_dtype)
        if mu_dtype is not None
        else optax.tree.cast_like(mu, state.mu),
        nu=_axes.unzip(out, "nu"),
        factors=factors,
        inverses=_axes.bare(plans, new.inverses),
        failures=_failure.add(
            state.failures,
            skipped=_failure.count_invalid(_axes.unzip(out, "ok")),
            failed=new.failed,
        ),
        pending=pending,
        pending_count=jnp.where(emit, 0, optax.safe_increment(state.pending_count)),
        diagonal=state.diagonal,
    )


# ----------------------------------------------------------------------------- eigh inverses


def _validate_inverse(inverse: Any, damping_mode: Any) -> None:
    """``inverse`` is one of :data:`_INVERSES`; ``damping_mode='exact'`` needs ``'eigh'``."""
    _checks.one_of("inverse", inverse, _INVERSES)
    if damping_mode == "exact" and inverse != "eigh":
        raise ValueError(
            f"damping_mode='exact' (the inverse of the Kronecker sum A ⊗ B + lambda I) "
            f"needs inverse='eigh' (it is applied in the factors' eigenbases), got "
            f"inverse={inverse!r}; use damping_mode='pi' or 'absolute' with 'cholesky'."
        )


def _pack_eigh(w: jax.Array, v: jax.Array) -> jax.Array:
    """``(stack, d + 1, d)``: the eigenvectors ``v`` (columns) with the eigenvalues ``w`` below."""
    return jnp.concatenate([v, w[:, None, :]], axis=1)


def _unpack_eigh(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inverse of :func:`_pack_eigh`: ``(eigenvalues (stack, d), eigenvectors (stack, d, d))``."""
    return m[:, -1, :], m[:, :-1, :]


def _eigh_init(plan: _axes.LeafPlan, dtype: Any) -> tuple[jax.Array, ...]:
    """The eigendecompositions of identity factors in the ``inverse='eigh'`` layout.

    A full factor is stored packed (:func:`_pack_eigh`), ``(stack, d + 1, d)``:
    eigenvectors ``I``, eigenvalues ones; a diagonal factor as its ``(stack, d)``
    diagonal (its own eigenvalues, eigenvectors ``I``); placeholders as in
    :func:`layerwise_optax._kron.init_factors`.
    """
    out = []
    for kind, f in zip(plan.kinds, _kron.init_factors(plan, dtype, identity=True)):
        if kind == "full":
            f = _pack_eigh(jnp.ones(f.shape[:2], dtype), f)
        out.append(f)
    return tuple(out)


def _corrected(fac: Any, kplan: _axes.LeafPlan, correction: jax.Array) -> tuple:
    """:func:`_refresh`'s preparation with ``inverse='eigh'``: the bias-corrected factors.

    The eigendecompositions ``c A_bar = U_A diag(s_A) U_A^T`` and ``c B_bar = U_B
    diag(s_B) U_B^T`` (``c``: :func:`_correction`; eigenvalues clipped at 0,
    :func:`layerwise_optax._linalg.eigh_psd`) are of these, stored packed
    (:func:`_pack_eigh`) for the factors that ``sides`` applies (``kplan``). No
    damping enters: :func:`_apply_eigh` adds this step's ``lambda`` to the
    eigenvalues, so a changed damping needs no new factorization.
    """
    del kplan
    return tuple(x * correction for x in fac)


def _eigh_tree(stats: Any, prev: Any, plans: Any, *, distribute: bool) -> tuple[Any, jax.Array]:
    """Packed eigendecompositions of every applied factor, keeping good previous ones.

    :func:`layerwise_optax._kron.refresh_tree` with per full factor its packed
    (:func:`_pack_eigh`) batched ``eigh`` (one matrix at a time on CPU,
    :func:`layerwise_optax._linalg.eigh_psd`), spread over the mesh's devices
    when ``distribute``; a diagonal factor is its own spectrum (clipped at 0);
    ``'none'`` factors keep ``prev``. A block whose decomposition is not finite
    keeps its previous one and is counted.
    """
    return _kron.refresh_tree(
        stats,
        prev,
        plans,
        full=lambda s, r, _: _pack_eigh(*_linalg.eigh_psd(s)),
        diag=lambda s, plan, _: jnp.maximum(s, 0.0),
        distribute=distribute,
    )


def _apply_eigh(
    g: jax.Array, packed: Any, plan: _axes.LeafPlan, damping: jax.Array, mode: str
) -> jax.Array:
    r"""The damped inverse curvature on a ``(stack, d_A, d_B)`` block view, in the eigenbases.

    With ``A = U_A diag(s_A) U_A^T`` and ``B = U_B diag(s_B) U_B^T`` (stored by
    :func:`_refresh` with :func:`_eigh_tree`; a diagonal factor has ``U = I``, a factor that
    ``sides`` does not apply ``U = I`` and ``s = 1``), ``X = U_A^T G U_B`` and

    .. math::
      U = U_A \, (X \oslash D) \, U_B^T, \quad D_{ij} = (s_{A,i} + \delta_A)(s_{B,j} +
      \delta_B) \;\text{('pi', 'absolute')}, \quad D_{ij} = s_{A,i} s_{B,j} + \lambda
      \;\text{('exact')}

    with :func:`_damped`'s ``delta_A, delta_B`` (``'pi'``: from the means of the
    eigenvalues, the traces; one side applied: ``lambda`` on it). The first is
    ``(A + delta_A I)^{-1} G (B + delta_B I)^{-1}``, the second ``(A ⊗ B +
    lambda I)^{-1} vec(G)`` exactly. ``D`` is floored per block at ``eps *
    max(D)`` (and the smallest normal number), so an undamped singular factor
    gives a finite, bounded step.
    """
    damping = jnp.asarray(damping, jnp.float32)
    x = g.astype(jnp.promote_types(g.dtype, jnp.float32))
    spectra, bases = [], []
    for i, (kind, m) in enumerate(zip(plan.kinds, _kron.as_factors(packed))):
        if kind == "full":
            w, v = _unpack_eigh(m.astype(x.dtype))
        elif kind == "diag":
            w, v = m.astype(x.dtype), None
        else:
            w, v = jnp.ones((x.shape[0], x.shape[i + 1]), x.dtype), None
        spectra.append(w)
        bases.append(v)
    ua, ub = bases
    sa, sb = spectra
    hi = _linalg.HIGHEST
    if ua is not None:
        x = jnp.einsum("nji,njk->nik", ua, x, precision=hi)
    if ub is not None:
        x = jnp.einsum("nij,njk->nik", x, ub, precision=hi)
    if mode == "exact":
        den = sa[:, :, None] * sb[:, None, :] + damping
    else:
        if mode == "pi" and "none" not in plan.kinds:
            da, db = _linalg.pi_damping(sa, sb, damping, a_diagonal=True, b_diagonal=True)
        else:
            zero = jnp.zeros(x.shape[:1], x.dtype)
            da, db = (
                zero if plan.kinds[j] == "none" else jnp.broadcast_to(damping, zero.shape)
                for j in range(2)
            )
        den = (sa + da[:, None])[:, :, None] * (sb + db[:, None])[:, None, :]
    finfo = jnp.finfo(x.dtype)
    floor = jnp.maximum(finfo.eps * jnp.max(den, axis=(1, 2), keepdims=True), finfo.tiny)
    x = x / jnp.maximum(den, floor)
    if ua is not None:
        x = jnp.einsum("nij,njk->nik", ua, x, precision=hi)
    if ub is not None:
        x = jnp.einsum("nij,nkj->nik", x, ub, precision=hi)
    return x.astype(g.dtype)


# ----------------------------------------------------------------------------- steps without statistics


@jax.tree_util.register_pytree_node_class
class _NoNewStats:
    """A kernel's entry on a step without statistics (``kfac_stats=None``).

    ``present`` (a bool array, one per layer slice) marks the slices whose factor
    EMA is not zero, those that have had statistics: their factors and inverses are
    used as they are (:func:`_accumulate_leaf` keeps the EMAs and the pending
    statistics); the other slices take the diagonal fallback, as they did on the
    steps with statistics (a layer the capture does not see). ``factors`` is
    always ``None``.
    """

    def __init__(self, present: Any):
        self.factors = None
        self.present = present

    def tree_flatten(self):
        return (self.present,), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(*children)


def _no_new_stats(updates: Any, layout: _Layout, state: ScaleByKfacState) -> Any:
    """The statistics tree of a step without statistics (``statistics_frequency > 1``).

    A :class:`_NoNewStats` at every kernel with a K-FAC layout, ``None`` elsewhere
    (masked leaves and folded biases, as :func:`_stats_like` gives them).
    Supported in the replicated layout only.
    """
    if _owner.layout_of(state) is not None:
        raise ValueError(
            "kfac_stats=None (a step without statistics, statistics_frequency > 1) is not "
            "supported with state_layout='owner' yet: pass the statistics every step, or "
            "use state_layout='replicated'."
        )
    factors = _kron.normalize(layout.work_plans, state.factors)

    def entry(x, plan, fac):
        if plan.spec is None:
            return None
        a = _kron.as_factors(fac)[0].astype(jnp.float32)
        return _NoNewStats(jnp.any(a != 0, axis=tuple(range(1, a.ndim))))

    flat_updates, treedef = jax.tree_util.tree_flatten(updates, is_leaf=_axes.is_masked)
    work = treedef.unflatten(
        [
            optax.MaskedNode() if _axes.is_masked(p) else x
            for x, p in zip(flat_updates, layout.flat_work)
        ]
    )
    out = _axes.map_leaves(entry, layout.work_plans, work, factors)
    return jax.tree.map(
        lambda x, o: None if _axes.is_masked(x) else o,
        work,
        out,
        is_leaf=lambda x: x is None or _axes.is_masked(x) or isinstance(x, _NoNewStats),
    )


def _refresh_due(count: jax.Array, frequency: Any, static: _Static, no_stats: bool) -> jax.Array:
    """Whether step ``count`` (before the increment) refreshes the inverses.

    Every ``precondition_frequency`` steps, except on a step without statistics
    whose factors were already factorized: the last step with statistics,
    ``count - count % k`` on the schedule of ``statistics_frequency = k``, was a
    refresh step too, and the factors have not changed since (with
    ``precondition_frequency=1`` no step without statistics refreshes).
    """
    due = _kron.every(count, frequency)
    if not no_stats:
        return due
    last = count - count % static.statistics_frequency
    return due & ~_kron.every(last, frequency)


def _statistics_count(count: jax.Array, static: _Static) -> jax.Array:
    """The number of statistics updates of the factor EMAs after ``count`` steps.

    Statistics arrive on the steps ``0, k, 2k, ...`` (``k``:
    ``statistics_frequency``), so after ``count >= 1`` steps the EMAs have had
    ``(count - 1) // k + 1`` updates; :func:`_correction` debiases by that
    number. With ``k = 1`` it is ``count`` itself.
    """
    k = static.statistics_frequency
    if k == 1:
        return count
    return (count - 1) // k + 1


# ----------------------------------------------------------------------------- owner layout

# The per-block fields of the owner layout; the moments ``mu`` and ``nu`` stay
# shaped and sharded like their parameters (see ``_owned_update``).
_GROUPED_FIELDS = ("factors", "inverses", "pending")


@jax.tree_util.register_pytree_node_class
class _Partial:
    """A group's stacked statistics where only some blocks have statistics this step.

    In the owner layout the kernels of one group may differ in whether
    ``kfac_stats`` gives them statistics (a layer the capture does not see has
    the diagonal fallback). ``present`` (a bool array, one per block of the
    stack as stored: a device's share inside ``jax.pmap``) marks the blocks that do; the others are treated exactly as a leaf without
    statistics is in the replicated layout: their factors and pending statistics
    are kept and their inverses are not refreshed (their direction is
    the diagonal fallback's, computed params-shaped by :func:`_owned_update`).
    """

    def __init__(self, factors: KfacFactors, present: Any):
        self.factors = factors
        self.present = present

    def tree_flatten(self):
        return (self.factors, self.present), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(*children)


def _present(s: Any) -> tuple[Any, Any]:
    """The factors of a statistics entry and its per-block mask (``None``: every block).

    For a step without statistics (:class:`_NoNewStats`) the mask marks the blocks
    that have had statistics before: they keep being preconditioned by their
    factors, the others take the diagonal fallback.
    """
    if isinstance(s, (_Partial, _NoNewStats)):
        return s.factors, s.present[:, None]
    return s, None


def _owned_init(
    owner: _owner.Layout,
    plans: Any,
    params: Any,
    work: Any,
    mu_dtype: Any,
    precond_dtype: Any,
    inverse: str = "cholesky",
) -> ScaleByKfacState:
    """:func:`_init` with the factor state on the grouped tree of ``work`` (working layout).

    The factor EMAs of padded blocks hold the identity
    (:func:`layerwise_optax._owner.pad_identity`), so their factorizations stay
    finite; every per-block field is laid out along the block axis. The
    moments are the replicated layout's: shaped (and, under ``state_shardings``,
    sharded) like ``params``.
    """
    grouped_plans = owner.plans(plans)
    state = _init(_owner.zeros(owner, plans, work), grouped_plans, mu_dtype, precond_dtype, inverse)
    eyes = [
        _kron.init_factors(_kernel_plan(g.plan), precond_dtype, identity=True) for g in owner.groups
    ]
    grouped = cast(dict[str, Any], state.factors)  # the grouped tree of _owner.zeros
    factors = {**grouped, "blocks": _owner.pad_identity(owner, grouped["blocks"], eyes)}
    moments = _init(params, plans, mu_dtype, precond_dtype)
    state = state._replace(factors=factors, mu=moments.mu, nu=moments.nu, diagonal=moments.diagonal)
    return state._replace(
        **{
            name: _owner.grouped(_owner.place_state(owner, getattr(state, name)), owner)
            for name in _GROUPED_FIELDS
        }
    )


def _owned_update(
    owner, layout, updates, grads, stats, state, *, hp, frequency, static, emit, diagonal=None
):
    """One update of an owner-layout state (see ``state_layout`` of :func:`scale_by_kfac`).

    Each working leaf's validity (gradient and statistics finite) is decided
    once, per leaf as in the replicated layout; the gradient blocks of the
    leaf go to their owners (NaN where it is not valid) together with the
    leaf's statistics (:func:`layerwise_optax._owner.to_groups_blocks`).
    Phases 1 and 2 (statistics, refresh) and the products of phase 3
    run on the grouped tree where the blocks lie; the solved blocks come back
    once, in float32 and the params' layout
    (:func:`layerwise_optax._owner.from_groups`), and the rest of phase 3
    (diagonal fallback, momentum; elementwise) runs on the params-shaped
    moments where they lie, so the moments are never stacked or padded.
    Skipped events are counted per working leaf.
    """
    plans = layout.work_plans
    _owner.check(owner, plans, grads)
    _owner.check_mapped(owner)
    nodes = _owner.plan_nodes(plans)
    flat_stats, views, valid = _owned_views(plans, updates, grads, stats)
    grouped_stats = {
        "blocks": _group_stats(owner, nodes, views),
        "leaves": tuple(flat_stats[i] for i in owner.leaves),
    }
    grouped_grads = _owner.to_groups(owner, plans, grads, valid=valid)
    grouped_plans = owner.plans(plans)
    inner = state._replace(**{name: getattr(state, name).tree() for name in _GROUPED_FIELDS})
    count = _kron.increment(state.count)
    acc = _accumulate(grouped_grads, grouped_stats, inner, grouped_plans, hp.factor_decay)
    refresh = _kron.every(state.count, frequency)
    inverses, failed = _refresh(
        refresh, acc, inner, grouped_plans, grouped_stats, hp, count, static
    )
    solved = _owned_solves(
        grouped_grads, grouped_stats, inverses, grouped_plans, static, hp.damping
    )

    # The solved blocks in float32 (the moments' arithmetic is the replicated
    # layout's), in the params' layout: folded pairs split like the updates.
    def wide(tree):
        return jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), tree)

    solved = _unfold(layout, _owner.from_groups(owner, plans, solved, wide(grads)), wide(updates))
    if diagonal is None:
        diagonal = jax.tree.map(lambda _: None, updates, is_leaf=_axes.is_masked)
    mu, nu, out = _owned_moments(
        layout, updates, state, solved, views, valid, hp, count, static, diagonal
    )
    # Stored as _new_state stores them (stochastic rounding to precond_dtype).
    grouped_new = {
        "factors": _kron.store(
            _axes.bare(grouped_plans, _axes.unzip(acc, "factors")), inner.factors, state.count
        ),
        "inverses": _axes.bare(grouped_plans, inverses),
        "pending": _new_pending(grouped_plans, acc, inner.pending, emit, state.count),
    }
    new_state = _owned_new_state(
        state,
        count,
        mu,
        nu,
        valid,
        # Inside pmap each device refreshes only its own blocks: summed over them.
        _owner.total_failed(owner, 0, failed),
        emit,
        **{name: _owner.grouped(x, owner) for name, x in grouped_new.items()},
    )
    return out, new_state


def _owned_new_state(state, count, mu, nu, valid, failed, emit, **fields) -> ScaleByKfacState:
    """The next owner-layout state: step count, moments, counters, and ``fields``.

    Shared by the layer-grouped and the per-factor owner layouts; ``fields`` are
    their factors, inverses and pending statistics, already laid out.
    """
    return state._replace(
        count=count,
        mu=mu,
        nu=nu,
        failures=_failure.add(
            state.failures,
            skipped=_failure.count_invalid([v for v in valid if v is not None]),
            failed=failed,
        ),
        pending_count=jnp.where(emit, 0, optax.safe_increment(state.pending_count)),
        **fields,
    )


def _owned_views(plans, updates, grads, stats) -> tuple[list, list, list]:
    """Per plan position of the working layout: statistics, checked views, validity.

    The validity of a leaf is decided once, where it lies: its gradient finite
    and, with statistics, their views (:func:`_stats_view`) finite. Masked
    positions give ``None`` views and flags.
    """
    nodes = _owner.plan_nodes(plans)
    bare = _owner._bare_leaves(plans, grads)
    flat_stats = jax.tree_util.tree_flatten(updates, is_leaf=_axes.is_masked)[1].flatten_up_to(
        stats
    )
    views, valid = [], []
    for plan, g, s in zip(nodes, bare, flat_stats):
        if _axes.is_masked(plan):
            views.append(None)
            valid.append(None)
            continue
        ok = _failure.guard(g)[0]
        view = None if plan.spec is None or s is None else _stats_view(s, plan)
        if view is not None:
            ok = ok & _kron.all_finite(view)
        views.append(view)
        valid.append(ok)
    return flat_stats, views, valid


def _owned_solves(grads, stats, inverses, plans, static, damping) -> dict[str, tuple[Any, ...]]:
    """The inverse products of phase 3 on the grouped tree (:func:`_precondition`).

    Per group with statistics its solved stack (each device solves the blocks
    it owns); ``None`` for a group without (nothing to gather). A leaf without
    factors that has statistics (a kernel whose dimensions are all of length
    one) is solved as in the replicated layout; other leaves give ``None``.
    """

    def solve(g, plan, s, inv):
        if plan.spec is None or s is None:
            return None
        g32 = _failure.guard(g, per_block=plan.per_block)[1]
        return _precondition(g32, inv, plan, static, damping)

    blocks = tuple(
        solve(g, plan, s, inv)
        for g, plan, s, inv in zip(
            grads["blocks"], plans["blocks"], stats["blocks"], inverses["blocks"]
        )
    )
    leaves = tuple(
        None if plan.spec is None or s is None else _axes.on_gathered(solve, g, plan, s, inv)
        for g, plan, s, inv in zip(
            grads["leaves"], plans["leaves"], stats["leaves"], inverses["leaves"]
        )
    )
    return {"blocks": blocks, "leaves": leaves}


def _owned_moments(layout, updates, state, solved, views, valid, hp, count, static, diagonal):
    """Phase 3 after the solves, on the params-shaped moments (owner layout).

    Per leaf of ``updates`` (a folded bias with its kernel's working leaf): the
    solved direction where the working leaf has statistics, else the diagonal
    fallback ``nu <- b2 nu + (1 - b2) g^2``, ``u = g / (nu_hat + lambda)``; then
    :func:`_momentum`. The same elementwise arithmetic as the replicated layout's
    :func:`_direction_leaf`, on arrays laid out like the parameter (no gather).

    Returns:
      ``(mu, nu, updates)`` trees like ``state.mu``, ``state.nu`` and ``updates``.
    """
    flat, treedef = jax.tree_util.tree_flatten(updates, is_leaf=_axes.is_masked)
    work = list(range(len(flat)))
    for k, b in layout.folds:
        work[b] = k
    columns = [treedef.flatten_up_to(t) for t in (state.mu, state.nu, solved, diagonal)]
    mus, nus, outs = [], [], []
    for j, (g, mu, nu, u, f) in enumerate(zip(flat, *columns)):
        w = work[j]
        if _axes.is_masked(g) or valid[w] is None:
            mus.append(mu)
            nus.append(nu)
            outs.append(g)
            continue
        ok = valid[w]
        if f is not None:
            # A diagonal block (KfacDiagonal): its own validity, EMA and step.
            f = jnp.asarray(f, jnp.float32)
            ok = ok & jnp.all(jnp.isfinite(f))
            valid[w] = ok
        g32 = jnp.where(ok, g.astype(jnp.promote_types(g.dtype, jnp.float32)), 0)
        if f is not None:
            nu, u = _diagonal_direction(g32, jnp.where(ok, f, 0), nu, ok, hp, count, static)
        elif views[w] is None:
            # Diagonal fallback: the inverse of a damped diagonal empirical Fisher.
            nu = _failure.keep(ok, hp.b2 * nu + (1 - hp.b2) * g32**2, nu)
            u = g32 / (optax.tree.bias_correction(nu, hp.b2, count) + hp.damping)
        new_mu, d = _momentum(u, mu, hp.momentum, static.nesterov, ok)
        dtype = static.mu_dtype if static.mu_dtype is not None else mu.dtype
        mus.append(new_mu.astype(dtype))
        nus.append(nu)
        outs.append(_failure.zero_unless(ok, d, g.dtype))
    return tuple(treedef.unflatten(c) for c in (mus, nus, outs))


def _group_stats(owner: _owner.Layout, nodes: list, views: list) -> tuple:
    """Per group the stacked statistics views of its members (see :class:`_Partial`).

    ``None`` for a group none of whose members has statistics; a
    :class:`KfacFactors` of stacks when all have; a :class:`_Partial` otherwise
    (zero placeholders for the members without, never used).
    """
    per_leaf: list[Any] = [None] * len(nodes)
    present: dict[int, bool] = {}
    for g in owner.groups:
        has = [views[i] is not None for i, _ in g.members]
        if not any(has):
            continue
        for (i, _), h in zip(g.members, has):
            present[i] = h
            per_leaf[i] = views[i] if h else _kron.init_factors(_kernel_plan(nodes[i]), jnp.float32)
    stacked = _owner.to_groups_blocks(owner, per_leaf)
    out = []
    for g, s in zip(owner.groups, stacked):
        if s is None:
            out.append(None)
            continue
        mask = [present[i] for i, n in g.members for _ in range(n)]
        mask += [False] * (g.padded - g.size)
        s = KfacFactors(*s)
        if all(present[i] for i, _ in g.members):
            out.append(s)
        else:
            out.append(_Partial(s, _owner.share(owner, g, jnp.asarray(mask))))
    return tuple(out)


# ----------------------------------------------------------------------------- per-factor owner layout


def _per_factor_eligible(owner: _owner.Layout, plans: Any, static: _Static) -> bool:
    """Whether the per-factor owner layout (:func:`_per_factor_update`) serves these plans.

    It stores single factors: every kernel has two (dense or diagonal), both
    applied (``sides='both'``) and inverted by Cholesky; the state must be a global array under a mesh (not built inside
    ``jax.pmap``). Otherwise the owner layout groups whole layers
    (:func:`_owned_update`).
    """
    if owner.mapped or static.inverse != "cholesky" or static.sides != "both":
        return False
    for plan in _owner.plan_nodes(plans):
        if _axes.is_masked(plan) or not plan.is_preconditioned:
            continue
        if len(plan.dims) != 2 or plan.blocks != plan.dims:
            return False
        if any(k not in ("full", "diag") for k in _kernel_plan(plan).kinds):
            return False
    return True


def _per_factor_init(
    owner: _owner.Layout, plans: Any, params: Any, work: Any, mu_dtype: Any, precond_dtype: Any
) -> ScaleByKfacState:
    """:func:`_init` in K-FAC's per-factor owner layout (:func:`_owner.build_per_factor`).

    Per :class:`layerwise_optax._owner.FactorGroup` the factor EMAs and pending
    statistics are zero stacks and the inverses identity stacks, laid
    out along the stack axis over the mesh; leaves without factors keep the
    replicated layout's per-leaf state and the moments are params-shaped.
    """
    layout = _owner.build_per_factor(plans, work, owner.axes, owner.devices, _factor_kinds)
    nodes = _owner.plan_nodes(plans)
    xs = _owner._bare_leaves(plans, work)
    leaf_plans = {"blocks": (), "leaves": tuple(nodes[i] for i in layout.leaves)}
    leaf_zeros = {
        "blocks": (),
        "leaves": tuple(jnp.zeros(np.shape(xs[i]), xs[i].dtype) for i in layout.leaves),
    }
    leaf_state = _init(leaf_zeros, leaf_plans, mu_dtype, precond_dtype)

    def stacks(identity: bool) -> tuple[jax.Array, ...]:
        out = []
        for g in layout.factor_groups():
            if g.kind == "diag":
                x = jnp.full((g.padded, g.dim), 1.0 if identity else 0.0, precond_dtype)
            else:
                shape = (g.padded, g.dim, g.dim)
                x = (
                    jnp.broadcast_to(jnp.eye(g.dim, dtype=precond_dtype), shape)
                    if identity
                    else jnp.zeros(shape, precond_dtype)
                )
            out.append(_owner._constrain(x, layout))
        return tuple(out)

    factors = stacks(False)
    # Placeholders, as in the other layouts: lo.multi_steps allocates the
    # pending statistics (with_pending_buffers); without it they stay zero.
    fields = {"factors": factors, "inverses": stacks(True), "pending": _no_pending(factors)}
    state = _init(params, plans, mu_dtype, precond_dtype)
    return state._replace(
        **{
            name: _owner.Grouped(fields[name], getattr(leaf_state, name)["leaves"], layout)
            for name in _GROUPED_FIELDS
        }
    )


def _per_factor_damping(
    owner: _owner.Layout, scaled: Sequence[jax.Array], damping: Any, mode: str
) -> list[jax.Array]:
    """Per factor group, per entry the ridge ``delta`` of :func:`_damped`.

    With ``'pi'`` each block's two factors lie apart: each entry's mean
    eigenvalue ``tr F / d`` (over its corner) is gathered, a small vector, and
    :func:`layerwise_optax._linalg.pi_split` gives ``delta_A`` to the input
    factor's entry and ``delta_B`` to the output factor's; otherwise ``lambda``.
    """
    damping = jnp.asarray(damping, jnp.float32)
    if mode != "pi":
        return [jnp.broadcast_to(damping, (g.padded,)) for g in owner.factor_groups()]
    means, where, offset = [], {}, 0
    for g, m in zip(owner.factor_groups(), scaled):
        d = jnp.asarray(np.maximum(g.lengths(), 1), jnp.float32)
        diag = m if g.kind == "diag" else jnp.diagonal(m, axis1=-2, axis2=-1)
        means.append(_owner._replicate(jnp.sum(diag, -1) / d))
        k = 0
        for pos, side, count, _ in g.members:
            for b in range(count):
                where[(pos, side, b)] = offset + k
                k += 1
        offset += g.padded
    flat = jnp.concatenate(means)
    out = []
    for g in owner.factor_groups():
        ia, ib, is_a = [], [], []
        for pos, side, count, _ in g.members:
            for b in range(count):
                ia.append(where[(pos, 0, b)])
                ib.append(where[(pos, 1, b)])
                is_a.append(side == 0)
        pad = g.padded - g.size
        ia, ib, is_a = ia + [0] * pad, ib + [0] * pad, is_a + [True] * pad
        da, db = _linalg.pi_split(flat[np.asarray(ia)], flat[np.asarray(ib)], damping)
        out.append(jnp.where(np.asarray(is_a), da, db))
    return out


def _factor_kinds(plan: _axes.LeafPlan) -> tuple[str, ...]:
    """A kernel's factor kinds as the per-factor layout stores them (:func:`_kernel_plan`)."""
    return _kernel_plan(plan).kinds


def _per_factor_operand_plan(
    template: _axes.LeafPlan, shape: tuple[int, ...], kind: str = "full"
) -> _axes.LeafPlan:
    """The plan of an operand stack ``(n, s, w)`` solved on its first view dimension only."""
    n, s, w = shape
    return dataclasses.replace(
        template.as_batch(n),
        shape=shape,
        perm=(0, 1, 2),
        dims=(s, w),
        kinds=(kind, "none"),
        blocks=(s, w),
        num_blocks=(1, 1),
    )


def _per_factor_solves(owner, nodes, operands, inverses, side, distribute) -> dict[int, jax.Array]:
    """One side of ``(A + d_A I)^{-1} G (B + d_B I)^{-1}`` where the factors lie.

    ``operands``: per position ``(count, d, w)`` blocks whose axis 1 the
    ``side`` factor of the position acts on. Per factor group with members of
    that side the operands go, in the corner of ``(s, w_max)`` entries, to the
    devices that own their factors, which apply the stored inverses by one
    product (:func:`layerwise_optax._kron.apply_axis_matrices`); the solved
    operands come back replicated, in their own shapes, by one all-reduce of
    their sizes (:func:`layerwise_optax._owner.unstack_factors`).
    """
    out = {}
    for g, inv in zip(owner.factor_groups(), inverses):
        mine = [m[0] in operands and m[1] == side for m in g.members]
        if not any(mine):
            continue
        w = max(operands[m[0]].shape[-1] for m, k in zip(g.members, mine) if k)
        parts = [operands[m[0]] if k else None for m, k in zip(g.members, mine)]
        x = _owner.stack_factors(owner, g, parts, (g.dim, w), g.dtype)
        template = nodes[g.members[0][0]]

        def solve(x, inverse, template=template, kind=g.kind):
            plan = _per_factor_operand_plan(template, x.shape, kind)
            return _kron.apply_axis_matrices(
                x, (inverse, jnp.zeros((x.shape[0], 0), x.dtype)), plan
            )

        y = _distribute.local(solve, x, inv, enabled=distribute)
        cuts = [(m[3], operands[m[0]].shape[-1]) if k else None for m, k in zip(g.members, mine)]
        for m, part in zip(g.members, _owner.unstack_factors(owner, g, y, cuts)):
            if part is not None:
                out[m[0]] = part
    return out


def _per_factor_update(
    owner, layout, updates, grads, stats, state, *, hp, frequency, static, emit, diagonal=None
):
    """One update of a state in K-FAC's per-factor owner layout.

    As :func:`_owned_update`, with the factor state in
    :class:`layerwise_optax._owner.FactorGroup` stacks: per group each
    device accumulates (EMA, pending mean) and refreshes (inverse by Cholesky, keep-last-good)
    the factors it owns, every factor in the corner of its entry with the
    identity outside (exact: see :mod:`layerwise_optax._owner`). The step
    solves each kernel's gradient blocks with their input factors on the input
    factors' owners, gathers the result, solves it with the output factors on
    theirs and gathers again; the rest of phase 3 is the params-shaped
    :func:`_owned_moments`. Leaves without factors run the per-leaf code.
    """
    plans = layout.work_plans
    _owner.check_per_factor(owner, plans, grads, _factor_kinds)
    nodes = _owner.plan_nodes(plans)
    flat_stats, views, valid = _owned_views(plans, updates, grads, stats)
    bare = _owner._bare_leaves(plans, grads)
    count = _kron.increment(state.count)
    refresh = _kron.every(state.count, frequency)

    # Leaves without factors: the replicated layout's per-leaf phases.
    leaf_plans = {"blocks": (), "leaves": tuple(nodes[i] for i in owner.leaves)}
    leaf_grads = {"blocks": (), "leaves": tuple(bare[i] for i in owner.leaves)}
    leaf_stats = {"blocks": (), "leaves": tuple(flat_stats[i] for i in owner.leaves)}
    leaf_inner = state._replace(
        **{name: {"blocks": (), "leaves": getattr(state, name).leaves} for name in _GROUPED_FIELDS}
    )
    leaf_acc = _accumulate(leaf_grads, leaf_stats, leaf_inner, leaf_plans, hp.factor_decay)
    leaf_inverses, leaf_failed = _refresh(
        refresh, leaf_acc, leaf_inner, leaf_plans, leaf_stats, hp, count, static
    )
    leaf_solved = _owned_solves(
        leaf_grads, leaf_stats, leaf_inverses, leaf_plans, static, hp.damping
    )

    # Phase 1 per factor group: this step's statistics into the owners' EMAs.
    def flags(g, fn):
        return _owner.factor_flags(owner, g, [fn(m[0]) for m in g.members])

    facs, news = [], []
    for g, old, pend in zip(owner.factor_groups(), state.factors.blocks, state.pending.blocks):
        parts = [None if views[i] is None else views[i][side] for i, side, _, _ in g.members]
        shape = (g.dim,) if g.kind == "diag" else (g.dim, g.dim)
        new = _owner.stack_factors(owner, g, parts, shape, jnp.float32)
        use = flags(g, lambda i: jnp.logical_and(valid[i], views[i] is not None))
        new = _with_pending((new,), (pend,), state.pending_count, use)
        facs.append(_kron.ema((old,), new, hp.factor_decay, valid=use)[0])
        news.append(new[0])

    # Phase 2: the damped factors' inverses (by Cholesky), each device its own entries.
    correction = _correction(hp.factor_decay, _statistics_count(count, static))
    present = [flags(g, lambda i: views[i] is not None) for g in owner.factor_groups()]

    def factorize(facs, invs):
        scaled = [f * correction for f in facs]
        deltas = _per_factor_damping(owner, scaled, hp.damping, static.damping_mode)
        out, failed = [], jnp.zeros([], jnp.int32)
        for g, m, delta, inv, here in zip(owner.factor_groups(), scaled, deltas, invs, present):
            lengths = _owner._constrain(jnp.asarray(g.lengths()), owner)

            def chol(m, delta, lengths, here, inv, kind=g.kind):
                index = jnp.arange(m.shape[-1])
                if kind == "diag":
                    m = _linalg.add_ridge(m, delta, diagonal=True)
                    corner = (index[None, :] < lengths[:, None]) & here[:, None]
                    # Outside the corner the largest entry of the row, so the
                    # floor of inv_root_diag (relative to it) stays the row's own.
                    top = jnp.max(jnp.where(corner, m, -jnp.inf), axis=-1, keepdims=True)
                    m = jnp.where(corner, m, jnp.where(jnp.isfinite(top), top, 1.0))
                    new = _linalg.inv_root_diag(m, 1, jnp.zeros([], jnp.float32), False)
                    new, _, ok = _failure.keep_good(new, inv, matrix=False)
                    return jnp.where(here[:, None], new, inv), ok
                m = _linalg.add_ridge(m, delta)
                corner = (index[None, :, None] < lengths[:, None, None]) & (
                    index[None, None, :] < lengths[:, None, None]
                )
                # The identity outside the corner, and in entries without statistics.
                corner = corner & here[:, None, None]
                m = jnp.where(corner, m, jnp.eye(m.shape[-1], dtype=m.dtype))
                # The inverse of blockdiag(M, I) is blockdiag(M^-1, I): exact in the corner.
                new, _, ok = _failure.keep_good(_linalg.inv_psd_cholesky(m), inv, matrix=True)
                return jnp.where(here[:, None, None], new, inv), ok

            new, ok = _distribute.local(
                chol, m, delta, lengths, here, inv, enabled=static.distribute
            )
            out.append(new)
            failed = failed + jnp.sum(~ok).astype(jnp.int32)
        return tuple(out), failed

    def keep(facs, invs):
        return tuple(invs), jnp.zeros([], jnp.int32)

    inverses, failed = jax.lax.cond(
        refresh, factorize, keep, tuple(facs), tuple(state.inverses.blocks)
    )

    # Phase 3: input-factor solves, then output-factor solves, on the owners.
    def blocks(i):
        x = _failure.guard(bare[i])[1]
        if _axes._explicit_spec(x) is not None:
            x = jax.sharding.reshard(x, jax.sharding.PartitionSpec())
        return nodes[i].to_blocks(x)

    solved_in = _per_factor_solves(
        owner,
        nodes,
        {i: blocks(i) for i, v in enumerate(views) if v is not None and i not in owner.leaves},
        inverses,
        0,
        static.distribute,
    )
    solved_out = _per_factor_solves(
        owner,
        nodes,
        {i: jnp.swapaxes(x, 1, 2) for i, x in solved_in.items()},
        inverses,
        1,
        static.distribute,
    )

    def wide(tree):
        return jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), tree)

    plan_list, treedef = jax.tree.flatten(plans, is_leaf=_axes._is_plan_node)
    like = treedef.flatten_up_to(wide(grads))
    out_nodes = list(like)
    for i, y in solved_out.items():
        out_nodes[i] = _owner._like(
            nodes[i].from_blocks(jnp.swapaxes(y, 1, 2)), like[i], plan_list[i]
        )
    for i, y in zip(owner.leaves, leaf_solved["leaves"]):
        if y is not None:
            out_nodes[i] = _owner._like(y, like[i], plan_list[i])
    solved = _unfold(layout, jax.tree.unflatten(treedef, out_nodes), wide(updates))
    if diagonal is None:
        diagonal = jax.tree.map(lambda _: None, updates, is_leaf=_axes.is_masked)
    mu, nu, out = _owned_moments(
        layout, updates, state, solved, views, valid, hp, count, static, diagonal
    )

    def stored(new, name, leaves):
        old = getattr(state, name)
        return _owner.Grouped(
            tuple(_kron.store(tuple(new), tuple(old.blocks), state.count)),
            leaves,
            owner,
        )

    leaf_new = {
        "factors": _kron.store(
            _axes.bare(leaf_plans, _axes.unzip(leaf_acc, "factors")),
            leaf_inner.factors,
            state.count,
        )["leaves"],
        "inverses": _axes.bare(leaf_plans, leaf_inverses)["leaves"],
        "pending": _new_pending(leaf_plans, leaf_acc, leaf_inner.pending, emit, state.count)[
            "leaves"
        ],
    }
    new_state = _owned_new_state(
        state,
        count,
        mu,
        nu,
        valid,
        leaf_failed + failed,
        emit,
        factors=stored(facs, "factors", leaf_new["factors"]),
        pending=(
            stored(
                [jnp.where(emit, 0, n).astype(n.dtype) for n in news],
                "pending",
                leaf_new["pending"],
            )
            if _has_pending(state.pending.blocks)
            else _owner.Grouped(state.pending.blocks, leaf_new["pending"], owner)
        ),
        inverses=_owner.Grouped(tuple(inverses), leaf_new["inverses"], owner),
    )
    return out, new_state


def default_layout(tree: Any) -> Any:
    """K-FAC's default layout of a whole tree: Flax kernels, and their biases folded.

    Every leaf gets :func:`default_kernel_dimension_numbers`, except a leaf named
    ``bias`` next to a leaf named ``kernel`` of two or more axes whose last axis has
    the bias's shape (``nnx.Linear``, ``nnx.Conv`` and Linen's ``Dense``/``Conv``):
    it gets :class:`FoldedBias` naming that kernel; and a two-axis leaf named
    ``embedding`` (``nnx.Embed``, Linen's ``Embed``) gets
    ``DiagonalFactors(DimensionNumbers(((0,), (1,))), (0,))``: a ``(vocabulary,
    features)`` table whose input factor (token counts) is kept diagonal, never
    ``vocabulary × vocabulary``; and the leaves of a norm layer, a node whose
    parameters are ``scale`` alone or ``scale`` and ``bias`` (Flax's ``LayerNorm``,
    ``RMSNorm``, ``BatchNorm``, ``GroupNorm``, NNX and Linen, also stacked), get
    ``None``: no factors, nothing allocated for them beyond the two params-sized
    moments. Their statistics are :class:`KfacDiagonal` blocks (the capture's) or,
    without statistics, the diagonal fallback; a ``d × d`` factor per leaf (with
    its inverse and pending copy) would never be used. Names are compared on the
    normalized paths (:func:`layerwise_optax._axes.path_keys`), so an ``nnx.State``,
    its pure form and a plain dict get the same layout.

    Args:
      tree: Params or updates (``optax.MaskedNode`` leaves get ``None``).

    Returns:
      A tree like ``tree`` of ``DimensionNumbers``, ``FoldedBias``,
      ``DiagonalFactors`` or ``None``.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_axes.is_masked)
    keys = [_axes.path_keys(path) for path, _ in flat]
    index = {k: i for i, k in enumerate(keys)}
    specs: list[Any] = [
        None if _axes.is_masked(x) else default_kernel_dimension_numbers(tuple(np.shape(x)))
        for _, x in flat
    ]
    siblings: dict[tuple[str, ...], set[str]] = {}
    for key in keys:
        if key:
            siblings.setdefault(key[:-1], set()).add(key[-1])
    for i, key in enumerate(keys):
        names = siblings.get(key[:-1], set()) if key else set()
        if "scale" in names and names <= {"scale", "bias"}:
            specs[i] = None  # a norm layer: KfacDiagonal statistics or the fallback
    for i, (key, (_, x)) in enumerate(zip(keys, flat)):
        if specs[i] is None:
            continue
        if key and key[-1] == "embedding" and not _axes.is_masked(x) and np.ndim(x) == 2:
            specs[i] = DiagonalFactors(_axes.DimensionNumbers(((0,), (1,))), (0,))
        if _axes.is_masked(x) or not key or key[-1] != "bias":
            continue
        k = index.get(key[:-1] + ("kernel",))
        if k is None or _axes.is_masked(flat[k][1]):
            continue
        kshape = tuple(np.shape(flat[k][1]))
        if len(kshape) >= 2 and tuple(np.shape(x)) == kshape[-1:]:
            specs[i] = FoldedBias("/".join(keys[k]))
    return jax.tree_util.tree_unflatten(treedef, specs)


class _Layout(NamedTuple):
    """Static K-FAC layout of one tree, leaf by leaf (flattened with ``is_masked``).

    ``plans`` are the leaves' own plans; ``work_plans`` is the tree the update runs
    on: at a folded kernel the plan of its homogeneous block ``(batch, d_in + 1,
    d_out)``, at its folded bias an ``optax.MaskedNode`` (the bias rides along in
    the kernel's block); ``flat_work`` is the same, leaf by leaf. ``folds`` holds
    the ``(kernel, bias)`` leaf indices.
    """

    paths: tuple[Any, ...]
    keys: tuple[tuple[str, ...], ...]
    plans: tuple[Any, ...]
    work_plans: Any
    flat_work: tuple[Any, ...]
    folds: tuple[tuple[int, int], ...]


def _layout(dimension_numbers: Any, tree: Any, max_precond_dim: int) -> _Layout:
    """Resolves kfac's layout spec (``DimensionNumbers``/``FoldedBias``/``None``) on a tree."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_axes.is_masked)
    spec_tree = dimension_numbers(tree) if callable(dimension_numbers) else dimension_numbers
    try:
        specs = treedef.flatten_up_to(spec_tree)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "dimension_numbers must have the same tree structure as the params (a "
            f"DimensionNumbers, FoldedBias or None at every leaf): {e}"
        ) from None
    paths = tuple(path for path, _ in flat)
    keys = tuple(_axes.path_keys(path) for path in paths)
    plans, folded = _leaf_plans(flat, specs, max_precond_dim)
    folds = _check_folds(folded, paths, keys, plans)
    work = list(plans)
    for k, b in folds:
        kp = plans[k]
        work[k] = _axes.make_plan(
            (kp.batch, kp.dims[0] + 1, kp.dims[1]),
            _axes.DimensionNumbers(((1,), (2,)), batch_axes=(0,)),
            max_precond_dim=max_precond_dim,
            block_size=None,
        )
        # A group kept diagonal (DiagonalFactors) stays diagonal in the homogeneous block.
        work[k] = _with_diagonal(work[k], tuple(i for i, kd in enumerate(kp.kinds) if kd == "diag"))
        work[b] = optax.MaskedNode()
    return _Layout(paths, keys, plans, treedef.unflatten(work), tuple(work), folds)


def _leaf_plans(flat: list, specs: list, max_precond_dim: int) -> tuple[tuple, dict]:
    """Each leaf's own plan (two factor groups checked) and the folded biases' specs."""
    plans, folded = [], {}
    for i, ((path, x), spec) in enumerate(zip(flat, specs)):
        if _axes.is_masked(x):
            plans.append(x)
            continue
        where = _axes.path_label(path)
        if isinstance(spec, FoldedBias):
            folded[i] = spec
            spec = None
        diagonal = ()
        if isinstance(spec, DiagonalFactors):
            spec, diagonal = spec.dimension_numbers, spec.groups
        shape = tuple(np.shape(x))
        spec = _axes.normalize(spec, shape, where)
        plan = _axes.make_plan(shape, spec, max_precond_dim=max_precond_dim, block_size=None)
        if spec is not None and (len(spec.factor_axes) != 2 or spec.identity_axes):
            raise ValueError(
                f"param {where} with shape {shape}: kfac needs exactly two factor groups "
                f"(input, output), got {tuple(spec)}."
            )
        plans.append(_with_diagonal(plan, diagonal))
    return tuple(plans), folded


def _with_diagonal(plan: _axes.LeafPlan, groups: tuple[int, ...]) -> _axes.LeafPlan:
    """``plan`` with the factors of ``groups`` kept diagonal (:class:`DiagonalFactors`)."""
    if not groups or plan.spec is None:
        return plan
    kinds: tuple[_axes.Kind, ...] = tuple(
        "diag" if i in groups else k for i, k in enumerate(plan.kinds)
    )
    return plan.with_kinds(kinds)


def _check_folds(folded: dict, paths: tuple, keys: tuple, plans: tuple) -> tuple:
    """The ``(kernel, bias)`` leaf index pairs of the folded biases, each checked.

    A folded bias must name a leaf of the params that has a K-FAC layout, have
    that kernel's batch and output shape, and be the kernel's only folded bias.
    """
    index = {"/".join(k): i for i, k in enumerate(keys)}
    folds, kernels = [], {}
    for b, fb in folded.items():
        where = _axes.path_label(paths[b])
        k = index.get(fb.kernel.strip("/"))
        if k is None or _axes.is_masked(plans[k]) or plans[k].spec is None:
            why = (
                "which is not a leaf of the params"
                if k is None
                else "which is masked here (mask a folded bias and its kernel together)"
                if _axes.is_masked(plans[k])
                else "which has no K-FAC layout (its dimension_numbers are None)"
            )
            raise ValueError(
                f"param {where}: dimension_numbers fold it into kernel {fb.kernel!r}, {why}; "
                f"leaf paths are like {list(index)[:8]}."
            )
        kp = plans[k]
        want = tuple(kp.shape[a] for a in kp.spec.batch_axes + kp.spec.factor_axes[1])
        if plans[b].shape != want:
            raise ValueError(
                f"param {where} with shape {plans[b].shape}: a bias folded into kernel "
                f"{fb.kernel!r} (shape {kp.shape}) must have the kernel's batch and output "
                f"axes' shape {want}."
            )
        if k in kernels:
            raise ValueError(
                f"param {where}: kernel {fb.kernel!r} already has the folded bias "
                f"{_axes.path_label(paths[kernels[k]])}; a kernel folds at most one bias."
            )
        kernels[k] = b
        folds.append((k, b))
    return tuple(folds)


def _is_stats_entry(x: Any) -> bool:
    return x is None or isinstance(x, (KfacFactors, KfacDiagonal, FoldedBias))


def _stats_like(kfac_stats: Any, updates: Any, layout: _Layout) -> Any:
    """Matches the statistics to the leaves of ``updates`` by normalized path, and checks them.

    Returns a tree like ``updates`` with the :class:`KfacFactors` of each kernel
    that has statistics and ``None`` elsewhere (diagonal fallback, masked leaves
    and folded biases, which are preconditioned at their kernel).

    The rule, leaf by leaf (paths compared with :func:`layerwise_optax._axes.path_keys`,
    so ``nnx.State``, its pure form and plain dicts match):

    * an entry (``KfacFactors`` or ``FoldedBias``) whose path is no leaf of the
      params: error, never ignored;
    * ``None``: the leaf takes the diagonal fallback, on purpose;
    * no entry at all: the diagonal fallback when the statistics have no entry
      for the leaf's layer (its parent node: norms, embeddings, layers the capture
      does not see); an error when they have entries for other leaves of the
      same layer and the leaf has a K-FAC layout (a forgotten bias, say);
    * ``KfacFactors`` at a leaf without a K-FAC layout, at a folded bias, or at a
      folded kernel whose ``a`` is not homogeneous (``d_in + 1``): error;
    * ``FoldedBias`` where the layout does not fold that bias into that kernel, or
      a folded bias whose kernel has factors but whose own entry is not
      ``FoldedBias``: error;
    * factors whose shapes do not fit the kernel's working plan
      (:func:`_check_shapes`): error.
    """
    found, layers = _index_stats(kfac_stats, layout)
    kernel_of = {b: k for k, b in layout.folds}
    out = []
    for i, (key, plan) in enumerate(zip(layout.keys, layout.plans)):
        if _axes.is_masked(plan):
            out.append(None)
            continue
        s = found.get(key, (None, _ABSENT))[1]
        if s is _ABSENT:
            if key[:-1] in layers and (plan.spec is not None or i in kernel_of):
                raise ValueError(
                    f"kfac_stats has statistics for the layer of param "
                    f"{_axes.path_label(layout.paths[i])} but no entry for it: give its "
                    "KfacFactors, FoldedBias (a bias folded into its kernel) or None (the "
                    "diagonal fallback, on purpose)."
                )
            s = None
        if i in kernel_of:
            _check_folded_bias_entry(i, kernel_of[i], s, found, layout)
            out.append(None)
        else:
            out.append(_check_entry(i, s, plan, layout))
    for path, s, work in zip(layout.paths, out, layout.flat_work):
        if isinstance(s, KfacFactors):
            _check_shapes(path, s, work)
    flat_updates, treedef = jax.tree_util.tree_flatten(updates, is_leaf=_axes.is_masked)
    return treedef.unflatten([x if _axes.is_masked(x) else s for x, s in zip(flat_updates, out)])


_ABSENT = object()


def _index_stats(kfac_stats: Any, layout: _Layout) -> tuple[dict, set]:
    """The statistics' entries by normalized path, and the layers (parent paths) they cover.

    Raises for an entry of the wrong type or one that matches no parameter.
    """
    found, layers = {}, set()
    for path, s in jax.tree_util.tree_flatten_with_path(kfac_stats, is_leaf=_is_stats_entry)[0]:
        if not _is_stats_entry(s):
            raise ValueError(
                f"kfac_stats at {_axes.path_label(path)} must be a KfacFactors(a, g), a "
                f"KfacDiagonal, a FoldedBias or None, got {type(s).__name__}."
            )
        key = _axes.path_keys(path)
        found[key] = (path, s)
        layers.add(key[:-1])
    known = set(layout.keys)
    stray = [path for key, (path, s) in found.items() if s is not None and key not in known]
    if stray:
        names = ["/".join(k) for k in layout.keys]
        raise ValueError(
            f"kfac_stats at {_axes.path_label(stray[0])} match no parameter (the statistics "
            f"and the params must mirror each other; leaf paths are like {names[:8]}"
            f"{' ...' if len(names) > 8 else ''})."
        )
    return found, layers


def _check_folded_bias_entry(i: int, k: int, s: Any, found: dict, layout: _Layout) -> None:
    """The entry ``s`` of leaf ``i``, a bias folded into kernel ``k``, must be its FoldedBias."""
    where = _axes.path_label(layout.paths[i])
    kernel = "/".join(layout.keys[k])
    ks = found.get(layout.keys[k], (None, None))[1]
    if isinstance(s, FoldedBias) and s.kernel.strip("/") != kernel:
        raise ValueError(
            f"kfac_stats at {where}: FoldedBias({s.kernel!r}), but kfac's layout "
            f"folds this bias into {kernel!r}."
        )
    if isinstance(s, (KfacFactors, KfacDiagonal)) or (isinstance(ks, KfacFactors) and s is None):
        raise ValueError(
            f"kfac_stats at {where}: kfac's layout folds this bias into kernel "
            f"{kernel!r} (homogeneous coordinates), so its entry must be "
            f"FoldedBias({kernel!r}) and the kernel's a must include the constant "
            "input 1; for a separate bias block give kfac dimension_numbers with "
            "DimensionNumbers(((), (0,))) at the bias (e.g. "
            "layerwise_optax.flax.kfac_dimension_numbers(model, fold_biases=False))."
        )
    if isinstance(s, FoldedBias) and not isinstance(ks, KfacFactors):
        raise ValueError(
            f"kfac_stats at {where}: FoldedBias({kernel!r}), but the kernel has no KfacFactors."
        )


def _check_entry(i: int, s: Any, plan: _axes.LeafPlan, layout: _Layout) -> Any:
    """The entry ``s`` of leaf ``i`` (not a folded bias), checked against its layout."""
    where = _axes.path_label(layout.paths[i])
    if isinstance(s, FoldedBias):
        raise ValueError(
            f"kfac_stats at {where}: FoldedBias({s.kernel!r}), but kfac's layout does not "
            "fold this leaf into a kernel (give kfac dimension_numbers with "
            f"FoldedBias({s.kernel!r}) here, e.g. "
            "layerwise_optax.flax.kfac_dimension_numbers(model))."
        )
    if isinstance(s, KfacDiagonal):
        return _check_diagonal_entry(i, s, plan, layout)
    if not isinstance(s, KfacFactors):
        return s
    if plan.spec is None:
        raise ValueError(
            f"kfac_stats at {where} gives KfacFactors, but the param has no K-FAC "
            "layout (its dimension_numbers are None); give None there for the "
            "diagonal fallback."
        )
    bias = next((b for k, b in layout.folds if k == i), None)
    d = plan.dims[0] + 1
    a_shape = tuple(np.shape(s.a))
    if bias is not None and a_shape[-2:] != (d, d) and a_shape[-1:] != (d,):
        raise ValueError(
            f"kfac_stats at {where}: factor a has shape {a_shape}, but the "
            f"kernel's bias {'/'.join(layout.keys[bias])!r} is folded into it, so a must "
            f"be in homogeneous coordinates, {(d, d)} per layer slice (inputs with a "
            "constant 1 appended; the capture's default); for a separate bias "
            "block give kfac DimensionNumbers(((), (0,))) at the bias."
        )
    return s


def _check_diagonal_entry(
    i: int, s: KfacDiagonal, plan: _axes.LeafPlan, layout: _Layout
) -> KfacDiagonal:
    """A :class:`KfacDiagonal` entry must be shaped like its parameter, which no bias folds into."""
    where = _axes.path_label(layout.paths[i])
    bias = next((b for k, b in layout.folds if k == i), None)
    if bias is not None:
        raise ValueError(
            f"kfac_stats at {where}: a KfacDiagonal block covers one parameter, but kfac's "
            f"layout folds the bias {'/'.join(layout.keys[bias])!r} into this kernel; give "
            "that bias DimensionNumbers or None in dimension_numbers (and its own statistics)."
        )
    shape = tuple(np.shape(s.fisher))
    if shape != plan.shape:
        raise ValueError(
            f"kfac_stats at {where}: KfacDiagonal.fisher has shape {shape}, but the param "
            f"has shape {plan.shape} (the diagonal is shaped like its parameter)."
        )
    return s


def _refuse_accumulated_diagonal(diagonal: Any) -> None:
    """Diagonal blocks under :func:`layerwise_optax.multi_steps` are refused, by path.

    The accumulation keeps only the factors' pending statistics between
    mini-steps; a diagonal block's EMA lives in ``nu`` and would take the emitting
    mini-step's statistics only, so the others would be silently dropped.
    """
    flat = jax.tree_util.tree_flatten_with_path(diagonal)[0]
    if flat:
        raise ValueError(
            f"kfac_stats at {_axes.path_label(flat[0][0])}: KfacDiagonal statistics cannot "
            "be accumulated by layerwise_optax.multi_steps (only the Kronecker factors' "
            "statistics are kept between mini-steps); give None there (the diagonal "
            "fallback) or step without multi_steps."
        )


def _diagonal_flags(updates: Any, diagonal: Any, state: ScaleByKfacState) -> Any:
    """:attr:`ScaleByKfacState.diagonal` after a step: which leaves had a diagonal block.

    ``diagonal`` (from :func:`_split_diagonal`) is ``None`` on a step without
    statistics, which keeps the flags.
    """
    if diagonal is None:
        return state.diagonal
    flat, treedef = jax.tree_util.tree_flatten(updates, is_leaf=_axes.is_masked)
    entries = treedef.flatten_up_to(diagonal)
    return treedef.unflatten(
        [
            optax.MaskedNode() if _axes.is_masked(u) else jnp.asarray(f is not None)
            for u, f in zip(flat, entries)
        ]
    )


def _split_diagonal(stats: Any, updates: Any) -> tuple[Any, Any]:
    """The matched statistics without their diagonal blocks, and those blocks' diagonals.

    Returns ``(factors, diagonal)``, both trees like ``updates``: ``factors`` with
    ``None`` where ``stats`` has a :class:`KfacDiagonal` (no Kronecker factors
    there: the factor phases skip the leaf), ``diagonal`` with the
    ``fisher`` array there and ``None`` elsewhere.
    """
    flat_updates, treedef = jax.tree_util.tree_flatten(updates, is_leaf=_axes.is_masked)
    entries = treedef.flatten_up_to(stats)
    factors = [None if isinstance(e, KfacDiagonal) else e for e in entries]
    diagonal = [e.fisher if isinstance(e, KfacDiagonal) else None for e in entries]
    return treedef.unflatten(factors), treedef.unflatten(diagonal)


def _check_shapes(path: Any, s: KfacFactors, plan: _axes.LeafPlan) -> None:
    """A kernel's factors must fit its working plan: ``(d, d)`` per layer slice.

    For a diagonal dimension (longer than ``max_precond_dim``) the diagonal
    ``(..., d)`` is accepted as well.
    """
    for name, mat, d, kind in zip(("a", "g"), s, plan.dims, _kernel_plan(plan).kinds):
        full = mat.shape[-2:] == (d, d) and mat.size == plan.stack * d * d
        diag = kind == "diag" and mat.shape[-1:] == (d,) and mat.size == plan.stack * d
        if not (full or diag):
            raise ValueError(
                f"kfac_stats at {jax.tree_util.keystr(path)}: factor {name} has shape "
                f"{mat.shape}, but param with shape {plan.shape} needs {(d, d)} per layer "
                f"slice ({plan.stack} slices)."
            )


def _stats_view(s: KfacFactors, plan: _axes.LeafPlan) -> tuple[jax.Array, jax.Array]:
    """A kernel's checked factors (:func:`_check_shapes`) in the state layout, float32.

    Full factors are ``(stack, d, d)``; a diagonal dimension keeps only the
    diagonal, ``(stack, d)``, of a full matrix or of a given diagonal.
    """
    out = []
    for mat, d, kind in zip(s, plan.dims, _kernel_plan(plan).kinds):
        if mat.shape[-2:] == (d, d) and mat.size == plan.stack * d * d:
            mat = jnp.reshape(mat, (plan.stack, d, d))
            if kind == "diag":
                mat = jnp.diagonal(mat, axis1=-2, axis2=-1)
        out.append(jnp.reshape(mat, (plan.stack, d) if kind == "diag" else (plan.stack, d, d)))
    return out[0].astype(jnp.float32), out[1].astype(jnp.float32)


def _kernel_plan(plan: _axes.LeafPlan) -> _axes.LeafPlan:
    """A kernel's factor kinds: dense, or diagonal above ``max_precond_dim``; never none.

    K-FAC factors are never blocked, and a length-1 dimension keeps its ``1 x 1``
    factor (``'none'`` in the shared default rule).
    """
    if plan.spec is None:
        return plan
    return plan.with_kinds(tuple("diag" if k == "diag" else "full" for k in plan.kinds))


def _applied_plan(plan: _axes.LeafPlan, sides: str) -> _axes.LeafPlan:
    """The kernel's plan with the factor that ``sides`` does not apply as ``'none'``."""
    kinds: tuple[_axes.Kind, ...] = tuple(
        k if (i == 0 and sides != "output") or (i == 1 and sides != "input") else "none"
        for i, k in enumerate(_kernel_plan(plan).kinds)
    )
    return plan.with_kinds(kinds)


def _homogeneous(g: jax.Array, plan: _axes.LeafPlan, b: jax.Array) -> jax.Array:
    """``[G; g_b]``: the kernel's ``(batch, d_in, d_out)`` view with the bias as row ``d_in``."""
    dtype = jnp.result_type(g, b)
    gk = jnp.reshape(jnp.transpose(g, plan.perm), (plan.batch,) + plan.dims)
    gb = jnp.reshape(b, (plan.batch, 1, plan.dims[1]))
    return jnp.concatenate([gk.astype(dtype), gb.astype(dtype)], axis=1)


def _split(h: jax.Array, plan: _axes.LeafPlan, k: jax.Array, b: jax.Array):
    """Inverse of :func:`_homogeneous`: the kernel and bias parts, in their own layouts."""
    d_in = plan.dims[0]
    kernel = plan.from_blocks(h[:, :d_in]).astype(k.dtype)
    return kernel, jnp.reshape(h[:, d_in], np.shape(b)).astype(b.dtype)


def _fold(layout: _Layout, tree: Any, *, skip_placeholders: bool = False) -> Any:
    """A params-like tree in the working layout: folded pairs as one homogeneous leaf.

    ``skip_placeholders``: a pair whose kernel entry is a ``nu`` placeholder
    (:func:`_without_fallback_moment`) keeps it, and its bias becomes masked.
    """
    if not layout.folds:
        return tree
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=_axes.is_masked)
    for k, b in layout.folds:
        if not (skip_placeholders and _is_placeholder(leaves[k])):
            leaves[k] = _axes.on_gathered(_homogeneous, leaves[k], layout.plans[k], leaves[b])
        leaves[b] = optax.MaskedNode()
    return treedef.unflatten(leaves)


def _unfold(layout: _Layout, tree: Any, like: Any, *, skip_placeholders: bool = False) -> Any:
    """Back from the working layout to the layout of ``like`` (the kernel and bias split).

    ``skip_placeholders``: a pair whose entry in ``like`` is a ``nu`` placeholder
    gets ``like``'s placeholders back.
    """
    if not layout.folds:
        return tree
    leaves = jax.tree_util.tree_flatten(tree, is_leaf=_axes.is_masked)[0]
    like_leaves, treedef = jax.tree_util.tree_flatten(like, is_leaf=_axes.is_masked)
    for k, b in layout.folds:
        if skip_placeholders and _is_placeholder(like_leaves[k]):
            leaves[k], leaves[b] = like_leaves[k], like_leaves[b]
            continue
        leaves[k], leaves[b] = _axes.on_gathered(
            _split, leaves[k], layout.plans[k], like_leaves[k], like_leaves[b]
        )
    return treedef.unflatten(leaves)


def _is_placeholder(x: Any) -> bool:
    """Whether ``x`` is a ``nu`` placeholder: an empty array of rank >= 1 (all axes 0)."""
    return hasattr(x, "shape") and len(x.shape) >= 1 and all(n == 0 for n in x.shape)


def _without_fallback_moment(layout: _Layout, nu: Any) -> Any:
    """``nu`` with an empty placeholder at every leaf that has a K-FAC layout.

    A kernel with factors (and a bias folded into one) never takes the diagonal
    fallback with ``diagonal_fallback=False`` (:func:`_require_factors`), so its
    params-shaped second moment is replaced by a ``(0, ..., 0)`` array of the
    leaf's rank: the tree keeps its structure and ranks (shardings like the
    parameter's still apply), without the memory.
    """
    leaves, treedef = jax.tree_util.tree_flatten(nu, is_leaf=_axes.is_masked)
    with_factors = {i for i, plan in enumerate(layout.plans) if _has_factors(plan)}
    with_factors |= {b for k, b in layout.folds if k in with_factors}
    out = [
        jnp.zeros((0,) * x.ndim, x.dtype) if i in with_factors and x.ndim >= 1 else x
        for i, x in enumerate(leaves)
    ]
    return treedef.unflatten(out)


def _has_factors(plan: Any) -> bool:
    return not _axes.is_masked(plan) and plan is not None and plan.spec is not None


def _require_factors(layout: _Layout, stats: Any) -> None:
    """With ``diagonal_fallback=False``: every kernel with a K-FAC layout has its factors.

    Raises:
      ValueError: Naming the first param with a K-FAC layout whose entry is not
        :class:`KfacFactors` (``None``, absent, or :class:`KfacDiagonal`).
    """
    entries = jax.tree_util.tree_flatten(
        stats, is_leaf=lambda x: _is_stats_entry(x) or _axes.is_masked(x)
    )[0]
    folded = {b for _, b in layout.folds}
    for i, (plan, entry) in enumerate(zip(layout.plans, entries)):
        if i in folded or not _has_factors(plan) or isinstance(entry, KfacFactors):
            continue
        got = "no statistics" if entry is None else f"a {type(entry).__name__}"
        raise ValueError(
            f"kfac_stats gives param {_axes.path_label(layout.paths[i])} {got}, but with "
            "diagonal_fallback=False every leaf with a K-FAC layout needs its KfacFactors "
            "on every step with statistics (it keeps no diagonal-fallback moment). Give "
            "its factors, make its dimension_numbers entry None (the diagonal fallback), "
            "or use diagonal_fallback=True."
        )


def kfac(
    learning_rate: optax.ScalarOrSchedule,
    momentum: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    factor_decay: jax.typing.ArrayLike = 0.95,
    damping: jax.typing.ArrayLike = 1e-1,
    precondition_frequency: jax.typing.ArrayLike = 1,
    max_precond_dim: int | None = None,
    dimension_numbers: _axes.DimNumsOrFn | None = None,
    damping_mode: Literal["absolute", "pi", "exact"] = "pi",
    sides: Literal["both", "input", "output"] = "both",
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: optax.MaskOrFn = None,
    mu_dtype: jax.typing.DTypeLike | None = None,
    precond_dtype: jax.typing.DTypeLike | None = None,
    *,
    nesterov: bool = False,
    distribute: bool = True,
    axis_name: str | tuple[str, ...] | None = None,
    state_layout: Literal["auto", "owner", "replicated"] = "auto",
    owner_axes: str | tuple[str, ...] | None = None,
    inverse: Literal["cholesky", "eigh"] = "cholesky",
    statistics_frequency: int | None = None,
    diagonal_fallback: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""K-FAC: Kronecker-factored natural gradient (Martens and Grosse, 2015).

    For a kernel with input covariance ``A = E[x x^T]`` and output-gradient
    covariance ``B = E[delta delta^T]`` (passed each step as
    ``kfac_stats=``, a tree mirroring the params with :class:`KfacFactors` at the
    kernels), the layer's Fisher block is approximated by ``A ⊗ B`` and the update
    is its damped inverse applied to the gradient, in the kernel's own layout:

    .. math::
      \bar A \leftarrow \beta \bar A + (1-\beta) A_t, \quad
      \bar B \leftarrow \beta \bar B + (1-\beta) B_t, \quad
      U = (\bar A + \delta_A I)^{-1}\, G\, (\bar B + \delta_B I)^{-1}

    followed by momentum as an exponential moving average, ``m \leftarrow \mu m +
    (1 - \mu) U`` (``\mu`` = ``momentum``), applied as ``-lr * m`` (Nesterov:
    ``-lr (\mu m + (1 - \mu) U)``). This is an average of natural-gradient steps,
    not optax's heavy-ball ``trace`` (``m <- mu m + U``), whose steady-state step
    ``U / (1 - mu)`` is 10x larger at ``momentum = 0.9``; nor is it Adam's
    bias-corrected ``b1`` average (the first step is ``(1 - momentum) U``). The
    factorizations are refreshed every ``precondition_frequency`` steps.

    Biases are folded into their kernels by default (homogeneous coordinates,
    Martens and Grosse 2015, section 3, as in kfac-jax): ``z = x W + b`` is the
    kernel ``[W; b]`` on the input ``[x; 1]``, so the kernel's ``A`` is over
    ``[x; 1]`` (``(d_in + 1) × (d_in + 1)``, keeping the kernel–bias cross term
    ``E[x]``), the bias shares the kernel's ``B``, and ``[G_W; g_b]`` is
    preconditioned jointly and split. The layout says which bias folds into which
    kernel (:class:`FoldedBias` in ``dimension_numbers``; by default every
    ``bias`` next to a ``kernel``, the Flax naming), the statistics carry the
    homogeneous ``A`` at the kernel and a :class:`FoldedBias` at the bias. A
    separate bias block (the bias as a kernel with a unit input, ``A = [[T]]``
    for ``T`` positions per example) is kept as an option: give the bias
    ``DimensionNumbers(((), (0,)))`` and its own :class:`KfacFactors`.

    Statistics are matched to the params by tree path, with a Flax
    ``Variable``'s trailing ``.value`` dropped (``nnx.State``, ``nnx.as_pure``
    trees and plain dicts match alike). A :class:`KfacDiagonal` entry (norm
    layers' scale and shift) gives the leaf its exact diagonal Fisher block,
    ``g / (c F̄ + damping)`` with ``F̄`` the EMA of its diagonals. A ``None``
    entry, or no entry for a whole layer (layers the capture does not see),
    makes the leaf use the damped diagonal empirical Fisher of the mean gradient,
    ``g / (nu_hat + damping)``. An
    entry that matches no parameter, a missing entry for one leaf of a layer that
    has statistics, or factors that do not fit the layout raise a ``ValueError``
    naming the path: statistics are never silently ignored. ``sides='input'``
    gives the one-sided whitening ``(\bar A + \delta I)^{-1} G`` of the paper's
    single-index step and of DFW.

    Weight decay is decoupled and multiplied by the learning rate, as in
    :func:`optax.adamw`.

    Where to use it / what to tune: networks built from dense and conv layers
    whose statistics you can capture in the forward/backward pass. It is the
    method the paper analyzes: its rate does not depend on the conditioning of
    the inputs or of the next layer. With the defaults (``damping=0.1``,
    pi-adjusted; EMA ``momentum=0.9``) any learning rate in ``0.01..1`` is
    stable on the MLPs of the benchmarks (sklearn digits, MNIST-1D, Fisher or
    empirical statistics), about ``0.1`` being fastest. Lowering ``damping`` lets the
    step grow as the curvature shrinks: the Fisher of a confident classifier goes
    to zero, the damped step approaches ``G / lambda`` and, at ``damping=1e-3``,
    diverges on digits for every learning rate from 0.03 up. Lower it only with a
    smaller learning rate, or for the paper's stylized step (``momentum=0,
    factor_decay=0, damping_mode='absolute'``, small ``damping``), where the
    statistics come from one well-conditioned batch.

    Args:
      learning_rate: A global scaling factor, fixed or a schedule.
      momentum: Decay of the momentum EMA of the preconditioned updates (not
        bias-corrected), in ``[0, 1)`` (``0``: no momentum).
      b2: Decay of the diagonal fallback's second moment, in ``[0, 1)``.
      factor_decay: EMA decay of the factors, in ``[0, 1]`` (``0``: current batch).
      damping: Tikhonov damping ``lambda`` (see "what to tune").
      precondition_frequency: Steps between inverse refreshes (may be traced).
      max_precond_dim: Longer factor dimensions keep only their diagonal (static;
        ``None``: 4096).
      dimension_numbers: Each kernel's (input, output) groups and each folded
        bias's :class:`FoldedBias`; ``None``: Flax layouts with biases folded
        (:func:`default_layout`).
      damping_mode: ``'pi'`` (factored, pi-adjusted), ``'absolute'`` or
        ``'exact'`` (``(A ⊗ B + lambda I)^{-1}``, with ``inverse='eigh'`` only);
        one-sided updates are damped by ``lambda`` in all three (see
        :func:`scale_by_kfac`).
      sides: ``'both'``, ``'input'`` or ``'output'``.
      weight_decay: Decoupled weight decay, fixed or a schedule.
      mask: Weight-decay mask.
      mu_dtype: Storage dtype of the momentum.
      precond_dtype: Storage dtype of the factor EMAs, pending statistics and
        inverses (``None``: float32; computed in float32 either way;
        see :func:`scale_by_kfac`).
      nesterov: Nesterov momentum.
      distribute: Spread the inverses over the mesh's devices (see
        :func:`scale_by_kfac`).
      axis_name: Average the statistics over this ``pmap`` axis (see
        :func:`scale_by_kfac`).
      state_layout: ``'auto'``, ``'owner'`` or ``'replicated'`` (see
        :func:`layerwise_optax.scale_by_kfac`).
      owner_axes: Mesh axes of the owner layout (``None``: all).
      inverse: ``'cholesky'`` (inverses of the damped factors by Cholesky) or
        ``'eigh'`` (eigendecompositions of the undamped factors, the damping
        applied each step; needed for ``damping_mode='exact'``; see
        :func:`scale_by_kfac`). Static.
      statistics_frequency: ``k >= 1`` (``None``: 1): statistics come every ``k``
        steps and ``kfac_stats=None`` marks the steps in between, which keep the
        factors and use the current inverses (see :func:`scale_by_kfac`). Static.
      diagonal_fallback: ``False``: no params-shaped second moment for the leaves
        with a K-FAC layout (the state of kfac-jax's size; each such leaf then
        needs its factors on every step with statistics); see
        :func:`scale_by_kfac`. Static bool.

    Returns:
      The corresponding :class:`optax.GradientTransformationExtraArgs`; call its
      update with ``kfac_stats=``.

    Raises:
      ValueError: At construction for bad hyperparameters (and
        ``damping_mode='exact'`` without ``inverse='eigh'``); at ``init`` for a
        bad layout; at ``update`` without ``kfac_stats`` (with
        ``statistics_frequency=1``), or with statistics that
        match no parameter, miss a leaf of a layer they cover, or do not fit
        their kernels (naming the path).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> params = {'w': jnp.zeros((3, 2)), 'b': jnp.zeros(2)}
      >>> stats = {'w': lo.KfacFactors(a=jnp.eye(3), g=jnp.eye(2)), 'b': None}
      >>> tx = lo.kfac(learning_rate=0.1, momentum=0.0, damping_mode='absolute', damping=0.0)
      >>> state = tx.init(params)
      >>> grads = {'w': jnp.ones((3, 2)), 'b': jnp.zeros(2)}
      >>> updates, state = tx.update(grads, state, params, kfac_stats=stats)
      >>> [[round(v, 6) for v in row] for row in updates['w'].tolist()]
      [[-0.1, -0.1], [-0.1, -0.1], [-0.1, -0.1]]

      With ``momentum`` the first step is ``(1 - momentum)`` of that (an EMA from zero,
      not bias-corrected):

      >>> tx = lo.kfac(learning_rate=0.1, momentum=0.9, damping_mode='absolute', damping=0.0)
      >>> updates, _ = tx.update(grads, tx.init(params), params, kfac_stats=stats)
      >>> round(float(updates['w'][0, 0]), 6)
      -0.01

      With ``inverse='eigh'`` the damping is applied in the factors' eigenbases
      at every step; ``damping_mode='exact'`` inverts ``A ⊗ B + lambda I`` itself
      (here ``(1 * 1 + 1)^{-1} = 0.5`` per entry):

      >>> tx = lo.kfac(learning_rate=1.0, momentum=0.0, damping=1.0, inverse='eigh',
      ...              damping_mode='exact')
      >>> updates, _ = tx.update(grads, tx.init(params), params, kfac_stats=stats)
      >>> [round(v, 6) for v in updates['w'][0].tolist()]
      [-0.5, -0.5]

    References:
      Martens and Grosse, `Optimizing Neural Networks with Kronecker-factored
      Approximate Curvature <https://arxiv.org/abs/1503.05671>`_, 2015.
      Zhang et al., `On the Concurrence of Layer-wise Preconditioning Methods and
      Provable Feature Learning <https://arxiv.org/abs/2502.01763>`_, 2025.

    .. seealso:: :func:`layerwise_optax.shampoo`, :func:`layerwise_optax.scale_by_kfac`
    """
    _checks.alias_args(learning_rate, weight_decay, mask)
    return optax.chain(
        scale_by_kfac(
            momentum=momentum,
            b2=b2,
            factor_decay=factor_decay,
            damping=damping,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
            dimension_numbers=dimension_numbers,
            damping_mode=damping_mode,
            sides=sides,
            mu_dtype=mu_dtype,
            precond_dtype=precond_dtype,
            nesterov=nesterov,
            distribute=distribute,
            axis_name=axis_name,
            state_layout=state_layout,
            owner_axes=owner_axes,
            inverse=inverse,
            statistics_frequency=statistics_frequency,
            diagonal_fallback=diagonal_fallback,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
