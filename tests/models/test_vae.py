"""Tests of the VAE (models/vae.py): gradient checks in float64, parity with diffusers'
AutoencoderKL (forward and every parameter gradient), the clamp, the sampling, bad input.

Gradient checks of whole networks differentiate K random coordinates of every
input and parameter numerically (:func:`_check_coordinates`); the small layers are
checked in full with :func:`diffusion_np.gradcheck.check_module`.
"""

import numpy as np
import pytest
from fixtures.cases_unet import assert_grads_match, our_layout, reference_shapes, torch_layout
from fixtures.cases_vae import CLAMPED_BIAS, CLAMPED_CHANNEL, LOSS_CASES, TINY_VAE, vae_inputs, vae_weights
from helpers import SOURCES, assert_close, reference

from diffusion_np.gradcheck import check_module, check_op, sampled_grad_error
from diffusion_np.models.vae import (
    LOGVAR_MAX,
    LOGVAR_MIN,
    AutoencoderKL,
    DiagonalGaussian,
    DownEncoderBlock2D,
    UNetMidBlock2D,
    UpDecoderBlock2D,
    VAEAttention,
    diagonal_gaussian_backward,
    diagonal_gaussian_forward,
    reparameterize_backward,
    reparameterize_forward,
)

#: the float64 network of the gradient checks: two levels, a 3x3 latent, two groups
GRADCHECK_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 6), layers_per_block=1,
    latent_channels=2, norm_num_groups=2,
)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _randomize(module, rng, scale=0.3):
    """Move every parameter away from its init (norms' ones and zeros hide bugs)."""
    for _, p in module.named_parameters():
        p += scale * rng.standard_normal(p.shape)
    return module


# ---------------------------------------------------------------------------- a K-coordinate gradient check
def _check_coordinates(scalar, pairs, k: int, rng, h: float = 1e-6) -> dict:
    """Centred differences of ``scalar()`` at ``k`` random entries of each array.

    ``pairs``: (name, array, analytic gradient) triples; arrays are perturbed in place
    and restored, so ``scalar`` must read them. Returns {name: norm-wise relative error}.
    """
    return {name: sampled_grad_error(scalar, x, grad, k, rng, h) for name, x, grad in pairs}


def _param_pairs(module):
    """(name, parameter, gradient) for the finite-difference check, leaving out the key
    biases: their gradient is exactly zero (below), a relative error of noise against noise."""
    return [(name, p, g.copy()) for name, p, g in module.parameters_and_grads() if not name.endswith("to_k.bias")]


def _assert_key_bias_grads_vanish(module) -> None:
    """softmax(q (k + b)^T) = softmax(q k^T + q b^T): q b^T adds one constant to a whole row of
    scores, which the softmax ignores, so the loss does not depend on the key bias at all."""
    key_biases = [g for name, g in module.named_grads() if name.endswith("to_k.bias")]
    assert key_biases and all(float(np.abs(g).max()) < 1e-12 for g in key_biases)


def _gradcheck_vae(rng) -> AutoencoderKL:
    vae = AutoencoderKL(**GRADCHECK_VAE, rng=rng, dtype=np.float64)
    _randomize(vae, rng, scale=0.2)
    # one logvar channel straddles the clamp at -30, so the clamp is inside the check
    vae.quant_conv.params["bias"][GRADCHECK_VAE["latent_channels"]] = -30.0
    return vae


def test_encode_path_gradcheck(rng):
    vae = _gradcheck_vae(rng)
    x = rng.standard_normal((2, 6, 6, 3))
    post = vae.encode(x)
    assert 0 < (post.logvar == LOGVAR_MIN).mean() < 0.5  # part of one channel is clamped
    dmean, dlogvar = rng.standard_normal(post.mean.shape), rng.standard_normal(post.mean.shape)
    vae.zero_grad()
    dx = vae.encode_backward(dmean, dlogvar)

    def scalar():
        p = vae.encode(x)
        return float((p.mean * dmean).sum() + (p.logvar * dlogvar).sum())

    _assert_key_bias_grads_vanish(vae.encoder)
    pairs = [("x", x, dx)] + [pp for pp in _param_pairs(vae) if not pp[0].startswith(("decoder", "post_quant"))]
    errors = _check_coordinates(scalar, pairs, k=3, rng=rng)
    assert {"x", "encoder.mid_block.attentions.0.to_q.weight", "quant_conv.weight"} <= set(errors)
    assert max(errors.values()) < 1e-6, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


def test_decode_path_gradcheck(rng):
    vae = _gradcheck_vae(rng)
    z = rng.standard_normal((2, 3, 3, 2))
    dout = rng.standard_normal((2, 6, 6, 3))
    vae.decode(z)
    vae.zero_grad()
    dz = vae.decode_backward(dout)
    _assert_key_bias_grads_vanish(vae.decoder)
    pairs = [("z", z, dz)] + [pp for pp in _param_pairs(vae) if pp[0].startswith(("decoder", "post_quant"))]
    errors = _check_coordinates(lambda: float((vae.decode(z) * dout).sum()), pairs, k=3, rng=rng)
    assert {"z", "decoder.up_blocks.0.upsamplers.0.conv.weight", "decoder.conv_out.bias"} <= set(errors)
    assert max(errors.values()) < 1e-6, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


@pytest.mark.parametrize("recon,beta", [("l1", 0.3), ("mse", 1e-6)])
def test_whole_loss_gradcheck(rng, recon, beta):
    """The training loss: reconstruction through the sample (mean and logvar), KL, clamp."""
    vae = _gradcheck_vae(rng)
    x = rng.uniform(-1, 1, (2, 6, 6, 3))
    noise = rng.standard_normal((2, 3, 3, 2))
    vae.zero_grad()
    vae.loss(x, beta=beta, recon=recon, noise=noise)
    dx = vae.loss_backward()
    _assert_key_bias_grads_vanish(vae)
    pairs = [("x", x, dx)] + _param_pairs(vae)
    errors = _check_coordinates(lambda: float(vae.loss(x, beta, recon, noise)[0]), pairs, k=2, rng=rng)
    assert len(errors) == 1 + len(vae.state_dict()) - 2  # all but the two key biases
    assert max(errors.values()) < 1e-6, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


def test_sampled_forward_backward_gradcheck(rng):
    """forward(sample_posterior=True) / backward: the reparameterisation on its own (no KL)."""
    vae = _gradcheck_vae(rng)
    x = rng.standard_normal((1, 4, 4, 3))
    noise = rng.standard_normal((1, 2, 2, 2))
    dout = rng.standard_normal((1, 4, 4, 3))
    vae(x, noise=noise)
    vae.zero_grad()
    dx = vae.backward(dout)
    pairs = [("x", x, dx)] + _param_pairs(vae)
    errors = _check_coordinates(lambda: float((vae(x, noise=noise) * dout).sum()), pairs, k=2, rng=rng)
    assert max(errors.values()) < 1e-6, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


# ---------------------------------------------------------------------------- blocks, in full
@pytest.mark.parametrize("shape,rescale", [((2, 3, 2, 4), 1.0), ((1, 1, 5, 4), 2.0)])
def test_mid_block_attention_gradcheck(rng, shape, rescale):
    attn = _randomize(VAEAttention(4, norm_num_groups=2, rescale_output_factor=rescale, rng=rng,
                                   dtype=np.float64), rng)
    errors = check_module(attn, rng.standard_normal(shape))
    _assert_key_bias_grads_vanish(attn)
    del errors["to_k.bias"]
    assert set(errors) == {"input0", "group_norm.weight", "group_norm.bias", "to_q.weight", "to_q.bias",
                           "to_k.weight", "to_v.weight", "to_v.bias", "to_out.0.weight",
                           "to_out.0.bias"}
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("add_attention", [True, False])
def test_mid_block_gradcheck(rng, add_attention):
    block = _randomize(UNetMidBlock2D(4, resnet_groups=2, add_attention=add_attention, rng=rng,
                                      dtype=np.float64), rng)
    errors = check_module(block, rng.standard_normal((2, 3, 3, 4)))
    assert ("attentions.0.to_k.bias" in errors) == add_attention
    if add_attention:
        _assert_key_bias_grads_vanish(block)
        del errors["attentions.0.to_k.bias"]
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("add_resample", [True, False])
def test_encoder_and_decoder_blocks_gradcheck(rng, add_resample):
    down = _randomize(DownEncoderBlock2D(2, 4, num_layers=2, resnet_groups=2, add_downsample=add_resample,
                                         rng=rng, dtype=np.float64), rng)
    errors = check_module(down, rng.standard_normal((1, 4, 5, 2)))  # odd W: the (0, 1, 0, 1) pad at work
    assert ("downsamplers.0.conv.weight" in errors) == add_resample
    # 2 channels a group: with 1, GroupNorm would remove a conv bias entirely (a true zero gradient)
    up = _randomize(UpDecoderBlock2D(2, 4, num_layers=2, resnet_groups=2, add_upsample=add_resample,
                                     rng=rng, dtype=np.float64), rng)
    errors.update({f"up.{k}": v for k, v in check_module(up, rng.standard_normal((2, 2, 3, 2))).items()})
    assert max(errors.values()) < 1e-6, errors


# ---------------------------------------------------------------------------- the posterior ops
def test_clamp_gradient_is_zero_outside_the_range(rng):
    moments = rng.standard_normal((2, 3, 3, 4))
    moments[0, 0, 0, 2] = 25.0  # logvar above the range
    moments[1, 2, 1, 3] = -40.0  # below
    moments[0, 1, 1, 3] = LOGVAR_MAX  # exactly at the bound: PyTorch passes the gradient there
    (mean, logvar), cache = diagonal_gaussian_forward(moments)
    assert logvar[0, 0, 0, 0] == LOGVAR_MAX and logvar[1, 2, 1, 1] == LOGVAR_MIN
    np.testing.assert_array_equal(mean, moments[..., :2])
    dmean, dlogvar = rng.standard_normal(mean.shape), rng.standard_normal(mean.shape)
    dmoments = diagonal_gaussian_backward(dmean, dlogvar, cache)
    assert dmoments[0, 0, 0, 2] == 0 and dmoments[1, 2, 1, 3] == 0
    assert dmoments[0, 1, 1, 3] == dlogvar[0, 1, 1, 1]
    np.testing.assert_array_equal(dmoments[..., :2], dmean)
    # finite differences agree everywhere, the clamped entries included (not at the bound: a kink)
    moments[0, 1, 1, 3] = LOGVAR_MAX - 1.0
    errors = check_op(lambda m: diagonal_gaussian_forward(m),
                      lambda d, c: diagonal_gaussian_backward(d[0], d[1], c), [moments])
    assert errors[0] < 1e-8
    np.testing.assert_array_equal(diagonal_gaussian_backward(dmean, None, cache)[..., 2:], 0)


def test_reparameterize_gradcheck(rng):
    mean, logvar, noise = (rng.standard_normal((2, 3, 4, 2)) for _ in range(3))
    errors = check_op(reparameterize_forward, lambda d, c: reparameterize_backward(d, c), [mean, logvar, noise],
                      wrt=[0, 1])
    assert max(errors.values()) < 1e-8, errors


def test_diagonal_gaussian_sample_mode_kl(rng):
    mean = rng.standard_normal((3, 2, 2, 4)).astype(np.float32)
    logvar = rng.standard_normal((3, 2, 2, 4)).astype(np.float32)
    post = DiagonalGaussian(mean, logvar)
    noise = rng.standard_normal(mean.shape).astype(np.float32)
    assert_close(post.sample(noise=noise), mean + np.exp(0.5 * logvar) * noise)
    np.testing.assert_array_equal(post.sample(rng=7), post.sample(rng=np.random.default_rng(7)))
    assert post.sample(rng=1).dtype == np.float32
    assert post.mode() is mean
    kl = post.kl()
    assert kl.shape == (3,)
    assert_close(kl[1], 0.5 * (mean[1] ** 2 + np.exp(logvar[1]) - 1 - logvar[1]).sum())
    # the KL of N(0, I) from itself is 0
    assert float(np.abs(DiagonalGaussian(np.zeros((1, 2, 2, 2)), np.zeros((1, 2, 2, 2))).kl()).max()) == 0.0
    # the sample's statistics: N(mean, exp(logvar))
    big = DiagonalGaussian(np.full((1, 100, 100, 1), 0.5), np.full((1, 100, 100, 1), np.log(4.0)))
    s = big.sample(rng=0)
    assert abs(s.mean() - 0.5) < 0.05 and abs(s.std() - 2.0) < 0.05


def test_model_level_clamp_stops_gradients(rng):
    """A logvar channel pushed far below -30 everywhere: its quant_conv row gets no gradient."""
    vae = AutoencoderKL(**GRADCHECK_VAE, rng=rng)
    L = GRADCHECK_VAE["latent_channels"]
    vae.quant_conv.params["bias"][L] = -100.0
    x = rng.uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
    loss, parts = vae.loss(x, beta=1.0)
    assert (vae.posterior.logvar[..., 0] == LOGVAR_MIN).all()
    vae.loss_backward()
    g = vae.quant_conv.grads
    assert g["bias"][L] == 0 and not g["weight"][..., L].any()
    assert g["bias"][L + 1] != 0 and g["weight"][..., L + 1].any()


# ---------------------------------------------------------------------------- parity with diffusers
@pytest.fixture(params=SOURCES, scope="module")
def vae_cases(request):
    return reference("vae", request.param)


def _tiny(cases) -> AutoencoderKL:
    model = AutoencoderKL(**TINY_VAE)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == reference_shapes(cases["keys"])  # diffusers' keys, and shapes after the conv transpose
    model.load_state_dict(vae_weights(shapes))
    return model


def _assert_all_grads_match(model, case) -> float:
    """Every gradient against the reference summaries; the attention key biases, whose exact
    gradient is zero (see _assert_key_bias_grads_vanish), must be rounding noise on both sides."""
    grads = dict(model.named_grads())
    for name, ref in zip(case["key_bias_names"], case["key_bias_grads"]):
        assert float(np.abs(grads.pop(str(name))).max()) < 1e-5 and float(np.abs(ref).max()) < 1e-5, name
    return assert_grads_match(grads.items(), case)


def test_state_dict_keys_equal_diffusers(vae_cases):
    ours = {k: tuple(v.shape) for k, v in AutoencoderKL(**TINY_VAE).state_dict().items()}
    theirs = reference_shapes(vae_cases["keys"])
    assert set(ours) == set(theirs), (sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours)))
    assert ours == theirs
    assert "encoder.mid_block.attentions.0.to_q.bias" in ours  # the VAE's attention has q/k/v biases
    assert "decoder.up_blocks.0.resnets.1.conv1.weight" in ours  # layers_per_block + 1 resnets going up


def test_mode_path_matches_diffusers(vae_cases):
    c = vae_cases["mode"]
    vae = _tiny(vae_cases)
    post = vae.encode(c["x"])
    assert_close(post.mean, c["mean"], what="mean")
    assert_close(post.logvar, c["logvar"], what="logvar (clamped)")
    out = vae.decode(post.mode())
    assert_close(out, c["out"], what="decode(mode)")
    dz = vae.decode_backward(c["dout"])
    dx = vae.encode_backward(dz)  # only the mean was used
    assert_close(dx, c["dx"], what="dx")
    assert _assert_all_grads_match(vae, c) <= 1.0
    # the same through forward / backward
    vae.zero_grad()
    assert_close(vae(c["x"], sample_posterior=False), c["out"])
    assert_close(vae.backward(c["dout"]), c["dx"])
    assert _assert_all_grads_match(vae, c) <= 1.0


@pytest.mark.parametrize("name,recon,beta", LOSS_CASES)
def test_training_loss_matches_diffusers(vae_cases, name, recon, beta):
    c = vae_cases[name]
    assert float(c["beta"]) == beta
    vae = _tiny(vae_cases)
    loss, parts = vae.loss(c["x"], beta=beta, recon=recon, noise=c["noise"])
    assert loss.dtype == np.float32
    assert_close(loss, c["loss"], what="loss")
    assert_close(parts["recon"], c["recon"], what="recon")
    assert_close(parts["kl"], c["kl"], what="kl")
    dx = vae.loss_backward()
    assert_close(dx, c["dx"], what="dx")
    assert _assert_all_grads_match(vae, c) <= 1.0


def test_loss_backward_without_input_grad_gives_the_same_parameter_gradients(vae_cases):
    """What training calls: no d loss / d x (the encoder's first conv skips it), the same
    parameter gradients, and the first conv computes dx again afterwards."""
    c = vae_cases[LOSS_CASES[0][0]]
    grads = {}
    for input_grad in (True, False):
        vae = _tiny(vae_cases)
        vae.loss(c["x"], beta=LOSS_CASES[0][2], recon=LOSS_CASES[0][1], noise=c["noise"])
        dx = vae.loss_backward(input_grad=input_grad)
        assert (dx is None) == (not input_grad)
        assert vae.encoder.conv_in.input_grad
        grads[input_grad] = [g.copy() for _, g in vae.named_grads()]
    for full, skipped in zip(grads[True], grads[False]):
        np.testing.assert_array_equal(full, skipped)
    with pytest.raises(TypeError, match="input_grad must be True or False, got 'no'"):
        vae.loss_backward(input_grad="no")
    vae.encoder.conv_in.input_grad = False  # the user's own setting survives a loss_backward
    vae.loss(c["x"], beta=LOSS_CASES[0][2], recon=LOSS_CASES[0][1], noise=c["noise"])
    assert vae.loss_backward() is None and not vae.encoder.conv_in.input_grad


@pytest.mark.crosscheck
def test_every_gradient_entry_matches_diffusers_in_full():
    """The golden tests compare gradient summaries; this compares every entry (needs torch)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    theirs = diffusers.AutoencoderKL(**TINY_VAE).eval()
    ours = AutoencoderKL(**TINY_VAE)
    weights = vae_weights({k: tuple(v.shape) for k, v in ours.state_dict().items()})
    ours.load_state_dict(weights)
    theirs.load_state_dict({k: torch.tensor(torch_layout(k, v)) for k, v in weights.items()})
    inp = vae_inputs()
    tx = torch.tensor(inp["x"].transpose(0, 3, 1, 2).copy(), requires_grad=True)
    post = theirs.encode(tx).latent_dist
    z = post.mean + post.std * torch.tensor(inp["noise"].transpose(0, 3, 1, 2).copy())
    x_rec = theirs.decode(z).sample
    loss = (x_rec - tx).abs().sum() / tx.shape[0] + 0.5 * post.kl().mean()
    loss.backward()
    ours.loss(inp["x"], beta=0.5, noise=inp["noise"])
    assert_close(ours.loss_backward(), tx.grad.numpy().transpose(0, 2, 3, 1), what="dx")
    grads = dict(ours.named_grads())
    for name, p in theirs.named_parameters():
        ref = our_layout(p.grad.numpy())
        # as in assert_grads_match: the absolute tolerance scales with the gradient's size
        assert_close(grads[name], ref, atol=1e-5 * max(1.0, float(np.abs(ref).max())), what=name)


# ---------------------------------------------------------------------------- behaviour
def test_clamped_channel_in_the_reference_is_partial(vae_cases):
    """The fixture's clamp test means something only if the channel is partly clamped."""
    logvar = vae_cases["mode"]["logvar"][..., CLAMPED_CHANNEL]
    assert 0.1 < (logvar == LOGVAR_MIN).mean() < 0.9
    assert CLAMPED_BIAS < LOGVAR_MIN


def test_forward_sampling_is_reproducible_and_uses_the_noise(rng):
    vae = AutoencoderKL(**GRADCHECK_VAE, rng=rng)
    x = rng.uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
    noise = rng.standard_normal((2, 2, 2, 2)).astype(np.float32)
    post = vae.encode(x)
    assert_close(vae(x, noise=noise), vae.decode(post.sample(noise=noise)))
    assert_close(vae(x, sample_posterior=False), vae.decode(post.mode()))
    np.testing.assert_array_equal(vae(x, rng=np.random.default_rng(3)), vae(x, rng=np.random.default_rng(3)))
    assert not np.allclose(vae(x), vae(x))  # the model's own generator moves on
    a = AutoencoderKL(**GRADCHECK_VAE, rng=np.random.default_rng(1))
    b = AutoencoderKL(**GRADCHECK_VAE, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(a(x), b(x))  # same seed, same noise


def test_latent_scaling(rng):
    vae = AutoencoderKL(**GRADCHECK_VAE, scaling_factor=0.5, rng=rng)
    x = rng.uniform(-1, 1, (1, 4, 4, 3)).astype(np.float32)
    post = vae.encode(x)
    latents = vae.encode_latents(x, sample_posterior=False)
    assert_close(latents, 0.5 * post.mean)
    assert_close(vae.decode_latents(latents), vae.decode(post.mean))
    assert vae.encode_latents(x).dtype == np.float32
    shifted = AutoencoderKL(**GRADCHECK_VAE, scaling_factor=0.5, shift_factor=0.1, rng=np.random.default_rng(0))
    shifted.load_state_dict(vae.state_dict())
    assert_close(shifted.encode_latents(x, sample_posterior=False), 0.5 * (post.mean - 0.1))
    assert_close(shifted.decode_latents(0.5 * (post.mean - 0.1)), vae.decode(post.mean), atol=1e-5)


def test_loss_parts_and_beta(rng):
    vae = AutoencoderKL(**GRADCHECK_VAE, rng=rng)
    x = rng.uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
    noise = rng.standard_normal((2, 2, 2, 2)).astype(np.float32)
    loss0, parts = vae.loss(x, beta=0.0, noise=noise)
    x_rec = vae(x, noise=noise)
    assert_close(parts["recon"], np.abs(x_rec - x).sum() / 2)  # summed per image, mean over the batch
    assert_close(parts["kl"], vae.posterior.kl().mean())
    assert_close(loss0, parts["recon"])
    loss1, parts1 = vae.loss(x, beta=0.25, noise=noise)
    assert_close(loss1, parts1["recon"] + 0.25 * parts1["kl"])
    _, parts_mse = vae.loss(x, recon="mse", noise=noise)
    assert_close(parts_mse["recon"], ((x_rec - x) ** 2).sum() / 2)


def test_gradients_accumulate_until_zeroed(rng):
    vae = AutoencoderKL(**GRADCHECK_VAE, rng=rng)
    x = rng.uniform(-1, 1, (1, 4, 4, 3)).astype(np.float32)
    noise = rng.standard_normal((1, 2, 2, 2)).astype(np.float32)
    vae.loss(x, noise=noise)
    vae.loss_backward()
    first = vae.encoder.conv_in.grads["weight"].copy()
    vae.loss(x, noise=noise)
    vae.loss_backward()
    np.testing.assert_allclose(vae.encoder.conv_in.grads["weight"], 2 * first, rtol=1e-5)
    vae.zero_grad()
    assert not any(g.any() for _, g in vae.named_grads())
    with pytest.raises(RuntimeError, match="loss_backward called without a preceding loss"):
        vae.loss_backward()
    with pytest.raises(RuntimeError, match="encode_backward called without a preceding encode"):
        vae.encode_backward(np.zeros((1, 2, 2, 2), np.float32))


def test_structure_follows_diffusers():
    vae = AutoencoderKL(**{**TINY_VAE, "layers_per_block": 2})
    assert [len(b.resnets) for b in vae.encoder.down_blocks] == [2, 2]
    assert [len(b.resnets) for b in vae.decoder.up_blocks] == [3, 3]
    assert vae.encoder.down_blocks[0].downsamplers[0].conv.padding == (0, 1, 0, 1)
    assert not vae.encoder.down_blocks[1].add_downsample and not vae.decoder.up_blocks[1].add_upsample
    assert vae.encoder.mid_block.resnets[0].norm1.eps == 1e-6
    assert vae.encoder.conv_out.out_channels == 8 and vae.quant_conv.in_channels == 8
    x = np.zeros((1, 16, 16, 3), np.float32)
    assert vae.encode(x).mean.shape == (1, 8, 8, 4)
    assert vae.decode(np.zeros((1, 3, 5, 4), np.float32)).shape == (1, 6, 10, 3)
    plain = AutoencoderKL(**TINY_VAE, mid_block_add_attention=False, use_quant_conv=False,
                          use_post_quant_conv=False)
    assert not any("attentions" in k or "quant_conv" in k for k in plain.state_dict())
    loss, _ = plain.loss(x, noise=np.zeros((1, 8, 8, 4), np.float32))
    assert plain.loss_backward().shape == x.shape


def test_from_config_takes_a_diffusers_config_json():
    config = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.42.0", **TINY_VAE, "act_fn": "silu",
              "force_upcast": True, "latents_mean": None, "latents_std": None, "shift_factor": None}
    vae = AutoencoderKL.from_config(config)
    assert set(vae.state_dict()) == set(AutoencoderKL(**TINY_VAE).state_dict())
    assert vae.config["block_out_channels"] == (8, 16)
    assert set(AutoencoderKL.from_config(vae.config).state_dict()) == set(vae.state_dict())


@pytest.mark.parametrize(
    "change,match",
    [
        ({"down_block_types": ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")}, "AttnDownEncoderBlock2D"),
        ({"up_block_types": ("UpDecoderBlock2D",)}, "must have the same length"),
        ({"act_fn": "gelu"}, "act_fn='silu' only"),
        ({"norm_num_groups": 3}, "divisible by norm_num_groups=3"),
        ({"not_a_field": 1}, "unknown config field.*not_a_field"),
    ],
)
def test_unsupported_config_raises(change, match):
    with pytest.raises(ValueError, match=match):
        AutoencoderKL(**{**TINY_VAE, **change})


def test_a_vae_config_builds_the_same_model_as_its_fields():
    from diffusion_np.models.config import VAEConfig

    config = VAEConfig(**TINY_VAE)
    a, b = AutoencoderKL(config, rng=np.random.default_rng(4)), AutoencoderKL(**TINY_VAE, rng=np.random.default_rng(4))
    assert a.config == b.config == config.to_dict()
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        np.testing.assert_array_equal(p, q, err_msg=name)
    with pytest.raises(ValueError, match="VAEConfig: latent_channels must be a positive int"):
        VAEConfig(**{**TINY_VAE, "latent_channels": 0})
    with pytest.raises(TypeError, match="expects a VAEConfig, got dict"):
        AutoencoderKL(dict(TINY_VAE))


# ---------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def tiny():
    return AutoencoderKL(**TINY_VAE)


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 16, 16, 4), r"AutoencoderKL expects x of shape \(B, H, W, C\) with C=3.*got \(1, 16, 16, 4\)"),
        ((1, 3, 16, 16), r"C=3 \(channels last\), got \(1, 3, 16, 16\)"),
        ((16, 16, 3), r"got \(16, 16, 3\)"),
        ((1, 15, 16, 3), r"2 levels needs H and W divisible by 2, got x of shape \(1, 15, 16, 3\)"),
        ((1, 16, 9, 3), "divisible by 2"),
    ],
)
def test_bad_image_shapes(tiny, shape, match):
    with pytest.raises(ValueError, match=match):
        tiny.encode(np.zeros(shape, np.float32))
    with pytest.raises(ValueError, match=match):
        tiny.loss(np.zeros(shape, np.float32))


def test_bad_dtype_nan_latents_noise_and_recon(tiny):
    with pytest.raises(TypeError, match="AutoencoderKL expects x with a floating dtype"):
        tiny.encode(np.zeros((1, 16, 16, 3), np.int64))
    bad = np.zeros((1, 16, 16, 3), np.float32)
    bad[0, 3, 4, 1] = np.nan
    with pytest.raises(ValueError, match="AutoencoderKL got a non-finite value"):
        tiny(bad)
    with pytest.raises(ValueError, match=r"z of shape \(B, H, W, C\) with C=4"):
        tiny.decode(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="non-finite value .* in z"):
        tiny.decode(np.full((1, 8, 8, 4), np.inf, np.float32))
    x = np.zeros((1, 16, 16, 3), np.float32)
    with pytest.raises(ValueError, match=r"noise of shape \(1, 8, 8, 4\), got \(1, 8, 8, 2\)"):
        tiny(x, noise=np.zeros((1, 8, 8, 2), np.float32))
    with pytest.raises(TypeError, match="AutoencoderKL expects noise with a floating dtype"):
        tiny(x, noise=np.zeros((1, 8, 8, 4), np.int32))
    with pytest.raises(ValueError, match="recon must be 'l1' or 'mse'"):
        tiny.loss(x, recon="lpips")


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_vae_cupy_matches_numpy():
    import cupy as cp

    inp = vae_inputs()
    vae = AutoencoderKL(**TINY_VAE, rng=np.random.default_rng(3))
    loss, parts = vae.loss(inp["x"], beta=0.5, noise=inp["noise"])
    dx = vae.loss_backward()
    grads = {k: v.copy() for k, v in vae.named_grads()}
    vae.zero_grad()
    vae.to("cupy")
    loss_gpu, parts_gpu = vae.loss(cp.asarray(inp["x"]), beta=0.5, noise=cp.asarray(inp["noise"]))
    dx_gpu = vae.loss_backward()
    assert isinstance(dx_gpu, cp.ndarray)
    assert_close(loss_gpu, loss, rtol=1e-4, what="loss")
    assert_close(parts_gpu["kl"], parts["kl"], rtol=1e-4, what="kl")
    assert_close(dx_gpu, dx, atol=1e-4, what="dx")
    for name, g in vae.named_grads():
        ref = grads[name]
        assert_close(g, ref, atol=1e-4 * max(1.0, float(np.abs(ref).max())), rtol=1e-3, what=name)
    # sampling draws on the host: the same seed gives the same latents on both devices
    z_gpu = vae.encode_latents(cp.asarray(inp["x"]), rng=np.random.default_rng(0))
    vae.to("numpy")
    assert_close(z_gpu, vae.encode_latents(inp["x"], rng=np.random.default_rng(0)), atol=1e-4)
