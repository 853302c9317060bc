"""Bit-identity check of every alias's updates between two revisions of the library.

A refactor that must not change behaviour (the renovation issue) is checked with::

    python tests/bit_identity.py compare BASE_REV        # e.g. main~3 or a commit

It exports ``BASE_REV``'s ``layerwise_optax`` into a temporary directory
(``git archive``), runs :func:`dump` there and here in fresh subprocesses on the
same machine, and compares every update of every configuration bit for bit
(``np.array_equal`` on the raw arrays, NaN positions included), plus the
``failure_counts`` totals. Exit status 0 when all agree.

``python tests/bit_identity.py dump OUT.npz`` writes one side only.

The configurations cover every public alias (and the variants that take other
code paths: blocking, Newton roots, KL factors, QR eigenbases, presets), on a
tree of rectangular, rank-deficient, conv-shaped, vector and scalar leaves, for
6 steps with a refresh every 2 steps and a non-finite gradient entry at step 3
(the failure policy's paths). It is a script, not a test in the default tier:
it needs git and two library versions.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np

STEPS = 6


def _params():
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    low = rng.standard_normal((12, 2)) @ rng.standard_normal((2, 7))  # rank 2
    return {
        "dense": {"kernel": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)},
        "low_rank": {"kernel": jnp.asarray(low, jnp.float32)},
        "conv": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32)},
        "bias": jnp.asarray(rng.standard_normal(5), jnp.float32),
        "scale": jnp.asarray(1.5, jnp.float32),
    }


def _grads(step, params):
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(100 + step)
    out = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    if step == 3:
        out["dense"]["kernel"] = out["dense"]["kernel"].at[0, 0].set(jnp.nan)
    return out


def _kfac_stats(updates):
    import jax
    import jax.numpy as jnp

    import layerwise_optax as lo

    def one(path, x):
        keys = [getattr(k, "key", None) for k in path]
        if x.ndim < 2 or "kernel" not in keys:
            return None
        n_in, n_out = int(np.prod(x.shape[:-1])), x.shape[-1]
        rng = np.random.default_rng(n_in * 31 + n_out)
        a = rng.standard_normal((n_in, n_in + 1))
        g = rng.standard_normal((n_out, n_out + 2))
        return lo.KfacFactors(
            jnp.asarray(a @ a.T / n_in, jnp.float32), jnp.asarray(g @ g.T, jnp.float32)
        )

    return jax.tree_util.tree_map_with_path(one, updates)


def _configs():
    import layerwise_optax as lo

    return {
        "shampoo": (lo.shampoo, dict(learning_rate=3e-2, precondition_frequency=2)),
        "shampoo_blocked_newton": (
            lo.shampoo,
            dict(learning_rate=3e-2, precondition_frequency=2, block_size=4, root_method="newton"),
        ),
        "shampoo_kl": (
            lo.shampoo,
            dict(
                learning_rate=3e-2, precondition_frequency=2, factor_estimation="kl", damping=1e-3
            ),
        ),
        "shampoo_sgd_nesterov": (
            lo.shampoo,
            dict(learning_rate=1e-2, precondition_frequency=2, grafting="sgd", nesterov=True),
        ),
        "soap": (lo.soap, dict(learning_rate=3e-2, precondition_frequency=2)),
        "soap_blocked": (lo.soap, dict(learning_rate=3e-2, precondition_frequency=2, block_size=4)),
        "kfac": (lo.kfac, dict(learning_rate=3e-2, precondition_frequency=2)),
        "muon": (lo.muon, dict(learning_rate=2e-2)),
        "muon_rms_dion": (lo.muon, dict(learning_rate=3e-2, scaling="rms", ns_coeffs="dion")),
        "normuon": (lo.normuon, dict(learning_rate=3e-2, ns_coeffs="polar_express")),
        "steepest": (lo.steepest_descent, dict(learning_rate=2e-2)),
        "psgd_kron": (lo.psgd_kron, dict(learning_rate=3e-2, precond_update_prob=1.0)),
    }


def dump(path: str) -> None:
    """Runs every configuration for ``STEPS`` steps; saves updates and counts to ``path``."""
    import jax

    import layerwise_optax as lo

    print("layerwise_optax from", os.path.dirname(lo.__file__), file=sys.stderr)
    params = _params()
    arrays = {}
    for name, (factory, kwargs) in _configs().items():
        tx = factory(**kwargs)
        state = tx.init(params)
        extra = name.startswith("kfac")

        @jax.jit
        def step(g, state, params, tx=tx, extra=extra):
            kw = {"kfac_stats": _kfac_stats(g)} if extra else {}
            return tx.update(g, state, params, **kw)

        p = params
        for t in range(STEPS):
            u, state = step(_grads(t, p), state, p)
            for k, leaf in jax.tree_util.tree_flatten_with_path(u)[0]:
                arrays[f"{name}/{t}/{jax.tree_util.keystr(k)}"] = np.asarray(leaf)
            p = jax.tree.map(lambda a, b: a + b, p, u)
        skipped, failed = lo.failure_counts(state)
        arrays[f"{name}/counts"] = np.asarray([int(skipped), int(failed)])
    np.savez(path, **arrays)


def compare(base_rev: str) -> int:
    """Dumps ``base_rev`` and the working tree in subprocesses; 0 if bit-identical."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = os.path.join(tmp, "base")
        os.makedirs(base_dir)
        archive = subprocess.run(
            ["git", "-C", root, "archive", base_rev, "layerwise_optax"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", base_dir], input=archive, check=True)
        files = {}
        for side, src in (("base", base_dir), ("head", root)):
            files[side] = os.path.join(tmp, f"{side}.npz")
            env = dict(os.environ, PYTHONPATH=src)
            subprocess.run(
                [sys.executable, os.path.abspath(__file__), "dump", files[side]],
                check=True,
                env=env,
                cwd=tmp,
            )
        base, head = np.load(files["base"]), np.load(files["head"])
        keys_b, keys_h = set(base.files), set(head.files)
        bad = sorted(keys_b ^ keys_h)
        for k in sorted(keys_b & keys_h):
            if (
                not np.array_equal(base[k], head[k], equal_nan=True)
                or base[k].dtype != head[k].dtype
            ):
                bad.append(k)
    names = sorted({k.split("/")[0] for k in keys_b | keys_h})
    for name in names:
        n_bad = sum(k.startswith(name + "/") for k in bad)
        print(f"{name:24s} {'bit-identical' if n_bad == 0 else f'{n_bad} arrays differ'}")
    print(f"{len(keys_b & keys_h)} arrays compared against {base_rev}: {len(bad)} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "dump":
        dump(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2]))
    else:
        sys.exit(__doc__)
