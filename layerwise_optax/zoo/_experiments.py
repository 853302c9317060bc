"""The paper's experiments (analogues of Zhang et al., ICML 2025), as functions returning data.

:func:`run_linear_rep` covers Fig. 1 (training loss, subspace distance and
transfer loss vs iteration for several ``kappa``), Fig. 1b (iterations to
``dist <= 0.1`` vs ``kappa``) and the head-conditioning sweep;
:func:`run_single_index` covers Fig. 2 (spike alignment, simulation vs the
closed form) and Fig. 3 (test loss after one step + ridge). Results are nested
dicts of Python floats and lists, ready for JSON; :mod:`._plots` draws them and
:func:`linear_rep_claims` / :func:`single_index_claims` check the paper's
qualitative claims on them (the tests run these in quick mode).

Learning rates: each method has its own grid (:class:`layerwise_optax.zoo.Method`).
The curves of Fig. 1 use, per method and ``kappa``, the rate with the lowest
mean final distance over seeds; the hitting times of Fig. 1b pick the rate per
seed that hits first (final distance alone favours small rates).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from layerwise_optax import _io, _optional
from layerwise_optax.zoo import _linear_rep as lr_
from layerwise_optax.zoo import _single_index as si_
from layerwise_optax.zoo import _train


class _Progress:
    """A tqdm bar over estimated CPU seconds (so its rate and time left are honest)."""

    def __init__(self, total: float, desc: str, enabled: bool):
        self._bar = None
        self._left = total
        if enabled:
            self._bar = _io.progress_bar(
                "layerwise_optax.zoo's progress bar",
                total=total,
                desc=desc,
                leave=False,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}",
            )

    def update(self, seconds: float) -> None:
        # Clamped: float sums of the same costs may overshoot the total by round-off.
        seconds = min(seconds, self._left)
        self._left -= seconds
        if self._bar is not None:
            self._bar.update(seconds)

    def set_postfix_str(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ---------------------------------------------------------------------------------------
# Cost model: CPU seconds on one core, measured with `serial_blas` at the protocol sizes
# (d_x = 50, k = 5, d_y = 10, batch 256; single index d = 200, N = 400), 2026-11-30. It
# feeds the time estimate printed before a run and the progress bar's units.

_STEP_MS = {
    "sgd": 0.45,
    "adam": 0.5,
    "batchnorm": 0.55,
    "dfw": 0.7,
    "kfac": 0.9,
    "ngd": 1.9,
    "shampoo": 0.85,
    "soap": 0.6,
}
"""Milliseconds per training step (metrics included) of a joint-training method."""
_AMD_STEP_MS = {"sgd": 0.45, "dfw": 0.9, "kfac": 0.75}
"""The same for the alternating min-descent methods."""
_COMPILE_S = 7.0
"""Seconds to compile one training loop (one per method and number of steps)."""
_SI_COMPILE_S = 2.5
"""Seconds to compile one single-index direction (one per method and sample size)."""


def _step_ms(method: _train.Method, config: LinearRepConfig, amd: bool = False) -> float:
    base = (_AMD_STEP_MS if amd else _STEP_MS).get(method.name, 1.0)
    return base * max(config.batch_size * config.d_x / (256 * 50), 0.25)


def _run_cost(method, config: LinearRepConfig, steps: int, amd: bool = False) -> float:
    return steps * _step_ms(method, config, amd) / 1000


def estimate_linear_rep_seconds(config: LinearRepConfig) -> float:
    """Estimated CPU seconds of :func:`run_linear_rep` with ``config`` (one core).

    From a per-method cost per step measured at the protocol sizes (scaled by
    ``batch_size * d_x``) plus a fixed compile time per training loop. On an
    otherwise idle 2-core machine the wall-clock time is about the same (the work
    is mostly one thread); on a shared machine it is longer.
    """
    total = 0.0
    for name in config.methods:
        m = _train.LINEAR_REP_METHODS[name]
        runs = len(config.kappas) * config.seeds * len(config.grid(m))
        total += _COMPILE_S + runs * _run_cost(m, config, config.steps)
    for name in config.head_methods:
        m = _train.AMD_METHODS[name]
        runs = len(config.head_kappas_f) * len(config.grid(m))
        total += _COMPILE_S + runs * _run_cost(m, config, config.head_steps, amd=True)
    return total


def _si_direction_cost(config: SingleIndexConfig, n: int) -> float:
    return 0.02 + 1.5e-10 * n * config.d * config.width


def _si_ridge_cost(config: SingleIndexConfig) -> float:
    n = config.n_ridge + config.n_val + config.n_test
    per_c = 4e-11 * n * config.d * config.width + 3e-10 * config.width**3
    return len(config.step_sizes) * per_c


def estimate_single_index_seconds(config: SingleIndexConfig) -> float:
    """Estimated CPU seconds of :func:`run_single_index` with ``config`` (one core)."""
    methods = len(config.methods)
    ns = {config.n, *config.ns}
    total = methods * len(ns) * _SI_COMPILE_S
    total += (
        config.seeds
        * methods
        * len(config.kappas)
        * (_si_direction_cost(config, config.n) + _si_ridge_cost(config))
    )
    total += config.seeds * methods * sum(_si_direction_cost(config, n) for n in config.ns)
    return total


@contextlib.contextmanager
def serial_blas():
    """Runs the block with one OpenBLAS thread (restored afterwards).

    jaxlib's CPU LAPACK kernels (solve, Cholesky, eigh, QR, SVD) and NumPy's linear
    algebra call OpenBLAS, whose worker threads busy-wait; next to XLA's own thread
    pool on a small machine they fight for the cores. Measured on a shared 2-core
    machine: a 300×300 LU solve took 59 ms of CPU time with OpenBLAS's default
    threads and 1.1 ms with one, which made the NGD baseline 30× slower than SGD.
    The zoo's matrices are at most a few hundred wide, so one thread is also the
    faster choice on a quiet machine. Needs ``threadpoolctl`` (in the ``zoo``
    extra).
    """
    threadpool_limits = _optional.require(
        "threadpoolctl", "layerwise_optax.zoo's experiments", "zoo"
    ).threadpool_limits
    # jaxlib loads its LAPACK (SciPy's OpenBLAS) at the first linear-algebra call;
    # make one so the limit covers that library too.
    jax.block_until_ready(jnp.linalg.solve(jnp.eye(2), jnp.ones(2)))
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@dataclasses.dataclass(frozen=True)
class LinearRepConfig:
    """Settings of the linear representation experiments (defaults: the full protocol).

    ``grids`` overrides a method's learning-rate grid by name.
    """

    d_x: int = 50
    d_y: int = 10
    k: int = 5
    batch_size: int = 256
    noise: float = 0.1
    steps: int = 500
    seeds: int = 3
    kappas: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)
    panel_kappas: tuple[float, ...] = (1.0, 100.0, 1000.0)
    methods: tuple[str, ...] = ("sgd", "adam", "batchnorm", "dfw", "kfac", "ngd", "shampoo", "soap")
    target: float = 0.1
    hit_cap: int = 400
    head_kappa_x: float = 100.0
    head_kappas_f: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0, 100.0)
    head_methods: tuple[str, ...] = ("sgd", "dfw", "kfac")
    head_steps: int = 400
    grids: tuple[tuple[str, tuple[float, ...]], ...] = ()

    def grid(self, method: _train.Method) -> tuple[float, ...]:
        return dict(self.grids).get(method.name, method.learning_rates)

    @classmethod
    def quick(cls, seeds: int = 1) -> LinearRepConfig:
        """A CI-sized configuration (about a minute on 2 CPU cores)."""
        return cls(
            steps=200,
            seeds=seeds,
            kappas=(1.0, 100.0, 1000.0),
            panel_kappas=(1.0, 1000.0),
            methods=("sgd", "adam", "dfw", "kfac", "ngd"),
            hit_cap=200,
            head_kappas_f=(1.0, 30.0),
            head_steps=200,
            grids=(
                ("sgd", (0.1, 0.01, 1e-3, 3e-4)),
                ("adam", (0.1, 0.03, 0.01)),
                ("dfw", (0.1, 0.03, 0.01)),
                ("ngd", (0.5,)),
                ("kfac", (0.5,)),
            ),
        )


def _finite_or_inf(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


@serial_blas()
def run_linear_rep(config: LinearRepConfig, *, progress: bool = True) -> dict[str, Any]:
    """Runs the linear representation protocols; returns JSON-ready results.

    Args:
      config: The settings.
      progress: Show a progress bar.

    Returns:
      ``{'settings', 'curves', 'hitting', 'head_sweep'}``:

      * ``curves[method][kappa]``: ``learning_rate`` and the seed-mean
        ``train_loss``, ``distance``, ``transfer_loss`` lists (``steps + 1``);
      * ``hitting[method][kappa]``: per-seed iterations to ``dist <= target``
        within ``hit_cap`` (``None``: not reached), the rates chosen, the median;
        plus ``at_lr[lr]`` per-seed hitting times at each grid rate;
      * ``head_sweep[method][kappa_f]``: the same for the alternating
        min-descent runs on seed 0.
    """
    methods = [_train.LINEAR_REP_METHODS[m] for m in config.methods]
    head_methods = [_train.AMD_METHODS[m] for m in config.head_methods]
    bar = _Progress(estimate_linear_rep_seconds(config), "linear-rep", progress)
    sizes = dict(d_x=config.d_x, k=config.k, d_y=config.d_y)

    curves: dict[str, dict] = {}
    hitting: dict[str, dict] = {}
    for method in methods:
        run = _train.linear_rep_trainer(
            method, steps=config.steps, batch_size=config.batch_size, **sizes
        )
        curves[method.name], hitting[method.name] = {}, {}
        bar.update(_COMPILE_S)
        for kappa in config.kappas:
            per_lr: dict[float, list[dict[str, np.ndarray]]] = {}
            for lr in config.grid(method):
                per_lr[lr] = []
                for seed in range(config.seeds):
                    key = jax.random.key(seed)
                    problem = lr_.linear_rep_problem(key, kappa=kappa, noise=config.noise, **sizes)
                    out = run(problem, lr, jax.random.fold_in(key, 1))
                    per_lr[lr].append({k: np.asarray(v, np.float64) for k, v in out.items()})
                    bar.update(_run_cost(method, config, config.steps))
            bar.set_postfix_str(f"{method.name} κ={kappa:g}")
            curves[method.name][f"{kappa:g}"] = _best_curves(per_lr)
            hitting[method.name][f"{kappa:g}"] = _hitting(per_lr, config.target, config.hit_cap)

    head_sweep: dict[str, dict] = {}
    for method in head_methods:
        run = _train.linear_rep_trainer(
            method, steps=config.head_steps, batch_size=config.batch_size, **sizes
        )
        head_sweep[method.name] = {}
        bar.update(_COMPILE_S)
        for kappa_f in config.head_kappas_f:
            key = jax.random.key(0)
            problem = lr_.linear_rep_problem(
                key, kappa=config.head_kappa_x, kappa_f=kappa_f, noise=config.noise, **sizes
            )
            per_lr = {}
            for lr in config.grid(method):
                out = run(problem, lr, jax.random.fold_in(key, 1))
                per_lr[lr] = [{k: np.asarray(v, np.float64) for k, v in out.items()}]
                bar.update(_run_cost(method, config, config.head_steps, amd=True))
            head_sweep[method.name][f"{kappa_f:g}"] = _hitting(
                per_lr, config.target, config.head_steps
            )
    bar.close()
    return {
        "settings": dataclasses.asdict(config),
        "labels": {m.name: m.label for m in methods},
        "head_labels": {m.name: m.label for m in head_methods},
        "curves": curves,
        "hitting": hitting,
        "head_sweep": head_sweep,
    }


def _final(run: dict[str, np.ndarray], window: int = 10) -> float:
    return _finite_or_inf(float(np.mean(run["distance"][-window:])))


def _best_curves(per_lr: dict[float, list[dict[str, np.ndarray]]]) -> dict[str, Any]:
    scores = {lr: float(np.mean([_final(r) for r in runs])) for lr, runs in per_lr.items()}
    best = min(scores, key=lambda lr: (scores[lr], -lr))
    runs = per_lr[best]
    mean = lambda k: np.mean([r[k] for r in runs], axis=0)  # noqa: E731
    return {
        "learning_rate": best,
        **{
            k: [_json_float(v) for v in mean(k)]
            for k in ("train_loss", "distance", "transfer_loss")
        },
    }


def _hitting(per_lr, target: float, cap: int) -> dict[str, Any]:
    seeds = len(next(iter(per_lr.values())))
    hits = {
        lr: [_train.hitting_time(r["distance"][: cap + 1], target) for r in runs]
        for lr, runs in per_lr.items()
    }
    per_seed, lrs = [], []
    for s in range(seeds):
        best = min(per_lr, key=lambda lr: (hits[lr][s], _final(per_lr[lr][s])))
        per_seed.append(hits[best][s])
        lrs.append(best)
    median = float(np.median(per_seed))
    return {
        "per_seed": [_json_float(h) for h in per_seed],
        "learning_rates": lrs,
        "median": _json_float(median),
        "at_lr": {f"{lr:g}": [_json_float(h) for h in hs] for lr, hs in hits.items()},
    }


@dataclasses.dataclass(frozen=True)
class SingleIndexConfig:
    """Settings of the single-index experiments (defaults: the full protocol)."""

    d: int = 200
    width: int = 400
    n: int = 2000
    noise: float = 0.1
    seeds: int = 3
    kappas: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0, 100.0)
    n_kappa: float = 30.0
    ns: tuple[int, ...] = (500, 1000, 2000, 4000, 8000)
    methods: tuple[str, ...] = _train.SINGLE_INDEX_METHODS
    damping: float = 1e-2
    step_sizes: tuple[float, ...] = (0.0, 4.0, 8.0, 16.0, 32.0, 64.0)
    ridges: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
    n_ridge: int = 2000
    n_val: int = 2000
    n_test: int = 5000

    @classmethod
    def quick(cls, seeds: int = 1) -> SingleIndexConfig:
        """A CI-sized configuration (seconds on 2 CPU cores)."""
        return cls(
            d=100,
            width=200,
            n=1000,
            seeds=seeds,
            kappas=(1.0, 10.0, 100.0),
            ns=(400, 1000, 4000),
            n_ridge=1000,
            n_val=1000,
            n_test=2000,
        )


@serial_blas()
def run_single_index(config: SingleIndexConfig, *, progress: bool = True) -> dict[str, Any]:
    """Runs the single-index protocols; returns JSON-ready results.

    Args:
      config: The settings.
      progress: Show a progress bar.

    Returns:
      ``{'settings', 'alignment_vs_kappa', 'alignment_vs_n', 'test_loss'}``:
      alignments are per method (and ``'theory_sgd'``, ``'theory_kfac'``,
      ``'sgd_limit'``) lists over the sweep, seed-means with per-seed values in
      ``'per_seed'``; ``test_loss[method]`` is the test MSE after the tuned step
      and ridge per ``kappa`` (``'random_features'``: no step, ``c = 0``).
    """
    bar = _Progress(estimate_single_index_seconds(config), "single-index", progress)
    trial = functools.partial(_si_trial, config, bar, set())
    vs_kappa, per_seed_kappa, test_loss, theory_k = _si_kappa_sweep(config, trial)
    vs_n, theory_n = _si_n_sweep(config, trial)
    bar.close()
    return {
        "settings": dataclasses.asdict(config),
        "labels": dict(_train.SINGLE_INDEX_LABELS),
        "alignment_vs_kappa": {**vs_kappa, **theory_k, "per_seed": per_seed_kappa},
        "alignment_vs_n": {**vs_n, **theory_n},
        "test_loss": test_loss,
    }


_SI_THEORY = ("theory_sgd", "theory_kfac", "sgd_limit")


def _si_trial(
    config: SingleIndexConfig,
    bar: _Progress,
    compiled: set[tuple[str, int]],
    kappa: float,
    n: int,
    seed: int,
    method: str,
    with_ridge: bool,
) -> tuple[Any, dict[str, float]]:
    """One seed of one method: the first-layer step's spike alignment (and ridge test loss).

    Returns ``(problem, result)`` with ``result['alignment']`` and, ``with_ridge``,
    the test losses of :func:`_ridge_after_step`; advances ``bar`` by the
    estimated cost (plus compilation the first time a ``(method, n)`` is seen).
    """
    key = jax.random.key(seed)
    problem = si_.single_index_problem(key, d=config.d, kappa=kappa, noise=config.noise)
    fn = _train.single_index_direction(
        method, n=n, d=config.d, width=config.width, damping=config.damping
    )
    out = {k: np.asarray(v, np.float64) for k, v in fn(problem, jax.random.fold_in(key, 1)).items()}
    d_eff = out["direction"] * out["scale"][None, :]
    result = {"alignment": si_.alignment(si_.top_right_singular_vector(d_eff), problem.beta)}
    cost = _si_direction_cost(config, n)
    if (method, n) not in compiled:
        compiled.add((method, n))
        cost += _SI_COMPILE_S
    if with_ridge:
        result.update(_ridge_after_step(problem, out, config, jax.random.fold_in(key, 2)))
        cost += _si_ridge_cost(config)
    bar.update(cost)
    return problem, result


def _si_theory(th: dict[str, list], problem: Any, n: int) -> None:
    """Appends the closed-form alignments of SGD and K-FAC and SGD's limit to ``th``."""
    t = si_.alignment_theory(problem, n)
    for name, field in zip(_SI_THEORY, ("sgd", "kfac", "sgd_limit")):
        th[name].append(t[field])


def _si_kappa_sweep(config: SingleIndexConfig, trial: Callable) -> tuple[dict, dict, dict, dict]:
    """Alignment (seed means and per seed), test loss and theory over ``config.kappas``."""
    vs_kappa: dict[str, Any] = {m: [] for m in config.methods}
    per_seed_kappa: dict[str, Any] = {m: [] for m in config.methods}
    test_loss: dict[str, Any] = {m: [] for m in (*config.methods, "random_features")}
    theory_k: dict[str, Any] = {k: [] for k in _SI_THEORY}
    for kappa in config.kappas:
        align = {m: [] for m in config.methods}
        losses = {m: [] for m in (*config.methods, "random_features")}
        th = {k: [] for k in _SI_THEORY}
        for seed in range(config.seeds):
            for method in config.methods:
                problem, r = trial(kappa, config.n, seed, method, True)
                align[method].append(r["alignment"])
                losses[method].append(r["test_loss"])
                if method == "sgd":
                    losses["random_features"].append(r["test_loss_no_step"])
            _si_theory(th, problem, config.n)
        for m in config.methods:
            vs_kappa[m].append(float(np.mean(align[m])))
            per_seed_kappa[m].append(align[m])
        for m, v in losses.items():
            test_loss[m].append(float(np.mean(v)))
        for k_, v in th.items():
            theory_k[k_].append(float(np.nanmean(v)))
    return vs_kappa, per_seed_kappa, test_loss, theory_k


def _si_n_sweep(config: SingleIndexConfig, trial: Callable) -> tuple[dict, dict]:
    """Alignment (seed means) and theory over ``config.ns`` at ``kappa = config.n_kappa``."""
    vs_n: dict[str, Any] = {m: [] for m in config.methods}
    theory_n: dict[str, Any] = {k: [] for k in _SI_THEORY}
    for n in config.ns:
        align = {m: [] for m in config.methods}
        th = {k: [] for k in _SI_THEORY}
        for seed in range(config.seeds):
            for method in config.methods:
                problem, r = trial(config.n_kappa, n, seed, method, False)
                align[method].append(r["alignment"])
            _si_theory(th, problem, n)
        for m in config.methods:
            vs_n[m].append(float(np.mean(align[m])))
        for k_, v in th.items():
            theory_n[k_].append(_json_float(float(np.mean(v))))
    return vs_n, theory_n


def _ridge_after_step(problem, out, config: SingleIndexConfig, key) -> dict[str, float]:
    """Test MSE after ``W_1 = W_0 - c D / ||D||_op`` and ridge, ``(c, ridge)`` tuned on validation."""
    k_fit, k_val, k_test = jax.random.split(key, 3)
    x_fit, y_fit = (
        np.asarray(a, np.float64) for a in si_.sample_single_index(problem, k_fit, config.n_ridge)
    )
    x_val, y_val = (
        np.asarray(a, np.float64) for a in si_.sample_single_index(problem, k_val, config.n_val)
    )
    x_te, y_te = (
        np.asarray(a, np.float64)
        for a in si_.sample_single_index(problem, k_test, config.n_test, noiseless=True)
    )
    w0, d_mat, scale = out["w0"], out["direction"], out["scale"]
    d_unit = d_mat / np.linalg.norm(d_mat, 2)
    width = w0.shape[0]
    best = (math.inf, math.inf)  # (validation, test) for the best (c, ridge)
    no_step = (math.inf, math.inf)
    for c in config.step_sizes:
        w1 = (w0 - c * d_unit) * scale[None, :]
        phi = lambda x: np.tanh(x @ w1.T) / math.sqrt(width)  # noqa: E731
        f_fit, f_val, f_te = phi(x_fit), phi(x_val), phi(x_te)
        gram = f_fit.T @ f_fit / len(y_fit)
        w, v = np.linalg.eigh(gram)
        proj = v.T @ (f_fit.T @ y_fit / len(y_fit))
        for ridge in config.ridges:
            a = v @ (proj / (np.maximum(w, 0) + ridge))
            val = float(np.mean((f_val @ a - y_val) ** 2))
            test = float(np.mean((f_te @ a - y_te) ** 2))
            if val < best[0]:
                best = (val, test)
            if c == 0 and val < no_step[0]:
                no_step = (val, test)
    return {"test_loss": best[1], "test_loss_no_step": no_step[1]}


# ---------------------------------------------------------------------------------------
# The paper's claims, checked on results (quick mode in the tests, full runs in notebooks).


def _h(x) -> float:
    return math.inf if x is None else float(x)


def linear_rep_claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Checks the linear representation claims of the paper on ``results``.

    Args:
      results: What :func:`run_linear_rep` returns (or its JSON, read back).

    Returns:
      One ``{'claim', 'passed', 'detail'}`` per claim (methods that were not run
      are skipped).
    """
    hit = results["hitting"]
    kappas = list(hit["kfac"])
    k_hits = [_h(hit["kfac"][k]["median"]) for k in kappas]
    return [
        *_kfac_sgd_claims(results, kappas, k_hits),
        *_adam_ngd_claims(hit, kappas, k_hits),
        *_dfw_claims(results, kappas, k_hits),
    ]


def _claim(claim: str, passed: Any, detail: str) -> dict[str, Any]:
    """One ``{'claim', 'passed', 'detail'}`` entry of a claims list."""
    return {"claim": claim, "passed": bool(passed), "detail": detail}


def _kfac_sgd_claims(results: dict[str, Any], kappas: list[str], k_hits: list[float]) -> list:
    """K-FAC's iterations to target do not depend on kappa(Sigma_x); SGD's grow past the budget."""
    hit, hi_k = results["hitting"], kappas[-1]
    cap = results["settings"]["hit_cap"]
    s_hits = [_h(hit["sgd"][k]["median"]) for k in kappas]
    sgd_final = results["curves"]["sgd"][hi_k]["distance"][-1]
    return [
        _claim(
            "K-FAC reaches dist <= target within 20 iterations at every kappa",
            max(k_hits) <= 20,
            f"K-FAC iterations to target per kappa {dict(zip(kappas, k_hits))}",
        ),
        _claim(
            "K-FAC's iterations to target are nearly independent of kappa (max <= 2 min + 2)",
            max(k_hits) <= 2 * min(k_hits) + 2,
            f"min {min(k_hits)}, max {max(k_hits)}",
        ),
        _claim(
            "SGD's iterations to target grow with kappa",
            s_hits[-1] > s_hits[0] and all(b >= a for a, b in zip(s_hits, s_hits[1:])),
            f"SGD per kappa {dict(zip(kappas, s_hits))}",
        ),
        _claim(
            f"SGD has not converged at kappa={hi_k} within the budget",
            s_hits[-1] > cap and (sgd_final is None or sgd_final > results["settings"]["target"]),
            f"SGD at kappa={hi_k}: hit {s_hits[-1]}, final distance {sgd_final}",
        ),
    ]


def _adam_ngd_claims(hit: dict[str, Any], kappas: list[str], k_hits: list[float]) -> list:
    """Adam helps only partly; full Gauss-Newton is no faster than K-FAC (when they were run)."""
    lo_k, hi_k = kappas[0], kappas[-1]
    claims = []
    if "adam" in hit:
        a_hi = _h(hit["adam"][hi_k]["median"])
        claims.append(
            _claim(
                f"Adam helps only partially: at kappa={hi_k} it needs >= 5x K-FAC's iterations",
                a_hi >= 5 * k_hits[-1],
                f"Adam {a_hi} vs K-FAC {k_hits[-1]} at kappa={hi_k}",
            )
        )
    if "ngd" in hit:
        # Equal step size: the largest rate in both grids (joint steps of 1 overshoot).
        common = set(hit["ngd"][lo_k]["at_lr"]) & set(hit["kfac"][lo_k]["at_lr"])
        eta = max(common, key=float)
        ngd = [_h(hit["ngd"][k]["at_lr"][eta][0]) for k in kappas]
        kf = [_h(hit["kfac"][k]["at_lr"][eta][0]) for k in kappas]
        claims.append(
            _claim(
                f"Full Gauss-Newton (NGD) is no faster than K-FAC at equal step size ({eta})",
                all(n >= k for n, k in zip(ngd, kf)),
                f"NGD {ngd} vs K-FAC {kf} (seed 0, per kappa)",
            )
        )
    return claims


def _dfw_claims(results: dict[str, Any], kappas: list[str], k_hits: list[float]) -> list:
    """DFW (input whitening only) fixes input anisotropy but not head conditioning."""
    hit, head = results["hitting"], results.get("head_sweep", {})
    claims = []
    if {"dfw", "kfac"} <= set(head):
        kfs = list(head["kfac"])
        dfw = [_h(head["dfw"][k]["median"]) for k in kfs]
        kf = [_h(head["kfac"][k]["median"]) for k in kfs]
        claims.append(
            _claim(
                "DFW fixes input anisotropy but not head conditioning: its iterations grow "
                "with kappa(F*) (>= 3x from first to last), K-FAC's do not (<= 2x + 2)",
                dfw[-1] >= 3 * dfw[0] and kf[-1] <= 2 * kf[0] + 2,
                f"kappa_F {kfs}: DFW {dfw}, K-FAC {kf}",
            )
        )
    if "dfw" in hit:
        d_hits = [_h(hit["dfw"][k]["median"]) for k in kappas]
        claims.append(
            _claim(
                "DFW helps only partially: slower than K-FAC at every kappa",
                all(d > k for d, k in zip(d_hits, k_hits)),
                f"DFW {d_hits} vs K-FAC {k_hits}",
            )
        )
    return claims


def single_index_claims(results: dict[str, Any], tolerance: float = 0.05) -> list[dict[str, Any]]:
    """Checks the single-index claims of the paper on ``results``.

    Args:
      results: What :func:`run_single_index` returns (or its JSON, read back).
      tolerance: Largest allowed gap between simulated and closed-form alignment.

    Returns:
      One ``{'claim', 'passed', 'detail'}`` per claim.
    """
    claims = []

    def add(claim, passed, detail):
        claims.append({"claim": claim, "passed": bool(passed), "detail": detail})

    vn = results["alignment_vs_n"]
    add(
        "SGD's alignment saturates below 1 as n grows (at most its limit cos(Σβ, β) + 0.02)",
        vn["sgd"][-1] <= vn["sgd_limit"][-1] + 0.02 and vn["sgd_limit"][-1] < 0.95,
        f"SGD {vn['sgd']} vs limit {vn['sgd_limit'][-1]:.3f}",
    )
    add(
        "K-FAC's alignment approaches 1 as n grows (increasing, >= 0.9 at the largest n)",
        vn["kfac"][-1] >= 0.9 and vn["kfac"][-1] > vn["kfac"][0],
        f"K-FAC {vn['kfac']}",
    )
    vk = results["alignment_vs_kappa"]
    kappas = results["settings"]["kappas"]
    big = [i for i, k in enumerate(kappas) if k >= 10]
    for m in ("adam", "batchnorm"):
        if m in vk:
            add(
                f"{m} does not close the gap: alignment below K-FAC's by > 0.05 at kappa >= 10",
                all(vk[m][i] < vk["kfac"][i] - 0.05 for i in big),
                f"{m} {[round(vk[m][i], 3) for i in big]} vs K-FAC {[round(vk['kfac'][i], 3) for i in big]}",
            )
    tl = results["test_loss"]
    ratios = [tl["sgd"][i] / tl["kfac"][i] for i in big]
    add(
        "Test MSE after one step + ridge is several times (>= 2x) lower for K-FAC at kappa >= 10",
        all(r >= 2 for r in ratios),
        f"SGD / K-FAC test MSE at kappa {[kappas[i] for i in big]}: {[round(r, 2) for r in ratios]}",
    )
    errs = theory_errors(results)
    add(
        f"Simulation agrees with the closed-form alignment (max |error| <= {tolerance})",
        max(errs) <= tolerance,
        f"max |simulation - theory| = {max(errs):.4f} over {len(errs)} points",
    )
    return claims


def theory_errors(results: dict[str, Any]) -> list[float]:
    """``|simulation - closed form|`` of the alignment, SGD and K-FAC, both sweeps."""
    errs = []
    for key, m in (("theory_sgd", "sgd"), ("theory_kfac", "kfac")):
        for sweep in (results["alignment_vs_kappa"], results["alignment_vs_n"]):
            errs += [
                abs(s - t)
                for s, t in zip(sweep[m], sweep[key])
                if t is not None and math.isfinite(t)
            ]
    return errs


def all_passed(claims: Iterable[dict[str, Any]]) -> bool:
    """Whether every claim passed.

    Args:
      claims: What :func:`linear_rep_claims` or :func:`single_index_claims` return.

    Returns:
      ``True`` when each claim's ``'passed'`` is true.

    Examples:
      >>> from layerwise_optax import zoo
      >>> zoo.all_passed([{'claim': 'a', 'passed': True}, {'claim': 'b', 'passed': False}])
      False
    """
    return all(c["passed"] for c in claims)
