"""Public matrix functions (see :mod:`layerwise_optax._linalg` for the conventions)."""

from layerwise_optax._linalg import NS_METHODS as NS_METHODS
from layerwise_optax._linalg import NS_PRESCALES as NS_PRESCALES
from layerwise_optax._linalg import NS_PRESETS as NS_PRESETS
from layerwise_optax._linalg import cholesky_qr as cholesky_qr
from layerwise_optax._linalg import default_gram_restarts as default_gram_restarts
from layerwise_optax._linalg import eigenbasis as eigenbasis
from layerwise_optax._linalg import eigh_psd as eigh_psd
from layerwise_optax._linalg import inv_psd_cholesky as inv_psd_cholesky
from layerwise_optax._linalg import inv_root_eigh as inv_root_eigh
from layerwise_optax._linalg import inv_root_newton as inv_root_newton
from layerwise_optax._linalg import max_eigenvalue as max_eigenvalue
from layerwise_optax._linalg import newton_schulz as newton_schulz
from layerwise_optax._linalg import newton_schulz_flops as newton_schulz_flops
from layerwise_optax._linalg import ns_coefficients as ns_coefficients
from layerwise_optax._linalg import one_at_a_time_on_cpu as one_at_a_time_on_cpu
from layerwise_optax._linalg import refresh_eigenbasis as refresh_eigenbasis
from layerwise_optax._linalg import spectral_norm_lower_bound as spectral_norm_lower_bound
from layerwise_optax._linalg import symmetrize as symmetrize

__all__ = (
    "NS_METHODS",
    "NS_PRESCALES",
    "NS_PRESETS",
    "cholesky_qr",
    "default_gram_restarts",
    "eigenbasis",
    "eigh_psd",
    "inv_psd_cholesky",
    "inv_root_eigh",
    "inv_root_newton",
    "max_eigenvalue",
    "newton_schulz",
    "newton_schulz_flops",
    "ns_coefficients",
    "one_at_a_time_on_cpu",
    "refresh_eigenbasis",
    "spectral_norm_lower_bound",
    "symmetrize",
)
