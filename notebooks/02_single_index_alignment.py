# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Fig. 2 analogue: single-index spike alignment after one step, theory vs simulation
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/layerwise-optax/layerwise_optax/blob/main/notebooks/02_single_index_alignment.ipynb)
#
# **Claim.** Train the first layer of `f(x) = N^{-1/2} aᵀ tanh(Wx)` with **one** large step
# on `y = tanh(⟨β★, x⟩) + ε`, `x ~ N(0, Σ)`. The step is nearly rank one; its spike `v` (top
# right singular vector) is what the layer learns. For SGD, `v ∝ Σβ★`: biased, so
# `cos(v, β★)` saturates below 1 as n grows, at `cos∠(Σβ★, β★)`. The K-FAC step whitens
# by `(Σ̂ + λI)⁻¹`, turning the spike into a ridge estimate of `β★`, so the alignment tends
# to 1. One-step Adam (a sign step) and an input batch-norm (per-coordinate scaling) do
# not remove the bias for a rotated Σ. Our closed-form predictions
# (`zoo.alignment_theory`) are drawn as lines.
#
# **Honesty about parameters.** The paper's exact figure parameters and its Theorem 3.9
# were not available to us. We use our own protocol: `d = 200, N = 400`,
# `n = 2000` (and 500…8000), `Σ = U diag(λ) Uᵀ` with Haar `U`, λ log-spaced in [1, κ]
# rescaled to mean 1, `β★ᵀΣβ★ = 1`, `a_j = ±N^{-1/2}` fixed, `W₀ ~ N(0, 1/d)`, K-FAC
# damping 1e-2. The theory curves are our derivation, not the paper's theorem.
#
# The K-FAC direction is `layerwise_optax.kfac(sides='input')` fed by the Flax capture.

# %%
# Install the package with the `zoo` extra (flax, matplotlib and tqdm) unless it is importable
# already: from the checkout this notebook sits in, else (Colab) from GitHub.
# LWO_SOURCE overrides the source: a local path, or a "git+https://..." address.
import importlib
import importlib.util
import os
import pathlib
import subprocess
import sys

REPOSITORY = "https://github.com/layerwise-optax/layerwise_optax"
EXTRA = "zoo"
if importlib.util.find_spec("layerwise_optax") is None:
    here = pathlib.Path.cwd().resolve()
    checkout = next(
        (p for p in (here, *here.parents) if (p / "layerwise_optax" / "__init__.py").is_file()),
        None,
    )
    source = os.environ.get("LWO_SOURCE") or str(checkout or f"git+{REPOSITORY}")
    if source.startswith("git+"):
        requirement = f"layerwise-optax[{EXTRA}] @ {source}"
    else:
        requirement = f"{source}[{EXTRA}]"
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", requirement])
    importlib.invalidate_caches()

# %%
import matplotlib.pyplot as plt

from layerwise_optax import zoo

QUICK = os.environ.get("LWO_QUICK") == "1"
# Outputs go to outputs/ next to where the kernel runs (git-ignored in a checkout).
OUT = pathlib.Path("outputs")
OUT.mkdir(exist_ok=True)
config = zoo.SingleIndexConfig.quick() if QUICK else zoo.SingleIndexConfig()
print(config)

# %%
results = zoo.run_single_index(config)
fig = zoo.plot_single_index(results)["fig2_single_index_alignment"]
fig.savefig(OUT / "02_single_index_alignment__alignment.png", dpi=110)
fig

# %%
for key in ("alignment_vs_kappa", "alignment_vs_n"):
    r = results[key]
    print(key)
    for name in (*config.methods, "theory_sgd", "theory_kfac", "sgd_limit"):
        print(f"  {name:12s}", [None if v is None else round(v, 3) for v in r[name]])

# %% [markdown]
# ## The paper's claims, checked on these results

# %%
claims = [
    c for c in zoo.single_index_claims(results) if "Test MSE" not in c["claim"]
]  # the test-loss claim is Fig. 3's (notebook 03)
for c in claims:
    print(("ok    " if c["passed"] else "FAILED"), c["claim"], "|", c["detail"])
assert zoo.all_passed(claims), "a claim of the paper did not hold on this run"
plt.close("all")
