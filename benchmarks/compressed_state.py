"""Compressed state: float32 vs bfloat16 ``precond_dtype``, memory and quality, per Kronecker alias.

For Shampoo, SOAP, K-FAC and PSGD-Kron with their Kronecker state (statistics,
roots / eigenbases / Cholesky factors, PSGD's factors) stored in float32 or in
bfloat16 (accumulated in float32 and stored with stochastic rounding, see
``layerwise_optax._kron.stochastic_round``):

* **memory**: the optimizer-state bytes (``jax.eval_shape`` of ``init``, one
  device) on the two trees of ``benchmarks.sharded_state`` (the
  784-1024-1024-1024-10 MLP and the width-256 depth-4 transformer, block 128),
  beside :func:`benchmarks.projection.inventory`'s formula for the same
  configuration (the projection's float32 / bfloat16 columns): they must agree
  exactly;
* **quality**: steps to target on MNIST-1D and the character LM with the
  workloads of :mod:`benchmarks.time_to_target`: each alias at its
  steps-to-target learning rate from the latest ``time_to_target`` record (the
  best of its 7-point grid; K-FAC's final-loss one where it never reached the
  target), target = that record's AdamW loss, and the final loss (mean of the
  last 20 steps). Same seeds for both dtypes.

Reduced run (stated in benchmarks/README too): 2 seeds (the record used 3) and
the workloads' full step counts (600 MNIST-1D, 300 character LM); ``--quick``:
1 seed, 40 steps, MNIST-1D only.

Run: ``python -m benchmarks.compressed_state [--quick] [--seeds N] [--jobs N] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics

import jax
import jax.numpy as jnp
import numpy as np

import layerwise_optax as lo
from benchmarks import harness, projection, time_to_target
from benchmarks.workloads import WORKLOADS

ALIASES = ("shampoo", "soap", "kfac", "psgd_kron")
DTYPES = ("float32", "bfloat16")
QUALITY_WORKLOADS = ("mnist1d", "charlm")
_RESULTS = pathlib.Path(__file__).parent / "results"


def factory(alias: str, dtype: str):
    """``lr -> transform``: time_to_target's configuration with ``precond_dtype``."""
    d = jnp.dtype(dtype)
    if alias == "shampoo":
        return lambda lr: lo.shampoo(lr, precondition_frequency=10, precond_dtype=d)
    if alias == "soap":
        return lambda lr: lo.soap(lr, precondition_frequency=10, precond_dtype=d)
    if alias == "kfac":
        return lambda lr: lo.kfac(lr, precond_dtype=d)
    return lambda lr: lo.psgd_kron(lr, precond_dtype=d)


def latest_ttt_record(root: pathlib.Path = _RESULTS) -> pathlib.Path:
    """The newest ``time_to_target`` record that has every quality workload."""
    paths = sorted(root.glob("*_time_to_target/*.json"), key=lambda p: (p.parent.name, p.name))
    for path in reversed(paths):
        record = json.loads(path.read_text())
        if record["config"].get("quick"):
            continue  # a smoke run's learning rates and targets are not tuned
        if all(w in record["results"] for w in QUALITY_WORKLOADS):
            return path
    raise FileNotFoundError(f"no time_to_target record with {QUALITY_WORKLOADS} under {root}")


def memory(quick: bool) -> dict:
    """State bytes per tree, alias and dtype: the library's and the formula's."""
    from benchmarks import sharded_state

    out = {}
    for tree, (shapes, block) in sharded_state.workloads(quick).items():
        rows = {}
        for alias in ALIASES:
            for dtype in DTYPES:
                tx = projection.optimizer(
                    alias, block_size=block, precond_dtype=dtype, state_layout="replicated"
                )
                inv = projection.inventory(alias, shapes, block_size=block, precond_dtype=dtype)
                kron = sum(math.prod(s) * w * n for _, s, w, n in inv.blocks)
                rows[f"{alias}/{dtype}"] = {
                    "state_bytes": projection.eval_shape_bytes(tx, shapes),
                    "formula_bytes": inv.total_bytes(),
                    "kronecker_bytes": kron,
                }
        out[tree] = {"params": projection.param_count(shapes), "rows": rows}
    return out


def _run(job: tuple) -> dict:
    """One (workload, alias, dtype) at one learning rate over the seeds (a worker's task)."""
    wname, alias, dtype, lr, steps, seeds, target = job
    workload = WORKLOADS[wname]
    train_data, _, _ = workload.data()
    train, _, _ = time_to_target.make_train(
        factory(alias, dtype), alias == "kfac", workload, train_data, steps
    )
    train = jax.jit(train)
    hits, finals = [], []
    for seed in range(seeds):
        losses = np.asarray(train(jnp.float32(lr), seed)[0])
        hits.append(time_to_target._first_hit(losses, target))
        finals.append(time_to_target._final(losses))
    row = {
        "lr": lr,
        "steps_to_target": statistics.median(hits),
        "steps_to_target_per_seed": hits,
        "final_loss": statistics.median(finals),
        "final_loss_per_seed": finals,
    }
    print(wname, alias, dtype, row, flush=True)
    return row


def quality(args) -> dict:
    """Steps to target and final loss per workload, alias and dtype (median over seeds).

    With ``--jobs N`` the runs go to N worker processes (each compiles its own
    runs; the results do not depend on N).
    """
    record_path = latest_ttt_record()
    record = json.loads(record_path.read_text())["results"]
    out: dict = {"record": str(record_path.relative_to(_RESULTS.parent.parent))}
    jobs = []
    for wname in args.workloads:
        rec = record[wname]
        steps = args.steps or rec["steps"]
        out[wname] = {"steps": steps, "target_loss": rec["target_loss"], "rows": {}}
        for alias in ALIASES:
            summ = rec["summary"][alias]
            lr = summ["lr_for_target"]
            if not math.isfinite(summ["steps_to_target"]):
                lr = summ["best_lr_by_final_loss"]
            for dtype in DTYPES:
                jobs.append((wname, alias, dtype, lr, steps, args.seeds, rec["target_loss"]))
    if args.jobs > 1:
        import concurrent.futures
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            rows = list(pool.map(_run, jobs))
    else:
        rows = [_run(job) for job in jobs]
    for job, row in zip(jobs, rows):
        out[job[0]]["rows"][f"{job[1]}/{job[2]}"] = row
    return out


def table(results: dict) -> str:
    """The README table: bytes (library = formula) and steps to target / final loss."""
    heads = [f"{t} state MB (Kronecker part)" for t in results["memory"]]
    heads += [f"{w} steps to target (final loss)" for w in results["quality"]["workloads"]]
    lines = [
        "| alias | dtype | " + " | ".join(heads) + " |",
        "|---|---|" + "---|" * len(heads),
    ]
    for alias in ALIASES:
        for dtype in DTYPES:
            key = f"{alias}/{dtype}"
            cells = []
            for tree in results["memory"].values():
                r = tree["rows"][key]
                same = "" if r["state_bytes"] == r["formula_bytes"] else " ≠ formula"
                cells.append(
                    f"{r['state_bytes'] / 1e6:.1f} ({r['kronecker_bytes'] / 1e6:.1f}){same}"
                )
            for w in results["quality"]["workloads"]:
                q = results["quality"][w]["rows"].get(key)  # None: a run that did not finish
                cells.append(
                    "–" if q is None else f"{q['steps_to_target']:g} ({q['final_loss']:.4g})"
                )
            lines.append(f"| {alias} | {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 40 steps, MNIST-1D")
    parser.add_argument("--seeds", type=int, default=None, help="default 2 (quick: 1)")
    parser.add_argument("--steps", type=int, default=None, help="default: the record's")
    parser.add_argument("--workloads", nargs="*", default=None, choices=QUALITY_WORKLOADS)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes for the runs")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (1 if args.quick else 2)
    if args.quick:
        args.steps = args.steps or 40
        args.workloads = args.workloads or ["mnist1d"]
    args.workloads = args.workloads or list(QUALITY_WORKLOADS)
    if args.seeds < 1 or args.jobs < 1 or (args.steps is not None and args.steps < 1):
        parser.error("--seeds, --jobs and --steps must be >= 1")
    results = {"memory": memory(args.quick), "quality": {"workloads": args.workloads}}
    results["quality"].update(quality(args))
    text = table(results)
    print(text)
    results["table"] = text
    path = harness.write_record(args.out, "compressed_state", vars(args), results)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
