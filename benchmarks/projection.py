"""Projected optimizer-state bytes per device: a 1B and a 7B transformer on 64 and 256 devices.

Nothing is allocated: every number is a count of bytes. For each model, device
count ``D``, alias (AdamW as the reference, Shampoo, SOAP, K-FAC, PSGD-Kron) and
storage dtype of the Kronecker state (float32 or bfloat16), two layouts:

* **replicated** (the library's layout when this script was written): the
  params-shaped moments are sharded like their parameter (FSDP specs: each
  leaf's first axis divisible by ``D`` over the one ``data`` axis of the mesh),
  every per-block array (Shampoo's statistics and roots, SOAP's statistics,
  eigenbases and its rotated second moment, K-FAC's factors, inverses and
  pending statistics, PSGD's factors) whole on every device;
* **owner** (issue 15): the per-block arrays of all leaves grouped by field,
  block shape and dtype into stacks, each stack padded to a multiple of ``D``
  and split along its block axis, so a device holds ``ceil(n / D)`` of the ``n``
  blocks of every group; the params-shaped moments as above. K-FAC's owner
  layout stores single factors: per field and kind the factors are bucketed by
  length (lengths within 4/3 share a stack, padded to the largest), each
  bucket padded to a multiple of ``D`` (the library's rule, matched exactly).

Two independent counts:

* the **formula** (:func:`inventory`): the state's arrays derived from the
  parameter shapes and each optimizer's documented layout rules (blocking,
  diagonal factors past ``max_precond_dim``, SOAP's block-shaped second moment,
  K-FAC's homogeneous input factor for a folded bias, PSGD's factor for a
  vector), then :func:`per_device` for either layout;
* the **library** (:func:`library_bytes`): ``jax.eval_shape(tx.init, params)``
  for the state's leaves (the ``init`` traced under the abstract mesh, so that a
  layout chosen from the mesh is the one counted) and
  :func:`layerwise_optax.state_shardings` on a ``jax.sharding.AbstractMesh`` of
  ``D`` devices for where they live; per leaf
  ``NamedSharding.shard_shape(shape)``, summed.

The script prints the formula against the library: the replicated layout
(``state_layout="replicated"``) equals the formula exactly; the owner cells of
the table are the library's own owner layout on the abstract mesh (the formula's
owner estimate groups by field and factor shape, the library by block shape, so
they differ where blocks of one group have factors of several sizes). It also
checks the formula against the measured numbers of the last ``sharded_state``
record of the replicated layout (:data:`REPLICATED_RECORD`).

Every Kronecker alias takes ``precond_dtype`` (K-FAC since issue 15 item 5), so
every bfloat16 row is the library's too; an alias without the option would get
formula-only rows, marked so in the record.

Models (untied input embedding and output head, float32 parameters):

* ``gpt_1b``: ``benchmarks.step_time.transformer_shapes(2048, 16, vocab=50304,
  context=2048)``: pre-norm GPT (LayerNorm with bias, fused ``qkv``, MLP 4×,
  biases on the projections, learned positions), 1.01B parameters;
* ``llama_7b``: LLaMA-7B's shapes (:func:`llama_shapes`): width 4096, 32
  blocks, separate q/k/v/o, SwiGLU MLP of width 11008, RMSNorm scales, no
  biases, vocabulary 32000, rotary positions (no parameters), 6.74B parameters.

Settings: Shampoo and SOAP with ``block_size=1024`` and ``max_precond_dim=1024``
(Distributed Shampoo's block at this scale), K-FAC with its defaults
(``max_precond_dim=4096``, biases folded), PSGD-Kron with its defaults
(``max_precond_dim=8192``, no memory-save mode).

Run: ``python -m benchmarks.projection [--quick] [--out DIR]`` (seconds: only
shapes are traced). ``--quick`` projects two small trees on 8 and 16 devices.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import inspect
import json
import math
import pathlib
from typing import Any

DEVICE_COUNTS = (64, 256)
QUICK_DEVICE_COUNTS = (8, 16)
ALIASES = ("adamw", "shampoo", "soap", "kfac", "psgd_kron")
KRONECKER = ("shampoo", "soap", "kfac", "psgd_kron")
DTYPES = ("float32", "bfloat16")
BLOCK_SIZE = 1024
# Each alias's max_precond_dim as built here (Shampoo/SOAP: the block; K-FAC and
# PSGD-Kron: their defaults).
MAX_PRECOND_DIM = {"shampoo": 1024, "soap": 1024, "kfac": 4096, "psgd_kron": 8192}
# The int32/uint32 scalars of each alias's state: the step count, the failure
# counters (skipped, failed); K-FAC's pending-statistics count; PSGD's PRNG key
# (2 x uint32) and fit count.
SCALAR_BYTES = {"adamw": 4, "shampoo": 12, "soap": 12, "kfac": 16, "psgd_kron": 24}
_ITEMSIZE = {"float32": 4, "bfloat16": 2}
LAYOUTS = ("replicated", "owner", "owner_per_leaf", "ideal")


def llama_shapes(width: int, depth: int, ffn: int, vocab: int) -> dict:
    """A LLaMA-style decoder's parameter tree in Flax naming (RMSNorm, SwiGLU, no biases)."""
    block = {
        "attn_norm": {"scale": (width,)},
        "attn": {name: {"kernel": (width, width)} for name in ("query", "key", "value", "out")},
        "mlp_norm": {"scale": (width,)},
        "mlp": {
            "gate": {"kernel": (width, ffn)},
            "up": {"kernel": (width, ffn)},
            "down": {"kernel": (ffn, width)},
        },
    }
    return {
        "embed": {"embedding": (vocab, width)},
        "blocks": {str(i): block for i in range(depth)},
        "final_norm": {"scale": (width,)},
        "lm_head": {"kernel": (width, vocab)},
    }


def models(quick: bool) -> dict[str, dict]:
    """``{name: shape tree}`` of the projected models."""
    from benchmarks.step_time import transformer_shapes

    if quick:
        return {
            "gpt_w64_d2": transformer_shapes(64, 2, vocab=200, context=32),
            "llama_w64_d2": llama_shapes(64, 2, ffn=176, vocab=128),
        }
    return {
        "gpt_1b": transformer_shapes(2048, 16, vocab=50304, context=2048),
        "llama_7b": llama_shapes(4096, 32, ffn=11008, vocab=32000),
    }


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _flat_shapes(shapes: Any) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    import jax

    flat = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)[0]
    return [(tuple(str(getattr(k, "key", k)) for k in path), s) for path, s in flat]


def param_count(shapes: Any) -> int:
    return sum(math.prod(s) for _, s in _flat_shapes(shapes))


# ---------------------------------------------------------------------------
# The formula: the state's arrays from the parameter shapes.


@dataclasses.dataclass(frozen=True)
class Inventory:
    """The arrays of one optimizer's state, derived from the parameter shapes.

    Attributes:
      moments: ``(shape, itemsize)`` of each params-shaped leaf (sharded like
        its parameter in either layout).
      blocks: ``(field, block shape, itemsize, count)``: ``count`` blocks of
        that shape, one entry per leaf and factor (the per-block state).
      scalar_bytes: Counters and keys (replicated).
      per_factor: The owner layout stores each factor on its own (K-FAC).
    """

    moments: tuple[tuple[tuple[int, ...], int], ...]
    blocks: tuple[tuple[str, tuple[int, ...], int, int], ...]
    scalar_bytes: int
    # K-FAC: the owner layout stores single factors, bucketed by length
    # (:func:`_factor_buckets`), not blocks grouped by shape.
    per_factor: bool = False

    def total_bytes(self) -> int:
        moments = sum(math.prod(s) * w for s, w in self.moments)
        blocks = sum(math.prod(s) * w * n for _, s, w, n in self.blocks)
        return moments + blocks + self.scalar_bytes


def _factor(d: int, max_dim: int) -> tuple[int, ...]:
    """A factor of a dimension ``d``: ``(d, d)`` when ``d <= max_dim``, else its diagonal."""
    return (d, d) if d <= max_dim else (d,)


def _view(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Shampoo's/SOAP's default view of a 1-D or 2-D leaf: the matrix, or ``None`` (no factors).

    A 2-D leaf with both axes longer than 1 keeps its two axes (the default
    merge never joins the last two groups); anything with fewer non-unit axes
    has no factors.
    """
    if len(shape) > 2:
        raise ValueError(f"the formula covers 1-D and 2-D leaves only, got shape {shape}")
    return shape if len(shape) == 2 and min(shape) > 1 else None


def _blocked(d: int, block: int | None, max_dim: int) -> tuple[int, int, bool]:
    """``(block length, blocks along d, full?)`` of one factor dimension."""
    b = d if block is None else min(d, block)
    if b > max_dim:
        return d, 1, False  # a diagonal factor, never blocked
    return b, -(-d // b), True


def inventory(
    alias: str,
    shapes: Any,
    *,
    block_size: int | None = BLOCK_SIZE,
    max_precond_dim: int | None = None,
    precond_dtype: str = "float32",
    kfac_diagonal_blocks: bool = True,
    kfac_pending: bool = False,
    kfac_norm_leaves: bool = True,
) -> Inventory:
    """The formula: the state arrays of ``alias`` on parameters of ``shapes`` (float32).

    Args:
      alias: One of :data:`ALIASES`.
      shapes: A tree of shape tuples (1-D and 2-D leaves).
      block_size: Shampoo's and SOAP's block length (``None``: unblocked).
      max_precond_dim: ``None``: the alias's entry in :data:`MAX_PRECOND_DIM`.
      precond_dtype: Storage dtype of the per-block state (``"float32"`` or
        ``"bfloat16"``; SOAP's rotated second moment stays float32).
      kfac_diagonal_blocks: K-FAC's state since its diagonal blocks (per leaf a
        bool flag; an ``embedding`` table's input factor diagonal). ``False``:
        the state before them, for records measured earlier.
      kfac_pending: K-FAC's pending statistics (a third copy of the factors),
        which only :func:`layerwise_optax.multi_steps` allocates now; ``True``
        for records measured when every K-FAC state held them.
      kfac_norm_leaves: K-FAC's default layout gives the leaves of a norm layer
        (a node of just ``scale``, or ``scale`` and ``bias``) no factors (their
        statistics are :class:`layerwise_optax.KfacDiagonal`); ``False``: the
        layout before (a factor pair each), for records measured earlier.

    Returns:
      The :class:`Inventory`.
    """
    flat = _flat_shapes(shapes)
    w = _ITEMSIZE[precond_dtype]
    max_dim = MAX_PRECOND_DIM.get(alias) if max_precond_dim is None else max_precond_dim
    moments: list[tuple[tuple[int, ...], int]] = []
    blocks: list[tuple[str, tuple[int, ...], int, int]] = []
    if alias == "adamw":
        moments = [(s, 4) for _, s in flat] * 2  # mu, nu
    elif alias in ("shampoo", "soap"):
        # Shampoo: mu and Adam grafting's nu params-shaped; a statistic and a
        # root per factor and block. SOAP: mu params-shaped; nu in the rotated
        # block view (stack, b_1, b_2) (a vector: (1, n)); a statistic and an
        # eigenbasis per factor and block.
        second = "roots" if alias == "shampoo" else "bases"
        for _, s in flat:
            moments.append((s, 4))
            if alias == "shampoo":
                moments.append((s, 4))
            view = _view(s)
            if view is None:
                if alias == "soap":
                    blocks.append(("nu", (math.prod(s),), 4, 1))
                continue
            dims = [_blocked(d, block_size, max_dim) for d in view]
            stack = math.prod(n for _, n, _ in dims)
            if alias == "soap":
                blocks.append(("nu", tuple(b for b, _, _ in dims), 4, stack))
            for b, _, full in dims:
                for field in ("stats", second):
                    blocks.append((field, (b, b) if full else (b,), w, stack))
    elif alias == "kfac":
        # mu and the diagonal fallback's nu params-shaped; per leaf with factors
        # (every leaf of 1 or more axes but a folded bias) an input factor
        # A (d_in, +1 for a folded bias; 1 for a vector) and an output factor B,
        # each kept twice: the EMA and its inverse (and the pending statistics
        # of an accumulation, in records measured before they were multi_steps'
        # own: kfac_pending).
        # Per leaf also a bool flag, whether its last statistics were a diagonal
        # (KfacDiagonal) block. A 2-axis leaf named 'embedding' keeps its input
        # factor diagonal (kfac's default layout: DiagonalFactors over the vocab).
        keys = {path for path, _ in flat}
        children: dict[tuple, set] = {}
        for path in keys:
            children.setdefault(path[:-1], set()).add(path[-1])
        norm = ({"scale"}, {"scale", "bias"})
        for path, s in flat:
            moments += [(s, 4), (s, 4)] + ([((), 1)] if kfac_diagonal_blocks else [])
            if kfac_norm_leaves and children[path[:-1]] in norm:
                continue  # a norm layer's scale and bias: diagonal statistics only
            folded_into = path[:-1] + ("kernel",)
            if path[-1] == "bias" and folded_into in keys:
                kshape = dict(flat)[folded_into]
                if len(kshape) >= 2 and kshape[-1:] == s:
                    continue  # folded into its kernel's homogeneous A
            if not s:
                continue
            d_in = math.prod(s[:-1])
            bias = path[:-1] + ("bias",)
            if path[-1] == "kernel" and len(s) >= 2 and dict(flat).get(bias) == s[-1:]:
                d_in += 1
            embedding = kfac_diagonal_blocks and path[-1] == "embedding" and len(s) == 2
            for d, diag in ((d_in, embedding), (s[-1], False)):
                for field in ("factors", "inverses", "pending")[: 3 if kfac_pending else 2]:
                    blocks.append((field, (d,) if diag else _factor(d, max_dim), w, 1))
    elif alias == "psgd_kron":
        # mu params-shaped; one factor Q per axis of a matrix, one over a whole
        # vector, triangular (stored square) or diagonal past max_precond_dim.
        for _, s in flat:
            moments.append((s, 4))
            if len(s) > 2:
                raise ValueError(f"the formula covers 1-D and 2-D leaves only, got shape {s}")
            axes = s if (len(s) == 2 and min(s) > 1) else ((math.prod(s),) if s else ())
            if axes == (1,):
                continue
            for d in axes:
                blocks.append(("q", _factor(d, max_dim), w, 1))
    else:
        raise ValueError(f"alias must be one of {ALIASES}, got {alias!r}")
    return Inventory(tuple(moments), tuple(blocks), SCALAR_BYTES[alias], alias == "kfac")


# K-FAC's owner layout puts factors whose lengths are within this ratio into one
# stack, padded to the largest (layerwise_optax._owner.BUCKET_RATIO).
FACTOR_BUCKET_RATIO = 4 / 3


def _factor_buckets(lengths: list[int]) -> list[tuple[int, ...]]:
    """Factor lengths in buckets: from the largest ``s`` down, every ``d`` with ``d * 4/3 >= s``."""
    rest = sorted(set(lengths), reverse=True)
    out = []
    while rest:
        bucket = tuple(d for d in rest if d * FACTOR_BUCKET_RATIO >= rest[0])
        out.append(bucket)
        rest = rest[len(bucket) :]
    return out


def _per_factor_blocks(inv: Inventory, devices: int) -> int:
    """Block bytes per device of K-FAC's per-factor owner layout.

    Per field and factor kind (square or diagonal) the factors' lengths are
    bucketed; a bucket of ``n`` factors with largest length ``s`` is a stack
    padded to a multiple of ``D``: ``ceil(n / D)`` entries of ``s x s`` (or
    ``s``) per device.
    """
    lengths: dict[tuple, list[int]] = collections.defaultdict(list)
    for field, s, w, n in inv.blocks:
        lengths[(field, len(s), w)] += [s[0]] * n
    total = 0
    for (_, rank, w), ds in lengths.items():
        for bucket in _factor_buckets(ds):
            n = sum(1 for d in ds if d in bucket)
            total += -(-n // devices) * max(bucket) ** rank * w
    return total


def _moment_shard_bytes(shape: tuple[int, ...], itemsize: int, devices: int) -> int:
    """Bytes per device of a params-shaped leaf under the FSDP spec (:func:`fsdp_specs`)."""
    size = math.prod(shape) * itemsize
    return size // devices if any(d % devices == 0 for d in shape) else size


def per_device(inv: Inventory, devices: int, layout: str) -> dict[str, int]:
    """Bytes per device of ``inv`` on ``devices`` devices.

    Args:
      inv: The formula's :class:`Inventory`.
      devices: The mesh size ``D``.
      layout: ``"replicated"`` (per-block arrays whole on every device),
        ``"owner"`` (per-block arrays of all leaves grouped by field, block shape
        and dtype, each group padded to a multiple of ``D``: ``ceil(n / D)``
        blocks per device; K-FAC's single factors bucketed by length,
        :func:`_per_factor_blocks`), ``"owner_per_leaf"`` (each leaf's stack padded
        and split on its own) or ``"ideal"`` (every block's bytes divided by
        ``D``: the lower bound of any owner layout, no padding).

    Returns:
      ``{"total", "moments", "blocks", "scalars"}`` in bytes.
    """
    moments = sum(_moment_shard_bytes(s, w, devices) for s, w in inv.moments)
    if layout == "replicated":
        blocks = sum(math.prod(s) * w * n for _, s, w, n in inv.blocks)
    elif layout == "owner" and inv.per_factor:
        blocks = _per_factor_blocks(inv, devices)
    elif layout == "owner":
        groups: dict[tuple, int] = collections.defaultdict(int)
        for field, s, w, n in inv.blocks:
            groups[(field, s, w)] += n
        blocks = sum(-(-n // devices) * math.prod(s) * w for (_, s, w), n in groups.items())
    elif layout == "ideal":
        blocks = sum(math.prod(s) * w * n for _, s, w, n in inv.blocks) // devices
    elif layout == "owner_per_leaf":
        blocks = sum(-(-n // devices) * math.prod(s) * w for _, s, w, n in inv.blocks)
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    # What no device shares (the measurement's "replicated part"): the scalars,
    # the moments FSDP cannot split, and in the replicated layout every block.
    whole = inv.scalar_bytes + sum(
        math.prod(s) * w for s, w in inv.moments if not any(d % devices == 0 for d in s)
    )
    if layout == "replicated":
        whole += blocks
    return {
        "total": moments + blocks + inv.scalar_bytes,
        "moments": moments,
        "blocks": blocks,
        "scalars": inv.scalar_bytes,
        "replicated_part": moments + blocks + inv.scalar_bytes if devices == 1 else whole,
    }


# ---------------------------------------------------------------------------
# The library: eval_shape of init, state_shardings on an abstract mesh.


def has_precond_dtype(alias: str) -> bool:
    """Whether the library's alias takes ``precond_dtype``."""
    import layerwise_optax as lo

    fn = {"shampoo": lo.shampoo, "soap": lo.soap, "kfac": lo.kfac, "psgd_kron": lo.psgd_kron}
    return alias in fn and "precond_dtype" in inspect.signature(fn[alias]).parameters


def optimizer(
    alias: str,
    *,
    block_size: int | None = BLOCK_SIZE,
    precond_dtype: str = "float32",
    max_precond_dim: int | None = None,
    state_layout: str = "auto",
):
    """The transform whose state is projected (``None`` if ``precond_dtype`` is not an option).

    ``max_precond_dim`` ``None``: the alias's entry in :data:`MAX_PRECOND_DIM`.
    ``state_layout``: the Kronecker aliases' layout (``'auto'``: the owner layout
    under the abstract mesh; ``'replicated'``: every factor on every device).
    """
    import jax.numpy as jnp
    import optax

    import layerwise_optax as lo

    if alias == "adamw":
        return optax.adamw(1e-3)
    extra = {}
    if precond_dtype != "float32":
        if not has_precond_dtype(alias):
            return None
        extra["precond_dtype"] = jnp.dtype(precond_dtype)
    dim = MAX_PRECOND_DIM[alias] if max_precond_dim is None else max_precond_dim
    extra["state_layout"] = state_layout
    if alias in ("shampoo", "soap"):
        fn = lo.shampoo if alias == "shampoo" else lo.soap
        return fn(1e-3, block_size=block_size, max_precond_dim=dim, **extra)
    if alias == "kfac":
        return lo.kfac(1e-3, max_precond_dim=dim, **extra)
    return lo.psgd_kron(1e-3, max_precond_dim=dim, **extra)


def abstract_params(shapes: Any) -> Any:
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes, is_leaf=_is_shape)


def fsdp_specs(params: Any, devices: int) -> Any:
    """FSDP: each leaf's first axis divisible by ``devices`` over 'data', else replicated."""
    from benchmarks.sharded_state import _specs

    return _specs(params, devices)


def replicated_shardings(params: Any, specs: Any, mesh: Any, state: Any) -> Any:
    """The replicated layout without the library: moments like their param, the rest whole.

    A state leaf is placed like the parameter that has its shape and whose path
    appears in the leaf's path (the longest such), as
    :func:`layerwise_optax.state_shardings` placed it before the owner layout;
    every other leaf is replicated.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    def keys(path):
        return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)

    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_specs = jax.tree.structure(params).flatten_up_to(specs)
    named = [(keys(p), tuple(x.shape), s) for (p, x), s in zip(flat, flat_specs)]

    def place(path, leaf):
        k = keys(path)
        best = None
        for pk, shape, spec in named:
            n = len(pk)
            if tuple(leaf.shape) == shape and any(k[i : i + n] == pk for i in range(len(k))):
                if best is None or n > len(best[0]):
                    best = (pk, spec)
        return NamedSharding(mesh, PartitionSpec() if best is None else best[1])

    return jax.tree_util.tree_map_with_path(place, state)


def library_bytes(
    tx: Any, shapes: Any, devices: int, *, use_state_shardings: bool = True
) -> dict[str, Any]:
    """Per-device state bytes of ``tx`` as the library lays it out on ``devices`` devices.

    ``jax.eval_shape(tx.init, params)`` (under the abstract mesh, so an ``init``
    that reads the mesh picks its layout) gives the leaves, and
    :func:`layerwise_optax.state_shardings` with FSDP specs on a one-axis
    ``AbstractMesh`` their shardings; a leaf holds
    ``NamedSharding.shard_shape(shape)`` elements on each device.

    Returns:
      ``{"total": bytes per device, "state_bytes": unsharded total,
      "via": "state_shardings" | "fallback: <error>" | "replicated_shardings"
      (``use_state_shardings=False``: :func:`replicated_shardings`), "layout": "replicated" |
      "owner"}``: ``"owner"`` when a leaf that is not shaped like a
      parameter is split over the mesh.
    """
    import jax
    from jax.sharding import AbstractMesh

    import layerwise_optax as lo

    mesh = AbstractMesh((devices,), ("data",))
    params = abstract_params(shapes)
    specs = fsdp_specs(params, devices)
    with jax.sharding.use_abstract_mesh(mesh):
        state = jax.eval_shape(tx.init, params)
        if not use_state_shardings:
            shardings = replicated_shardings(params, specs, mesh, state)
            via = "replicated_shardings"
        else:
            try:
                shardings = lo.state_shardings(tx, params, specs, mesh=mesh)
                via = "state_shardings"
            except Exception as e:  # noqa: BLE001 - reported; the fallback keeps the table
                shardings = replicated_shardings(params, specs, mesh, state)
                via = f"fallback: {type(e).__name__}: {e}"
    leaves = jax.tree.leaves(state)
    param_shapes = {tuple(x.shape) for x in jax.tree.leaves(params)}
    total, layout = 0, "replicated"
    for leaf, sh in zip(leaves, jax.tree.leaves(shardings), strict=True):
        total += math.prod(sh.shard_shape(tuple(leaf.shape))) * leaf.dtype.itemsize
        split = any(e is not None for e in sh.spec)
        if split and tuple(leaf.shape) not in param_shapes:
            layout = "owner"  # a leaf that is no parameter's moment, split over the mesh
    state_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)
    return {"total": total, "state_bytes": state_bytes, "via": via, "layout": layout}


def eval_shape_bytes(tx: Any, shapes: Any) -> int:
    """Unsharded state bytes of ``tx`` from ``jax.eval_shape(tx.init, params)``, off any mesh."""
    import jax

    state = jax.eval_shape(tx.init, abstract_params(shapes))
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1)


def project(quick: bool) -> dict[str, Any]:
    """Formula and library counts for every model, device count, alias and dtype."""
    counts = QUICK_DEVICE_COUNTS if quick else DEVICE_COUNTS
    out: dict[str, Any] = {}
    for mname, shapes in models(quick).items():
        entry: dict[str, Any] = {
            "params": param_count(shapes),
            "params_bytes": 4 * param_count(shapes),
            "devices": {},
        }
        block = 32 if quick else BLOCK_SIZE
        for n in counts:
            per_alias: dict[str, Any] = {}
            for alias in ALIASES:
                for dtype in DTYPES if alias in KRONECKER else ("float32",):
                    inv = inventory(alias, shapes, block_size=block, precond_dtype=dtype)
                    row: dict[str, Any] = {
                        "formula": {layout: per_device(inv, n, layout) for layout in LAYOUTS},
                        "formula_state_bytes": inv.total_bytes(),
                    }
                    tx = optimizer(alias, block_size=block, precond_dtype=dtype)
                    if tx is None:
                        row["library"] = None
                        row["note"] = f"formula only: {alias} has no precond_dtype option"
                    else:
                        # The library's own layout under the mesh (the owner layout
                        # for the Kronecker aliases), and its replicated layout.
                        row["library"] = library_bytes(tx, shapes, n)
                        rep = optimizer(
                            alias, block_size=block, precond_dtype=dtype, state_layout="replicated"
                        )
                        row["library_replicated"] = library_bytes(rep, shapes, n)
                        row["state_bytes_off_mesh"] = eval_shape_bytes(tx, shapes)
                        row["rel_diff_replicated"] = _rel(
                            row["formula"]["replicated"]["total"],
                            row["library_replicated"]["total"],
                        )
                        for layout in ("owner", "owner_per_leaf"):
                            row[f"rel_diff_{layout}"] = _rel(
                                row["formula"][layout]["total"], row["library"]["total"]
                            )
                    per_alias[f"{alias}/{dtype}"] = row
            entry["devices"][str(n)] = per_alias
        out[mname] = entry
    return out


# ---------------------------------------------------------------------------
# The check against the measured 8-device numbers.


_RESULTS = pathlib.Path(__file__).resolve().parent / "results"


# The last full sharded_state record measured in the replicated layout (before
# the owner layout became the default under a mesh): what the formula models.
REPLICATED_RECORD = "2026-11-30_sharded_state/124447-6332.json"


def replicated_sharded_state_record(root: pathlib.Path = _RESULTS) -> pathlib.Path | None:
    """The ``sharded_state`` record of the replicated layout (:data:`REPLICATED_RECORD`)."""
    path = root / REPLICATED_RECORD
    return path if path.exists() else None


def check_against_record(
    path: pathlib.Path,
    *,
    kfac_diagonal_blocks: bool = True,
    kfac_pending: bool = False,
    kfac_norm_leaves: bool = True,
) -> dict[str, Any]:
    """The formula on the record's workloads at its device counts against its measurements.

    The record's optimizers (``benchmarks.sharded_state``) use the defaults
    modelled here (Shampoo/SOAP ``max_precond_dim`` 1024, K-FAC 4096, PSGD 8192)
    with the record's block size. ``kfac_diagonal_blocks``, ``kfac_pending``: as
    :func:`inventory`'s (``False``, ``True`` for a record measured before K-FAC's
    diagonal blocks and before its pending statistics became multi_steps' own).
    """
    from benchmarks.sharded_state import workloads

    record = json.loads(path.read_text())
    trees = workloads(quick=False)
    out: dict[str, Any] = {}
    for n, per_w in record["results"]["devices"].items():
        for wname, per_alias in per_w.items():
            shapes, block = trees[wname]
            assert block == record["config"]["workloads"][wname]["block_size"]
            for alias in ALIASES:
                inv = inventory(
                    alias,
                    shapes,
                    block_size=block,
                    kfac_diagonal_blocks=kfac_diagonal_blocks,
                    kfac_pending=kfac_pending,
                    kfac_norm_leaves=kfac_norm_leaves,
                )
                measured = per_alias[alias]
                mine = {layout: per_device(inv, int(n), layout) for layout in LAYOUTS}
                out.setdefault(wname, {}).setdefault(n, {})[alias] = {
                    "measured_per_device": measured["state_bytes_per_device_max"],
                    "measured_replicated_part": measured["state_bytes_replicated_per_device"],
                    "formula_replicated": mine["replicated"]["total"],
                    "formula_replicated_part": mine["replicated"]["replicated_part"],
                    "formula_owner": mine["owner"]["total"],
                    "formula_ideal": mine["ideal"]["total"],
                }
    return out


_SHORT = {"float32": "f32", "bfloat16": "bf16"}


def _gb(b: float, unit: float = 1e9) -> str:
    return f"{b / unit:.2f}"


def table(results: dict[str, Any]) -> str:
    """GB per device: replicated / owner, float32 and bfloat16, per model and device count."""
    lines = []
    for mname, entry in results["models"].items():
        counts = list(entry["devices"])
        unit, name = (1e9, "GB") if entry["params_bytes"] > 1e9 else (1e6, "MB")
        lines.append(
            f"\n{mname} ({entry['params'] / 1e9:.2f}B params, "
            f"{_gb(entry['params_bytes'], unit)} {name} float32): optimizer state {name} per "
            "device, replicated / owner"
        )
        head = f"{'alias':10s}" + "".join(
            f"{f'{n} dev {_SHORT[d]}':>18s}" for n in counts for d in DTYPES
        )
        lines.append(head)
        for alias in ALIASES:
            cells = []
            for n in counts:
                for dtype in DTYPES:
                    row = entry["devices"][n].get(f"{alias}/{dtype}") or entry["devices"][n].get(
                        f"{alias}/float32"
                    )
                    f = row["formula"]
                    mark = "*" if row["library"] is None else ""
                    cells.append(
                        f"{_gb(f['replicated']['total'], unit)} / "
                        f"{_gb(f['owner']['total'], unit)}{mark}"
                    )
            lines.append(f"{alias:10s}" + "".join(f"{c:>18s}" for c in cells))
        lines.append("(* formula only: the alias has no precond_dtype option)")
        lines.append(
            "formula vs library (eval_shape + state_shardings at the same mesh size): "
            "relative difference to each layout's formula; formula - eval_shape state bytes"
        )
        for n in counts:
            for key, row in entry["devices"][n].items():
                lib = row["library"]
                if lib is None:
                    continue
                lines.append(
                    f"  {n:>4s} {key:19s} library {_gb(lib['total']):>7s} GB, {lib['layout']}"
                    f" via {lib['via'][:60]}: replicated {row['rel_diff_replicated']:.1e}"
                    f", owner {row['rel_diff_owner']:.1e}"
                    f", owner per leaf {row['rel_diff_owner_per_leaf']:.1e};"
                    f" {row['formula_state_bytes'] - row['state_bytes_off_mesh']:+d} B"
                )
    check = results.get("check_against_record")
    if check:
        lines.append(
            f"\nformula vs measured ({results['record']}), bytes per device "
            "(formula - measured for the replicated and the owner layout; ideal: no padding)"
        )
        for wname, per_n in check.items():
            for n, per_alias in per_n.items():
                for alias, c in per_alias.items():
                    m = c["measured_per_device"]
                    lines.append(
                        f"  {wname:26s} {n:>2s} {alias:10s} measured {m:>10d}"
                        f"  replicated {c['formula_replicated'] - m:+d}"
                        f"  owner {c['formula_owner'] - m:+d}"
                        f"  (owner {c['formula_owner'] / 1e6:.2f} MB,"
                        f" ideal {c['formula_ideal'] / 1e6:.2f} MB)"
                    )
    return "\n".join(lines)


def markdown_table(results: dict[str, Any]) -> str:
    """The README's table: GB per device, each model, alias, device count, dtype and layout.

    ``†``: formula only (the alias has no ``precond_dtype`` option). Owner cells
    are the library's owner layout read from ``state_shardings`` on the abstract
    mesh; a cell in italics is the formula's estimate (group by field and factor
    shape, pad to the device count) where the library gives no owner layout.
    """
    rows = []
    for mname, entry in results["models"].items():
        counts = list(entry["devices"])
        if not rows:
            head = ["model", "alias"] + [
                f"{n} dev {_SHORT[d]} {lay}"
                for n in counts
                for d in DTYPES
                for lay in ("repl.", "owner")
            ]
            rows.append("| " + " | ".join(head) + " |")
            rows.append("|" + "---|" * len(head))
        label = f"{mname} ({entry['params'] / 1e9:.2f}B)"
        for alias in ALIASES:
            cells = [label, alias]
            for n in counts:
                for dtype in DTYPES:
                    row = entry["devices"][n].get(f"{alias}/{dtype}")
                    row = row or entry["devices"][n][f"{alias}/float32"]
                    lib = row["library"]
                    mark = "†" if lib is None else ""
                    if lib is not None and lib["layout"] == "owner":
                        owner = _gb(lib["total"])  # the library's owner layout, exact
                    else:  # the formula's estimate (no library layout to read)
                        owner = f"*{_gb(row['formula']['owner']['total'])}{mark}*"
                    cells += [_gb(row["formula"]["replicated"]["total"]) + mark, owner]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small trees on 8 and 16 devices")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"models": project(args.quick)}
    record = replicated_sharded_state_record()
    if record is not None:
        results["record"] = str(record.relative_to(_RESULTS.parent))
        # Measured before K-FAC's diagonal blocks (stop 26) and while every K-FAC
        # state held pending statistics: compared as of then.
        results["check_against_record"] = check_against_record(
            record, kfac_diagonal_blocks=False, kfac_pending=True, kfac_norm_leaves=False
        )
    from benchmarks import harness

    config = {
        "device_counts": list(QUICK_DEVICE_COUNTS if args.quick else DEVICE_COUNTS),
        "aliases": list(ALIASES),
        "dtypes": list(DTYPES),
        "block_size": 32 if args.quick else BLOCK_SIZE,
        "max_precond_dim": MAX_PRECOND_DIM,
        "param_specs": "FSDP: first axis divisible by the device count over 'data'",
        "owner_layout": "per-block arrays grouped by (field, block shape, dtype), padded to a "
        "multiple of the device count, split along the block axis; K-FAC: single factors "
        "bucketed by length (within 4/3, padded to the largest) per field and kind",
        "quick": args.quick,
    }
    path = harness.write_record(args.out, "projection", config, results)
    print(table(results))
    print("\n" + markdown_table(results))
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
