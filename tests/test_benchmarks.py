"""The benchmark harness runs end to end in quick mode and writes a complete record."""

import json

import pytest

from benchmarks import harness, plot, report, step_time


def test_step_time_quick_writes_record(tmp_path, capsys):
    step_time.main(
        [
            "--quick",
            "--steps",
            "3",
            "--frequency",
            "2",
            "--block-size",
            "64",
            "--workloads",
            "mlp_64_128_10",
            "--out",
            str(tmp_path),
        ]
    )
    records = list(tmp_path.glob("*_step_time/*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["git"].keys() == {"sha", "dirty"}
    assert {"jax", "optax", "layerwise_optax"} <= record["versions"].keys()
    (per,) = record["results"].values()
    ours = {"adamw", "shampoo_eigh", "shampoo_newton", "soap", "muon", "psgd_kron"}
    floors = {"floor_shampoo", "floor_newton_schulz", "floor_psgd"}
    # optax.contrib.muon is always there (optax is a core dependency).
    assert ours | floors | {"optax_contrib_muon"} <= per.keys()
    for name, entry in per.items():
        t = entry["timing"]
        assert t["ordinary_median_s"] > 0 and t["amortized_s"] > 0
        if name in ours - {"adamw"}:
            assert entry["vs_floor_ordinary"] > 0 and entry["state_bytes"] > 0
        if name.startswith("shampoo"):
            # The documented state-size formula is exact.
            assert entry["state_bytes"] == entry["documented_state_bytes"]
            assert entry["params_finite_after"]
    # PSGD's refresh (a fit on every step) is timed apart from its ordinary step.
    assert per["psgd_kron"]["timing"]["refresh_median_s"] > 0
    assert per["muon"]["vs_peer"]["peer"] == "optax_contrib_muon"
    plot.plot(record, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 0
    assert "amortized ms" in capsys.readouterr().out
    # The README table is generated from the record, between its markers.
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- report:step_time -->\nold\n<!-- /report:step_time -->\nend\n")
    assert report.main(["--record", str(records[0]), "--readme", str(readme), "--check"]) == 1
    report.main(["--record", str(records[0]), "--readme", str(readme)])
    text = readme.read_text()
    assert "old" not in text and "| mlp_64_128_10 | soap |" in text and text.endswith("end\n")
    assert report.main(["--record", str(records[0]), "--readme", str(readme), "--check"]) == 0


def test_optax_muon_spec_matches_our_muon_on_a_transformer_tree():
    """The step_time comparison is matched: with our roles, optax's Muon gives our updates."""
    import jax
    import numpy as np
    import optax

    import layerwise_optax as lo

    # Kernels with more than two axes (attention projections, a unit axis) check our
    # one kernel-to-matrix view against optax's own reshaping.
    shapes = {
        **step_time.transformer_shapes(16, 1, vocab=24, context=8),
        "conv": (3, 3, 4, 8),
        "attn": {"query": {"kernel": (16, 2, 8)}, "out": {"kernel": (2, 8, 16)}},
        "unit": {"kernel": (16, 1, 16)},
    }
    params = step_time.make_tree(shapes, jax.random.key(0))
    ours = lo.muon(0.02)
    theirs = optax.contrib.muon(
        0.02, muon_weight_dimension_numbers=step_time.optax_muon_dimension_numbers(params)
    )
    s1, s2 = ours.init(params), theirs.init(params)
    up1, up2 = jax.jit(ours.update), jax.jit(theirs.update)
    for i in range(3):
        g = step_time.make_tree(shapes, jax.random.key(i + 1))
        u1, s1 = up1(g, s1, params)
        u2, s2 = up2(g, s2, params)
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_time_to_target_quick_on_the_zoo_problem(tmp_path):
    """The quality benchmark end to end on a workload that needs no extra package."""
    from benchmarks import time_to_target

    r = time_to_target.main(
        ["--quick", "--workloads", "linrep_k10", "--steps", "25", "--only", "kfac"]
        + ["--no-progress", "--out", str(tmp_path)]
    )["linrep_k10"]
    assert set(r["summary"]) == {"adamw", "kfac"}
    assert r["summary"]["adamw"]["steps_vs_adamw"] == 1.0  # AdamW meets its own target
    assert r["summary"]["kfac"]["step_s"] > 0
    assert r["kronecker_goal"]["best_steps"][0] == "kfac"
    (record,) = tmp_path.glob("*_time_to_target/*.json")
    assert record.with_suffix(".png").exists()
    # --retime measures the step times again and keeps the training results.
    again = time_to_target.main(["--retime", str(record), "--out", str(tmp_path / "re")])
    re_summary = again["linrep_k10"]["summary"]
    for method in ("adamw", "kfac"):
        assert re_summary[method]["steps_to_target"] == r["summary"][method]["steps_to_target"]
        assert re_summary[method]["step_s"] > 0


def test_summarize_amortizes_refresh():
    t = harness.summarize(0.0, [1.0, 1.0, 3.0], [11.0], frequency=10)
    assert t.ordinary_median_s == 1.0 and t.refresh_median_s == 11.0
    assert abs(t.amortized_s - 2.0) < 1e-12


def test_kfac_step_quick_runs(tmp_path):
    pytest = __import__("pytest")
    pytest.importorskip("flax")
    from benchmarks import kfac_step

    r = kfac_step.main(["--quick", "--frequency", "2", "--out", str(tmp_path)])
    assert r["capture_empirical"]["vs_value_and_grad"] > 0
    assert r["step_kfac"].refresh_median_s is not None
    assert list(tmp_path.glob("*_kfac_step/*.json"))


def test_benchmark_readme_tables_match_the_newest_records():
    """The generated tables in benchmarks/README.md are those of the committed records."""
    assert report.main(["--check"]) == 0, "run `python -m benchmarks.report`"


def test_sharded_state_reads_collective_bytes_from_hlo():
    """Conditionals count their cheapest (ordinary) or dearest (refresh) branch; loops their trips."""
    from benchmarks import sharded_state

    hlo = """HloModule step, entry_computation_layout={(f32[4,16]{1,0})->f32[16,16]{1,0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(f32[] %x, f32[] %y)
}

%refresh (p: f32[4,16]) -> f32[16,16] {
  %p = f32[4,16]{1,0} parameter(0)
  ROOT %ag = f32[16,16]{1,0} all-gather(f32[4,16]{1,0} %p), channel_id=2, dimensions={0}
}

%keep (p: f32[4,16]) -> f32[16,16] {
  %p = f32[4,16]{1,0} parameter(0)
  ROOT %b = f32[16,16]{1,0} broadcast(f32[4,16]{1,0} %p), dimensions={0,1}
}

%body (c: (s32[], f32[8])) -> (s32[], f32[8]) {
  %c = (s32[], f32[8]{0}) parameter(0)
  %v = f32[8]{0} get-tuple-element((s32[], f32[8]{0}) %c), index=1
  %ar = (f32[8]{0}, bf16[4]{0}) all-reduce(f32[8]{0} %v, bf16[4]{0} %v), to_apply=%add
  ROOT %t = (s32[], f32[8]{0}) tuple(s32[] %i, f32[8]{0} %v)
}

%cond (c: (s32[], f32[8])) -> pred[] {
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

ENTRY %main (p: f32[4,16], k: s32[]) -> f32[16,16] {
  %p = f32[4,16]{1,0} parameter(0)
  %k = s32[] parameter(1)
  %w = (s32[], f32[8]{0}) while((s32[], f32[8]{0}) %init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %rs = f32[1,16]{1,0} reduce-scatter(%p), channel_id=3, dimensions={0}, to_apply=%add
  ROOT %out = f32[16,16]{1,0} conditional(s32[] %k, f32[4,16]{1,0} %p, f32[4,16]{1,0} %p), branch_computations={%keep, %refresh}
}
"""
    got = sharded_state.hlo_collective_bytes(hlo)
    # all-reduce: (8 float32 + 4 bfloat16) x 5 trips; reduce-scatter: its 4x16 input
    # (named without its shape, as compiled HLO prints operands: looked up).
    every_step = {"all-reduce": (8 * 4 + 4 * 2) * 5, "reduce-scatter": 4 * 16 * 4}
    assert got["ordinary"] == every_step
    assert got["refresh"] == {**every_step, "all-gather": 16 * 16 * 4}


@pytest.mark.slow
def test_sharded_state_quick_writes_record(tmp_path, capsys):
    """Per-device state bytes at 1/2/4/8 devices and a step's collectives (~25 s CPU)."""
    from benchmarks import sharded_state

    sharded_state.main(["--quick", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("*_sharded_state/*.json")
    record = json.loads(path.read_text())
    devices = record["results"]["devices"]
    assert sorted(devices, key=int) == ["1", "2", "4", "8"]
    ratios = record["results"]["reduction_1_over_max_devices"]
    for wname, per_alias in ratios.items():
        assert set(per_alias) == set(sharded_state.ALIASES)
        # AdamW's moments are all params-shaped: FSDP divides them (but the
        # 10-wide bias and the step counter) by the device count.
        assert per_alias["adamw"] > 7, per_alias
        for name in sharded_state.ALIASES:
            per = [devices[n][wname][name]["state_bytes_per_device_max"] for n in "1248"]
            assert per == sorted(per, reverse=True), (name, per)
        for name in sharded_state.QUICK_COLLECTIVES:
            comm = devices["8"][wname][name]["collective_bytes"]
            assert sum(comm["refresh"].values()) >= sum(comm["ordinary"].values()) > 0, comm
    assert "1/8" in capsys.readouterr().out


# The replicated-layout measurement the projection's formulas are checked against.
_REPLICATED_RECORD = "benchmarks/results/2026-11-30_sharded_state/124447-6332.json"


@pytest.mark.parametrize(
    "block_size, max_precond_dim",
    [(32, None), (None, 48)],  # blocked (ragged last blocks); unblocked with diagonal factors
)
def test_projection_formula_equals_the_library_on_8_abstract_devices(block_size, max_precond_dim):
    """The formula's state bytes: total = eval_shape's, per device = state_shardings' (exact)."""
    from benchmarks import projection
    from benchmarks.step_time import mlp_shapes, transformer_shapes

    trees = {
        "mlp": mlp_shapes(50, 96, 10),
        "gpt": transformer_shapes(40, 1, vocab=72, context=16),
        "llama": projection.llama_shapes(40, 1, ffn=104, vocab=64),
    }
    checked = 0
    for name, shapes in trees.items():
        for alias in projection.ALIASES:
            for dtype in projection.DTYPES if alias in projection.KRONECKER else ("float32",):
                kw = dict(block_size=block_size, precond_dtype=dtype)
                tx = projection.optimizer(alias, max_precond_dim=max_precond_dim, **kw)
                assert tx is not None, (alias, dtype)  # every Kronecker alias has precond_dtype
                inv = projection.inventory(alias, shapes, max_precond_dim=max_precond_dim, **kw)
                where = (name, alias, dtype)
                assert inv.total_bytes() == projection.eval_shape_bytes(tx, shapes), where
                rep = projection.optimizer(
                    alias, max_precond_dim=max_precond_dim, state_layout="replicated", **kw
                )
                lib = projection.library_bytes(rep, shapes, 8)
                assert lib["via"] == "state_shardings", lib["via"]
                # Exact bytes of the replicated layout, from state_shardings ...
                got = projection.per_device(inv, 8, "replicated")["total"]
                assert got == lib["total"], (where, lib, got)
                # ... and placed without the library.
                mine = projection.library_bytes(rep, shapes, 8, use_state_shardings=False)
                assert mine["total"] == got
                # The library's default under the mesh: the owner layout for the
                # Kronecker aliases, never below the no-padding bound.
                own = projection.library_bytes(tx, shapes, 8)
                if alias in projection.KRONECKER:
                    assert own["layout"] == "owner", where
                    assert projection.per_device(inv, 8, "ideal")["total"] <= own["total"], where
                    if alias == "kfac":
                        # K-FAC's per-factor owner layout: the formula is exact.
                        formula = projection.per_device(inv, 8, "owner")["total"]
                        assert formula == own["total"], (where, own, formula)
                else:
                    assert own["total"] == got, where
                checked += 1
    assert checked >= 3 * 8


def test_projection_formula_reproduces_the_measured_replicated_state():
    """Bytes per device measured from the placed arrays on 1-8 devices = the formula's, exactly."""
    import pathlib

    from benchmarks import projection

    # The pinned record measured the replicated layout before K-FAC's diagonal
    # blocks (its per-leaf flags and diagonal embedding input factors, stop 26)
    # and while every K-FAC state held pending statistics (now multi_steps' own).
    check = projection.check_against_record(
        pathlib.Path(_REPLICATED_RECORD),
        kfac_diagonal_blocks=False,
        kfac_pending=True,
        kfac_norm_leaves=False,
    )
    assert set(check) == {"mlp_784_1024_1024_1024_10", "transformer_w256_d4"}
    for wname, per_n in check.items():
        assert sorted(per_n, key=int) == ["1", "2", "4", "8"]
        for n, per_alias in per_n.items():
            assert set(per_alias) == set(projection.ALIASES)
            for alias, c in per_alias.items():
                assert c["formula_replicated"] == c["measured_per_device"], (wname, n, alias, c)
                assert c["formula_replicated_part"] == c["measured_replicated_part"], c
                assert c["formula_ideal"] <= c["formula_owner"], c
                # On one device the owner layout is never the default; K-FAC's
                # stores factors padded to their bucket's length there too.
                if n != "1":
                    assert c["formula_owner"] <= c["formula_replicated"], c
    # The numbers: the MLP's Shampoo state 72.6 MB on one device, 52.2 MB per device on 8.
    mlp = check["mlp_784_1024_1024_1024_10"]
    assert round(mlp["1"]["shampoo"]["formula_replicated"] / 1e6, 1) == 72.6
    assert round(mlp["8"]["shampoo"]["formula_replicated"] / 1e6, 1) == 52.2


def test_projection_owner_formula_pads_each_group_of_same_shaped_blocks():
    """ceil(n / D) blocks per group and device; params-shaped moments split by FSDP."""
    from benchmarks import projection

    inv = projection.Inventory(
        moments=(((64, 8), 4), ((10,), 4)),
        blocks=(("stats", (4, 4), 4, 3), ("stats", (4, 4), 4, 6), ("roots", (4, 4), 2, 9)),
        scalar_bytes=12,
    )
    moments = 64 * 8 * 4 // 8 + 10 * 4  # the 10-vector is not divisible by 8: whole
    assert projection.per_device(inv, 8, "replicated")["total"] == moments + 9 * 64 + 9 * 32 + 12
    # stats: 3 + 6 = 9 blocks -> 2 per device; roots (another field and dtype): 9 -> 2.
    assert projection.per_device(inv, 8, "owner")["total"] == moments + 2 * 64 + 2 * 32 + 12
    # Padded leaf by leaf: ceil(3/8) + ceil(6/8) = 2 stats, 2 roots; on 2 devices 2 + 3 = 5.
    assert projection.per_device(inv, 8, "owner_per_leaf")["total"] == moments + 128 + 64 + 12
    assert projection.per_device(inv, 2, "owner_per_leaf")["blocks"] == 5 * 64 + 5 * 32
    assert projection.per_device(inv, 2, "owner")["blocks"] == 5 * 64 + 5 * 32
    assert projection.per_device(inv, 3, "owner")["blocks"] == 3 * 64 + 3 * 32
    assert projection.per_device(inv, 3, "owner_per_leaf")["blocks"] == (1 + 2) * 64 + 3 * 32
    with pytest.raises(ValueError, match="layout must be one of"):
        projection.per_device(inv, 8, "striped")


def test_projection_quick_writes_record(tmp_path, capsys):
    """Small trees on 8 and 16 abstract devices (~4 s): every row, both layouts, a record."""
    from benchmarks import projection

    results = projection.main(["--quick", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("*_projection/*.json")
    record = json.loads(path.read_text())
    assert (
        record["config"]["quick"] and record["results"]["models"].keys() == results["models"].keys()
    )
    for entry in record["results"]["models"].values():
        for per_alias in entry["devices"].values():
            for key, row in per_alias.items():
                f = row["formula"]
                assert f["ideal"]["total"] <= f["owner"]["total"] <= f["replicated"]["total"]
                if row["library"] is not None:
                    assert row["formula_state_bytes"] == row["state_bytes_off_mesh"], key
                    assert row["rel_diff_replicated"] == 0, (key, row)
                    assert f["ideal"]["total"] <= row["library"]["total"], (key, row)
    assert "replicated / owner" in capsys.readouterr().out


def test_compressed_state_memory_is_the_formula_and_bfloat16_halves_the_kronecker_state():
    """compressed_state's byte rows: library == projection formula; bf16 halves the factors."""
    from benchmarks import compressed_state

    mem = compressed_state.memory(quick=True)
    for tree in mem.values():
        rows = tree["rows"]
        for key, r in rows.items():
            assert r["state_bytes"] == r["formula_bytes"], key
        for alias in ("shampoo", "kfac", "psgd_kron"):  # SOAP's rotated nu stays float32
            f32, bf16 = rows[f"{alias}/float32"], rows[f"{alias}/bfloat16"]
            assert 2 * bf16["kronecker_bytes"] == f32["kronecker_bytes"] > 0, alias
        assert rows["soap/bfloat16"]["kronecker_bytes"] < rows["soap/float32"]["kronecker_bytes"]
    text = compressed_state.table({"memory": mem, "quality": {"workloads": []}})
    assert text.count("\n") == 1 + len(compressed_state.ALIASES) * 2


def test_dion_state_quick_counts_bytes_without_timing(tmp_path):
    from benchmarks import dion_state

    r = dion_state.main(["--quick", "--no-timing", "--out", str(tmp_path)])
    assert "step_time" not in r and list(tmp_path.glob("*_dion_state/*.json"))
    # fc1 kernel (64, 256): Muon's momentum is 64 * 256 floats; Dion adds Q (256, r).
    row = r["per_leaf"]["['blocks']['0']['fc1']['kernel']"]
    assert row["muon"] == 4 * 64 * 256
    assert [row[f"dion_{f}"] - row["muon"] for f in ("1", "1/4", "1/16")] == [
        4 * 256 * r for r in (64, 16, 4)
    ]
