"""K-FAC statistics capture for Flax NNX models in the same forward/backward pass.

How it works: while the loss is traced, the ``__call__`` of every captured layer
(``nnx.Linear``, ``nnx.Conv``, ``nnx.LinearGeneral``, ``nnx.Einsum``) is wrapped so
that it

* records its input features (for a convolution, the input patches ordered like
  the kernel's ``(kh, kw, c_in)`` axes; for ``LinearGeneral``/``Einsum``, the
  contracted input axes flattened in the kernel's order), and
* adds a zero *perturbation* ``e`` to its output.

``Einsum`` kernel axes are contracted with the input (an input axis of ``A``),
passed to the output (an output axis of ``B``), or *shared* by input and output
(per-head weights, ``'bthd,hdk->bthk'``): each slice of the shared axes is its
own layer, a batch axis of the kernel with its own pair of factors
(block-diagonal over heads), ``a`` of shape ``(*heads, d_in, d_in)`` and ``g``
``(*heads, d_out, d_out)`` from the rows of that slice. ``LinearGeneral``'s
``batch_axis`` is the same. A kernel axis in neither input nor output (summed
away) is refused with the layer's path. For layers whose kernel is not
``(inputs..., outputs)``, give ``kfac`` the layout with
:func:`kfac_dimension_numbers`.

Norm layers (``nnx.LayerNorm``, ``nnx.RMSNorm``, ``nnx.BatchNorm``) record their
normalized input ``x̂`` and get :class:`layerwise_optax.KfacDiagonal` blocks, the
exact diagonal Fisher ``(1/n) Σ_i g_i²`` of the per-example gradients ``Σ_t δ ⊙ x̂``
(scale) and ``Σ_t δ`` (shift), as kfac-jax's scale-and-shift blocks; ``nnx.Embed``
gets ``A = diag(counts) / n`` (the exact second moment of one-hot inputs, a
``(vocabulary,)`` diagonal) and ``B`` as above. A layer used several times (called
twice, or a table also used by ``Embed.attend`` as the output head) gets one block
by the reuse rule of the section below (its uses count as extra positions). Norm
layers and embeddings created with ``nnx.vmap`` get their blocks per slice, like
kernels (a stacked LayerNorm's scale ``(L, d)`` gets a ``(L, d)`` diagonal).

Layers under Flax NNX transforms: a layer created with ``nnx.vmap`` is *stacked*
(kernel ``(L, *kernel)``, biases ``(L, *bias)``; nested ``nnx.vmap`` gives several
leading layer axes) and is applied one slice at a time
by ``nnx.scan`` (also under ``nnx.remat``, with RNG streams split by
``nnx.split_rngs``) or all slices at once by ``nnx.vmap``. The transforms run
their bodies on copies of the modules and trace them separately, so the capture
never keeps a body's values in Python: it marks each captured layer of the model
copy it builds with its path (a static attribute, which the copies inherit), and
gives it two variables of a private ``nnx.Param`` subclass, the perturbation
``(L, *output)`` and a placeholder for the features ``(L, *features)``. The
transform splits both along the layer axis like the layer's kernel, the layer's
call adds its slice of the perturbation and writes its features, and the
transform writes the features back stacked, as it does for any variable updated
in its body. Each slice is one layer of the model: the statistics of a stacked
kernel are ``KfacFactors(a=(L, d_in, d_in), g=(L, d_out, d_out))``, one pair per
slice, and :func:`kfac_dimension_numbers` gives the kernel ``batch_axes=(0,)``
(``kfac`` preconditions every slice with its own factors). A stacked per-head
kernel has both: factors ``(L, *heads, d, d)``, batch axes the layer axes, then
the head axes shifted past them. A scanned model gives the statistics and
``kfac`` updates of its unrolled twin, also with ``sequence_statistics='reduce'``.

Nothing is left out silently: a captured layer whose call the forward pass does
not reach, or whose features a transform drops (a layer broadcast across
``nnx.scan`` iterations, i.e. used several times), raises ``ValueError`` naming
its path. ``diagonal=`` names layers (paths, or a predicate) that get ``None``
entries instead, ``kfac``'s diagonal Fisher on purpose, also for layers the
capture cannot handle. Not supported: a stacked layer applied by a Python loop
over its slices (its features reach copies, not the model: refused as not
reaching it), a ``vmap`` that maps the examples away (a stacked layer applied
one slice per example, a per-example ``vmap`` of the model: each slice must see
the ``n`` examples of ``inputs``' leading axis; refused by path when a layer's
call is mapped over an axis of the examples' size and its slice does not lead
with ``n`` rows), and layer axes other than leading ones.

Differentiating the loss with respect to the parameters and the perturbations at
once gives the parameter gradients and every layer's output gradients
``dL/dz`` in the same backward pass. With ``n`` examples and ``T`` positions per
example (``T = 1`` for dense layers on flat inputs; spatial positions for convs,
tokens for sequences), and per-example output gradients ``delta = n dL/dz``:

.. math::
  A = \\frac{1}{n} \\sum_{r} x_r x_r^\\top, \\qquad
  B = \\frac{1}{n T} \\sum_{r} \\delta_r \\delta_r^\\top

summed over all rows ``r`` (examples × positions); this is KFC's convention
(Grosse and Martens, 2016) and reduces to ``A = X^T X / n`` and
``B = Δ^T Δ / n`` for dense layers. For a single linear layer with the squared
error, ``A ⊗ B`` is then exactly the Gauss-Newton matrix when ``B`` comes from
the Fisher mode.

Output-gradient modes:

* ``statistics='empirical'``: ``delta`` from the true labels, one forward and one
  backward pass in total.
* ``statistics='fisher'`` (a built-in loss): ``delta`` from labels sampled from
  the model's predictive distribution (Gaussian with unit variance around the
  outputs for ``'mse'``, the softmax's categorical, independent Bernoullis for
  ``'sigmoid_cross_entropy'``, ``N(μ, e^s)`` for ``'gaussian_nll'``). The forward
  pass is shared; the sampled-label cotangent takes a second backward pass
  (``jax.vjp``), as in every K-FAC implementation.
* ``statistics='gauss_newton'`` (a built-in loss): the exact expectation of the
  Fisher mode, ``B = E[J^T F_out J]`` with ``J`` the Jacobian of the outputs with
  respect to the layer output and ``F_out = M M^T`` the predictive
  distribution's Fisher in the outputs (``I``; ``diag(p) - p p^T``;
  ``diag(p (1 - p))``; ``diag(e^{-s}, 1/2)``), from one vectorized backward pass
  per output unit and position with the columns of ``M`` (units × positions
  pullbacks for a sequence output: each position's column apart, so the
  cross-position terms of attention are exact too). For the first three (canonical
  links) ``F_out`` is the loss's Hessian, so this is the generalized
  Gauss-Newton matrix (Schraudolph 2002); for a linear network with the squared
  error it is exactly the paper's ``P_G = F^T F``.

Sequence statistics (Eschenhagen et al., 2023) for a layer applied at ``T``
positions with shared weights (``sequence_statistics=``):

* ``'expand'`` (default, the formulas above): every position is a term, as if
  the ``n T`` rows were examples. Exact (``A ⊗ B`` is the layer's Gauss-Newton
  block) for a deep linear network whose loss has one term per position, e.g. a
  language model's per-token loss.
* ``'reduce'``: each example's inputs are averaged and its output gradients
  summed over its positions before the outer products,

  .. math::
    A = \\frac{1}{n} \\sum_n \\bar x_n \\bar x_n^\\top, \\quad
    \\bar x_n = \\frac{1}{T} \\sum_t x_{n t}, \\qquad
    B = \\frac{1}{n} \\sum_n \\bar\\delta_n \\bar\\delta_n^\\top, \\quad
    \\bar\\delta_n = \\sum_t \\delta_{n t}

  (the paper's ``1/(N R^2)`` on the summed inputs; a folded bias's corner is 1).
  Exact for a deep linear network whose positions are aggregated before the
  loss (pooling, sequence classification), and cheaper: ``n`` rows instead of
  ``n T``. Both agree when ``T = 1``. The examples must lead the layer's rows.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from layerwise_optax import (
    DiagonalFactors,
    DimensionNumbers,
    FoldedBias,
    KfacDiagonal,
    KfacFactors,
    _checks,
    _optional,
    default_kernel_dimension_numbers,
)

if TYPE_CHECKING:  # the checker reads flax itself; at run time a missing extra is named
    from flax import nnx
else:
    nnx = _optional.require("flax.nnx", "layerwise_optax.flax")

_LOSSES = ("mse", "softmax_cross_entropy", "sigmoid_cross_entropy", "gaussian_nll")
_MODES = ("empirical", "fisher", "gauss_newton")
_SEQUENCE = ("expand", "reduce")
_CAPTURED = (nnx.Linear, nnx.Conv, nnx.LinearGeneral, nnx.Einsum)
_NORMS = (nnx.LayerNorm, nnx.RMSNorm, nnx.BatchNorm)
_EXTRA = (nnx.Embed, *_NORMS)  # own blocks: KfacDiagonal, or a diagonal input factor
_STATE = "\x00state"  # key of the model's non-parameter state among a pass's features


class _Layout(NamedTuple):
    """How one layer maps to K-FAC factors: kernel axis groups and feature extractors."""

    inputs: tuple[int, ...]  # kernel axes contracted with the input (A's axis)
    outputs: tuple[int, ...]  # kernel axes that reach the output (B's axis)
    bias: bool  # whether the bias is a function of the output features only
    batch: tuple[int, ...] = ()  # kernel axes shared by input and output: one block per slice


def _einsum_parts(spec: str, path: str) -> tuple[str, str, str, str, str, str]:
    """``(lhs, rhs, out, contracted, produced, shared)`` letters of an ``Einsum`` layer.

    Each string lists its kernel letters in the kernel's order. ``shared`` letters
    are in the input, the kernel and the output (per-head weights): each slice of
    them is its own layer, a batch axis of the kernel's K-FAC block.
    """
    spec = spec.replace(" ", "")
    try:
        operands, out = spec.split("->")
        lhs, rhs = operands.split(",")
    except ValueError:
        raise ValueError(
            f"layer {path}: einsum {spec!r} is not of the form 'input,kernel->output'."
        ) from None
    if "." in rhs:
        raise ValueError(f"layer {path}: einsum {spec!r} has an ellipsis in the kernel.")
    contracted = "".join(c for c in rhs if c in lhs and c not in out)
    produced = "".join(c for c in rhs if c in out and c not in lhs)
    shared = "".join(c for c in rhs if c in out and c in lhs)
    summed = [c for c in rhs if c not in lhs and c not in out]
    if summed:
        raise ValueError(
            f"layer {path}: einsum {spec!r} cannot be captured: kernel axes {summed} are "
            "in neither the input nor the output (the kernel is summed over them, so its "
            "slices share one gradient and have no Kronecker factors of their own)."
        )
    return lhs, rhs, out, contracted, produced, shared


def _layout(module: nnx.Module, path: str, einsum_str: str | None = None) -> _Layout:
    if isinstance(module, nnx.Conv) and module.feature_group_count != 1:
        raise ValueError(f"layer {path}: grouped convolutions are not supported.")
    if isinstance(module, nnx.Einsum):
        _, rhs, out, contracted, produced, shared = _einsum_parts(
            einsum_str or module.einsum_str, path
        )
        # Einsum reshapes its bias onto the output axes that the kernel has, in the
        # output's order: it folds when those are (slices, produced) in the kernel's order.
        # A stacked layer (nnx.vmap) has the kernel's leading layer axes on its bias too.
        bias_ok = "".join(c for c in out if c in rhs) == shared + produced and (
            module.bias is None
            or tuple(module.bias.shape)[module.kernel.ndim - len(module.kernel_shape) :]
            == tuple(module.kernel_shape[rhs.index(c)] for c in shared + produced)
        )
        return _Layout(
            tuple(rhs.index(c) for c in contracted),
            tuple(rhs.index(c) for c in produced),
            bias_ok,
            tuple(rhs.index(c) for c in shared),
        )
    if isinstance(module, nnx.LinearGeneral):
        # Kernel (*batch, *in, *out), bias (*batch, *out): batch_axis slices the
        # kernel into per-slice layers (flax requires them to be leading input axes).
        nb, n_in, n_out = len(module.batch_axis), len(module.in_features), len(module.out_features)
        return _Layout(
            tuple(range(nb, nb + n_in)),
            tuple(range(nb + n_in, nb + n_in + n_out)),
            True,
            tuple(range(nb)),
        )
    ndim = len(module.kernel_shape) if isinstance(module, nnx.Conv) else 2
    return _Layout(tuple(range(ndim - 1)), (ndim - 1,), True)


def mse(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Half the squared error, summed over outputs and averaged over examples.

    ``0.5 * mean_over_examples(sum_over_outputs((outputs - targets)^2))``: the loss
    whose Gauss-Newton matrix ``statistics='gauss_newton'`` computes exactly.

    Args:
      outputs: ``(n, ...)`` model outputs, ``n`` examples on the leading axis.
      targets: Targets of the same shape.

    Returns:
      A scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> from layerwise_optax import flax as lof
      >>> float(lof.mse(jnp.array([[1.0, 2.0], [0.0, 0.0]]), jnp.zeros((2, 2))))
      1.25
    """
    return 0.5 * jnp.mean(jnp.sum(jnp.reshape(outputs - targets, (outputs.shape[0], -1)) ** 2, -1))


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over examples of the softmax cross-entropy with integer labels.

    Args:
      logits: ``(..., classes)`` unnormalized log-probabilities.
      labels: ``(...)`` integer class labels in ``[0, classes)``.

    Returns:
      A scalar, ``-mean(log_softmax(logits)[labels])``.

    Examples:
      Uniform logits over 4 classes give ``log 4``:

      >>> import jax.numpy as jnp
      >>> from layerwise_optax import flax as lof
      >>> round(float(lof.softmax_cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))), 4)
      1.3863
    """
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


def sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Sigmoid (Bernoulli) cross-entropy, summed over outputs and averaged over examples.

    Each output unit is an independent Bernoulli variable with success probability
    ``p = sigmoid(z)`` (multi-label classification):
    ``ℓ(z, y) = -y log p - (1 - y) log(1 - p) = softplus(z) - y z`` per unit, summed
    over every axis but the leading (examples) one and averaged over examples, the
    normalization of :func:`mse`. Its Hessian in the logits is ``diag(p (1 - p))``
    whatever the labels, so ``statistics='gauss_newton'`` is its exact Fisher.

    Args:
      logits: ``(n, ...)`` unnormalized log-odds, ``n`` examples on the leading axis.
      labels: Targets of the same shape in ``[0, 1]`` (hard ``{0, 1}`` labels or soft
        probabilities).

    Returns:
      A scalar.

    Examples:
      Zero logits give ``log 2`` per unit (two units per example here):

      >>> import jax.numpy as jnp
      >>> from layerwise_optax import flax as lof
      >>> y = jnp.array([[0.0, 1.0], [1.0, 0.5]])
      >>> round(float(lof.sigmoid_cross_entropy(jnp.zeros((2, 2)), y)), 4)
      1.3863

    References:
      Bishop, *Pattern Recognition and Machine Learning*, 2006, section 4.3.2
      (logistic sigmoid outputs for independent binary targets).
    """
    per_unit = jax.nn.softplus(logits) - labels * logits
    return jnp.mean(jnp.sum(jnp.reshape(per_unit, (logits.shape[0], -1)), -1))


def gaussian_nll(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Heteroscedastic Gaussian negative log-likelihood, summed over outputs, mean over examples.

    The model predicts a mean and a log-variance per target dimension, concatenated
    on the last axis: ``outputs = [μ, s]`` with ``μ, s`` of ``targets``' shape and
    ``σ² = exp(s)`` (the log-variance keeps the variance positive without a
    constraint; Nix and Weigend 1994, Kendall and Gal 2017). Per dimension

    .. math::
      ℓ(μ, s; y) = \\tfrac12 \\left(\\log 2π + s + (y - μ)^2 e^{-s}\\right),

    summed over every axis but the leading (examples) one and averaged over
    examples, the normalization of :func:`mse`. The Fisher information of
    ``(μ, s)`` is ``diag(e^{-s}, 1/2)`` (the expected Hessian; the Hessian itself
    depends on ``y`` and need not be positive semi-definite), which is what
    ``statistics='gauss_newton'`` uses. For a fixed unit variance use
    :func:`mse`, whose statistics are those of this loss's mean half.

    Args:
      outputs: ``(n, ..., 2 d)``: means ``outputs[..., :d]`` and log-variances
        ``outputs[..., d:]``.
      targets: ``(n, ..., d)`` real targets.

    Returns:
      A scalar.

    Raises:
      ValueError: If ``outputs``' last axis is not twice ``targets``'.

    Examples:
      Mean 0 and log-variance 0 at target 0: ``½ log 2π ≈ 0.9189`` per dimension.

      >>> import jax.numpy as jnp
      >>> from layerwise_optax import flax as lof
      >>> round(float(lof.gaussian_nll(jnp.zeros((3, 2)), jnp.zeros((3, 1)))), 4)
      0.9189

    References:
      Nix and Weigend, `Estimating the mean and variance of the target probability
      distribution <https://doi.org/10.1109/ICNN.1994.374138>`_, 1994.
    """
    mean, log_var = _gaussian_parts(outputs, targets.shape)
    per_dim = 0.5 * (jnp.log(2 * jnp.pi) + log_var + (targets - mean) ** 2 * jnp.exp(-log_var))
    return jnp.mean(jnp.sum(jnp.reshape(per_dim, (outputs.shape[0], -1)), -1))


def _gaussian_parts(outputs: jax.Array, target_shape: tuple) -> tuple[jax.Array, jax.Array]:
    """``(mean, log-variance)`` halves of :func:`gaussian_nll`'s outputs, shapes checked."""
    d = outputs.shape[-1] // 2
    if outputs.shape[-1] != 2 * d or tuple(outputs.shape[:-1]) + (d,) != tuple(target_shape):
        raise ValueError(
            f"gaussian_nll: outputs of shape {tuple(outputs.shape)} must be (..., 2 d) "
            f"(means, then log-variances) for targets of shape (..., d); got targets "
            f"{tuple(target_shape)}."
        )
    return outputs[..., :d], outputs[..., d:]


_LOSS_FNS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "mse": mse,
    "softmax_cross_entropy": softmax_cross_entropy,
    "sigmoid_cross_entropy": sigmoid_cross_entropy,
    "gaussian_nll": gaussian_nll,
}


def _sample_labels(kind: str, outputs: jax.Array, key: jax.Array) -> jax.Array:
    """Labels drawn from the model's predictive distribution (the Fisher mode)."""
    outputs = jax.lax.stop_gradient(outputs)
    if kind == "mse":
        return outputs + jax.random.normal(key, outputs.shape, outputs.dtype)
    if kind == "sigmoid_cross_entropy":
        return jax.random.bernoulli(key, jax.nn.sigmoid(outputs)).astype(outputs.dtype)
    if kind == "gaussian_nll":
        d = outputs.shape[-1] // 2
        mean, log_var = outputs[..., :d], outputs[..., d:]
        return mean + jnp.exp(0.5 * log_var) * jax.random.normal(key, mean.shape, mean.dtype)
    return jax.random.categorical(key, outputs, axis=-1)


def _fisher_sqrt(kind: str, outputs: jax.Array) -> jax.Array:
    """Columns ``m_k`` of a square root ``M M^T = F`` of the loss's output Fisher.

    ``F`` is the Fisher information of the predictive distribution in the model's
    outputs, per example and position (the loss's Hessian for the squared error
    and the two cross-entropies, whose links are canonical; its expectation for the
    Gaussian NLL). Returns ``(units, *outputs.shape)``: unit ``k``'s column at every
    example and position, scaled like the loss's per-example gradient so that
    ``Σ_k (J^T m_k)(J^T m_k)^T`` is the expectation of the Fisher mode's
    ``δ δ^T``. Softmax: ``F = diag(p) - p p^T = M M^T`` with the columns
    ``m_k = √p_k (e_k - p)`` (using ``Σ p = 1``).
    """
    outputs = jax.lax.stop_gradient(outputs)
    units = outputs.shape[-1]
    eye = jnp.eye(units, dtype=outputs.dtype)
    if kind == "softmax_cross_entropy":
        p = jax.nn.softmax(outputs, axis=-1)
        eye_b = eye.reshape((1,) * (outputs.ndim - 1) + (units, units))
        cols = jnp.sqrt(p)[..., None] * (eye_b - p[..., None, :])  # (..., k, units): m_k
        cols = jnp.moveaxis(cols, -2, 0)
        # The loss averages over every label position, not over examples only.
        return cols * (outputs.shape[0] * units / outputs.size)
    if kind == "mse":
        diag = jnp.ones_like(outputs)
    elif kind == "sigmoid_cross_entropy":
        p = jax.nn.sigmoid(outputs)
        diag = jnp.sqrt(p * (1 - p))
    else:  # gaussian_nll: (mean, log-variance) units, Fisher diag(exp(-s), 1/2)
        d = units // 2
        diag = jnp.concatenate(
            [jnp.exp(-0.5 * outputs[..., d:]), jnp.full_like(outputs[..., d:], 0.5**0.5)], -1
        )
    return eye.reshape((units,) + (1,) * (outputs.ndim - 1) + (units,)) * diag[None]


def _conv_padding(
    padding: Any, x: jax.Array, kernel_size: tuple[int, ...], dilation: tuple[int, ...]
) -> tuple[jax.Array, str | tuple[tuple[int, int], ...]]:
    """The input and ``lax`` padding that give ``nnx.Conv``'s windows for its ``padding``.

    ``nnx.Conv`` takes a lax padding name, an int (the same on both sides of every
    spatial axis), one int or ``(low, high)`` pair per spatial axis, or ``'CIRCULAR'``
    / ``'CAUSAL'``, which pad the input itself (wrapped around, or zeros before a 1-D
    sequence only) and then slide the window without padding.
    """
    if padding in ("CIRCULAR", "CAUSAL", "REFLECT"):  # REFLECT: flax.linen's Conv only
        spans = [(k - 1) * d for k, d in zip(kernel_size, dilation)]  # dilated window - 1
        if padding != "CAUSAL":
            pads = [(s // 2, (s + 1) // 2) for s in spans]
        else:
            pads = [(spans[0], 0)]  # nnx.Conv allows CAUSAL on 1-D convolutions only
        outer = [(0, 0)] * (x.ndim - len(pads) - 1)
        mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}.get(padding, "constant")
        return jnp.pad(x, [*outer, *pads, (0, 0)], mode=mode), "VALID"
    if isinstance(padding, str):
        return x, padding
    if isinstance(padding, int):
        return x, ((padding, padding),) * len(kernel_size)
    return x, tuple((p, p) if isinstance(p, int) else (p[0], p[1]) for p in padding)


def _conv_patches(module: nnx.Conv, x: jax.Array) -> jax.Array:
    """Input patches of a convolution, features ordered like ``kernel.reshape(-1, out)``."""
    return _patches(
        x,
        tuple(module.kernel_shape[:-2]),
        module.strides,
        module.padding,
        module.input_dilation,
        module.kernel_dilation,
    )


def _patches(
    x: jax.Array,
    kernel_size: tuple[int, ...],
    strides: Any,
    padding: Any,
    input_dilation: Any,
    kernel_dilation: Any,
) -> jax.Array:
    """Input patches ``(n, *out_spatial, prod(kernel_size) * c_in)`` of a conv (NNX or Linen).

    ``strides``/``input_dilation``/``kernel_dilation``: ``None``, an int or one int
    per spatial axis; ``padding`` as :func:`_conv_padding` takes it.
    """
    nd = len(kernel_size)

    def per_dim(v, default):
        if v is None:
            return (default,) * nd
        return (v,) * nd if isinstance(v, int) else tuple(v)

    spatial = "HWD"[:nd] if nd <= 3 else None
    if spatial is None:  # pragma: no cover - 4-D convolutions are not in nnx
        raise NotImplementedError("convolutions with more than 3 spatial dims")
    lhs = "N" + spatial + "C"
    dilation = per_dim(kernel_dilation, 1)
    x, lax_padding = _conv_padding(padding, x, kernel_size, dilation)
    patches = jax.lax.conv_general_dilated_patches(
        x,
        filter_shape=kernel_size,
        window_strides=per_dim(strides, 1),
        padding=lax_padding,
        lhs_dilation=per_dim(input_dilation, 1),
        rhs_dilation=dilation,
        dimension_numbers=(lhs, spatial + "IO", lhs),
    )
    c_in = x.shape[-1]
    k = 1
    for s in kernel_size:
        k *= s
    # jax orders patch features channel-major (c_in, *window); the kernel is (*window, c_in).
    patches = jnp.reshape(patches, patches.shape[:-1] + (c_in, k))
    patches = jnp.swapaxes(patches, -1, -2)
    return jnp.reshape(patches, patches.shape[:-2] + (k * c_in,))


def _features(module: nnx.Module, x: jax.Array, path: str, call_args, call_kwargs):
    """``(input features (..., d_in), output -> (..., d_out))`` of a captured layer."""
    if isinstance(module, nnx.Conv):
        return _conv_patches(module, x), lambda out: out
    if isinstance(module, nnx.LinearGeneral) and module.batch_axis:
        return _sliced_general_features(x, module.batch_axis, module.axis, len(module.out_features))
    if isinstance(module, nnx.LinearGeneral):
        return _general_features(x, module.axis, len(module.out_features))
    if isinstance(module, nnx.Einsum):
        spec = call_kwargs.get("einsum_str") or (call_args[0] if call_args else None)
        return _einsum_features(x, spec or module.einsum_str, path)
    return x, lambda out: out


def _einsum_features(x: jax.Array, spec: str, path: str):
    """``_features`` of an einsum layer (NNX ``Einsum``, Linen ``Einsum``).

    Rows first, then the slice (shared) axes in the kernel's order, then the
    contracted input axes flattened; the output likewise with the produced axes.
    """
    lhs, _, out_s, contracted, produced, shared = _einsum_parts(spec, path)
    keep_in = "".join(c for c in lhs if c not in contracted and c not in shared)
    keep_out = "".join(c for c in out_s if c not in produced and c not in shared)
    feats = jnp.einsum(f"{lhs}->{keep_in}{shared}{contracted}", x)
    feats = jnp.reshape(feats, feats.shape[: feats.ndim - len(contracted)] + (-1,))

    def rows(out):
        out = jnp.einsum(f"{out_s}->{keep_out}{shared}{produced}", out)
        return jnp.reshape(out, out.shape[: out.ndim - len(produced)] + (-1,))

    return feats, rows


def _sliced_general_features(x: jax.Array, batch_axis: Any, axis: Any, n_out: int):
    """``_features`` of a general dense layer with per-slice kernels: ``(rows, *batch, d)``.

    NNX ``LinearGeneral``'s ``batch_axis``, Linen ``DenseGeneral``'s ``batch_dims``:
    its batch axes are the input's leading axes and the output's too
    (``dot_general`` puts them first: ``(*batch, *rows, *out_features)``).
    """
    nb = len(batch_axis)
    batch = tuple(int(a) % x.ndim for a in batch_axis)
    axis = tuple(a % x.ndim for a in axis)
    rest = tuple(a for a in range(x.ndim) if a not in axis and a not in batch)
    feats = jnp.transpose(x, rest + batch + axis)
    feats = jnp.reshape(feats, feats.shape[: len(rest) + nb] + (-1,))

    def rows(out):
        free = tuple(range(nb, out.ndim - n_out))
        out = jnp.transpose(out, free + tuple(range(nb)) + tuple(range(out.ndim - n_out, out.ndim)))
        return jnp.reshape(out, out.shape[: out.ndim - n_out] + (-1,))

    return feats, rows


def _general_features(x: jax.Array, axis: tuple[int, ...], n_out: int):
    """``_features`` of a general dense layer: the contracted ``axis`` of ``x`` last,
    flattened; ``n_out`` trailing output axes flattened (NNX LinearGeneral, Linen
    DenseGeneral)."""
    axis = tuple(a % x.ndim for a in axis)
    rest = tuple(a for a in range(x.ndim) if a not in axis)
    feats = jnp.transpose(x, rest + axis)
    feats = jnp.reshape(feats, feats.shape[: len(rest)] + (-1,))
    return feats, lambda out: jnp.reshape(out, out.shape[: out.ndim - n_out] + (-1,))


class _KfacPerturbation(nnx.Param):
    """The zero perturbation ``e`` added to a captured layer's output during capture.

    A ``Param`` subclass, so that ``nnx.scan``/``nnx.vmap`` (also with an
    ``nnx.StateAxes`` that routes ``nnx.Param``) split it along the layer axis like
    the layer's kernel: each stacked slice gets its own perturbation.
    """


class _KfacFeatures(nnx.Param):
    """The input features a captured layer records during capture (see :class:`_KfacPerturbation`).

    Written in the layer's call; the transform writes each slice's value back,
    stacked on the layer axis, as for any variable updated inside it.
    """


_PATH_ATTR = "_lo_kfac_path"  # static str: survives the split/merge of every nnx transform
_E_ATTR = "_lo_kfac_e"  # _KfacPerturbation
_X_ATTR = "_lo_kfac_x"  # _KfacFeatures
# A static int, new for every forward trace: jax caches the trace of a transform's body
# (the same nnx.scan function, the same graph and shapes), and a cached body would not
# run the patched calls that the _Recorder relies on (a second capture with the same
# nnx.scan object would see no call). A new value makes every capture trace its bodies.
_TRACE_ATTR = "_lo_kfac_trace"
_TRACES = itertools.count()


class _Slice(NamedTuple):
    """Shapes one call of a captured layer sees (one slice of a stacked layer)."""

    output: jax.ShapeDtypeStruct
    features: jax.ShapeDtypeStruct


class _Recorder:
    """Trace-time side channel: which layers were called, with what shapes.

    Layers are recognized by the path attribute :func:`_attach` sets on the
    merged model's modules (a static attribute, so the copies that ``nnx.scan``,
    ``nnx.vmap`` and ``nnx.remat`` make inside their bodies keep it); their
    features go out, and the perturbations come in, through variables on the
    module, never through Python state, so no tracer of a transform's body leaks.
    A layer's ``k``-th call in a pass is its use ``k`` (:func:`_use_key`), with its
    own pair of variables (:func:`_use_attrs`), split by the transforms like the
    first (a stacked layer called twice in a scanned body has two per-slice uses).
    """

    def __init__(self, perturbations: dict[str, jax.Array] | None, examples: int | None = None):
        self.perturbations = perturbations  # None: the shape pass (nothing attached)
        self.examples = examples  # n: checks that no transform maps the examples away
        self.calls: dict[str, int] = {}
        self.slices: dict[str, _Slice] = {}  # per use
        self.out_rows: dict[str, Callable[[jax.Array], jax.Array]] = {}  # per use
        self.kinds: dict[str, tuple] = {}  # per use of a norm/embedding: what it records

    def wrap(self, cls: type, original: Callable, name: str = "__call__") -> Callable:
        recorder = self

        def call(module, x, *args, **kwargs):
            path = getattr(module, _PATH_ATTR, None)
            if path is None:
                return original(module, x, *args, **kwargs)
            if recorder.examples is not None:
                _check_examples_not_mapped(path, x, recorder.examples)
            k = recorder.calls.get(path, 0)
            recorder.calls[path] = k + 1
            use = _use_key(path, k)
            if isinstance(module, _EXTRA):
                feats, kind = _extra_features(module, name, x, path, args, kwargs)
                rows = _identity
                recorder.kinds[use] = kind
            else:
                feats, rows = _features(module, x, path, args, kwargs)
            out = original(module, x, *args, **kwargs)
            recorder.out_rows[use] = rows
            recorder.slices[use] = _Slice(
                jax.ShapeDtypeStruct(out.shape, out.dtype),
                jax.ShapeDtypeStruct(feats.shape, feats.dtype),
            )
            if recorder.perturbations is not None:
                e_attr, x_attr = _use_attrs(k)
                getattr(module, x_attr).set_value(feats)
                out = out + getattr(module, e_attr).get_value().astype(out.dtype)
            return out

        return call


def _identity(out: jax.Array) -> jax.Array:
    return out


def _check_examples_not_mapped(path: str, x: Any, n: int) -> None:
    """Refuses a layer whose call sees one example (or a few) per slice of a ``vmap``.

    Inside ``nnx.vmap``/``jax.vmap`` (Linen's ``nn.vmap``) a layer's input is a
    batching tracer: the mapped array and the axis mapped. When that axis has the
    ``n`` examples' size while the slice the layer sees does not lead with ``n``
    rows, the transform has mapped the examples away (a stacked layer applied one
    slice per example, or a per-example ``vmap`` of the model): each slice would
    count its own example's rows as those of the whole batch, and the statistics
    would be silently wrong (``B`` too large by ``n``). A layer axis of the same
    size as the batch whose slices still see the ``n`` examples is left alone.
    """
    axis, full = getattr(x, "batch_dim", None), getattr(x, "val", None)
    if not isinstance(axis, int) or not hasattr(full, "shape"):
        return
    shape = tuple(getattr(full, "shape", ()))
    if axis < len(shape) and shape[axis] == n and (x.ndim == 0 or x.shape[0] != n):
        raise ValueError(
            f"layer {path}: it is applied inside a vmap that maps axis {axis} of its input, "
            f"of the examples' size {n}, and each slice sees input {tuple(x.shape)} without "
            f"the {n} examples leading: the examples were mapped away (a stacked layer "
            "applied one slice per example, or a per-example vmap), so its statistics would "
            "count one example's rows as the batch's. Map the stacked layer over its own "
            "axis (in_axes=None for inputs every slice sees), keep the examples on the "
            "leading axis of every layer's input, or pass diagonal=[path]."
        )


def _use_key(path: str, k: int) -> str:
    """A layer's ``k``-th use in a pass: ``path`` for the first, ``path#k`` after."""
    return path if k == 0 else f"{path}#{k}"


def _layer_of(use: str) -> str:
    return use.split("#", 1)[0]


def _use_attrs(k: int) -> tuple[str, str]:
    """The attribute names of use ``k``'s perturbation and features variables."""
    return (_E_ATTR, _X_ATTR) if k == 0 else (f"{_E_ATTR}_{k}", f"{_X_ATTR}_{k}")


@contextlib.contextmanager
def _patched(recorder: _Recorder):
    originals: dict[tuple[type, str], Callable] = {
        (cls, "__call__"): cls.__call__ for cls in _CAPTURED + _EXTRA
    }
    originals[(nnx.Embed, "attend")] = nnx.Embed.attend
    try:
        for (cls, name), orig in originals.items():
            setattr(cls, name, recorder.wrap(cls, orig, name))
        yield recorder
    finally:
        for (cls, name), orig in originals.items():
            setattr(cls, name, orig)


def _key(path: tuple) -> str:
    return "/".join(map(str, path))


def _is_masked(x: Any) -> bool:
    """Whether ``x`` is a leaf masked out by ``optax.masked``."""
    return isinstance(x, optax.MaskedNode)


def _path_keys(path: tuple) -> tuple[str, ...]:
    """A params-tree path as the strings :func:`_key` joins for the same layer.

    The trailing ``.value`` of an ``nnx.Variable`` is dropped, so the leaves of an
    ``nnx.State``, of its pure form and of a nested dict give the same keys.
    """
    path = tuple(path)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return tuple(jax.tree_util.keystr((k,), simple=True) for k in path)


def _layer_paths(
    model: nnx.Module, diagonal: Callable[[str, Any], bool] | None = None
) -> tuple[dict[int, str], dict[str, tuple], dict[str, bool]]:
    """``id(layer) -> key`` for every captured layer, ``key -> graph path``, ``key -> bias stats``.

    Layers for which ``diagonal(key, layer)`` holds are left out (not captured).
    """
    paths, tuples, biases = {}, {}, {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, _EXTRA) and _extra_params(node):  # norms, embeddings: own blocks
            key = _key(tuple(path))
            if diagonal is not None and diagonal(key, node):
                continue
            _check_extra(node, key)
            paths[id(node)] = key
            tuples[key] = tuple(path)
        elif isinstance(node, _CAPTURED):
            key = _key(tuple(path))
            if diagonal is not None and diagonal(key, node):
                continue
            if isinstance(node, nnx.Conv) and node.feature_group_count != 1:
                raise ValueError(f"layer {key}: grouped convolutions are not supported.")
            layout = _layout(node, key)  # raises for layers whose axes are not clear
            paths[id(node)] = key
            tuples[key] = tuple(path)
            if getattr(node, "bias", None) is not None:
                biases[key] = layout.bias
    return paths, tuples, biases


def _slice_ndim(module: nnx.Module) -> int:
    """The number of axes of one layer's own kernel (without stacked layer axes).

    For an embedding its table ``(vocabulary, features)``, for a norm layer its
    scale or bias ``(features,)``.
    """
    if isinstance(module, nnx.Embed):
        return 2
    if isinstance(module, _NORMS):
        return 1
    if isinstance(module, (nnx.Conv, nnx.Einsum)):
        return len(module.kernel_shape)
    if isinstance(module, nnx.LinearGeneral):
        # kernel (*batch_axis slices, *in_features, *out_features)
        return len(module.batch_axis) + len(module.in_features) + len(module.out_features)
    return 2


def _stack_shape(module: Any, path: str) -> tuple[int, ...]:
    """The leading layer axes of a stacked layer's kernel (``()`` for an ordinary layer).

    A layer created under ``nnx.vmap`` (say ``L`` blocks) has a kernel
    ``(L, *kernel)``; its statistics are one pair of factors per slice, the layer
    axes being batch axes of the kernel.
    """
    if isinstance(module, _EXTRA):
        shape = tuple(getattr(module, _extra_params(module)[0]).shape)
    else:
        shape = tuple(module.kernel.shape)
    s = len(shape) - _slice_ndim(module)
    if s < 0:
        raise ValueError(
            f"layer {path}: kernel shape {shape} has fewer axes than the layer's own kernel."
        )
    if isinstance(module, (nnx.Conv, nnx.Einsum)) and shape[s:] != tuple(module.kernel_shape):
        raise ValueError(
            f"layer {path}: kernel shape {shape} does not end with the layer's own kernel "
            f"shape {tuple(module.kernel_shape)}; only leading layer axes (nnx.vmap with "
            "axis 0) can be captured."
        )
    return shape[:s]


def _stacked_layout(module: nnx.Module, path: str) -> tuple[_Layout, tuple[int, ...]]:
    """A captured layer's :class:`_Layout` on its whole (possibly stacked) kernel, and its layer axes.

    Every kernel axis group (inputs, outputs, per-head ``batch``) is shifted past the
    leading layer axes.
    """
    stack = _stack_shape(module, path)
    layout = _layout(module, path)
    s = len(stack)
    if s:
        layout = layout._replace(
            inputs=tuple(a + s for a in layout.inputs),
            outputs=tuple(a + s for a in layout.outputs),
            batch=tuple(a + s for a in layout.batch),
        )
    return layout, stack


def _diagonal_rule(diagonal: Any) -> Callable[[str, Any], bool]:
    """A ``diagonal`` argument as a predicate ``(path, layer) -> bool``, checked.

    Raises:
      ValueError: Neither a callable nor a list/tuple/set of path strings.
    """
    if callable(diagonal):
        return lambda path, layer: bool(diagonal(path, layer))
    if isinstance(diagonal, (list, tuple, set, frozenset)) and all(
        isinstance(p, str) for p in diagonal
    ):
        names = frozenset(p.strip("/") for p in diagonal)
        return lambda path, _: path in names
    raise ValueError(
        "diagonal must be a list, tuple or set of layer paths like 'blocks/mlp' or a "
        f"callable (path, layer) -> bool, got {diagonal!r}."
    )


def _check_diagonal_names(model: nnx.Module, diagonal: Any) -> None:
    """Every path named in a sequence ``diagonal`` must be a captured layer of ``model``."""
    if callable(diagonal):
        return
    layers = [
        _key(tuple(p))
        for p, node in nnx.iter_graph(model)
        if isinstance(node, _CAPTURED) or (isinstance(node, _EXTRA) and _extra_params(node))
    ]
    for name in diagonal:
        if name.strip("/") not in layers:
            raise ValueError(
                f"diagonal names {name!r}, which is not a captured layer of the model "
                f"(nnx.Linear, nnx.Conv, nnx.LinearGeneral, nnx.Einsum, nnx.Embed, "
                f"nnx.LayerNorm, nnx.RMSNorm, nnx.BatchNorm); its captured layers are {layers}."
            )


def _attach(
    m: nnx.Module,
    keys: Any,
    perturbations: dict[str, jax.Array] | None,
    features: dict[str, jax.ShapeDtypeStruct],
    uses: dict[str, int] | None = None,
) -> dict[str, tuple[Any, jax.Array, str]]:
    """Marks the captured layers of the merged model ``m`` for the :class:`_Recorder`.

    Every layer whose path is in ``keys`` gets its path as a static attribute; with
    ``perturbations``, also per use (``uses[key]`` of them, one by default) its
    perturbation and a placeholder for its features (``features[use]``: their full
    shape, stacked layer axes first) as variables (:func:`_use_attrs`).
    Returns ``use -> (layer, placeholder, attribute)``: a placeholder still in
    place after the forward pass means the features never reached ``m`` (see
    :func:`_collect`).
    """
    attached = {}
    trace = next(_TRACES)
    for path, node in list(nnx.iter_graph(m)):
        key = _key(tuple(path))
        if not isinstance(node, _CAPTURED + _EXTRA) or key not in keys:
            continue
        setattr(node, _PATH_ATTR, key)
        setattr(node, _TRACE_ATTR, trace)
        if perturbations is not None:
            for k in range((uses or {}).get(key, 1)):
                use, (e_attr, x_attr) = _use_key(key, k), _use_attrs(k)
                placeholder = jnp.zeros(features[use].shape, features[use].dtype)
                setattr(node, e_attr, _KfacPerturbation(perturbations[use]))
                setattr(node, x_attr, _KfacFeatures(placeholder))
                attached[use] = (node, placeholder, x_attr)
    return attached


def _collect(attached: dict[str, tuple[Any, jax.Array, str]]) -> dict[str, jax.Array]:
    """Each layer's recorded features, read back from the merged model after the forward pass.

    Raises:
      ValueError: A layer whose call was seen but whose features did not reach the
        model: a transform dropped the write (weights broadcast across
        ``nnx.scan``/``nnx.vmap`` iterations, i.e. one layer used several times; a
        layer called on a copy of the model).
    """
    feats = {}
    for key, (node, placeholder, x_attr) in attached.items():
        value = getattr(node, x_attr).get_value()
        if value is placeholder:
            raise ValueError(
                f"layer {_layer_of(key)}: its call was seen, but its statistics did not reach the model: "
                "it was applied inside a transform that does not write its state back (a "
                "layer broadcast across nnx.scan or nnx.vmap iterations, i.e. used several "
                "times, or called on a copy of the model); K-FAC capture needs each layer "
                "used once, or stacked (created with nnx.vmap) and split along the layer "
                "axis. Pass diagonal=[path] to give it the diagonal Fisher on purpose."
            )
        feats[key] = value
    return feats


def kfac_dimension_numbers(
    model: nnx.Module, *, fold_biases: bool = True, diagonal: Any = ()
) -> Callable[[Any], Any]:
    """The kernel layouts of a model's captured layers, for ``kfac(dimension_numbers=...)``.

    ``nnx.Linear`` and ``nnx.Conv`` kernels already match kfac's default (inputs
    first, output last, biases folded); ``nnx.LinearGeneral`` kernels have several
    input and output axes and ``nnx.Einsum`` kernels any order, so pass this to
    ``kfac`` when a model has them. Per-slice kernels (an ``Einsum`` axis shared by
    input and output, ``LinearGeneral``'s ``batch_axis``) get those axes as
    ``batch_axes``: one pair of factors per slice (head). A bias folds when it is a
    function of each slice's outputs (``(*slices, *outputs)`` in the kernel's
    order); another ``Einsum`` bias gets no statistics, ``kfac``'s diagonal
    fallback. Paths are matched after dropping a Flax
    ``Variable``'s ``.value``, so the same layouts come out for an ``nnx.State``
    (what ``nnx.Optimizer`` initializes with), its pure form and a plain dict.

    Args:
      model: The Flax NNX model whose statistics :func:`kfac_value_and_grad` captures.
      fold_biases: ``True``: each captured bias is folded into its kernel
        (:class:`layerwise_optax.FoldedBias`, homogeneous coordinates); ``False``:
        a separate bias block ``DimensionNumbers(((), (all axes)))``. Must match
        the capture's ``fold_biases``.
      diagonal: Layers left to the diagonal Fisher, as for
        :func:`kfac_value_and_grad` (same value): their leaves get kfac's default
        layout, and are not checked for capture.

    Returns:
      A callable ``tree -> spec tree`` (kfac calls it with the params or updates
      tree): each captured kernel gets ``DimensionNumbers((input axes), (output
      axes), (batch axes))``, its bias a ``FoldedBias`` (or its own block), an
      ``nnx.Embed`` table a :class:`layerwise_optax.DiagonalFactors` (its input
      factor, the token counts, kept diagonal), a norm layer's scale and shift
      ``None`` (their statistics are :class:`layerwise_optax.KfacDiagonal`), every
      other leaf kfac's default. The batch axes are the per-head slice axes and,
      for a stacked layer (created with ``nnx.vmap``, ``L`` leading layer axes),
      those layer axes first: ``batch_axes=(0, ..., L - 1, *head axes + L)``, all
      groups shifted past the layer axes; one pair of factors per slice.

    Raises:
      ValueError: For a layer that cannot be captured, named by its path, a bad
        ``diagonal`` or one that names no captured layer.
      TypeError: If ``fold_biases`` is not a bool.

    Examples:
      An ``nnx.LinearGeneral`` kernel ``(4, 2, 3)`` maps 4 inputs to ``2 × 3``
      outputs: its input group is axis 0, its output group axes 1 and 2.

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from layerwise_optax import flax as lof
      >>> model = nnx.LinearGeneral(4, (2, 3), rngs=nnx.Rngs(0))
      >>> specs = lof.kfac_dimension_numbers(model)(nnx.state(model, nnx.Param))
      >>> specs['kernel'].get_value().factor_axes
      ((0,), (1, 2))

    References:
      Martens and Grosse, `Optimizing Neural Networks with Kronecker-factored
      Approximate Curvature <https://arxiv.org/abs/1503.05671>`_, 2015.
      Grosse and Martens, `A Kronecker-factored Approximate Fisher Matrix for
      Convolution Layers <https://arxiv.org/abs/1602.01407>`_, 2016.
    """
    _checks.boolean("fold_biases", fold_biases)
    skip = _diagonal_rule(diagonal)
    _check_diagonal_names(model, diagonal)
    layouts, extras = {}, {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, _CAPTURED):
            key = _key(tuple(path))
            if not skip(key, node):
                layouts[key] = _stacked_layout(node, key)
        elif isinstance(node, _EXTRA) and _extra_params(node):
            key = _key(tuple(path))
            if not skip(key, node):
                extras[key] = (node, _stack_shape(node, key))

    def spec(path, leaf):
        if _is_masked(leaf):
            return None
        names = _path_keys(path)
        layer, kind = "/".join(names[:-1]), names[-1] if names else ""
        if layer in extras:
            module, stack = extras[layer]
            return _extra_spec(module, stack, kind, leaf)
        layout, stack = layouts.get(layer, (None, ()))
        stacked = tuple(range(len(stack)))  # stacked layers: the layer axes are batch axes
        if layout is not None and kind == "kernel":
            # batch axes: the layer axes, then the per-head slice axes (already shifted)
            return DimensionNumbers((layout.inputs, layout.outputs), stacked + layout.batch)
        if layout is not None and kind == "bias":
            if fold_biases and layout.bias:
                return FoldedBias(f"{layer}/kernel")
            # A per-slice bias (*stack, *slices, *outputs) keeps the kernel's layer and
            # slice axes as batch axes; another bias only the layer axes.
            nb = len(stack) + (len(layout.batch) if layout.bias else 0)
            return DimensionNumbers(((), tuple(range(nb, leaf.ndim))), tuple(range(nb)))
        return default_kernel_dimension_numbers(leaf.shape)

    return lambda tree: jax.tree_util.tree_map_with_path(spec, tree, is_leaf=_is_masked)


def _stats_tree(
    inputs,
    deltas,
    out_rows,
    n: int,
    tuples: dict[str, tuple],
    biases: dict,
    fold: bool,
    stacks: dict[str, tuple[int, ...]] | None = None,
    slices: dict[str, int] | None = None,
    reduce: bool = False,
) -> dict:
    """Nested dict ``{...: {'kernel': KfacFactors, 'bias': ...}}`` keyed like the params.

    ``deltas[key]`` has a leading axis of output-gradient samples that are summed
    (one for the empirical and Fisher modes, one per output unit for Gauss-Newton).
    ``biases[key]``: ``True`` for a bias that is a function of the output features
    (its statistics are given), ``False`` for another bias (``None``: the diagonal
    fallback), absent without a bias. ``stacks[key]``: the leading layer axes of a
    stacked layer (``inputs[key]`` and ``deltas[key]`` after the samples axis start
    with them); its factors are one pair per slice, ``(*stack, d, d)``.
    ``slices[key]``: the number of slice axes (per-head kernels) before the
    features; such layers, and every layer when ``reduce``, take
    :func:`_slice_factors` (factors ``(*stack, *slices, d, d)``).
    """
    slices = slices or {}
    tree: dict = {}
    hi = jax.lax.Precision.HIGHEST
    for key_, x in inputs.items():
        path = tuples[key_]
        stack = (stacks or {}).get(key_, ())
        rows = out_rows[key_]
        for _ in range(1 + len(stack)):  # samples axis, then each layer axis
            rows = jax.vmap(rows)
        delta = jnp.moveaxis(rows(deltas[key_]), 0, len(stack))  # (*stack, samples, ...)
        bias = biases.get(key_)
        if slices.get(key_, 0) or reduce:
            a, b, positions = _slice_factors(
                key_, x, delta, n, stack, slices.get(key_, 0), bool(bias and fold), reduce
            )
        else:
            count = math.prod(stack)
            x2 = jnp.reshape(x, (count, -1, x.shape[-1])).astype(jnp.float32)
            d2 = jnp.reshape(delta, (count, -1, delta.shape[-1])).astype(jnp.float32)
            if x2.shape[1] % n:
                raise ValueError(
                    f"layer {key_}: its input has {x2.shape[1]} rows per slice, not a multiple "
                    f"of the {n} examples (the statistics need the examples on the leading "
                    "axis of the layer's input rows)."
                )
            positions = x2.shape[1] // n
            if bias and fold:
                # Homogeneous coordinates: the constant input 1 of the bias as a last
                # feature, so a's last row is sum(x) / n (the cross term) and its corner
                # the positions.
                x2 = jnp.concatenate([x2, jnp.ones(x2.shape[:2] + (1,), x2.dtype)], axis=2)
            a = jnp.einsum("sri,srj->sij", x2, x2, precision=hi) / n
            b = jnp.einsum("sri,srj->sij", d2, d2, precision=hi) / (n * positions)
            a = jnp.reshape(a, stack + a.shape[1:])
            b = jnp.reshape(b, stack + b.shape[1:])
        node = tree
        for key in path:
            node = node.setdefault(key, {})
        node["kernel"] = KfacFactors(a, b)
        if bias and fold:
            node["bias"] = FoldedBias("/".join(map(str, path + ("kernel",))))
        elif bias:
            # A separate block: the bias is a kernel whose input is the constant 1 at
            # each of the example's positions, A = (1/n) sum over n * positions rows of 1.
            corner = jnp.full(a.shape[:-2] + (1, 1), float(positions), jnp.float32)
            node["bias"] = KfacFactors(corner, b)
        elif bias is not None:
            node["bias"] = None  # not a function of the output features: diagonal fallback
    return tree


def _slice_factors(
    key: str,
    x: jax.Array,
    delta: jax.Array,
    n: int,
    stack: tuple[int, ...],
    nslice: int,
    homogeneous: bool,
    reduce: bool,
) -> tuple[jax.Array, jax.Array, int]:
    """``(a (*stack, *slices, d_in, d_in), g (*stack, *slices, d_out, d_out), bias corner)``.

    ``x`` is ``(*stack, rows..., *slices, d_in)`` and ``delta`` ``(*stack, samples,
    rows..., *slices, d_out)``, the first row axis the examples; ``stack`` are the
    leading layer axes of a stacked layer (``()`` for an ordinary one). Each layer
    slice and each head slice is its own layer over the same rows. Expand: every
    row is a term (the KFC convention of :func:`_stats_tree`). Reduce: the rows of
    one example are first reduced, the inputs averaged and the output gradients
    summed over its ``T`` positions, then ``a = (1/n) Σ_n x̄_n x̄_n^T`` and
    ``g = (1/n) Σ_n δ̄_n δ̄_n^T`` (the bias corner is 1).
    """
    hi = jax.lax.Precision.HIGHEST
    ns = len(stack)
    count = math.prod(stack)
    heads = x.shape[x.ndim - 1 - nslice : x.ndim - 1]
    h = math.prod(heads)
    if reduce and x.shape[ns] != n:
        raise ValueError(
            f"layer {key}: sequence_statistics='reduce' needs the examples on the leading "
            f"axis of the layer's input rows, got {x.shape[ns]} rows there for {n} examples."
        )
    x3 = jnp.reshape(x, (count, n, -1, h, x.shape[-1])).astype(jnp.float32)
    samples = delta.shape[ns]
    d4 = jnp.reshape(delta, (count, samples, n, -1, h, delta.shape[-1])).astype(jnp.float32)
    positions = x3.shape[2]
    if reduce:
        x3 = jnp.mean(x3, axis=2, keepdims=True)
        d4 = jnp.sum(d4, axis=3, keepdims=True)
        scale, corner = n, 1
    else:
        scale, corner = n * positions, positions
    if homogeneous:
        x3 = jnp.concatenate([x3, jnp.ones(x3.shape[:-1] + (1,), x3.dtype)], axis=-1)
    a = jnp.einsum("cnphi,cnphj->chij", x3, x3, precision=hi) / n
    b = jnp.einsum("csnphi,csnphj->chij", d4, d4, precision=hi) / scale
    a = jnp.reshape(a, stack + heads + a.shape[-2:])
    b = jnp.reshape(b, stack + heads + b.shape[-2:])
    return a, b, corner


def _node_at(model: nnx.Module, path: tuple) -> Any:
    """The graph node of ``model`` at ``path`` (as :func:`nnx.iter_graph` gives it)."""
    return next(node for p, node in nnx.iter_graph(model) if tuple(p) == path)


def _param_names(node: Any) -> tuple[str, ...]:
    """The parameter leaves of a captured layer: kernel (and bias), or a norm's/table's."""
    if isinstance(node, _EXTRA):
        return _extra_params(node)
    return ("kernel", "bias") if getattr(node, "bias", None) is not None else ("kernel",)


def _set_diagonal(tree: dict, path: tuple, names: tuple[str, ...]) -> None:
    """``None`` (the diagonal Fisher, on purpose) at a layer's parameter leaves ``names``."""
    node = tree
    for key in path:
        node = node.setdefault(key, {})
    for name in names:
        node[name] = None


def kfac_value_and_grad(
    model_fn: Callable[..., jax.Array],
    loss: Literal["mse", "softmax_cross_entropy", "sigmoid_cross_entropy", "gaussian_nll"]
    | Callable[[jax.Array, Any], jax.Array] = "mse",
    *,
    statistics: Literal["empirical", "fisher", "gauss_newton"] = "empirical",
    fold_biases: bool = True,
    sequence_statistics: Literal["expand", "reduce"] = "expand",
    statistics_batch_size: int | None = None,
    diagonal: Any = (),
) -> Callable[..., tuple[jax.Array, nnx.State, dict]]:
    """Builds ``f(model, inputs, targets, key=None) -> (loss, grads, kfac_stats)``.

    For ``flax.linen`` models see :func:`linen_kfac_value_and_grad`.

    Args:
      model_fn: ``model_fn(model, inputs) -> outputs`` (often ``lambda m, x: m(x)``).
      loss: ``'mse'`` (:func:`mse`), ``'softmax_cross_entropy'`` (integer labels,
        :func:`softmax_cross_entropy`), ``'sigmoid_cross_entropy'`` (targets in
        ``[0, 1]``, :func:`sigmoid_cross_entropy`), ``'gaussian_nll'`` (outputs
        ``[mean, log-variance]`` on the last axis, :func:`gaussian_nll`), or a
        callable ``loss(outputs, targets) -> scalar`` averaged over examples
        (empirical mode only).
      statistics: How the output-gradient factor ``B`` is estimated:
        ``'empirical'`` (true targets), ``'fisher'`` (labels sampled from the
        model's predictive distribution; needs a built-in ``loss`` and a ``key``)
        or ``'gauss_newton'`` (exact ``E[J^T F_out J]``, one extra backward pass
        per output unit and position, vectorized; a built-in ``loss``). ``'fisher'`` is an
        unbiased one-sample estimate of ``'gauss_newton'``.
      sequence_statistics: ``'expand'`` (default) or ``'reduce'``: how a layer
        applied at several positions per example turns them into statistics
        (Eschenhagen et al., 2023; see the module docstring for the formulas and
        when each is exact). ``'reduce'`` needs each layer's input rows to have
        the examples on their leading axis.
      fold_biases: ``True`` (default): each layer's bias is folded into its kernel
        in homogeneous coordinates, as in Martens and Grosse (2015) and kfac-jax:
        the kernel's ``a`` is over ``[x; 1]``, ``(d_in + 1) × (d_in + 1)``, and the
        bias entry is a :class:`layerwise_optax.FoldedBias` (``kfac``'s default
        layout folds Flax ``kernel``/``bias`` pairs the same way). ``False``: the
        bias gets its own block ``KfacFactors([[T]], g)`` (``T`` positions per
        example: the constant input 1 under the same ``1/n`` convention); give
        ``kfac`` ``dimension_numbers=kfac_dimension_numbers(model,
        fold_biases=False)`` then.
      statistics_batch_size: ``m``: the statistics from the first ``m`` examples
        of the batch only (a sub-batch), ``a = (1/m) Σ_{r in the first m} x̂_r
        x̂_r^T`` and ``g`` likewise, while the loss and the gradient stay those
        of the whole batch. Same pass: the per-example output gradients are
        ``n dL/dz``, per example the gradient of its own loss, so the sub-batch's
        rows are its statistics exactly; what it saves is the factor products
        (``m`` rows instead of ``n``), not the forward or backward pass. A static
        int in ``1..n`` (``n``: the batch size, checked at the call); ``None``
        (default): the whole batch.
      diagonal: Captured-type layers to leave to ``kfac``'s diagonal Fisher on
        purpose: a list, tuple or set of layer paths (``'blocks/attn/query'``,
        as the statistics tree nests them), or a predicate ``(path, layer) ->
        bool``. Their kernel and bias entries are ``None``; they are not
        captured, so they may be layers the capture cannot handle or does not
        see called. Every other captured layer (also norm layers and
        embeddings) must be called, any number of times (the reuse rule, module
        docstring; a stacked layer inside ``nnx.scan``/``nnx.vmap``), or ``f``
        raises.

    Returns:
      A function returning the loss on the true targets, the parameter gradients as
      an ``nnx.State`` (like ``nnx.grad``), and the K-FAC statistics: a nested dict
      keyed like the params with a :class:`layerwise_optax.KfacFactors` at each
      captured kernel and a :class:`layerwise_optax.FoldedBias` (or its own
      factors, or ``None`` for a bias that is not a function of the output
      features only) at its bias, a :class:`layerwise_optax.KfacDiagonal` at
      each norm layer's scale and shift, and ``KfacFactors`` with a
      ``(vocabulary,)`` diagonal ``a`` at each ``nnx.Embed`` table (per slice,
      stacked, for layers created with ``nnx.vmap``), ready for
      ``optimizer.update(model, grads, kfac_stats=stats)``.

    The model's non-parameter state after the pass (BatchNorm's running
    averages, RNG counts) is written back to ``model``, as ``nnx.value_and_grad``
    does.

    Raises:
      ValueError: For an unknown loss, statistics mode or ``sequence_statistics``,
        a mode the loss does not support, a ``diagonal`` that is neither paths
        nor a callable; from ``f``: a ``diagonal`` path that is no captured layer,
        ``statistics_batch_size`` larger than the batch, and (named by its path) a
        layer that cannot be captured, whose call the forward pass does not reach,
        whose features a transform
        drops (a layer broadcast across ``nnx.scan`` iterations, a stacked layer
        looped over in Python), or, with ``'reduce'``, whose rows do not lead with
        the examples; a model with no layer to capture.
      TypeError: If ``fold_biases`` is not a bool, or ``statistics_batch_size``
        not ``None`` or an int.

    Layers created with ``nnx.vmap`` and applied with ``nnx.scan`` (also under
    ``nnx.remat``) or ``nnx.vmap`` get one pair of factors per slice, stacked
    (module docstring); give ``kfac`` ``dimension_numbers=
    kfac_dimension_numbers(model)`` for them.

    Examples:
      The input factor of a dense layer with its bias folded is the second moment
      of ``[x; 1]``, averaged over the examples:

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from layerwise_optax import flax as lof
      >>> model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
      >>> grad_fn = lof.kfac_value_and_grad(lambda m, x: m(x), 'mse')
      >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> loss, grads, stats = grad_fn(model, x, jnp.zeros((2, 2)))
      >>> stats['kernel'].a.tolist()
      [[0.5, 0.0, 0.5], [0.0, 2.0, 1.0], [0.5, 1.0, 1.0]]
      >>> stats['bias']
      FoldedBias(kernel='kernel')

      Three layers created with ``nnx.vmap`` and applied with ``nnx.scan`` get
      one pair of factors per slice:

      >>> import jax
      >>> @nnx.vmap(in_axes=0, out_axes=0)
      ... def stacked(key):
      ...     return nnx.Linear(2, 2, rngs=nnx.Rngs(key))
      >>> layers = stacked(jax.random.split(jax.random.key(0), 3))
      >>> scan = nnx.scan(lambda h, l: l(h), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      >>> grad_fn = lof.kfac_value_and_grad(lambda m, x: scan(x, m), 'mse')
      >>> _, _, stats = grad_fn(layers, x, jnp.zeros((2, 2)))
      >>> stats['kernel'].a.shape, stats['kernel'].g.shape
      ((3, 3, 3), (3, 2, 2))

      Pass ``stats`` to :func:`layerwise_optax.kfac`'s update as
      ``kfac_stats=stats`` (the README has a whole training step).

      Per-head weights (``h`` in input, kernel and output) get one block per
      head, and ``'reduce'`` averages the inputs over the 5 positions first:

      >>> heads = nnx.Einsum('bthd,hdk->bthk', (2, 3, 4), (2, 4), rngs=nnx.Rngs(0))
      >>> x, y = jnp.ones((8, 5, 2, 3)), jnp.zeros((8, 5, 2, 4))
      >>> f = lof.kfac_value_and_grad(lambda m, x: m(x), 'mse', sequence_statistics='reduce')
      >>> stats = f(heads, x, y)[2]
      >>> stats['kernel'].a.shape, stats['kernel'].g.shape
      ((2, 4, 4), (2, 4, 4))
      >>> stats['kernel'].a[0].tolist()[0]
      [1.0, 1.0, 1.0, 1.0]

    References:
      Martens and Grosse, `Optimizing Neural Networks with Kronecker-factored
      Approximate Curvature <https://arxiv.org/abs/1503.05671>`_, 2015.
      Grosse and Martens, `A Kronecker-factored Approximate Fisher Matrix for
      Convolution Layers <https://arxiv.org/abs/1602.01407>`_, 2016.
      Eschenhagen, Immer, Turner, Schneider and Hennig, `Kronecker-Factored
      Approximate Curvature for Modern Neural Network Architectures
      <https://arxiv.org/abs/2311.00636>`_, NeurIPS 2023.
    """
    _checks.boolean("fold_biases", fold_biases)
    if sequence_statistics not in _SEQUENCE:
        raise ValueError(
            f"sequence_statistics must be one of {list(_SEQUENCE)}, got {sequence_statistics!r}."
        )
    _checks.positive_int("statistics_batch_size", statistics_batch_size, allow_none=True)
    loss_name, loss_fn = _loss_for(loss, statistics)
    skip = _diagonal_rule(diagonal)

    def fn(model, inputs, targets, key=None):
        if statistics == "fisher" and key is None:
            raise ValueError(
                "statistics='fisher' needs a PRNG key: f(model, inputs, targets, key=key)."
            )
        _check_diagonal_names(model, diagonal)
        # Validates the captured layers up front (the diagonal ones are left out).
        _, tuples, biases = _layer_paths(model, skip)
        stacks, heads, diagonal_layers = {}, {}, {}
        for path, node in nnx.iter_graph(model):
            if isinstance(node, _CAPTURED + _EXTRA):
                key_ = _key(tuple(path))
                if key_ in tuples:
                    stacks[key_] = _stack_shape(node, key_)  # leading layer axes (nnx.vmap)
                    if isinstance(node, _CAPTURED):
                        heads[key_] = len(_layout(node, key_).batch)  # per-head slice axes
                elif isinstance(node, _CAPTURED) or _extra_params(node):
                    diagonal_layers[key_] = (tuple(path), _param_names(node))
        if not tuples and not diagonal_layers:
            raise ValueError(
                "kfac_value_and_grad: no layer of the model produced statistics (none of "
                "nnx.Linear, Conv, LinearGeneral, Einsum, Embed, LayerNorm, RMSNorm or "
                "BatchNorm was called by model_fn); K-FAC would precondition nothing."
            )
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        # Per use of a layer, the map from its output to (rows, d_out), and what a norm or
        # an embedding records: Python values, so they travel beside the traced values.
        out_rows: dict[str, Callable] = {}
        kinds: dict[str, tuple] = {}
        features: dict[str, jax.ShapeDtypeStruct] = {}
        uses: dict[str, int] = {}

        def forward(p, perturbations, recorder=None):
            # copy: Variables of this trace (RNG counts mutate inside nnx.scan bodies,
            # BatchNorm's running averages in train mode).
            m = nnx.merge(graphdef, p, rest, copy=True)
            # nnx.merge builds new module objects: mark the captured layers of this copy.
            rec = recorder or _Recorder(perturbations)
            attached = _attach(m, tuples, perturbations, features, uses)
            with _patched(rec):
                outputs = model_fn(m, inputs)
            out_rows.update(rec.out_rows)
            kinds.update(rec.kinds)
            # The non-parameter state after the pass (BatchNorm's running averages, RNG
            # counts) rides with the features, to be written back to the model.
            return outputs, {**_collect(attached), _STATE: nnx.split(m, nnx.Param, ...)[2]}

        # Shapes of every use's output and features per slice, so the perturbations
        # and feature placeholders can be zeros of that shape, stacked layer axes first.
        shape_pass = _Recorder(None, jax.tree.leaves(inputs)[0].shape[0])
        jax.eval_shape(lambda p: forward(p, None, shape_pass)[0], params)
        for key_ in tuples:
            if key_ not in shape_pass.slices:
                raise ValueError(
                    f"layer {key_}: the model has this {type(_node_at(model, tuples[key_])).__name__} "
                    "but its call was not seen in the forward pass (unused, its kernel used "
                    "directly, or called on another model than the one model_fn is given), so "
                    "it would get no statistics. Pass diagonal=[path] to give it the diagonal "
                    "Fisher on purpose."
                )
        uses.update(shape_pass.calls)
        slices = shape_pass.slices
        features.update(
            {
                u: jax.ShapeDtypeStruct(stacks[_layer_of(u)] + s.features.shape, s.features.dtype)
                for u, s in slices.items()
            }
        )
        zeros = {
            u: jnp.zeros(stacks[_layer_of(u)] + s.output.shape, s.output.dtype)
            for u, s in slices.items()
        }
        n = jax.tree.leaves(inputs)[0].shape[0]
        if statistics == "empirical":
            value, grads, feats, deltas = _empirical(forward, params, zeros, loss_fn, targets, n)
        elif statistics == "fisher":
            # Checked above: a callable loss is empirical only, and fisher needs a key.
            assert loss_name is not None and key is not None
            sample = functools.partial(_sample_labels, loss_name, key=key)
            value, grads, feats, deltas = _fisher(
                forward, params, zeros, loss_fn, targets, sample, n
            )
        else:
            assert loss_name is not None  # checked by _loss_for
            value, grads, feats, deltas = _gauss_newton(
                forward, params, zeros, loss_fn, targets, loss_name
            )
        nnx.update(model, feats.pop(_STATE))
        stats = _blocks(
            feats,
            deltas,
            n,
            out_rows=out_rows,
            kinds=kinds,
            heads=heads,
            stacks=stacks,
            tuples=tuples,
            biases=biases,
            fold_biases=fold_biases,
            reduce=sequence_statistics == "reduce",
            statistics_batch_size=statistics_batch_size,
            diagonal_layers=diagonal_layers.values(),
        )
        return value, grads, stats

    return fn


def _blocks(
    feats,
    deltas,
    n,
    *,
    out_rows,
    kinds,
    heads,
    stacks,
    tuples,
    biases,
    fold_biases,
    reduce,
    statistics_batch_size,
    diagonal_layers,
) -> dict:
    """The statistics tree from one pass's features and output gradients (NNX and Linen).

    The sub-batch (``statistics_batch_size``), the reuse rule (:func:`_kernel_uses`),
    the kernel blocks (:func:`_stats_tree`, K-FAC-expand or ``reduce``), the norm and
    embedding blocks (:func:`_extra_stats`), then ``None`` at the params of the
    ``diagonal_layers`` (``(path, param names)`` pairs).
    """
    if statistics_batch_size is not None:
        feats, deltas, n = _sub_batch(feats, deltas, n, statistics_batch_size, stacks)
    feats, deltas, rows, extra = _kernel_uses(feats, deltas, out_rows, kinds, n, heads, stacks)
    stats = _stats_tree(feats, deltas, rows, n, tuples, biases, fold_biases, stacks, heads, reduce)
    _merge_stats(stats, _extra_stats(extra, kinds, n, tuples, stacks))
    for path, names in diagonal_layers:
        _set_diagonal(stats, path, names)
    return stats


def _sub_batch(
    feats: dict, deltas: dict, n: int, m: int, stacks: dict[str, tuple[int, ...]]
) -> tuple[dict, dict, int]:
    """The first ``m`` of the ``n`` examples' layer inputs and output gradients.

    ``feats[k]`` has the examples on its first axis after the layer axes
    ``stacks[k]`` of a stacked layer, ``deltas[k]`` one axis later (after the
    samples axis of :func:`_stats_tree`).

    Raises:
      ValueError: ``m`` larger than the batch, or a layer whose rows do not lead
        with the examples (named by its path).
    """
    if m > n:
        raise ValueError(
            f"statistics_batch_size={m} is larger than the batch ({n} examples); it must be "
            "in 1..n (None: the whole batch)."
        )
    if m == n:
        return feats, deltas, n
    out_feats, out_deltas = {}, {}
    for k, x in feats.items():
        axis = len(stacks.get(_layer_of(k), ()))  # k is a use of the layer
        if x.shape[axis] != n:
            raise ValueError(
                f"layer {k}: statistics_batch_size needs the examples leading the layer's "
                f"input rows, got rows of shape {x.shape[axis:-1]} for {n} examples."
            )
        out_feats[k] = jax.lax.slice_in_dim(x, 0, m, axis=axis)
        out_deltas[k] = jax.lax.slice_in_dim(deltas[k], 0, m, axis=axis + 1)
    return out_feats, out_deltas, m


def _loss_for(loss: Any, statistics: str) -> tuple[str | None, Callable]:
    """``(name or None, loss function)`` of ``kfac_value_and_grad``'s ``loss``, checked.

    Raises:
      ValueError: An unknown loss or statistics mode, or a mode the loss does not
        support (``'fisher'`` and ``'gauss_newton'`` need a built-in loss).
    """
    if statistics not in _MODES:
        raise ValueError(f"Unknown statistics {statistics!r}; expected one of {sorted(_MODES)}.")
    if isinstance(loss, str):
        if loss not in _LOSSES:
            raise ValueError(
                f"Unknown loss {loss!r}; expected one of {sorted(_LOSSES)} or a callable."
            )
        loss_name, loss_fn = loss, _LOSS_FNS[loss]
    elif callable(loss):
        if statistics != "empirical":
            raise ValueError(
                f"statistics={statistics!r} needs a built-in loss, one of {sorted(_LOSSES)} "
                "(a callable loss has no predictive distribution to sample or expect over)."
            )
        loss_name, loss_fn = None, loss
    else:
        raise ValueError(f"loss must be a name or a callable, got {loss!r}.")
    return loss_name, loss_fn


def _empirical(forward, params, zeros, loss_fn, targets, n):
    """Empirical statistics: ``B`` from the per-example output gradients of the true loss.

    The gradient of the mean loss with respect to each layer's output
    perturbation is ``1/n`` times the per-example gradient, hence the factor
    ``n``. Returns ``(loss, grads, layer inputs, output gradients (1, n, ...))``.
    """

    def objective(p, e):
        outputs, feats = forward(p, e)
        return loss_fn(outputs, targets), feats

    (value, feats), (grads, out_grads) = jax.value_and_grad(
        objective, argnums=(0, 1), has_aux=True
    )(params, zeros)
    return value, grads, feats, jax.tree.map(lambda d: n * d[None], out_grads)


def _fisher(forward, params, zeros, loss_fn, targets, sample, n):
    """Fisher statistics: ``B`` from the output gradients of the loss on sampled labels.

    One forward pass, two pullbacks: the true loss's gradient for the parameters,
    the sampled loss's (labels drawn by ``sample(outputs)`` from the model's
    predictive distribution) for the statistics. Returns as :func:`_empirical`.
    """

    def objective(p, e):
        outputs, feats = forward(p, e)
        return (loss_fn(outputs, targets), loss_fn(outputs, sample(outputs))), feats

    (value, _), pullback, feats = jax.vjp(objective, params, zeros, has_aux=True)
    one, zero = jnp.ones_like(value), jnp.zeros_like(value)
    grads, _ = pullback((one, zero))
    _, out_grads = pullback((zero, one))
    return value, grads, feats, jax.tree.map(lambda d: n * d[None], out_grads)


def _gauss_newton(forward, params, zeros, loss_fn, targets, loss_name):
    """Exact Gauss-Newton statistics: ``B = E[J^T F J]``, the Fisher mode's expectation.

    ``F = M M^T`` is the output Fisher of the loss (:func:`_fisher_sqrt`); one
    pullback per output unit ``k`` and output position ``t`` (vectorized) of the
    column ``m_k`` at position ``t`` (zero elsewhere) gives every layer's
    per-example rows ``J_i^T m_{k t}``. Each position apart: the expectation of
    the Fisher mode's ``δ δ^T`` over labels sampled independently per position
    has no cross-position terms. Returns ``(loss, grads, layer inputs, rows
    (units × positions, n, ...))``.
    """
    outputs, pullback, feats = jax.vjp(forward, params, zeros, has_aux=True)
    value, d_out = jax.value_and_grad(loss_fn)(outputs, targets)
    grads, _ = pullback(d_out)
    cols = _fisher_sqrt(loss_name, outputs)  # (units, n, *positions, units)
    positions = outputs.shape[1:-1]
    count = 1
    for size in positions:
        count *= size
    if count > 1:
        # Column k at position t alone: (positions, units, n, *positions, units).
        alone = jnp.reshape(jnp.eye(count, dtype=outputs.dtype), (count, 1, 1) + positions + (1,))
        cols = jnp.reshape(alone * cols[None], (count * cols.shape[0],) + outputs.shape)
    return value, grads, feats, jax.vmap(lambda ct: pullback(ct)[1])(cols)


# ----------------------------------------------------------- norms, embeddings, reused layers
#
# Normalization layers (``nnx.LayerNorm``, ``nnx.RMSNorm``, ``nnx.BatchNorm``) get the
# exact diagonal Fisher of their scale and shift (:class:`layerwise_optax.KfacDiagonal`):
# the wrapped call records the normalized input ``x̂`` (before scale and shift) and
# perturbs the output, so the per-example gradients ``Σ_t δ_t ⊙ x̂_t`` and ``Σ_t δ_t`` come
# from the same pass. ``nnx.Embed`` gets ``A = diag(counts) / n`` (the exact covariance
# of one-hot inputs, kept as a diagonal) and ``B = E[δ δ^T]``; ``Embed.attend`` (the
# table as the output head, ``x E^T``) is another use of the same table. Their
# recorded values and perturbations travel through the same per-use module variables
# as the kernels' (:func:`_attach`), so stacked norms inside ``nnx.scan`` get one
# block per slice.
#
# Reuse rule (a layer called several times per forward pass, a table used by
# ``__call__`` and ``attend``): the uses are treated as extra positions, as KFC treats
# the positions of a sequence. In the table's own orientation every use contributes its
# rows to ``A = (1/n) Σ_rows u u^T`` (input side) and ``B = (1/R) Σ_rows v v^T`` (output
# side, ``R`` = rows of all uses); for ``attend`` the input side is the logits'
# gradients and the output side the queries. A layer called on ``x1`` and ``x2`` thus
# gets exactly the statistics of one call on the rows of both, and ``A ⊗ B`` equals the
# sum of the uses' own K-FAC blocks ``Σ_u A_u ⊗ B_u`` when their ``B_u`` are equal. A
# norm layer's diagonal Fisher is exact for any reuse: its per-example gradients are
# summed over the uses before squaring. A stacked layer used twice in a scanned body
# has two per-slice uses, combined per slice by the same rule; a per-head kernel used
# twice combines its uses per head.


def _extra_params(module: Any) -> tuple[str, ...]:
    """The parameter leaves of a norm layer or an embedding that get statistics."""
    if isinstance(module, nnx.Embed):
        return ("embedding",)
    return tuple(n for n in ("scale", "bias") if getattr(module, n, None) is not None)


def _feature_axes(module: Any, ndim: int) -> tuple[int, ...]:
    axes = module.axis if isinstance(module, nnx.BatchNorm) else module.feature_axes
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(sorted(a % ndim for a in axes))


def _check_extra(module: nnx.Module, path: str) -> None:
    """Refuses, by path, norm layers whose parameters are not per-feature over the examples."""
    if isinstance(module, _NORMS) and getattr(module, "axis_name", None) is not None:
        raise ValueError(
            f"layer {path}: a norm layer with axis_name (statistics over devices) cannot "
            "be captured: its per-example gradients need the whole batch on one device."
        )


def _normalized_input(module: Any, x: jax.Array, path: str, args, kwargs) -> jax.Array:
    """``x̂``: a norm layer's input normalized as the layer does, before scale and shift."""
    # The layer's own statistics code (through _optional, like every flax import).
    norm = _optional.require("flax.nnx.nn.normalization", "layerwise_optax.flax")

    feature_axes = _feature_axes(module, x.ndim)
    if 0 in feature_axes:
        raise ValueError(
            f"layer {path}: its features include axis 0, the examples axis, so its scale "
            "and shift have no per-example gradients."
        )
    mask = kwargs.get("mask")
    (x,) = module.promote_dtype((x,), dtype=module.dtype)
    if isinstance(module, nnx.BatchNorm):
        reduction = tuple(a for a in range(x.ndim) if a not in feature_axes)
        running = args[0] if args else kwargs.get("use_running_average")
        running = module.use_running_average if running is None else running
        if running:
            mean, var = module.mean[...], module.var[...]
        else:
            mean, var = norm._compute_stats(
                x,
                reduction,
                dtype=module.dtype,
                axis_index_groups=module.axis_index_groups,
                use_fast_variance=module.use_fast_variance,
                mask=mask,
            )
    else:
        reduction = module.reduction_axes
        mean, var = norm._compute_stats(
            x,
            reduction,
            module.dtype,
            None,
            module.axis_index_groups,
            use_mean=not isinstance(module, nnx.RMSNorm),
            use_fast_variance=module.use_fast_variance,
            mask=mask,
        )
    xhat = norm._normalize(
        x, mean, var, None, None, reduction, feature_axes, module.dtype, module.epsilon
    )
    return jax.lax.stop_gradient(xhat)


def _extra_features(
    module: Any, name: str, x: jax.Array, path: str, args, kwargs
) -> tuple[jax.Array, tuple]:
    """What a norm layer's or an embedding's call ``name`` records: ``(values, kind)``.

    A norm layer: ``x̂`` and ``('norm', feature axes, scale shape, bias shape)``; a
    lookup: the ids and ``('lookup', vocabulary)``; ``attend``: the queries and
    ``('attend', vocabulary)``.
    """
    if isinstance(module, _NORMS):
        scale = getattr(module, "scale", None)
        bias = getattr(module, "bias", None)
        kind = (
            "norm",
            _feature_axes(module, x.ndim),
            None if scale is None else tuple(scale.shape),
            None if bias is None else tuple(bias.shape),
        )
        return _normalized_input(module, x, path, args, kwargs), kind
    if name == "attend":
        return jax.lax.stop_gradient(x), ("attend", module.num_embeddings)
    return x, ("lookup", module.num_embeddings)


def _extra_spec(module: nnx.Module, stack: tuple[int, ...], kind: str, leaf: Any) -> Any:
    """``kfac_dimension_numbers``' entry for a leaf of a norm layer or an embedding.

    The table of ``nnx.Embed`` is a kernel ``(*stack, vocabulary, features)`` whose
    input factor is kept diagonal (the layer axes of a stacked table are batch
    axes); the scale and shift of a norm layer have no factors (their statistics
    are :class:`layerwise_optax.KfacDiagonal`).
    """
    s = len(stack)
    if isinstance(module, nnx.Embed) and kind == "embedding":
        return DiagonalFactors(DimensionNumbers(((s,), (s + 1,)), tuple(range(s))), (0,))
    if isinstance(module, _NORMS) and kind in ("scale", "bias"):
        return None
    return default_kernel_dimension_numbers(tuple(leaf.shape))


def _kernel_uses(
    feats: dict, deltas: dict, out_rows: dict, kinds: dict, n: int, heads: dict, stacks: dict
):
    """Kernel uses combined per layer (the reuse rule), and the other uses.

    A kernel layer used once keeps its entries; one used several times gets its
    uses' rows concatenated along the positions, ``(*stack, n, rows, d)`` features
    and ``(samples, *stack, n, rows, d_out)`` output gradients (``stack``: the
    layer axes of a stacked layer, ``stacks[layer]``), with an identity row map;
    a per-head kernel keeps its ``heads[layer]`` slice axes after the rows
    (``(*stack, n, rows, *heads, d)``), each head combined over the uses alike.
    Returns ``(features, output gradients, row maps, other uses)``.
    """
    kernel = [u for u in feats if u not in kinds]
    extra = {u: (feats[u], deltas[u]) for u in feats if u in kinds}
    by_layer: dict[str, list[str]] = {}
    for u in kernel:
        by_layer.setdefault(_layer_of(u), []).append(u)
    out_f, out_d, rows = {}, {}, {}
    for layer, uses in by_layer.items():
        if uses == [layer]:
            out_f[layer], out_d[layer], rows[layer] = feats[layer], deltas[layer], out_rows[layer]
            continue
        stack = stacks.get(layer, ())
        nh = heads.get(layer, 0)  # per-head slice axes, between the rows and the features
        xs, ds = [], []
        for u in uses:
            row_map = out_rows[u]
            for _ in range(1 + len(stack)):  # samples axis, then each layer axis
                row_map = jax.vmap(row_map)
            x, d = feats[u], row_map(deltas[u])
            hs = x.shape[x.ndim - 1 - nh : x.ndim - 1]
            xs.append(jnp.reshape(x, stack + (n, -1) + hs + x.shape[-1:]))
            ds.append(jnp.reshape(d, (d.shape[0], *stack, n, -1) + hs + d.shape[-1:]))
        out_f[layer] = jnp.concatenate(xs, axis=-2 - nh)
        out_d[layer] = jnp.concatenate(ds, axis=-2 - nh)
        rows[layer] = _identity
    return out_f, out_d, rows, extra


def _per_slice(x: jax.Array, delta: jax.Array, stack: tuple[int, ...]):
    """A use's values ``(*stack, ...)`` and output gradients ``(samples, *stack, ...)``
    with the layer axes flattened in front: ``(slices, ...)``, ``(slices, samples, ...)``."""
    s = len(stack)
    count = math.prod(stack)
    x = jnp.reshape(x, (count,) + x.shape[s:])
    delta = jnp.moveaxis(delta, 0, s)
    return x, jnp.reshape(delta, (count,) + delta.shape[s:])


def _norm_grads(xhat: jax.Array, delta: jax.Array, axes: tuple[int, ...]):
    """Per-example gradients of one slice's scale and shift: ``(samples, n, *features)``."""
    reduce = tuple(1 + a for a in range(1, xhat.ndim) if a not in axes)
    d32 = delta.astype(jnp.float32)
    return (
        jnp.sum(d32 * xhat.astype(jnp.float32)[None], axis=reduce),
        jnp.sum(d32, axis=reduce),
    )


def _embedding_sums(x, delta, kind: str, vocab: int):
    """One slice's use of a table: ``(counts side (vocabulary,), features side sum)``."""
    hi = jax.lax.Precision.HIGHEST
    d32 = delta.astype(jnp.float32)
    if kind == "lookup":
        # One-hot rows: the input side's second moment is the diagonal of counts.
        a = jnp.zeros((vocab,), jnp.float32).at[jnp.ravel(x)].add(1.0, mode="drop")
        v = jnp.reshape(d32, (-1, d32.shape[-1]))
    else:
        # attend: x E^T, so the logits' gradients are the table's input side.
        a = jnp.sum(jnp.reshape(jnp.square(d32), (-1, vocab)), axis=0)
        v = jnp.reshape(x.astype(jnp.float32), (-1, x.shape[-1]))
    return a, jnp.matmul(v.T, v, precision=hi)


def _extra_stats(extra: dict, kinds: dict, n: int, tuples: dict, stacks: dict) -> dict:
    """Statistics of the norm layers and embeddings, keyed like the params.

    ``extra[use] = (values, output gradients (samples, *stack, n, ...))``. A norm
    layer: :class:`layerwise_optax.KfacDiagonal` at its scale and bias, ``(1/n) Σ_i
    g_i²`` with the per-example gradients summed over samples of the output
    gradient (one sample, or one per output unit for Gauss-Newton) and over the
    layer's uses. An embedding: :class:`layerwise_optax.KfacFactors` with ``a`` the
    diagonal ``(vocabulary,)`` and ``g`` the ``(features, features)`` factor, by the
    reuse rule. A stacked layer (``stacks[layer]``, leading layer axes) gets these
    per slice, stacked.
    """
    by_layer: dict[str, list[str]] = {}
    for u in extra:
        by_layer.setdefault(_layer_of(u), []).append(u)
    tree: dict = {}
    for layer, uses in by_layer.items():
        stack = stacks.get(layer, ())
        node = tree
        for key in tuples[layer]:
            node = node.setdefault(key, {})
        if kinds[uses[0]][0] == "norm":
            _, _, scale_shape, bias_shape = kinds[uses[0]]
            g_scale, g_bias = 0.0, 0.0
            for u in uses:
                x, d = _per_slice(extra[u][0], extra[u][1], stack)
                gs, gb = jax.vmap(functools.partial(_norm_grads, axes=kinds[u][1]))(x, d)
                g_scale, g_bias = g_scale + gs, g_bias + gb  # (slices, samples, n, *features)
            for name, shape, g in (("scale", scale_shape, g_scale), ("bias", bias_shape, g_bias)):
                if shape is not None:
                    f = jnp.sum(jnp.square(g), axis=(1, 2)) / n
                    node[name] = KfacDiagonal(jnp.reshape(f, stack + shape))
            continue
        vocab = kinds[uses[0]][1]
        a_parts, g_parts, rows = [], [], 0
        for u in uses:
            x, d = _per_slice(extra[u][0], extra[u][1], stack)
            sums = functools.partial(_embedding_sums, kind=kinds[u][0], vocab=vocab)
            au, gu = jax.vmap(sums)(x, d)
            a_parts.append(au)
            g_parts.append(gu)
            rows += _embedding_rows(x[0], kinds[u][0])
        g_sum = sum(g_parts[1:], g_parts[0])
        a = jnp.reshape(sum(a_parts[1:], a_parts[0]) / n, stack + (vocab,))
        g = jnp.reshape(g_sum / rows, stack + g_sum.shape[1:])
        node["embedding"] = KfacFactors(a, g)
    return tree


def _embedding_rows(x: jax.Array, kind: str) -> int:
    """The rows one slice's use contributes to the features side (static)."""
    if kind == "lookup":
        return x.size
    return math.prod(x.shape[:-1])


def _merge_stats(tree: dict, other: dict) -> None:
    """Adds the entries of ``other`` (nested dicts) into ``tree`` in place."""
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _merge_stats(tree[key], value)
        else:
            tree[key] = value
