"""The generic sampling loop: seeding, callbacks, trajectories, guidance, errors, any Sampler subclass."""

import numpy as np
import pytest

from diffusion_np.samplers import SAMPLERS
from diffusion_np.samplers.base import Sampler, StepOutput
from diffusion_np.samplers.ddim import DDIMSampler
from diffusion_np.samplers.ddpm import DDPMSampler
from diffusion_np.samplers.loop import Trajectory, sample

SHAPE = (2, 4, 4, 3)


def model(x, t):
    return np.tanh(0.8 * x - 1.2 * float(t) / 1000)


def test_loop_is_the_manual_diffusers_loop():
    sampler = DDIMSampler(clip_sample=False)
    got = sample(model, SHAPE, sampler, 10, seed=3, progress=False, eta=1.0)
    # by hand: x_T first, then one z per step, all from default_rng(seed) on the host
    rng = np.random.default_rng(3)
    ref = DDIMSampler(clip_sample=False)
    ref.set_timesteps(10)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    for t in ref.timesteps:
        z = rng.standard_normal(SHAPE).astype(np.float32)
        x = ref.step(model(x, t), t, x, eta=1.0, noise=z).prev_sample
    np.testing.assert_array_equal(got, x)
    assert got.dtype == np.float32 and got.shape == SHAPE


def test_seed_fixes_the_result_and_changes_it():
    a = sample(model, SHAPE, DDPMSampler(), 5, seed=1, progress=False)
    b = sample(model, SHAPE, DDPMSampler(), 5, seed=1, progress=False)
    c = sample(model, SHAPE, DDPMSampler(), 5, seed=2, progress=False)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_eta_does_not_shift_the_random_stream():
    # z is drawn every step, used or not, so x_T is the same whatever eta is
    trajectories = [sample(model, SHAPE, DDIMSampler(), 4, seed=0, progress=False, return_trajectory=True, eta=eta)[1]
                    for eta in (0.0, 1.0)]  # fmt: skip
    np.testing.assert_array_equal(trajectories[0].x_t[0], trajectories[1].x_t[0])


def test_callback_and_trajectory():
    calls = []
    x, traj = sample(model, SHAPE, DDIMSampler(), 6, progress=False, return_trajectory=True,
                     callback=lambda i, t, x_t, x0: calls.append((i, int(t), x_t, x0)))  # fmt: skip
    assert isinstance(traj, Trajectory)
    assert [c[0] for c in calls] == list(range(6))
    assert [c[1] for c in calls] == traj.timesteps.tolist() == [830, 664, 498, 332, 166, 0]
    assert len(traj.x_t) == 7 and len(traj.x0_pred) == 6
    np.testing.assert_array_equal(traj.x_t[-1], x)
    for (_, _, x_t, x0), tx, t0 in zip(calls, traj.x_t[1:], traj.x0_pred):
        assert x_t is tx and x0 is t0


def test_initial_noise_is_scaled_by_init_noise_sigma():
    class Scaled(DDIMSampler):
        @property
        def init_noise_sigma(self):
            return 2.5

    noise = np.random.default_rng(0).standard_normal(SHAPE)
    _, traj = sample(model, SHAPE, Scaled(), 2, noise=noise, progress=False, return_trajectory=True)
    np.testing.assert_allclose(traj.x_t[0], 2.5 * noise.astype(np.float32))


def test_guidance_combines_uncond_and_cond():
    def pair(x, t):
        return model(x, t), model(x, t) + 0.1

    for w, offset in ((0.0, 0.0), (1.0, 0.1), (7.5, 0.75)):
        guided = sample(pair, SHAPE, DDIMSampler(clip_sample=False), 3, progress=False, guidance=w)
        plain = sample(lambda x, t, o=offset: model(x, t) + o, SHAPE, DDIMSampler(clip_sample=False), 3,
                       progress=False)  # fmt: skip
        np.testing.assert_allclose(guided, plain, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"with guidance=7.5 model_fn must return a pair \(uncond, cond\)"):
        sample(model, SHAPE, DDIMSampler(), 3, progress=False, guidance=7.5)


def test_works_with_any_sampler_and_repeated_timesteps():
    # a second-order sampler in diffusers' style repeats timesteps and keeps its half step inside; the loop
    # just calls the model once per entry of sampler.timesteps
    class Repeating(Sampler):
        order = 2

        def set_timesteps(self, n):
            super().set_timesteps(n)
            self.timesteps = np.repeat(self.timesteps, 2)[1:]

        def step(self, model_output, t, sample, noise=None):
            return StepOutput(sample - 0.01 * model_output, model_output)

    seen = []
    sample(lambda x, t: seen.append(int(t)) or np.zeros_like(x), SHAPE, Repeating(), 3, progress=False)
    assert seen == [666, 333, 333, 0, 0]


def test_progress_bar_runs(capsys):
    sample(model, (1, 2, 2, 1), DDIMSampler(), 3, progress=True)
    assert "sampling" in capsys.readouterr().err


def test_float64_and_step_noise():
    z = [np.zeros(SHAPE)] * 5
    a = sample(model, SHAPE, DDPMSampler(), 5, dtype=np.float64, progress=False, step_noise=z)
    b = sample(model, SHAPE, DDPMSampler(), 5, dtype=np.float64, progress=False, seed=0, step_noise=z)
    assert a.dtype == np.float64
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"steps": 0}, r"steps must be an integer >= 1, got 0"),
        ({"steps": 2.5}, r"steps must be an integer >= 1, got 2.5"),
        ({"shape": [2, 4, 4, 3]}, r"shape must be a non-empty tuple of positive ints .* got \[2, 4, 4, 3\]"),
        ({"shape": (2, 0, 4)}, r"shape must be a non-empty tuple"),
        ({"noise": np.zeros((1, 4, 4, 3))}, r"noise must have shape \(2, 4, 4, 3\), got \(1, 4, 4, 3\)"),
        ({"step_noise": [np.zeros(SHAPE)]}, r"step_noise must hold one array per timestep \(4\), got 1"),
        ({"dtype": np.int32}, r"dtype must be a floating dtype, got int32"),
        ({"steps": 2000}, r"num_inference_steps \(2000\) cannot exceed num_train_timesteps \(1000\)"),
    ],
)
def test_loop_bad_input(kwargs, match):
    args = {"shape": SHAPE, "steps": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        sample(model, args.pop("shape"), DDIMSampler(), args.pop("steps"), progress=False, **args)


def test_loop_rejects_a_non_sampler():
    with pytest.raises(TypeError, match="sampler must be a diffusion_np Sampler, got str"):
        sample(model, SHAPE, "ddim", 4, progress=False)


@pytest.mark.gpu
@pytest.mark.parametrize("sampler_cls,kwargs", [(DDPMSampler, {}), (DDIMSampler, {"eta": 1.0}),
                                                (DDPMSampler, {"thresholding": True})])  # fmt: skip
def test_loop_on_cupy_matches_numpy(sampler_cls, kwargs):
    import cupy

    step_kwargs = {k: v for k, v in kwargs.items() if k == "eta"}
    config = {k: v for k, v in kwargs.items() if k != "eta"}
    cp_model = lambda x, t: cupy.tanh(0.8 * x - 1.2 * float(t) / 1000)  # noqa: E731
    on_gpu = sample(cp_model, SHAPE, sampler_cls(**config), 10, seed=4, progress=False, xp=cupy, **step_kwargs)
    on_cpu = sample(model, SHAPE, sampler_cls(**config), 10, seed=4, progress=False, **step_kwargs)
    assert isinstance(on_gpu, cupy.ndarray) and on_gpu.dtype == np.float32
    np.testing.assert_allclose(cupy.asnumpy(on_gpu), on_cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_checks_its_config_where_it_enters(name):
    """steps_offset and timestep_spacing are refused by the constructor (a negative offset walked timestep
    -3, i.e. alpha_bar[-3] = step T - 3; an unknown spacing passed the constructor and failed at the first
    call), and so is a bool number of steps."""
    cls = SAMPLERS[name]
    with pytest.raises(ValueError, match="steps_offset must be >= 0, got -3"):
        cls(num_train_timesteps=100, steps_offset=-3)
    for bad in (1.5, float("nan"), "1", None, True):
        with pytest.raises(TypeError, match="steps_offset must be an int >= 0"):
            cls(steps_offset=bad)
    with pytest.raises(ValueError, match=r"timestep_spacing must be one of \('linspace', 'leading', 'trailing'\)"):
        cls(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="num_inference_steps must be an integer"):
        cls().set_timesteps(True)
