"""Step time and state memory: our Shampoo/SOAP vs Distributed Shampoo and AdamW.

All optimizers run in this one process on the same workloads and the same
gradients, at matched settings (block size, refresh period, grafting, damping).
For each workload the script also measures the *floor*: the matmuls that any
blocked Shampoo step cannot avoid (the per-axis statistics ``G G^T`` of every
block and the two-sided preconditioning ``L G R``), with the same block layout.

Run: ``python -m benchmarks.step_time [--quick] [--out DIR]``. Prints a table of
ratios and writes one JSON record under ``DIR/<date>_step_time/``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

import layerwise_optax as lo
from benchmarks import harness, peers
from layerwise_optax import _axes, _kron

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

WORKLOADS = {
    "square_1024": {"w": (1024, 1024)},
    "rect_512x2048": {"w": (512, 2048)},
    "conv_3x3x128x256": {"k": (3, 3, 128, 256)},
    "mlp_784_1024_1024_10": {
        "l1": {"kernel": (784, 1024), "bias": (1024,)},
        "l2": {"kernel": (1024, 1024), "bias": (1024,)},
        "l3": {"kernel": (1024, 10), "bias": (10,)},
    },
}
QUICK_WORKLOADS = {
    "square_256": {"w": (256, 256)},
    "mlp_64_128_10": {
        "l1": {"kernel": (64, 128), "bias": (128,)},
        "l2": {"kernel": (128, 10), "bias": (10,)},
    },
}


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def make_tree(shapes: Any, key: jax.Array) -> Any:
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, s) for k, s in zip(keys, leaves)])


def optimizers(args) -> dict[str, Any]:
    common = dict(
        block_size=args.block_size,
        precondition_frequency=args.frequency,
        max_precond_dim=max(args.block_size, 1024),
        grafting="rmsprop",
        damping=1e-6,
    )
    out = {
        "adamw": lambda: optax.adamw(1e-3),
        "shampoo_eigh": lambda: lo.shampoo(1e-3, root_method="eigh", **common),
        "shampoo_newton": lambda: lo.shampoo(1e-3, root_method="newton", **common),
        "soap": lambda: lo.soap(
            1e-3, block_size=args.block_size, precondition_frequency=args.frequency
        ),
    }
    ds, err = peers.distributed_shampoo()
    if ds is None:
        print(f"[peer skipped] {err}")
    else:
        out["ds_shampoo"] = lambda: peers.ds_shampoo(
            learning_rate=1e-3,
            block_size=args.block_size,
            frequency=args.frequency,
            graft="rmsprop",
            damping=1e-6,
            nesterov=False,
        )
    return out


def floor_step(plans: Any):
    """The unavoidable matmuls of one blocked Shampoo step, on the same block views."""

    def step(grads):
        def leaf(g, plan):
            if not plan.is_preconditioned:
                return g
            gb = plan.to_blocks(g)
            stats = _kron.axis_stats(gb, plan)
            return plan.from_blocks(_kron.apply_axis_matrices(gb, stats, plan))

        return _axes.map_leaves(leaf, plans, grads)

    return step


def documented_state_bytes(plans: Any, params: Any) -> int:
    """ScaleByShampooState size by its docstring formula (rmsprop graft: mu and nu)."""
    total = 4 + 4 + 4  # count, skipped_stats, failed_roots
    for plan, p in zip(
        jax.tree.leaves(plans, is_leaf=lambda x: isinstance(x, _axes.LeafPlan)),
        jax.tree.leaves(params),
    ):
        total += 2 * p.size * 4 + 2 * plan.state_floats() * 4
    return total


def run(args) -> dict[str, Any]:
    workloads = QUICK_WORKLOADS if args.quick else WORKLOADS
    opts = optimizers(args)
    results: dict[str, Any] = {}
    jobs = [(w, o) for w in workloads for o in list(opts) + ["floor"]]
    bar = tqdm(jobs, desc="step_time", unit="run") if tqdm else jobs
    for wname, oname in bar:
        params = make_tree(workloads[wname], jax.random.key(0))
        grads = make_tree(workloads[wname], jax.random.key(1))
        steps = args.steps
        if oname == "floor":
            plans = _axes.resolve(
                None, params, max_precond_dim=max(args.block_size, 1024), block_size=args.block_size
            )
            compiled, compile_s = harness.compile_step(floor_step(plans), grads)
            for _ in range(2):  # warm-up
                jax.block_until_ready(compiled(grads))
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(grads))
                times.append(time.perf_counter() - t0)
            timing = harness.summarize(compile_s, times, [], 1)
            results.setdefault(wname, {})[oname] = {"timing": timing}
            continue
        tx = opts[oname]()
        state = tx.init(params)

        def step(carry, grads, tx=tx):
            p, s = carry
            u, s = tx.update(grads, s, p)
            return optax.apply_updates(p, u), s

        compiled, compile_s = harness.compile_step(step, (params, state), grads)
        ordinary, refresh, final = harness.time_steps(
            lambda c: compiled(c, grads),
            (params, state),
            frequency=args.frequency,
            first_count=0,
            steps=steps,
        )
        finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(final[0]))
        entry = {
            "timing": harness.summarize(compile_s, ordinary, refresh, args.frequency),
            "state_bytes": harness.tree_bytes(state),
            "params_finite_after": finite,
        }
        if oname.startswith("shampoo"):
            plans = _axes.resolve(
                None, params, max_precond_dim=max(args.block_size, 1024), block_size=args.block_size
            )
            entry["documented_state_bytes"] = documented_state_bytes(plans, params)
        results.setdefault(wname, {})[oname] = entry
    return results


def print_table(results: dict[str, Any]) -> None:
    header = (
        f"{'workload':22s} {'optimizer':15s} {'ordinary ms':>12s} {'(min)':>7s} {'refresh ms':>11s} "
        f"{'amortized ms':>13s} {'vs DS':>7s} {'vs floor':>9s} {'(min)':>6s} {'state MB':>9s}"
    )
    print(header)
    print("-" * len(header))
    for wname, per in results.items():
        ds = per.get("ds_shampoo", {}).get("timing")
        floor = per["floor"]["timing"].ordinary_median_s
        floor_min = per["floor"]["timing"].ordinary_min_s
        for oname, e in per.items():
            t = e["timing"]
            vs_ds = (
                f"{t.amortized_s / ds.amortized_s:.2f}x"
                if ds is not None and oname != "floor"
                else ""
            )
            vs_floor = f"{t.ordinary_median_s / floor:.2f}x"
            vs_floor_min = f"{t.ordinary_min_s / floor_min:.2f}x"
            refresh = f"{1e3 * t.refresh_median_s:.1f}" if t.refresh_median_s else "-"
            mb = f"{e['state_bytes'] / 2**20:.1f}" if "state_bytes" in e else ""
            print(
                f"{wname:22s} {oname:15s} {1e3 * t.ordinary_median_s:12.2f} {1e3 * t.ordinary_min_s:7.2f} "
                f"{refresh:>11s} {1e3 * t.amortized_s:13.2f} {vs_ds:>7s} {vs_floor:>9s} "
                f"{vs_floor_min:>6s} {mb:>9s}"
            )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, for CI smoke runs")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--frequency", type=int, default=10)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 2 * args.frequency + 1 if args.quick else 4 * args.frequency + 1
    if args.block_size < 1 or args.frequency < 1 or args.steps < 1:
        parser.error("--block-size, --frequency and --steps must be >= 1")
    results = run(args)
    print_table(results)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    path = harness.write_record(args.out, "step_time", config, results)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
