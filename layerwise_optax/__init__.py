"""Layer-wise (per-axis, Kronecker-factored) preconditioners as optax transforms.

The package is built in layers, each importing only those below it (see
``docs/architecture.md``; ``tests/test_layers.py`` enforces it):

* core per-axis maths: ``_checks``, ``_linalg`` (public subset: :mod:`.linalg`),
  ``_distribute``, ``_axes``, ``_failure``, ``_kron``, ``_roles``;
* algorithms, one module per paper: ``_shampoo``, ``_soap``, ``_kfac``,
  ``_muon``, ``_dion``, ``_steepest``, ``_psgd``, and the pieces they share: ``_grafting``
  (grafting, guarded Adam), ``_factored`` (Shampoo's and SOAP's common phases)
  and ``_dual`` (Muon's and steepest descent's momentum and polar factors);
* runtime: ``_registry`` (one entry per optimizer; the only runtime module that
  imports the algorithms), ``_inject``, ``_health``, ``_checkpoint``,
  ``_sharding``, ``_multi_steps``, ``_spike``;
* this module, the public API;
* support utilities ``_optional`` and ``_io``; extensions ``flax`` and ``zoo``,
  which use public names only (and the support modules).
"""

from layerwise_optax import linalg as linalg
from layerwise_optax._axes import DimensionNumbers as DimensionNumbers
from layerwise_optax._axes import default_dimension_numbers as default_dimension_numbers
from layerwise_optax._checkpoint import check_state as check_state
from layerwise_optax._checkpoint import checkpointable as checkpointable
from layerwise_optax._checkpoint import restore_state as restore_state
from layerwise_optax._dion import ScaleByDionState as ScaleByDionState
from layerwise_optax._dion import dion as dion
from layerwise_optax._dion import scale_by_dion as scale_by_dion
from layerwise_optax._failure import FailureCounts as FailureCounts
from layerwise_optax._health import FailureReport as FailureReport
from layerwise_optax._health import OptimizerFailureError as OptimizerFailureError
from layerwise_optax._health import failure_counts as failure_counts
from layerwise_optax._health import failure_report as failure_report
from layerwise_optax._health import raise_on_failure as raise_on_failure
from layerwise_optax._inject import inject_hyperparams as inject_hyperparams
from layerwise_optax._inject import static_args as static_args
from layerwise_optax._kfac import DiagonalFactors as DiagonalFactors
from layerwise_optax._kfac import FoldedBias as FoldedBias
from layerwise_optax._kfac import KfacDiagonal as KfacDiagonal
from layerwise_optax._kfac import KfacFactors as KfacFactors
from layerwise_optax._kfac import ScaleByKfacState as ScaleByKfacState
from layerwise_optax._kfac import (
    default_kernel_dimension_numbers as default_kernel_dimension_numbers,
)
from layerwise_optax._kfac import kfac as kfac
from layerwise_optax._kfac import scale_by_kfac as scale_by_kfac
from layerwise_optax._kfac_adaptive import KfacCurvature as KfacCurvature
from layerwise_optax._kfac_adaptive import ScaleByKfacAdaptiveState as ScaleByKfacAdaptiveState
from layerwise_optax._kfac_adaptive import kfac_adaptive as kfac_adaptive
from layerwise_optax._kfac_adaptive import kfac_adaptive_values as kfac_adaptive_values
from layerwise_optax._multi_steps import multi_steps as multi_steps
from layerwise_optax._muon import ScaleByMuonState as ScaleByMuonState
from layerwise_optax._muon import muon as muon
from layerwise_optax._muon import normuon as normuon
from layerwise_optax._muon import scale_by_muon as scale_by_muon
from layerwise_optax._psgd import ScaleByPsgdKronState as ScaleByPsgdKronState
from layerwise_optax._psgd import precond_update_prob_schedule as precond_update_prob_schedule
from layerwise_optax._psgd import psgd_kron as psgd_kron
from layerwise_optax._psgd import scale_by_psgd_kron as scale_by_psgd_kron
from layerwise_optax._roles import HIDDEN_ROLES as HIDDEN_ROLES
from layerwise_optax._roles import ROLES as ROLES
from layerwise_optax._roles import format_roles as format_roles
from layerwise_optax._roles import layer_roles as layer_roles
from layerwise_optax._roles import matrix_dimension_numbers as matrix_dimension_numbers
from layerwise_optax._shampoo import ScaleByShampooState as ScaleByShampooState
from layerwise_optax._shampoo import scale_by_shampoo as scale_by_shampoo
from layerwise_optax._shampoo import shampoo as shampoo
from layerwise_optax._sharding import state_shardings as state_shardings
from layerwise_optax._soap import ScaleBySoapState as ScaleBySoapState
from layerwise_optax._soap import scale_by_soap as scale_by_soap
from layerwise_optax._soap import soap as soap
from layerwise_optax._spike import SkipStepOnSpikesState as SkipStepOnSpikesState
from layerwise_optax._spike import skip_step_on_spikes as skip_step_on_spikes
from layerwise_optax._steepest import DEFAULT_NORMS as DEFAULT_NORMS
from layerwise_optax._steepest import NORMS as NORMS
from layerwise_optax._steepest import ScaleBySteepestDescentState as ScaleBySteepestDescentState
from layerwise_optax._steepest import scale_by_steepest_descent as scale_by_steepest_descent
from layerwise_optax._steepest import steepest_descent as steepest_descent

__all__ = (
    "ScaleByDionState",
    "dion",
    "scale_by_dion",
    "FailureCounts",
    "FailureReport",
    "OptimizerFailureError",
    "check_state",
    "checkpointable",
    "failure_counts",
    "failure_report",
    "raise_on_failure",
    "restore_state",
    "SkipStepOnSpikesState",
    "skip_step_on_spikes",
    "state_shardings",
    "ScaleByPsgdKronState",
    "precond_update_prob_schedule",
    "psgd_kron",
    "scale_by_psgd_kron",
    "DEFAULT_NORMS",
    "NORMS",
    "ScaleBySteepestDescentState",
    "scale_by_steepest_descent",
    "steepest_descent",
    "DimensionNumbers",
    "DiagonalFactors",
    "FoldedBias",
    "KfacDiagonal",
    "KfacFactors",
    "HIDDEN_ROLES",
    "ROLES",
    "ScaleByKfacState",
    "ScaleByMuonState",
    "ScaleByShampooState",
    "ScaleBySoapState",
    "default_dimension_numbers",
    "default_kernel_dimension_numbers",
    "format_roles",
    "inject_hyperparams",
    "kfac",
    "kfac_adaptive",
    "kfac_adaptive_values",
    "KfacCurvature",
    "ScaleByKfacAdaptiveState",
    "multi_steps",
    "layer_roles",
    "matrix_dimension_numbers",
    "linalg",
    "muon",
    "normuon",
    "scale_by_kfac",
    "scale_by_muon",
    "scale_by_shampoo",
    "scale_by_soap",
    "shampoo",
    "soap",
    "static_args",
)

__version__ = "0.1.0"
