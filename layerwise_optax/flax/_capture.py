"""K-FAC statistics capture for Flax NNX models in the same forward/backward pass.

How it works: while the loss is traced, the ``__call__`` of every captured layer
(``nnx.Linear``, ``nnx.Conv``, ``nnx.LinearGeneral``, ``nnx.Einsum``) is wrapped so
that it

* records its input features (for a convolution, the input patches ordered like
  the kernel's ``(kh, kw, c_in)`` axes; for ``LinearGeneral``/``Einsum``, the
  contracted input axes flattened in the kernel's order), and
* adds a zero *perturbation* ``e`` to its output.

``Einsum`` layers are captured where the axes are clear: every kernel axis is
either contracted with the input (an input axis of ``A``) or passed to the output
(an output axis of ``B``). A kernel axis shared by input and output (per-head
weights, say) or summed away is refused with the layer's path. For layers whose
kernel is not ``(inputs..., outputs)``, give ``kfac`` the layout with
:func:`kfac_dimension_numbers`.

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

Norm layers (``nnx.LayerNorm``, ``nnx.RMSNorm``, ``nnx.BatchNorm``) record their
normalized input ``x̂`` and get :class:`layerwise_optax.KfacDiagonal` blocks, the
exact diagonal Fisher ``(1/n) Σ_i g_i²`` of the per-example gradients ``Σ_t δ ⊙ x̂``
(scale) and ``Σ_t δ`` (shift), as kfac-jax's scale-and-shift blocks; ``nnx.Embed``
gets ``A = diag(counts) / n`` (the exact second moment of one-hot inputs, a
``(vocabulary,)`` diagonal) and ``B`` as above. A layer used several times (called
twice, or a table also used by ``Embed.attend`` as the output head) gets one block
by the reuse rule of the section below (its uses count as extra positions).

Output-gradient modes:

* ``statistics='empirical'``: ``delta`` from the true labels, one forward and one
  backward pass in total.
* ``statistics='fisher'`` (``loss='mse'`` or ``'softmax_cross_entropy'``): ``delta``
  from labels sampled from the model's predictive distribution (Gaussian with
  unit variance around the outputs, or the softmax's categorical). The forward
  pass is shared; the sampled-label cotangent takes a second backward pass
  (``jax.vjp``), as in every K-FAC implementation.
* ``statistics='gauss_newton'`` (``loss='mse'``): the exact expectation of the
  Fisher mode, ``B = E[J^T J]`` with ``J`` the Jacobian of the outputs with
  respect to the layer output, from one vectorized backward pass per output unit.
  For a linear network this is exactly the paper's ``P_G = F^T F``.
"""

from __future__ import annotations

import contextlib
import functools
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

_LOSSES = ("mse", "softmax_cross_entropy")
_MODES = ("empirical", "fisher", "gauss_newton")
_CAPTURED = (nnx.Linear, nnx.Conv, nnx.LinearGeneral, nnx.Einsum)


class _Layout(NamedTuple):
    """How one layer maps to K-FAC factors: kernel axis groups and feature extractors."""

    inputs: tuple[int, ...]  # kernel axes contracted with the input (A's axis)
    outputs: tuple[int, ...]  # kernel axes that reach the output (B's axis)
    bias: bool  # whether the bias is a function of the output features only


def _einsum_parts(spec: str, path: str) -> tuple[str, str, str, str, str]:
    """``(lhs, rhs, out, contracted, produced)`` letters of an ``Einsum`` layer."""
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
    unclear = [c for c in rhs if c not in contracted and c not in produced]
    if unclear:
        raise ValueError(
            f"layer {path}: einsum {spec!r} cannot be captured: kernel axes {unclear} are "
            "neither only contracted with the input nor only passed to the output (shared "
            "per-slice weights or summed axes have no single pair of Kronecker factors)."
        )
    return lhs, rhs, out, contracted, produced


def _layout(module: nnx.Module, path: str, einsum_str: str | None = None) -> _Layout:
    if isinstance(module, nnx.Einsum):
        _, rhs, out, contracted, produced = _einsum_parts(einsum_str or module.einsum_str, path)
        bias_ok = out.endswith(produced) and (
            module.bias is None
            or tuple(module.bias.shape)
            == tuple(module.kernel_shape[rhs.index(c)] for c in produced)
        )
        return _Layout(
            tuple(rhs.index(c) for c in contracted), tuple(rhs.index(c) for c in produced), bias_ok
        )
    if isinstance(module, nnx.LinearGeneral):
        if module.batch_axis:
            raise ValueError(
                f"layer {path}: LinearGeneral with batch_axis (per-slice kernels) cannot be "
                "captured."
            )
        n_in, n_out = len(module.in_features), len(module.out_features)
        return _Layout(tuple(range(n_in)), tuple(range(n_in, n_in + n_out)), True)
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


def _sample_labels(kind: str, outputs: jax.Array, key: jax.Array) -> jax.Array:
    outputs = jax.lax.stop_gradient(outputs)
    if kind == "mse":
        return outputs + jax.random.normal(key, outputs.shape, outputs.dtype)
    return jax.random.categorical(key, outputs, axis=-1)


def _conv_padding(
    padding: Any, x: jax.Array, kernel_size: tuple[int, ...], dilation: tuple[int, ...]
) -> tuple[jax.Array, str | tuple[tuple[int, int], ...]]:
    """The input and ``lax`` padding that give ``nnx.Conv``'s windows for its ``padding``.

    ``nnx.Conv`` takes a lax padding name, an int (the same on both sides of every
    spatial axis), one int or ``(low, high)`` pair per spatial axis, or ``'CIRCULAR'``
    / ``'CAUSAL'``, which pad the input itself (wrapped around, or zeros before a 1-D
    sequence only) and then slide the window without padding.
    """
    if padding in ("CIRCULAR", "CAUSAL"):
        spans = [(k - 1) * d for k, d in zip(kernel_size, dilation)]  # dilated window - 1
        if padding == "CIRCULAR":
            pads = [(s // 2, (s + 1) // 2) for s in spans]
        else:
            pads = [(spans[0], 0)]  # nnx.Conv allows CAUSAL on 1-D convolutions only
        outer = [(0, 0)] * (x.ndim - len(pads) - 1)
        mode = "wrap" if padding == "CIRCULAR" else "constant"
        return jnp.pad(x, [*outer, *pads, (0, 0)], mode=mode), "VALID"
    if isinstance(padding, str):
        return x, padding
    if isinstance(padding, int):
        return x, ((padding, padding),) * len(kernel_size)
    return x, tuple((p, p) if isinstance(p, int) else (p[0], p[1]) for p in padding)


def _conv_patches(module: nnx.Conv, x: jax.Array) -> jax.Array:
    """Input patches of a convolution, features ordered like ``kernel.reshape(-1, out)``."""
    kernel_size = tuple(module.kernel_shape[:-2])
    nd = len(kernel_size)

    def per_dim(v, default):
        if v is None:
            return (default,) * nd
        return (v,) * nd if isinstance(v, int) else tuple(v)

    spatial = "HWD"[:nd] if nd <= 3 else None
    if spatial is None:  # pragma: no cover - 4-D convolutions are not in nnx
        raise NotImplementedError("convolutions with more than 3 spatial dims")
    lhs = "N" + spatial + "C"
    dilation = per_dim(module.kernel_dilation, 1)
    x, padding = _conv_padding(module.padding, x, kernel_size, dilation)
    patches = jax.lax.conv_general_dilated_patches(
        x,
        filter_shape=kernel_size,
        window_strides=per_dim(module.strides, 1),
        padding=padding,
        lhs_dilation=per_dim(module.input_dilation, 1),
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
    if isinstance(module, nnx.LinearGeneral):
        axis = tuple(a % x.ndim for a in module.axis)
        rest = tuple(a for a in range(x.ndim) if a not in axis)
        feats = jnp.transpose(x, rest + axis)
        feats = jnp.reshape(feats, feats.shape[: len(rest)] + (-1,))
        n_out = len(module.out_features)
        return feats, lambda out: jnp.reshape(out, out.shape[: out.ndim - n_out] + (-1,))
    if isinstance(module, nnx.Einsum):
        spec = call_kwargs.get("einsum_str") or (call_args[0] if call_args else None)
        lhs, _, out_s, contracted, produced = _einsum_parts(spec or module.einsum_str, path)
        keep_in = "".join(c for c in lhs if c not in contracted)
        keep_out = "".join(c for c in out_s if c not in produced)
        feats = jnp.einsum(f"{lhs}->{keep_in}{contracted}", x)
        feats = jnp.reshape(feats, feats.shape[: feats.ndim - len(contracted)] + (-1,))

        def rows(out):
            out = jnp.einsum(f"{out_s}->{keep_out}{produced}", out)
            return jnp.reshape(out, out.shape[: out.ndim - len(produced)] + (-1,))

        return feats, rows
    return x, lambda out: out


class _Recorder:
    """Trace-time side channel: layer inputs in, perturbations out."""

    def __init__(self, paths: dict[int, str], perturbations: dict[str, jax.Array] | None):
        self.paths = paths  # id(module) -> "a/b/0" (string keys keep pytrees sortable)
        self.perturbations = perturbations
        self.inputs: dict[str, jax.Array] = {}
        self.out_rows: dict[str, Callable[[jax.Array], jax.Array]] = {}
        self.output_shapes: dict[str, jax.ShapeDtypeStruct] = {}
        self.kinds: dict[str, tuple] = {}  # use -> what it records, for non-kernel uses

    def wrap(self, cls: type, original: Callable) -> Callable:
        recorder = self

        def call(module, x, *args, **kwargs):
            out = original(module, x, *args, **kwargs)
            path = recorder.paths.get(id(module))
            if path is None:
                return out
            feats, rows = _features(module, x, path, args, kwargs)
            path = _use_key(recorder.inputs, path)  # a layer called again: its next use
            recorder.inputs[path] = feats
            recorder.out_rows[path] = rows
            recorder.output_shapes[path] = jax.ShapeDtypeStruct(out.shape, out.dtype)
            if recorder.perturbations is not None:
                out = out + recorder.perturbations[path].astype(out.dtype)
            return out

        return call


@contextlib.contextmanager
def _patched(recorder: _Recorder):
    originals = {cls: cls.__call__ for cls in _CAPTURED}
    extras = _extra_originals()
    try:
        for cls, orig in originals.items():
            setattr(cls, "__call__", recorder.wrap(cls, orig))  # noqa: B010
        for (cls, name), orig in extras.items():
            setattr(cls, name, _wrap_extra(recorder, name, orig))
        yield recorder
    finally:
        for cls, orig in originals.items():
            setattr(cls, "__call__", orig)  # noqa: B010
        for (cls, name), orig in extras.items():
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


def _layer_paths(model: nnx.Module) -> tuple[dict[int, str], dict[str, tuple], dict[str, bool]]:
    """``id(layer) -> key`` for every captured layer, ``key -> graph path``, ``key -> bias stats``."""
    paths, tuples, biases = {}, {}, {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, _EXTRA):  # norms and embeddings: their own blocks
            key = _key(tuple(path))
            _check_extra(node, key)
            paths[id(node)] = key
            tuples[key] = tuple(path)
        if isinstance(node, _CAPTURED):
            key = _key(tuple(path))
            if isinstance(node, nnx.Conv) and node.feature_group_count != 1:
                raise ValueError(f"layer {key}: grouped convolutions are not supported.")
            layout = _layout(node, key)  # raises for layers whose axes are not clear
            paths[id(node)] = key
            tuples[key] = tuple(path)
            if getattr(node, "bias", None) is not None:
                biases[key] = layout.bias
    return paths, tuples, biases


def kfac_dimension_numbers(model: nnx.Module, *, fold_biases: bool = True) -> Callable[[Any], Any]:
    """The kernel layouts of a model's captured layers, for ``kfac(dimension_numbers=...)``.

    ``nnx.Linear`` and ``nnx.Conv`` kernels already match kfac's default (inputs
    first, output last, biases folded); ``nnx.LinearGeneral`` kernels have several
    input and output axes and ``nnx.Einsum`` kernels any order, so pass this to
    ``kfac`` when a model has them. Paths are matched after dropping a Flax
    ``Variable``'s ``.value``, so the same layouts come out for an ``nnx.State``
    (what ``nnx.Optimizer`` initializes with), its pure form and a plain dict.

    Args:
      model: The Flax NNX model whose statistics :func:`kfac_value_and_grad` captures.
      fold_biases: ``True``: each captured bias is folded into its kernel
        (:class:`layerwise_optax.FoldedBias`, homogeneous coordinates); ``False``:
        a separate bias block ``DimensionNumbers(((), (all axes)))``. Must match
        the capture's ``fold_biases``.

    Returns:
      A callable ``tree -> spec tree`` (kfac calls it with the params or updates
      tree): each captured kernel gets ``DimensionNumbers((input axes), (output
      axes))``, its bias a ``FoldedBias`` (or its own block), every other leaf
      kfac's default.

    Raises:
      ValueError: For a layer that cannot be captured, named by its path.
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
    layouts, extras = {}, {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, _CAPTURED):
            key = _key(tuple(path))
            layouts[key] = _layout(node, key)
        elif isinstance(node, _EXTRA):
            extras[_key(tuple(path))] = node

    def spec(path, leaf):
        if _is_masked(leaf):
            return None
        names = _path_keys(path)
        layer, kind = "/".join(names[:-1]), names[-1] if names else ""
        if layer in extras:
            return _extra_spec(extras[layer], kind, leaf)
        layout = layouts.get(layer)
        if layout is not None and kind == "kernel":
            return DimensionNumbers((layout.inputs, layout.outputs))
        if layout is not None and kind == "bias":
            if fold_biases and layout.bias:
                return FoldedBias(f"{layer}/kernel")
            return DimensionNumbers(((), tuple(range(leaf.ndim))))
        return default_kernel_dimension_numbers(leaf.shape)

    return lambda tree: jax.tree_util.tree_map_with_path(spec, tree, is_leaf=_is_masked)


def _stats_tree(
    inputs, deltas, out_rows, n: int, tuples: dict[str, tuple], biases: dict, fold: bool
) -> dict:
    """Nested dict ``{...: {'kernel': KfacFactors, 'bias': ...}}`` keyed like the params.

    ``deltas[key]`` has a leading axis of output-gradient samples that are summed
    (one for the empirical and Fisher modes, one per output unit for Gauss-Newton).
    ``biases[key]``: ``True`` for a bias that is a function of the output features
    (its statistics are given), ``False`` for another bias (``None``: the diagonal
    fallback), absent without a bias.
    """
    tree: dict = {}
    hi = jax.lax.Precision.HIGHEST
    for key_, x in inputs.items():
        path = tuples[key_]
        delta = deltas[key_]
        x2 = jnp.reshape(x, (-1, x.shape[-1])).astype(jnp.float32)
        delta = jax.vmap(out_rows[key_])(delta)
        d2 = jnp.reshape(delta, (-1, delta.shape[-1])).astype(jnp.float32)
        positions = x2.shape[0] // n
        bias = biases.get(key_)
        if bias and fold:
            # Homogeneous coordinates: the constant input 1 of the bias as a last feature,
            # so a's last row is sum(x) / n (the cross term) and its corner the positions.
            x2 = jnp.concatenate([x2, jnp.ones((x2.shape[0], 1), x2.dtype)], axis=1)
        a = jnp.matmul(x2.T, x2, precision=hi) / n
        b = jnp.matmul(d2.T, d2, precision=hi) / (n * positions)
        node = tree
        for key in path:
            node = node.setdefault(key, {})
        node["kernel"] = KfacFactors(a, b)
        if bias and fold:
            node["bias"] = FoldedBias("/".join(map(str, path + ("kernel",))))
        elif bias:
            # A separate block: the bias is a kernel whose input is the constant 1 at
            # each of the example's positions, A = (1/n) sum over n * positions rows of 1.
            node["bias"] = KfacFactors(jnp.full((1, 1), float(positions), jnp.float32), b)
        elif bias is not None:
            node["bias"] = None  # not a function of the output features: diagonal fallback
    return tree


def kfac_value_and_grad(
    model_fn: Callable[..., jax.Array],
    loss: Literal["mse", "softmax_cross_entropy"] | Callable[[jax.Array, Any], jax.Array] = "mse",
    *,
    statistics: Literal["empirical", "fisher", "gauss_newton"] = "empirical",
    fold_biases: bool = True,
) -> Callable[..., tuple[jax.Array, nnx.State, dict]]:
    """Builds ``f(model, inputs, targets, key=None) -> (loss, grads, kfac_stats)``.

    Args:
      model_fn: ``model_fn(model, inputs) -> outputs`` (often ``lambda m, x: m(x)``).
      loss: ``'mse'``, ``'softmax_cross_entropy'`` (integer labels), or a callable
        ``loss(outputs, targets) -> scalar`` averaged over examples (empirical mode
        only).
      statistics: How the output-gradient factor ``B`` is estimated:
        ``'empirical'`` (true targets), ``'fisher'`` (labels sampled from the
        model's predictive distribution; needs a built-in ``loss`` and a ``key``)
        or ``'gauss_newton'`` (exact ``E[J^T J]`` of the outputs, one extra
        backward pass per output unit, vectorized; ``loss='mse'`` only). For the
        squared error, ``'fisher'`` is an unbiased one-sample estimate of
        ``'gauss_newton'``.
      fold_biases: ``True`` (default): each layer's bias is folded into its kernel
        in homogeneous coordinates, as in Martens and Grosse (2015) and kfac-jax:
        the kernel's ``a`` is over ``[x; 1]``, ``(d_in + 1) × (d_in + 1)``, and the
        bias entry is a :class:`layerwise_optax.FoldedBias` (``kfac``'s default
        layout folds Flax ``kernel``/``bias`` pairs the same way). ``False``: the
        bias gets its own block ``KfacFactors([[T]], g)`` (``T`` positions per
        example: the constant input 1 under the same ``1/n`` convention); give
        ``kfac`` ``dimension_numbers=kfac_dimension_numbers(model,
        fold_biases=False)`` then.

    Returns:
      A function returning the loss on the true targets, the parameter gradients as
      an ``nnx.State`` (like ``nnx.grad``), and the K-FAC statistics: a nested dict
      keyed like the params with a :class:`layerwise_optax.KfacFactors` at each
      captured kernel and a :class:`layerwise_optax.FoldedBias` (or its own
      factors, or ``None`` for a bias that is not a function of the output
      features only) at its bias, a :class:`layerwise_optax.KfacDiagonal` at
      each norm layer's scale and shift, and ``KfacFactors`` with a
      ``(vocabulary,)`` diagonal ``a`` at each ``nnx.Embed`` table, ready for
      ``optimizer.update(model, grads, kfac_stats=stats)``.

    The model's non-parameter state after the pass (BatchNorm's running
    averages) is written back to ``model``, as ``nnx.value_and_grad`` does.

    Raises:
      ValueError: For an unknown loss or statistics mode, a mode the loss does not
        support, a model layer that cannot be captured (named by its path), or a
        model none of whose layers produced statistics.
      TypeError: If ``fold_biases`` is not a bool.

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

      Pass ``stats`` to :func:`layerwise_optax.kfac`'s update as
      ``kfac_stats=stats`` (the README has a whole training step).

    References:
      Martens and Grosse, `Optimizing Neural Networks with Kronecker-factored
      Approximate Curvature <https://arxiv.org/abs/1503.05671>`_, 2015.
      Grosse and Martens, `A Kronecker-factored Approximate Fisher Matrix for
      Convolution Layers <https://arxiv.org/abs/1602.01407>`_, 2016.
    """
    _checks.boolean("fold_biases", fold_biases)
    loss_name, loss_fn = _loss_for(loss, statistics)

    def fn(model, inputs, targets, key=None):
        if statistics == "fisher" and key is None:
            raise ValueError(
                "statistics='fisher' needs a PRNG key: f(model, inputs, targets, key=key)."
            )
        _, tuples, biases = _layer_paths(model)  # validates the model's layers up front
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        # Per layer, the map from its output to (rows, d_out): Python callables, so they
        # travel beside the traced values rather than through them.
        out_rows: dict[str, Callable] = {}
        kinds: dict[str, tuple] = {}  # non-kernel uses (norms, embeddings): what they record

        def forward(p, perturbations, recorder=None):
            # copy=True: fresh Variables of this trace, which a layer may update (BatchNorm).
            m = nnx.merge(graphdef, p, rest, copy=True)
            # nnx.merge builds new module objects: look their paths up on this copy.
            rec = recorder or _Recorder({}, perturbations)
            rec.paths = _layer_paths(m)[0]
            with _patched(rec):
                outputs = model_fn(m, inputs)
            out_rows.update(rec.out_rows)
            kinds.update(rec.kinds)
            # The non-parameter state after the pass (BatchNorm's running averages, RNG
            # counts) rides with the features to be written back to the model.
            return outputs, {**rec.inputs, _STATE: nnx.split(m, nnx.Param, ...)[2]}

        # Shapes of every layer output, so the perturbations can be zeros of that shape.
        shape_pass = _Recorder({}, None)
        jax.eval_shape(lambda p: forward(p, None, shape_pass)[0], params)
        zeros = {k: jnp.zeros(s.shape, s.dtype) for k, s in shape_pass.output_shapes.items()}
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
            value, grads, feats, deltas = _gauss_newton(forward, params, zeros, loss_fn, targets)
        nnx.update(model, feats.pop(_STATE))
        deltas.pop(_STATE, None)
        feats, deltas, rows, extra = _kernel_uses(feats, deltas, out_rows, kinds, n)
        stats = _stats_tree(feats, deltas, rows, n, tuples, biases, fold_biases)
        _merge_stats(stats, _extra_stats(extra, kinds, n, tuples))
        if not jax.tree.leaves(stats, is_leaf=lambda x: x is not None and not isinstance(x, dict)):
            raise ValueError(
                "kfac_value_and_grad: no layer of the model produced statistics (none of "
                "nnx.Linear, Conv, LinearGeneral, Einsum, Embed, LayerNorm, RMSNorm or "
                "BatchNorm was called by model_fn); K-FAC would precondition nothing."
            )
        return value, grads, stats

    return fn


def _loss_for(loss: Any, statistics: str) -> tuple[str | None, Callable]:
    """``(name or None, loss function)`` of ``kfac_value_and_grad``'s ``loss``, checked.

    Raises:
      ValueError: An unknown loss or statistics mode, or a mode the loss does not
        support (``'fisher'`` and ``'gauss_newton'`` need a built-in loss, and
        ``'gauss_newton'`` the squared error).
    """
    if statistics not in _MODES:
        raise ValueError(f"Unknown statistics {statistics!r}; expected one of {sorted(_MODES)}.")
    if isinstance(loss, str):
        if loss not in _LOSSES:
            raise ValueError(
                f"Unknown loss {loss!r}; expected one of {sorted(_LOSSES)} or a callable."
            )
        loss_name, loss_fn = loss, (mse if loss == "mse" else softmax_cross_entropy)
    elif callable(loss):
        if statistics != "empirical":
            raise ValueError(
                f"statistics={statistics!r} needs loss='mse' or 'softmax_cross_entropy'."
            )
        loss_name, loss_fn = None, loss
    else:
        raise ValueError(f"loss must be a name or a callable, got {loss!r}.")
    if statistics == "gauss_newton" and loss_name != "mse":
        raise ValueError("statistics='gauss_newton' is implemented for loss='mse' only.")
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


def _gauss_newton(forward, params, zeros, loss_fn, targets):
    """Exact Gauss-Newton statistics for the squared error: ``B = E[J^T J]``.

    One pullback per output unit ``k`` (vectorized) gives every layer's
    per-example Jacobian rows ``J_i^T e_k``. Returns ``(loss, grads, layer
    inputs, Jacobian rows (units, n, ...))``.
    """
    outputs, pullback, feats = jax.vjp(forward, params, zeros, has_aux=True)
    value, d_out = jax.value_and_grad(loss_fn)(outputs, targets)
    grads, _ = pullback(d_out)
    units = outputs.shape[-1]
    basis = jnp.broadcast_to(jnp.eye(units, dtype=outputs.dtype)[:, None], (units,) + outputs.shape)
    return value, grads, feats, jax.vmap(lambda ct: pullback(ct)[1])(basis)


# ----------------------------------------------------------- norms, embeddings, reused layers
#
# Normalization layers (``nnx.LayerNorm``, ``nnx.RMSNorm``, ``nnx.BatchNorm``) get the
# exact diagonal Fisher of their scale and shift (:class:`layerwise_optax.KfacDiagonal`):
# the wrapped call records the normalized input ``x̂`` (before scale and shift) and
# perturbs the output, so the per-example gradients ``Σ_t δ_t ⊙ x̂_t`` and ``Σ_t δ_t`` come
# from the same pass. ``nnx.Embed`` gets ``A = diag(counts) / n`` (the exact covariance
# of one-hot inputs, kept as a diagonal) and ``B = E[δ δ^T]``; ``Embed.attend`` (the
# table as the output head, ``x E^T``) is another use of the same table.
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
# summed over the uses before squaring.

_NORMS = (nnx.LayerNorm, nnx.RMSNorm, nnx.BatchNorm)
_STATE = "\x00state"  # key of the model's non-parameter state among a pass's features
_EXTRA = (nnx.Embed, *_NORMS)


def _use_key(recorded: dict, path: str) -> str:
    """``path`` for a layer's first use in a pass, ``path#k`` for its ``k``-th reuse."""
    if path not in recorded:
        return path
    k = 1
    while f"{path}#{k}" in recorded:
        k += 1
    return f"{path}#{k}"


def _layer_of(use: str) -> str:
    return use.split("#", 1)[0]


def _extra_originals() -> dict[tuple[type, str], Callable]:
    """The methods of the norm and embedding layers that the capture wraps."""
    out: dict[tuple[type, str], Callable] = {(cls, "__call__"): cls.__call__ for cls in _EXTRA}
    out[(nnx.Embed, "attend")] = nnx.Embed.attend
    return out


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
    from flax.nnx.nn import normalization as norm  # the layer's own statistics code

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


def _wrap_extra(recorder: _Recorder, name: str, original: Callable) -> Callable:
    """The recording version of a norm layer's or an embedding's ``name`` method."""

    def call(module, x, *args, **kwargs):
        path = recorder.paths.get(id(module))
        if path is None:
            return original(module, x, *args, **kwargs)
        if isinstance(module, _NORMS):
            feats = _normalized_input(module, x, path, args, kwargs)
            scale = getattr(module, "scale", None)
            bias = getattr(module, "bias", None)
            kind = (
                "norm",
                _feature_axes(module, x.ndim),
                None if scale is None else tuple(scale.shape),
                None if bias is None else tuple(bias.shape),
            )
        elif name == "attend":
            feats, kind = x, ("attend", module.num_embeddings)
        else:
            feats, kind = x, ("lookup", module.num_embeddings)
        out = original(module, x, *args, **kwargs)
        use = _use_key(recorder.inputs, path)
        recorder.inputs[use] = feats
        recorder.out_rows[use] = lambda o: o
        recorder.kinds[use] = kind
        recorder.output_shapes[use] = jax.ShapeDtypeStruct(out.shape, out.dtype)
        if recorder.perturbations is not None:
            out = out + recorder.perturbations[use].astype(out.dtype)
        return out

    return call


def _extra_spec(module: nnx.Module, kind: str, leaf: Any) -> Any:
    """``kfac_dimension_numbers``' entry for a leaf of a norm layer or an embedding.

    The table of ``nnx.Embed`` is a kernel ``(vocabulary, features)`` whose input
    factor is kept diagonal; the scale and shift of a norm layer have no factors
    (their statistics are :class:`layerwise_optax.KfacDiagonal`).
    """
    if isinstance(module, nnx.Embed) and kind == "embedding":
        return DiagonalFactors(DimensionNumbers(((0,), (1,))), (0,))
    if isinstance(module, _NORMS) and kind in ("scale", "bias"):
        return None
    return default_kernel_dimension_numbers(tuple(leaf.shape))


def _kernel_uses(feats: dict, deltas: dict, out_rows: dict, kinds: dict, n: int):
    """Kernel uses combined per layer (the reuse rule), and the other uses.

    A kernel layer used once keeps its entries; one used several times gets its
    uses' rows concatenated along the positions, ``(n, rows, d)`` features and
    ``(samples, n, rows, d_out)`` output gradients, with an identity row map.
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
        xs, ds = [], []
        for u in uses:
            x, d = feats[u], jax.vmap(out_rows[u])(deltas[u])
            xs.append(jnp.reshape(x, (n, -1, x.shape[-1])))
            ds.append(jnp.reshape(d, (d.shape[0], n, -1, d.shape[-1])))
        out_f[layer] = jnp.concatenate(xs, axis=1)
        out_d[layer] = jnp.concatenate(ds, axis=2)
        rows[layer] = lambda o: o
    return out_f, out_d, rows, extra


def _extra_stats(extra: dict, kinds: dict, n: int, tuples: dict) -> dict:
    """Statistics of the norm layers and embeddings, keyed like the params.

    ``extra[use] = (features, output gradients (samples, n, ...))``. A norm layer:
    :class:`layerwise_optax.KfacDiagonal` at its scale and bias, ``(1/n) Σ_i g_i²``
    with the per-example gradients summed over samples of the output gradient (one
    sample, or one per output unit for Gauss-Newton) and over the layer's uses. An
    embedding: :class:`layerwise_optax.KfacFactors` with ``a`` the diagonal
    ``(vocabulary,)`` and ``g`` the ``(features, features)`` factor, by the reuse rule.
    """
    hi = jax.lax.Precision.HIGHEST
    by_layer: dict[str, list[str]] = {}
    for u in extra:
        by_layer.setdefault(_layer_of(u), []).append(u)
    tree: dict = {}
    for layer, uses in by_layer.items():
        node = tree
        for key in tuples[layer]:
            node = node.setdefault(key, {})
        if kinds[uses[0]][0] == "norm":
            _, _, scale_shape, bias_shape = kinds[uses[0]]
            g_scale, g_bias = 0.0, 0.0
            for u in uses:
                xhat, delta = extra[u]
                axes = kinds[u][1]
                reduce = tuple(1 + a for a in range(1, xhat.ndim) if a not in axes)
                d32 = delta.astype(jnp.float32)
                x32 = xhat.astype(jnp.float32)[None]
                g_scale = g_scale + jnp.sum(d32 * x32, axis=reduce)  # (samples, n, *features)
                g_bias = g_bias + jnp.sum(d32, axis=reduce)
            if scale_shape is not None:
                f = jnp.sum(jnp.square(g_scale), axis=(0, 1)) / n
                node["scale"] = KfacDiagonal(jnp.reshape(f, scale_shape))
            if bias_shape is not None:
                f = jnp.sum(jnp.square(g_bias), axis=(0, 1)) / n
                node["bias"] = KfacDiagonal(jnp.reshape(f, bias_shape))
            continue
        vocab = kinds[uses[0]][1]
        a = jnp.zeros((vocab,), jnp.float32)
        g_sum, rows = jnp.zeros((), jnp.float32), 0
        for u in uses:
            x, delta = extra[u]
            d32 = delta.astype(jnp.float32)
            if kinds[u][0] == "lookup":
                # One-hot rows: the input side's second moment is the diagonal of counts.
                a = a + jnp.zeros((vocab,), jnp.float32).at[jnp.ravel(x)].add(1.0, mode="drop")
                v = jnp.reshape(d32, (-1, d32.shape[-1]))
                rows += x.size
            else:
                # attend: x E^T, so the logits' gradients are the table's input side.
                a = a + jnp.sum(jnp.reshape(jnp.square(d32), (-1, vocab)), axis=0)
                v = jnp.reshape(x.astype(jnp.float32), (-1, x.shape[-1]))
                rows += v.shape[0]
            g_sum = g_sum + jnp.matmul(v.T, v, precision=hi)
        node["embedding"] = KfacFactors(a / n, g_sum / rows)
    return tree


def _merge_stats(tree: dict, other: dict) -> None:
    """Adds the entries of ``other`` (nested dicts) into ``tree`` in place."""
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _merge_stats(tree[key], value)
        else:
            tree[key] = value
