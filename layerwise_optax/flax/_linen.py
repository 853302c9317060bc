"""K-FAC statistics capture for ``flax.linen`` models, in the same forward/backward pass.

The Linen twin of :func:`layerwise_optax.flax.kfac_value_and_grad`. While the
model is applied, :func:`flax.linen.intercept_methods` wraps the ``__call__`` of
every ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv``, ``nn.Einsum``,
``nn.LayerNorm`` and ``nn.RMSNorm`` and the ``__call__`` and ``attend`` of every
``nn.Embed`` so that each call

* sows what its block needs into the ``'intermediates'`` collection, as
  ``kfac_inputs``: a kernel layer's input features (the rows of ``A``; conv
  patches ordered like the kernel, a ``DenseGeneral``'s or ``Einsum``'s
  contracted axes flattened in the kernel's order, per-head slices apart), a
  norm layer's normalized input ``x̂``, an embedding's token ids or, for
  ``attend``, its queries, and
* adds a zero perturbation ``kfac_outputs`` (``Module.perturb``, collection
  ``'perturbations'``) to its output, whose gradient is ``dL/dz``.

Both are variables of the layer's own scope, so lifted transforms carry them:
under ``nn.scan`` (or ``nn.vmap``) with ``'intermediates'`` and
``'perturbations'`` in ``variable_axes`` beside ``'params'``, every layer slice
gets its own statistics, stacked on the kernel's leading layer axes, which
:func:`linen_kfac_dimension_numbers` makes batch axes of the kernel (one pair of
factors per slice). A layer's ``k``-th call in a pass is its use ``k``, with its
own perturbation ``kfac_outputs_k``: a layer called several times, or a table
used by ``Embed.attend`` as the tied output head, gets one block by the NNX
capture's reuse rule. Statistics, blocks (:class:`layerwise_optax.KfacDiagonal`
for norms, a diagonal input factor for embeddings, one block per head for an
einsum axis shared by input and output), modes and losses are those of the NNX
capture, from the same code. ``nn.MultiHeadDotProductAttention`` is captured
through its ``DenseGeneral`` projections.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from layerwise_optax import DiagonalFactors, DimensionNumbers, FoldedBias, _checks, _optional
from layerwise_optax import default_kernel_dimension_numbers as _default_dims
from layerwise_optax.flax import _capture

if TYPE_CHECKING:  # the checker reads flax itself; at run time a missing extra is named
    import flax.linen as nn
else:
    nn = _optional.require("flax.linen", "layerwise_optax.flax")

_INPUTS, _OUTPUTS = "kfac_inputs", "kfac_outputs"
_CAPTURED = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum)
_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.BatchNorm)
_EXTRA = (nn.Embed, *_NORMS)  # own blocks: KfacDiagonal, or a diagonal input factor
_NAMES = (
    "nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum, nn.Embed, nn.LayerNorm, nn.RMSNorm "
    "or nn.BatchNorm"
)


class _LinenLayer(NamedTuple):
    """What the capture learned about one use (call) of a Linen layer while tracing it."""

    layout: _capture._Layout | None  # a kernel's own axes (no lifted layer axes); None: extra
    param: str  # the leaf whose leading axes beyond ``param_ndim`` are lifted layer axes
    param_ndim: int  # that leaf's own rank
    out_ndim: int  # rank of one call's output (inside any lifted transform)
    rows: Callable[[jax.Array], jax.Array]  # output -> (..., d_out)
    kind: tuple | None  # a norm's or an embedding's record (``_capture._extra_stats``)
    params: tuple[str, ...]  # the layer's parameter leaves


def _linen_features(module: Any, x: jax.Array, path: str, args: tuple, kwargs: dict):
    """``(features (..., d_in), output -> (..., d_out), layout)`` of a kernel layer."""
    if isinstance(module, nn.Einsum):
        spec = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None)
        spec = spec or module.einsum_str
        assert spec is not None  # Linen's Einsum refuses a call without one
        _, rhs, out, contracted, produced, shared = _capture._einsum_parts(spec, path)
        # Linen's Einsum bias has the kernel's output axes in the output's order: it
        # folds when that order is (slices, produced) in the kernel's order.
        bias_ok = "".join(c for c in out if c in rhs) == shared + produced
        layout = _capture._Layout(
            tuple(rhs.index(c) for c in contracted),
            tuple(rhs.index(c) for c in produced),
            bias_ok,
            tuple(rhs.index(c) for c in shared),
        )
        feats, rows = _capture._einsum_features(x, spec, path)
        return feats, rows, layout
    if isinstance(module, nn.DenseGeneral):
        axis = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
        n_out = 1 if isinstance(module.features, int) else len(module.features)
        nb = len((module.batch_dims,) if isinstance(module.batch_dims, int) else module.batch_dims)
        layout = _capture._Layout(
            tuple(range(nb, nb + len(axis))),
            tuple(range(nb + len(axis), nb + len(axis) + n_out)),
            True,
            tuple(range(nb)),
        )
        if nb:
            # Kernel (*batch, *in, *out), bias (*batch, *out): one layer per slice.
            feats, rows = _capture._sliced_general_features(x, tuple(range(nb)), axis, n_out)
        else:
            feats, rows = _capture._general_features(x, axis, n_out)
        return feats, rows, layout
    if isinstance(module, nn.Conv):
        size = module.kernel_size
        kernel_size = (size,) if isinstance(size, int) else tuple(size)
        nd = len(kernel_size)
        if module.feature_group_count != 1:
            raise ValueError(f"layer {path}: grouped convolutions are not supported.")
        if x.ndim != nd + 2:
            raise ValueError(
                f"layer {path}: a convolution is captured on inputs with one batch axis "
                f"(n, *spatial, c_in); got shape {tuple(x.shape)}."
            )
        feats = _capture._patches(
            x,
            kernel_size,
            module.strides,
            module.padding,
            module.input_dilation,
            module.kernel_dilation,
        )
        return feats, _capture._identity, _capture._Layout(tuple(range(nd + 1)), (nd + 1,), True)
    return x, _capture._identity, _capture._Layout((0,), (1,), True)


def _canonical_axes(axes: Any, ndim: int) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(sorted(a % ndim for a in axes))


def _feature_axes(module: Any, ndim: int) -> tuple[int, ...]:
    """A Linen norm layer's feature axes (``BatchNorm``'s ``axis``), canonical."""
    axes = module.axis if isinstance(module, nn.BatchNorm) else module.feature_axes
    return _canonical_axes(axes, ndim)


def _normalized_input(module: Any, x: jax.Array, path: str, args: tuple, kwargs: dict) -> jax.Array:
    """``x̂``: a Linen norm layer's input normalized as the layer does, before scale and shift.

    ``nn.BatchNorm`` normalizes by the batch's statistics in training mode and by
    its running averages with ``use_running_average`` (the call's argument, else
    the attribute), as the layer itself does.
    """
    # The layer's own statistics code (through _optional, like every flax import).
    norm = _optional.require("flax.linen.normalization", "layerwise_optax.flax")

    if module.axis_name is not None:
        raise ValueError(
            f"layer {path}: a norm layer with axis_name (statistics over devices) cannot "
            "be captured: its per-example gradients need the whole batch on one device."
        )
    feature_axes = _feature_axes(module, x.ndim)
    if 0 in feature_axes:
        raise ValueError(
            f"layer {path}: its features include axis 0, the examples axis, so its scale "
            "and shift have no per-example gradients."
        )
    mask = kwargs.get("mask")
    if isinstance(module, nn.BatchNorm):
        reduction = tuple(a for a in range(x.ndim) if a not in feature_axes)
        running = args[1] if len(args) > 1 else kwargs.get("use_running_average")
        running = nn.merge_param("use_running_average", module.use_running_average, running)
        if running:
            # Read after the call, which leaves the averages unchanged in this mode.
            mean = module.get_variable("batch_stats", "mean")
            var = module.get_variable("batch_stats", "var")
            shape = [1] * x.ndim
            for a in feature_axes:
                shape[a] = x.shape[a]
            mean, var = mean.reshape(shape), var.reshape(shape)
        else:
            mean, var = norm._compute_stats(
                x,
                reduction,
                module.dtype,
                None,
                module.axis_index_groups,
                use_fast_variance=module.use_fast_variance,
                mask=mask,
                force_float32_reductions=module.force_float32_reductions,
            )
            mean, var = jnp.expand_dims(mean, reduction), jnp.expand_dims(var, reduction)
    else:
        mean, var = norm._compute_stats(
            x,
            module.reduction_axes,
            module.dtype,
            None,
            module.axis_index_groups,
            use_mean=not isinstance(module, nn.RMSNorm),
            use_fast_variance=module.use_fast_variance,
            mask=mask,
            force_float32_reductions=module.force_float32_reductions,
        )
        reduction = _canonical_axes(module.reduction_axes, x.ndim)
        mean, var = jnp.expand_dims(mean, reduction), jnp.expand_dims(var, reduction)
    xhat = (x.astype(var.dtype) - mean) * jax.lax.rsqrt(var + module.epsilon)
    return jax.lax.stop_gradient(xhat)


def _extra_params(module: Any) -> tuple[str, ...]:
    """The parameter leaves of a Linen norm layer or embedding that get statistics."""
    if isinstance(module, nn.Embed):
        return ("embedding",)
    if isinstance(module, nn.RMSNorm):
        return ("scale",) if module.use_scale else ()
    return tuple(n for n, on in (("scale", module.use_scale), ("bias", module.use_bias)) if on)


def _use_names(k: int) -> str:
    """The perturbation variable of a layer's use ``k`` (its features are sown, in order)."""
    return _OUTPUTS if k == 0 else f"{_OUTPUTS}_{k}"


class _Interceptor:
    """Sows each captured layer's features and perturbs its output; notes each use.

    A layer's ``k``-th call in a pass (``k`` counted by the features it has sown) is
    its use ``k``, with its own perturbation variable (:func:`_use_names`): a layer
    called twice, or a table used by ``Embed.attend`` as the output head, gets the
    reuse rule of :mod:`layerwise_optax.flax._capture`.
    """

    def __init__(
        self,
        examples: int | None = None,
        skip: Callable[[str, Any], bool] | None = None,
    ):
        self.examples = examples  # n: checks that no nn.vmap maps the examples away
        self.skip = skip  # (path, layer) -> bool: left to the diagonal Fisher
        self.uses: dict[str, _LinenLayer] = {}
        self.paths: dict[str, tuple[str, ...]] = {}
        # Layers left to the diagonal Fisher on purpose: key -> (path, param leaves).
        self.diagonal: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        name = context.method_name
        if isinstance(module, nn.Embed):
            captured = name in ("__call__", "attend")
        else:
            captured = name == "__call__" and isinstance(module, _CAPTURED + _NORMS)
        if not captured or (isinstance(module, _NORMS) and not _extra_params(module)):
            return next_fun(*args, **kwargs)
        out = next_fun(*args, **kwargs)
        assert module.scope is not None  # a module is bound while it is applied
        path = tuple(module.scope.path)
        key = "/".join(path)
        if self.skip is not None and self.skip(key, module):
            if isinstance(module, _EXTRA):
                names = _extra_params(module)
            else:
                names = ("kernel", "bias") if module.has_variable("params", "bias") else ("kernel",)
            self.diagonal[key] = (path, names)
            return out
        x = args[0] if args else next(iter(kwargs.values()))
        if self.examples is not None:
            _capture._check_examples_not_mapped(key, x, self.examples)
        if isinstance(module, _EXTRA):
            params = _extra_params(module)
            leaf = module.get_variable("params", params[0])
            if isinstance(module, nn.Embed):
                kind = ("attend" if name == "attend" else "lookup", module.num_embeddings)
                feats = jax.lax.stop_gradient(x) if name == "attend" else x
            else:
                scale = module.get_variable("params", "scale") if "scale" in params else None
                bias = module.get_variable("params", "bias") if "bias" in params else None
                kind = (
                    "norm",
                    _feature_axes(module, x.ndim),
                    None if scale is None else tuple(scale.shape),
                    None if bias is None else tuple(bias.shape),
                )
                feats = _normalized_input(module, x, key, args, kwargs)
            info = _LinenLayer(
                None, params[0], leaf.ndim, out.ndim, _capture._identity, kind, params
            )
        else:
            feats, rows, layout = _linen_features(module, x, key, args, kwargs)
            has_bias = module.has_variable("params", "bias")
            kernel = module.get_variable("params", "kernel")
            info = _LinenLayer(
                layout,
                "kernel",
                kernel.ndim,
                out.ndim,
                rows,
                None,
                ("kernel", "bias") if has_bias else ("kernel",),
            )
        sown = module.get_variable("intermediates", _INPUTS) or ()
        k = len(sown)
        self.uses[_capture._use_key(key, k)] = info
        self.paths[key] = path
        module.sow("intermediates", _INPUTS, feats)
        return module.perturb(_use_names(k), out)


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


class _Apply(NamedTuple):
    """How the model is applied: ``module.apply(variables, inputs, rngs=..., method=..., **kwargs)``."""

    variables: Any  # the collections besides 'params' ({'batch_stats': ...}), or None
    rngs: Any  # PRNG keys by stream name ({'dropout': key}), or None
    method: Any  # the module method applied, or None (__call__)
    kwargs: dict  # further keyword arguments of the call (train=True, ...)

    def __call__(self, module, params, extra, inputs, mutable):
        variables = {**_to_dict(self.variables or {}), **extra, "params": params}
        return module.apply(
            variables, inputs, rngs=self.rngs, method=self.method, mutable=mutable, **self.kwargs
        )


def _trace(
    module: Any,
    params: Any,
    inputs: Any,
    apply: _Apply,
    skip: Callable[[str, Any], bool] | None = None,
    diagonal: Any = (),
) -> tuple[_Interceptor, Any]:
    """The layers of one abstract forward pass and the shapes of their perturbations.

    Raises:
      ValueError: A model without captured layers, or a ``diagonal`` path (a
        sequence) that names no layer of a captured type seen in the pass.
    """
    interceptor = _Interceptor(jax.tree.leaves(inputs)[0].shape[0], skip)

    def run(p):
        with nn.intercept_methods(interceptor):
            return apply(module, p, {}, inputs, True)[1]

    variables = jax.eval_shape(run, params)
    if not callable(diagonal):
        seen = sorted({_capture._layer_of(u) for u in interceptor.uses} | set(interceptor.diagonal))
        for name in diagonal:
            if name.strip("/") not in seen:
                raise ValueError(
                    f"diagonal names {name!r}, which is not a captured layer of the model "
                    f"({_NAMES} called in the forward pass); its captured layers are {seen}."
                )
    if not interceptor.uses and not interceptor.diagonal:
        raise ValueError(
            f"{type(module).__name__} has no {_NAMES} layer to capture: no K-FAC statistics "
            "would come out."
        )
    return interceptor, variables


def _stacks(interceptor: _Interceptor, variables: Any, params: Any) -> dict[str, tuple[int, ...]]:
    """Each layer's lifted (layer) axes, the leading axes of its parameters, checked."""
    stacks: dict[str, tuple[int, ...]] = {}
    for use, info in interceptor.uses.items():
        key = _capture._layer_of(use)
        path = interceptor.paths[key]
        k = 0 if use == key else int(use.rsplit("#", 1)[1])
        try:
            pert = _get(variables["perturbations"], path)[_use_names(k)]
            _get(variables["intermediates"], path)[_INPUTS]
        except KeyError:
            raise ValueError(
                f"layer {key}: its K-FAC variables did not come out of the forward pass; a "
                "layer under nn.scan / nn.vmap needs 'perturbations' and 'intermediates' in "
                "the transform's variable_axes beside 'params'."
            ) from None
        lifted = pert.ndim - info.out_ndim
        try:
            leaf = _get(params, path)[info.param]
        except (KeyError, TypeError):
            raise ValueError(
                f"layer {key}: no {info.param!r} at this path of the params."
            ) from None
        if leaf.ndim - info.param_ndim != lifted:
            raise ValueError(
                f"layer {key}: it is applied under a lifted transform with {lifted} mapped "
                f"axes but its {info.param} {tuple(leaf.shape)} has "
                f"{leaf.ndim - info.param_ndim}; a kernel reused across slices "
                "(variable_broadcast='params') cannot be captured."
            )
        stacks[key] = tuple(leaf.shape[:lifted])
    return stacks


def linen_kfac_dimension_numbers(
    module: Any,
    params: Any,
    inputs: Any,
    *,
    fold_biases: bool = True,
    diagonal: Any = (),
    method: Any = None,
    variables: Any = None,
    rngs: Any = None,
    **kwargs: Any,
) -> Callable[[Any], Any]:
    """The kernel layouts of a Linen model's captured layers, for ``kfac(dimension_numbers=...)``.

    The Linen twin of :func:`layerwise_optax.flax.kfac_dimension_numbers`. A
    layer's kernel gets ``DimensionNumbers((input axes), (output axes))``
    (``nn.Dense`` and ``nn.Conv`` as kfac's default, ``nn.DenseGeneral`` and
    ``nn.Einsum`` with their several input and output axes), with the leading
    layer axes of a layer stacked by ``nn.scan`` / ``nn.vmap`` as ``batch_axes``
    (one pair of factors per slice, which kfac's default layout cannot know), then
    its per-slice axes (``DenseGeneral``'s ``batch_dims``, an einsum axis shared
    by input and output). An ``nn.Embed`` table gets a
    :class:`layerwise_optax.DiagonalFactors` (its input factor, the token counts,
    kept diagonal), a norm layer's scale and bias ``None`` (their statistics are
    :class:`layerwise_optax.KfacDiagonal`). Paths are the params'
    (``'ScanBlock_0/Dense_0/kernel'``).

    Args:
      module: The ``flax.linen`` module.
      params: Its ``'params'`` collection (arrays or ``jax.ShapeDtypeStruct``).
      inputs: Example inputs (only their shapes are used: one abstract pass).
      fold_biases: ``True``: each captured bias is folded into its kernel
        (:class:`layerwise_optax.FoldedBias`); ``False``: its own block. Must match
        the capture's ``fold_biases``.
      diagonal: Layers left to the diagonal Fisher, as given to
        :func:`linen_kfac_value_and_grad`: their params get ``None`` (no factors).
      method: The module method the pass applies (as ``module.apply``'s).
      variables: The model's collections besides ``'params'`` (``{'batch_stats': ...}``).
      rngs: PRNG keys by stream (``{'dropout': key}``), for models that draw them.
      **kwargs: Further keyword arguments of the model's call (``train=True``).

    Returns:
      A callable ``tree -> spec tree`` for ``kfac``'s ``dimension_numbers``.

    Raises:
      ValueError: For a layer that cannot be captured (named by its path), a
        ``diagonal`` path that names no captured layer, or a model with no
        captured layer.
      TypeError: If ``fold_biases`` is not a bool.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> from layerwise_optax import flax as lof
      >>> model = nn.DenseGeneral((2, 3))
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))['params']
      >>> specs = lof.linen_kfac_dimension_numbers(model, params, jnp.ones((1, 4)))(params)
      >>> specs['kernel'].factor_axes, specs['bias']
      (((0,), (1, 2)), FoldedBias(kernel='kernel'))

    References:
      Martens and Grosse, `Optimizing Neural Networks with Kronecker-factored
      Approximate Curvature <https://arxiv.org/abs/1503.05671>`_, 2015.
    """
    _checks.boolean("fold_biases", fold_biases)
    skip = _capture._diagonal_rule(diagonal)
    apply = _Apply(variables, rngs, method, kwargs)
    interceptor, traced = _trace(module, params, inputs, apply, skip, diagonal)
    stacks = _stacks(interceptor, traced, params)
    layers = {_capture._layer_of(u): info for u, info in interceptor.uses.items()}

    def spec(path, leaf):
        if _capture._is_masked(leaf):
            return None
        names = _capture._path_keys(path)
        layer, kind = "/".join(names[:-1]), names[-1] if names else ""
        if layer in interceptor.diagonal and kind in interceptor.diagonal[layer][1]:
            return None  # the diagonal Fisher, on purpose: no factors
        info = layers.get(layer)
        if info is None or kind not in info.params:
            return _default_dims(leaf.shape)
        s = len(stacks[layer])
        stacked = tuple(range(s))
        if info.kind is not None and info.kind[0] == "norm":
            return None  # KfacDiagonal statistics: no factors
        if info.kind is not None:  # an embedding table: the token counts kept diagonal
            return DiagonalFactors(DimensionNumbers(((s,), (s + 1,)), stacked), (0,))
        lay = info.layout
        assert lay is not None  # a kernel layer
        if kind == "kernel":
            groups = (tuple(s + a for a in lay.inputs), tuple(s + a for a in lay.outputs))
            return DimensionNumbers(groups, stacked + tuple(s + a for a in lay.batch))
        if fold_biases and lay.bias:
            return FoldedBias("/".join((*names[:-1], "kernel")))
        # A per-slice bias (*stack, *slices, *outputs) keeps the kernel's layer and
        # slice axes as batch axes; another bias only the layer axes.
        nb = s + (len(lay.batch) if lay.bias else 0)
        return DimensionNumbers(((), tuple(range(nb, leaf.ndim))), tuple(range(nb)))

    return lambda tree: jax.tree_util.tree_map_with_path(spec, tree, is_leaf=_capture._is_masked)


def linen_kfac_value_and_grad(
    module: Any,
    loss: Literal["mse", "softmax_cross_entropy", "sigmoid_cross_entropy", "gaussian_nll"]
    | Callable[[jax.Array, Any], jax.Array] = "mse",
    *,
    statistics: Literal["empirical", "fisher", "gauss_newton"] = "empirical",
    fold_biases: bool = True,
    sequence_statistics: Literal["expand", "reduce"] = "expand",
    statistics_batch_size: int | None = None,
    diagonal: Any = (),
    method: Any = None,
    mutable: Sequence[str] = (),
) -> Callable[..., tuple]:
    """Builds ``f(params, inputs, targets, key=None) -> (loss, grads, kfac_stats)`` for Linen.

    The ``flax.linen`` twin of :func:`layerwise_optax.flax.kfac_value_and_grad`:
    the same statistics (``A = (1/n) Σ_r x_r x_r^T`` over the layer's input rows,
    ``B = (1/(nT)) Σ_r δ_r δ_r^T`` with ``δ = n dL/dz``), losses and modes, from
    one forward and one backward pass, for ``nn.Dense``, ``nn.DenseGeneral``
    (also with ``batch_dims``: one block per slice), ``nn.Conv`` and ``nn.Einsum``
    (an axis shared by input and output: one block per head) kernels,
    :class:`layerwise_optax.KfacDiagonal` blocks (the exact diagonal Fisher) for
    ``nn.LayerNorm``, ``nn.RMSNorm`` and ``nn.BatchNorm`` scale and bias (batch
    statistics in training mode, the running averages with
    ``use_running_average``), and ``nn.Embed`` tables
    with a ``(vocabulary,)`` diagonal input factor, also inside ``nn.scan`` /
    ``nn.vmap`` (list ``'perturbations'`` and ``'intermediates'`` in their
    ``variable_axes`` with ``'params'``; each slice gets its factors, stacked on
    the leading layer axes). A layer called several times, or a table also used
    by ``Embed.attend`` (a tied output head), gets its uses combined by the reuse
    rule of the NNX capture. Params of other modules get no statistics
    (``kfac``'s diagonal fallback); ``diagonal`` leaves layers of the captured
    types to it on purpose (their entries are ``None``).

    The forward pass is ``module.apply({'params': params, **variables}, inputs,
    rngs=rngs, method=method, mutable=[...], **kwargs)`` with the arguments of
    ``f(params, inputs, targets, key=None, *, variables=None, rngs=None, **kwargs)``:
    ``variables`` the model's other collections (``{'batch_stats': ...}``),
    ``rngs`` its PRNG streams (``{'dropout': key}``; every pass of one call
    draws the same masks), ``kwargs`` its call's keyword arguments
    (``train=True``). With ``mutable`` (``['batch_stats']``), ``f`` also returns
    those collections as the pass updated them.

    Args:
      module: The ``flax.linen`` module, applied as ``module.apply(variables, inputs)``.
      loss: As in :func:`layerwise_optax.flax.kfac_value_and_grad`.
      statistics: ``'empirical'``, ``'fisher'`` (needs ``key``) or ``'gauss_newton'``.
      fold_biases: Fold each bias into its kernel (homogeneous coordinates).
      sequence_statistics: ``'expand'`` or ``'reduce'`` (K-FAC-expand or
        K-FAC-reduce for layers applied over positions), as in
        :func:`layerwise_optax.flax.kfac_value_and_grad`.
      statistics_batch_size: ``m`` in ``1..n``: the statistics from the first
        ``m`` examples of the batch, the loss and gradients from all ``n``, in
        the same pass. ``None``: the whole batch.
      diagonal: Layers (of the captured types) left to ``kfac``'s diagonal Fisher
        on purpose: a list of paths (``'Block_0/Dense_1'``, as in the params) or
        a callable ``(path, module) -> bool``.
      method: The module method to apply (a name or function, as
        ``module.apply``'s); ``None``: ``__call__``.
      mutable: Collections the pass updates (``['batch_stats']`` for
        ``nn.BatchNorm`` in training mode); then ``f`` returns them too.

    Returns:
      A function returning the loss, the gradients of ``params`` (a tree like
      ``params``), the statistics (a nested dict keyed like ``params``:
      :class:`layerwise_optax.KfacFactors` at each captured kernel, with
      ``(*layer_axes, d, d)`` factors for stacked layers, and
      :class:`layerwise_optax.FoldedBias` or the bias's own factors at its bias,
      :class:`layerwise_optax.KfacDiagonal` at a norm layer's scale and bias,
      ``KfacFactors`` with a ``(vocabulary,)`` diagonal ``a`` at an embedding
      table, ``None`` at the ``diagonal`` layers' params) and, with ``mutable``,
      the updated collections (a dict by collection name). Give ``kfac``
      ``dimension_numbers=linen_kfac_dimension_numbers(...)`` for
      ``DenseGeneral``, ``Einsum``, ``Embed``, norm or stacked layers.

    Raises:
      ValueError: For an unknown loss, mode or ``sequence_statistics``, a mode the
        loss does not support, a ``diagonal`` that is neither paths nor a
        callable; from ``f``: a layer that cannot be captured (named by its
        path), a ``diagonal`` path that names no captured layer,
        ``statistics_batch_size`` larger than the batch, a model without captured
        layers, or ``statistics='fisher'`` without a ``key``.
      TypeError: If ``fold_biases`` is not a bool, ``statistics_batch_size`` not
        an int, or ``mutable`` not a sequence of collection names.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> from layerwise_optax import flax as lof
      >>> model = nn.Dense(2)
      >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> params = model.init(jax.random.key(0), x)['params']
      >>> loss, grads, stats = lof.linen_kfac_value_and_grad(model, 'mse')(
      ...     params, x, jnp.zeros((2, 2)))
      >>> stats['kernel'].a.tolist()
      [[0.5, 0.0, 0.5], [0.0, 2.0, 1.0], [0.5, 1.0, 1.0]]

      A table used as the input embedding and as the tied output head
      (``attend``) gets one block with a diagonal input factor, a LayerNorm the
      diagonal Fisher of its scale and bias:

      >>> class Tied(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, ids):
      ...         emb = nn.Embed(5, 3, name='embed')
      ...         return emb.attend(nn.LayerNorm(name='ln')(emb(ids)))
      >>> ids = jnp.array([[0, 1], [1, 4]])
      >>> params = Tied().init(jax.random.key(0), ids)['params']
      >>> f = lof.linen_kfac_value_and_grad(Tied(), 'softmax_cross_entropy')
      >>> stats = f(params, ids, ids)[2]
      >>> stats['embed']['embedding'].a.shape, stats['embed']['embedding'].g.shape
      ((5,), (3, 3))
      >>> type(stats['ln']['scale']).__name__, stats['ln']['scale'].fisher.shape
      ('KfacDiagonal', (3,))

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
    if sequence_statistics not in _capture._SEQUENCE:
        raise ValueError(
            f"sequence_statistics must be one of {list(_capture._SEQUENCE)}, "
            f"got {sequence_statistics!r}."
        )
    _checks.positive_int("statistics_batch_size", statistics_batch_size, allow_none=True)
    if isinstance(mutable, str) or not all(isinstance(c, str) for c in mutable):
        raise TypeError(
            f"mutable must be a sequence of collection names like ['batch_stats'], got {mutable!r}."
        )
    mutable = tuple(mutable)
    if {"params", "perturbations", "intermediates"} & set(mutable):
        raise ValueError(
            f"mutable={list(mutable)}: 'params', 'perturbations' and 'intermediates' are the "
            "capture's own collections; name the model's others (['batch_stats'])."
        )
    loss_name, loss_fn = _capture._loss_for(loss, statistics)
    skip = _capture._diagonal_rule(diagonal)

    def fn(params, inputs, targets, key=None, *, variables=None, rngs=None, **kwargs):
        if statistics == "fisher" and key is None:
            raise ValueError(
                "statistics='fisher' needs a PRNG key: f(params, inputs, targets, key=key)."
            )
        apply = _Apply(variables, rngs, method, kwargs)
        interceptor, traced = _trace(module, params, inputs, apply, skip, diagonal)
        stacks = _stacks(interceptor, traced, params)
        paths = interceptor.paths
        uses = interceptor.uses

        def pert_of(use):
            layer = _capture._layer_of(use)
            k = 0 if use == layer else int(use.rsplit("#", 1)[1])
            return _get(traced["perturbations"], paths[layer])[_use_names(k)]

        zeros = {u: jnp.zeros(pert_of(u).shape, pert_of(u).dtype) for u in uses}

        # The model's own perturbations (Module.perturb), if any, stay at zero.
        others = _to_dict(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), traced))
        others = others["perturbations"]

        def forward(p, perturbations):
            nested = jax.tree.map(lambda v: v, others)  # a fresh copy of the dicts
            for u, e in perturbations.items():
                layer = _capture._layer_of(u)
                k = 0 if u == layer else int(u.rsplit("#", 1)[1])
                node = nested
                for name in paths[layer]:
                    node = node.setdefault(name, {})
                node[_use_names(k)] = e
            with nn.intercept_methods(_Interceptor(skip=skip)):
                outputs, state = apply(
                    module, p, {"perturbations": nested}, inputs, ["intermediates", *mutable]
                )
            feats = {}
            for u in perturbations:
                layer = _capture._layer_of(u)
                k = 0 if u == layer else int(u.rsplit("#", 1)[1])
                feats[u] = _get(state["intermediates"], paths[layer])[_INPUTS][k]
            # The updated collections ride with the features, out of the pass.
            return outputs, {**feats, _capture._STATE: {c: state.get(c, {}) for c in mutable}}

        n = jax.tree.leaves(inputs)[0].shape[0]
        if statistics == "empirical":
            value, grads, feats, deltas = _capture._empirical(
                forward, params, zeros, loss_fn, targets, n
            )
        elif statistics == "fisher":
            assert loss_name is not None and key is not None  # checked above
            sample = functools.partial(_capture._sample_labels, loss_name, key=key)
            value, grads, feats, deltas = _capture._fisher(
                forward, params, zeros, loss_fn, targets, sample, n
            )
        else:
            assert loss_name is not None  # checked by _loss_for
            value, grads, feats, deltas = _capture._gauss_newton(
                forward, params, zeros, loss_fn, targets, loss_name
            )
        updated = feats.pop(_capture._STATE)
        # The NNX capture's pipeline from here: the reuse rule, then the blocks.
        out_rows = {u: info.rows for u, info in uses.items()}
        kinds = {u: info.kind for u, info in uses.items() if info.kind is not None}
        heads, biases = {}, {}
        for u, info in uses.items():
            layer = _capture._layer_of(u)
            if info.layout is not None:
                heads[layer] = len(info.layout.batch)
                if "bias" in info.params:
                    biases[layer] = info.layout.bias
        stats = _capture._blocks(
            feats,
            deltas,
            n,
            out_rows=out_rows,
            kinds=kinds,
            heads=heads,
            stacks=stacks,
            tuples=dict(paths),
            biases=biases,
            fold_biases=fold_biases,
            reduce=sequence_statistics == "reduce",
            statistics_batch_size=statistics_batch_size,
            diagonal_layers=interceptor.diagonal.values(),
        )
        if mutable:
            return value, grads, stats, updated
        return value, grads, stats

    return fn


def _to_dict(tree: Any) -> Any:
    """Nested plain dicts from a (possibly frozen) Flax variables tree."""
    if hasattr(tree, "items"):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree
