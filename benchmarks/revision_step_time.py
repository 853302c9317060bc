"""Step time of every alias at two revisions of the library, side by side in one process.

For behaviour-preserving changes (a refactor must not slow a step down):
``python -m benchmarks.revision_step_time --base REV`` exports ``REV``'s
``layerwise_optax`` into a temporary directory as the package
``layerwise_optax_base`` (its imports rewritten), imports it beside the working
tree's ``layerwise_optax``, and times the same optimizer step of each alias
under both, interleaved round by round in a fresh random order
(:func:`benchmarks.harness.time_interleaved`), after ahead-of-time compilation
and warm-up. Two kinds of step per alias: *ordinary* (no refresh:
``precondition_frequency`` larger than the run) and *refresh* (a refresh every
step: frequency 1). It prints head/base ratios of the medians and minima and
writes one JSON record under ``<date>_revision_compare`` (not ``*_step_time``: the
README tables are generated from the newest ``step_time`` records).

The workload is a 3-layer MLP tree (``784x512``, ``512x512``, ``512x10`` kernels
with biases); ``--quick`` shrinks it for a smoke run.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def export_base(rev: str, into: pathlib.Path) -> str:
    """Writes ``rev``'s package as ``layerwise_optax_base`` under ``into``; returns its SHA."""
    sha = subprocess.check_output(["git", "rev-parse", rev], cwd=_ROOT, text=True).strip()
    archive = subprocess.run(
        ["git", "archive", sha, "layerwise_optax"], cwd=_ROOT, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    pkg = into / "layerwise_optax"
    for f in pkg.rglob("*.py"):
        text = re.sub(r"\blayerwise_optax\b", "layerwise_optax_base", f.read_text())
        f.write_text(text)
    pkg.rename(into / "layerwise_optax_base")
    return sha


def _tree(quick: bool):
    sizes = [(64, 32), (32, 32), (32, 10)] if quick else [(784, 512), (512, 512), (512, 10)]
    rng = np.random.default_rng(0)
    params = {}
    for i, (a, b) in enumerate(sizes):
        params[f"layer{i}"] = {
            "kernel": jnp.asarray(rng.standard_normal((a, b)) / np.sqrt(a), jnp.float32),
            "bias": jnp.zeros((b,), jnp.float32),
        }
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    return params, grads


def _kfac_stats(lo, grads):
    """Identity factors per layer, the bias folded into its kernel (K-FAC's default layout)."""
    stats = {}
    for name, layer in grads.items():
        d_in, d_out = layer["kernel"].shape
        stats[name] = {
            "kernel": lo.KfacFactors(jnp.eye(d_in + 1), jnp.eye(d_out)),
            "bias": lo.FoldedBias(f"{name}/kernel"),
        }
    return stats


def _configs(frequency: int) -> dict[str, tuple[str, dict]]:
    big = dict(precondition_frequency=frequency)
    return {
        "shampoo": ("shampoo", dict(learning_rate=1e-3, block_size=128, **big)),
        "soap": ("soap", dict(learning_rate=1e-3, block_size=128, **big)),
        "kfac": ("kfac", dict(learning_rate=1e-3, **big)),
        "muon": ("muon", dict(learning_rate=1e-3)),
        "steepest_descent": ("steepest_descent", dict(learning_rate=1e-3)),
        "psgd_kron": ("psgd_kron", dict(learning_rate=1e-3, precond_update_prob=1.0 / frequency)),
        # Blocked: each fit solves a stack of triangular systems per factor, one
        # matrix at a time on CPU (linalg.one_at_a_time_on_cpu). Revisions before
        # 2026-12-01 batched them and hang here on a 2-core CPU: leave this alias
        # out (--only) when comparing against one of those.
        "psgd_kron_blocked": (
            "psgd_kron",
            dict(learning_rate=1e-3, block_size=128, precond_update_prob=1.0 / frequency),
        ),
    }


def _step(lo, name, factory, kwargs, params, grads):
    tx = getattr(lo, factory)(**kwargs)
    stats = _kfac_stats(lo, grads) if factory == "kfac" else None

    def step(carry):
        p, s, g = carry
        extra = {"kfac_stats": stats} if stats is not None else {}
        u, s = tx.update(g, s, p, **extra)
        return jax.tree.map(lambda a, b: a + 1e-6 * b, p, u), s, g

    carry = (params, tx.init(params), grads)
    compiled, compile_s = harness.compile_step(step, carry)
    return compiled, carry, compile_s


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        sha = export_base(args.base, pathlib.Path(tmp))
        sys.path.insert(0, tmp)
        try:
            base = importlib.import_module("layerwise_optax_base")
            head = importlib.import_module("layerwise_optax")
            params, grads = _tree(args.quick)
            results = {}
            for kind, frequency in (("ordinary", 10**6), ("refresh", 1)):
                steps, compile_s = {}, {}
                for name, (factory, kwargs) in _configs(frequency).items():
                    if args.only and name not in args.only:
                        continue
                    if kind == "refresh" and name in ("muon", "steepest_descent"):
                        continue  # nothing to refresh
                    for side, lo in (("base", base), ("head", head)):
                        fn, carry, c = _step(lo, name, factory, kwargs, params, grads)
                        steps[f"{name}/{side}"] = (fn, carry)
                        compile_s[f"{name}/{side}"] = c
                times = harness.time_interleaved(steps, rounds=rounds)
                for key, ts in times.items():
                    name, side = key.split("/")
                    entry = results.setdefault(kind, {}).setdefault(name, {})
                    entry[side] = {
                        "median_s": statistics.median(ts),
                        "min_s": min(ts),
                        "compile_s": compile_s[key],
                    }
        finally:
            sys.path.remove(tmp)
    print(f"head vs base {args.base} ({sha[:10]}), {rounds} interleaved rounds")
    print(f"{'kind':9s} {'alias':17s} {'base ms':>9s} {'head ms':>9s} {'median':>7s} {'min':>6s}")
    for kind, by_name in results.items():
        for name, e in by_name.items():
            b, h = e["base"], e["head"]
            e["ratio_median"] = h["median_s"] / b["median_s"]
            e["ratio_min"] = h["min_s"] / b["min_s"]
            print(
                f"{kind:9s} {name:17s} {1e3 * b['median_s']:9.3f} {1e3 * h['median_s']:9.3f} "
                f"{e['ratio_median']:7.3f} {e['ratio_min']:6.3f}"
            )
    config = {"base": args.base, "base_sha": sha, "rounds": rounds, "quick": args.quick}
    path = harness.write_record(args.out, "revision_compare", config, results)
    print("record:", path)


if __name__ == "__main__":
    main()
