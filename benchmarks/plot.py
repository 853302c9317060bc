"""Plots a step_time record: amortized step time per optimizer and workload.

Run: ``python -m benchmarks.plot RECORD.json [--out FIG.png]``. Reads the record;
never re-runs anything.
"""

from __future__ import annotations

import argparse
import json
import pathlib


def plot(record: dict, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    results = record["results"]
    workloads = list(results)
    optimizers = list(
        dict.fromkeys(o for per in results.values() for o in per if not o.startswith("floor"))
    )
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(optimizers)
    x = np.arange(len(workloads))
    for i, name in enumerate(optimizers):
        ys = [
            1e3 * results[w][name]["timing"]["amortized_s"] if name in results[w] else np.nan
            for w in workloads
        ]
        ax.bar(x + i * width, ys, width, label=name)
    floors = [
        1e3 * results[w]["floor_shampoo"]["timing"]["ordinary_median_s"]
        if "floor_shampoo" in results[w]
        else np.nan
        for w in workloads
    ]
    ax.scatter(x + 0.4 - width / 2, floors, marker="_", s=800, color="k", label="Shampoo floor")
    ax.set_xticks(x + 0.4 - width / 2, workloads, fontsize=7, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("amortized step time (ms)")
    cfg = record["config"]
    ax.set_title(
        f"block {cfg['block_size']}, refresh every {cfg['frequency']} steps — "
        f"{record['device_kind']} ({record.get('cpu_count')} cores)"
    )
    ax.legend(fontsize=7, ncol=5)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("record")
    parser.add_argument("--out", default=None)
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
    args = parser.parse_args(argv)
    path = pathlib.Path(args.record)
    out = pathlib.Path(args.out) if args.out else path.with_suffix(".png")
    plot(json.loads(path.read_text()), out)
    print(f"wrote {out}")
    if args.markdown:
        from benchmarks.report import step_time_table

        print(step_time_table(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
