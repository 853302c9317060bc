"""Timing discipline and self-describing records for the benchmarks.

* compile ahead of time (``jit(...).lower(...).compile()``) and record compile time;
* warm up, then time every step separately with ``jax.block_until_ready``, so
  that refresh steps (``count % precondition_frequency == 0``) and ordinary steps
  are reported apart, and the amortized cost is their weighted mean;
* report medians (and minima) over repeats;
* write one JSON record per run with config, git revision, versions and device.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from layerwise_optax import _io


@dataclasses.dataclass
class StepTiming:
    """Per-step timings of one optimizer on one workload (seconds)."""

    compile_s: float
    ordinary_median_s: float
    ordinary_min_s: float
    refresh_median_s: float | None
    refresh_min_s: float | None
    amortized_s: float
    steps_timed: int


def compile_step(fn: Callable[..., Any], *args: Any) -> tuple[Callable[..., Any], float]:
    """AOT-compiles ``fn`` for ``args``; returns the executable and compile seconds."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=()).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def optimizer_step(tx: Any) -> Callable[[Any], Any]:
    """``(params, state, grads) -> (params', state', grads)``: one update of ``tx``.

    The gradients travel in the carry: closed over, they would be compile-time
    constants that XLA folds into the step.
    """

    def step(carry):
        params, state, grads = carry
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, grads

    return step


def time_calls(fn: Callable[..., Any], *args: Any, reps: int, warmup: int = 2) -> list[float]:
    """Seconds of each of ``reps`` calls ``fn(*args)`` (same inputs), after ``warmup``."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return times


def time_steps(
    step: Callable[[Any], Any],
    state: Any,
    *,
    frequency: int | None,
    first_count: int,
    steps: int,
    warmup: int = 2,
) -> tuple[list[float], list[float], Any]:
    """Times ``state = step(state)`` call by call.

    Args:
      step: A compiled function from state to state.
      state: Initial state.
      frequency: Refresh period; the step with count ``c`` is a refresh step when
        ``c % frequency == 0``. ``None``: every step is ordinary.
      first_count: The optimizer count of ``state``.
      steps: Steps to time after warm-up.
      warmup: Untimed steps first.

    Returns:
      ``(ordinary_times, refresh_times, state)``.
    """
    count = first_count
    for _ in range(warmup):
        state = jax.block_until_ready(step(state))
        count += 1
    ordinary, refresh = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        state = jax.block_until_ready(step(state))
        dt = time.perf_counter() - t0
        (refresh if frequency and count % frequency == 0 else ordinary).append(dt)
        count += 1
    return ordinary, refresh, state


def time_interleaved(
    steps: dict[str, tuple[Callable[[Any], Any], Any]],
    *,
    rounds: int,
    warmup: int = 2,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Times several compiled steps in interleaved rounds (each ``carry = step(carry)``).

    Each round runs every step once, in a fresh seeded random order, so slow
    periods of the machine (other processes, frequency changes) and the cost of
    following a different kind of step are shared instead of landing on whichever
    optimizer happened to run then.

    Args:
      steps: ``{name: (compiled step, initial carry)}``.
      rounds: Timed rounds.
      warmup: Untimed rounds first.
      seed: Seed of the per-round orders.

    Returns:
      ``{name: [seconds per timed call]}``.
    """
    carries = {n: c for n, (_, c) in steps.items()}
    times: dict[str, list[float]] = {n: [] for n in steps}
    order = list(steps)
    rng = random.Random(seed)
    for r in range(warmup + rounds):
        # A step's cost depends on the step before it (on CPU, one after a cheap
        # AdamW step costs ~20% more; Muon right after a PSGD fit took 1.9x its
        # own median), so every round gets a new order. A cyclic rotation would
        # not do: it keeps each step's predecessor (measured: it put Muon after
        # PSGD in every round and read 1.54x optax's Muon, against 1.04x here).
        rng.shuffle(order)
        for n in order:
            fn = steps[n][0]
            t0 = time.perf_counter()
            carries[n] = jax.block_until_ready(fn(carries[n]))
            if r >= warmup:
                times[n].append(time.perf_counter() - t0)
    return times


def summarize(
    compile_s: float, ordinary: list[float], refresh: list[float], frequency: int
) -> StepTiming:
    """Medians and the amortized cost ``((f - 1) * ordinary + refresh) / f``."""
    o_med = statistics.median(ordinary)
    r_med = statistics.median(refresh) if refresh else None
    amortized = o_med if r_med is None else ((frequency - 1) * o_med + r_med) / frequency
    return StepTiming(
        compile_s=compile_s,
        ordinary_median_s=o_med,
        ordinary_min_s=min(ordinary),
        refresh_median_s=r_med,
        refresh_min_s=min(refresh) if refresh else None,
        amortized_s=amortized,
        steps_timed=len(ordinary) + len(refresh),
    )


def tree_bytes(tree: Any) -> int:
    """Total bytes of the arrays in a tree."""
    # Peers' states may hold Python scalars (kfac-jax's step counters): count them too.
    return int(
        sum(
            x.nbytes if hasattr(x, "nbytes") else np.asarray(x).nbytes
            for x in jax.tree.leaves(tree)
        )
    )


def git_revision() -> dict[str, Any]:
    """The git SHA of the working tree and whether it is dirty."""
    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=root, text=True).strip()
        dirty = bool(
            subprocess.check_output(["git", "status", "--porcelain"], cwd=root, text=True).strip()
        )
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "dirty": None}
    return {"sha": sha, "dirty": dirty}


def environment() -> dict[str, Any]:
    """Versions and device of this process."""
    import optax

    import layerwise_optax

    versions = {
        "jax": jax.__version__,
        "optax": optax.__version__,
        "layerwise_optax": layerwise_optax.__version__,
        "python": platform.python_version(),
    }
    from importlib.metadata import PackageNotFoundError, version

    # Peers and data packages, by distribution name (not imported here).
    for dist in ("flax", "precondition-opt", "kfac-jax", "psgd-jax", "scikit-learn", "mnist1d"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            pass
    dev = jax.devices()[0]
    return {
        "versions": versions,
        "device_kind": dev.device_kind,
        "platform": dev.platform,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }


def write_record(
    out_dir: str | os.PathLike, name: str, config: dict[str, Any], results: Any
) -> pathlib.Path:
    """Writes ``<out>/<YYYY-MM-DD>_<name>/<run-id>.json`` atomically and returns its path."""
    today = datetime.date.today().isoformat()
    folder = pathlib.Path(out_dir) / f"{today}_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    run_id = datetime.datetime.now().strftime("%H%M%S") + f"-{os.getpid()}"
    record = {
        "name": name,
        "config": config,
        "git": git_revision(),
        **environment(),
        "results": results,
    }
    path = folder / f"{run_id}.json"
    text = json.dumps(record, indent=2, default=_json_default)
    return _io.atomic_write(path, lambda tmp: tmp.write_text(text))


def _json_default(x: Any) -> Any:
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON serializable: {type(x)}")
