import json
import math

import numpy as np
import pytest
from helpers import SOURCES, assert_close, reference

from diffusion_np.backend import asnumpy
from diffusion_np.nn import Linear, Module
from diffusion_np.optim import (
    EMA,
    SGD,
    Adam,
    AdamW,
    LRScheduler,
    clip_grad_norm,
    constant,
    linear_warmup_cosine,
)

OPTIMIZERS = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}
OPTIMIZER_CASES = [
    "sgd",
    "sgd_weight_decay",
    "sgd_momentum",
    "sgd_nesterov_weight_decay",
    "adam",
    "adam_weight_decay",
    "adamw",
]


class TinyMLP(Module):
    """Linear(5, 4) -> tanh -> Linear(4, 3), with its backward written out."""

    def __init__(self, seed: int = 0, dtype=np.float32):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.fc1 = Linear(5, 4, rng=rng, dtype=dtype)
        self.fc2 = Linear(4, 3, rng=rng, dtype=dtype)

    def forward(self, x):
        self._h = np.tanh(self.fc1(x))
        return self.fc2(self._h)

    def backward(self, dout):
        dh = self.fc2.backward(dout)
        return self.fc1.backward(dh * (1.0 - self._h * self._h))  # tanh' = 1 - tanh^2


def _model_from(inputs) -> TinyMLP:
    model = TinyMLP()
    model.load_state_dict({k.removeprefix("init."): v for k, v in inputs.items() if k.startswith("init.")})
    return model


def _set_grads(model: Module, inputs, step: int) -> None:
    """Write the fixture's gradients of ``step`` into the model's grads, in place."""
    for name, g in model.named_grads():
        g[...] = inputs[f"grads.{name}"][step]


def _run(model: Module, opt, inputs, steps, scheduler=None) -> dict:
    """Feed the fixed gradients of ``steps``; return {name: (len(steps), ...) trajectory}."""
    traj = {name: [] for name, _ in model.named_parameters()}
    for step in steps:
        _set_grads(model, inputs, step)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        for name, p in model.named_parameters():
            traj[name].append(asnumpy(p).copy())
    return {k: np.stack(v) for k, v in traj.items()}


@pytest.fixture(params=SOURCES, scope="module")
def torch_cases(request):
    return reference("optim", request.param)


# ----------------------------------------------------------------------------- torch parity
def test_fixture_covers_every_optimizer_case(torch_cases):
    stored = {k for k, c in torch_cases.items() if "optimizer" in c and "schedule" not in c}
    assert stored == set(OPTIMIZER_CASES)


@pytest.mark.parametrize("case", OPTIMIZER_CASES)
def test_trajectory_matches_torch(torch_cases, case):
    c, inputs = torch_cases[case], torch_cases["inputs"]
    model = _model_from(inputs)
    opt = OPTIMIZERS[str(c["optimizer"])](model, **json.loads(str(c["kwargs"])))
    traj = _run(model, opt, inputs, range(20))
    for name, values in traj.items():
        assert values.dtype == np.float32
        assert_close(values, c[f"traj.{name}"], what=f"{case}: {name}")


def test_scheduled_adamw_matches_torch_lambdalr(torch_cases):
    c, inputs = torch_cases["adamw_warmup_cosine"], torch_cases["inputs"]
    model = _model_from(inputs)
    opt = AdamW(model, **json.loads(str(c["kwargs"])))
    sched = LRScheduler(opt, linear_warmup_cosine, **json.loads(str(c["schedule"])))
    lrs = []
    traj = {name: [] for name, _ in model.named_parameters()}
    for step in range(20):
        lrs.append(opt.lr)
        _set_grads(model, inputs, step)
        opt.step()
        sched.step()
        for name, p in model.named_parameters():
            traj[name].append(p.copy())
    np.testing.assert_allclose(lrs, c["lrs"], rtol=1e-12, atol=1e-15)
    for name, values in traj.items():
        assert_close(np.stack(values), c[f"traj.{name}"], what=f"scheduled AdamW: {name}")


@pytest.mark.parametrize("case", ["clip_active", "clip_inactive"])
def test_clip_grad_norm_matches_torch(torch_cases, case):
    c = torch_cases[case]
    model = TinyMLP()
    for name, g in model.named_grads():
        g[...] = c[f"grad.{name}"]
    total = clip_grad_norm(model, float(c["max_norm"]))
    assert isinstance(total, float)
    np.testing.assert_allclose(total, c["total_norm"], rtol=1e-6)
    for name, g in model.named_grads():
        assert g.dtype == np.float32
        assert_close(g, c[f"clipped.{name}"], what=f"{case}: {name}")
    clipped_norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for _, g in model.named_grads()))
    assert clipped_norm <= float(c["max_norm"]) * (1 + 1e-6)


@pytest.mark.parametrize("case", ["lr_diffusers_warmup_cosine", "lr_cosine_annealing"])
def test_lr_schedule_matches_torch(torch_cases, case):
    c = torch_cases[case]
    config = json.loads(str(c["config"]))
    ours = [linear_warmup_cosine(step, **config) for step in range(len(c["lrs"]))]
    # CosineAnnealingLR updates its lr recursively, so it drifts from the closed form by rounding
    np.testing.assert_allclose(ours, c["lrs"], rtol=1e-12, atol=1e-14)


def test_ema_matches_diffusers_emamodel(torch_cases):
    c, inputs = torch_cases["ema_diffusers"], torch_cases["inputs"]
    model = _model_from(inputs)
    ema = EMA(model, decay=float(c["decay"]))
    for step in range(20):
        for name, p in model.named_parameters():
            p -= 0.1 * inputs[f"grads.{name}"][step]
        ema.update()
        for name, s in ema.shadow.items():
            assert s.dtype == np.float32
            assert_close(s, c[f"shadow.{name}"][step], atol=1e-6, what=f"EMA step {step}: {name}")


# ----------------------------------------------------------------------------- EMA by hand
@pytest.mark.parametrize("warmup", [True, False])
def test_ema_matches_hand_computation(warmup):
    model = TinyMLP(dtype=np.float64)
    ema = EMA(model, decay=0.95, warmup=warmup)
    rng = np.random.default_rng(3)
    expected = {name: p.copy() for name, p in model.named_parameters()}
    decays = []
    for n in range(30):
        for _, p in model.named_parameters():
            p += rng.standard_normal(p.shape)
        if warmup:
            d = 0.0 if n == 0 else min(0.95, (1 + n) / (10 + n))
        else:
            d = 0.95
        decays.append(ema.current_decay())
        ema.update()
        for name, p in model.named_parameters():
            expected[name] = d * expected[name] + (1 - d) * p
    np.testing.assert_allclose(decays[:3], [0.0, 2 / 11, 3 / 12] if warmup else [0.95] * 3)
    for name, s in ema.shadow.items():
        np.testing.assert_allclose(s, expected[name], rtol=1e-12, atol=1e-12)


def test_ema_swaps_weights_in_and_back_even_on_error():
    model = TinyMLP()
    ema = EMA(model, decay=0.5, warmup=False)
    model.fc1.weight[...] += 1.0
    ema.update()
    trained = {name: p.copy() for name, p in model.named_parameters()}
    ids = {name: id(p) for name, p in model.named_parameters()}
    with ema.average_parameters(model) as m:
        assert m is model
        for name, p in model.named_parameters():
            np.testing.assert_array_equal(p, ema.shadow[name])
        assert not np.array_equal(model.fc1.weight, trained["fc1.weight"])
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(p, trained[name])
    with pytest.raises(KeyError):
        with ema.average_parameters():
            raise KeyError("sampling failed")
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(p, trained[name])
        assert id(p) == ids[name]


def test_ema_copy_to_and_state_dict_round_trip():
    model = TinyMLP()
    ema = EMA(model, decay=0.9)
    for _ in range(3):
        model.fc2.bias[...] += 0.5
        ema.update()
    state = ema.state_dict()
    model.fc2.bias[...] += 0.5
    ema.update()  # must not change the saved state
    other = EMA(TinyMLP(seed=1), decay=0.5, warmup=False)
    other.load_state_dict(state)
    assert (other.decay, other.warmup, other.num_updates) == (0.9, True, 3)
    np.testing.assert_array_equal(other.shadow["fc2.bias"], state["shadow"]["fc2.bias"])
    assert not np.array_equal(other.shadow["fc2.bias"], ema.shadow["fc2.bias"])
    target = TinyMLP(seed=2)
    other.copy_to(target)
    for name, p in target.named_parameters():
        np.testing.assert_array_equal(p, state["shadow"][name])
    with pytest.raises(ValueError, match="EMA: module parameters differ"):
        other.copy_to(Linear(5, 4))


# ----------------------------------------------------------------------------- state and dtypes
@pytest.mark.parametrize(
    "make",
    [
        lambda m: SGD(m, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
        lambda m: Adam(m, lr=0.01, weight_decay=0.1),
        lambda m: AdamW(m, lr=0.01),
    ],
    ids=["sgd", "adam", "adamw"],
)
def test_state_dict_resume_is_bitwise_identical(torch_cases, make):
    inputs = torch_cases["inputs"]
    model = _model_from(inputs)
    opt = make(model)
    _run(model, opt, inputs, range(10))
    saved_params = {name: p.copy() for name, p in model.named_parameters()}
    saved_opt = opt.state_dict()
    straight = _run(model, opt, inputs, range(10, 20))

    resumed_model = TinyMLP(seed=5)
    resumed_model.load_state_dict(saved_params)
    resumed_opt = make(resumed_model)
    resumed_opt.load_state_dict(saved_opt)
    assert resumed_opt.step_count == 10
    resumed = _run(resumed_model, resumed_opt, inputs, range(10, 20))
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name])


def test_state_dict_is_a_copy_and_names_parameters():
    model = TinyMLP()
    opt = Adam(model, lr=0.1)
    model.fc1.grads["weight"][...] = 1.0
    opt.step()
    state = opt.state_dict()
    assert state["step"] == 1 and state["lr"] == 0.1 and state["type"] == "Adam"
    assert set(state["state"]) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    before = state["state"]["fc1.weight"]["exp_avg"].copy()
    opt.step()
    np.testing.assert_array_equal(state["state"]["fc1.weight"]["exp_avg"], before)


def test_load_state_dict_errors():
    model = TinyMLP()
    sgd_state = SGD(model, lr=0.1, momentum=0.9).state_dict()
    with pytest.raises(ValueError, match="got the state of a 'SGD' optimizer"):
        Adam(model).load_state_dict(sgd_state)
    opt = Adam(model)
    opt.step()
    state = opt.state_dict()
    state["state"]["fc9.weight"] = state["state"].pop("fc1.weight")
    with pytest.raises(ValueError, match="no parameter named fc9.weight"):
        Adam(model).load_state_dict(state)


@pytest.mark.parametrize("make", [
    lambda m: SGD(m, lr=0.1, momentum=0.9, weight_decay=0.1),
    lambda m: Adam(m, weight_decay=0.1),
    lambda m: AdamW(m),
], ids=["sgd", "adam", "adamw"])
def test_float32_stays_float32_in_place_and_grads_untouched(make):
    model = TinyMLP()
    opt = make(model)
    opt.lr = np.float64(0.01)  # a float64 scalar from a schedule must not promote
    ids = {name: id(p) for name, p in model.named_parameters()}
    before = {name: p.copy() for name, p in model.named_parameters()}
    rng = np.random.default_rng(0)
    for _, g in model.named_grads():
        g[...] = rng.standard_normal(g.shape)
    grads = {name: g.copy() for name, g in model.named_grads()}
    for _ in range(3):
        opt.step()
    for name, p in model.named_parameters():
        assert p.dtype == np.float32 and id(p) == ids[name]
        assert not np.array_equal(p, before[name])
    for name, g in model.named_grads():
        np.testing.assert_array_equal(g, grads[name])
    for bufs in opt.state.values():
        assert all(b.dtype == np.float32 for b in bufs.values())
    opt.zero_grad()
    assert not any(g.any() for _, g in model.named_grads())


@pytest.mark.parametrize("make", [
    lambda m: SGD(m, lr=0.3, momentum=0.9),
    lambda m: Adam(m, lr=0.05),
    lambda m: AdamW(m, lr=0.05, weight_decay=1e-3),
], ids=["sgd", "adam", "adamw"])
def test_optimizer_trains_a_tiny_mlp(make):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((64, 5)).astype(np.float32)
    y = np.sin(x[:, :3]) + 0.5 * x[:, 3:4]
    model = TinyMLP()
    opt = make(model)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        err = model(x) - y
        losses.append(0.5 * float((err * err).mean()))
        model.backward(err / err.size)
        clip_grad_norm(model, 5.0)
        opt.step()
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("make", [
    lambda m: SGD(m, lr=0.3, momentum=0.9, weight_decay=1e-2),
    lambda m: AdamW(m, lr=0.05, weight_decay=1e-3),
], ids=["sgd", "adamw"])
def test_a_step_on_three_threads_gives_the_one_thread_numbers(monkeypatch, make):
    """The parameters shared among the threads (largest first): each one's update as on one thread."""
    from diffusion_np.nn.fast import parallel

    monkeypatch.setattr(parallel, "MIN_SPLIT_BYTES", 0)  # the tiny MLP splits too
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 5))
    runs = []
    for n in (1, 3):
        model = TinyMLP().to(dtype=np.float64)
        opt = make(model)
        with parallel.threads(n):
            for _ in range(3):
                opt.zero_grad()
                model.backward(model(x) - 1.0)
                opt.step()
        runs.append([p.copy() for _, p in model.named_parameters()])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- schedules
def test_linear_warmup_cosine_shape():
    kw = {"base_lr": 1.0, "warmup_steps": 4, "total_steps": 12, "min_lr": 0.1}
    lrs = [linear_warmup_cosine(s, **kw) for s in range(20)]
    np.testing.assert_allclose(lrs[:5], [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(lrs[8], 0.1 + 0.9 * 0.5)  # half way through the cosine
    np.testing.assert_allclose(lrs[12:], 0.1)  # stays at min_lr after total_steps
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert linear_warmup_cosine(3, 2.0, 0, 10) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.3)))


def test_lr_scheduler_sets_optimizer_lr_like_torch_lambdalr():
    opt = SGD(TinyMLP(), lr=123.0)
    sched = LRScheduler(opt, linear_warmup_cosine, base_lr=0.5, warmup_steps=2, total_steps=6)
    seen = [opt.lr]
    for _ in range(7):
        sched.step()
        seen.append(sched.lr)
    np.testing.assert_allclose(seen, [linear_warmup_cosine(s, 0.5, 2, 6) for s in range(8)])
    other = LRScheduler(SGD(TinyMLP(), lr=1.0), linear_warmup_cosine, base_lr=0.5, warmup_steps=2, total_steps=6)
    other.load_state_dict(sched.state_dict())
    assert other.last_step == 7 and other.lr == sched.lr
    const = LRScheduler(opt, constant, base_lr=0.01)
    const.step()
    assert opt.lr == 0.01


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"step": -1, "base_lr": 1.0, "warmup_steps": 0, "total_steps": 5}, "step must be >= 0"),
        ({"step": 0, "base_lr": 1.0, "warmup_steps": 6, "total_steps": 5}, "warmup_steps <= total_steps"),
        ({"step": 0, "base_lr": -1.0, "warmup_steps": 0, "total_steps": 5}, "base_lr must be"),
        ({"step": 0, "base_lr": 1.0, "warmup_steps": 0, "total_steps": 5, "min_lr": 2.0}, "min_lr must be in"),
    ],
)
def test_linear_warmup_cosine_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        linear_warmup_cosine(**kwargs)


# ----------------------------------------------------------------------------- clipping edge cases
def test_clip_grad_norm_zero_grads_and_bad_inputs():
    model = TinyMLP()
    assert clip_grad_norm(model, 1.0) == 0.0
    assert not any(np.isnan(g).any() for _, g in model.named_grads())
    with pytest.raises(ValueError, match="clip_grad_norm: max_norm must be a finite number >= 0, got -1.0"):
        clip_grad_norm(model, -1.0)
    model.fc1.grads["bias"][0] = np.inf
    with pytest.raises(RuntimeError, match="total gradient norm is inf"):
        clip_grad_norm(model, 1.0, error_if_nonfinite=True)


# ----------------------------------------------------------------------------- bad hyperparameters
@pytest.mark.parametrize(
    "make,match",
    [
        (lambda m: SGD(m, lr=-0.1), r"SGD: lr must be a finite number >= 0, got -0.1"),
        (lambda m: SGD(m, lr=float("nan")), r"SGD: lr must be a finite number >= 0, got nan"),
        (lambda m: SGD(m, lr=0.1, momentum=-0.5), r"SGD: momentum must be a finite number >= 0"),
        (lambda m: SGD(m, lr=0.1, weight_decay=-1), r"SGD: weight_decay must be"),
        (lambda m: SGD(m, lr=0.1, nesterov=True), r"SGD: nesterov=True needs momentum > 0"),
        (lambda m: Adam(m, lr=-1.0), r"Adam: lr must be"),
        (lambda m: Adam(m, betas=(1.0, 0.999)), r"Adam: betas\[0\] must be in \[0.0, 1.0\), got 1.0"),
        (lambda m: Adam(m, betas=(0.9, -0.1)), r"Adam: betas\[1\] must be in \[0.0, 1.0\), got -0.1"),
        (lambda m: AdamW(m, betas=(0.9,)), r"AdamW: betas must be a pair"),
        (lambda m: AdamW(m, eps=-1e-8), r"AdamW: eps must be"),
        (lambda m: AdamW(m, weight_decay=-0.01), r"AdamW: weight_decay must be"),
        (lambda m: EMA(m, decay=1.5), r"EMA: decay must be in \[0.0, 1.0\], got 1.5"),
        (lambda m: EMA(m, decay=-0.1), r"EMA: decay must be in \[0.0, 1.0\], got -0.1"),
    ],
)
def test_bad_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make(TinyMLP())


def test_lr_set_by_a_schedule_is_validated():
    opt = Adam(TinyMLP())
    with pytest.raises(ValueError, match="Adam: lr must be"):
        opt.lr = -1e-3


def test_optimizer_needs_a_module():
    with pytest.raises(TypeError, match="SGD expects a diffusion_np Module, got dict"):
        SGD({"w": np.zeros(3)}, lr=0.1)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("make", [
    lambda m: SGD(m, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda m: Adam(m, lr=0.01, weight_decay=0.1),
    lambda m: AdamW(m, lr=0.01),
], ids=["sgd", "adam", "adamw"])
def test_cupy_matches_numpy(make):
    import cupy

    rng = np.random.default_rng(0)
    grads = [{name: rng.standard_normal(g.shape).astype(np.float32) for name, g in TinyMLP().named_grads()}
             for _ in range(5)]
    results = {}
    for device in ("numpy", "cupy"):
        model = TinyMLP().to(device)
        opt, ema = make(model), EMA(model, decay=0.9)
        for step_grads in grads:
            for name, g in model.named_grads():
                g[...] = cupy.asarray(step_grads[name]) if device == "cupy" else step_grads[name]
            norm = clip_grad_norm(model, 1.0)
            opt.step()
            ema.update()
        for _, p in model.named_parameters():
            assert p.dtype == np.float32 and (device == "numpy") != isinstance(p, cupy.ndarray)
        results[device] = (norm, {n: asnumpy(p) for n, p in model.named_parameters()},
                           {n: asnumpy(s) for n, s in ema.shadow.items()})
    assert results["cupy"][0] == pytest.approx(results["numpy"][0], rel=1e-5)
    for which in (1, 2):
        for name, value in results["numpy"][which].items():
            np.testing.assert_allclose(results["cupy"][which][name], value, rtol=1e-5, atol=1e-6)
