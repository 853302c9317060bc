"""The README as a newcomer meets it: every snippet runs as written, and what it states
about installing (the extras, the pip line) and about files matches the repository."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
REPOSITORY = "https://github.com/layerwise-optax/layerwise_optax"
SNIPPETS = re.findall(r"^```python\n(.*?)^```", README, re.M | re.S)


def _snippet_id(code):
    return re.sub(r"\W+", "_", next(line for line in code.splitlines() if line.strip()))[:40]


def test_the_readme_has_snippets():
    assert len(SNIPPETS) >= 4


def _snippet_param(code):
    # The K-FAC recipe compiles the capture and the update (~16 s of CPU, against 2-7 s for
    # the others): slow tier. The capture itself is covered by tests/test_flax.py.
    marks = [pytest.mark.slow] if "kfac_value_and_grad" in code else []
    return pytest.param(code, id=_snippet_id(code), marks=marks)


@pytest.mark.parametrize("code", [_snippet_param(c) for c in SNIPPETS])
def test_snippet_runs_standalone(code, tmp_path):
    # Each snippet alone, in a fresh interpreter, as a reader would paste it. XLA_FLAGS is
    # cleared: a snippet that needs simulated devices must say so itself.
    pytest.importorskip("flax")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", TMPDIR=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]


def _requirement_names(specs):
    return [re.split(r"[<>=!~\[ ;@]", s, maxsplit=1)[0] for s in specs]


def test_extras_table_lists_every_extra_with_its_packages():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    install = README.split("## Install", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", install, re.M))
    assert set(rows) == set(extras)
    for extra, specs in extras.items():
        assert [p.strip() for p in rows[extra].split(",")] == _requirement_names(specs), extra


def test_pip_lines_name_the_repository():
    for extra in ("", "[zoo]"):
        assert f'pip install "layerwise-optax{extra} @ git+{REPOSITORY}"' in README


def test_no_links_to_files_outside_the_repository():
    # The README once pointed at ../shared/STYLE.md and shared/PAPER.md, which a clone
    # does not have.
    for doc in (
        ROOT / "README.md",
        ROOT / "notebooks" / "README.md",
        ROOT / "benchmarks" / "README.md",
    ):
        text = doc.read_text()
        assert "shared/" not in text, doc
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if not re.match(r"https?://", target):
                assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"


@pytest.mark.parametrize(
    "target, extras",
    [
        ("reproduce", {".[zoo]"}),
        ("demo", {".[zoo]"}),
        ("test", {".[test,notebooks]"}),
        ("docs", {".[docs]"}),
    ],
)
def test_make_targets_install_only_the_extras_they_need(target, extras, tmp_path):
    # The README promises `make reproduce` installs the zoo extra only (it used to install
    # the test and notebooks extras too). `make -n` prints the recipe without running it.
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(
        ["make", "-n", f"VENV={tmp_path / 'venv'}", target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    installed = set(re.findall(r"pip install -q -e '([^']+)'", out))
    assert installed == extras, out


def _state_bytes(tx, params):
    import jax
    import numpy as np

    state = jax.eval_shape(tx.init, params)
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))


def _expected_costs():
    """The optimizer table's cost cells, recomputed from the newest benchmark records."""
    import json

    import jax
    import jax.numpy as jnp
    import optax

    import layerwise_optax as lo
    from benchmarks import report

    load = lambda name: json.loads(report.newest_record(name).read_text())["results"]  # noqa: E731
    ttt, step_time, kfac_step = load("time_to_target"), load("step_time"), load("kfac_step")
    step = {}
    for m in ttt["digits"]["summary"]:
        ratios = [w["summary"][m]["step_s"] / w["summary"]["adamw"]["step_s"] for w in ttt.values()]
        step[m] = (min(ratios), max(ratios))
    mlp = step_time["mlp_784_1024_1024_10"]
    state = {
        m: mlp[key]["state_bytes"] / mlp["adamw"]["state_bytes"]
        for m, key in [
            ("shampoo", "shampoo_eigh"),
            ("soap", "soap"),
            ("muon", "muon"),
            ("psgd_kron", "psgd_kron"),
        ]
    }
    state["kfac"] = kfac_step["state_bytes_kfac"] / kfac_step["state_bytes_adamw"]
    # NorMuon and steepest descent are not in the step-time record: their state, from its
    # shapes on the same MLP, against AdamW's.
    sizes = (784, 1024, 1024, 10)
    params = {
        f"layer{i}": {
            "kernel": jax.ShapeDtypeStruct((a, b), jnp.float32),
            "bias": jax.ShapeDtypeStruct((b,), jnp.float32),
        }
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
    }
    adamw = _state_bytes(optax.adamw(1e-3), params)
    for m, tx in [("normuon", lo.normuon(0.02)), ("steepest_descent", lo.steepest_descent(0.02))]:
        state[m] = _state_bytes(tx, params) / adamw
    cells = {m: f"step {step[m][0]:.1f}–{step[m][1]:.1f}×, state {state[m]:.1f}×" for m in state}
    # Dion is not in the time-to-target record yet: its step time is the dion_state
    # record's, against Muon's on the transformer tree from rank 1/16 to full, and
    # its state from its shapes on the same MLP (full rank; rank_fraction shrinks Q).
    dion = load("dion_state")["step_time"]
    ratios = [v["median_s"] / dion["muon"]["median_s"] for k, v in dion.items() if k != "muon"]
    cells["dion"] = (
        f"step {min(ratios):.1f}–{max(ratios):.1f}× Muon's (rank 1/16 to full), "
        f"state {_state_bytes(lo.dion(0.02), params) / adamw:.1f}×"
    )
    return cells


def test_cost_column_is_the_benchmark_records():
    table = README.split("## The optimizers", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    got = {row.split("`")[1]: row.rstrip(" |").rsplit("| ", 1)[1] for row in rows}
    assert got == _expected_costs()


def test_opening_names_every_optimizer_family():
    # The opening once said Muon and PSGD-Kron were "on the way" after they had shipped.
    opening = README.split("\n## ", 1)[0]
    for name in ("Shampoo", "SOAP", "K-FAC", "Muon", "NorMuon", "steepest descent", "PSGD-Kron"):
        assert name in opening, name
    assert "on the way" not in README
