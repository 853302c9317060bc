"""Steps and time to AdamW's loss, at the same tuning budget, on real data and the paper's toys.

The question a user asks: at the same tuning budget, does a layer-wise optimizer
reach AdamW's loss in fewer steps, and in less wall-clock? Protocol, for each
workload of :mod:`benchmarks.workloads` (digits, MNIST-1D, a character-level
transformer on the standard library's source, the zoo's linear representation
problem at κ = 10 and 1000; all offline):

* minibatches drawn by a seeded permutation per epoch, the workload's number of
  steps, the whole run one ``lax.scan`` (so a run costs one compile per method);
* tuning budget: the same number of log-spaced learning rates for every method
  (7; 3 in ``--quick``) around its usual range, and ``--seeds`` seeds;
* target: AdamW's final training loss at its best learning rate (median over
  seeds of the mean of the last 20 steps). A method's *steps to target* is, at
  its best learning rate for that, the median over seeds of the first step whose
  20-step running mean is at or below the target (``inf`` if never);
* time: each method's compiled training step (forward, backward and update; for
  K-FAC with the statistics capture) timed in interleaved rounds
  (``harness.time_interleaved``); *time to target* = steps × step time;
* held-out quality at the best final-loss learning rate: test loss, and test
  accuracy for the classifiers.

Run: ``python -m benchmarks.time_to_target [--quick] [--workloads W ...]
[--out DIR]`` (needs scikit-learn and mnist1d: ``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import statistics
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import layerwise_optax as lo
from benchmarks import harness
from benchmarks.workloads import WORKLOADS, Workload
from layerwise_optax import _io
from layerwise_optax import flax as lof

WINDOW = 20
# The methods the time-to-target goal is about (the best of them counts).
KRONECKER = ("shampoo", "soap", "kfac")


def _grid(lo_exp: float, hi_exp: float, n: int) -> list[float]:
    return [float(v) for v in np.logspace(lo_exp, hi_exp, n)]


# name -> (factory(lr) -> optax transform, learning rates, uses K-FAC statistics; the
# string "curvature": also the exact curvature, for adaptive K-FAC)
def methods(
    n: int,
) -> dict[str, tuple[Callable[[float], optax.GradientTransformation], list[float], bool | str]]:
    adam_like = _grid(-4, -1, n)
    return {
        "adamw": (lambda lr: optax.adamw(lr), adam_like, False),
        "shampoo": (lambda lr: lo.shampoo(lr, precondition_frequency=10), adam_like, False),
        "soap": (lambda lr: lo.soap(lr, precondition_frequency=10), adam_like, False),
        "kfac": (
            lambda lr: lo.kfac(lr),
            _grid(-3, 0, n),
            True,
        ),
        # No grid: its defaults, the model's own step (learning_rate 1), one run per seed.
        "kfac_adaptive": (lambda lr: lo.kfac_adaptive(learning_rate=lr), [1.0], "curvature"),
        "muon": (lambda lr: lo.muon(lr, adam_learning_rate=1e-3), _grid(-3, 0, n), False),
        "normuon": (lambda lr: lo.normuon(lr, adam_learning_rate=1e-3), adam_like, False),
        "steepest_descent": (lambda lr: lo.steepest_descent(lr), _grid(-3, 0, n), False),
        "psgd_kron": (lambda lr: lo.psgd_kron(lr), adam_like, False),
    }


def _loss_fn(workload: Workload):
    return lof.mse if workload.loss == "mse" else lof.softmax_cross_entropy


def kfac_statistics(workload: Workload, choice: str = "auto") -> str:
    """K-FAC's output-gradient statistics for a workload.

    ``auto``: the exact Gauss-Newton factor for the squared error (the residual's
    covariance, which the empirical mode uses, shrinks with the loss and turns the
    step into ``1/residual``: on the zoo problem K-FAC then stalls at 30x AdamW's
    loss), and the empirical Fisher for cross-entropy (no extra backward pass;
    what the kfac-jax comparison in ``kfac_step`` uses).
    """
    if choice != "auto":
        return choice
    return "gauss_newton" if workload.loss == "mse" else "empirical"


def make_train(
    factory,
    use_stats: bool | str,
    workload: Workload,
    train_data,
    steps: int,
    statistics_mode="auto",
):
    """``train(lr, seed) -> (losses, params)`` and ``step_fn(lr) -> (step, carry)``."""
    xtr, ytr = train_data
    n, batch = xtr.shape[0], workload.batch
    per_epoch = n // batch
    loss_fn = _loss_fn(workload)
    mode = kfac_statistics(workload, statistics_mode)
    capture = lof.kfac_value_and_grad(lambda m, x: m(x), workload.loss, statistics=mode)
    graphdef = nnx.split(workload.model(nnx.Rngs(0)), nnx.Param)[0]

    def apply_pure(params, data):
        return nnx.merge(graphdef, params)(data[0])

    def one_step(tx, params, state, x, y, key):
        model = nnx.merge(graphdef, params)
        if use_stats == "curvature":
            loss, grads, stats = capture(model, x, y, key)
            # The params here are nnx.as_pure trees: the curvature takes the same tree.
            curv = lo.KfacCurvature(apply_pure, lambda z, d: loss_fn(z, d[1]), (x, y))
            updates, state = tx.update(
                nnx.as_pure(grads), state, params, kfac_stats=stats, curvature=curv
            )
        elif use_stats:
            loss, grads, stats = capture(model, x, y, key)
            updates, state = tx.update(nnx.as_pure(grads), state, params, kfac_stats=stats)
        else:
            loss, grads = nnx.value_and_grad(lambda m: loss_fn(m(x), y))(model)
            updates, state = tx.update(nnx.as_pure(grads), state, params)
        return loss, optax.apply_updates(params, updates), state

    def init(lr, seed):
        tx = factory(lr)
        _, params = nnx.split(workload.model(nnx.Rngs(jax.random.key(seed))), nnx.Param)
        params = nnx.as_pure(params)
        return tx, params, tx.init(params)

    def train(lr, seed):
        tx, params, state = init(lr, seed)
        perms = jax.vmap(lambda k: jax.random.permutation(k, n))(
            jax.random.split(jax.random.key(seed), steps // per_epoch + 1)
        )

        def body(carry, t):
            params, state = carry
            idx = jax.lax.dynamic_slice(perms[t // per_epoch], ((t % per_epoch) * batch,), (batch,))
            key = jax.random.fold_in(jax.random.key(seed + 10_000), t)
            loss, params, state = one_step(tx, params, state, xtr[idx], ytr[idx], key)
            return (params, state), loss

        (params, _), losses = jax.lax.scan(body, (params, state), jnp.arange(steps))
        return losses, params

    def step_fn(lr):
        """A single compiled training step for timing: carry (params, state, x, y)."""
        tx, params, state = init(lr, 0)

        def step(carry):
            params, state, x, y = carry
            _, params, state = one_step(tx, params, state, x, y, jax.random.key(0))
            return params, state, x, y

        return step, (params, state, xtr[:batch], ytr[:batch])

    def evaluate(params, test_data):
        x, y = test_data
        out = nnx.merge(graphdef, params)(x)
        metrics = {"test_loss": float(loss_fn(out, y))}
        if workload.loss != "mse":
            metrics["test_acc"] = float(jnp.mean(jnp.argmax(out, -1) == y))
        return metrics

    return train, step_fn, evaluate


def _first_hit(losses: np.ndarray, target: float) -> float:
    run = np.convolve(losses, np.ones(WINDOW) / WINDOW, mode="valid")
    hits = np.nonzero(run <= target * (1 + 1e-6))[0]  # AdamW meets its own target
    return float(hits[0] + WINDOW) if hits.size else math.inf


def _final(losses: np.ndarray) -> float:
    tail = losses[-WINDOW:]
    return float(np.mean(tail)) if np.all(np.isfinite(tail)) else math.inf


def time_methods(workload: Workload, train_data, summary: dict, args) -> None:
    """Adds step times (interleaved, at each method's target rate) and the ratios."""
    table = methods(1)
    compiled = {}
    for name in summary:
        factory, _, use_stats = table[name]
        _, step_fn, _ = make_train(
            factory, use_stats, workload, train_data, 1, args.kfac_statistics
        )
        step, carry = step_fn(jnp.float32(summary[name]["lr_for_target"]))
        fn, _ = harness.compile_step(step, carry)
        compiled[name] = (fn, carry)
    times = harness.time_interleaved(compiled, rounds=5 if args.quick else 30)
    for name in summary:
        t = statistics.median(times[name])
        summary[name]["step_s"] = t
        summary[name]["time_to_target_s"] = summary[name]["steps_to_target"] * t
    a = summary["adamw"]
    for s in summary.values():
        s["steps_vs_adamw"] = s["steps_to_target"] / a["steps_to_target"]
        s["time_vs_adamw"] = s["time_to_target_s"] / a["time_to_target_s"]


def kronecker_goal(summary: dict) -> dict | None:
    """The issue's goal: the best of Shampoo/SOAP/K-FAC by steps and by time."""
    kron = {n: summary[n] for n in KRONECKER if n in summary}
    if not kron:
        return None
    by_steps = min(kron, key=lambda n: kron[n]["steps_vs_adamw"])
    by_time = min(kron, key=lambda n: kron[n]["time_vs_adamw"])
    return {
        "best_steps": [by_steps, kron[by_steps]["steps_vs_adamw"]],
        "best_time": [by_time, kron[by_time]["time_vs_adamw"]],
        "steps_goal_met": kron[by_steps]["steps_vs_adamw"] <= 0.7,
        "time_goal_met": kron[by_time]["time_vs_adamw"] <= 1.0,
    }


def retime(path: str, args) -> dict:
    """Re-measures the step times of a record's runs; the training curves are kept.

    Steps to target do not depend on timing, so a change to the timing protocol
    needs only this, not the hours of training runs again.
    """
    import json

    record = json.loads(pathlib.Path(path).read_text())
    results = record["results"]
    for name, r in results.items():
        workload = WORKLOADS[name]
        train_data, _, _ = workload.data()
        time_methods(workload, train_data, r["summary"], args)
        r["kronecker_goal"] = kronecker_goal(r["summary"])
    for k in ("steps", "seeds", "grid", "only", "workloads"):
        setattr(args, k, record["config"].get(k))
    args.retimed_from = str(path)
    return results


def run_workload(workload: Workload, args, bar=None) -> dict:
    train_data, test_data, info = workload.data()
    steps = args.steps or (workload.quick_steps if args.quick else workload.steps)
    table = methods(args.grid)
    if args.only:
        table = {k: v for k, v in table.items() if k in args.only or k == "adamw"}
    curves: dict = {}
    for name, (factory, grid, use_stats) in table.items():
        train, _, evaluate = make_train(
            factory, use_stats, workload, train_data, steps, args.kfac_statistics
        )
        train = jax.jit(train)
        per_lr = {}
        for lr in grid:
            runs = []
            for seed in range(args.seeds):
                losses, params = train(jnp.float32(lr), seed)
                runs.append({"losses": np.asarray(losses), **evaluate(params, test_data)})
                if bar is not None:
                    bar.update(1)
            per_lr[lr] = {
                "final_loss_median": statistics.median(_final(r["losses"]) for r in runs),
                **{
                    f"{k}_median": statistics.median(r[k] for r in runs)
                    for k in runs[0]
                    if k != "losses"
                },
                "losses": [r["losses"] for r in runs],
            }
        curves[name] = per_lr

    best = {n: min(c, key=lambda lr: c[lr]["final_loss_median"]) for n, c in curves.items()}
    target = curves["adamw"][best["adamw"]]["final_loss_median"]
    summary = {}
    for name, c in curves.items():
        hits = {
            lr: statistics.median(_first_hit(run, target) for run in c[lr]["losses"]) for lr in c
        }
        lr_star = min(hits, key=lambda lr: (hits[lr], c[lr]["final_loss_median"]))
        b = c[best[name]]
        summary[name] = {
            "best_lr_by_final_loss": best[name],
            "final_loss": b["final_loss_median"],
            "test_loss": b["test_loss_median"],
            "test_acc": b.get("test_acc_median"),
            "steps_to_target": hits[lr_star],
            "lr_for_target": lr_star,
        }
    time_methods(workload, train_data, summary, args)
    goal = kronecker_goal(summary)
    out_curves = {
        n: {str(lr): {k: v for k, v in d.items() if k != "losses"} for lr, d in c.items()}
        for n, c in curves.items()
    }
    best_curves = {
        n: np.median(np.stack(c[summary[n]["lr_for_target"]]["losses"]), 0).tolist()
        for n, c in curves.items()
    }
    return {
        "description": workload.description,
        "data": info,
        "steps": steps,
        "batch": workload.batch,
        "kfac_statistics": kfac_statistics(workload, args.kfac_statistics),
        "target_loss": target,
        "summary": summary,
        "kronecker_goal": goal,
        "grid": out_curves,
        "best_curves": best_curves,
    }


def print_summary(name: str, r: dict) -> None:
    print(f"\n[{name}] {r['description']}: target loss (AdamW) {r['target_loss']:.4g}")
    print(
        f"{'method':18s} {'steps':>7s} {'x AdamW':>8s} {'step ms':>8s} {'time x':>7s} "
        f"{'final':>8s} {'test loss':>9s} {'test acc':>8s}"
    )
    for m, s in r["summary"].items():
        acc = f"{s['test_acc']:8.3f}" if s["test_acc"] is not None else f"{'':8s}"
        print(
            f"{m:18s} {s['steps_to_target']:7.0f} {s['steps_vs_adamw']:8.2f} "
            f"{s['step_s'] * 1e3:8.2f} {s['time_vs_adamw']:7.2f} {s['final_loss']:8.4g} "
            f"{s['test_loss']:9.4g} {acc}"
        )
    if r["kronecker_goal"]:
        g = r["kronecker_goal"]
        print(
            f"best of {'/'.join(KRONECKER)}: steps {g['best_steps'][0]} {g['best_steps'][1]:.2f}x "
            f"(goal <= 0.7: {'met' if g['steps_goal_met'] else 'missed'}), time "
            f"{g['best_time'][0]} {g['best_time'][1]:.2f}x "
            f"(goal <= 1.0: {'met' if g['time_goal_met'] else 'missed'})"
        )


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        r = results[name]
        for method, curve in r["best_curves"].items():
            c = np.convolve(np.asarray(curve), np.ones(WINDOW) / WINDOW, mode="valid")
            ax.plot(np.arange(WINDOW, WINDOW + len(c)), c, label=method, lw=1.2)
        ax.axhline(r["target_loss"], color="k", ls="--", lw=0.8, label="AdamW target")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(name, fontsize=9)
    axes[0][0].set_ylabel(f"train loss ({WINDOW}-step mean)")
    axes[0][-1].legend(fontsize=6)
    fig.suptitle("each method at the learning rate that reaches AdamW's loss first", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2-point grid, 1 seed, each workload's quick_steps, methods AdamW/SOAP/K-FAC",
    )
    parser.add_argument(
        "--workloads", nargs="*", default=None, choices=sorted(WORKLOADS), help="default: all"
    )
    parser.add_argument("--steps", type=int, default=None, help="override every workload's")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--grid", type=int, default=None, help="learning rates per method")
    parser.add_argument("--only", nargs="*", default=None, help="methods (AdamW always runs)")
    parser.add_argument(
        "--kfac-statistics",
        default="auto",
        choices=["auto", "empirical", "fisher", "gauss_newton"],
        help="auto: gauss_newton for squared error, empirical for cross-entropy",
    )
    parser.add_argument(
        "--retime",
        default=None,
        metavar="RECORD",
        help="re-measure only the step times of RECORD's runs (writes a new record)",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.grid = args.grid or (2 if args.quick else 7)
    if args.quick and args.only is None:
        args.only = ["soap", "kfac"]
    for flag in ("steps", "seeds", "grid"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            parser.error(f"--{flag} must be >= 1, got {v}")
    results = retime(args.retime, args) if args.retime else train_all(args)
    for name, r in results.items():
        print_summary(name, r)
    path = harness.write_record(args.out, "time_to_target", vars(args), results)
    plot(results, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return results


def train_all(args) -> dict:
    """Every run of every method on every chosen workload, with one progress bar."""
    names = args.workloads or list(WORKLOADS)
    n_methods = len(methods(1)) if not args.only else 1 + len(set(args.only) - {"adamw"})
    total = len(names) * n_methods * args.grid * args.seeds
    bar = _io.progress_bar(total=total, desc="runs", disable=args.no_progress)
    results = {}
    for name in names:
        if bar is not None:
            bar.set_postfix_str(name)
        results[name] = run_workload(WORKLOADS[name], args, bar)
    if bar is not None:
        bar.close()
    return results


if __name__ == "__main__":
    main()
