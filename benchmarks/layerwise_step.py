"""Muon and PSGD-Kron optimizer steps against their peers, same process, same gradients.

For a 1024×1024 matrix and a 784-512-512-10 MLP's parameter tree (Flax layout,
biases included), times one optimizer step ``(params, state) -> (params', state')``
on a fixed gradient tree (the model's forward/backward is the same for every
optimizer and left out):

* ``lo.muon`` against ``optax.contrib.muon`` at identical settings (5 standard
  Newton-Schulz steps, Nesterov, β = 0.95, AdamW on the vectors);
* ``lo.psgd_kron`` against psgd-jax's ``kron`` at matched settings (triangular
  factors for every dimension ≤ 8192, including vectors: psgd-jax's
  ``min_ndim_triangular=1``; momentum 0.9 into the fit; precond_lr 0.1), once
  with a fit on every step (``precond_update_prob=1``) and once with none
  (``0``: only the preconditioner's application), so the amortized cost at any
  probability ``p`` is ``(1 - p) * none + p * every``;
* ``optax.adamw`` as the common baseline;
* on single matrices of 512×2048, 2048×512 and 1024² (quick: 64×256, 256×64,
  256²), Muon's Newton-Schulz methods side by side: ``lo.muon`` as shipped
  (``ns_method='auto'``: Gram Newton-Schulz where it has fewer flops), forced
  ``'standard'`` and ``'gram'``, and AOL pre-scaling with the 4-step ``'aol'``
  preset, against ``optax.contrib.muon``; XLA's flop count of each compiled
  step is recorded beside the times (deterministic, unlike the times).

Every figure is a median over timed steps after AOT compilation and warm-up
(``benchmarks.harness``). Run: ``python -m benchmarks.layerwise_step [--quick]
[--out DIR]``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import layerwise_optax as lo
from benchmarks import harness, peers


def _problems(quick: bool) -> dict[str, dict[str, jax.Array]]:
    n = 256 if quick else 1024
    sizes = (64, 128, 128, 10) if quick else (784, 512, 512, 10)
    mlp = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        mlp[f"layer{i}"] = {"kernel": jnp.zeros((a, b)), "bias": jnp.zeros(b)}
    return {f"matrix_{n}": {"w": jnp.zeros((n, n))}, "mlp": mlp}


def _ns_problems(quick: bool) -> dict[str, dict[str, jax.Array]]:
    """Single matrices for Muon's Newton-Schulz methods (tall, wide, square)."""
    shapes = (
        ((64, 256), (256, 64), (256, 256)) if quick else ((512, 2048), (2048, 512), (1024, 1024))
    )
    return {f"ns_{m}x{n}": {"w": jnp.zeros((m, n))} for m, n in shapes}


def _ns_optimizers(params) -> dict:
    del params
    roles = lambda p: lo.layer_roles(p, infer_head=False)  # noqa: E731
    return {
        "muon": lo.muon(0.02, roles=roles),
        "muon_standard": lo.muon(0.02, roles=roles, ns_method="standard"),
        "muon_gram": lo.muon(0.02, roles=roles, ns_method="gram"),
        "muon_aol": lo.muon(0.02, roles=roles, ns_prescale="aol", ns_coeffs="aol"),
        "optax_contrib_muon": optax.contrib.muon(0.02),
    }


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float((cost or {}).get("flops", float("nan")))


def _optimizers(params) -> dict:
    txs = {
        "adamw": optax.adamw(1e-3),
        # Identical settings: optax's muon orthogonalizes the head too.
        "muon": lo.muon(0.02, roles=lambda p: lo.layer_roles(p, infer_head=False)),
        "optax_contrib_muon": optax.contrib.muon(0.02),
    }
    for p in (1.0, 0.0):
        txs[f"psgd_kron_p{p:g}"] = lo.psgd_kron(1e-3, precond_update_prob=p)
    kron, why = peers.psgd_jax()
    if kron is None:
        print(why)
        txs["psgd_jax_unavailable"] = why
    else:
        for p in (1.0, 0.0):
            # psgd-jax fits when a counter reaches 1/p (deterministic): p=0 divides
            # by zero, so "never" is p=1e-9 there.
            txs[f"psgd_jax_kron_p{p:g}"] = kron.kron(
                1e-3, preconditioner_update_probability=max(p, 1e-9), min_ndim_triangular=1
            )
    return txs


def run(args) -> dict:
    results: dict = {}
    rounds = 5 if args.quick else 30
    problems = [(p, params, _optimizers) for p, params in _problems(args.quick).items()]
    problems += [(p, params, _ns_optimizers) for p, params in _ns_problems(args.quick).items()]
    for pname, params, optimizers in problems:
        grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape), params)
        rows: dict = {}
        compiled = {}
        for name, tx in optimizers(params).items():
            if isinstance(tx, str):
                rows[name] = tx
                continue
            state = tx.init(params)

            fn, compile_s = harness.compile_step(harness.optimizer_step(tx), (params, state, grads))
            compiled[name] = (fn, (params, state, grads), compile_s)
            rows[name + "_state_bytes"] = harness.tree_bytes(state)
            rows[name + "_xla_flops"] = _flops(fn)
        # Interleaved rounds (one step of each optimizer per round): a slow patch of
        # the machine then hits every optimizer alike instead of whichever ran then.
        times = harness.time_interleaved(
            {n: (fn, carry) for n, (fn, carry, _) in compiled.items()}, rounds=rounds
        )
        for name, (_, _, compile_s) in compiled.items():
            rows[name] = harness.summarize(compile_s, times[name], [], 1)
            print(f"{pname:12s} {name:22s} {rows[name].ordinary_median_s * 1e3:9.3f} ms")
        med = {k: v.ordinary_median_s for k, v in rows.items() if hasattr(v, "ordinary_median_s")}
        mins = {k: v.ordinary_min_s for k, v in rows.items() if hasattr(v, "ordinary_min_s")}
        if optimizers is _ns_optimizers:
            ratios = {}
            for name in ("muon", "muon_standard", "muon_gram", "muon_aol"):
                ratios[f"{name}_vs_optax_contrib_muon"] = med[name] / med["optax_contrib_muon"]
                ratios[f"{name}_vs_optax_contrib_muon_min"] = (
                    mins[name] / mins["optax_contrib_muon"]
                )
                ratios[f"{name}_vs_optax_contrib_muon_flops"] = (
                    rows[name + "_xla_flops"] / rows["optax_contrib_muon_xla_flops"]
                )
            ratios["muon_gram_vs_muon_standard"] = med["muon_gram"] / med["muon_standard"]
            for k, v in ratios.items():
                print(f"{pname:12s} {k:40s} {v:6.2f}x")
            results[pname] = {"timings": rows, "ratios": ratios}
            continue
        ratios = {
            "muon_vs_optax_contrib_muon": med["muon"] / med["optax_contrib_muon"],
            "muon_vs_adamw": med["muon"] / med["adamw"],
            "psgd_kron_p1_vs_adamw": med["psgd_kron_p1"] / med["adamw"],
            "psgd_kron_p0_vs_adamw": med["psgd_kron_p0"] / med["adamw"],
        }
        if "psgd_jax_kron_p1" in med:
            ratios["psgd_kron_p1_vs_psgd_jax"] = med["psgd_kron_p1"] / med["psgd_jax_kron_p1"]
            ratios["psgd_kron_p0_vs_psgd_jax"] = med["psgd_kron_p0"] / med["psgd_jax_kron_p0"]
        # Minima too: on a shared 2-core machine the median still carries
        # scheduling noise; the fastest of 30 interleaved calls is each step's own cost.
        ratios["muon_vs_optax_contrib_muon_min"] = mins["muon"] / mins["optax_contrib_muon"]
        if "psgd_jax_kron_p1" in mins:
            ratios["psgd_kron_p1_vs_psgd_jax_min"] = mins["psgd_kron_p1"] / mins["psgd_jax_kron_p1"]
            ratios["psgd_kron_p0_vs_psgd_jax_min"] = mins["psgd_kron_p0"] / mins["psgd_jax_kron_p0"]
        for k, v in ratios.items():
            print(f"{pname:12s} {k:30s} {v:6.2f}x")
        results[pname] = {"timings": rows, "ratios": ratios}
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few steps")
    parser.add_argument("--out", default="benchmarks/results", help="record folder")
    args = parser.parse_args(argv)
    r = run(args)
    path = harness.write_record(args.out, "layerwise_step", vars(args), r)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
