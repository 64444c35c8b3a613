"""Test helpers: golden/live torch reference cases and comparisons.

Reference cases are made by ``tests/fixtures/cases_<area>.py`` (each has a
``cases()`` function that runs PyTorch/diffusers). ``python
tests/fixtures/make_fixtures.py`` stores them as ``tests/fixtures/<area>.npz``
(with the torch version) for ``make test``; tests marked ``crosscheck`` call
``cases()`` live instead.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import numpy as np
import pytest

from diffusion_np.gradcheck import sampled_grad_error

FIXTURES = Path(__file__).parent / "fixtures"


def load_golden(area: str) -> dict[str, dict[str, np.ndarray]]:
    """{case name: {array name: array}} from tests/fixtures/<area>.npz."""
    path = FIXTURES / f"{area}.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python tests/fixtures/make_fixtures.py {area}`")
    cases: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as data:
        for key in data.files:
            case, _, name = key.partition("/")
            if case == "__meta__":
                continue
            cases.setdefault(case, {})[name] = data[key]
    return cases


def live_cases(area: str) -> dict[str, dict[str, np.ndarray]]:
    """The same cases, recomputed now with the installed torch/diffusers."""
    module = importlib.import_module(f"fixtures.cases_{area}")
    return {name: {k: np.asarray(v) for k, v in case.items()} for name, case in module.cases().items()}


def reference(area: str, source: str):
    return load_golden(area) if source == "golden" else live_cases(area)


#: parametrise a fixture over both sources; "live" only runs under `make crosscheck`
SOURCES = ["golden", pytest.param("live", marks=pytest.mark.crosscheck)]


def assert_close(ours, ref, atol: float = 1e-5, rtol: float = 1e-4, what: str = "") -> None:
    """np.testing.assert_allclose with a message naming what is compared."""
    from diffusion_np.backend import asnumpy

    np.testing.assert_allclose(asnumpy(ours), ref, atol=atol, rtol=rtol, err_msg=what)


def one_error_line(capsys, *fragments) -> None:
    """The CLI wrote exactly one line to stderr, no traceback, holding every fragment."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def sample_loop(sampler, model, x_init, rng=None, scale_input=True):
    """diffusers' sampling loop written out: x = x_init * init_noise_sigma, then one step per timestep.

    ``scale_input=False`` feeds the model x itself instead of ``scale_model_input(x, t)`` (to show
    what forgetting it does); ``rng`` draws the noise of stochastic samplers.
    """
    x = x_init * sampler.init_noise_sigma
    for t in sampler.timesteps:
        x_in = sampler.scale_model_input(x, t) if scale_input else x
        x = sampler.step(model(x_in, t), t, x, rng=rng).prev_sample
    return x


def sigma_gaussian_oracle(sampler, s: float):
    """The exact eps-prediction for data ~ N(0, s^2 I): E[eps | x_t] = x_t sqrt(1-ab) / (ab s^2 + 1 - ab).

    For the sigma samplers: alpha_bar at the (possibly fractional) t comes from the sampler's own
    sigma interpolation, ab = 1 / (1 + sigma(t)^2).
    """

    def model(x_t, t):
        sigma = float(np.interp(float(t), np.arange(len(sampler.train_sigmas)), sampler.train_sigmas))
        ab = 1.0 / (1.0 + sigma**2)
        return x_t * (math.sqrt(1.0 - ab) / (ab * s**2 + 1.0 - ab))

    return model


# ----------------------------------------------------------------------------- a K-coordinate gradient check
def _leaves(tree) -> list:
    """The arrays of a (nested) tuple/list of arrays, in order."""
    if isinstance(tree, (tuple, list)):
        return [leaf for item in tree for leaf in _leaves(item)]
    return [tree]


def _random_like(tree, rng):
    if isinstance(tree, (tuple, list)):
        return type(tree)(_random_like(item, rng) for item in tree)
    return rng.standard_normal(tree.shape)


def check_subset(forward, backward, inputs, module, k: int = 3, seed: int = 0, h: float = 1e-6) -> dict:
    """Centred finite differences at ``k`` random coordinates of every input and parameter.

    The scalar is the one of :func:`diffusion_np.gradcheck.check_module`: ``L = sum(out * dout)``
    with a random ``dout`` (shaped like ``forward``'s output, which may be a nested tuple), and
    each sampled coordinate i gets ``(L(x + h e_i) - L(x - h e_i)) / (2 h)`` as in
    ``gradcheck.numerical_gradient``. ``backward(dout)`` must return the input gradients aligned
    with ``inputs``. Everything must be float64.

    Returns ``{"input<i>" or parameter name: norm-wise relative error over the sampled coordinates}``.
    """
    rng = np.random.default_rng(seed)
    module.zero_grad()
    out = forward(*inputs)
    dout = _random_like(out, rng)
    dinputs = backward(dout)
    flat_dout = _leaves(dout)

    def loss() -> float:
        return float(sum(float((o * d).sum()) for o, d in zip(_leaves(forward(*inputs)), flat_dout)))

    def error(x, analytic):
        return sampled_grad_error(loss, x, analytic, k, rng, h)

    report = {f"input{i}": error(x, dx) for i, (x, dx) in enumerate(zip(inputs, dinputs)) if dx is not None}
    for name, param, grad in list(module.parameters_and_grads()):
        report[name] = error(param, grad.copy())
    return report


def randomize(module, rng, scale=0.3):
    """Move every parameter away from its init (norms' ones and zeros hide bugs)."""
    for _, p in module.named_parameters():
        p += scale * rng.standard_normal(p.shape)
    return module


#: Stable Diffusion's noise schedule (scaled_linear, 0.00085 -> 0.012 over 1000 steps)
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def tiny_text_to_image_model(captions, latent: bool = True, dtype=np.float32, prediction_type: str = "epsilon",
                             scaling_factor: float | None = None):
    """An untrained TextToImageModel small enough for finite differences: a word tokenizer over ``captions``,
    a one-layer text encoder (width 8, float32), a 2-level U-Net on 4x4 samples and, with ``latent``, a 2-level
    VAE (its ``scaling_factor`` when given), the U-Net and VAE in ``dtype``."""
    from diffusion_np.models import AutoencoderKL, TextEncoder, TextEncoderConfig, UNet2DConditionModel, WordTokenizer
    from diffusion_np.training.model import TextToImageModel

    tokenizer = WordTokenizer.from_captions(list(captions), max_length=6)
    text_encoder = TextEncoder(TextEncoderConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=6,
    ), rng=np.random.default_rng(1))  # fmt: skip
    channels = 4 if latent else 3
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=channels, out_channels=channels, block_out_channels=(8, 8),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=2,
        norm_num_groups=4, rng=np.random.default_rng(2), dtype=dtype,
    )  # fmt: skip
    vae = None
    if latent:
        extra = {} if scaling_factor is None else {"scaling_factor": scaling_factor}
        vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4,
                            rng=np.random.default_rng(3), dtype=dtype, **extra)  # fmt: skip
    return TextToImageModel(unet, text_encoder, tokenizer, dict(SD_SCHEDULE, prediction_type=prediction_type), vae)
