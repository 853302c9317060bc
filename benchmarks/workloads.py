"""Training workloads for the quality benchmarks: real data that installs offline.

Each :class:`Workload` is a Flax NNX model, a loss, and a train/test split built
without any download at run time:

* ``digits``: scikit-learn's handwritten digits (1797 8×8 images, shipped with
  scikit-learn), a 64-128-128-10 tanh MLP.
* ``mnist1d``: MNIST-1D (Greydanus & Kobak), built procedurally by the
  ``mnist1d`` package from the templates it ships (``make_dataset``, never
  ``get_dataset``, which downloads): 4000 train / 1000 test sequences of length
  40, a 40-256-256-10 ReLU MLP.
* ``charlm``: a character-level causal transformer language model (2 blocks,
  width 64, 4 heads, context 64) on the Python standard library's own source
  text (the first ~1 M ASCII characters of its top-level modules, in sorted
  order; the corpus's size and hash go into the record).
* ``linrep_k10`` / ``linrep_k1000``: the paper's linear representation learning
  problem from :mod:`layerwise_optax.zoo` (d_x = 50, k = 5, d_y = 10, Rademacher
  inputs with covariance condition number κ = 10 or 1000, label noise 0.1), a
  fixed sample of 8192 examples, the two-layer linear model ``F G x``.

Batches are drawn by a seeded permutation per epoch (``make_trainer``), so a run
is a pure function of the learning rate and the seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import sysconfig
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Arrays = tuple[jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model, its loss and a dataset.

    Attributes:
      name: Key used on the command line and in records.
      description: One line for tables.
      model: ``model(rngs) -> nnx.Module``.
      loss: ``'softmax_cross_entropy'`` (integer labels, any leading axes) or ``'mse'``.
      data: ``data() -> ((x_train, y_train), (x_test, y_test), info)``.
      batch: Minibatch size.
      steps: Training steps of a full run.
      quick_steps: Training steps in ``--quick`` mode.
    """

    name: str
    description: str
    model: Callable[[nnx.Rngs], nnx.Module]
    loss: str
    data: Callable[[], tuple[Arrays, Arrays, dict]]
    batch: int
    steps: int
    quick_steps: int


class MLP(nnx.Module):
    """A fully connected network; hidden layers named ``hidden<i>``, the last ``head``."""

    def __init__(self, sizes: tuple[int, ...], activation: Callable, rngs: nnx.Rngs):
        self.hidden = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-2], sizes[1:-1])]
        )
        self.head = nnx.Linear(sizes[-2], sizes[-1], rngs=rngs)
        self.activation = activation

    def __call__(self, x):
        for layer in self.hidden:
            x = self.activation(layer(x))
        return self.head(x)


class Block(nnx.Module):
    """Pre-norm transformer block: causal multi-head self-attention, then a GELU MLP."""

    def __init__(self, width: int, heads: int, rngs: nnx.Rngs):
        self.heads = heads
        self.ln1 = nnx.LayerNorm(width, rngs=rngs)
        self.qkv = nnx.Linear(width, 3 * width, use_bias=False, rngs=rngs)
        self.proj = nnx.Linear(width, width, rngs=rngs)
        self.ln2 = nnx.LayerNorm(width, rngs=rngs)
        self.fc1 = nnx.Linear(width, 4 * width, rngs=rngs)
        self.fc2 = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(self, x, shape):
        # x is (batch·time, width): on XLA:CPU the kernel gradient of a dense layer
        # applied to a 3-D input (contracting two axes) costs ~2x the 2-D one
        # (measured), so only the attention sees the (batch, time) axes.
        b, t = shape
        w, h = x.shape[-1], self.heads
        qkv = self.qkv(self.ln1(x)).reshape(b, t, 3 * h, w // h)
        q, k, v = jnp.split(qkv, 3, axis=2)
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(o.reshape(b * t, w))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class CharTransformer(nnx.Module):
    """A small causal character-level language model (token + learned position embeddings)."""

    def __init__(
        self, vocab: int, context: int, width: int, depth: int, heads: int, rngs: nnx.Rngs
    ):
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (context, width)))
        self.blocks = nnx.List([Block(width, heads, rngs) for _ in range(depth)])
        self.ln_f = nnx.LayerNorm(width, rngs=rngs)
        self.lm_head = nnx.Linear(width, vocab, rngs=rngs)

    def __call__(self, tokens):
        b, t = tokens.shape
        x = (self.embed(tokens) + self.pos_embed[...][None, :t]).reshape(b * t, -1)
        for block in self.blocks:
            x = block(x, (b, t))
        return self.lm_head(self.ln_f(x)).reshape(b, t, -1)


def _split(x, y, n_train: int, seed: int = 0) -> tuple[Arrays, Arrays]:
    perm = np.random.default_rng(seed).permutation(len(x))
    tr, te = perm[:n_train], perm[n_train:]
    return (jnp.asarray(x[tr]), jnp.asarray(y[tr])), (jnp.asarray(x[te]), jnp.asarray(y[te]))


def _standardize(x_train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    return [((a - mean) / std).astype(np.float32) for a in (x_train, *others)]


def _needs(workload: str, package: str, error: ImportError) -> SystemExit:
    return SystemExit(
        f"the {workload} workload needs {package} (pip install -e '.[bench]'): {error}"
    )


def digits_data():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise _needs("digits", "scikit-learn", e) from None
    x, y = load_digits(return_X_y=True)
    x = ((x - x.mean(0)) / (x.std(0) + 1e-6)).astype(np.float32)
    train, test = _split(x, y.astype(np.int32), int(0.8 * len(x)))
    return train, test, {"source": "sklearn.datasets.load_digits", "n_train": len(train[0])}


def mnist1d_data():
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise _needs("mnist1d", "mnist1d", e) from None
    d = make_dataset(get_dataset_args())  # procedural, from shipped templates: no download
    x, xt = _standardize(np.asarray(d["x"], np.float64), np.asarray(d["x_test"], np.float64))
    train = (jnp.asarray(x), jnp.asarray(d["y"], jnp.int32))
    test = (jnp.asarray(xt), jnp.asarray(d["y_test"], jnp.int32))
    return train, test, {"source": "mnist1d.data.make_dataset(get_dataset_args())"}


CHAR_CONTEXT = 64
CHAR_VOCAB = 128


def stdlib_corpus(max_chars: int = 1_000_000) -> str:
    """The first ``max_chars`` ASCII characters of the standard library's top-level modules."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        text = "".join(c if ord(c) < CHAR_VOCAB else "?" for c in text)
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


def charlm_data():
    text = stdlib_corpus()
    tokens = np.frombuffer(text.encode("ascii"), np.uint8).astype(np.int32)
    n = (len(tokens) - 1) // (CHAR_CONTEXT + 1)
    windows = tokens[: n * (CHAR_CONTEXT + 1)].reshape(n, CHAR_CONTEXT + 1)
    x, y = windows[:, :-1], windows[:, 1:]
    # A contiguous split: the test text is whole modules the model never saw.
    n_train = int(0.9 * n)
    info = {
        "source": "Python stdlib *.py (sorted), ASCII",
        "chars": len(text),
        "sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
        "windows_train": n_train,
    }
    return (
        (jnp.asarray(x[:n_train]), jnp.asarray(y[:n_train])),
        (jnp.asarray(x[n_train:]), jnp.asarray(y[n_train:])),
        info,
    )


def linrep_data(kappa: float):
    from layerwise_optax import zoo

    problem = zoo.linear_rep_problem(jax.random.key(0), d_x=50, d_y=10, k=5, kappa=kappa)
    x, y = zoo.sample_linear_rep(problem, jax.random.key(1), 8192 + 2048)
    return (
        (x[:8192], y[:8192]),
        (x[8192:], y[8192:]),
        {"source": "layerwise_optax.zoo.linear_rep_problem", "kappa": kappa},
    )


def _linrep_model(rngs):
    from layerwise_optax import zoo

    return zoo.LinearRepModel(50, 5, 10, rngs=rngs)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "digits",
            "sklearn digits, MLP 64-128-128-10 (tanh)",
            lambda rngs: MLP((64, 128, 128, 10), jnp.tanh, rngs),
            "softmax_cross_entropy",
            digits_data,
            batch=128,
            steps=200,
            quick_steps=60,
        ),
        Workload(
            "mnist1d",
            "MNIST-1D, MLP 40-256-256-10 (ReLU)",
            lambda rngs: MLP((40, 256, 256, 10), jax.nn.relu, rngs),
            "softmax_cross_entropy",
            mnist1d_data,
            batch=128,
            steps=600,
            quick_steps=60,
        ),
        Workload(
            "charlm",
            "stdlib text, char transformer (2 blocks, width 64, context 64)",
            lambda rngs: CharTransformer(CHAR_VOCAB, CHAR_CONTEXT, 64, 2, 4, rngs),
            "softmax_cross_entropy",
            charlm_data,
            batch=16,
            steps=300,
            quick_steps=20,
        ),
        Workload(
            "linrep_k10",
            "zoo linear representation, κ(Σx) = 10",
            _linrep_model,
            "mse",
            lambda: linrep_data(10.0),
            batch=256,
            steps=300,
            quick_steps=60,
        ),
        Workload(
            "linrep_k1000",
            "zoo linear representation, κ(Σx) = 1000",
            _linrep_model,
            "mse",
            lambda: linrep_data(1000.0),
            batch=256,
            steps=300,
            quick_steps=60,
        ),
    )
}
