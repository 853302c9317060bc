"""layer_roles: the rules on real Flax NNX models, overrides, and bad input."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import layerwise_optax as lo


class _Lm(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(40, 16, rngs=rngs)
        self.norm = nnx.LayerNorm(16, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(16, 16, rngs=rngs) for _ in range(2)])
        self.conv = nnx.Conv(16, 16, (3,), rngs=rngs)
        self.lm_head = nnx.Linear(16, 40, rngs=rngs)


def _params():
    return nnx.state(_Lm(nnx.Rngs(0)), nnx.Param)


def test_roles_of_a_flax_nnx_language_model():
    roles = lo.layer_roles(_params())
    flat = {lo._roles.path_string(k): v for k, v in jax.tree_util.tree_leaves_with_path(roles)}
    assert flat == {
        "blocks/0/bias": "vector",
        "blocks/0/kernel": "matrix",
        "blocks/1/bias": "vector",
        "blocks/1/kernel": "matrix",
        "conv/bias": "vector",
        "conv/kernel": "conv",
        "embed/embedding": "embedding",
        "lm_head/bias": "vector",
        "lm_head/kernel": "head",
        "norm/bias": "vector",
        "norm/scale": "vector",
    }


def test_shapes_decide_when_names_do_not():
    params = {
        "w": jnp.zeros((4, 4)),
        "stack": jnp.zeros((3, 4, 4)),
        "t": jnp.zeros(()),
        "v": jnp.zeros(3),
    }
    assert lo.layer_roles(params) == {
        "w": "matrix",
        "stack": "stacked",
        "t": "scalar",
        "v": "vector",
    }


def test_overrides_are_patterns_and_later_ones_win():
    params = {"layers": [{"kernel": jnp.zeros((4, 4))} for _ in range(3)]}
    roles = lo.layer_roles(
        params, overrides={"layers/*/kernel": "head", "layers/0/kernel": "matrix"}
    )
    assert [r["kernel"] for r in roles["layers"]] == ["matrix", "head", "head"]


def test_format_roles_lists_every_leaf():
    text = lo.format_roles(_params())
    assert "lm_head/kernel  (16, 40)" in text.replace("   ", "  ") or "lm_head/kernel" in text
    assert len(text.splitlines()) == 1 + 11
    assert text.splitlines()[0].split() == ["path", "shape", "role"]


def test_bad_overrides_name_the_problem():
    params = {"w": jnp.zeros((4, 4))}
    with pytest.raises(ValueError, match=r"overrides \['decoder/kernel'\] match no parameter path"):
        lo.layer_roles(params, overrides={"decoder/kernel": "head"})
    with pytest.raises(ValueError, match=r"role 'hidden' is not one of"):
        lo.layer_roles(params, overrides={"w": "hidden"})
    with pytest.raises(ValueError, match=r"param w: role 'weird'"):
        lo.muon(0.1, roles={"w": "weird"}).init(params)
    with pytest.raises(ValueError, match="roles tree does not match"):
        lo.muon(0.1, roles={"v": "matrix"}).init(params)


def test_masked_leaves_have_no_role():
    params = {"w": jnp.zeros((4, 4)), "b": jnp.zeros(4)}
    tx = lo.scale_by_muon()
    masked = lo.layer_roles({"w": params["w"], "b": optax_masked()})
    assert masked["b"] is None
    state = tx.init({"w": params["w"], "b": optax_masked()})
    assert state.mu["w"].shape == (4, 4)


def optax_masked():
    import optax

    return optax.MaskedNode()
