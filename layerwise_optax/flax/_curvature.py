"""The exact curvature of a Flax NNX model, for :func:`layerwise_optax.kfac_adaptive`.

:func:`kfac_curvature` turns a model, a batch and one of the capture's losses into
a :class:`layerwise_optax.KfacCurvature`: the model's outputs as a function of its
``nnx.Param`` state (merged back with the rest of the model's state, which stays
fixed), and the loss on them. Built-in losses use the output-space matrix the
capture's ``statistics='gauss_newton'`` uses: their Hessian for the squared error
and the two cross-entropies (canonical links, so Gauss-Newton equals Fisher), the
Fisher ``diag(e^{-s}, 1/2)`` for the Gaussian NLL's ``(mean, log-variance)``
outputs; a callable loss gets its own Hessian (the generalized Gauss-Newton
matrix, positive semi-definite when the loss is convex in the outputs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import jax
import jax.numpy as jnp

import layerwise_optax
from layerwise_optax import _optional
from layerwise_optax.flax import _capture

if TYPE_CHECKING:  # the checker reads flax itself; at run time a missing extra is named
    from flax import nnx
else:
    nnx = _optional.require("flax.nnx", "layerwise_optax.flax")


@dataclasses.dataclass(frozen=True)
class _Apply:
    """``(params, (rest, inputs, targets)) -> outputs`` of an NNX model (hashable, static)."""

    graphdef: Any
    model_fn: Callable[..., Any]

    def __call__(self, params: Any, data: Any) -> Any:
        rest, inputs, _ = data
        return self.model_fn(nnx.merge(self.graphdef, params, rest), inputs)


@dataclasses.dataclass(frozen=True)
class _Loss:
    """``(outputs, (rest, inputs, targets)) -> loss`` (hashable, static)."""

    loss_fn: Callable[[Any, Any], jax.Array]

    def __call__(self, outputs: Any, data: Any) -> jax.Array:
        return self.loss_fn(outputs, data[2])


def _gaussian_fisher(outputs: jax.Array, u: jax.Array, data: Any) -> jax.Array:
    """The Gaussian NLL's Fisher ``diag(e^{-s}, 1/2) / n`` times ``u``."""
    d = outputs.shape[-1] // 2
    w = jnp.concatenate(
        [jnp.exp(-jax.lax.stop_gradient(outputs[..., d:])), jnp.full_like(outputs[..., d:], 0.5)],
        -1,
    )
    return w * u / outputs.shape[0]


def kfac_curvature(
    model_fn: Callable[..., jax.Array],
    loss: Literal["mse", "softmax_cross_entropy", "sigmoid_cross_entropy", "gaussian_nll"]
    | Callable[[jax.Array, Any], jax.Array] = "mse",
) -> Callable[[nnx.Module, Any, Any], layerwise_optax.KfacCurvature]:
    """Builds ``f(model, inputs, targets) -> KfacCurvature`` for :func:`~layerwise_optax.kfac_adaptive`.

    The curvature ``C = J^T H J`` of the loss at the model's current ``nnx.Param``
    state on the batch ``(inputs, targets)``: ``J`` the Jacobian of
    ``model_fn(model, inputs)`` in the params, ``H`` the output-space matrix of
    ``loss`` (its Hessian; the Fisher for ``'gaussian_nll'``). Pass the result
    as ``curvature=`` to the update together with the params
    ``nnx.state(model, nnx.Param)`` (the point ``C`` is taken at) and the
    statistics of :func:`kfac_value_and_grad` with the same ``model_fn`` and
    ``loss``. Build the function once, outside the training step.

    Args:
      model_fn: ``model_fn(model, inputs) -> outputs``.
      loss: A built-in loss name (as :func:`kfac_value_and_grad`) or a callable
        ``loss(outputs, targets) -> scalar``.

    Returns:
      ``f(model, inputs, targets)``, callable inside ``jit``.

    Raises:
      ValueError: An unknown loss name.

    Examples:
      A linear model with the squared error: ``C = X^T X / n`` on the kernel.

      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import layerwise_optax as lo
      >>> from layerwise_optax import flax as lof
      >>> model = nnx.Linear(2, 1, use_bias=False, rngs=nnx.Rngs(0))
      >>> x, y = jnp.array([[1.0, 0.0], [1.0, 2.0]]), jnp.zeros((2, 1))
      >>> curv = lof.kfac_curvature(lambda m, x: m(x), 'mse')(model, x, y)
      >>> params = nnx.state(model, nnx.Param)
      >>> v = jax.tree.map(jnp.zeros_like, params)
      >>> v['kernel'][...] = jnp.array([[1.0], [0.0]])
      >>> curv.matvec(params, v)['kernel'][...].ravel().tolist()
      [1.0, 1.0]
    """
    loss_name, loss_fn = _capture._loss_for(loss, "empirical")
    output_hvp = _gaussian_fisher if loss_name == "gaussian_nll" else None
    wrapped = _Loss(loss_fn)

    def build(model: nnx.Module, inputs: Any, targets: Any) -> layerwise_optax.KfacCurvature:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        del params
        return layerwise_optax.KfacCurvature(
            _Apply(graphdef, model_fn), wrapped, (rest, inputs, targets), output_hvp
        )

    return build
