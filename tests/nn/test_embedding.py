import numpy as np
import pytest
from helpers import SOURCES, assert_close, reference

from diffusion_np.gradcheck import check_module, check_op
from diffusion_np.nn.embedding import (
    Embedding,
    TimestepEmbedding,
    Timesteps,
    embedding_backward,
    embedding_forward,
    timestep_embedding,
)


# ---------------------------------------------------------------------------- gradient checks
@pytest.mark.parametrize("B,cin,cout", [(3, 4, 6), (1, 5, 3), (2, 1, 1)])
def test_timestep_mlp_gradcheck(B, cin, cout):
    layer = TimestepEmbedding(cin, cout, rng=np.random.default_rng(0)).to(dtype=np.float64)
    # wide inputs so SiLU is probed on both tails, not just near 0
    x = 3.0 * np.random.default_rng(1).standard_normal((B, cin))
    errors = check_module(layer, x)
    assert set(errors) == {"input0", "linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    assert max(errors.values()) < 1e-7, errors


@pytest.mark.parametrize("shape,V,D", [((2, 6), 4, 3), ((1,), 3, 5), ((3, 2, 2), 2, 1)])
def test_embedding_gradcheck_with_repeated_ids(shape, V, D):
    rng = np.random.default_rng(2)
    ids = rng.integers(0, V, size=shape)
    ids.reshape(-1)[0] = ids.reshape(-1)[-1]  # at least one repeat when there is more than one id
    layer = Embedding(V, D, rng=rng).to(dtype=np.float64)
    errors = check_module(layer, ids)
    assert set(errors) == {"weight"}
    assert errors["weight"] < 1e-7, errors


def test_embedding_op_gradcheck():
    rng = np.random.default_rng(3)
    ids = np.array([[0, 2, 2], [1, 2, 0]])
    weight = rng.standard_normal((4, 3))
    errors = check_op(lambda w: embedding_forward(ids, w), embedding_backward, [weight])
    assert errors[0] < 1e-7, errors


def test_embedding_repeated_ids_sum():
    layer = Embedding(3, 2)
    layer(np.array([1, 1, 1, 0]))
    layer.backward(np.array([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0], [5.0, 5.0]], np.float32))
    np.testing.assert_allclose(layer.grads["weight"], [[5, 5], [111, 222], [0, 0]])


def test_embedding_gradients_accumulate():
    layer = Embedding(3, 2)
    for _ in range(2):
        layer(np.array([2]))
        layer.backward(np.ones((1, 2), np.float32))
    np.testing.assert_allclose(layer.grads["weight"][2], [2, 2])


# ---------------------------------------------------------------------------- behaviour
def test_timestep_embedding_formula_by_hand():
    # dim 4, shift 0: half = 2, freqs = exp(-ln(10000) * [0, 1] / 2) = [1, 1/100]
    t = np.array([0, 3])
    expected = np.array([[0, 0, 1, 1], [np.sin(3), np.sin(0.03), np.cos(3), np.cos(0.03)]])
    np.testing.assert_allclose(timestep_embedding(t, 4, downscale_freq_shift=0), expected, rtol=1e-6, atol=1e-7)
    flipped = timestep_embedding(t, 4, flip_sin_to_cos=True, downscale_freq_shift=0)
    np.testing.assert_allclose(flipped, expected[:, [2, 3, 0, 1]], rtol=1e-6, atol=1e-7)


def test_timestep_embedding_odd_dim_pads_a_zero_column():
    emb = timestep_embedding(np.array([5.0, 7.0]), 7)
    assert emb.shape == (2, 7) and emb.dtype == np.float32
    assert not emb[:, -1].any()


def test_timesteps_module_has_no_params_and_no_input_gradient():
    module = Timesteps(6, flip_sin_to_cos=True, downscale_freq_shift=0)
    emb = module(np.array([1, 2, 3]))
    assert emb.shape == (3, 6) and module.num_parameters() == 0
    assert module.backward(np.ones_like(emb)) is None


def test_timestep_mlp_float32_and_names():
    layer = TimestepEmbedding(4, 6)
    assert [n for n, _ in layer.named_parameters()] == [
        "linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"]
    y = layer(np.ones((2, 4), np.float32))
    assert y.dtype == layer.backward(y).dtype == np.float32


def test_silu_does_not_overflow():
    layer = TimestepEmbedding(1, 2)
    y = layer(np.array([[-1e4], [1e4]], np.float32))  # RuntimeWarnings are errors in this package
    assert np.isfinite(y).all()
    assert np.isfinite(layer.backward(np.ones_like(y))).all()


# ---------------------------------------------------------------------------- torch parity
@pytest.fixture(params=SOURCES, scope="module")
def torch_cases(request):
    return reference("embedding", request.param)


def test_timestep_embedding_matches_diffusers(torch_cases):
    cases = {n: c for n, c in torch_cases.items() if n.startswith("sinusoidal_")}
    assert len(cases) == 5
    for name, c in cases.items():
        emb = timestep_embedding(c["timesteps"], int(c["dim"]), flip_sin_to_cos=bool(c["flip"]),
                                 downscale_freq_shift=float(c["shift"]), scale=float(c["scale"]))
        assert emb.dtype == np.float32
        # loosened from 1e-5: at t = 999 the argument t * freq is ~1000, where one float32 ulp is
        # 6e-5, and torch's float32 exp rounds a few frequencies one ulp away from ours
        assert_close(emb, c["out"], atol=1e-4, what=name)


def test_timestep_mlp_matches_diffusers(torch_cases):
    cases = {n: c for n, c in torch_cases.items() if n.startswith("timestep_mlp_")}
    assert len(cases) == 2
    for name, c in cases.items():
        cout, cin = c["param.linear_1.weight"].shape
        layer = TimestepEmbedding(cin, cout)
        layer.load_state_dict({k.removeprefix("param."): v for k, v in c.items() if k.startswith("param.")})
        assert_close(layer(c["x"]), c["out"], what=f"{name}: out")
        assert_close(layer.backward(c["dout"]), c["dx"], what=f"{name}: dx")
        for key, grad in layer.named_grads():
            assert_close(grad, c[f"grad.{key}"], what=f"{name}: grad {key}")


def test_embedding_matches_torch(torch_cases):
    cases = {n: c for n, c in torch_cases.items() if n.startswith("tokens_")}
    assert len(cases) == 2
    for name, c in cases.items():
        layer = Embedding(*c["weight"].shape)
        layer.load_state_dict({"weight": c["weight"]})
        assert_close(layer(c["ids"]), c["out"], what=f"{name}: out")
        assert layer.backward(c["dout"]) is None
        assert_close(layer.grads["weight"], c["dweight"], what=f"{name}: dweight")


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "timesteps,dim,shift,error,match",
    [
        (np.zeros((2, 1)), 8, 1, ValueError, r"timesteps of shape \(B,\), got \(2, 1\)"),
        (np.array(3), 8, 1, ValueError, r"timesteps of shape \(B,\), got \(\)"),
        (np.array(["a"]), 8, 1, TypeError, "integer or float timesteps"),
        (np.zeros(2), 0, 1, ValueError, "dim >= 1, got 0"),
        (np.zeros(2), 2, 1, ValueError, "divides by zero"),
    ],
)
def test_timestep_embedding_bad_input(timesteps, dim, shift, error, match):
    with pytest.raises(error, match=match):
        timestep_embedding(timesteps, dim, downscale_freq_shift=shift)


@pytest.mark.parametrize(
    "x,error,match",
    [
        (np.zeros(4, np.float32), ValueError, r"TimestepEmbedding expects x of shape \(\.\.\., 4\).*got \(4,\)"),
        (np.zeros((2, 3), np.float32), ValueError, r"TimestepEmbedding expects x .*got \(2, 3\)"),
        (np.zeros((2, 4), np.int64), TypeError, "TimestepEmbedding expects x with a floating dtype"),
        (np.full((2, 4), np.nan, np.float32), ValueError, "TimestepEmbedding got a non-finite value"),
    ],
)
def test_timestep_mlp_bad_input(x, error, match):
    with pytest.raises(error, match=match):
        TimestepEmbedding(4, 3)(x)


def test_timestep_mlp_only_silu():
    with pytest.raises(ValueError, match="act='silu' only, got 'gelu'"):
        TimestepEmbedding(4, 3, act="gelu")


@pytest.mark.parametrize(
    "ids,error,match",
    [
        (np.array([0.0, 1.0]), TypeError, "Embedding expects integer ids, got float64"),
        ([0, 1], TypeError, "Embedding expects integer ids, got list"),
        (np.array([[0, 5], [1, 2]]), ValueError, r"ids in \[0, 5\), got id 5 \(ids range over \[0, 5\]\)"),
        (np.array([-1, 2]), ValueError, r"ids in \[0, 5\), got id -1"),
    ],
)
def test_embedding_bad_input(ids, error, match):
    with pytest.raises(error, match=match):
        Embedding(5, 3)(ids)


@pytest.mark.parametrize("layer", [TimestepEmbedding(2, 3), Embedding(3, 2)])
def test_backward_without_forward_raises(layer):
    with pytest.raises(RuntimeError, match=f"{type(layer).__name__}.backward called without a preceding"):
        layer.backward(np.zeros((1, 3), np.float32))


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_embeddings_cupy_match_numpy():
    import cupy as cp

    t = np.array([0, 10, 999])
    assert_close(timestep_embedding(cp.asarray(t), 33, flip_sin_to_cos=True), timestep_embedding(t, 33, True))

    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    cpu, gpu = TimestepEmbedding(8, 16), TimestepEmbedding(8, 16).to("cupy")
    assert_close(gpu(cp.asarray(x)), cpu(x), what="mlp out")
    dout = np.ones((3, 16), np.float32)
    assert_close(gpu.backward(cp.asarray(dout)), cpu.backward(dout), what="mlp dx")
    for (name, g_gpu), (_, g) in zip(gpu.named_grads(), cpu.named_grads()):
        assert_close(g_gpu, g, what=name)

    ids = np.array([[1, 1, 4], [0, 4, 4]])
    cpu, gpu = Embedding(5, 3), Embedding(5, 3).to("cupy")
    assert_close(gpu(cp.asarray(ids)), cpu(ids), what="tokens out")
    dout = np.random.default_rng(1).standard_normal((2, 3, 3)).astype(np.float32)
    cpu.backward(dout)
    gpu.backward(cp.asarray(dout))
    assert_close(gpu.grads["weight"], cpu.grads["weight"], what="tokens dweight")
