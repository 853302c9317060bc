"""Figures of the paper's experiments, drawn from the JSON-ready results."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from layerwise_optax import _optional

COLORS = {
    "sgd": "tab:blue",
    "adam": "tab:orange",
    "batchnorm": "tab:cyan",
    "dfw": "tab:purple",
    "kfac": "tab:red",
    "ngd": "tab:gray",
    "shampoo": "tab:green",
    "soap": "tab:olive",
}
METRICS = (
    ("train_loss", "training loss"),
    ("distance", "subspace distance"),
    ("transfer_loss", "transfer loss"),
)


def _plt():
    matplotlib = _optional.require("matplotlib", "layerwise_optax.zoo's figures")
    matplotlib.use("Agg", force=False)
    return _optional.require("matplotlib.pyplot", "layerwise_optax.zoo's figures")


def _arr(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def plot_linear_rep(results: dict[str, Any]) -> dict[str, Any]:
    """Draws the linear-representation figures (the paper's Fig. 1 analogue).

    Args:
      results: what :func:`~layerwise_optax.zoo.run_linear_rep` returns (or the same
        dictionary read back from the ``linear_rep.json`` the ``reproduce`` command
        writes): per method and κ(Σx) the training loss, subspace distance and transfer
        loss per iteration, the hitting times, and the head-conditioning sweep.

    Returns:
      A dict of matplotlib figures: ``'fig1_linear_rep'`` (the three metrics vs
      iteration, one row per κ(Σx) of ``settings['panel_kappas']``),
      ``'fig1b_hitting_vs_kappa'`` (iterations to subspace distance ≤ 0.1 vs κ(Σx)) and,
      when the results hold the sweep, ``'head_conditioning'`` (the same vs κ(F★)).

    Raises:
      ImportError: when matplotlib (in the ``zoo`` extra) is not installed.
      KeyError: when ``results`` lacks a field the figures need.

    Example::

      results = zoo.run_linear_rep(zoo.LinearRepConfig.quick())
      figs = zoo.plot_linear_rep(results)
      figs["fig1_linear_rep"].savefig("fig1.png")

    Reference: Zhang, Moniri et al., *On the Concurrence of Layer-wise Preconditioning
    Methods and Provable Feature Learning*, ICML 2025, Fig. 1.
    """
    plt = _plt()
    s = results["settings"]
    labels = results["labels"]
    curves = results["curves"]
    panel = [f"{k:g}" for k in s["panel_kappas"]]
    figs = {}
    fig, axes = plt.subplots(
        len(panel), 3, figsize=(13, 3.1 * len(panel)), squeeze=False, constrained_layout=True
    )
    for row, kappa in zip(axes, panel):
        for ax, (metric, title) in zip(row, METRICS):
            for m, per_kappa in curves.items():
                c = per_kappa[kappa]
                y = _arr(c[metric])
                ax.plot(
                    np.arange(len(y)),
                    y,
                    color=COLORS.get(m),
                    lw=1.6 if m == "kfac" else 1.1,
                    label=f"{labels[m]} (lr {c['learning_rate']:g})",
                )
            ax.set_yscale("log")
            ax.set_title(f"{title}, κ(Σx) = {kappa}", fontsize=10)
            ax.set_xlabel("iteration")
            if metric == "train_loss":
                floor = 0.5 * s["d_y"] * s["noise"] ** 2
                ax.axhline(floor, color="k", ls=":", lw=0.8)
            if metric == "distance":
                ax.axhline(s["target"], color="k", ls=":", lw=0.8)
        row[-1].legend(fontsize=7, loc="upper right")
    fig.suptitle(
        f"Linear representation learning (d_x={s['d_x']}, k={s['k']}, d_y={s['d_y']}, "
        f"batch {s['batch_size']}, mean of {s['seeds']} seeds)",
        fontsize=11,
    )
    figs["fig1_linear_rep"] = fig

    fig, ax = plt.subplots(figsize=(6, 4.2), constrained_layout=True)
    kappas = s["kappas"]
    cap = s["hit_cap"]
    for m, per_kappa in results["hitting"].items():
        med = [per_kappa[f"{k:g}"]["median"] for k in kappas]
        y = np.array([cap * 1.15 if v is None else v for v in med], float)
        reached = np.array([v is not None for v in med])
        ax.plot(kappas, y, color=COLORS.get(m), lw=1.2, label=labels[m])
        ax.scatter(np.array(kappas)[reached], y[reached], color=COLORS.get(m), s=18)
        ax.scatter(
            np.array(kappas)[~reached],
            y[~reached],
            facecolors="none",
            edgecolors=COLORS.get(m),
            s=30,
        )
    ax.axhline(cap, color="k", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("κ(Σx)")
    ax.set_ylabel(f"iterations to dist ≤ {s['target']:g} (median)")
    ax.set_title(f"Iterations to target vs conditioning (hollow: not reached by {cap})", fontsize=9)
    ax.legend(fontsize=7)
    figs["fig1b_hitting_vs_kappa"] = fig

    if results.get("head_sweep"):
        fig, ax = plt.subplots(figsize=(6, 4.2), constrained_layout=True)
        cap = s["head_steps"]
        for m, per in results["head_sweep"].items():
            kfs = [float(k) for k in per]
            med = [per[k]["median"] for k in per]
            y = np.array([cap * 1.15 if v is None else v for v in med], float)
            ax.plot(kfs, y, "o-", color=COLORS.get(m), label=results["head_labels"][m], ms=4)
        ax.axhline(cap, color="k", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("κ(F★) (head conditioning)")
        ax.set_ylabel(f"iterations to dist ≤ {s['target']:g}")
        ax.set_title(
            f"Head-conditioning sweep, alternating min-descent, κ(Σx) = {s['head_kappa_x']:g}",
            fontsize=9,
        )
        ax.legend(fontsize=7)
        figs["head_conditioning"] = fig
    return figs


def plot_single_index(results: dict[str, Any]) -> dict[str, Any]:
    """Draws the single-index figures (the paper's Fig. 2 and Fig. 3 analogues).

    Args:
      results: what :func:`~layerwise_optax.zoo.run_single_index` returns (or the
        ``single_index.json`` the ``reproduce`` command writes): the spike alignment
        ``cos(v, β★)`` per method vs κ(Σ) and vs n with its closed-form predictions, and
        the test MSE after one step plus a ridge refit.

    Returns:
      A dict of matplotlib figures: ``'fig2_single_index_alignment'`` (alignment vs κ
      and vs n/d, simulation as points and theory as lines) and
      ``'fig3_single_index_test_loss'`` (test MSE vs κ, with the no-step random-features
      baseline).

    Raises:
      ImportError: when matplotlib (in the ``zoo`` extra) is not installed.
      KeyError: when ``results`` lacks a field the figures need.

    Example::

      results = zoo.run_single_index(zoo.SingleIndexConfig.quick())
      zoo.plot_single_index(results)["fig2_single_index_alignment"].savefig("fig2.png")

    Reference: Zhang, Moniri et al., ICML 2025, Figs. 2 and 3.
    """
    plt = _plt()
    s = results["settings"]
    labels = results["labels"]
    figs = {}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3), constrained_layout=True)
    for ax, key, xs, xlabel in (
        (axes[0], "alignment_vs_kappa", s["kappas"], "κ(Σ)"),
        (axes[1], "alignment_vs_n", [n / s["d"] for n in s["ns"]], "n / d"),
    ):
        r = results[key]
        for m in s["methods"]:
            ax.plot(xs, r[m], "o", color=COLORS.get(m), label=f"{labels[m]} (simulation)", ms=5)
        ax.plot(xs, _arr(r["theory_sgd"]), "-", color=COLORS["sgd"], lw=1.2, label="SGD theory")
        ax.plot(xs, _arr(r["theory_kfac"]), "-", color=COLORS["kfac"], lw=1.2, label="K-FAC theory")
        ax.plot(xs, _arr(r["sgd_limit"]), "--", color="k", lw=0.8, label="cos∠(Σβ★, β★)")
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{v:g}" for v in xs])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel("cos(v, β★)")
        ax.set_ylim(0, 1.02)
    axes[0].set_title(f"Spike alignment after one step (n = {s['n']}, d = {s['d']})", fontsize=10)
    axes[1].set_title(f"Spike alignment vs sample size (κ = {s['n_kappa']:g})", fontsize=10)
    axes[1].legend(fontsize=7, loc="lower right")
    figs["fig2_single_index_alignment"] = fig

    fig, ax = plt.subplots(figsize=(6, 4.2), constrained_layout=True)
    tl = results["test_loss"]
    for m in (*s["methods"], "random_features"):
        label = labels.get(m, "no step (random features)")
        ls = "--" if m == "random_features" else "-"
        ax.plot(s["kappas"], tl[m], ls, marker="o", ms=4, color=COLORS.get(m, "k"), label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("κ(Σ)")
    ax.set_ylabel("test MSE after one step + ridge")
    ax.set_title("Single-index: one large step, then ridge on fresh data", fontsize=10)
    ax.legend(fontsize=7)
    figs["fig3_single_index_test_loss"] = fig
    return figs


def finite(x) -> bool:
    """Whether ``x`` is a finite number (``None`` is not)."""
    return x is not None and math.isfinite(x)
