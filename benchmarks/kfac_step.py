"""K-FAC on a Flax MLP: capture overhead and step time against AdamW.

Measures, in one process and on the same batch:

* the K-FAC statistics capture (``layerwise_optax.flax.kfac_value_and_grad``)
  against a plain ``nnx.value_and_grad`` of the same loss, for each statistics
  mode (empirical: same forward/backward; Fisher: one extra backward);
* the same capture on the character transformer of ``time_to_target``'s
  ``charlm`` workload (token embedding, LayerNorms, attention projections, MLP
  and head all captured; statistics per position, K-FAC-expand), against its
  ``nnx.value_and_grad``;
* a whole training step with ``kfac`` (capture + update; ordinary and refresh
  steps apart) against one with ``optax.adamw`` and one with kfac-jax's
  ``Optimizer`` at matched settings (same MLP and batch, empirical Fisher,
  momentum 0.9, fixed damping 1e-3, factor EMA 0.95, inverses every
  ``--frequency`` steps). kfac-jax 0.0.8 needs a shim for jax 0.10
  (:func:`benchmarks.peers.kfac_jax`); when it cannot be imported the row says why
  and the rest still runs.

Run: ``python -m benchmarks.kfac_step [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import optax
from flax import nnx

import layerwise_optax as lo
from benchmarks import harness, peers
from layerwise_optax import flax as lof


class MLP(nnx.Module):
    def __init__(self, sizes, rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


def _median_time(fn, *args, reps: int) -> tuple[float, float]:
    times = harness.time_calls(fn, *args, reps=reps)
    return statistics.median(times), min(times)


def run(args) -> dict:
    sizes = (64, 128, 10) if args.quick else (784, 512, 512, 10)
    batch = 64 if args.quick else 256
    reps = 5 if args.quick else 30
    model = MLP(sizes, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (batch, sizes[0]))
    y = jax.random.randint(jax.random.key(1), (batch,), 0, sizes[-1])
    graphdef, params = nnx.split(model)
    results: dict = {"sizes": sizes, "batch": batch}

    def plain(params):
        m = nnx.merge(graphdef, params)
        return nnx.value_and_grad(lambda m: lof.softmax_cross_entropy(m(x), y))(m)

    base = jax.jit(plain)
    results["value_and_grad"] = dict(
        zip(("median_s", "min_s"), _median_time(base, params, reps=reps))
    )
    for mode in ("empirical", "fisher"):
        capture = lof.kfac_value_and_grad(
            lambda m, x: m(x), "softmax_cross_entropy", statistics=mode
        )
        fn = jax.jit(lambda params, key: capture(nnx.merge(graphdef, params), x, y, key=key))
        med, mn = _median_time(fn, params, jax.random.key(2), reps=reps)
        results[f"capture_{mode}"] = {
            "median_s": med,
            "min_s": mn,
            "vs_value_and_grad": med / results["value_and_grad"]["median_s"],
        }

    results.update(_transformer_capture(args, reps))

    # Whole training steps: the optimizer state is threaded through; refresh steps apart.
    freq = args.frequency
    capture = lof.kfac_value_and_grad(lambda m, x: m(x), "softmax_cross_entropy")
    graphdef_p, params_only, rest = nnx.split(model, nnx.Param, ...)
    params_only = nnx.as_pure(params_only)  # plain arrays, as nnx.Optimizer hands to optax
    for name, tx in (
        ("adamw", optax.adamw(1e-3)),
        # diagonal_fallback=False: kfac-jax keeps no diagonal-fallback moment either
        # (every parameter of this MLP has factors), so the states compare like for like.
        (
            "kfac",
            lo.kfac(
                0.01,
                precondition_frequency=freq,
                factor_decay=0.95,
                damping=1e-3,
                diagonal_fallback=False,
            ),
        ),
    ):
        state = tx.init(params_only)

        def step(carry, tx=tx):
            p, s = carry
            m = nnx.merge(graphdef_p, p, rest)
            _, grads, stats = capture(m, x, y)
            u, s = tx.update(nnx.as_pure(grads), s, p, kfac_stats=stats)
            return optax.apply_updates(p, u), s

        compiled, compile_s = harness.compile_step(step, (params_only, state))
        ordinary, refresh, _ = harness.time_steps(
            compiled, (params_only, state), frequency=freq, first_count=0, steps=2 * freq + 1
        )
        results[f"step_{name}"] = harness.summarize(compile_s, ordinary, refresh, freq)
        results[f"state_bytes_{name}"] = harness.tree_bytes(state)
    # The default (the fallback moment kept for every leaf): its state only, not timed.
    results["state_bytes_kfac_with_fallback"] = harness.tree_bytes(
        lo.kfac(0.01, precondition_frequency=freq).init(params_only)
    )
    results["kfac_vs_adamw_amortized"] = (
        results["step_kfac"].amortized_s / results["step_adamw"].amortized_s
    )
    results.update(_kfac_jax_step(model, x, y, freq, args))
    if "step_kfac_jax" in results:
        results["kfac_vs_kfac_jax_amortized"] = (
            results["step_kfac"].amortized_s / results["step_kfac_jax"].amortized_s
        )
    return results


def _transformer_capture(args, reps: int) -> dict:
    """Capture overhead on ``charlm``'s transformer (random tokens, same shapes)."""
    from benchmarks.workloads import CHAR_CONTEXT, CHAR_VOCAB, CharTransformer

    vocab, context, width, depth, heads, batch = (
        (32, 16, 32, 1, 2, 8) if args.quick else (CHAR_VOCAB, CHAR_CONTEXT, 64, 2, 4, 16)
    )
    model = CharTransformer(vocab, context, width, depth, heads, nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(4), (batch, context), 0, vocab)
    targets = jax.random.randint(jax.random.key(5), (batch, context), 0, vocab)
    graphdef, params = nnx.split(model)

    def plain(params):
        m = nnx.merge(graphdef, params)
        return nnx.value_and_grad(lambda m: lof.softmax_cross_entropy(m(tokens), targets))(m)

    base = _median_time(jax.jit(plain), params, reps=reps)
    out: dict = {
        "transformer": dict(vocab=vocab, context=context, width=width, depth=depth, batch=batch),
        "transformer_value_and_grad": {"median_s": base[0], "min_s": base[1]},
    }
    for mode in ("empirical", "fisher"):
        capture = lof.kfac_value_and_grad(
            lambda m, x: m(x), "softmax_cross_entropy", statistics=mode
        )
        fn = jax.jit(
            lambda params, key: capture(nnx.merge(graphdef, params), tokens, targets, key=key)
        )
        med, mn = _median_time(fn, params, jax.random.key(6), reps=reps)
        out[f"transformer_capture_{mode}"] = {
            "median_s": med,
            "min_s": mn,
            "vs_value_and_grad": med / base[0],
        }
    return out


def _kfac_jax_step(model, x, y, freq, args) -> dict:
    kj, why = peers.kfac_jax()
    if kj is None:
        print(why)
        return {"kfac_jax_unavailable": why}
    import jax.numpy as jnp

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.as_pure(params)

    def loss_fn(p, batch):
        xb, yb = batch
        logits = nnx.merge(graphdef, p, rest)(xb)
        kj.register_softmax_cross_entropy_loss(logits, yb)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb))

    opt = kj.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn),
        l2_reg=0.0,
        use_adaptive_learning_rate=False,
        learning_rate_schedule=lambda t: 0.01,
        use_adaptive_momentum=False,
        momentum_schedule=lambda t: 0.9,
        use_adaptive_damping=False,
        damping_schedule=lambda t: 1e-3,
        curvature_ema=0.95,
        inverse_update_period=freq,
        num_burnin_steps=0,
        multi_device=False,
        estimation_mode="fisher_empirical",
    )
    key = jax.random.key(3)
    state = opt.init(params, key, (x, y))

    def step(carry):
        p, s, i = carry
        p, s, _ = opt.step(p, s, key, batch=(x, y), global_step_int=i)
        return p, s, i + 1

    t0 = time.perf_counter()
    carry = jax.block_until_ready(step((params, state, 0)))  # compiles (kfac-jax jits inside)
    compile_s = time.perf_counter() - t0
    ordinary, refresh, _ = harness.time_steps(
        step, carry, frequency=freq, first_count=1, steps=2 * freq + 1
    )
    timing = harness.summarize(compile_s, ordinary, refresh, freq)
    return {"step_kfac_jax": timing, "state_bytes_kfac_jax": harness.tree_bytes(state)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--frequency", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.frequency < 1:
        parser.error("--frequency must be >= 1")
    r = run(args)
    for title, prefix in (
        (f"MLP {r['sizes']}, batch {r['batch']}", ""),
        (f"charlm transformer {r['transformer']}", "transformer_"),
    ):
        print(title)
        print(f"value_and_grad           {1e3 * r[prefix + 'value_and_grad']['median_s']:8.2f} ms")
        for mode in ("empirical", "fisher"):
            c = r[f"{prefix}capture_{mode}"]
            print(
                f"capture ({mode:9s})     {1e3 * c['median_s']:8.2f} ms  "
                f"{c['vs_value_and_grad']:.2f}x"
            )
    for name in ("adamw", "kfac"):
        t = r[f"step_{name}"]
        refresh = f"{1e3 * t.refresh_median_s:.2f}" if t.refresh_median_s else "-"
        print(
            f"step {name:6s} ordinary {1e3 * t.ordinary_median_s:8.2f} ms  refresh {refresh} ms  "
            f"amortized {1e3 * t.amortized_s:.2f} ms"
        )
    print(f"kfac / adamw amortized step: {r['kfac_vs_adamw_amortized']:.2f}x")
    if "step_kfac_jax" in r:
        t = r["step_kfac_jax"]
        refresh = f"{1e3 * t.refresh_median_s:.2f}" if t.refresh_median_s else "-"
        print(
            f"step kfac-jax ordinary {1e3 * t.ordinary_median_s:8.2f} ms  refresh {refresh} ms  "
            f"amortized {1e3 * t.amortized_s:.2f} ms"
        )
        print(f"kfac / kfac-jax amortized step: {r['kfac_vs_kfac_jax_amortized']:.2f}x")
    path = harness.write_record(args.out, "kfac_step", vars(args), r)
    print(f"wrote {path}")
    return r


if __name__ == "__main__":
    main()
