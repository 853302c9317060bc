"""layer_roles: the rules on real Flax NNX models, overrides, and bad input."""

import jax
import jax.numpy as jnp
import optax
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
        "unit": jnp.zeros((8, 1, 6)),  # unit axes absorbed: a matrix, not 8 stacked rows
        "column": jnp.zeros((1, 6, 1)),  # one axis longer than 1: a vector
        "t": jnp.zeros(()),
        "v": jnp.zeros(3),
    }
    assert lo.layer_roles(params, infer_head=False) == {
        "w": "matrix",
        "stack": "stacked",
        "unit": "matrix",
        "column": "vector",
        "t": "scalar",
        "v": "vector",
    }


@pytest.mark.parametrize(
    "shape, role, want",
    [
        ((8, 1, 6), "matrix", "8x6"),
        ((8, 6, 1), "matrix", "8x6"),
        ((1, 8, 6), "matrix", "8x6"),
        ((4, 3, 5), "matrix", "12x5"),  # 'matrix' is a matrix for any ndim
        ((4, 3, 5), "stacked", "4 x 3x5"),
        ((3, 3, 4, 8), "conv", "36x8"),
        ((6, 4), "head", "6x4"),
        ((7,), "vector", "-"),
    ],
)
def test_one_matrix_view_per_role_and_shape(shape, role, want):
    assert lo._roles._matrix_text(role, shape, ()) == want


class _Mlp(nnx.Module):
    """The issue's model: an output layer with a plain name."""

    def __init__(self, rngs):
        self.l1 = nnx.Linear(8, 32, rngs=rngs)
        self.l2 = nnx.Linear(32, 32, rngs=rngs)
        self.l3 = nnx.Linear(32, 10, rngs=rngs)


def test_the_head_is_found_from_the_shapes_and_printed():
    params = nnx.state(_Mlp(nnx.Rngs(0)), nnx.Param)
    roles = lo.layer_roles(params)
    assert roles["l3"]["kernel"] == "head"
    assert roles["l1"]["kernel"] == roles["l2"]["kernel"] == "matrix"
    text = lo.format_roles(params)
    assert "l3/kernel  (32, 10)  head    32x10" in text
    assert text.splitlines()[-1] == "head: l3/kernel (inferred: its 10 outputs feed no other layer)"
    # The same on plain dicts and pure-dict states (paths are the same).
    pure = nnx.to_pure_dict(params)
    assert lo.layer_roles(pure)["l3"]["kernel"] == "head"
    # Muon sends it to AdamW, as the README says of the head.
    state = lo.muon(0.02).init(pure)
    muon_mu = state.inner_states["muon"].inner_state[0].mu
    assert isinstance(muon_mu["l3"]["kernel"], optax.MaskedNode)
    assert not isinstance(muon_mu["l2"]["kernel"], optax.MaskedNode)
    # Told otherwise, nothing is searched.
    assert lo.layer_roles(pure, infer_head=False)["l3"]["kernel"] == "matrix"
    kept = lo.layer_roles(pure, overrides={"l3/kernel": "matrix"})
    assert kept["l3"]["kernel"] == "matrix"
    note = lo._roles._label(pure, {"l3/kernel": "matrix"}, True).note
    assert note == "head: none (the output layer l3/kernel has its role set by overrides)"
    assert lo.format_roles(pure, lambda p: kept).splitlines()[-1] == "head: none (roles given)"
    assert lo.layer_roles(pure, overrides={"l2/kernel": "head"})["l3"]["kernel"] == "matrix"


def test_an_ambiguous_head_is_an_error_that_says_how_to_choose():
    square = {"a": jnp.zeros((4, 4)), "b": jnp.zeros((4, 4))}
    with pytest.raises(ValueError, match=r"equal widths\): a 4->4, b 4->4\. Say which"):
        lo.layer_roles(square)
    with pytest.raises(ValueError, match="cannot tell which layer is the output head"):
        lo.muon(0.02).init(square)
    two = {"trunk": jnp.zeros((4, 8)), "x": jnp.zeros((8, 3)), "y": jnp.zeros((8, 5))}
    with pytest.raises(ValueError, match=r"several layers feed no other layer: x 8->3, y 8->5"):
        lo.layer_roles(two)
    assert lo.layer_roles(two, overrides={"y": "head"}) == {
        "trunk": "matrix",
        "x": "matrix",
        "y": "head",
    }
    assert lo.layer_roles(square, infer_head=False) == {"a": "matrix", "b": "matrix"}
    # A classifier after a flatten is fed by no layer; it is still the one matrix
    # whose output feeds none.
    cnn = {
        "conv1": {"kernel": jnp.zeros((3, 3, 1, 8))},
        "conv2": {"kernel": jnp.zeros((3, 3, 8, 16))},
        "linear": {"kernel": jnp.zeros((16 * 7 * 7, 10))},
    }
    assert lo.layer_roles(cnn)["linear"]["kernel"] == "head"
    # A layer feeding none is no evidence when no layer feeds another.
    assert lo.layer_roles({"w": jnp.zeros((4, 6)), "v": jnp.zeros((3, 3))}) == {
        "w": "matrix",
        "v": "matrix",
    }
    with pytest.raises(TypeError, match="infer_head must be a bool"):
        lo.layer_roles(square, infer_head="no")


class _Attention(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(50, 16, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(4, 16, qkv_features=32, decode=False, rngs=rngs)
        self.fc = nnx.Linear(16, 50, rngs=rngs)


def test_attention_kernels_are_input_by_output_matrices():
    params = nnx.state(_Attention(nnx.Rngs(0)), nnx.Param)
    lines = {ln.split()[0]: ln.split()[-2:] for ln in lo.format_roles(params).splitlines()[1:-1]}
    for name in ("query", "key", "value"):
        assert lines[f"attn/{name}/kernel"] == ["matrix", "16x32"], lines  # (16, 4, 8)
    assert lines["attn/out/kernel"] == ["matrix", "32x16"]  # (4, 8, 16)
    assert lines["fc/kernel"] == ["head", "16x50"]


def test_overrides_are_patterns_and_later_ones_win():
    params = {"layers": [{"kernel": jnp.zeros((4, 4))} for _ in range(3)]}
    roles = lo.layer_roles(
        params, overrides={"layers/*/kernel": "head", "layers/0/kernel": "matrix"}
    )
    assert [r["kernel"] for r in roles["layers"]] == ["matrix", "head", "head"]


def test_format_roles_lists_every_leaf():
    text = lo.format_roles(_params())
    assert "lm_head/kernel  (16, 40)" in text.replace("   ", "  ") or "lm_head/kernel" in text
    assert len(text.splitlines()) == 1 + 11 + 1
    assert text.splitlines()[0].split() == ["path", "shape", "role", "matrix"]
    assert text.splitlines()[-1] == "head: lm_head/kernel (named as a head)"


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
