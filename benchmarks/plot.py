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
    optimizers = [o for o in next(iter(results.values())) if o != "floor"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(optimizers)
    x = np.arange(len(workloads))
    for i, name in enumerate(optimizers):
        ys = [
            1e3 * results[w][name]["timing"]["amortized_s"] if name in results[w] else np.nan
            for w in workloads
        ]
        ax.bar(x + i * width, ys, width, label=name)
    floors = [1e3 * results[w]["floor"]["timing"]["ordinary_median_s"] for w in workloads]
    ax.scatter(x + 0.4 - width / 2, floors, marker="_", s=800, color="k", label="matmul floor")
    ax.set_xticks(x + 0.4 - width / 2, workloads, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("amortized step time (ms)")
    cfg = record["config"]
    ax.set_title(
        f"block {cfg['block_size']}, refresh every {cfg['frequency']} steps — "
        f"{record['device_kind']} ({record.get('cpu_count')} cores)"
    )
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def markdown_table(record: dict) -> str:
    """The record as a markdown table (ms; ratios against DS and the floor)."""
    rows = [
        "| workload | optimizer | ordinary ms (median / min) | refresh ms | amortized ms "
        "| vs DS (amortized) | vs floor (ordinary, median / min) | state MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w, per in record["results"].items():
        ds = per.get("ds_shampoo", {}).get("timing")
        fl = per["floor"]["timing"]
        for name, e in per.items():
            t = e["timing"]
            refresh = f"{1e3 * t['refresh_median_s']:.1f}" if t["refresh_median_s"] else "–"
            vs_ds = f"{t['amortized_s'] / ds['amortized_s']:.2f}×" if ds and name != "floor" else ""
            vs_fl = (
                f"{t['ordinary_median_s'] / fl['ordinary_median_s']:.2f}× / "
                f"{t['ordinary_min_s'] / fl['ordinary_min_s']:.2f}×"
            )
            mb = f"{e['state_bytes'] / 2**20:.1f}" if "state_bytes" in e else ""
            rows.append(
                f"| {w} | {name} | {1e3 * t['ordinary_median_s']:.2f} / "
                f"{1e3 * t['ordinary_min_s']:.2f} | {refresh} | {1e3 * t['amortized_s']:.2f} "
                f"| {vs_ds} | {vs_fl} | {mb} |"
            )
    return "\n".join(rows)


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
        print(markdown_table(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
