"""K-FAC statistics capture for ``flax.linen`` models, in the same forward/backward pass.

The Linen twin of :func:`layerwise_optax.flax.kfac_value_and_grad`. While the
model is applied, :func:`flax.linen.intercept_methods` wraps the ``__call__`` of
every ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Conv`` so that it

* sows its input features (the rows of ``A``; conv patches ordered like the
  kernel, a ``DenseGeneral``'s contracted axes flattened in the kernel's order)
  into the ``'intermediates'`` collection, as ``kfac_inputs``, and
* adds a zero perturbation ``kfac_outputs`` (``Module.perturb``, collection
  ``'perturbations'``) to its output, whose gradient is ``dL/dz``.

Both are variables of the layer's own scope, so lifted transforms carry them:
under ``nn.scan`` (or ``nn.vmap``) with ``'intermediates'`` and
``'perturbations'`` in ``variable_axes`` beside ``'params'``, every layer slice
gets its own statistics, stacked on the kernel's leading layer axes, which
:func:`linen_kfac_dimension_numbers` makes batch axes of the kernel (one pair of
factors per slice). Statistics, modes and losses are those of the NNX capture.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from layerwise_optax import DimensionNumbers, FoldedBias, _checks, _optional
from layerwise_optax import default_kernel_dimension_numbers as _default_dims
from layerwise_optax.flax import _capture

if TYPE_CHECKING:  # the checker reads flax itself; at run time a missing extra is named
    import flax.linen as nn
else:
    nn = _optional.require("flax.linen", "layerwise_optax.flax")

_INPUTS, _OUTPUTS = "kfac_inputs", "kfac_outputs"
_CAPTURED = (nn.Dense, nn.DenseGeneral, nn.Conv)


class _LinenLayer(NamedTuple):
    """What the capture learned about one Linen layer while tracing it."""

    layout: _capture._Layout  # the kernel's own axes (no lifted layer axes)
    kernel_ndim: int  # the kernel's own rank
    out_ndim: int  # rank of one call's output (inside any lifted transform)
    rows: Callable[[jax.Array], jax.Array]  # output -> (..., d_out)


def _linen_features(module: Any, x: jax.Array, path: str):
    """``(features (..., d_in), output -> (..., d_out), layout, kernel rank)`` of a layer."""
    if isinstance(module, nn.DenseGeneral):
        if module.batch_dims:
            raise ValueError(
                f"layer {path}: DenseGeneral with batch_dims (per-slice kernels) cannot be "
                "captured."
            )
        axis = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
        n_out = 1 if isinstance(module.features, int) else len(module.features)
        feats, rows = _capture._general_features(x, axis, n_out)
        layout = _capture._Layout(
            tuple(range(len(axis))), tuple(range(len(axis), len(axis) + n_out)), True
        )
        return feats, rows, layout, len(axis) + n_out
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
        return feats, lambda out: out, _capture._Layout(tuple(range(nd + 1)), (nd + 1,), True), nd
    return x, lambda out: out, _capture._Layout((0,), (1,), True), 2


class _Interceptor:
    """Sows each captured layer's features and perturbs its output; notes its layout."""

    def __init__(self):
        self.layers: dict[str, _LinenLayer] = {}
        self.paths: dict[str, tuple[str, ...]] = {}

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, _CAPTURED):
            return next_fun(*args, **kwargs)
        out = next_fun(*args, **kwargs)
        assert module.scope is not None  # a module is bound while it is applied
        path = tuple(module.scope.path)
        key = "/".join(path)
        x = args[0] if args else kwargs["inputs"]
        feats, rows, layout, kernel_ndim = _linen_features(module, x, key)
        if isinstance(module, nn.Conv):
            kernel_ndim += 2
        self.layers[key] = _LinenLayer(layout, kernel_ndim, out.ndim, rows)
        self.paths[key] = path
        module.sow("intermediates", _INPUTS, feats)
        return module.perturb(_OUTPUTS, out)


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _trace(module: Any, params: Any, inputs: Any) -> tuple[_Interceptor, Any]:
    """The layers of one abstract forward pass and the shapes of their perturbations."""
    interceptor = _Interceptor()

    def run(p):
        with nn.intercept_methods(interceptor):
            return module.apply({"params": p}, inputs, mutable=["perturbations", "intermediates"])[
                1
            ]

    variables = jax.eval_shape(run, params)
    if not interceptor.layers:
        raise ValueError(
            f"{type(module).__name__} has no nn.Dense, nn.DenseGeneral or nn.Conv layer to "
            "capture: no K-FAC statistics would come out."
        )
    return interceptor, variables


def _stack_depth(interceptor: _Interceptor, variables: Any, params: Any) -> dict[str, int]:
    """Each layer's number of lifted (layer) axes, checked against its kernel's."""
    depth = {}
    for key, layer in interceptor.layers.items():
        path = interceptor.paths[key]
        try:
            pert = _get(variables["perturbations"], path)[_OUTPUTS]
            inputs = _get(variables["intermediates"], path)[_INPUTS]
        except KeyError:
            raise ValueError(
                f"layer {key}: its K-FAC variables did not come out of the forward pass; a "
                "layer under nn.scan / nn.vmap needs 'perturbations' and 'intermediates' in "
                "the transform's variable_axes beside 'params'."
            ) from None
        lifted = pert.ndim - layer.out_ndim
        try:
            kernel = _get(params, path)["kernel"]
        except (KeyError, TypeError):
            raise ValueError(f"layer {key}: no 'kernel' at this path of the params.") from None
        if kernel.ndim - layer.kernel_ndim != lifted:
            raise ValueError(
                f"layer {key}: it is applied under a lifted transform with {lifted} mapped "
                f"axes but its kernel {tuple(kernel.shape)} has "
                f"{kernel.ndim - layer.kernel_ndim}; a kernel reused across slices "
                "(variable_broadcast='params') cannot be captured."
            )
        if len(inputs) != 1:
            raise ValueError(
                f"layer {key} is called {len(inputs)} times per forward pass; K-FAC capture "
                "supports one call per layer (shared layers are not supported)."
            )
        depth[key] = lifted
    return depth


def linen_kfac_dimension_numbers(
    module: Any, params: Any, inputs: Any, *, fold_biases: bool = True
) -> Callable[[Any], Any]:
    """The kernel layouts of a Linen model's captured layers, for ``kfac(dimension_numbers=...)``.

    The Linen twin of :func:`layerwise_optax.flax.kfac_dimension_numbers`. A
    layer's kernel gets ``DimensionNumbers((input axes), (output axes))``
    (``nn.Dense`` and ``nn.Conv`` as kfac's default, ``nn.DenseGeneral`` with its
    several input and output axes), with the leading layer axes of a layer
    stacked by ``nn.scan`` / ``nn.vmap`` as ``batch_axes`` (one pair of factors per
    slice, which kfac's default layout cannot know). Paths are the params'
    (``'ScanBlock_0/Dense_0/kernel'``).

    Args:
      module: The ``flax.linen`` module.
      params: Its ``'params'`` collection (arrays or ``jax.ShapeDtypeStruct``).
      inputs: Example inputs (only their shapes are used: one abstract pass).
      fold_biases: ``True``: each captured bias is folded into its kernel
        (:class:`layerwise_optax.FoldedBias`); ``False``: its own block. Must match
        the capture's ``fold_biases``.

    Returns:
      A callable ``tree -> spec tree`` for ``kfac``'s ``dimension_numbers``.

    Raises:
      ValueError: For a layer that cannot be captured (named by its path), or a
        model with no captured layer.
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
    interceptor, variables = _trace(module, params, inputs)
    depth = _stack_depth(interceptor, variables, params)

    def spec(path, leaf):
        if _capture._is_masked(leaf):
            return None
        names = _capture._path_keys(path)
        layer, kind = "/".join(names[:-1]), names[-1] if names else ""
        info = interceptor.layers.get(layer)
        if info is None or kind not in ("kernel", "bias"):
            return _default_dims(leaf.shape)
        s = depth[layer]
        batch = tuple(range(s))
        if kind == "kernel":
            lay = info.layout
            shift = (tuple(s + a for a in lay.inputs), tuple(s + a for a in lay.outputs))
            return DimensionNumbers(shift, batch_axes=batch)
        if fold_biases:
            return FoldedBias("/".join((*names[:-1], "kernel")))
        return DimensionNumbers(((), tuple(range(s, leaf.ndim))), batch_axes=batch)

    return lambda tree: jax.tree_util.tree_map_with_path(spec, tree, is_leaf=_capture._is_masked)


def linen_kfac_value_and_grad(
    module: Any,
    loss: Literal["mse", "softmax_cross_entropy", "sigmoid_cross_entropy", "gaussian_nll"]
    | Callable[[jax.Array, Any], jax.Array] = "mse",
    *,
    statistics: Literal["empirical", "fisher", "gauss_newton"] = "empirical",
    fold_biases: bool = True,
) -> Callable[..., tuple[jax.Array, Any, dict]]:
    """Builds ``f(params, inputs, targets, key=None) -> (loss, grads, kfac_stats)`` for Linen.

    The ``flax.linen`` twin of :func:`layerwise_optax.flax.kfac_value_and_grad`:
    the same statistics (``A = (1/n) Σ_r x_r x_r^T`` over the layer's input rows,
    ``B = (1/(nT)) Σ_r δ_r δ_r^T`` with ``δ = n dL/dz``), losses and modes, from
    one forward and one backward pass, for ``nn.Dense``, ``nn.DenseGeneral`` and
    ``nn.Conv`` layers, also inside ``nn.scan`` / ``nn.vmap`` (list
    ``'perturbations'`` and ``'intermediates'`` in their ``variable_axes`` with
    ``'params'``; each slice gets its factors, stacked on the leading layer axes).
    Other layers' params get no statistics (``kfac``'s diagonal fallback).
    ``module.apply({'params': params, 'perturbations': ...}, inputs)`` is the
    forward pass: models with other collections (``batch_stats``) or more
    arguments are not covered.

    Args:
      module: The ``flax.linen`` module, applied as ``module.apply(variables, inputs)``.
      loss: As in :func:`layerwise_optax.flax.kfac_value_and_grad`.
      statistics: ``'empirical'``, ``'fisher'`` (needs ``key``) or ``'gauss_newton'``.
      fold_biases: Fold each bias into its kernel (homogeneous coordinates).

    Returns:
      A function returning the loss, the gradients of ``params`` (a tree like
      ``params``) and the statistics (a nested dict keyed like ``params``:
      :class:`layerwise_optax.KfacFactors` at each captured kernel, with
      ``(*layer_axes, d, d)`` factors for stacked layers, and
      :class:`layerwise_optax.FoldedBias` or the bias's own factors at its bias).
      Give ``kfac`` ``dimension_numbers=linen_kfac_dimension_numbers(...)`` for
      ``DenseGeneral`` or stacked layers.

    Raises:
      ValueError: For an unknown loss or mode, a mode the loss does not support, a
        layer that cannot be captured (named by its path), a model without
        captured layers, or ``statistics='fisher'`` without a ``key``.
      TypeError: If ``fold_biases`` is not a bool.

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

    References:
      Martens and Grosse, `Optimizing Neural Networks with Kronecker-factored
      Approximate Curvature <https://arxiv.org/abs/1503.05671>`_, 2015.
      Grosse and Martens, `A Kronecker-factored Approximate Fisher Matrix for
      Convolution Layers <https://arxiv.org/abs/1602.01407>`_, 2016.
    """
    _checks.boolean("fold_biases", fold_biases)
    loss_name, loss_fn = _capture._loss_for(loss, statistics)

    def fn(params, inputs, targets, key=None):
        if statistics == "fisher" and key is None:
            raise ValueError(
                "statistics='fisher' needs a PRNG key: f(params, inputs, targets, key=key)."
            )
        interceptor, variables = _trace(module, params, inputs)
        depth = _stack_depth(interceptor, variables, params)
        paths = interceptor.paths
        zeros = {
            k: jnp.zeros(s.shape, s.dtype)
            for k, s in ((k, _get(variables["perturbations"], paths[k])[_OUTPUTS]) for k in paths)
        }

        # The model's own perturbations (Module.perturb), if any, stay at zero.
        others = _to_dict(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables))
        others = others["perturbations"]

        def forward(p, perturbations):
            nested = jax.tree.map(lambda v: v, others)  # a fresh copy of the dicts
            for k, e in perturbations.items():
                node = nested
                for name in paths[k]:
                    node = node.setdefault(name, {})
                node[_OUTPUTS] = e
            with nn.intercept_methods(_Interceptor()):
                outputs, state = module.apply(
                    {"params": p, "perturbations": nested}, inputs, mutable=["intermediates"]
                )
            feats = {k: _get(state["intermediates"], paths[k])[_INPUTS][0] for k in paths}
            return outputs, feats

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
        stats: dict = {}
        for k, layer in interceptor.layers.items():
            _merge(
                stats,
                _layer_stats(
                    k, paths[k], layer, feats[k], deltas[k], depth[k], n, params, fold_biases
                ),
            )
        return value, grads, stats

    return fn


def _layer_stats(key, path, layer, x, delta, depth, n, params, fold):
    """One layer's statistics subtree, mapped over its ``depth`` leading layer axes."""
    has_bias = "bias" in _get(params, path)
    biases = {key: layer.layout.bias} if has_bias else {}

    def one(x, delta):
        return _capture._stats_tree(
            {key: x}, {key: delta}, {key: layer.rows}, n, {key: path}, biases, fold
        )

    for _ in range(depth):
        one = jax.vmap(one, in_axes=(0, 1))
    return one(x, delta)


def _to_dict(tree: Any) -> Any:
    """Nested plain dicts from a (possibly frozen) Flax variables tree."""
    if hasattr(tree, "items"):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def _merge(into: dict, tree: dict) -> None:
    for k, v in tree.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v
