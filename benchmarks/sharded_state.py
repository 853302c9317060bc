"""Optimizer-state bytes per device and collective bytes per step, on 1, 2, 4, 8 devices.

The numbers the owner layout of issue 15 is measured against. For every base
alias (and AdamW as the reference; PSGD-Kron also with ``block_size``, the row
``psgd_kron_blocked``), on an MLP (784-1024-1024-1024-10, block 128)
and a GPT-style transformer parameter tree (width 256, 4 blocks, vocabulary 256,
context 128; ``benchmarks.step_time.transformer_shapes``), with FSDP-style
parameter specs (each leaf's first axis divisible by the device count sharded
over the mesh's one ``data`` axis) and the state placed by
:func:`layerwise_optax.state_shardings`:

* **state bytes per device**: ``jax.jit(tx.init, out_shardings=...)`` builds the
  state, and for every device the bytes of the shards it holds
  (``x.addressable_shards``) are summed over all leaves; the table gives the
  largest device's total, split into the sharded (params-shaped) and the
  replicated part, and the ratio of 1 device to 8;
* **collective bytes per step** (at the largest device count): the compiled
  update step's HLO (``compiled.as_text()``, the per-device SPMD program) is
  parsed for ``all-gather``, ``all-reduce``, ``reduce-scatter``, ``all-to-all``
  and ``collective-permute``; each op counts the larger of its operand and
  result bytes per device (an all-gather its gathered result, a reduce-scatter
  its input; operands are looked up by name, as compiled HLO prints them). A refresh is a ``conditional`` in the program: an
  *ordinary* step takes each conditional's cheapest branch, a *refresh* step its
  most expensive one; a ``while`` body counts its known trip count (once when
  XLA does not know it). Beside them: the parameter bytes, i.e. what a
  data-parallel step's gradient all-reduce (or FSDP's parameter all-gather)
  moves per device every step anyway.

Measured from the placed arrays and the compiled programs, not timed (simulated
CPU devices share the machine's cores). The script starts itself in a
subprocess with ``--xla_force_host_platform_device_count=8`` (JAX fixes the
device count when it starts); the meshes of 1, 2 and 4 devices are over the
first devices of those 8, which places every array as a process with that many
devices would. ``--quick`` measures a small MLP, and the collectives of
Shampoo and PSGD-Kron (unblocked and blocked) only.

Run: ``python -m benchmarks.sharded_state [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from typing import Any

DEVICE_COUNTS = (1, 2, 4, 8)
# ``psgd_kron_blocked``: PSGD-Kron with the workload's block size (128; 32 with --quick).
ALIASES = (
    "adamw",
    "shampoo",
    "soap",
    "kfac",
    "muon",
    "normuon",
    "steepest",
    "psgd_kron",
    "psgd_kron_blocked",
)
# --quick compiles the update (for its collectives) of these only.
QUICK_COLLECTIVES = ("shampoo", "psgd_kron", "psgd_kron_blocked")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def workloads(quick: bool) -> dict[str, tuple[dict, int]]:
    """``{name: (shape tree, block size)}``."""
    from benchmarks.step_time import mlp_shapes, transformer_shapes

    if quick:
        return {"mlp_64_128_128_10": (mlp_shapes(64, 128, 128, 10), 32)}
    return {
        "mlp_784_1024_1024_1024_10": (mlp_shapes(784, 1024, 1024, 1024, 10), 128),
        "transformer_w256_d4": (transformer_shapes(256, 4, vocab=256, context=128), 128),
    }


def _optimizer(name: str, block: int):
    import optax

    import layerwise_optax as lo

    if name == "adamw":
        return optax.adamw(1e-3)
    blocked = dict(block_size=block, precondition_frequency=10)
    return {
        "shampoo": lambda: lo.shampoo(1e-3, **blocked),
        "soap": lambda: lo.soap(1e-3, **blocked),
        "kfac": lambda: lo.kfac(1e-3, precondition_frequency=10),
        "muon": lambda: lo.muon(1e-3),
        "normuon": lambda: lo.normuon(1e-3),
        "steepest": lambda: lo.steepest_descent(1e-3),
        "psgd_kron": lambda: lo.psgd_kron(1e-3, precond_update_prob=0.1),
        "psgd_kron_blocked": lambda: lo.psgd_kron(1e-3, precond_update_prob=0.1, block_size=block),
    }[name]()


def _kfac_stats(params: Any) -> Any:
    """Identity factors for K-FAC's default layout (kernels with their biases folded)."""
    import jax
    import jax.numpy as jnp

    import layerwise_optax as lo
    from layerwise_optax import _kfac

    layout = _kfac.default_layout(params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    specs = treedef.flatten_up_to(layout)
    folded = {s.kernel for s in specs if isinstance(s, lo.FoldedBias)}
    out = []
    for (path, p), spec in zip(flat, specs):
        if spec is None or isinstance(spec, lo.FoldedBias):
            out.append(spec)
            continue
        key = "/".join(str(getattr(k, "key", k)) for k in path)
        d_in = math.prod(p.shape[:-1]) + (key in folded)
        out.append(lo.KfacFactors(jnp.eye(d_in), jnp.eye(p.shape[-1])))
    return jax.tree_util.tree_unflatten(treedef, out)


def _specs(params: Any, n: int) -> Any:
    """FSDP: the first axis divisible by ``n`` sharded over 'data', else replicated."""
    import jax
    from jax.sharding import PartitionSpec as P

    def one(p):
        for dim, size in enumerate(p.shape):
            if size % n == 0:
                return P(*([None] * dim), "data")
        return P()

    return jax.tree.map(one, params)


_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2, "c64": 8, "c128": 16}
_COMP = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_OP = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_CALLS = re.compile(
    r"\b(to_apply|calls|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _nbytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        width = _BYTES.get(dtype) or max(1, int(dtype[1:]) // 8)
        total += width * math.prod(int(d) for d in dims.split(",") if d)
    return total


def hlo_collective_bytes(hlo: str) -> dict[str, dict[str, int]]:
    """Per-device bytes per collective kind of one step: ``{"ordinary": {...}, "refresh": {...}}``.

    Args:
      hlo: ``compiled.as_text()`` of an SPMD-partitioned program.

    Returns:
      For each step kind, ``{kind: bytes}`` over :data:`COLLECTIVES` (see the
      module docstring for how conditionals and loops are counted).
    """
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        m = _COMP.match(line)
        if m and "=" not in line.split("{")[0].split("(")[0]:
            current = m.group(2)
            comps[current] = []
            if m.group(1):
                entry = current
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None:
            comps[current].append(line)
    memo: dict[tuple[str, str], dict[str, int]] = {}

    def add(a: dict[str, int], b: dict[str, int], times: int = 1) -> None:
        for k, v in b.items():
            a[k] = a.get(k, 0) + times * v

    def cost(comp: str, kind: str) -> dict[str, int]:
        if (comp, kind) in memo:
            return memo[(comp, kind)]
        memo[(comp, kind)] = {}
        total: dict[str, int] = {}
        # Compiled HLO names an instruction's operands without their shapes: look
        # them up in the computation's own results (and parameters).
        shapes = {}
        for line in comps.get(comp, []):
            if "=" in line:
                name, rhs = line.split("=", 1)
                shapes[name.strip().removeprefix("ROOT ").strip().lstrip("%")] = rhs.split("(")[0]
        for line in comps.get(comp, []):
            op = _OP.search(line)
            if op:
                lhs, rest = line[: op.start()], line[op.end() :]
                result = lhs.split("=", 1)[1] if "=" in lhs else lhs
                operands = rest.split(")", 1)[0]
                named = sum(
                    _nbytes(shapes.get(n.lstrip("%"), ""))
                    for n in re.findall(r"%([\w.\-]+)", operands)
                )
                inputs = _nbytes(operands) or named
                add(total, {op.group(1): max(_nbytes(result), inputs)})
                continue
            branches = _BRANCHES.search(line)
            names = (
                [b.strip().lstrip("%") for b in branches.group(1).split(",")] if branches else []
            )
            calls = _CALLS.findall(line)
            names += [n for k, n in calls if k in ("true_computation", "false_computation")]
            if " conditional(" in line and names:
                options = [cost(n, kind) for n in names]
                pick = (min if kind == "ordinary" else max)(options, key=lambda c: sum(c.values()))
                add(total, pick)
                continue
            trip = _TRIP.search(line)
            for key, name in calls:
                times = int(trip.group(1)) if trip and key == "body" else 1
                add(total, cost(name, kind), times)
        memo[(comp, kind)] = total
        return total

    assert entry is not None, "no ENTRY computation in the HLO text"
    return {kind: cost(entry, kind) for kind in ("ordinary", "refresh")}


def _per_device_bytes(state: Any) -> dict[str, int]:
    """Bytes each device holds of ``state``, by device id."""
    import jax

    per: dict[int, int] = {}
    for x in jax.tree.leaves(state):
        for s in x.addressable_shards:
            per[s.device.id] = per.get(s.device.id, 0) + s.data.nbytes
    return per


def measure(counts: tuple[int, ...], quick: bool) -> dict[str, Any]:
    """Per-device state bytes on a ``data`` mesh over the first ``n`` devices, each ``n``.

    A mesh over ``n`` of this process's devices places every array as a process
    with ``n`` devices would, so one process measures every count; the update is
    compiled (for the collectives) on the largest mesh.
    """
    import jax
    from jax.sharding import NamedSharding

    import layerwise_optax as lo
    from benchmarks.step_time import make_tree

    assert jax.device_count() >= max(counts), jax.devices()
    out: dict[str, Any] = {str(n): {} for n in counts}
    for wname, (shapes, block) in workloads(quick).items():
        params = make_tree(shapes, jax.random.key(0))
        params_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
        for n in counts:
            out[str(n)][wname] = {"params_bytes": params_bytes}
        for name in ALIASES:
            tx = _optimizer(name, block)
            for n in counts:
                mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
                specs = _specs(params, n)
                param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
                shard = lo.state_shardings(tx, params, specs, mesh=mesh)
                # The state as the library lays it out on this mesh (the owner
                # layout of the Kronecker optimizers on more than one device).
                with jax.set_mesh(mesh):
                    placed = jax.jit(tx.init, out_shardings=shard)(jax.device_put(params, param_sh))
                per = _per_device_bytes(placed)
                entry = {
                    "state_bytes_total": sum(x.nbytes for x in jax.tree.leaves(placed)),
                    "state_bytes_per_device_max": max(per.values()),
                    "state_bytes_replicated_per_device": sum(
                        x.nbytes for x in jax.tree.leaves(placed) if x.sharding.is_fully_replicated
                    ),
                }
                if n == max(counts) and (not quick or name in QUICK_COLLECTIVES):
                    extra = {"kfac_stats": _kfac_stats(params)} if name == "kfac" else {}

                    def step(g, s, p, tx=tx, extra=extra):
                        return tx.update(g, s, p, **extra)

                    with jax.set_mesh(mesh):
                        p = jax.device_put(params, param_sh)
                        lowered = jax.jit(step, out_shardings=(param_sh, shard)).lower(p, placed, p)
                        entry["collective_bytes"] = hlo_collective_bytes(
                            lowered.compile().as_text()
                        )
                out[str(n)][wname][name] = entry
                del placed
    return out


def _child(quick: bool) -> dict[str, Any]:
    n = max(DEVICE_COUNTS)
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
    cmd = [sys.executable, "-m", "benchmarks.sharded_state", "--child"]
    cmd += ["--quick"] if quick else []
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=3600)
    if proc.returncode:
        sys.exit(f"sharded_state on {n} devices failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: dict[str, Any]) -> str:
    """State MB per device at each device count, and the 1-device / N-device ratio."""
    counts = sorted(int(k) for k in results["devices"])
    lines = []
    for wname in results["devices"][str(counts[0])]:
        lines.append(f"\n{wname}: optimizer state per device, MB (replicated part at {counts[-1]})")
        head = f"{'alias':18s}" + "".join(f"{n:>9d}" for n in counts)
        lines.append(head + f"{'repl.':>9s}{f'1/{counts[-1]}':>8s}")
        for name in ALIASES:
            per = [
                results["devices"][str(n)][wname][name]["state_bytes_per_device_max"]
                for n in counts
            ]
            repl = results["devices"][str(counts[-1])][wname][name][
                "state_bytes_replicated_per_device"
            ]
            lines.append(
                f"{name:18s}"
                + "".join(f"{b / 1e6:9.2f}" for b in per)
                + f"{repl / 1e6:9.2f}{per[0] / per[-1]:7.2f}x"
            )
        top = results["devices"][str(counts[-1])][wname]
        lines.append(
            f"collective MB per device per step at {counts[-1]} devices "
            f"(ordinary / refresh); params {top['params_bytes'] / 1e6:.2f} MB = data-parallel "
            "gradient all-reduce per step"
        )
        lines.append(f"{'alias':18s}" + "".join(f"{k:>24s}" for k in COLLECTIVES))
        for name in ALIASES:
            cb = top[name].get("collective_bytes")
            if cb is None:
                continue
            cells = [
                f"{cb['ordinary'].get(k, 0) / 1e6:.2f} / {cb['refresh'].get(k, 0) / 1e6:.2f}"
                for k in COLLECTIVES
            ]
            lines.append(f"{name:18s}" + "".join(f"{c:>24s}" for c in cells))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small trees (CI smoke run)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(DEVICE_COUNTS, args.quick)))
        return
    results = {"devices": _child(args.quick)}
    ratios = {}
    for wname in results["devices"]["1"]:
        ratios[wname] = {
            name: results["devices"]["1"][wname][name]["state_bytes_per_device_max"]
            / results["devices"][str(DEVICE_COUNTS[-1])][wname][name]["state_bytes_per_device_max"]
            for name in ALIASES
        }
    results["reduction_1_over_max_devices"] = ratios
    from benchmarks import harness

    config = {
        "device_counts": list(DEVICE_COUNTS),
        "aliases": list(ALIASES),
        "workloads": {k: {"block_size": b} for k, (_, b) in workloads(args.quick).items()},
        "param_specs": "FSDP: first axis divisible by the device count over 'data'",
        "quick": args.quick,
    }
    path = harness.write_record(args.out, "sharded_state", config, results)
    print(table(results))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
