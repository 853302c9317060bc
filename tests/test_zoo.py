"""The zoo: generators, metrics, baselines against direct float64 implementations, CLI."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from layerwise_optax import _io

pytest.importorskip("flax")
from flax import nnx  # noqa: E402

from layerwise_optax import zoo  # noqa: E402
from layerwise_optax.zoo import _cli, _plots, _publish, _train  # noqa: E402
from layerwise_optax.zoo import _experiments as ex  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_linear_rep_problem_is_seeded_and_has_the_promised_structure():
    p = zoo.linear_rep_problem(jax.random.key(3), d_x=20, d_y=6, k=4, kappa=100.0, kappa_f=10.0)
    q = zoo.linear_rep_problem(jax.random.key(3), d_x=20, d_y=6, k=4, kappa=100.0, kappa_f=10.0)
    jax.tree.map(np.testing.assert_array_equal, p, q)
    w = np.linalg.eigvalsh(np.asarray(p.sigma, np.float64))
    np.testing.assert_allclose(w, np.logspace(0, 2, 20), rtol=1e-4)
    np.testing.assert_allclose(
        np.asarray(p.sigma_sqrt @ p.sigma_sqrt), p.sigma, rtol=1e-4, atol=1e-3
    )
    np.testing.assert_allclose(p.g_star @ p.g_star.T, np.eye(4), atol=1e-5)
    s = np.linalg.svd(np.asarray(p.f_star, np.float64), compute_uv=False)
    np.testing.assert_allclose(s, np.logspace(1, 0, 4), rtol=1e-4)
    x, y = zoo.sample_linear_rep(p, jax.random.key(0), 50_000)
    assert x.shape == (50_000, 20) and y.shape == (50_000, 6)
    # Rademacher inputs coloured by Sigma^{1/2}: E[x x^T] = Sigma.
    emp = np.asarray(x.T @ x / 50_000)
    assert np.linalg.norm(emp - p.sigma) / np.linalg.norm(p.sigma) < 0.02


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=6, d_x=5, d_y=8), "k must be <= d_x"),
        (dict(k=4, d_x=10, d_y=3), "k must be <= d_y"),
        (dict(kappa=0.5), "kappa must be >= 1"),
        (dict(kappa_f=0.1), "kappa_f must be >= 1"),
        (dict(d_x=0), "d_x must be an integer >= 1"),
    ],
)
def test_linear_rep_problem_rejects_inconsistent_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        zoo.linear_rep_problem(jax.random.key(0), **kwargs)


def test_generators_reject_bad_sample_sizes():
    p = zoo.linear_rep_problem(jax.random.key(0), d_x=6, d_y=3, k=2)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        zoo.sample_linear_rep(p, jax.random.key(0), 0)
    s = zoo.single_index_problem(jax.random.key(0), d=5)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        zoo.sample_single_index(s, jax.random.key(0), 0)
    with pytest.raises(ValueError, match="kappa must be >= 1"):
        zoo.single_index_problem(jax.random.key(0), kappa=0.0)


@pytest.mark.parametrize("cond", [1.0, 1e2, 1e4])
def test_subspace_distance_matches_scipy_principal_angles(cond):
    rng = np.random.default_rng(int(cond))
    d, k = 12, 3
    g_star = np.linalg.qr(rng.standard_normal((d, k)))[0].T
    # Rows with chosen conditioning, close to the true subspace.
    g = np.diag(np.logspace(0, np.log10(cond), k)) @ (g_star + 0.2 * rng.standard_normal((k, d)))
    expected = np.sin(np.max(scipy.linalg.subspace_angles(g.T, g_star.T)))
    got = float(
        zoo.subspace_distance(jnp.asarray(g, jnp.float32), jnp.asarray(g_star, jnp.float32))
    )
    np.testing.assert_allclose(got, expected, atol=2e-3)
    assert float(zoo.subspace_distance(jnp.asarray(g_star), jnp.asarray(g_star))) < 2e-3


def test_population_losses_match_monte_carlo():
    p = zoo.linear_rep_problem(jax.random.key(1), d_x=8, d_y=4, k=2, kappa=30.0)
    rng = np.random.default_rng(0)
    f, g = rng.standard_normal((4, 2)), rng.standard_normal((2, 8))
    x, y = zoo.sample_linear_rep(p, jax.random.key(2), 200_000)
    mc = 0.5 * np.mean(np.sum((np.asarray(y) - np.asarray(x) @ (f @ g).T) ** 2, -1))
    got = float(zoo.train_loss(p, jnp.asarray(f, jnp.float32), jnp.asarray(g, jnp.float32)))
    np.testing.assert_allclose(got, mc, rtol=0.02)
    # The true representation transfers: only the 30-sample head-fit noise is left.
    tl = float(zoo.transfer_loss(p, p.g_star, jax.random.key(0)))
    assert tl < 0.05, tl
    assert float(zoo.transfer_loss(p, jnp.asarray(g, jnp.float32), jax.random.key(0))) > 10 * tl


def _paper_kfac_run(problem, lr, key, steps, n, lam=1e-3):
    """The paper's joint K-FAC update (PAPER.md §6.6) in float64 NumPy on the trainer's batches."""
    k_init, k_data, _ = jax.random.split(key, 3)
    model = zoo.LinearRepModel(50, 5, 10, rngs=nnx.Rngs(k_init))
    G = np.asarray(model.g.kernel[...], np.float64).T
    F = np.asarray(model.f.kernel[...], np.float64).T
    g_star = np.asarray(problem.g_star, np.float64)
    dists = [float(zoo.subspace_distance(jnp.asarray(G, jnp.float32), problem.g_star))]
    for kb in jax.random.split(k_data, steps):
        x, y = (np.asarray(a, np.float64) for a in zoo.sample_linear_rep(problem, kb, n))
        r = y - x @ (F @ G).T
        d_g = -F.T @ (r.T @ x) / n
        d_f = -(r.T @ (x @ G.T)) / n
        s_x, z = x.T @ x / n, x @ G.T
        s_z = z.T @ z / n
        G, F = (
            G
            - lr
            * np.linalg.solve(F.T @ F + lam * np.eye(5), d_g)
            @ np.linalg.inv(s_x + lam * np.eye(50)),
            # The library damps the head's output factor (exactly I for the squared error) too.
            F - lr / (1 + lam) * d_f @ np.linalg.inv(s_z + lam * np.eye(5)),
        )
        u = np.linalg.qr(G.T)[0]
        dists.append(np.linalg.norm((np.eye(50) - g_star.T @ g_star) @ u, 2))
    return np.array(dists)


def test_library_kfac_curve_matches_the_papers_update():
    # The zoo's K-FAC is the library transform fed by the Flax capture; the reference is
    # the paper's update written out directly, on the same batches.
    problem = zoo.linear_rep_problem(jax.random.key(0), kappa=100.0)
    run = zoo.linear_rep_trainer(
        zoo.LINEAR_REP_METHODS["kfac"], steps=20, batch_size=256, d_x=50, k=5, d_y=10
    )
    key = jax.random.key(7)
    got = np.asarray(run(problem, 0.5, key)["distance"])
    expected = _paper_kfac_run(problem, 0.5, key, 20, 256)
    np.testing.assert_allclose(got, expected, atol=3e-3)
    assert got[-1] < 0.05


def test_full_gauss_newton_step_matches_the_explicit_kronecker_formula():
    # PAPER.md §6.6: GN = [[kron(Sz, I), kron(G Sx, F)], [., kron(Sx, F^T F)]] (column-major vec).
    d_x, k, d_y, n, lam = 6, 2, 3, 40, 1e-2
    model = zoo.LinearRepModel(d_x, k, d_y, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (n, d_x))
    y = jax.random.normal(jax.random.key(2), (n, d_y))
    grads = nnx.as_pure(nnx.grad(lambda m: jnp.mean(0.5 * jnp.sum((m(x) - y) ** 2, -1)))(model))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    tx = zoo.full_gauss_newton(1.0, lam)
    upd, _ = tx.update(
        grads, tx.init(params), params, gauss_newton=zoo.gauss_newton_matrix(model, x)
    )
    G = np.asarray(model.g.kernel[...], np.float64).T
    F = np.asarray(model.f.kernel[...], np.float64).T
    X = np.asarray(x, np.float64)
    s_x, s_z = X.T @ X / n, G @ (X.T @ X / n) @ G.T
    gn = np.block(
        [
            [np.kron(s_z, np.eye(d_y)), np.kron(G @ s_x, F)],
            [np.kron(G @ s_x, F).T, np.kron(s_x, F.T @ F)],
        ]
    )
    vec = lambda a: a.reshape(-1, order="F")  # noqa: E731
    g_f = np.asarray(grads["f"]["kernel"], np.float64).T
    g_g = np.asarray(grads["g"]["kernel"], np.float64).T
    delta = np.linalg.solve(gn + lam * np.eye(gn.shape[0]), np.concatenate([vec(g_f), vec(g_g)]))
    step_f = delta[: d_y * k].reshape((d_y, k), order="F")
    step_g = delta[d_y * k :].reshape((k, d_x), order="F")
    np.testing.assert_allclose(-np.asarray(upd["f"]["kernel"]).T, step_f, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(-np.asarray(upd["g"]["kernel"]).T, step_g, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="gauss_newton"):
        tx.update(grads, tx.init(params), params)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_closed_form_gauss_newton_matches_autodiff(batch_norm):
    # The NGD baseline assembles the linear net's Gauss-Newton matrix from Kronecker blocks;
    # any other model goes through jacfwd. Same matrix, in the same parameter order.
    model = zoo.LinearRepModel(7, 3, 4, batch_norm=batch_norm, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (64, 7)) * jnp.arange(1.0, 8.0)[None, :]
    fast = np.asarray(zoo.gauss_newton_matrix(model, x), np.float64)
    slow = np.asarray(_train._autodiff_gauss_newton(model, x), np.float64)
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5 * np.abs(slow).max())


def test_experiment_runs_use_one_blas_thread():
    # OpenBLAS's busy-waiting threads made each LAPACK call of a run ~50x slower on 2 cores.
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with ex.serial_blas():
        inside = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    assert inside and all(i["num_threads"] == 1 for i in inside), inside


def test_progress_bar_counts_estimated_seconds_without_overshooting():
    # Per-run costs summed in another order than the total overshoot it by round-off; tqdm
    # warns (an error under this suite's filterwarnings) unless updates are clamped.
    bar = ex._Progress(0.3, "test", enabled=True)
    for _ in range(4):
        bar.update(0.1 + 1e-12)
    assert bar._bar.n == pytest.approx(0.3)
    bar.close()


def test_time_estimates_follow_the_configuration():
    full, quick = ex.LinearRepConfig(), ex.LinearRepConfig.quick()
    assert 0 < ex.estimate_linear_rep_seconds(quick) < ex.estimate_linear_rep_seconds(full)
    # The README promises the main job in ~10 min on 2 cores.
    assert ex.estimate_linear_rep_seconds(full) < 600
    # Doubling the seeds doubles the training runs, not the compiles (one per method).
    compiles = (len(full.methods) + len(full.head_methods)) * ex._COMPILE_S
    more = ex.estimate_linear_rep_seconds(dataclasses.replace(full, seeds=6))
    runs = ex.estimate_linear_rep_seconds(full) - compiles
    head = ex.estimate_linear_rep_seconds(dataclasses.replace(full, methods=()))
    head -= len(full.head_methods) * ex._COMPILE_S
    assert more - compiles == pytest.approx(2 * runs - head)
    si = ex.SingleIndexConfig()
    assert 0 < ex.estimate_single_index_seconds(ex.SingleIndexConfig.quick())
    assert ex.estimate_single_index_seconds(si) < 600


def test_single_index_kfac_direction_is_the_whitened_gradient():
    d, width, n, lam = 10, 16, 300, 1e-2
    problem = zoo.single_index_problem(jax.random.key(0), d=d, kappa=30.0)
    key = jax.random.key(1)
    out = zoo.single_index_direction("kfac", n=n, d=d, width=width, damping=lam)(problem, key)
    sgd = zoo.single_index_direction("sgd", n=n, d=d, width=width, damping=lam)(problem, key)
    _, k_data = jax.random.split(key)
    x, _ = zoo.sample_single_index(problem, k_data, n)
    s = np.asarray(x, np.float64).T @ np.asarray(x, np.float64) / n
    expected = np.asarray(sgd["direction"], np.float64) @ np.linalg.inv(s + lam * np.eye(d))
    np.testing.assert_allclose(out["direction"], expected, rtol=2e-3, atol=1e-6)
    # Same initialization for every method; beta is scaled so beta^T Sigma beta = 1.
    np.testing.assert_array_equal(out["w0"], sgd["w0"])
    np.testing.assert_allclose(problem.beta @ problem.sigma @ problem.beta, 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="Unknown method"):
        zoo.single_index_direction("lbfgs", n=n, d=d, width=width)


def test_tanh_moments_and_alignment_theory_limits():
    # Oracle: adaptive quadrature. (PAPER.md quotes mu1 = 0.6064 and E tanh^2 = 0.3936;
    # the integrals are 0.60571 and 0.39429, so those constants are 7e-4 off.)
    import scipy.integrate

    gauss = lambda f: scipy.integrate.quad(  # noqa: E731
        lambda z: f(z) * np.exp(-z * z / 2) / np.sqrt(2 * np.pi), -40, 40, epsabs=1e-13
    )[0]
    m = zoo._single_index.tanh_moments()
    np.testing.assert_allclose(m["mu1"], gauss(lambda z: 1 - np.tanh(z) ** 2), atol=1e-10)
    np.testing.assert_allclose(m["second"], gauss(lambda z: np.tanh(z) ** 2), atol=1e-10)
    p = zoo.single_index_problem(jax.random.key(0), d=50, kappa=1.0)
    t = zoo.alignment_theory(p, 10**9)
    np.testing.assert_allclose([t["sgd"], t["kfac"], t["sgd_limit"]], 1.0, atol=1e-4)


def _schema(x):
    """The shape of a results tree: keys (maps of numbers or methods merged), value kinds."""
    if isinstance(x, dict):
        inner = {k: _schema(v) for k, v in x.items()}
        numeric = all(k.replace(".", "").replace("e-", "").isdigit() for k in x)
        values = list(inner.values())
        if x and (numeric or (len(x) > 1 and all(v == values[0] for v in values))):
            return {"*": values[0]}
        return inner
    if isinstance(x, list):
        dicts = [_schema(v) for v in x if isinstance(v, dict)]
        return ["list", dicts[0]] if dicts else "list"
    if isinstance(x, bool):
        return "bool"
    if x is None or isinstance(x, (int, float)):
        return "number"
    return type(x).__name__


def _committed(name):
    return (ROOT / _publish.DOCS / f"{name}.json").read_text()


def test_cli_reproduces_both_experiments_in_quick_mode_and_the_claims_hold(tmp_path, capsys):
    # The paper's qualitative claims (PAPER.md §6), checked on the quick configuration.
    status = _cli.main(
        ["reproduce", "all", "--quick", "--no-progress", "--strict", "--out", str(tmp_path)]
    )
    # The time estimate comes first, before any work.
    assert capsys.readouterr().out.startswith("Estimated time: linear-rep ~")
    for name in ("linear_rep", "single_index"):
        results = json.loads((tmp_path / f"{name}.json").read_text())
        failed = [c for c in results["claims"] if not c["passed"]]
        assert not failed, failed
        assert results["environment"]["jax"] == jax.__version__
    assert status == 0
    names = {p.name for p in tmp_path.iterdir()}
    for fig in (
        "fig1_linear_rep",
        "fig1b_hitting_vs_kappa",
        "head_conditioning",
        "fig2_single_index_alignment",
        "fig3_single_index_test_loss",
    ):
        assert {f"{fig}.png", f"{fig}.pdf"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    lin = json.loads((tmp_path / "linear_rep.json").read_text())
    assert len(lin["curves"]["kfac"]["1"]["distance"]) == lin["settings"]["steps"] + 1
    # The quick run writes what the committed full run has, and the README generator reads it.
    si = json.loads((tmp_path / "single_index.json").read_text())
    for name, quick in (("linear_rep", lin), ("single_index", si)):
        assert _schema(quick) == _schema(json.loads(_committed(name))), name
    assert "| K-FAC learns the representation" in _publish.paper_table(lin, si)
    with pytest.raises(ValueError, match="quick-mode"):
        _publish.publish(tmp_path, tmp_path)


def test_readme_paper_table_is_generated_from_the_committed_json():
    lin, si = (json.loads(_committed(n)) for n in ("linear_rep", "single_index"))
    assert not lin["quick"] and not si["quick"]
    assert ex.all_passed(lin["claims"]) and ex.all_passed(si["claims"])
    readme = (ROOT / "README.md").read_text()
    expected = _publish.replace_section(readme, _publish.paper_section(lin, si))
    assert readme == expected, (
        "README's paper table differs from docs/paper/*.json; regenerate it with "
        "`python -m layerwise_optax.zoo publish docs/paper` (or `make paper` for a new run)"
    )


def test_docs_figure_is_drawn_from_the_committed_json():
    image = pytest.importorskip("PIL.Image")
    source = image.open(ROOT / _publish.FIGURE).text.get("Source")
    assert source == _publish.figure_source(_committed("linear_rep")), (
        "docs/fig1_linear_rep.png was not drawn from docs/paper/linear_rep.json; run "
        "`python -m layerwise_optax.zoo publish docs/paper`"
    )


def test_publish_writes_the_json_figure_and_readme_table(tmp_path):
    # `make paper`'s last step: it called a writer the CLI does not have (AttributeError
    # after a full run); the type checker found it. Published into a scratch root, the
    # outputs are the committed JSON, a figure drawn from it, and README's table.
    (tmp_path / "README.md").write_text((ROOT / "README.md").read_text())
    written = _publish.publish(ROOT / _publish.DOCS, tmp_path)
    assert written == [
        tmp_path / _publish.DOCS / "linear_rep.json",
        tmp_path / _publish.DOCS / "single_index.json",
        tmp_path / _publish.FIGURE,
        tmp_path / "README.md",
    ]
    for name in ("linear_rep", "single_index"):
        assert (tmp_path / _publish.DOCS / f"{name}.json").read_text() == _committed(name)
    assert (tmp_path / "README.md").read_text() == (ROOT / "README.md").read_text()
    from PIL import Image  # matplotlib's own dependency

    source = Image.open(tmp_path / _publish.FIGURE).text.get("Source")
    assert source == _publish.figure_source(_committed("linear_rep"))


def test_replace_section_needs_both_markers_once():
    text = f"a\n{_publish.BEGIN}\nold\n{_publish.END}\nb\n"
    assert _publish.replace_section(text, "new") == f"a\n{_publish.BEGIN}\nnew\n{_publish.END}\nb\n"
    for bad in ("no markers", f"{_publish.END}\n{_publish.BEGIN}", text + _publish.BEGIN):
        with pytest.raises(ValueError, match="paper-table"):
            _publish.replace_section(bad, "new")


def test_figures_mark_not_reached_points_and_explain_their_lines():
    lin = json.loads(_committed("linear_rep"))
    figs = _plots.plot_linear_rep(lin)
    try:
        ax = figs["fig1b_hitting_vs_kappa"].axes[0]
        # Every "not reached" median is a hollow triangle above the cap, and the legend says so.
        missing = sum(v["median"] is None for per in lin["hitting"].values() for v in per.values())
        assert missing > 0
        triangles = [
            c for c in ax.collections if len(c.get_offsets()) and c.get_facecolors().size == 0
        ]
        points = np.concatenate([c.get_offsets() for c in triangles])
        assert len(points) == missing
        assert np.all(points[:, 1] > lin["settings"]["hit_cap"])
        assert any("not reached" in t.get_text() for t in ax.get_legend().get_texts())
        captions = {k: f.get_supxlabel() for k, f in figs.items()}
        assert "dotted line" in captions["fig1_linear_rep"]
        assert "Transfer loss" in captions["fig1_linear_rep"]
        assert "AMD (alternating min-descent)" in captions["head_conditioning"]
        # Methods that are easy to confuse differ in colour and line style.
        for a, b in (("sgd", "batchnorm"), ("shampoo", "soap")):
            assert _plots.COLORS[a] != _plots.COLORS[b]
            assert _plots.LINESTYLES.get(a, "-") != _plots.LINESTYLES.get(b, "-")
    finally:
        import matplotlib.pyplot as plt

        for f in figs.values():
            plt.close(f)


@pytest.mark.parametrize(
    "argv",
    [
        ["reproduce", "cifar"],
        ["reproduce", "linear-rep", "--seeds", "0"],
        ["reproduce", "linear-rep", "--seeds", "two"],
        ["reproduce", "linear-rep", "--bogus"],
        [],
    ],
)
def test_cli_rejects_bad_usage_with_a_message_and_nonzero_exit(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _cli.main(argv)
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_cli_never_leaves_half_written_files(tmp_path, monkeypatch):
    target = tmp_path / "out.json"

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("{partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        _io.atomic_write(target, fail)
    assert list(tmp_path.iterdir()) == []
