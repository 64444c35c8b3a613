"""Layer sizes are checked once, by validate.check_size; reference mode runs every
layer on its reference path and gives the fast paths' numbers."""

import os
import subprocess
import sys

import numpy as np
import pytest

from diffusion_np import nn
from diffusion_np.gradcheck import check_module
from diffusion_np.nn.fast import reference_mode, reference_on, threads

# (layer, the arguments that build a valid one); each size argument is then set to a bad value
LAYERS = {
    "Linear": (nn.Linear, {"in_features": 4, "out_features": 3}),
    "Conv2d": (nn.Conv2d, {"in_channels": 4, "out_channels": 3, "kernel_size": 3, "stride": 1}),
    "GroupNorm": (nn.GroupNorm, {"num_groups": 2, "num_channels": 4}),
    "LayerNorm": (nn.LayerNorm, {"normalized_shape": 4}),
    "Embedding": (nn.Embedding, {"num_embeddings": 10, "embedding_dim": 4}),
    "Timesteps": (nn.Timesteps, {"num_channels": 4, "flip_sin_to_cos": True, "downscale_freq_shift": 0.0}),
    "TimestepEmbedding": (nn.TimestepEmbedding, {"in_channels": 4, "time_embed_dim": 8}),
    "GEGLU": (nn.GEGLU, {"dim_in": 4, "dim_out": 3}),
    "Attention": (nn.Attention, {"query_dim": 4, "cross_attention_dim": 6, "heads": 2, "dim_head": 3}),
    "Upsample2D": (nn.Upsample2D, {"channels": 4, "out_channels": 4}),
    "Downsample2D": (nn.Downsample2D, {"channels": 4, "out_channels": 4}),
}
SIZES = [
    pytest.param(layer, name, id=f"{layer}-{name}")
    for layer, (_, kwargs) in LAYERS.items()
    for name, value in kwargs.items()
    if isinstance(value, int) and not isinstance(value, bool)
]


@pytest.mark.parametrize("layer,name", SIZES)
@pytest.mark.parametrize("bad", [0, -1])
def test_a_non_positive_size_is_a_value_error_naming_it(layer, name, bad):
    cls, kwargs = LAYERS[layer]
    with pytest.raises(ValueError, match=rf"{layer}: {name} must be a positive int, got {bad}"):
        cls(**{**kwargs, name: bad})


@pytest.mark.parametrize("layer,name", SIZES)
@pytest.mark.parametrize("bad", [4.5, "4", True, None])
def test_a_size_that_is_not_an_int_is_a_type_error_naming_it(layer, name, bad):
    cls, kwargs = LAYERS[layer]
    if bad is None and (layer, name) in {("Attention", "cross_attention_dim"), ("Upsample2D", "out_channels"),
                                         ("Downsample2D", "out_channels")}:
        cls(**{**kwargs, name: bad})  # None means "the same as the input" here
        return
    with pytest.raises(TypeError, match=rf"{layer}: {name} must be a positive int, got {bad!r}"):
        cls(**{**kwargs, name: bad})


def test_the_cases_of_the_issue():
    with pytest.raises(ValueError, match="in_features must be a positive int, got 0"):
        nn.Linear(0, 3)
    with pytest.raises(ValueError, match="in_features must be a positive int, got -1"):
        nn.Linear(-1, 3)
    with pytest.raises(TypeError, match="in_channels must be a positive int, got 4.5"):
        nn.Conv2d(4.5, 3, 3)
    with pytest.raises(ValueError, match="num_channels must be a positive int, got 0"):
        nn.GroupNorm(4, 0)
    with pytest.raises(TypeError, match="normalized_shape must be a positive int, got '4'"):
        nn.LayerNorm("4")
    with pytest.raises(ValueError, match="num_channels=6 must be divisible by num_groups=4"):
        nn.GroupNorm(4, 6)
    with pytest.raises(TypeError, match="kernel_size must be a positive int"):
        nn.Conv2d(4, 3, (3, 2.0))
    assert nn.Conv2d(np.int64(4), 3, (3, 1)).kernel_size == (3, 1)  # NumPy ints are ints
    assert nn.LayerNorm((4,)).normalized_shape == 4  # PyTorch's 1-tuple


@pytest.mark.parametrize("bad", [1.5, None, "same?", [1.0], (1, 1.5), True])
def test_conv_padding_that_is_not_ints_is_a_type_error_naming_it(bad):
    with pytest.raises(TypeError, match=r"padding must be an int >= 0 or \(top, bottom, left, right\) of ints"):
        nn.Conv2d(2, 3, 3, padding=bad)


def test_conv_padding_below_zero_is_a_value_error():
    with pytest.raises(ValueError, match=r"padding must be an int >= 0"):
        nn.Conv2d(2, 3, 3, padding=-1)
    with pytest.raises(ValueError, match=r"padding must be an int >= 0"):
        nn.Conv2d(2, 3, 3, padding=(0, 1, -1, 0))
    with pytest.raises(ValueError, match=r"padding must be an int >= 0 or \(top, bottom, left, right\)"):
        nn.Conv2d(2, 3, 3, padding=(1, 1))  # two numbers: which sides?
    assert nn.Conv2d(2, 3, 3, padding=[0, 1, 0, 1]).padding == (0, 1, 0, 1)  # the VAE's asymmetric padding


@pytest.mark.parametrize("layer", [lambda eps: nn.GroupNorm(2, 4, eps=eps), lambda eps: nn.LayerNorm(4, eps=eps)])
@pytest.mark.parametrize("bad,error", [(float("nan"), ValueError), (-1.0, ValueError), (0.0, ValueError),
                                       (float("inf"), ValueError), ("1e-5", TypeError), (None, TypeError)])
def test_a_normalisation_eps_must_be_a_positive_finite_number(layer, bad, error):
    # a NaN or negative eps was accepted and made every forward NaN
    with pytest.raises(error, match="eps must be a"):
        layer(bad)


@pytest.mark.parametrize("bad,error", [(float("nan"), ValueError), ("0", TypeError), (None, TypeError)])
def test_timesteps_downscale_freq_shift_must_be_a_finite_number(bad, error):
    with pytest.raises(error, match="downscale_freq_shift must be a"):
        nn.Timesteps(4, True, bad)


@pytest.mark.parametrize("cls,args", [(nn.Conv2d, (4, 3, 3)), (nn.GroupNorm, (2, 4)), (nn.Upsample2D, (4,))])
def test_an_unknown_method_is_refused(cls, args):
    with pytest.raises(ValueError, match="method must be 'auto'"):
        cls(*args, method="shifted")


# ----------------------------------------------------------------------------- reference mode
class _SmallUNet(nn.Module):
    """conv -> GroupNorm+SiLU -> conv stride 2 -> self-attention -> cross-attention -> upsample+conv -> 1x1 conv."""

    def __init__(self, rng):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1, rng=rng)
        self.norm = nn.GroupNorm(2, 8, silu=True)
        self.down = nn.Downsample2D(8, out_channels=8, padding=0, rng=rng)
        self.attn = nn.Attention(8, heads=2, dim_head=4, rng=rng)
        self.cross = nn.Attention(8, 5, heads=2, dim_head=4, rng=rng)
        self.up = nn.Upsample2D(8, out_channels=6, rng=rng)
        self.conv_out = nn.Conv2d(6, 2, 1, rng=rng)

    def forward(self, x, context):
        h = self.down(self.norm(self.conv_in(x)))  # (B, H/2, W/2, 8)
        B, Hh, Wh, C = h.shape
        self._shape = h.shape
        t = self.attn(h.reshape(B, Hh * Wh, C))
        t = self.cross(t, context)
        return self.conv_out(self.up(t.reshape(B, Hh, Wh, C)))

    def backward(self, dout):
        dh = self.up.backward(self.conv_out.backward(dout))
        B, Hh, Wh, C = self._shape
        g = self.cross.backward(dh.reshape(B, Hh * Wh, C))
        dt = self.attn.backward(g.dx).dx.reshape(self._shape)
        dx = self.conv_in.backward(self.norm.backward(self.down.backward(dt)))
        return nn.BlockGrads(dx, dcontext=g.dcontext)


def _run(model, x, context, dout):
    model.zero_grad()
    y = model(x, context)
    g = model.backward(dout)
    return [y, g.dx, g.dcontext] + [grad.copy() for _, grad in model.named_grads()]


def _methods(model):
    return {name: m._pop_cache().method if isinstance(m, nn.Conv2d) else type(m._pop_cache()).__name__
            for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.GroupNorm, nn.Upsample2D))}


def test_reference_mode_gives_the_fast_paths_numbers_in_float64():
    rng = np.random.default_rng(0)
    model = _SmallUNet(np.random.default_rng(1)).to(dtype=np.float64)
    x, context = rng.standard_normal((2, 8, 8, 3)), rng.standard_normal((2, 3, 5))
    dout = rng.standard_normal((2, 8, 8, 2))
    fast = _run(model, x, context, dout)
    assert not reference_on()
    with reference_mode():
        assert reference_on()
        reference = _run(model, x, context, dout)
    assert not reference_on()
    assert len(fast) == len(reference) == 3 + len(list(model.named_grads()))
    for a, b in zip(fast, reference):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)


def test_reference_mode_switches_every_layer_to_its_reference_path():
    rng = np.random.default_rng(0)
    conv, norm, up = nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4, silu=True), nn.Upsample2D(4)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)

    def paths():
        with threads(1):  # one thread: GroupNorm's cache is its own, not one per block of the batch
            conv(x), norm(x), up(x)
        up_path = "fused" if not hasattr(up.conv, "_cache") or up.conv._cache is None else "reference"
        return conv._pop_cache().method, type(norm._pop_cache()).__name__, type(up._pop_cache()).__name__, up_path

    assert paths() == ("rows", "GroupNormSiLUCache", "UpsampleConvCache", "fused")
    with reference_mode():
        assert paths()[:3] == ("reference", "_GroupNormThenSiLUCache", "ResampleCache")
        # an explicit choice overrides the mode; "reference" is reference everywhere
        assert nn.Conv2d(4, 4, 3, padding=1, method="rows")(x) is not None
        with reference_mode(False):
            assert not reference_on()
        assert reference_on()
    explicit = nn.Conv2d(4, 4, 3, padding=1, method="reference")
    explicit(x)
    assert explicit._pop_cache().method == "reference"


def test_an_explicit_method_runs_in_reference_mode_too():
    x = np.ones((1, 8, 8, 4), np.float32)
    layers = nn.Conv2d(4, 4, 3, padding=1, method="rows"), nn.GroupNorm(2, 4, silu=True, method="fused")
    with reference_mode():
        for layer in layers:
            layer(x)
        assert layers[0]._pop_cache().method == "rows"
        assert type(layers[1]._pop_cache()).__name__ == "GroupNormSiLUCache"


def test_reference_mode_model_gradcheck():
    rng = np.random.default_rng(2)
    model = _SmallUNet(np.random.default_rng(3)).to(dtype=np.float64)
    with reference_mode():
        errors = check_module(model, rng.standard_normal((1, 4, 4, 3)), rng.standard_normal((1, 2, 5)),
                              max_coordinates=6)
    assert {"input0", "input1"} <= set(errors)
    assert max(errors.values()) < 1e-5, errors  # sampled entries: a few tiny attention gradients give ~5e-6


def test_the_environment_variable_turns_reference_mode_on_at_import():
    code = "from diffusion_np.nn.fast import reference_on; print(reference_on())"
    env = {**os.environ, "DIFFUSION_NP_REFERENCE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    env["DIFFUSION_NP_REFERENCE"] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
