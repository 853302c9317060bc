"""The whole benchmark suite in one command, then the README tables regenerated.

``python -m benchmarks [--quick] [--out DIR]`` runs, in this order: step time and
memory across shapes (``step_time``), Muon/PSGD-Kron against their peers with
interleaved timing (``layerwise_step``), K-FAC on a Flax MLP (``kfac_step``),
Shampoo's refresh FLOPs and state bytes per device on 8 simulated devices
(``sharded_refresh``), optimizer-state bytes per device on 1, 2, 4, 8 devices and
the collectives of a step (``sharded_state``), the projection of that state to a 1B and a 7B
transformer on 64 and 256 devices (``projection``, shapes only), steps/time to AdamW's loss
on every workload (``time_to_target``), and float32 vs bfloat16 Kronecker state (bytes, and
steps to target on MNIST-1D and the character LM: ``compressed_state``). Each writes
its own record. Without ``--quick`` and with the default ``--out`` it then
rewrites the generated tables of ``benchmarks/README.md`` (``benchmarks.report``).
``--quick`` is the CI smoke run: small shapes, few steps, one seed.
"""

from __future__ import annotations

import argparse
import time

from benchmarks import (
    compressed_state,
    kfac_step,
    layerwise_step,
    projection,
    report,
    sharded_refresh,
    sharded_state,
    step_time,
    time_to_target,
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    out = ["--out", args.out]
    if args.quick:
        # The smoke run exercises every script and peer on the smallest settings.
        quick = ["--quick"]
        step_argv = quick + ["--steps", "5", "--frequency", "2", "--workloads"]
        step_argv += ["square_128", "transformer_w32_d1"]
        ttt_argv = quick + ["--no-progress", "--steps", "25", "--only", "kfac", "--workloads"]
        ttt_argv += ["digits", "mnist1d", "charlm", "linrep_k1000"]
    else:
        quick = step_argv = ttt_argv = []
    suite = [
        ("step_time", step_time.main, step_argv + out),
        ("layerwise_step", layerwise_step.main, quick + out),
        ("kfac_step", kfac_step.main, quick + out),
        ("sharded_refresh", sharded_refresh.main, quick + out),
        ("sharded_state", sharded_state.main, quick + out),
        # After sharded_state: it checks its formulas against that newest record.
        ("projection", projection.main, quick + out),
        ("time_to_target", time_to_target.main, ttt_argv + out),
        # After time_to_target: it reads that record's learning rates and targets.
        ("compressed_state", compressed_state.main, quick + out),
    ]
    timings = {}
    for name, fn, argv_ in suite:
        t0 = time.perf_counter()
        print(f"\n=== {name} {' '.join(argv_)}", flush=True)
        fn(argv_)
        timings[name] = time.perf_counter() - t0
    print("\n" + "  ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    if not args.quick and args.out == "benchmarks/results":
        report.main([])


if __name__ == "__main__":
    main()
