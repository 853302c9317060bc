"""Steps and time to AdamW's loss on real data (scikit-learn's handwritten digits).

The question a user asks: at the same tuning budget, does a layer-wise optimizer
reach AdamW's loss in fewer steps, and in less wall-clock? Protocol:

* data: ``sklearn.datasets.load_digits`` (1797 8×8 images, 10 classes; ships
  with scikit-learn, no download), standardized, a fixed 80/20 split;
* model: a Flax NNX MLP 64-128-128-10 (tanh), cross-entropy, minibatches of 128
  drawn by a seeded permutation per epoch, ``--steps`` steps (200: ~18 epochs;
  by 600 steps every method interpolates the training set, losses < 1e-4, and the
  target no longer tells methods apart);
* tuning budget: the same number of log-spaced learning rates for every method
  (7; 3 in ``--quick``) around its usual range, and ``--seeds`` seeds;
* target: AdamW's final training loss at its best learning rate (median over
  seeds of the mean of the last 20 steps). A method's *steps to target* is, at
  its best learning rate, the median over seeds of the first step whose
  20-step running mean is at or below the target (``inf`` if never);
* time: each method's compiled training step (forward, backward and update; for
  K-FAC with the statistics capture) timed in interleaved rounds
  (``harness.time_interleaved``); *time to target* = steps × step time.

Run: ``python -m benchmarks.time_to_target [--quick] [--out DIR]`` (needs
scikit-learn: ``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import layerwise_optax as lo
from benchmarks import harness
from layerwise_optax import flax as lof

WINDOW = 20


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden1 = nnx.Linear(64, 128, rngs=rngs)
        self.hidden2 = nnx.Linear(128, 128, rngs=rngs)
        self.head = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.hidden2(jnp.tanh(self.hidden1(x)))))


def load_digits(seed: int = 0):
    try:
        from sklearn.datasets import load_digits as sk_load
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit(
            f"time_to_target needs scikit-learn (pip install -e '.[bench]'): {e}"
        ) from None
    x, y = sk_load(return_X_y=True)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_train = int(0.8 * len(x))
    tr, te = perm[:n_train], perm[n_train:]
    return (
        (jnp.asarray(x[tr], jnp.float32), jnp.asarray(y[tr], jnp.int32)),
        (jnp.asarray(x[te], jnp.float32), jnp.asarray(y[te], jnp.int32)),
    )


def _grid(lo_exp: float, hi_exp: float, n: int) -> list[float]:
    return [float(v) for v in np.logspace(lo_exp, hi_exp, n)]


# name -> (factory(lr) -> optax transform, log10 lr range, uses K-FAC statistics)
def methods(
    n: int,
) -> dict[str, tuple[Callable[[float], optax.GradientTransformation], list[float], bool]]:
    adam_like = _grid(-4, -1, n)
    return {
        "adamw": (lambda lr: optax.adamw(lr), adam_like, False),
        "shampoo": (lambda lr: lo.shampoo(lr, precondition_frequency=10), adam_like, False),
        "soap": (lambda lr: lo.soap(lr, precondition_frequency=10), adam_like, False),
        "kfac": (
            lambda lr: lo.kfac(lr, precondition_frequency=10, factor_decay=0.95, damping=1e-3),
            _grid(-3, 0, n),
            True,
        ),
        "muon": (lambda lr: lo.muon(lr, adam_learning_rate=1e-3), _grid(-3, 0, n), False),
        "normuon": (lambda lr: lo.normuon(lr, adam_learning_rate=1e-3), adam_like, False),
        "steepest_descent": (lambda lr: lo.steepest_descent(lr), _grid(-3, 0, n), False),
        "psgd_kron": (lambda lr: lo.psgd_kron(lr), adam_like, False),
    }


def make_train(factory, use_stats: bool, data, steps: int, batch: int):
    (xtr, ytr), _ = data
    n = xtr.shape[0]
    per_epoch = n // batch
    capture = lof.kfac_value_and_grad(lambda m, x: m(x), "softmax_cross_entropy")

    def loss_fn(model, x, y):
        return lof.softmax_cross_entropy(model(x), y)

    def one_step(tx, graphdef, params, state, x, y):
        model = nnx.merge(graphdef, params)
        if use_stats:
            loss, grads, stats = capture(model, x, y)
            updates, state = tx.update(nnx.as_pure(grads), state, params, kfac_stats=stats)
        else:
            loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
            updates, state = tx.update(nnx.as_pure(grads), state, params)
        return loss, optax.apply_updates(params, updates), state

    def train(lr, seed):
        tx = factory(lr)
        graphdef, params = nnx.split(MLP(nnx.Rngs(jax.random.key(seed))), nnx.Param)
        params = nnx.as_pure(params)
        state = tx.init(params)
        key = jax.random.key(seed)
        perms = jax.vmap(lambda k: jax.random.permutation(k, n))(
            jax.random.split(key, steps // per_epoch + 1)
        )

        def body(carry, t):
            params, state = carry
            idx = jax.lax.dynamic_slice(perms[t // per_epoch], ((t % per_epoch) * batch,), (batch,))
            loss, params, state = one_step(tx, graphdef, params, state, xtr[idx], ytr[idx])
            return (params, state), loss

        (params, _), losses = jax.lax.scan(body, (params, state), jnp.arange(steps))
        return losses, params

    def step_fn(lr):
        """A single compiled training step for timing: carry (params, state, x, y)."""
        tx = factory(lr)
        graphdef, params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)
        params = nnx.as_pure(params)
        state = tx.init(params)

        def step(carry):
            params, state, x, y = carry
            _, params, state = one_step(tx, graphdef, params, state, x, y)
            return params, state, x, y

        return step, (params, state, xtr[:batch], ytr[:batch])

    return train, step_fn, nnx.split(MLP(nnx.Rngs(0)), nnx.Param)[0]


def _first_hit(losses: np.ndarray, target: float) -> float:
    run = np.convolve(losses, np.ones(WINDOW) / WINDOW, mode="valid")
    hits = np.nonzero(run <= target * (1 + 1e-6))[0]  # AdamW meets its own target
    return float(hits[0] + WINDOW) if hits.size else math.inf


def run(args) -> dict:
    data = load_digits()
    (xte, yte) = data[1]
    table = methods(args.grid)
    if args.only:
        table = {k: v for k, v in table.items() if k in args.only or k == "adamw"}
    curves: dict = {}
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    total = sum(len(g) for _, g, _ in table.values()) * args.seeds
    bar = tqdm(total=total, desc="runs", disable=args.no_progress) if tqdm else None
    steppers = {}
    for name, (factory, grid, use_stats) in table.items():
        train, step_fn, graphdef = make_train(factory, use_stats, data, args.steps, args.batch)
        train = jax.jit(train)
        per_lr = {}
        for lr in grid:
            runs = []
            for seed in range(args.seeds):
                losses, params = train(jnp.float32(lr), seed)
                losses = np.asarray(losses)
                logits = nnx.merge(graphdef, params)(xte)
                acc = float(jnp.mean(jnp.argmax(logits, -1) == yte))
                runs.append({"losses": losses, "test_acc": acc})
                if bar:
                    bar.update(1)
            finals = [
                float(np.mean(r["losses"][-WINDOW:]))
                if np.all(np.isfinite(r["losses"][-WINDOW:]))
                else math.inf
                for r in runs
            ]
            per_lr[lr] = {
                "final_loss_median": statistics.median(finals),
                "test_acc_median": statistics.median(r["test_acc"] for r in runs),
                "losses": [r["losses"] for r in runs],
            }
        curves[name] = per_lr
        steppers[name] = step_fn
    if bar:
        bar.close()

    best = {n: min(c, key=lambda lr: c[lr]["final_loss_median"]) for n, c in curves.items()}
    target = curves["adamw"][best["adamw"]]["final_loss_median"]
    summary = {}
    for name, c in curves.items():
        hits = {
            lr: statistics.median(_first_hit(run, target) for run in c[lr]["losses"]) for lr in c
        }
        lr_star = min(hits, key=lambda lr: (hits[lr], c[lr]["final_loss_median"]))
        summary[name] = {
            "best_lr_by_final_loss": best[name],
            "final_loss": c[best[name]]["final_loss_median"],
            "test_acc": c[best[name]]["test_acc_median"],
            "steps_to_target": hits[lr_star],
            "lr_for_target": lr_star,
        }
    # Step times at each method's target learning rate, interleaved.
    compiled = {}
    for name in curves:
        step, carry = steppers[name](jnp.float32(summary[name]["lr_for_target"]))
        fn, _ = harness.compile_step(step, carry)
        compiled[name] = (fn, carry)
    times = harness.time_interleaved(compiled, rounds=5 if args.quick else 30)
    for name in curves:
        t = statistics.median(times[name])
        summary[name]["step_s"] = t
        summary[name]["time_to_target_s"] = summary[name]["steps_to_target"] * t
    a = summary["adamw"]
    for s in summary.values():
        s["steps_vs_adamw"] = s["steps_to_target"] / a["steps_to_target"]
        s["time_vs_adamw"] = s["time_to_target_s"] / a["time_to_target_s"]
    print(f"target loss (AdamW, lr {best['adamw']:.2g}): {target:.4f}")
    print(
        f"{'method':18s} {'steps':>7s} {'x AdamW':>8s} {'step ms':>8s} {'time x':>7s} {'final':>7s} {'test acc':>8s}"
    )
    for name, s in summary.items():
        print(
            f"{name:18s} {s['steps_to_target']:7.0f} {s['steps_vs_adamw']:8.2f} "
            f"{s['step_s'] * 1e3:8.2f} {s['time_vs_adamw']:7.2f} {s['final_loss']:7.4f} {s['test_acc']:8.3f}"
        )
    out_curves = {
        n: {str(lr): {k: v for k, v in d.items() if k != "losses"} for lr, d in c.items()}
        for n, c in curves.items()
    }
    best_curves = {
        n: np.median(np.stack(c[summary[n]["lr_for_target"]]["losses"]), 0).tolist()
        for n, c in curves.items()
    }
    return {
        "target_loss": target,
        "summary": summary,
        "grid": out_curves,
        "best_curves": best_curves,
    }


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, curve in results["best_curves"].items():
        c = np.convolve(np.asarray(curve), np.ones(WINDOW) / WINDOW, mode="valid")
        ax.plot(np.arange(WINDOW, WINDOW + len(c)), c, label=name)
    ax.axhline(results["target_loss"], color="k", ls="--", lw=0.8, label="AdamW target")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss ({WINDOW}-step mean)")
    ax.set_title("digits MLP, each method at its target learning rate")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="3-point grid, 1 seed, 150 steps (default 200)"
    )
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--grid", type=int, default=None, help="learning rates per method")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--only", nargs="*", default=None, help="methods (AdamW always runs)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    args.steps = args.steps or (150 if args.quick else 200)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.grid = args.grid or (3 if args.quick else 7)
    results = run(args)
    path = harness.write_record(args.out, "time_to_target", vars(args), results)
    plot(results, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
