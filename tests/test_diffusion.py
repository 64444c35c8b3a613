"""The forward process, conversions, posterior, training targets, min-SNR weights and the ELBO."""

import math

import numpy as np
import pytest
from helpers import SOURCES, reference
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import integrate
from scipy.stats import norm

from diffusion_np import diffusion as d
from diffusion_np.schedules import ZERO_SNR_ALPHA_BAR, NoiseSchedule, vp_coefficients
from diffusion_np.testing import (
    check_conversions_roundtrip,
    check_forward_variance,
    check_posterior_variance,
)
from diffusion_np.testing.strategies import images, noise_schedules

LINEAR = NoiseSchedule.from_config()
SD = NoiseSchedule.from_config(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
ZERO_SNR = NoiseSchedule.from_config(rescale_betas_zero_snr=True)
SMALL = NoiseSchedule.from_config(num_train_timesteps=20, beta_start=0.001, beta_end=0.2)


@st.composite
def schedule_and_t(draw, zero_terminal_snr=False, batch=None):
    schedule = draw(noise_schedules(zero_terminal_snr=zero_terminal_snr))
    T = schedule.num_train_timesteps
    B = draw(st.integers(1, 4)) if batch is None else batch
    t = draw(hnp.arrays(np.int64, B, elements=st.integers(0, T - 1)))
    return schedule, t


# --------------------------------------------------------------------------- forward process


@given(schedule_and_t(zero_terminal_snr=None))
def test_q_sample_variance_by_formula_and_empirically(schedule_t):
    schedule, t = schedule_t
    check_forward_variance(schedule.alpha_bar, t, n_samples=4000)


def test_q_sample_variance_float32():
    def q32(x0, t, noise, ab):
        return d.q_sample(x0.astype(np.float32), t, noise.astype(np.float32), ab)

    variances = check_forward_variance(SD.alpha_bar, [0, 1, 500, 999], q_sample_fn=q32, rtol=1e-6)
    np.testing.assert_allclose(variances, 1 - SD.alpha_bar[[0, 1, 500, 999]], rtol=0.05)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_per_sample_t_broadcasts(dtype):
    rng = np.random.default_rng(0)
    x0, noise = (rng.standard_normal((3, 4, 5, 2)).astype(dtype) for _ in range(2))
    t = np.array([0, 500, 999])
    ab = LINEAR.alpha_bar
    x_t = d.q_sample(x0, t, noise, ab)
    mean, var, logvar = d.posterior_mean_variance(x0, x_t, t, ab)
    target = d.training_target(x0, noise, t, ab, "v_prediction")
    for out in (x_t, mean, var, logvar, target):
        assert out.dtype == dtype
    assert var.shape == logvar.shape == (3, 1, 1, 1)
    for i in range(3):  # row i with t = t[i] as an int gives the same numbers
        np.testing.assert_allclose(x_t[i], d.q_sample(x0[i : i + 1], int(t[i]), noise[i : i + 1], ab)[0], rtol=1e-6)
        m_i, v_i, _ = d.posterior_mean_variance(x0[i : i + 1], x_t[i : i + 1], int(t[i]), ab)
        np.testing.assert_allclose(mean[i], m_i[0], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(var[i, 0, 0, 0], v_i, rtol=1e-6)
        np.testing.assert_allclose(target[i], d.v_target(x0[i : i + 1], noise[i : i + 1], int(t[i]), ab)[0], rtol=1e-6)


# --------------------------------------------------------------------------- conversions and targets


@given(schedule_and_t(zero_terminal_snr=None, batch=2), images(st.just((2, 3, 2, 2)), dtype=np.float64),
       st.sampled_from([np.float32, np.float64]))
def test_conversions_round_trip(schedule_t, x0, dtype):
    schedule, t = schedule_t
    noise = np.random.default_rng(int(t.sum())).standard_normal(x0.shape)
    check_conversions_roundtrip(schedule.alpha_bar, t, x0.astype(dtype), noise.astype(dtype))


@pytest.mark.parametrize("prediction_type", d.PREDICTION_TYPES)
def test_training_target_is_what_a_perfect_model_outputs(prediction_type):
    rng = np.random.default_rng(1)
    x0, noise = rng.standard_normal((2, 2, 3, 4, 4))
    t = np.array([3, 700])
    target = d.training_target(x0, noise, t, SD.alpha_bar, prediction_type)
    x_t = d.q_sample(x0, t, noise, SD.alpha_bar)
    x0_rec, eps_rec = d.x0_and_eps(target, x_t, t, SD.alpha_bar, prediction_type)
    np.testing.assert_allclose(x0_rec, x0, atol=1e-9)
    np.testing.assert_allclose(eps_rec, noise, atol=1e-9)
    expected = {"epsilon": noise, "sample": x0, "v_prediction": d.v_target(x0, noise, t, SD.alpha_bar)}
    np.testing.assert_array_equal(target, expected[prediction_type])


@given(schedule_t=schedule_and_t(), prediction_type=st.sampled_from(d.PREDICTION_TYPES), data=st.data())
def test_x0_and_eps_at_is_the_one_conversion(schedule_t, prediction_type, data):
    """x0_and_eps is x0_and_eps_at at (sqrt(ab_t), sqrt(1 - ab_t)); given x_t = alpha x0 + sigma eps and the
    output a perfect model would give, it returns (x0, eps) back, whether alpha and sigma are arrays or floats."""
    schedule, t = schedule_t
    t = int(t[0])
    ab = schedule.alpha_bar[t]
    if prediction_type == "epsilon" and ab == 0.0 or prediction_type == "sample" and ab == 1.0:
        return  # x0 (eps) is undefined at alpha_bar = 0 (1)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    x0, eps = rng.standard_normal((2, 3, 2)), rng.standard_normal((2, 3, 2))
    alpha, sigma = math.sqrt(ab), math.sqrt(1.0 - ab)
    x_t = alpha * x0 + sigma * eps
    out = {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0}[prediction_type]
    got = d.x0_and_eps_at(out, x_t, alpha, sigma, prediction_type)
    via_t = d.x0_and_eps(out, x_t, t, schedule.alpha_bar, prediction_type)
    for a, b in zip(got, via_t):
        np.testing.assert_array_equal(a, b)
    scale = 1.0 / max(min(alpha, sigma), 1e-3)  # the division amplifies rounding by 1/alpha or 1/sigma
    np.testing.assert_allclose(got[0], x0, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(got[1], eps, rtol=0, atol=1e-12 * scale)


def test_vp_coefficients_and_the_sampling_sigmas():
    for sigma in (0.0, 0.03, 1.0, 14.6, 4096.0):
        alpha, sigma_vp = vp_coefficients(sigma)
        assert alpha**2 + sigma_vp**2 == pytest.approx(1.0, rel=1e-15) and sigma_vp == pytest.approx(sigma * alpha)
    # sampling_sigmas is sigmas, but finite where alpha_bar = 0 (diffusers' stand-in 2^-24: sigma_max = 4096)
    np.testing.assert_array_equal(SD.sampling_sigmas, SD.sigmas)
    assert ZERO_SNR.sigmas[-1] == np.inf
    assert ZERO_SNR.sampling_sigmas[-1] == math.sqrt((1 - ZERO_SNR_ALPHA_BAR) / ZERO_SNR_ALPHA_BAR)


@given(schedule=noise_schedules(), data=st.data())
def test_posterior_coefficients_are_the_one_posterior(schedule, data):
    """posterior_coefficients(ab_t, ab_prev) is what posterior_variance / posterior_mean_variance use, and its
    variance is DDIM Eq. 16's sigma_t^2 at eta = 1: (1 - ab_prev) / (1 - ab_t) (1 - ab_t / ab_prev)."""
    T = schedule.num_train_timesteps
    t = data.draw(st.integers(1, T - 1)) if T > 1 else 0
    prev = data.draw(st.integers(-1, t - 1))
    ab = schedule.alpha_bar
    ab_t, ab_prev = float(ab[t]), float(ab[prev]) if prev >= 0 else 1.0
    post = d.posterior_coefficients(ab_t, ab_prev)
    assert isinstance(post.variance, float) and isinstance(post.beta, float)  # float in, float out: no promotion
    assert post.variance == float(d.posterior_variance(ab, t, prev))
    assert post.beta == 1.0 - ab_t / ab_prev
    assert post.variance == pytest.approx((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev), rel=1e-12, abs=1e-300)
    x0, x_t = np.ones((1, 2)), np.full((1, 2), 2.0)
    mean = d.posterior_mean_variance(x0, x_t, t, ab, t_prev=prev).mean
    np.testing.assert_allclose(mean, post.coef_x0 * x0 + post.coef_xt * x_t, rtol=1e-12)


@pytest.mark.parametrize(
    "call,error,match",
    [
        # the cases of issue 19: t = -1 was the last step silently, t = T an IndexError, 2.5 a NumPy message,
        # a list x0 an AttributeError, a NaN alpha_bar a NaN result
        (lambda x0, ab: d.q_sample(x0, -1, x0, ab), ValueError, r"t must lie in \[0, 19\].*got \[-1\]"),
        (lambda x0, ab: d.q_sample(x0, 20, x0, ab), ValueError, r"t must lie in \[0, 19\].*got \[20\]"),
        (lambda x0, ab: d.q_sample(x0, 2.5, x0, ab), TypeError, "t must be an int or an integer array"),
        (lambda x0, ab: d.q_sample(x0, np.array([1.0, 2.0]), x0, ab), TypeError, "t must hold integer timesteps"),
        (lambda x0, ab: d.q_sample(x0, np.array([1, 2, 3]), x0, ab), ValueError, r"t must be an int or shape \(2,\)"),
        (lambda x0, ab: d.q_sample(x0.tolist(), 3, x0, ab), TypeError, "q_sample: x0 must be a float array"),
        (lambda x0, ab: d.q_sample(x0, 3, x0[:1], ab), ValueError, r"noise must have the shape of x0, \(2, 3\)"),
        (lambda x0, ab: d.q_sample(x0.astype(np.int64), 3, x0, ab), TypeError, "x0 must hold floats"),
        (lambda x0, ab: d.q_sample(x0 * np.nan, 3, x0, ab), ValueError, "non-finite value .* in x0"),
        (lambda x0, ab: d.q_sample(x0, 3, x0, ab * np.nan), ValueError, r"alpha_bar must hold values in \[0, 1\]"),
        (lambda x0, ab: d.q_sample(x0, 3, x0, None), TypeError, "alpha_bar must be a 1-D array"),
        (lambda x0, ab: d.training_target(x0, x0 * np.inf, 3, ab), ValueError, "non-finite value .* in noise"),
        (lambda x0, ab: d.training_target(x0, x0, 25, ab), ValueError, r"t must lie in \[0, 19\]"),
        (lambda x0, ab: d.v_target(x0, x0, "3", ab), TypeError, "t must be an int"),
    ],
)
def test_forward_process_refuses_bad_arguments_by_name(call, error, match):
    x0 = np.random.default_rng(0).standard_normal((2, 3))
    with pytest.raises(error, match=match):
        call(x0, SMALL.alpha_bar)


def test_unknown_prediction_type_raises():
    with pytest.raises(ValueError, match=r"prediction_type must be one of \('epsilon', 'sample', 'v_prediction'\)"):
        d.training_target(np.zeros((1, 2)), np.zeros((1, 2)), 0, LINEAR.alpha_bar, "eps")


# --------------------------------------------------------------------------- min-SNR weights


@given(hnp.arrays(np.float64, st.integers(1, 20), elements=st.floats(0.0, 1e4)), st.floats(0.1, 20.0))
def test_min_snr_weights_match_formula(snr, gamma):
    t = np.arange(snr.size)
    clipped = np.minimum(snr, gamma)
    w_eps = d.min_snr_weights(t, snr, gamma, "epsilon", dtype=np.float64)
    positive = snr > 0
    np.testing.assert_allclose(w_eps[positive], clipped[positive] / snr[positive], rtol=1e-12)
    np.testing.assert_array_equal(w_eps[~positive], 1.0)  # the limit of min(SNR, gamma)/SNR at SNR -> 0
    np.testing.assert_allclose(d.min_snr_weights(t, snr, gamma, "v_prediction", np.float64), clipped / (snr + 1))
    np.testing.assert_allclose(d.min_snr_weights(t, snr, gamma, "sample", np.float64), clipped)


@pytest.fixture(params=SOURCES, scope="module")
def diffusers_cases(request):
    return reference("schedules", request.param)


@pytest.mark.parametrize("name,schedule", [("scaled_linear", SD), ("linear", LINEAR)])
@pytest.mark.parametrize("prediction_type", d.PREDICTION_TYPES)
def test_min_snr_weights_match_diffusers(diffusers_cases, name, schedule, prediction_type):
    ref = diffusers_cases[f"min_snr_{name}"]
    # the fixture runs compute_snr on a float64 alphas_cumprod; compute_snr itself returns float32
    np.testing.assert_allclose(schedule.snr[ref["timesteps"]], ref["snr"], rtol=1e-6)
    w = d.min_snr_weights(ref["timesteps"], schedule.snr, 5.0, prediction_type)
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, ref[prediction_type], rtol=1e-6)


def test_min_snr_weights_reject_bad_gamma():
    with pytest.raises(ValueError, match="gamma must be > 0, got 0"):
        d.min_snr_weights(np.array([1]), LINEAR.snr, gamma=0)


# --------------------------------------------------------------------------- posterior q(x_{t-1} | x_t, x_0)


@given(noise_schedules(zero_terminal_snr=None))
def test_posterior_variance_identity(schedule):
    check_posterior_variance(schedule.alpha_bar)


@given(noise_schedules(zero_terminal_snr=None), st.data())
def test_posterior_matches_gaussian_conditioning(schedule, data):
    # An independent derivation for any strided pair prev < t: (x_prev, x_t) given x_0 is jointly
    # Gaussian with x_prev = sqrt(ab_p) x_0 + sqrt(1 - ab_p) e1, x_t = sqrt(ab_t / ab_p) x_prev + ...,
    # so E[x_prev | x_t] = sqrt(ab_p) x_0 + Cov / Var (x_t - sqrt(ab_t) x_0) and
    # Var[x_prev | x_t] = (1 - ab_p) - Cov^2 / Var with Cov = sqrt(ab_t / ab_p) (1 - ab_p), Var = 1 - ab_t.
    T = schedule.num_train_timesteps
    t = data.draw(hnp.arrays(np.int64, 3, elements=st.integers(0, T - 1)))
    t_prev = np.array([data.draw(st.integers(-1, int(ti) - 1)) for ti in t])
    rng = np.random.default_rng(0)
    x0, x_t = rng.standard_normal((2, 3, 2, 2, 1))
    mean, var, logvar = d.posterior_mean_variance(x0, x_t, t, schedule.alpha_bar, t_prev)
    ab = schedule.alpha_bar
    ab_t = ab[t].reshape(3, 1, 1, 1)
    ab_p = np.where(t_prev >= 0, ab[np.maximum(t_prev, 0)], 1.0).reshape(3, 1, 1, 1)
    cov = np.sqrt(ab_t / ab_p) * (1 - ab_p)
    np.testing.assert_allclose(mean, np.sqrt(ab_p) * x0 + cov / (1 - ab_t) * (x_t - np.sqrt(ab_t) * x0), atol=1e-9)
    np.testing.assert_allclose(var, (1 - ab_p) - cov**2 / (1 - ab_t), rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(logvar, np.log(np.maximum(var, 1e-20)))


def test_posterior_first_step_is_a_point_mass_at_x0():
    rng = np.random.default_rng(0)
    x0, x_t = rng.standard_normal((2, 2, 3))
    mean, var, logvar = d.posterior_mean_variance(x0, x_t, 0, LINEAR.alpha_bar)
    np.testing.assert_allclose(mean, x0, atol=1e-12)
    assert var == 0.0 and logvar == pytest.approx(math.log(1e-20))  # the 1e-20 floor


@pytest.mark.parametrize("spacing", ["full", "linspace", "leading", "trailing"])
def test_posterior_matches_diffusers_ddpm(diffusers_cases, spacing):
    # DDPMScheduler(prediction_type="sample").step with model output x0 returns
    # posterior mean + sqrt(fixed_small variance) * noise, over a strided sequence (float64 in the fixture).
    ref = diffusers_cases[f"posterior_{spacing}"]
    t, prev = ref["timesteps"], ref["prev"]
    np.testing.assert_allclose(np.maximum(d.posterior_variance(LINEAR.alpha_bar, t, prev), 1e-20), ref["variance"],
                               rtol=1e-10)
    mean, var, _ = d.posterior_mean_variance(ref["x0"], ref["x_t"], t, LINEAR.alpha_bar, prev)
    noisy = mean + np.where(t > 0, 1.0, 0.0).reshape(-1, 1, 1, 1) * np.sqrt(var) * ref["noise"]
    np.testing.assert_allclose(noisy, ref["prev_sample"], atol=1e-10)


@pytest.mark.parametrize(
    "t,t_prev,error,match",
    [
        (5, 5, ValueError, r"t_prev must come before t \(t_prev < t\)"),
        (np.array([3, 4]), np.array([1, 7]), ValueError, r"t_prev must come before t"),
        (1000, None, ValueError, r"t must lie in \[0, 999\] \(alpha_bar has T = 1000 timesteps\), got \[1000\]"),
        (np.array([2.0]), None, TypeError, r"t must hold integer timesteps, got dtype float64"),
    ],
)
def test_posterior_bad_timesteps(t, t_prev, error, match):
    x = np.zeros((1, 2))
    with pytest.raises(error, match=match):
        d.posterior_mean_variance(x, x, t, LINEAR.alpha_bar, t_prev)


# --------------------------------------------------------------------------- ELBO pieces


@given(
    hnp.arrays(np.float64, (3, 4), elements=st.floats(-5, 5)),
    hnp.arrays(np.float64, (3, 4), elements=st.floats(-8, 4)),
)
def test_normal_kl_of_a_distribution_with_itself_is_zero(mean, logvar):
    np.testing.assert_allclose(d.normal_kl(mean, logvar, mean, logvar), 0.0, atol=1e-12)


@pytest.mark.parametrize("m1,lv1,m2,lv2", [(0.3, -1.0, -0.2, 0.5), (1.0, 0.0, 0.0, 0.0), (-2.0, 1.2, 0.5, -0.7)])
def test_normal_kl_matches_numerical_integration(m1, lv1, m2, lv2):
    p, q = norm(m1, math.exp(0.5 * lv1)), norm(m2, math.exp(0.5 * lv2))
    kl, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), -30, 30, epsabs=1e-12)
    ours = d.normal_kl(np.array([m1]), np.array([lv1]), np.array([m2]), np.array([lv2]))
    np.testing.assert_allclose(ours, kl, rtol=1e-8)
    assert d.normal_kl(np.float32([m1]), lv1, m2, lv2).dtype == np.float32  # Python scalars keep float32


def test_approx_cdf_is_close_to_the_exact_one():
    x = np.linspace(-8, 8, 20001)
    err = np.abs(d.approx_standard_normal_cdf(x) - norm.cdf(x)).max()
    assert err < 2e-4, err
    big = d.approx_standard_normal_cdf(np.float32([-1e20, 1e20]))  # no overflow in x^3
    np.testing.assert_array_equal(big, [0.0, 1.0])


LEVELS = np.arange(256) / 127.5 - 1.0


@given(st.floats(-1.5, 1.5), st.floats(-7.0, 1.0))
def test_discretized_likelihood_sums_to_one_over_the_256_bins(mean, log_scale):
    logp = d.discretized_gaussian_log_likelihood(LEVELS, np.full(256, mean), np.full(256, log_scale))
    # bins far in the tail are floored at 1e-12 each: at most 256e-12 extra mass
    np.testing.assert_allclose(np.exp(logp).sum(), 1.0, atol=3e-10)


def test_discretized_likelihood_matches_scipy():
    rng = np.random.default_rng(0)
    x = LEVELS[rng.integers(0, 256, 500)]
    x[:2] = [-1.0, 1.0]  # the two edge bins
    means = x + rng.normal(0, 0.02, x.shape)
    log_scales = rng.uniform(-5, -2, x.shape)
    s = np.exp(log_scales)
    upper = np.where(x > 0.999, 1.0, norm.cdf((x + 1 / 255 - means) / s))
    lower = np.where(x < -0.999, 0.0, norm.cdf((x - 1 / 255 - means) / s))
    exact = np.log(upper - lower)
    ours = d.discretized_gaussian_log_likelihood(x, means, log_scales)
    # the approximate CDF is within 2e-4 of Phi, so a bin's probability p is within 4e-4 and its log
    # within about 4e-4 / p; compared where p >= 0.01
    keep = exact > math.log(0.01)
    assert keep.sum() > 300
    err = np.abs(ours - exact)[keep]
    assert np.all(err <= 4e-4 / np.exp(exact[keep])), err.max()
    assert err.max() > 1e-6  # (the approximation is visible: this compares against a different CDF)


def test_discretized_likelihood_rejects_data_outside_minus_one_one():
    with pytest.raises(ValueError, match=r"x must be data scaled to \[-1, 1\], got values up to 255"):
        d.discretized_gaussian_log_likelihood(np.array([0.0, 255.0]), np.zeros(2), np.zeros(2))


def test_prior_bpd():
    x0 = np.random.default_rng(0).uniform(-1, 1, (3, 4, 4, 3))
    np.testing.assert_array_equal(d.prior_bpd(x0, ZERO_SNR.alpha_bar), 0.0)  # q(x_T | x_0) = N(0, I) exactly
    ab_T = LINEAR.alpha_bar[-1]  # ~4e-5: near-zero SNR
    direct = 0.5 * (ab_T * (x0**2 - 1) - np.log(1 - ab_T)) / np.log(2)  # KL(N(sqrt(ab) x, 1 - ab) || N(0, 1))
    np.testing.assert_allclose(d.prior_bpd(x0, LINEAR.alpha_bar), direct.mean(axis=(1, 2, 3)), rtol=1e-6)
    assert np.all(d.prior_bpd(x0, LINEAR.alpha_bar) < 1e-4)
    assert np.all(d.prior_bpd(x0, SMALL.alpha_bar) > 1e-3)  # T = 20 does not reach pure noise


# --------------------------------------------------------------------------- the full bound


def _oracle(x0, schedule, prediction_type="epsilon"):
    """A model that knows x0, so that p(x_{t-1} | x_t) = q(x_{t-1} | x_t, x_0) in the mean."""
    ab = schedule.alpha_bar

    def model_fn(x_t, t):
        a = ab[t].reshape((-1,) + (1,) * (x0.ndim - 1))
        eps = (x_t - np.sqrt(a) * x0) / np.sqrt(1 - a)
        return {"epsilon": eps, "sample": x0, "v_prediction": np.sqrt(a) * eps - np.sqrt(1 - a) * x0}[prediction_type]

    return model_fn


def _quantized(shape, seed=0):
    return LEVELS[np.random.default_rng(seed).integers(0, 256, shape)]


@pytest.mark.parametrize("prediction_type", d.PREDICTION_TYPES)
def test_vlb_with_the_true_posterior_reduces_to_decoder_plus_prior(prediction_type):
    x0 = _quantized((3, 4, 4, 2))
    terms = d.vlb_terms(_oracle(x0, LINEAR, prediction_type), x0, LINEAR, prediction_type,
                        rng=np.random.default_rng(1))
    assert terms.terms.shape == (3, 1000) and terms.scale == 1.0
    np.testing.assert_array_equal(terms.timesteps, np.arange(999, -1, -1))
    assert np.abs(terms.terms[:, :-1]).max() < 1e-9  # every KL term L_t, t >= 1, vanishes
    # L_0: the decoder N(x0, beta_tilde_1) integrated over x0's bin, directly with scipy
    s = math.sqrt(d.posterior_variance(LINEAR.alpha_bar)[1])
    upper = np.where(x0 > 0.999, 1.0, norm.cdf(1 / 255 / s))
    lower = np.where(x0 < -0.999, 0.0, norm.cdf(-1 / 255 / s))
    decoder = -np.log2(upper - lower).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(terms.terms[:, -1], decoder, rtol=2e-3)  # approximate CDF
    total = d.bits_per_dim(_oracle(x0, LINEAR, prediction_type), x0, LINEAR, prediction_type,
                           rng=np.random.default_rng(1))
    np.testing.assert_allclose(total, terms.terms[:, -1] + d.prior_bpd(x0, LINEAR.alpha_bar), rtol=1e-9)


def test_vlb_fixed_large_with_the_true_mean_is_the_variance_mismatch():
    x0 = _quantized((2, 3, 3, 1))
    terms = d.vlb_terms(_oracle(x0, SMALL), x0, SMALL, model_var_type="fixed_large", rng=np.random.default_rng(0))
    # equal means: KL(N(m, bt) || N(m, b)) = 1/2 (log(b / bt) + bt / b - 1), per dim, in bits
    bt = d.posterior_variance(SMALL.alpha_bar)[1:]
    b = SMALL.betas[1:]
    expected = 0.5 * (np.log(b / bt) + bt / b - 1) / np.log(2)
    np.testing.assert_allclose(terms.terms[:, :-1], np.broadcast_to(expected[::-1], (2, 19)), rtol=1e-9)
    assert np.all(expected > 0)


def test_vlb_subset_scaling_is_unbiased():
    # With fixed_large and the true mean every term is deterministic, so averaging the scaled
    # estimate over a partition of {0..T-1} into equal random subsets must give the full bound.
    x0 = _quantized((2, 2, 2, 1))
    model = _oracle(x0, SMALL)
    full = d.bits_per_dim(model, x0, SMALL, model_var_type="fixed_large", rng=np.random.default_rng(0))
    groups = np.random.default_rng(1).permutation(20).reshape(4, 5)
    parts = [d.vlb_terms(model, x0, SMALL, model_var_type="fixed_large", timesteps=g, rng=np.random.default_rng(2))
             for g in groups]
    assert all(p.scale == 4.0 for p in parts)
    np.testing.assert_allclose(np.mean([p.total() for p in parts], axis=0), full, rtol=1e-9)
    assert not np.allclose(parts[0].total(), full)  # one subset alone is only an estimate


def test_a_wrong_model_has_a_larger_bound():
    x0 = _quantized((2, 3, 3, 1))
    good = d.bits_per_dim(_oracle(x0, SMALL), x0, SMALL, rng=np.random.default_rng(0))
    bad = d.bits_per_dim(lambda x_t, t: np.zeros_like(x_t), x0, SMALL, rng=np.random.default_rng(0))
    assert np.all(bad > good + 1.0), (good, bad)


def test_vlb_float32_stays_float32():
    x0 = _quantized((2, 3, 3, 1)).astype(np.float32)
    model = _oracle(x0, SMALL)
    terms = d.vlb_terms(lambda x, t: model(x, t).astype(np.float32), x0, SMALL, rng=np.random.default_rng(0))
    assert terms.terms.dtype == terms.prior.dtype == np.float32
    assert np.abs(terms.terms[:, :-1]).max() < 1e-4


def test_vlb_zero_terminal_snr_needs_v_prediction():
    x0 = _quantized((1, 2, 2, 1))
    with pytest.raises(ValueError, match="zero terminal SNR.*v_prediction"):
        d.vlb_terms(_oracle(x0, ZERO_SNR), x0, ZERO_SNR, "epsilon", timesteps=[999])
    terms = d.vlb_terms(_oracle(x0, ZERO_SNR, "v_prediction"), x0, ZERO_SNR, "v_prediction",
                        timesteps=[999, 500, 0], rng=np.random.default_rng(0))
    assert terms.prior[0] == 0.0 and np.abs(terms.terms[:, :2]).max() < 1e-9


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"timesteps": [3, 3]}, r"timesteps must be distinct ints in \[0, 19\]"),
        ({"timesteps": [20]}, r"timesteps must be distinct ints in \[0, 19\]"),
        ({"timesteps": [1.5]}, r"timesteps must be a non-empty 1-D sequence of ints"),
        ({"model_var_type": "learned"}, r"model_var_type must be one of \('fixed_small', 'fixed_large'\)"),
    ],
)
def test_vlb_bad_arguments(kwargs, match):
    x0 = np.zeros((1, 2, 2, 1))
    with pytest.raises(ValueError, match=match):
        d.vlb_terms(lambda x, t: x, x0, SMALL, **kwargs)


# --------------------------------------------------------------------------- CuPy


@pytest.mark.gpu
def test_cupy_matches_numpy():
    import cupy as cp

    x0 = _quantized((2, 3, 3, 2)).astype(np.float32)
    x_t = np.random.default_rng(0).standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 7])
    cpu = d.posterior_mean_variance(x0, x_t, t, SMALL.alpha_bar)
    gpu = d.posterior_mean_variance(cp.asarray(x0), cp.asarray(x_t), t, SMALL.alpha_bar)
    for a, b in zip(cpu, gpu):
        np.testing.assert_allclose(cp.asnumpy(b), a, rtol=1e-5, atol=1e-6)
    ll = d.discretized_gaussian_log_likelihood(x0, x_t * 0.01 + x0, np.float32(-4.0))
    ll_gpu = d.discretized_gaussian_log_likelihood(cp.asarray(x0), cp.asarray(x_t * 0.01 + x0), cp.float32(-4.0))
    np.testing.assert_allclose(cp.asnumpy(ll_gpu), ll, rtol=1e-4, atol=1e-5)
    model = _oracle(x0, SMALL)
    cpu_bpd = d.bits_per_dim(lambda x, t: model(x, t).astype(np.float32), x0, SMALL, rng=np.random.default_rng(0))
    gpu_bpd = d.bits_per_dim(lambda x, t: cp.asarray(model(cp.asnumpy(x), t), dtype=cp.float32), cp.asarray(x0),
                             SMALL, rng=np.random.default_rng(0))
    np.testing.assert_allclose(cp.asnumpy(gpu_bpd), cpu_bpd, rtol=1e-4)
    w = d.min_snr_weights(cp.asarray(t), SMALL.snr)
    np.testing.assert_allclose(cp.asnumpy(w), d.min_snr_weights(t, SMALL.snr), rtol=1e-6)
