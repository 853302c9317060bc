"""Figures of the paper's experiments, drawn from the JSON-ready results."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from layerwise_optax import _optional

COLORS = {
    "sgd": "tab:blue",
    "adam": "tab:orange",
    "batchnorm": "tab:brown",
    "dfw": "tab:purple",
    "kfac": "tab:red",
    "ngd": "tab:gray",
    "shampoo": "tab:green",
    "soap": "tab:pink",
}
"""One colour per method; pairs that are easy to confuse (SGD / batch-norm, Shampoo /
SOAP) also differ in line style (:data:`LINESTYLES`)."""
LINESTYLES = {"batchnorm": "--", "soap": "--", "ngd": "-."}
METRICS = (
    ("train_loss", "training loss"),
    ("distance", "subspace distance"),
    ("transfer_loss", "transfer loss"),
)
MARKERS = {"batchnorm": "s", "adam": "D"}
NOT_REACHED_MARKER = "^"
"""Marker of a point whose target was not reached within the budget (drawn above it)."""


def _plt():
    matplotlib = _optional.require("matplotlib", "layerwise_optax.zoo's figures")
    matplotlib.use("Agg", force=False)
    return _optional.require("matplotlib.pyplot", "layerwise_optax.zoo's figures")


def _arr(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _label(text: str) -> str:
    """A legend label with the combining hat of ``Σ̂`` (not drawn by the default font) as mathtext."""
    return text.replace("Σ̂", r"$\hat{\Sigma}$")


def _caption(fig, text: str) -> None:
    """A caption under the axes (constrained layout keeps room for it)."""
    import textwrap

    width = int(fig.get_figwidth() * 15)
    fig.supxlabel(textwrap.fill(text, width), fontsize=8, ha="center", ma="left")


def _hitting_plot(
    ax, xs, values, cap: int, color, label: str, ls: str = "-", slot: float = 0.0
) -> None:
    """Iterations-to-target vs ``xs``: reached values as filled circles joined by a line;
    ``None`` (not reached within ``cap``) as hollow triangles in a band above the cap,
    joined to their neighbours by a dotted line (the true value is unknown, only ``> cap``).
    ``slot`` shifts the triangles sideways (log-x factor ``1.08 ** slot``) so that several
    methods' triangles at one x stay visible.
    """
    xs = np.asarray(xs, float)
    reached = np.array([v is not None for v in values])
    above = cap * 1.3
    y = np.array([above if v is None else v for v in values], float)
    xs_all = np.where(reached, xs, xs * 1.08**slot)
    ax.plot(xs_all, y, color=color, lw=0.9, ls=":")
    y_line = np.where(reached, y, np.nan)
    ax.plot(xs, y_line, color=color, lw=1.4, ls=ls, marker="o", ms=4, label=label)
    ax.scatter(
        xs_all[~reached],
        y[~reached],
        marker=NOT_REACHED_MARKER,
        s=46,
        facecolors="none",
        edgecolors=color,
        linewidths=1.3,
    )


def _not_reached_band(ax, cap: int) -> None:
    ax.axhline(cap, color="k", ls=":", lw=0.8)
    ax.axhspan(cap * 1.12, cap * 1.55, color="0.92", zorder=0)
    ax.text(
        0.01,
        cap * 1.46,
        f"not reached within {cap} iterations",
        transform=ax.get_yaxis_transform(),
        fontsize=7,
        va="top",
        color="0.3",
    )
    ax.scatter(
        [],
        [],
        marker=NOT_REACHED_MARKER,
        facecolors="none",
        edgecolors="k",
        label="not reached (true value > cap)",
    )


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
    figs = {
        "fig1_linear_rep": _linear_rep_curves(plt, results),
        "fig1b_hitting_vs_kappa": _hitting_vs_kappa(plt, results),
    }
    if results.get("head_sweep"):
        figs["head_conditioning"] = _head_conditioning(plt, results)
    return figs


def _linear_rep_curves(plt: Any, results: dict[str, Any]) -> Any:
    """Fig. 1: training loss, subspace distance and transfer loss vs iteration, a row per κ(Σx)."""
    s = results["settings"]
    labels = results["labels"]
    curves = results["curves"]
    panel = [f"{k:g}" for k in s["panel_kappas"]]
    fig, axes = plt.subplots(
        len(panel),
        3,
        figsize=(13, 3.1 * len(panel) + 0.8),
        squeeze=False,
        constrained_layout=True,
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
                    ls=LINESTYLES.get(m, "-"),
                    lw=1.8 if m == "kfac" else 1.1,
                    label=_label(f"{labels[m]} (lr {c['learning_rate']:g})"),
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
        f"batch {s['batch_size']}, mean of {s['seeds']} seed{'s' * (s['seeds'] != 1)})",
        fontsize=11,
    )
    _caption(
        fig,
        "Training loss: population loss ½E‖y − FGx‖²; dotted line: its noise floor "
        f"d_y σ²/2 = {0.5 * s['d_y'] * s['noise'] ** 2:g}. Subspace distance: sine of the "
        "largest principal angle between the rows of the learned G and of G★; dotted line: "
        f"the target {s['target']:g} used for iterations-to-target. Transfer loss: error on a "
        "new task that shares G★ but has its own head, after refitting that head by least "
        "squares on 30 samples on top of the learned G. Each method at the learning rate in "
        "its legend (the grid value with the lowest final distance); DFW: P = I, Q = the batch's "
        "input covariance (input whitening only); NGD: damped full Gauss-Newton.",
    )
    return fig


def _hitting_vs_kappa(plt: Any, results: dict[str, Any]) -> Any:
    """Fig. 1b: median iterations to the target distance vs κ(Σx), per method."""
    s = results["settings"]
    labels = results["labels"]
    fig, ax = plt.subplots(figsize=(6.4, 5.0), constrained_layout=True)
    kappas = s["kappas"]
    cap = s["hit_cap"]
    hitting = results["hitting"]
    for i, (m, per_kappa) in enumerate(hitting.items()):
        med = [per_kappa[f"{k:g}"]["median"] for k in kappas]
        slot = i - (len(hitting) - 1) / 2
        _hitting_plot(
            ax, kappas, med, cap, COLORS.get(m), _label(labels[m]), LINESTYLES.get(m, "-"), slot
        )
    _not_reached_band(ax, cap)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("κ(Σx)")
    ax.set_ylabel(f"iterations to dist ≤ {s['target']:g} (median of {s['seeds']} seeds)")
    ax.set_title("Iterations to target vs input conditioning", fontsize=10)
    ax.legend(fontsize=7, loc="center right")
    _caption(
        fig,
        f"Median over seeds of the first iteration with subspace distance ≤ {s['target']:g}, "
        "each seed at its fastest learning rate. Hollow triangles in the grey band: the "
        f"median was not reached within {cap} iterations (dotted line; the true value is "
        "larger, not the plotted height).",
    )
    return fig


def _head_conditioning(plt: Any, results: dict[str, Any]) -> Any:
    """The AMD head-conditioning sweep: iterations to the target distance vs κ(F★)."""
    s = results["settings"]
    fig, ax = plt.subplots(figsize=(6.4, 5.0), constrained_layout=True)
    cap = s["head_steps"]
    sweep = results["head_sweep"]
    for i, (m, per) in enumerate(sweep.items()):
        kfs = [float(k) for k in per]
        med = [per[k]["median"] for k in per]
        slot = i - (len(sweep) - 1) / 2
        _hitting_plot(
            ax, kfs, med, cap, COLORS.get(m), _label(results["head_labels"][m]), slot=slot
        )
    _not_reached_band(ax, cap)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("κ(F★) (head conditioning)")
    ax.set_ylabel(f"iterations to dist ≤ {s['target']:g}")
    ax.set_title(f"Head-conditioning sweep (AMD), κ(Σx) = {s['head_kappa_x']:g}", fontsize=10)
    ax.legend(fontsize=7, loc="center right")
    _caption(
        fig,
        "AMD (alternating min-descent): on every batch the head F is refit exactly by "
        "least squares, then only the representation G takes the method's step. The "
        "training head F★ has singular values log-spaced in [1, κ(F★)]. Iterations to "
        f"subspace distance ≤ {s['target']:g} (seed 0, fastest learning rate); hollow "
        f"triangles in the grey band: not reached within {cap} iterations.",
    )
    return fig


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
    return {
        "fig2_single_index_alignment": _alignment_figure(plt, results),
        "fig3_single_index_test_loss": _test_loss_figure(plt, results),
    }


def _alignment_figure(plt: Any, results: dict[str, Any]) -> Any:
    """Fig. 2: spike alignment vs κ(Σ) and vs n/d, simulation points and theory lines."""
    s = results["settings"]
    labels = results["labels"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3), constrained_layout=True)
    for ax, key, xs, xlabel in (
        (axes[0], "alignment_vs_kappa", s["kappas"], "κ(Σ)"),
        (axes[1], "alignment_vs_n", [n / s["d"] for n in s["ns"]], "n / d"),
    ):
        r = results[key]
        for m in s["methods"]:
            ax.plot(
                xs,
                r[m],
                MARKERS.get(m, "o"),
                color=COLORS.get(m),
                label=_label(f"{labels[m]} (simulation)"),
                ms=5,
                mfc="none" if m == "batchnorm" else None,
            )
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
    _caption(
        fig,
        "Alignment |cos| between the top right singular vector v of the first-layer step and "
        "β★ after one step from initialization. Markers: simulation (mean over seeds); solid "
        "lines: closed-form predictions for SGD and K-FAC (input whitening by Σ̂ + λI); dashed: "
        "cos∠(Σβ★, β★), SGD's limit as n → ∞.",
    )
    return fig


def _test_loss_figure(plt: Any, results: dict[str, Any]) -> Any:
    """Fig. 3: test MSE after one step and a ridge refit vs κ(Σ), with the no-step baseline."""
    s = results["settings"]
    labels = results["labels"]
    fig, ax = plt.subplots(figsize=(6.4, 5.0), constrained_layout=True)
    tl = results["test_loss"]
    for m in (*s["methods"], "random_features"):
        label = _label(labels.get(m, "no step (random features)"))
        ls = "--" if m == "random_features" else LINESTYLES.get(m, "-")
        ax.plot(s["kappas"], tl[m], ls, marker="o", ms=4, color=COLORS.get(m, "k"), label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("κ(Σ)")
    ax.set_ylabel("test MSE after one step + ridge")
    ax.set_title("Single-index: one large step, then ridge on fresh data", fontsize=10)
    ax.legend(fontsize=7)
    _caption(
        fig,
        "One large first-layer step W₀ − c D/‖D‖ along each method's direction D, then ridge "
        "regression of the second layer on fresh samples; c and the ridge tuned on "
        "validation data. Dashed black: no step (random features).",
    )
    return fig


def finite(x) -> bool:
    """Whether ``x`` is a finite number (``None`` is not)."""
    return x is not None and math.isfinite(x)
