"""Step time and state memory of every optimizer and its peer, across layer shapes.

All optimizers run in this one process on the same workloads (square matrices
128..2048, a rectangular one, a conv kernel, an MLP and a small transformer's
parameter tree) and the same gradients, at matched settings:

* Shampoo (eigh and Newton roots) and SOAP vs precondition-opt's Distributed
  Shampoo (block size, refresh period, RMSProp grafting, relative damping);
* Muon vs ``optax.contrib.muon`` (5 standard Newton-Schulz steps, Nesterov,
  β = 0.95; optax's told our layer roles through ``muon_weight_dimension_numbers``
  so both orthogonalize the same leaves, conv kernels as (window·in) × out);
* PSGD-Kron vs psgd-jax's ``kron`` (triangular factors for every axis). A fit
  happens on a random subset of steps, so the two step kinds are timed apart: a
  transform with ``precond_update_prob=1`` gives the *refresh* step, one with
  ``0`` the *ordinary* step, and *amortized* is at probability 1/frequency;
* AdamW as the common baseline.

For each optimizer family the script also measures a *floor*, the matmuls its
step cannot avoid, on the same layout: Shampoo's per-axis statistics ``G G^T``
of every block and the two-sided ``L G R`` (for Shampoo, SOAP and DS); five
Newton-Schulz iterations on every hidden matrix, three matmuls each (Muon); and
the application ``Q^T Q`` along every axis (PSGD).

Run: ``python -m benchmarks.step_time [--quick] [--out DIR]``. Prints a table of
ratios and writes one JSON record under ``DIR/<date>_step_time/``.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import optax

import layerwise_optax as lo
from benchmarks import harness, peers

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


def mlp_shapes(*sizes: int) -> dict:
    return {
        f"layer{i}": {"kernel": (a, b), "bias": (b,)}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
    }


def transformer_shapes(width: int, depth: int, vocab: int, context: int) -> dict:
    """A pre-norm GPT-style parameter tree in Flax naming (so layer roles apply)."""
    ln = {"scale": (width,), "bias": (width,)}
    block = {
        "ln1": ln,
        "qkv": {"kernel": (width, 3 * width)},
        "proj": {"kernel": (width, width), "bias": (width,)},
        "ln2": ln,
        "fc1": {"kernel": (width, 4 * width), "bias": (4 * width,)},
        "fc2": {"kernel": (4 * width, width), "bias": (width,)},
    }
    return {
        "embed": {"embedding": (vocab, width)},
        "pos_embed": (context, width),
        "blocks": {str(i): block for i in range(depth)},
        "ln_f": ln,
        "lm_head": {"kernel": (width, vocab), "bias": (vocab,)},
    }


WORKLOADS = {
    **{f"square_{n}": {"w": (n, n)} for n in (128, 256, 512, 1024, 2048)},
    "rect_512x2048": {"w": (512, 2048)},
    "conv_3x3x128x256": {"conv": {"kernel": (3, 3, 128, 256)}},
    "mlp_784_1024_1024_10": mlp_shapes(784, 1024, 1024, 10),
    "transformer_w256_d4": transformer_shapes(256, 4, vocab=256, context=128),
}
QUICK_WORKLOADS = {
    "square_128": {"w": (128, 128)},
    "conv_3x3x8x16": {"conv": {"kernel": (3, 3, 8, 16)}},
    "mlp_64_128_10": mlp_shapes(64, 128, 10),
    "transformer_w32_d1": transformer_shapes(32, 1, vocab=64, context=16),
}
# Which floor each optimizer is compared with, and which peer.
FAMILY = {
    "shampoo_eigh": ("floor_shampoo", "ds_shampoo"),
    "shampoo_newton": ("floor_shampoo", "ds_shampoo"),
    "soap": ("floor_shampoo", "ds_shampoo"),
    "ds_shampoo": ("floor_shampoo", None),
    "muon": ("floor_newton_schulz", "optax_contrib_muon"),
    "optax_contrib_muon": ("floor_newton_schulz", None),
    "psgd_kron": ("floor_psgd", "psgd_jax_kron"),
    "psgd_jax_kron": ("floor_psgd", None),
    "adamw": (None, None),
}
# Steps of optimizers without a periodic refresh: their steps are alike, and on the
# 2048-wide matrices one Muon or PSGD step takes seconds on a 2-core CPU.
PLAIN_STEPS = 7


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def make_tree(shapes: Any, key: jax.Array) -> Any:
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, s) for k, s in zip(keys, leaves)])


def optax_muon_dimension_numbers(params: Any) -> Any:
    """``optax.contrib.muon``'s leaf spec that orthogonalizes what our ``muon`` does.

    Hidden matrices as they are, conv kernels with every axis but the last
    contracted, stacked layers per slice; embeddings, the head and vectors get
    ``None`` (its AdamW), as in our layer roles.
    """
    from optax.contrib import MuonDimensionNumbers

    def spec(path, x, role):
        if role not in lo.HIDDEN_ROLES:
            return None
        # Our one kernel-to-matrix decision; optax maps the remaining axes as batch.
        dims = lo.matrix_dimension_numbers(role, x.shape, path)
        return MuonDimensionNumbers(*dims.factor_axes)

    return jax.tree_util.tree_map_with_path(spec, params, lo.layer_roles(params))


def optimizers(args, params) -> dict[str, Any]:
    """``{name: ('periodic' | 'plain', factory) or ('pair', (ordinary, refresh))}``."""
    common = dict(
        block_size=args.block_size,
        precondition_frequency=args.frequency,
        max_precond_dim=max(args.block_size, 1024),
        grafting="rmsprop",
        damping=1e-6,
    )
    out: dict[str, Any] = {
        "adamw": ("plain", lambda: optax.adamw(1e-3)),
        "shampoo_eigh": ("periodic", lambda: lo.shampoo(1e-3, root_method="eigh", **common)),
        "shampoo_newton": ("periodic", lambda: lo.shampoo(1e-3, root_method="newton", **common)),
        "soap": (
            "periodic",
            lambda: lo.soap(
                1e-3, block_size=args.block_size, precondition_frequency=args.frequency
            ),
        ),
    }
    ds, err = peers.distributed_shampoo()
    if ds is None:
        print(f"[peer skipped] {err}")
    else:
        out["ds_shampoo"] = (
            "periodic",
            lambda: peers.ds_shampoo(
                learning_rate=1e-3,
                block_size=args.block_size,
                frequency=args.frequency,
                graft="rmsprop",
                damping=1e-6,
                nesterov=False,
            ),
        )
    out["muon"] = ("plain", lambda: lo.muon(0.02))
    out["optax_contrib_muon"] = (
        "plain",
        lambda: optax.contrib.muon(
            0.02, muon_weight_dimension_numbers=optax_muon_dimension_numbers(params)
        ),
    )
    out["psgd_kron"] = (
        "pair",
        tuple((lambda p=p: lo.psgd_kron(1e-3, precond_update_prob=p)) for p in (0.0, 1.0)),
    )
    kron, why = peers.psgd_jax()
    if kron is None:
        print(f"[peer skipped] {why}")
    else:
        # psgd-jax fits when a counter reaches 1/p: "never" is p = 1e-9 there.
        out["psgd_jax_kron"] = (
            "pair",
            tuple(
                (
                    lambda p=p: kron.kron(
                        1e-3, preconditioner_update_probability=p, min_ndim_triangular=1
                    )
                )
                for p in (1e-9, 1.0)
            ),
        )
    if args.only:
        out = {k: v for k, v in out.items() if k in args.only}
    return out


def _shampoo_blocks(params: Any, args) -> list[tuple[tuple[int, ...], tuple[bool, ...]]]:
    """``(block stack shape, full factor per axis)`` of every preconditioned leaf.

    Read from the shapes of a blocked Shampoo state (its ``stats``: ``(stack, b, b)``
    per full factor, ``(stack, b)`` per diagonal one, empty for leaves without
    factors), so the floor runs on the very block views Shampoo uses.
    """
    tx = lo.scale_by_shampoo(block_size=args.block_size, max_precond_dim=max(args.block_size, 1024))
    state = jax.eval_shape(tx.init, params)
    out = []
    for stats in jax.tree.leaves(state.stats, is_leaf=lambda x: isinstance(x, tuple)):
        if any(s.size for s in stats):
            stack = stats[0].shape[0]
            out.append(((stack, *(s.shape[-1] for s in stats)), tuple(s.ndim == 3 for s in stats)))
    return out


def floor_shampoo(params: Any, args) -> Any:
    """The unavoidable matmuls of one blocked Shampoo step, on the same block views.

    Per block, every axis's statistic ``G_(i) G_(i)^T`` (a diagonal one: squares
    summed) and the application of one matrix per axis (``L G R`` for a matrix).
    The gradient arrives already blocked: the floor excludes the layout copies.
    Returns ``(step, blocks_for)`` like :func:`floor_psgd`.
    """
    layout = _shampoo_blocks(params, args)

    def stats(g, axis, full):
        x = jnp.moveaxis(g, axis, 1).reshape(g.shape[0], g.shape[axis], -1)
        return x @ jnp.swapaxes(x, 1, 2) if full else jnp.sum(x * x, axis=2)

    def apply(g, axis, s, full):
        x = jnp.moveaxis(g, axis, -1)
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        flat = flat @ jnp.swapaxes(s, 1, 2) if full else flat * s[:, None, :]
        return jnp.moveaxis(flat.reshape(x.shape), -1, axis)

    def step(blocks):
        out = []
        for gb, (_, kinds) in zip(blocks, layout):
            ss = [stats(gb, i + 1, full) for i, full in enumerate(kinds)]
            for i, (s, full) in enumerate(zip(ss, kinds)):
                gb = apply(gb, i + 1, s, full)
            out.append(gb)
        return out

    def blocks_for(grads):
        keys = jax.random.split(jax.random.key(0), max(len(layout), 1))
        return [jax.random.normal(k, shape) for k, (shape, _) in zip(keys, layout)]

    return step, blocks_for


def floor_newton_schulz(params: Any, args) -> Any:
    """Five Newton-Schulz iterations (``A = X Xᵀ``, ``B = A A``, ``B X``) per hidden matrix."""
    roles = lo.layer_roles(params)

    def step(grads):
        def leaf(g, role):
            if role not in ("matrix", "conv", "stacked"):
                return g
            x = g.reshape(-1, g.shape[-1]) if role == "conv" else g
            if role != "stacked" and x.shape[0] > x.shape[1]:
                x = x.T
            for _ in range(5):
                a = x @ jnp.swapaxes(x, -1, -2)
                x = 3.4 * x + (a @ a) @ x
            return x

        return jax.tree.map(leaf, grads, roles)

    return step


def floor_psgd(params: Any, args) -> Any:
    """The preconditioner's application: ``Qᵀ Q`` along every axis, two matmuls each."""

    def step(carry):
        grads, qs = carry

        def leaf(g, q):
            for axis, qa in enumerate(q):
                g = jnp.moveaxis(jnp.tensordot(qa, g, axes=(1, axis)), 0, axis)
                g = jnp.moveaxis(jnp.tensordot(qa.T, g, axes=(1, axis)), 0, axis)
            return g

        return jax.tree.map(leaf, grads, qs, is_leaf=lambda x: isinstance(x, tuple))

    def qs_for(grads):
        return jax.tree.map(lambda g: tuple(jnp.triu(jnp.eye(d)) for d in g.shape), grads)

    return step, qs_for


FLOORS = {
    "floor_shampoo": floor_shampoo,
    "floor_newton_schulz": floor_newton_schulz,
    "floor_psgd": floor_psgd,
}


def documented_state_bytes(state: Any, params: Any) -> int:
    """ScaleByShampooState size by its docstring's note (rmsprop graft: mu and nu).

    Params-shaped ``mu`` and ``nu``, and for the factors the statistics and the
    roots in one layout: twice the floats of ``stats``.
    """
    (inner,) = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, lo.ScaleByShampooState))
        if isinstance(s, lo.ScaleByShampooState)
    ]
    total = 4 + 4 + 4  # count, failures.skipped, failures.failed
    total += sum(2 * p.size * 4 for p in jax.tree.leaves(params))
    total += sum(2 * x.size * 4 for x in jax.tree.leaves(inner.stats))
    return total


def _time_plain(fn, carry, steps: int) -> list[float]:
    return harness.time_steps(fn, carry, frequency=None, first_count=0, steps=steps)[0]


def run_one(oname: str, spec, params, grads, args) -> dict[str, Any]:
    kind, make = spec
    plain_steps = min(args.steps, PLAIN_STEPS)
    if kind == "pair":
        timings = []
        for factory in make:
            tx = factory()
            state = tx.init(params)
            fn, compile_s = harness.compile_step(harness.optimizer_step(tx), (params, state, grads))
            timings.append((compile_s, _time_plain(fn, (params, state, grads), plain_steps)))
        (c0, ordinary), (_, refresh) = timings
        return {
            "timing": harness.summarize(c0, ordinary, refresh, args.frequency),
            "state_bytes": harness.tree_bytes(state),
        }
    tx = make()
    state = tx.init(params)
    fn, compile_s = harness.compile_step(harness.optimizer_step(tx), (params, state, grads))
    if kind == "plain":
        times = _time_plain(fn, (params, state, grads), plain_steps)
        return {
            "timing": harness.summarize(compile_s, times, [], 1),
            "state_bytes": harness.tree_bytes(state),
        }
    ordinary, refresh, final = harness.time_steps(
        fn, (params, state, grads), frequency=args.frequency, first_count=0, steps=args.steps
    )
    entry = {
        "timing": harness.summarize(compile_s, ordinary, refresh, args.frequency),
        "state_bytes": harness.tree_bytes(state),
        "params_finite_after": all(
            bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(final[0])
        ),
    }
    if oname.startswith("shampoo"):
        entry["documented_state_bytes"] = documented_state_bytes(state, params)
    return entry


def run_floor(fname: str, params, grads, args) -> dict[str, Any]:
    built = FLOORS[fname](params, args)
    if fname == "floor_psgd":
        step, qs_for = built
        arg = (grads, qs_for(grads))
    elif fname == "floor_shampoo":
        step, blocks_for = built
        arg = blocks_for(grads)
    else:
        step, arg = built, grads
    fn, compile_s = harness.compile_step(step, arg)
    n = args.steps if fname == "floor_shampoo" else min(args.steps, PLAIN_STEPS)
    times = harness.time_calls(fn, arg, reps=n)
    return {"timing": harness.summarize(compile_s, times, [], 1)}


def run(args) -> dict[str, Any]:
    workloads = QUICK_WORKLOADS if args.quick else WORKLOADS
    if args.workloads:
        workloads = {
            k: v for k, v in {**WORKLOADS, **QUICK_WORKLOADS}.items() if k in args.workloads
        }
    results: dict[str, Any] = {}
    jobs, trees = [], {}
    for w in workloads:
        params = make_tree(workloads[w], jax.random.key(0))
        trees[w] = (params, make_tree(workloads[w], jax.random.key(1)))
        opts = optimizers(args, params)
        floors = sorted({FAMILY[o][0] for o in opts if FAMILY.get(o, (None,))[0]})
        jobs += [(w, o, opts[o]) for o in opts] + [(w, f, None) for f in floors]
    bar = tqdm(jobs, desc="step_time", unit="run") if tqdm else jobs
    for wname, oname, spec in bar:
        if tqdm:
            bar.set_postfix_str(f"{wname} {oname}")
        params, grads = trees[wname]
        if spec is None:
            entry = run_floor(oname, params, grads, args)
        else:
            entry = run_one(oname, spec, params, grads, args)
        results.setdefault(wname, {})[oname] = entry
    for per in results.values():
        for oname, e in per.items():
            floor, peer = FAMILY.get(oname, (None, None))
            t = e["timing"]
            if floor in per:
                fl = per[floor]["timing"]
                e["vs_floor_ordinary"] = t.ordinary_median_s / fl.ordinary_median_s
                e["vs_floor_ordinary_min"] = t.ordinary_min_s / fl.ordinary_min_s
            if peer in per:
                pt = per[peer]["timing"]
                e["vs_peer"] = {
                    "peer": peer,
                    "amortized": t.amortized_s / pt.amortized_s,
                    "ordinary": t.ordinary_median_s / pt.ordinary_median_s,
                    "state_bytes": e["state_bytes"] / per[peer]["state_bytes"],
                }
                if t.refresh_median_s and pt.refresh_median_s:
                    e["vs_peer"]["refresh"] = t.refresh_median_s / pt.refresh_median_s
    return results


def print_table(results: dict[str, Any]) -> None:
    header = (
        f"{'workload':22s} {'optimizer':19s} {'ordinary ms':>12s} {'(min)':>8s} {'refresh ms':>11s} "
        f"{'amortized ms':>13s} {'vs peer':>8s} {'vs floor':>9s} {'state MiB':>10s}"
    )
    print(header)
    print("-" * len(header))
    for wname, per in results.items():
        for oname, e in per.items():
            t = e["timing"]
            vs_peer = f"{e['vs_peer']['amortized']:.2f}x" if "vs_peer" in e else ""
            vs_floor = f"{e['vs_floor_ordinary']:.2f}x" if "vs_floor_ordinary" in e else ""
            refresh = f"{1e3 * t.refresh_median_s:.1f}" if t.refresh_median_s else "-"
            mb = f"{e['state_bytes'] / 2**20:.2f}" if "state_bytes" in e else ""
            print(
                f"{wname:22s} {oname:19s} {1e3 * t.ordinary_median_s:12.2f} "
                f"{1e3 * t.ordinary_min_s:8.2f} {refresh:>11s} {1e3 * t.amortized_s:13.2f} "
                f"{vs_peer:>8s} {vs_floor:>9s} {mb:>10s}"
            )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, for CI smoke runs")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--frequency", type=int, default=10)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run")
    parser.add_argument("--workloads", nargs="*", default=None, help="default: all of the mode")
    parser.add_argument("--only", nargs="*", default=None, help="optimizers (default: all)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 2 * args.frequency + 1 if args.quick else 4 * args.frequency + 1
    if args.block_size < 1 or args.frequency < 1 or args.steps < 1:
        parser.error("--block-size, --frequency and --steps must be >= 1")
    known = set(WORKLOADS) | set(QUICK_WORKLOADS)
    for w in args.workloads or ():
        if w not in known:
            parser.error(f"unknown workload {w!r}; known: {sorted(known)}")
    results = run(args)
    print_table(results)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    path = harness.write_record(args.out, "step_time", config, results)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
