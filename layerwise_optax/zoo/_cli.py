"""Command line: ``python -m layerwise_optax.zoo reproduce {linear-rep,single-index,all}``.

Writes each figure as PNG and PDF and one JSON per experiment (every plotted
number, the settings, the claim checks and the package versions) into ``--out``.
Every file is written under a temporary name in the same folder and renamed, so
an interrupted run never leaves a half-written output (``layerwise_optax._io``; the
files get the usual permissions of new files).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from layerwise_optax import _io

EXPERIMENTS = ("linear-rep", "single-index", "all")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="layerwise-optax-zoo",
        description="Reproduce analogues of the paper's figures on CPU (protocols in the notebooks).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reproduce", help="run an experiment and write figures + JSON")
    r.add_argument("experiment", choices=EXPERIMENTS)
    r.add_argument("--quick", action="store_true", help="CI-sized configuration (about a minute)")
    r.add_argument("--seeds", type=_positive_int, default=None, help="seeds (default 3; quick 1)")
    r.add_argument("--out", type=Path, default=Path("results/paper"), help="output folder")
    r.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    r.add_argument(
        "--strict", action="store_true", help="exit with status 1 when a paper claim fails"
    )
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _save_figure(fig, out: Path, name: str) -> list[Path]:
    paths = []
    for ext in ("png", "pdf"):
        path = out / f"{name}.{ext}"
        _io.atomic_write(path, lambda tmp, ext=ext: fig.savefig(tmp, format=ext, dpi=130))
        paths.append(path)
    return paths


def _environment() -> dict:
    import jax
    import optax

    import layerwise_optax
    from layerwise_optax import _optional

    flax = _optional.require("flax", "layerwise_optax.zoo", extra="zoo")

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "flax": flax.__version__,
        "layerwise_optax": getattr(layerwise_optax, "__version__", "dev"),
        "device": str(jax.devices()[0].device_kind),
    }


def _run(name: str, args) -> bool:
    from layerwise_optax.zoo import _experiments as ex
    from layerwise_optax.zoo import _plots

    if name == "linear-rep":
        config = ex.LinearRepConfig.quick() if args.quick else ex.LinearRepConfig()
        runner, checker, plotter, stem = (
            ex.run_linear_rep,
            ex.linear_rep_claims,
            _plots.plot_linear_rep,
            "linear_rep",
        )
    else:
        config = ex.SingleIndexConfig.quick() if args.quick else ex.SingleIndexConfig()
        runner, checker, plotter, stem = (
            ex.run_single_index,
            ex.single_index_claims,
            _plots.plot_single_index,
            "single_index",
        )
    if args.seeds is not None:
        import dataclasses

        config = dataclasses.replace(config, seeds=args.seeds)
    start = time.perf_counter()
    results = runner(config, progress=not args.no_progress)
    results["claims"] = checker(results)
    results["quick"] = bool(args.quick)
    results["seconds"] = time.perf_counter() - start
    results["environment"] = _environment()
    written = []
    for fig_name, fig in plotter(results).items():
        written += _save_figure(fig, args.out, fig_name)
    path = args.out / f"{stem}.json"
    _io.atomic_write(
        path, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1, allow_nan=False))
    )
    written.append(path)
    print(f"{name}: {results['seconds']:.0f} s")
    for c in results["claims"]:
        print(f"  [{'ok' if c['passed'] else 'FAILED'}] {c['claim']}: {c['detail']}")
    for p in written:
        print(f"  wrote {p}")
    return ex.all_passed(results["claims"])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = _parser().parse_args(argv)
    # Before any computation: the figures need matplotlib and the progress bar tqdm
    # (the zoo extra); a missing one would otherwise surface only after the runs.
    from layerwise_optax import _optional

    needed = ("matplotlib", "matplotlib.pyplot") + (() if args.no_progress else ("tqdm",))
    for module in needed:
        try:
            _optional.require(module, "python -m layerwise_optax.zoo reproduce", extra="zoo")
        except ModuleNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    names = ("linear-rep", "single-index") if args.experiment == "all" else (args.experiment,)
    ok = True
    for name in names:
        ok &= _run(name, args)
    return 1 if (args.strict and not ok) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
