"""Optimizers, gradient clipping, an exponential moving average of the weights,
and learning-rate schedules.

Everything here works on a :class:`~diffusion_np.nn.module.Module`: an
optimizer walks ``module.parameters_and_grads()`` (name, parameter, gradient)
and updates each parameter array **in place**, so the arrays a layer holds (and
anything else that refers to them) see the new values. Per-parameter state
(momentum buffers, Adam moments) is keyed by the parameter's dotted name, so a
``state_dict()`` can be saved next to the model's and training resumes exactly.

Update rules (t counts steps from 1, g is the gradient, lr the learning rate):

SGD with momentum mu, weight decay wd, as ``torch.optim.SGD`` defines it
(Sutskever et al. 2013 written the PyTorch way: the learning rate multiplies
the buffer, not each gradient)::

    g   <- g + wd * theta                       (L2 penalty folded into the gradient)
    b_1 <- g ;  b_t <- mu * b_{t-1} + g         (momentum buffer, no dampening)
    d   <- g + mu * b_t   if nesterov  else  b_t
    theta <- theta - lr * d

Adam (Kingma & Ba 2015, Algorithm 1), with ``torch.optim.Adam``'s L2 weight decay::

    g   <- g + wd * theta                       (only when weight_decay > 0)
    m_t <- beta1 * m_{t-1} + (1 - beta1) * g
    v_t <- beta2 * v_{t-1} + (1 - beta2) * g^2
    m_hat = m_t / (1 - beta1^t) ;  v_hat = v_t / (1 - beta2^t)
    theta <- theta - lr * m_hat / (sqrt(v_hat) + eps)

As in PyTorch the bias corrections are applied to the scalars, not to copies of
the moments: ``theta -= (lr / (1 - beta1^t)) * m_t / (sqrt(v_t) / sqrt(1 - beta2^t) + eps)``,
which is Algorithm 1 exactly (eps is added *outside* the square root of v_hat).

AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization",
Algorithm 2): the decay shrinks the weights directly instead of entering the
gradient, so Adam's normalisation does not rescale it::

    theta <- theta * (1 - lr * wd)              (before the moment updates)
    then the Adam update above with g unchanged

Algorithm 2 writes the decay as ``eta_t * lambda`` (a schedule multiplier times
the decay); PyTorch, and this file, write ``lr * weight_decay``, so the decay
follows whatever schedule sets ``lr``.

The order of operations follows PyTorch's single-tensor (``foreach=False``)
code, so whole trajectories agree with ``torch.optim`` to float32 rounding
(PyTorch writes the first-moment update as a ``lerp``, which rounds a little
differently; the tests measure a few 1e-7 after 20 steps). Scalars are Python
floats, so float32 parameters stay float32.

Left out on purpose: parameter groups (one learning rate for the whole model),
AMSGrad, ``maximize``, SGD dampening, fused/foreach kernels, sparse gradients,
and closures that re-evaluate the loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from diffusion_np.backend import asnumpy, device_of, get_xp, to_device
from diffusion_np.nn import fast
from diffusion_np.nn.module import Module

__all__ = [
    "EMA",
    "SGD",
    "Adam",
    "AdamW",
    "LRScheduler",
    "Optimizer",
    "clip_grad_norm",
    "constant",
    "linear_warmup_cosine",
]


# ----------------------------------------------------------------------------- checks
def _check_range(owner: str, name: str, value, low: float, high: float, high_open: bool = False) -> float:
    """``value`` as a Python float, or a ValueError naming ``owner`` and the allowed range."""
    value = float(value)
    above = value >= high if high_open else value > high
    if not math.isfinite(value) or value < low or above:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{owner}: {name} must be in [{low}, {high}{bracket}, got {value}")
    return value


def _check_nonnegative(owner: str, name: str, value) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {value}")
    return value


def _copy_to_like(array, like):
    """A copy of ``array`` on ``like``'s device with ``like``'s dtype (for loading state)."""
    return to_device(asnumpy(array), device_of(like)).astype(like.dtype, copy=True)


# ----------------------------------------------------------------------------- optimizers
class Optimizer:
    """Base class: holds the module, the learning rate, the step count and the
    per-parameter state; subclasses write ``_update`` for one parameter array.

    Attributes
    ----------
    lr : float
        Learning rate of the next ``step()``; a schedule may set it between steps.
    step_count : int
        Number of ``step()`` calls so far (Adam's t after the step).
    state : dict
        ``{parameter name: {buffer name: array}}``, created lazily on the first step.
    """

    #: names of the per-parameter buffers a subclass keeps (for state_dict checks)
    _buffers: tuple[str, ...] = ()

    def __init__(self, module: Module, lr: float) -> None:
        if not isinstance(module, Module):
            raise TypeError(f"{type(self).__name__} expects a diffusion_np Module, got {type(module).__name__}")
        self.module = module
        self.lr = lr
        self.step_count = 0
        self.state: dict[str, dict[str, object]] = {}

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = _check_nonnegative(type(self).__name__, "lr", value)

    def zero_grad(self) -> None:
        """Set every gradient of the module to zero (``module.zero_grad()``)."""
        self.module.zero_grad()

    def step(self) -> None:
        """Update every parameter in place from its current gradient.

        Each parameter's update reads and writes only its own arrays, so on two threads or
        more (:mod:`diffusion_np.nn.fast.parallel`, NumPy arrays, not in reference mode) the
        parameters are shared among the threads, largest first; the numbers are the same.
        """
        self.step_count += 1
        work = [(p, g, self.state.setdefault(name, {})) for name, p, g in self.module.parameters_and_grads()]
        if not fast.splits_list([p for p, _, _ in work]):
            for param, grad, state in work:
                self._update(param, grad, state)
            return
        work.sort(key=lambda item: -item[0].size)  # the largest first: the threads end together

        def block(lo: int, hi: int) -> None:
            for param, grad, state in work[lo:hi]:  # a loop over parameters
                self._update(param, grad, state)

        fast.parallel.run_blocks(block, len(work), 1)

    def _update(self, param, grad, state: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def hyperparameters(self) -> dict:
        """The constructor arguments other than ``module`` and ``lr``."""
        raise NotImplementedError  # pragma: no cover - abstract

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything needed to continue training exactly: a deep copy.

        ``{"type": class name, "step": int, "lr": float, "hyperparameters": {...},
        "state": {parameter name: {buffer name: array}}}``. Arrays are copies on
        their own device, so later steps do not change a saved dict.
        """
        return {
            "type": type(self).__name__,
            "step": self.step_count,
            "lr": self.lr,
            "hyperparameters": dict(self.hyperparameters()),
            "state": {name: {k: v.copy() for k, v in bufs.items()} for name, bufs in self.state.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (copies the arrays onto each parameter's
        device and dtype). The module must have the parameters the state names."""
        owner = type(self).__name__
        if state.get("type") != owner:
            raise ValueError(f"{owner}.load_state_dict got the state of a {state.get('type')!r} optimizer")
        params = dict(self.module.named_parameters())
        unknown = [name for name in state["state"] if name not in params]
        if unknown:
            raise ValueError(f"{owner}.load_state_dict: no parameter named " + ", ".join(unknown))
        new_state = {}
        for name, bufs in state["state"].items():
            extra = [k for k in bufs if k not in self._buffers]
            if extra:
                raise ValueError(f"{owner}.load_state_dict: unexpected buffers {extra} for {name}")
            new_state[name] = {k: _copy_to_like(v, params[name]) for k, v in bufs.items()}
        self._set_hyperparameters(**state["hyperparameters"])
        self.lr = state["lr"]
        self.step_count = int(state["step"])
        self.state = new_state

    def _set_hyperparameters(self, **kwargs) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.

    Same update as ``torch.optim.SGD(params, lr, momentum, weight_decay=...,
    nesterov=...)`` with ``dampening=0``; see the module docstring.

    Parameters
    ----------
    module : Module
        The model whose parameters are updated in place.
    lr : float
        Learning rate (>= 0).
    momentum : float
        Momentum factor mu (>= 0); 0 is plain SGD and keeps no state.
    weight_decay : float
        L2 penalty wd (>= 0) added to the gradient as ``wd * theta``.
    nesterov : bool
        Nesterov momentum (needs ``momentum > 0``).
    """

    _buffers = ("momentum_buffer",)

    def __init__(
        self, module: Module, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False
    ) -> None:
        super().__init__(module, lr)
        self._set_hyperparameters(momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)

    def _set_hyperparameters(self, momentum: float, weight_decay: float, nesterov: bool) -> None:
        self.momentum = _check_nonnegative("SGD", "momentum", momentum)
        self.weight_decay = _check_nonnegative("SGD", "weight_decay", weight_decay)
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum == 0:
            raise ValueError("SGD: nesterov=True needs momentum > 0")

    def hyperparameters(self) -> dict:
        return {"momentum": self.momentum, "weight_decay": self.weight_decay, "nesterov": self.nesterov}

    def _update(self, param, grad, state: dict) -> None:
        d = grad
        if self.weight_decay != 0:
            d = grad + self.weight_decay * param  # a new array: the module's grad is left as it was
        if self.momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                # first step: the buffer starts at the gradient itself (b_1 = g), as in PyTorch
                buf = state["momentum_buffer"] = d.copy()
            else:
                buf *= self.momentum
                buf += d
            d = d + self.momentum * buf if self.nesterov else buf
        param -= self.lr * d


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015, Algorithm 1) with PyTorch's L2-style weight decay.

    Same update as ``torch.optim.Adam(params, lr, betas, eps, weight_decay)``;
    see the module docstring for the equations.

    Parameters
    ----------
    module : Module
        The model whose parameters are updated in place.
    lr : float
        Learning rate alpha (>= 0).
    betas : (float, float)
        Decay rates (beta1, beta2) of the first and second moment, each in [0, 1).
    eps : float
        Added to sqrt(v_hat) so the division never divides by zero (>= 0).
    weight_decay : float
        L2 penalty (>= 0) added to the gradient, ``g + wd * theta``. Adam then
        normalises it along with the gradient; :class:`AdamW` decouples it.
    """

    _buffers = ("exp_avg", "exp_avg_sq")
    _decoupled = False  # AdamW sets this: decay the weights, not the gradient

    def __init__(
        self,
        module: Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(module, lr)
        self._set_hyperparameters(betas=betas, eps=eps, weight_decay=weight_decay)

    def _set_hyperparameters(self, betas, eps: float, weight_decay: float) -> None:
        owner = type(self).__name__
        if len(betas) != 2:
            raise ValueError(f"{owner}: betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (
            _check_range(owner, "betas[0]", betas[0], 0.0, 1.0, high_open=True),
            _check_range(owner, "betas[1]", betas[1], 0.0, 1.0, high_open=True),
        )
        self.eps = _check_nonnegative(owner, "eps", eps)
        self.weight_decay = _check_nonnegative(owner, "weight_decay", weight_decay)

    def hyperparameters(self) -> dict:
        return {"betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay}

    def _update(self, param, grad, state: dict) -> None:
        xp = get_xp(param)
        beta1, beta2 = self.betas
        t = self.step_count
        lr, wd = self.lr, self.weight_decay
        if wd != 0:
            if self._decoupled:
                param *= 1.0 - lr * wd  # AdamW (Loshchilov & Hutter, Algorithm 2 line 12)
            else:
                grad = grad + wd * param  # Adam's L2 penalty; a new array, the module's grad is kept
        if "exp_avg" not in state:
            state["exp_avg"] = xp.zeros_like(param)  # m_0 = 0
            state["exp_avg_sq"] = xp.zeros_like(param)  # v_0 = 0
        m, v = state["exp_avg"], state["exp_avg_sq"]
        # Algorithm 1: biased first and second moment estimates, in place
        m *= beta1
        m += (1.0 - beta1) * grad
        v *= beta2
        v += (1.0 - beta2) * (grad * grad)
        # bias corrections as Python floats (keeps float32 float32)
        bias_correction1 = 1.0 - beta1**t
        bias_correction2 = 1.0 - beta2**t
        step_size = lr / bias_correction1
        denom = xp.sqrt(v)
        denom /= math.sqrt(bias_correction2)  # sqrt(v_hat)
        denom += self.eps
        param -= step_size * (m / denom)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019, Algorithm 2).

    Same update as ``torch.optim.AdamW``: each step first shrinks the weights,
    ``theta *= 1 - lr * weight_decay``, then applies the Adam update with the
    unmodified gradient. Parameters as :class:`Adam`; ``weight_decay`` defaults
    to 1e-2 as in PyTorch.
    """

    _decoupled = True

    def __init__(
        self,
        module: Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(module, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


# ----------------------------------------------------------------------------- clipping
def clip_grad_norm(module: Module, max_norm: float, error_if_nonfinite: bool = False) -> float:
    """Scale all gradients in place so their global L2 norm is at most ``max_norm``.

    As ``torch.nn.utils.clip_grad_norm_`` (norm_type=2)::

        total_norm = sqrt(sum over parameters of ||g||^2)
        coef = min(max_norm / (total_norm + 1e-6), 1)
        g <- coef * g      for every gradient

    The 1e-6 keeps the division finite for all-zero gradients and makes the
    clipped norm land just below ``max_norm``. Every gradient is multiplied,
    even when ``coef`` is 1, as PyTorch does.

    Returns
    -------
    float
        The total norm *before* clipping (useful to log).
    """
    max_norm = _check_nonnegative("clip_grad_norm", "max_norm", max_norm)
    grads = [g for _, g in module.named_grads()]
    if not grads:
        return 0.0
    xp = get_xp(grads[0])
    # norm of the per-array norms = norm of everything; one deliberate host copy at the end (a sync)
    norms = xp.stack([xp.linalg.norm(g.ravel()) for g in grads])
    total_norm = float(asnumpy(xp.linalg.norm(norms)))
    if error_if_nonfinite and not math.isfinite(total_norm):
        raise RuntimeError(f"clip_grad_norm: the total gradient norm is {total_norm}")
    coef = min(max_norm / (total_norm + 1e-6), 1.0)
    for g in grads:
        g *= coef
    return total_norm


# ----------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of a module's parameters ("EMA weights").

    Keeps a shadow copy of every parameter and, at each :meth:`update` (call it
    after ``optimizer.step()``), moves it towards the current weights::

        shadow <- decay_n * shadow + (1 - decay_n) * theta
               =  shadow - (1 - decay_n) * (shadow - theta)     (the in-place form used)

    With ``warmup=True`` the decay grows with the number n of earlier updates,
    so the average forgets the random initialisation quickly::

        decay_n = min(decay, (1 + n) / (10 + n)),   and decay_0 = 0 (the first update copies)

    The (1 + n) / (10 + n) ramp comes from TensorFlow's
    ``tf.train.ExponentialMovingAverage(num_updates=...)``; CompVis' Stable
    Diffusion training (``ldm/modules/ema.py``, LitEma) and diffusers'
    ``EMAModel`` use it. Here n is counted exactly as diffusers' ``EMAModel``
    (``use_ema_warmup=False``, ``update_after_step=0``) counts it, so the two give
    the same shadow weights. With ``warmup=False`` every update uses ``decay``.

    The shadow weights have the parameters' dtype and device, as in diffusers.

    Parameters
    ----------
    module : Module
        The model being trained; its current parameters start the average.
    decay : float
        The largest decay, in [0, 1]. 0.999 to 0.9999 is usual.
    warmup : bool
        Use the ramp above (default True).
    """

    def __init__(self, module: Module, decay: float = 0.999, warmup: bool = True) -> None:
        self.module = module
        self.decay = _check_range("EMA", "decay", decay, 0.0, 1.0)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadow = {name: p.copy() for name, p in module.named_parameters()}

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        if n == 0:
            return 0.0
        return min(self.decay, (1.0 + n) / (10.0 + n))

    def update(self) -> None:
        """Move every shadow weight towards the module's current weight, in place."""
        one_minus_decay = 1.0 - self.current_decay()
        for name, param in self.module.named_parameters():
            shadow = self.shadow[name]
            shadow -= one_minus_decay * (shadow - param)
        self.num_updates += 1

    def _named_targets(self, module: Module | None) -> Iterator[tuple[str, object]]:
        module = self.module if module is None else module
        params = dict(module.named_parameters())
        if set(params) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(params))
            extra = sorted(set(params) - set(self.shadow))
            raise ValueError(f"EMA: module parameters differ from the shadow: missing {missing}, extra {extra}")
        return iter(params.items())

    def copy_to(self, module: Module | None = None) -> None:
        """Write the averaged weights into ``module`` (default: the tracked one), in place."""
        for name, param in self._named_targets(module):
            param[...] = self.shadow[name]

    @contextmanager
    def average_parameters(self, module: Module | None = None):
        """Swap the EMA weights in for the ``with`` block, then put the trained ones back::

            with ema.average_parameters(model):
                images = sample(model, ...)
            # model holds its training weights again, even if sampling raised
        """
        targets = list(self._named_targets(module))
        backup = {name: param.copy() for name, param in targets}
        self.copy_to(module)
        try:
            yield self.module if module is None else module
        finally:
            for name, param in targets:
                param[...] = backup[name]

    def to(self, device: str) -> EMA:
        """Move the shadow weights to ``device`` ("numpy" or "cupy")."""
        self.shadow = {name: to_device(s, device) for name, s in self.shadow.items()}
        return self

    def state_dict(self) -> dict:
        """``{"decay", "warmup", "num_updates", "shadow": {name: array copy}}``."""
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": {name: s.copy() for name, s in self.shadow.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; names and shapes must match the shadow."""
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError(
                "EMA.load_state_dict: parameter names differ: "
                f"missing {sorted(set(self.shadow) - set(state['shadow']))}, "
                f"unexpected {sorted(set(state['shadow']) - set(self.shadow))}"
            )
        for name, s in state["shadow"].items():
            if tuple(s.shape) != tuple(self.shadow[name].shape):
                raise ValueError(
                    f"EMA.load_state_dict: {name} expected {tuple(self.shadow[name].shape)}, got {tuple(s.shape)}"
                )
        self.decay = _check_range("EMA", "decay", state["decay"], 0.0, 1.0)
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
        self.shadow = {name: _copy_to_like(s, self.shadow[name]) for name, s in state["shadow"].items()}


# ----------------------------------------------------------------------------- LR schedules
def constant(step: int, base_lr: float) -> float:
    """The same learning rate at every step (``torch.optim.lr_scheduler.LambdaLR``
    with ``lambda step: 1.0``)."""
    return float(base_lr)


def linear_warmup_cosine(
    step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0
) -> float:
    """Linear warmup from 0, then a half cosine from ``base_lr`` down to ``min_lr``.

    ::

        step < warmup_steps:   lr = base_lr * step / warmup_steps
        otherwise:             p  = min((step - warmup_steps) / (total_steps - warmup_steps), 1)
                               lr = min_lr + (base_lr - min_lr) * (1 + cos(pi * p)) / 2

    The cosine is SGDR's (Loshchilov & Hutter 2017, Eq. 5) without restarts.
    With ``min_lr=0`` this equals diffusers'/transformers'
    ``get_cosine_schedule_with_warmup`` (a ``torch.optim.lr_scheduler.LambdaLR``)
    for steps 0..total_steps; with ``warmup_steps=0`` it equals
    ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=total_steps, eta_min=min_lr)``
    for steps 0..total_steps. After ``total_steps`` it stays at ``min_lr`` (the
    torch schedules would rise again).

    Step 0 of a warmup has lr = 0, as in those schedules: the first optimizer
    step then leaves the weights unchanged (Adam's moments still update).
    """
    step, warmup_steps, total_steps = int(step), int(warmup_steps), int(total_steps)
    if step < 0:
        raise ValueError(f"linear_warmup_cosine: step must be >= 0, got {step}")
    if warmup_steps < 0 or total_steps < warmup_steps or total_steps <= 0:
        raise ValueError(
            "linear_warmup_cosine: need 0 <= warmup_steps <= total_steps and total_steps > 0, "
            f"got warmup_steps={warmup_steps}, total_steps={total_steps}"
        )
    base_lr = _check_nonnegative("linear_warmup_cosine", "base_lr", base_lr)
    min_lr = _check_range("linear_warmup_cosine", "min_lr", min_lr, 0.0, base_lr)
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = min((step - warmup_steps) / max(1, total_steps - warmup_steps), 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LRScheduler:
    """Sets ``optimizer.lr = schedule(step, **kwargs)``, one step at a time.

    Call :meth:`step` once after every ``optimizer.step()``, as with PyTorch's
    schedulers: the constructor sets the lr for step 0, the n-th ``step()``
    sets it for step n. ``LRScheduler(opt, linear_warmup_cosine, base_lr=1e-3,
    warmup_steps=100, total_steps=10_000)`` gives the learning rates of
    ``LambdaLR(torch_opt, lambda s: linear_warmup_cosine(s, ...) / base_lr)``.

    Parameters
    ----------
    optimizer : Optimizer
        Its ``lr`` is overwritten.
    schedule : callable
        ``schedule(step, **kwargs) -> lr``, e.g. :func:`constant` or
        :func:`linear_warmup_cosine`.
    **kwargs
        Passed to ``schedule`` at every step.
    """

    def __init__(self, optimizer: Optimizer, schedule: Callable[..., float], **kwargs) -> None:
        self.optimizer = optimizer
        self.schedule = schedule
        self.kwargs = kwargs
        self.last_step = 0
        self.optimizer.lr = self.schedule(0, **kwargs)

    @property
    def lr(self) -> float:
        """The learning rate set for the current step."""
        return self.optimizer.lr

    def step(self) -> None:
        """Advance one step and set the optimizer's learning rate for it."""
        self.last_step += 1
        self.optimizer.lr = self.schedule(self.last_step, **self.kwargs)

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self.optimizer.lr = self.schedule(self.last_step, **self.kwargs)
