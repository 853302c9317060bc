"""Regenerates the results tables in ``benchmarks/README.md`` from the newest records.

Each table sits between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->``
markers and is rebuilt from the newest record of that benchmark under
``benchmarks/results/*_NAME/`` (or the records given with ``--record``), with
the hardware and versions it was measured on. Nothing is re-run.

Run: ``python -m benchmarks.report [--record PATH ...] [--check]``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent
README = ROOT / "README.md"


def newest_record(name: str, results: pathlib.Path = ROOT / "results") -> pathlib.Path | None:
    """The newest ``results/<date>_<name>/<HHMMSS-pid>.json`` by (date, time) in its path."""
    paths = sorted(
        results.glob(f"*_{name}/*.json"), key=lambda p: (p.parent.name[:10], p.name.split("-")[0])
    )
    return paths[-1] if paths else None


def _ms(s: float | None) -> str:
    return "–" if s is None else f"{1e3 * s:.2f}"


def _x(v: float | None) -> str:
    if v is None:
        return ""
    return "not reached" if math.isinf(v) else f"{v:.2f}×"


def provenance(record: dict, path: pathlib.Path) -> str:
    v = record["versions"]
    peers = ", ".join(f"{k} {v[k]}" for k in sorted(v) if k not in ("jax", "optax", "python"))
    sha = (record.get("git") or {}).get("sha") or "unknown"
    dirty = " (dirty tree)" if (record.get("git") or {}).get("dirty") else ""
    try:
        where = path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        where = str(path)
    return (
        f"Record `{where}`: {record['platform']} "
        f"({record['device_kind']}, {record.get('cpu_count')} cores), jax {v['jax']}, "
        f"optax {v['optax']}, {peers}; git {sha[:10]}{dirty}."
    )


def step_time_table(record: dict) -> str:
    rows = [
        "| workload | optimizer | ordinary ms (median / min) | refresh ms | amortized ms "
        "| vs peer (amortized) | vs floor (ordinary) | state MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w, per in record["results"].items():
        for name, e in per.items():
            t = e["timing"]
            peer = e.get("vs_peer")
            vs_peer = f"{peer['amortized']:.2f}× {peer['peer']}" if peer else ""
            mib = f"{e['state_bytes'] / 2**20:.2f}" if "state_bytes" in e else ""
            rows.append(
                f"| {w} | {name} | {_ms(t['ordinary_median_s'])} / {_ms(t['ordinary_min_s'])} "
                f"| {_ms(t['refresh_median_s'])} | {_ms(t['amortized_s'])} | {vs_peer} "
                f"| {_x(e.get('vs_floor_ordinary'))} | {mib} |"
            )
    return "\n".join(rows)


def time_to_target_table(record: dict) -> str:
    out = []
    for w, r in record["results"].items():
        out.append(
            f"**{w}** ({r['description']}; {r['steps']} steps, batch {r['batch']}; "
            f"AdamW target loss {r['target_loss']:.4g})\n"
        )
        out.append(
            "| method | steps to target | × AdamW steps | step ms | × AdamW time "
            "| final loss | test loss | test acc |"
        )
        out.append("|---|---|---|---|---|---|---|---|")
        for m, s in r["summary"].items():
            steps = (
                "not reached" if math.isinf(s["steps_to_target"]) else f"{s['steps_to_target']:.0f}"
            )
            acc = "" if s.get("test_acc") is None else f"{s['test_acc']:.3f}"
            out.append(
                f"| {m} | {steps} | {_x(s['steps_vs_adamw'])} | {_ms(s['step_s'])} "
                f"| {_x(s['time_vs_adamw'])} | {s['final_loss']:.4g} | {s['test_loss']:.4g} | {acc} |"
            )
        g = r.get("kronecker_goal")
        if g:
            out.append(
                f"\nBest of Shampoo/SOAP/K-FAC: steps {g['best_steps'][0]} "
                f"{_x(g['best_steps'][1])} (goal ≤ 0.7×: {'met' if g['steps_goal_met'] else 'missed'}), "
                f"time {g['best_time'][0]} {_x(g['best_time'][1])} "
                f"(goal ≤ 1.0×: {'met' if g['time_goal_met'] else 'missed'}).\n"
            )
    return "\n".join(out)


def kfac_step_table(record: dict) -> str:
    r = record["results"]
    rows = [
        "| | ordinary ms | refresh ms | amortized ms | ratio | state MiB |",
        "|---|---|---|---|---|---|",
    ]
    rows.append(f"| `nnx.value_and_grad` | {_ms(r['value_and_grad']['median_s'])} | | | 1.00× | |")
    for k in ("capture_empirical", "capture_fisher"):
        rows.append(f"| {k} | {_ms(r[k]['median_s'])} | | | {_x(r[k]['vs_value_and_grad'])} | |")
    if "transformer_value_and_grad" in r:  # records since 2026-12-01
        base = r["transformer_value_and_grad"]["median_s"]
        rows.append(f"| charlm transformer: `nnx.value_and_grad` | {_ms(base)} | | | 1.00× | |")
        for mode in ("empirical", "fisher"):
            c = r[f"transformer_capture_{mode}"]
            rows.append(
                f"| charlm transformer: capture_{mode} | {_ms(c['median_s'])} | | "
                f"| {_x(c['vs_value_and_grad'])} | |"
            )
    for k, ratio in (
        ("step_adamw", None),
        ("step_kfac_jax", None),
        ("step_kfac", r.get("kfac_vs_kfac_jax_amortized")),
    ):
        if k in r:
            t = r[k]
            state = r.get(k.replace("step_", "state_bytes_"))
            mib = "" if state is None else f"{state / 2**20:.2f}"
            rows.append(
                f"| {k} | {_ms(t['ordinary_median_s'])} | {_ms(t['refresh_median_s'])} "
                f"| {_ms(t['amortized_s'])} | {_x(ratio) + ' vs kfac-jax' if ratio else ''} "
                f"| {mib} |"
            )
    if "state_bytes_kfac_with_fallback" in r:  # records since diagonal_fallback=False
        mib = r["state_bytes_kfac_with_fallback"] / 2**20
        rows.append(
            f"| kfac state with the diagonal-fallback moment (default) | | | | | {mib:.2f} |"
        )
    return "\n".join(rows)


def compressed_state_table(record: dict) -> str:
    """The record's own table (``benchmarks.compressed_state.table``) and its run size."""
    c = record["config"]
    head = f"{c['seeds']} seed(s), medians; steps: the time_to_target record's unless set ({c['steps']})."
    return f"{head}\n\n{record['results']['table']}\n"


RENDERERS = {
    "step_time": step_time_table,
    "time_to_target": time_to_target_table,
    "kfac_step": kfac_step_table,
    "compressed_state": compressed_state_table,
}


def render(readme: str, name: str, record: dict, path: pathlib.Path) -> str:
    begin, end = f"<!-- report:{name} -->", f"<!-- /report:{name} -->"
    if begin not in readme or end not in readme:
        raise ValueError(f"README has no {begin} ... {end} block")
    body = f"{begin}\n{provenance(record, path)}\n\n{RENDERERS[name](record)}\n{end}"
    return re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: body, readme, flags=re.S)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", nargs="*", default=[], help="records to use instead")
    parser.add_argument("--readme", default=str(README))
    parser.add_argument("--check", action="store_true", help="exit 1 if the README is stale")
    args = parser.parse_args(argv)
    chosen = {}
    for p in map(pathlib.Path, args.record):
        chosen[json.loads(p.read_text())["name"]] = p.resolve()
    readme_path = pathlib.Path(args.readme)
    text = readme_path.read_text()
    new = text
    for name in RENDERERS:
        path = chosen.get(name) or newest_record(name)
        if path is None or f"<!-- report:{name} -->" not in new:
            continue
        new = render(new, name, json.loads(path.read_text()), path)
    if args.check:
        return int(new != text)
    readme_path.write_text(new)
    print(f"updated {readme_path}" if new != text else f"{readme_path} already current")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
