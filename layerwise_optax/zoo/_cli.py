"""Command line: ``python -m layerwise_optax.zoo reproduce {linear-rep,single-index,all}``.

``publish FOLDER`` turns a full run's JSON into the committed docs (see
:mod:`layerwise_optax.zoo._publish`).

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
import re
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
    pub = sub.add_parser(
        "publish",
        help="copy a full run's JSON to docs/paper, redraw docs/fig1_linear_rep.png and "
        "regenerate README's paper table",
    )
    pub.add_argument("source", type=Path, help="folder with linear_rep.json, single_index.json")
    pub.add_argument("--root", type=Path, default=Path("."), help="repository root")
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


def _config(name: str, args):
    import dataclasses

    from layerwise_optax.zoo import _experiments as ex

    cls = ex.LinearRepConfig if name == "linear-rep" else ex.SingleIndexConfig
    config = cls.quick() if args.quick else cls()
    if args.seeds is not None:
        config = dataclasses.replace(config, seeds=args.seeds)
    return config


def _estimate(name: str, config) -> float:
    from layerwise_optax.zoo import _experiments as ex

    if name == "linear-rep":
        return ex.estimate_linear_rep_seconds(config)
    return ex.estimate_single_index_seconds(config)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _run(name: str, config, args) -> bool:
    from layerwise_optax.zoo import _experiments as ex
    from layerwise_optax.zoo import _plots

    if name == "linear-rep":
        runner, checker, plotter, stem = (
            ex.run_linear_rep,
            ex.linear_rep_claims,
            _plots.plot_linear_rep,
            "linear_rep",
        )
    else:
        runner, checker, plotter, stem = (
            ex.run_single_index,
            ex.single_index_claims,
            _plots.plot_single_index,
            "single_index",
        )
    start, cpu_start = time.perf_counter(), time.process_time()
    results = runner(config, progress=not args.no_progress)
    results["claims"] = checker(results)
    results["quick"] = bool(args.quick)
    results["seconds"] = time.perf_counter() - start
    results["cpu_seconds"] = time.process_time() - cpu_start
    results["estimated_seconds"] = _estimate(name, config)
    results["environment"] = _environment()
    written = []
    for fig_name, fig in plotter(results).items():
        written += _save_figure(fig, args.out, fig_name)
    path = args.out / f"{stem}.json"
    _io.atomic_write(path, lambda tmp: Path(tmp).write_text(dumps_results(results)))
    written.append(path)
    print(
        f"{name}: {results['seconds']:.0f} s "
        f"({results['cpu_seconds']:.0f} s CPU; estimated {results['estimated_seconds']:.0f} s)"
    )
    for c in results["claims"]:
        print(f"  [{'ok' if c['passed'] else 'FAILED'}] {c['claim']}: {c['detail']}")
    for p in written:
        print(f"  wrote {p}")
    return ex.all_passed(results["claims"])


def _round(x):
    if isinstance(x, float):
        return float(f"{x:.7g}")
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v) for v in x]
    return x


def dumps_results(results: dict) -> str:
    """JSON text of ``results``: one key per line, each list of numbers on one line.

    Floats keep 7 significant digits (the runs compute in float32).
    """
    text = json.dumps(_round(results), indent=1, allow_nan=False)
    # Collapse the number lists that indent=1 spreads over one line per element.
    return re.sub(
        r"\[\s*((?:-?[\d.eE+-]+|null)(?:,\s*(?:-?[\d.eE+-]+|null))*)\s*\]",
        lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]",
        text,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = _parser().parse_args(argv)
    # Before any computation: the figures need matplotlib, the runs threadpoolctl and
    # the progress bar tqdm (the zoo extra); a missing one would otherwise surface late.
    from layerwise_optax import _optional

    if args.command == "publish":
        needed = ("matplotlib", "matplotlib.pyplot")
    else:
        needed = ("matplotlib", "matplotlib.pyplot", "threadpoolctl") + (
            () if args.no_progress else ("tqdm",)
        )
    for module in needed:
        try:
            _optional.require(module, f"python -m layerwise_optax.zoo {args.command}", extra="zoo")
        except ModuleNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if args.command == "publish":
        from layerwise_optax.zoo import _publish

        for path in _publish.publish(args.source, args.root):
            print(f"wrote {path}")
        return 0
    names = ("linear-rep", "single-index") if args.experiment == "all" else (args.experiment,)
    configs = {name: _config(name, args) for name in names}
    estimates = {name: _estimate(name, c) for name, c in configs.items()}
    parts = ", ".join(f"{n} ~{_minutes(e)}" for n, e in estimates.items())
    print(
        f"Estimated time: {parts} of CPU time (one core; about the wall-clock time on an "
        "idle 2-core machine, longer on a shared one).",
        flush=True,
    )
    ok = True
    for name in names:
        ok &= _run(name, configs[name], args)
    return 1 if (args.strict and not ok) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
