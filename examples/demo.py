"""Demo: Shampoo and SOAP against AdamW on an anisotropic teacher-student problem.

Inputs are x ~ N(0, Sigma) with a rotated, ill-conditioned Sigma (condition number
``--kappa``), the setting in which the paper shows that layer-wise preconditioning
matters. A two-layer tanh student learns a two-layer teacher with mini-batch
steps. Every optimizer gets the same learning-rate grid (best final training loss
wins) and the same seeds; the script writes ``demo.png`` (loss curves) and
``demo.json`` (every plotted number, the settings, versions and timings).

Run: ``python examples/demo.py --out results/demo`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import layerwise_optax as lo

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is in the notebooks/test extras
    tqdm = None


def make_task(seed: int, *, d_in: int, d_hidden: int, d_out: int, n: int, kappa: float):
    """Anisotropic Gaussian inputs and a random two-layer tanh teacher."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d_in, d_in)))
    eig = np.logspace(0, np.log10(kappa), d_in)
    eig = eig / eig.mean()
    x = (rng.standard_normal((n, d_in)) * np.sqrt(eig)) @ q.T
    w1 = rng.standard_normal((d_in, d_hidden)) / np.sqrt(d_in)
    w2 = rng.standard_normal((d_hidden, d_out)) / np.sqrt(d_hidden)
    y = np.tanh(x @ w1) @ w2
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def init_params(key, d_in, d_hidden, d_out):
    k1, k2 = jax.random.split(key)
    return {
        "hidden": {
            "kernel": jax.random.normal(k1, (d_in, d_hidden)) / np.sqrt(d_in),
            "bias": jnp.zeros(d_hidden),
        },
        "out": {
            "kernel": jax.random.normal(k2, (d_hidden, d_out)) / np.sqrt(d_hidden),
            "bias": jnp.zeros(d_out),
        },
    }


def mlp(p, x):
    h = jnp.tanh(x @ p["hidden"]["kernel"] + p["hidden"]["bias"][None, :])
    return h @ p["out"]["kernel"] + p["out"]["bias"][None, :]


def make_trainer(make_tx, x, y, *, steps: int, batch: int, d_hidden: int):
    """Compiles once per optimizer: ``run(key, learning_rate)`` -> full-data loss per step.

    The learning rate is a traced argument (every numeric hyperparameter of the
    library may be traced), so a whole learning-rate grid shares one compilation.
    """

    def loss_fn(p, xb, yb):
        return 0.5 * jnp.mean(jnp.sum((mlp(p, xb) - yb) ** 2, axis=-1))

    @jax.jit
    def run(key, learning_rate):
        tx = make_tx(learning_rate)

        def step(carry, k):
            p, s = carry
            idx = jax.random.choice(k, x.shape[0], (batch,), replace=False)
            u, s = tx.update(jax.grad(loss_fn)(p, x[idx], y[idx]), s, p)
            p = optax.apply_updates(p, u)
            return (p, s), loss_fn(p, x, y)

        params = init_params(key, x.shape[1], d_hidden, y.shape[1])
        keys = jax.random.split(jax.random.fold_in(key, 1), steps)
        _, losses = jax.lax.scan(step, (params, tx.init(params)), keys)
        return jnp.concatenate([loss_fn(params, x, y)[None], losses])

    return run


OPTIMIZERS = {
    "adamw": lambda lr: optax.adamw(lr, weight_decay=0.0),
    "shampoo": lambda lr: lo.shampoo(lr, precondition_frequency=10),
    "soap": lambda lr: lo.soap(lr, precondition_frequency=10),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/demo", help="output folder")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--kappa", type=float, default=100.0)
    parser.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.seeds < 1 or args.kappa < 1:
        parser.error("--steps and --seeds must be >= 1 and --kappa >= 1")
    steps = 30 if args.quick else args.steps
    seeds = 1 if args.quick else args.seeds
    dims = dict(d_in=32, d_hidden=64, d_out=8)
    lrs = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    x, y = make_task(0, **dims, n=4096, kappa=args.kappa)

    jobs = [(name, lr, s) for name in OPTIMIZERS for lr in lrs for s in range(seeds)]
    bar = tqdm(jobs, desc="demo", unit="run") if tqdm else jobs
    curves: dict[str, dict[float, list[np.ndarray]]] = {
        n: {lr: [] for lr in lrs} for n in OPTIMIZERS
    }
    seconds: dict[str, float] = {n: 0.0 for n in OPTIMIZERS}
    trainers = {
        n: make_trainer(f, x, y, steps=steps, batch=256, d_hidden=dims["d_hidden"])
        for n, f in OPTIMIZERS.items()
    }
    for name, lr, seed in bar:
        t0 = time.perf_counter()
        losses = trainers[name](jax.random.key(seed), jnp.float32(lr))
        curves[name][lr].append(np.asarray(jax.block_until_ready(losses)))
        seconds[name] += time.perf_counter() - t0

    results = {}
    for name in OPTIMIZERS:
        finals = {lr: float(np.mean([c[-1] for c in curves[name][lr]])) for lr in lrs}
        finals = {lr: (v if np.isfinite(v) else float("inf")) for lr, v in finals.items()}
        best = min(finals, key=finals.get)
        mean_curve = np.mean(curves[name][best], axis=0)
        results[name] = {
            "best_learning_rate": best,
            "final_loss_by_learning_rate": {str(k): v for k, v in finals.items()},
            "loss_curve": [float(v) for v in mean_curve],
            "final_loss": float(mean_curve[-1]),
            "wall_seconds_all_runs": seconds[name],
        }
    target = results["adamw"]["final_loss"]
    for r in results.values():
        hit = np.nonzero(np.asarray(r["loss_curve"]) <= target)[0]
        r["steps_to_adamw_final_loss"] = int(hit[0]) if hit.size else None

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "settings": {
            **dims,
            "n": 4096,
            "kappa": args.kappa,
            "steps": steps,
            "seeds": seeds,
            "batch": 256,
            "learning_rates": lrs,
            "quick": args.quick,
        },
        "versions": {
            "jax": jax.__version__,
            "optax": optax.__version__,
            "layerwise_optax": lo.__version__,
            "python": platform.python_version(),
        },
        "device": jax.devices()[0].device_kind,
        "results": results,
    }
    text = json.dumps(record, indent=2)
    _atomic_write(out / "demo.json", lambda tmp: tmp.write_text(text))
    _plot(results, out / "demo.png", args.kappa)
    for name, r in results.items():
        print(
            f"{name:8s} best lr {r['best_learning_rate']:.0e}  final loss {r['final_loss']:.4g}  "
            f"steps to AdamW's final loss: {r['steps_to_adamw_final_loss']}"
        )
    print(f"wrote {out / 'demo.png'} and {out / 'demo.json'}")


def _atomic_write(path: pathlib.Path, write) -> None:
    # The writer creates the temporary file, so it gets the usual permissions of a new
    # file (tempfile.mkstemp would make it 0600, and the rename would keep that).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _plot(results, path: pathlib.Path, kappa: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ax.plot(r["loss_curve"], label=f"{name} (lr {r['best_learning_rate']:.0e})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (full data)")
    ax.set_title(f"Teacher-student MLP, anisotropic inputs, κ(Σ) = {kappa:g}")
    ax.legend()
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


if __name__ == "__main__":
    main()
