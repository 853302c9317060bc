"""Flax helpers: K-FAC statistics capture for NNX and Linen models (needs ``flax``).

Import explicitly: ``from layerwise_optax import flax as lof``. The core package
never imports this module.
"""

from layerwise_optax.flax._capture import gaussian_nll as gaussian_nll
from layerwise_optax.flax._capture import kfac_dimension_numbers as kfac_dimension_numbers
from layerwise_optax.flax._capture import kfac_value_and_grad as kfac_value_and_grad
from layerwise_optax.flax._capture import mse as mse
from layerwise_optax.flax._capture import sigmoid_cross_entropy as sigmoid_cross_entropy
from layerwise_optax.flax._capture import softmax_cross_entropy as softmax_cross_entropy
from layerwise_optax.flax._curvature import kfac_curvature as kfac_curvature
from layerwise_optax.flax._linen import linen_kfac_dimension_numbers as linen_kfac_dimension_numbers
from layerwise_optax.flax._linen import linen_kfac_value_and_grad as linen_kfac_value_and_grad

__all__ = (
    "gaussian_nll",
    "kfac_curvature",
    "kfac_dimension_numbers",
    "kfac_value_and_grad",
    "linen_kfac_dimension_numbers",
    "linen_kfac_value_and_grad",
    "mse",
    "sigmoid_cross_entropy",
    "softmax_cross_entropy",
)
