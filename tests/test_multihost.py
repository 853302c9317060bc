"""Pod-scale runs on CPU: two JAX processes as one mesh, and sharded checkpoints across meshes.

* 2 processes × 4 simulated CPU devices join ``jax.distributed`` on localhost
  (gloo collectives) and run every base alias on one global ``(4, 2)`` mesh with
  ``Explicit`` axes; the updates must equal the single-process run within 1e-5
  relative (refreshes included). Each process then saves its own shards of the
  state with orbax, restores them onto an ``(8, 1)`` mesh and continues.
* One process × 8 devices: a state saved on ``(4, 2)`` restores onto ``(8, 1)``
  and onto 4 devices with :func:`layerwise_optax.restore_state`'s target
  shardings; the continued run equals the uninterrupted one within 1e-6.

The workers are ``tests/_multiprocess_worker.py``. Both take minutes on 2 busy
cores (a compile per alias and step kind in every process), so they are in the
slow tier; the shardings check of ``restore_state`` runs here in the default tier.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

import layerwise_optax as lo
from tests._helpers import OPTIMIZERS, SLOW_VARIANTS

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE_ALIASES = sorted(n for n, _, _ in OPTIMIZERS if n not in SLOW_VARIANTS)
TIMEOUT_S = 1800


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env = {**os.environ, "XLA_FLAGS": flags.strip()}  # keeps conftest's compile flags
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _run_processes(argvs: list[list[str]], devices: int) -> list[str]:
    """Starts one worker per argv; returns their stdouts; kills all on failure or timeout.

    JAX's preemption notifier catches SIGTERM, so a stuck worker is killed
    (SIGKILL), and the workers' stderr goes into the assertion message.
    """
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests._multiprocess_worker", *argv],
            cwd=ROOT,
            env=_env(devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in argvs
    ]
    outs, errs, failed = [], [], None
    try:
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                failed = f"timed out after {TIMEOUT_S} s"
                break
            outs.append(out)
            errs.append(err)
            if proc.returncode != 0:
                failed = f"exit code {proc.returncode}"
                break
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for proc in procs[len(errs) :]:
            out, err = proc.communicate()
            outs.append(out)
            errs.append(err)
    if failed:
        tails = "\n".join(
            f"--- worker {i} stderr:\n"
            + "\n".join(line for line in err.splitlines() if not line.startswith("[Gloo]"))[-3000:]
            for i, err in enumerate(errs)
        )
        pytest.fail(f"worker failed ({failed}):\n{tails}")
    return outs


@pytest.mark.slow
def test_two_processes_match_one_and_write_their_own_shards(tmp_path):
    port = _free_port()
    argvs = [[str(port), str(i), "2", str(tmp_path)] for i in range(2)]
    out0, out1 = _run_processes(argvs, devices=4)
    first, second = _records(out0), _records(out1)
    assert first[0] == {"mode": "setup", "processes": 2}
    for records in (first, second):
        runs = {r["alias"]: r for r in records if r["mode"] == "multiprocess"}
        assert sorted(runs) == BASE_ALIASES
        # Measured: at most 2.8e-6 (steepest descent), Shampoo 4.9e-7, SOAP 7.2e-7.
        for name, r in runs.items():
            assert r["max_rel_err"] < 1e-5, (name, r)
        saved = {r["alias"]: r for r in records if r["mode"] == "checkpoint"}
        assert sorted(saved) == BASE_ALIASES
        for name, r in saved.items():
            assert r["max_rel_err"] < 1e-6, (name, r)
            assert r["misplaced"] == [], (name, r)
            # Each process holds (and so restored) only its own devices' shards.
            assert r["only_own_shards"] and r["addressable_of_biggest"] == 4, (name, r)


@pytest.mark.slow
def test_sharded_checkpoint_restores_onto_other_meshes(tmp_path):
    (out,) = _run_processes([["reshard", str(tmp_path)]], devices=8)
    records = _records(out)
    done = {(r["alias"], tuple(r["mesh"])) for r in records if r["mode"] == "checkpoint"}
    assert done == {(n, m) for n in BASE_ALIASES for m in ((8, 1), (2, 2))}
    for r in records:
        if r["mode"] == "checkpoint":
            assert r["max_rel_err"] < 1e-6, r
            assert r["misplaced"] == [], r
    (small,) = [r for r in records if r["mode"] == "too_small"]
    message = small["message"]
    assert message is not None, "a 3-device mesh took a layout of 8-block stacks"
    # The owner layout's group stacks (8 blocks, padded for 8 devices) over the
    # 3 devices of data x model.
    assert "state leaf" in message and "axis 0 (size 8)" in message, message
    assert "(size 3)" in message, message


def test_restore_state_places_every_leaf_on_its_sharding():
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    tx = lo.shampoo(1e-3)
    state = tx.init(params)
    abstract = jax.eval_shape(tx.init, params)
    mesh = jax.make_mesh((1,), ("data",))
    shardings = lo.state_shardings(tx, params, {"w": P("data"), "b": P()}, mesh=mesh)
    restored = lo.restore_state(abstract, lo.checkpointable(state), shardings)
    for x, want, s in zip(
        jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(shardings)
    ):
        assert x.sharding == s
        np.testing.assert_array_equal(np.asarray(x), np.asarray(want))
    with pytest.raises(ValueError, match="does not match the optimizer state's tree"):
        lo.restore_state(abstract, state, {"w": shardings})
    with pytest.raises(ValueError, match="a jax.sharding.Sharding per leaf"):
        lo.restore_state(abstract, state, jax.tree.map(lambda s: s.spec, shardings))


def test_restore_state_names_the_leaf_and_axis_a_mesh_cannot_hold():
    """Checked before anything is placed, so an abstract mesh of 3 devices shows it."""
    params = {"layer": {"w": jnp.ones((16, 8))}}
    tx = lo.shampoo(1e-3)
    state = tx.init(params)
    abstract = jax.eval_shape(tx.init, params)
    mesh = AbstractMesh((3, 2), ("data", "model"))

    def layout(spec):
        return jax.tree.map(
            lambda x: NamedSharding(mesh, spec if x.shape == (16, 8) else P()), abstract
        )

    with pytest.raises(ValueError) as e:
        lo.restore_state(abstract, state, layout(P("data", "model")))
    message = str(e.value)
    assert "['layer']['w']" in message or "layer/w" in message, message
    assert "axis 0 (size 16)" in message and "mesh axis data (size 3)" in message, message
    with pytest.raises(ValueError, match="3 entries for 2 axes"):
        lo.restore_state(abstract, state, layout(P(None, None, "model")))
