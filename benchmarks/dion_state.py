"""Dion's optimizer-state bytes per leaf at rank fractions 1, 1/4, 1/16, against Muon.

On the GPT-style transformer parameter tree of the other benchmarks
(``benchmarks.step_time.transformer_shapes``: width 256, 4 blocks, vocabulary
256, context 128; ``--quick``: width 64, 2 blocks, vocabulary 64, context 32), for
every matrix leaf (the leaves Muon and Dion both treat as matrices, by
:func:`layerwise_optax.layer_roles`) the bytes of Muon's state (its momentum)
and of Dion's (the error-feedback buffer ``M`` plus the right factors ``Q``,
``fan_out x r``). The state is built abstractly (``jax.eval_shape``): byte
counts are exact and deterministic. Also the totals of the whole alias states
(AdamW's part for the other leaves included).

Step time: each optimizer's update step, compiled ahead of time, timed in
interleaved rounds (:func:`benchmarks.harness.time_interleaved`). Run the timing
on a quiet machine only; ``--no-timing`` skips it (the byte counts only).

Run: ``python -m benchmarks.dion_state [--quick] [--no-timing] [--rounds N] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import jax
import jax.numpy as jnp
import optax

import layerwise_optax as lo
from benchmarks import harness
from benchmarks.step_time import make_tree, transformer_shapes

FRACTIONS = {"1": 1.0, "1/4": 0.25, "1/16": 1 / 16}


def _configs(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(width=64, depth=2, vocab=64, context=32)
    return dict(width=256, depth=4, vocab=256, context=128)


def optimizers() -> dict[str, Any]:
    """``{name: alias}``: Muon and Dion at each rank fraction."""
    out = {"muon": lo.muon(0.02)}
    for label, f in FRACTIONS.items():
        out[f"dion_{label}"] = lo.dion(0.02, rank_fraction=f)
    return out


def _inner(state: Any, kind: type) -> Any:
    found = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kind))
    return next(s for s in found if isinstance(s, kind))


def _nbytes(x: Any) -> int:
    return int(x.size * jnp.dtype(x.dtype).itemsize)


def state_bytes(params: Any) -> dict[str, Any]:
    """Per matrix leaf and in total: the state bytes of each optimizer (abstract)."""
    per_leaf: dict[str, dict[str, int]] = {}
    totals: dict[str, int] = {}
    for name, tx in optimizers().items():
        state = jax.eval_shape(tx.init, params)
        totals[name] = sum(_nbytes(x) for x in jax.tree.leaves(state))
        kind = lo.ScaleByMuonState if name == "muon" else lo.ScaleByDionState
        inner = _inner(state, kind)
        leaves = jax.tree_util.tree_flatten_with_path(inner.mu, is_leaf=_is_masked)[0]
        qs = None if name == "muon" else jax.tree.leaves(inner.q, is_leaf=_is_masked)
        for i, (path, mu) in enumerate(leaves):
            if _is_masked(mu):
                continue
            key = jax.tree_util.keystr(path)
            extra = 0 if qs is None else _nbytes(qs[i])
            per_leaf.setdefault(key, {})[name] = _nbytes(mu) + extra
    return {"per_leaf": per_leaf, "totals": totals}


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def step_times(params: Any, rounds: int) -> dict[str, Any]:
    """Median and min seconds of each optimizer's compiled step (interleaved rounds)."""
    grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
    steps = {}
    for name, tx in optimizers().items():
        carry = (params, tx.init(params), grads)
        fn, _ = harness.compile_step(harness.optimizer_step(tx), carry)
        steps[name] = (fn, carry)
    times = harness.time_interleaved(steps, rounds=rounds)
    return {n: {"median_s": statistics.median(t), "min_s": min(t)} for n, t in times.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Dion state bytes per leaf against Muon.")
    parser.add_argument("--quick", action="store_true", help="small transformer tree")
    parser.add_argument("--no-timing", action="store_true", help="byte counts only")
    parser.add_argument("--rounds", type=int, default=20, help="timed interleaved rounds")
    parser.add_argument("--out", default="benchmarks/results", help="record folder")
    args = parser.parse_args(argv)
    cfg = _configs(args.quick)
    params = make_tree(transformer_shapes(**cfg), jax.random.key(0))
    results: dict[str, Any] = state_bytes(params)
    if not args.no_timing:
        results["step_time"] = step_times(params, args.rounds)
    path = harness.write_record(
        args.out,
        "dion_state",
        {**cfg, "quick": args.quick, "timing": not args.no_timing, "fractions": FRACTIONS},
        results,
    )
    for leaf, row in results["per_leaf"].items():
        print(leaf, " ".join(f"{k}={v}" for k, v in row.items()))
    print("totals", results["totals"])
    print("record", path)
    return results


if __name__ == "__main__":
    main()
