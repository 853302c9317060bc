"""The paper's toy problems as Flax NNX models, seeded generators and experiments.

Needs the ``zoo`` extra (``flax``, ``matplotlib``, ``tqdm``); the core package never
imports it. Contents:

* linear representation learning (:func:`linear_rep_problem`,
  :func:`sample_linear_rep`, :class:`LinearRepModel`, :func:`subspace_distance`,
  :func:`train_loss`, :func:`transfer_loss`);
* single-index learning (:func:`single_index_problem`,
  :func:`sample_single_index`, :class:`TwoLayerNet`, :func:`alignment_theory`);
* methods and loops (:class:`Method`, :data:`LINEAR_REP_METHODS`,
  :data:`AMD_METHODS`, :func:`linear_rep_trainer`, :func:`single_index_direction`,
  :func:`full_gauss_newton`);
* the experiments behind the paper's Figs. 1–3 (:func:`run_linear_rep`,
  :func:`run_single_index`) with their claim checks, their figures
  (:func:`plot_linear_rep`, :func:`plot_single_index`) and a command line:
  ``python -m layerwise_optax.zoo reproduce {linear-rep,single-index,all}``.
"""

from layerwise_optax.zoo._experiments import LinearRepConfig as LinearRepConfig
from layerwise_optax.zoo._experiments import SingleIndexConfig as SingleIndexConfig
from layerwise_optax.zoo._experiments import all_passed as all_passed
from layerwise_optax.zoo._experiments import linear_rep_claims as linear_rep_claims
from layerwise_optax.zoo._experiments import run_linear_rep as run_linear_rep
from layerwise_optax.zoo._experiments import run_single_index as run_single_index
from layerwise_optax.zoo._experiments import single_index_claims as single_index_claims
from layerwise_optax.zoo._linear_rep import LinearRepModel as LinearRepModel
from layerwise_optax.zoo._linear_rep import LinearRepProblem as LinearRepProblem
from layerwise_optax.zoo._linear_rep import least_squares_head as least_squares_head
from layerwise_optax.zoo._linear_rep import linear_rep_problem as linear_rep_problem
from layerwise_optax.zoo._linear_rep import sample_linear_rep as sample_linear_rep
from layerwise_optax.zoo._linear_rep import subspace_distance as subspace_distance
from layerwise_optax.zoo._linear_rep import train_loss as train_loss
from layerwise_optax.zoo._linear_rep import transfer_loss as transfer_loss
from layerwise_optax.zoo._plots import plot_linear_rep as plot_linear_rep
from layerwise_optax.zoo._plots import plot_single_index as plot_single_index
from layerwise_optax.zoo._single_index import SingleIndexProblem as SingleIndexProblem
from layerwise_optax.zoo._single_index import TwoLayerNet as TwoLayerNet
from layerwise_optax.zoo._single_index import alignment as alignment
from layerwise_optax.zoo._single_index import alignment_theory as alignment_theory
from layerwise_optax.zoo._single_index import sample_single_index as sample_single_index
from layerwise_optax.zoo._single_index import single_index_problem as single_index_problem
from layerwise_optax.zoo._train import AMD_METHODS as AMD_METHODS
from layerwise_optax.zoo._train import LINEAR_REP_METHODS as LINEAR_REP_METHODS
from layerwise_optax.zoo._train import Method as Method
from layerwise_optax.zoo._train import full_gauss_newton as full_gauss_newton
from layerwise_optax.zoo._train import gauss_newton_matrix as gauss_newton_matrix
from layerwise_optax.zoo._train import hitting_time as hitting_time
from layerwise_optax.zoo._train import linear_rep_trainer as linear_rep_trainer
from layerwise_optax.zoo._train import single_index_direction as single_index_direction

__all__ = (
    "AMD_METHODS",
    "LINEAR_REP_METHODS",
    "LinearRepConfig",
    "LinearRepModel",
    "LinearRepProblem",
    "Method",
    "SingleIndexConfig",
    "SingleIndexProblem",
    "TwoLayerNet",
    "alignment",
    "alignment_theory",
    "all_passed",
    "full_gauss_newton",
    "gauss_newton_matrix",
    "hitting_time",
    "least_squares_head",
    "linear_rep_claims",
    "linear_rep_problem",
    "linear_rep_trainer",
    "plot_linear_rep",
    "plot_single_index",
    "run_linear_rep",
    "run_single_index",
    "sample_linear_rep",
    "sample_single_index",
    "single_index_claims",
    "single_index_direction",
    "single_index_problem",
    "subspace_distance",
    "train_loss",
    "transfer_loss",
)
