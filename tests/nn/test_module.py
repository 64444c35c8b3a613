"""The Module base class: names, state dicts, modes, devices, caches."""

import tracemalloc

import numpy as np
import pytest

from diffusion_np.models import UNet2DConditionModel
from diffusion_np.nn import Conv2d, Linear, Module, ModuleList


class Tiny(Module):
    def __init__(self):
        super().__init__()
        self.proj = Linear(3, 4, rng=np.random.default_rng(0))
        self.blocks = ModuleList([Linear(4, 4, rng=np.random.default_rng(1)), Linear(4, 2, bias=False)])
        self.add_param("scale", np.ones(2, np.float32))

    def forward(self, x):
        h = self.blocks[1](self.blocks[0](self.proj(x)))
        self._set_cache(True)
        return h * self.scale


def test_dotted_names_in_registration_order_and_counts():
    model = Tiny()
    assert list(model.state_dict()) == [
        "scale", "proj.weight", "proj.bias", "blocks.0.weight", "blocks.0.bias", "blocks.1.weight",
    ]
    assert model.num_parameters() == 2 + 12 + 4 + 16 + 4 + 8
    assert [n for n, _ in model.named_grads()] == list(model.state_dict())
    assert model.scale is model.params["scale"]


def test_load_state_dict_copies_and_lists_every_problem():
    a, b = Tiny(), Tiny()
    state = {k: v + 1 for k, v in a.state_dict().items()}
    b.load_state_dict(state)
    for k, v in b.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
        assert v is not state[k] and v.dtype == np.float32
    bad = dict(state)
    del bad["proj.bias"]
    bad["extra.weight"] = np.zeros(1)
    bad["blocks.0.weight"] = np.zeros((3, 3))
    with pytest.raises(ValueError) as err:
        b.load_state_dict(bad)
    message = str(err.value)
    assert "missing keys: proj.bias" in message and "unexpected keys: extra.weight" in message
    assert "blocks.0.weight: expected (4, 4), got (3, 3)" in message
    b.load_state_dict({"scale": np.zeros(2)}, strict=False)
    assert not b.scale.any()


def test_parameters_cannot_be_rebound_by_assignment():
    with pytest.raises(AttributeError, match="is a parameter"):
        Tiny().scale = np.zeros(2)


def test_train_eval_and_dtype_moves_reach_every_child():
    model = Tiny().eval()
    assert not any(m.training for _, m in model.named_modules())
    model.train()
    assert all(m.training for _, m in model.named_modules())
    model.to(dtype=np.float64)
    assert all(p.dtype == np.float64 for _, p in model.named_parameters())
    assert all(g.dtype == np.float64 for _, g in model.named_grads())
    with pytest.raises(ValueError, match="device must be one of"):
        model.to("tpu")


def test_inference_mode_keeps_outputs_drops_caches_and_refuses_backward():
    conv = Conv2d(3, 4, 3, padding=1, rng=np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((2, 5, 5, 3)).astype(np.float32)
    y = conv(x)
    assert conv._cache is not None
    conv.inference()
    np.testing.assert_array_equal(conv(x), y)
    assert conv._cache is None
    with pytest.raises(RuntimeError, match="inference mode"):
        conv.backward(np.ones_like(y))
    conv.inference(False)
    conv(x)
    conv.backward(np.ones_like(y))  # training again


def test_inference_mode_frees_a_unets_activations():
    config = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                  attention_head_dim=8, norm_num_groups=8)
    unet = UNet2DConditionModel(**config)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 16, 16, 4)).astype(np.float32)
    text = rng.standard_normal((4, 7, 32)).astype(np.float32)

    def held_after_forward():
        tracemalloc.start()
        out = unet(x, 10, text)
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return out, held

    out_train, held_train = held_after_forward()
    unet.inference()
    out_infer, held_infer = held_after_forward()
    np.testing.assert_array_equal(out_infer, out_train)
    assert held_infer < 0.1 * held_train, (held_infer, held_train)


def test_inputs_are_checked_where_they_come_in_not_in_every_inner_layer():
    """The outermost call checks its floating inputs, named as in its forward; the layers it
    calls take the previous layer's output unchecked (one pass over every activation fewer),
    and the count of calls in progress comes back to 0 after an error."""
    from diffusion_np.nn import validate

    model = Tiny()
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="Tiny got a non-finite value .* in x"):  # Tiny.forward checks nothing itself
        model(np.full((2, 3), np.nan, np.float32))
    assert validate.calls.depth == 0
    model.blocks[0].params["weight"][0, 0] = np.nan  # a NaN the model makes itself reaches its output
    assert np.isnan(model(x)).all()
    h = model.proj(x)
    with pytest.raises(ValueError, match="Linear got a non-finite value"):  # the same layer, called directly
        model.blocks[1](model.blocks[0](h))
    assert validate.calls.depth == 0


class _Inputs(Module):
    """forward(x, *more, extras=None, mask=None): every kind of argument the input check names."""

    unchecked_inputs = ("mask",)

    def __init__(self, inner_check=None):
        super().__init__()
        self.proj = Linear(3, 3, rng=np.random.default_rng(0))
        self.inner_check = inner_check

    def forward(self, x, *more, extras=None, mask=None):
        if self.inner_check is not None:
            self.inner_check(x)
        return self.proj(x)


@pytest.mark.parametrize("args,kwargs,named", [
    ((np.ones((2, 3)), np.ones((2, 3)), np.full((2, 3), np.inf)), {}, r"in more\[1\]"),
    ((np.ones((2, 3)),), {"extras": [np.ones(2), np.full(2, np.nan)]}, r"in extras\[1\]"),
    ((np.ones((2, 3)),), {"extras": (np.ones(2), np.nan * np.ones(2))}, r"in extras\[1\]"),
])
def test_the_outermost_call_names_the_argument_that_holds_a_nan(args, kwargs, named):
    with pytest.raises(ValueError, match=f"_Inputs got a non-finite value .* {named}"):
        _Inputs()(*args, **kwargs)


def test_inputs_a_layer_lists_as_unchecked_may_hold_inf_and_check_finite_always_checks():
    from diffusion_np.nn import validate

    x = np.ones((2, 3))
    _Inputs()(x, mask=np.full((2, 2), -np.inf))  # an attention mask's -inf: listed, not checked
    layer = _Inputs(inner_check=lambda x: validate.check_finite("a loss inside a call", x * np.nan))
    with pytest.raises(ValueError, match="a loss inside a call got a non-finite value"):
        layer(x)  # check_finite itself runs at any depth; only the layers' own input checks skip
    assert validate.calls.depth == 0
