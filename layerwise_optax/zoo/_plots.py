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
    """Fig. 1 (metrics vs iteration per kappa), Fig. 1b (hitting time vs kappa), head sweep.

    Returns:
      ``{'fig1_linear_rep': Figure, 'fig1b_hitting_vs_kappa': Figure,
      'head_conditioning': Figure}``.
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
    """Fig. 2 (alignment vs kappa and vs n, simulation and theory) and Fig. 3 (test loss)."""
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
