"""The benchmark harness runs end to end in quick mode and writes a complete record."""

import json

from benchmarks import harness, plot, step_time


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
            "--out",
            str(tmp_path),
        ]
    )
    records = list(tmp_path.glob("*_step_time/*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["git"].keys() == {"sha", "dirty"}
    assert {"jax", "optax", "layerwise_optax"} <= record["versions"].keys()
    for per in record["results"].values():
        assert {"adamw", "shampoo_eigh", "shampoo_newton", "soap", "floor"} <= per.keys()
        for name, entry in per.items():
            t = entry["timing"]
            assert t["ordinary_median_s"] > 0 and t["amortized_s"] > 0
            if name.startswith("shampoo"):
                # The documented state-size formula is exact.
                assert entry["state_bytes"] == entry["documented_state_bytes"]
                assert entry["params_finite_after"]
    plot.plot(record, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 0
    assert "amortized ms" in capsys.readouterr().out


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
