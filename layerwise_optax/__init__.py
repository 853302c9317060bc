"""Layer-wise (per-axis, Kronecker-factored) preconditioners as optax transforms."""

from layerwise_optax import linalg as linalg
from layerwise_optax._axes import DimensionNumbers as DimensionNumbers
from layerwise_optax._axes import default_dimension_numbers as default_dimension_numbers
from layerwise_optax._inject import inject_hyperparams as inject_hyperparams
from layerwise_optax._inject import static_args as static_args
from layerwise_optax._kfac import KfacFactors as KfacFactors
from layerwise_optax._kfac import ScaleByKfacState as ScaleByKfacState
from layerwise_optax._kfac import kfac as kfac
from layerwise_optax._kfac import scale_by_kfac as scale_by_kfac
from layerwise_optax._muon import ScaleByMuonState as ScaleByMuonState
from layerwise_optax._muon import muon as muon
from layerwise_optax._muon import scale_by_muon as scale_by_muon
from layerwise_optax._shampoo import ScaleByShampooState as ScaleByShampooState
from layerwise_optax._shampoo import scale_by_shampoo as scale_by_shampoo
from layerwise_optax._shampoo import shampoo as shampoo
from layerwise_optax._soap import ScaleBySoapState as ScaleBySoapState
from layerwise_optax._soap import scale_by_soap as scale_by_soap
from layerwise_optax._soap import soap as soap

__all__ = (
    "DimensionNumbers",
    "KfacFactors",
    "ScaleByKfacState",
    "ScaleByMuonState",
    "ScaleByShampooState",
    "ScaleBySoapState",
    "default_dimension_numbers",
    "inject_hyperparams",
    "kfac",
    "linalg",
    "muon",
    "scale_by_kfac",
    "scale_by_muon",
    "scale_by_shampoo",
    "scale_by_soap",
    "shampoo",
    "soap",
    "static_args",
)

__version__ = "0.1.0"
