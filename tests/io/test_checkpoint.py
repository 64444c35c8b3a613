"""Checkpoints: exact round trips, atomic replacement, clear refusals."""

import json
from pathlib import Path

import numpy as np
import pytest

from diffusion_np.io import CheckpointError, load_checkpoint, save_checkpoint
from diffusion_np.io import checkpoint as ckpt_module
from diffusion_np.models.toy_mlp import ToyDenoiser
from diffusion_np.nn.losses import mse_loss_backward, mse_loss_forward
from diffusion_np.optim import EMA, Adam, LRScheduler, linear_warmup_cosine


def _model(seed=0, hidden=16):
    return ToyDenoiser(hidden=hidden, depth=2, time_dim=8, rng=np.random.default_rng(seed))


def _trained(seed=0, steps=3):
    """A model, Adam, scheduler, EMA and generator after a few real steps."""
    rng = np.random.default_rng(seed)
    model = _model(seed)
    opt = Adam(model, lr=1e-2)
    sched = LRScheduler(opt, linear_warmup_cosine, base_lr=1e-2, warmup_steps=2, total_steps=10)
    ema = EMA(model, decay=0.9)
    for _ in range(steps):
        x = rng.standard_normal((8, 2)).astype(np.float32)
        t = rng.integers(0, 1000, 8)
        opt.zero_grad()
        loss, cache = mse_loss_forward(model(x, t), x)
        model.backward(mse_loss_backward(cache))
        opt.step()
        sched.step()
        ema.update()
    state = {
        "step": steps,
        "optimizer": opt.state_dict(),
        "lr_scheduler": sched.state_dict(),
        "ema": ema.state_dict(),
        "rng": rng.bit_generator.state,
    }
    return model, opt, sched, ema, rng, state


def _weights(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


def test_round_trip_restores_weights_optimizer_ema_scheduler_and_rng(tmp_path):
    model, opt, sched, ema, rng, state = _trained()
    save_checkpoint(tmp_path / "ck", {"denoiser": model}, {"hidden": 16}, state)
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.config == {"hidden": 16}
    assert ck.training_state["step"] == 3

    model2, opt2, sched2, ema2, rng2, _ = _trained(seed=1, steps=1)  # different everything
    ck.load_weights({"denoiser": model2})
    opt2.load_state_dict(ck.training_state["optimizer"])
    sched2.load_state_dict(ck.training_state["lr_scheduler"])
    ema2.load_state_dict(ck.training_state["ema"])
    rng2.bit_generator.state = ck.training_state["rng"]

    for name, value in model.state_dict().items():
        assert np.array_equal(model2.state_dict()[name], value) and model2.state_dict()[name].dtype == value.dtype
        assert np.array_equal(ema2.shadow[name], ema.shadow[name])
        for buf in ("exp_avg", "exp_avg_sq"):
            assert np.array_equal(opt2.state[name][buf], opt.state[name][buf])
    assert opt2.step_count == opt.step_count and opt2.betas == opt.betas
    assert sched2.last_step == sched.last_step and opt2.lr == opt.lr
    assert ema2.num_updates == ema.num_updates
    assert np.array_equal(rng2.standard_normal(5), rng.standard_normal(5))  # the same stream continues


def test_files_are_safetensors_and_json_named_by_module(tmp_path):
    from safetensors.numpy import load_file

    model = _model()
    save_checkpoint(tmp_path / "ck", {"unet": model}, {"a": 1})
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["config.json", "unet.safetensors"]
    stored = load_file(tmp_path / "ck" / "unet.safetensors")
    assert set(stored) == set(model.state_dict())  # keys are our state_dict names
    header = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert header["format"] == "diffusion_np.checkpoint" and header["config"] == {"a": 1}
    assert load_checkpoint(tmp_path / "ck").training_state is None


def test_float16_for_shipping_and_refused_with_a_training_state(tmp_path):
    model = _model()
    save_checkpoint(tmp_path / "ck", {"m": model}, {}, dtype=np.float16)
    ck = load_checkpoint(tmp_path / "ck")
    assert all(v.dtype == np.float16 for v in ck.weights["m"].values())
    fresh = _model(seed=5)
    ck.load_weights({"m": fresh})  # cast back to the model's float32
    w = model.state_dict()["out.weight"]
    assert fresh.state_dict()["out.weight"].dtype == np.float32
    assert np.allclose(fresh.state_dict()["out.weight"], w, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="save it without dtype"):
        save_checkpoint(tmp_path / "ck2", {"m": model}, {}, {"step": 1}, dtype=np.float16)


def test_failure_mid_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    old_model, *_, old_state = _trained(seed=0)
    save_checkpoint(tmp_path / "ck", {"denoiser": old_model}, {"version": "old"}, old_state)
    new_model, *_, new_state = _trained(seed=1)

    written = []
    real_write = ckpt_module._write_bytes

    def failing_write(path, data):
        if len(written) == 2:
            raise OSError("disk full (injected)")
        written.append(path.name)
        real_write(path, data)

    monkeypatch.setattr(ckpt_module, "_write_bytes", failing_write)
    with pytest.raises(OSError, match="injected"):
        save_checkpoint(tmp_path / "ck", {"denoiser": new_model}, {"version": "new"}, new_state)
    assert len(written) == 2  # the failure really came mid-write

    ck = load_checkpoint(tmp_path / "ck")
    assert ck.config == {"version": "old"}
    for name, value in old_model.state_dict().items():
        assert np.array_equal(ck.weights["denoiser"][name], value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary directory left behind

    monkeypatch.setattr(ckpt_module, "_write_bytes", real_write)  # and a later save replaces it completely
    save_checkpoint(tmp_path / "ck", {"denoiser": new_model}, {"version": "new"}, new_state)
    assert load_checkpoint(tmp_path / "ck").config == {"version": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_crash_between_the_two_renames_keeps_the_old_checkpoint_and_says_where(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "ck", {"m": _model(0)}, {"version": "old"})
    real_rename = ckpt_module.os.rename
    calls = []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new directory's move into place
            raise OSError("power cut (injected)")
        real_rename(src, dst)

    monkeypatch.setattr(ckpt_module.os, "rename", rename)
    with pytest.raises(OSError, match="injected"):
        save_checkpoint(tmp_path / "ck", {"m": _model(1)}, {"version": "new"})
    monkeypatch.setattr(ckpt_module.os, "rename", real_rename)
    with pytest.raises(CheckpointError, match=r"previous checkpoint in .*\.ck\.old"):
        load_checkpoint(tmp_path / "ck")
    assert load_checkpoint(tmp_path / ".ck.old").config == {"version": "old"}


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth", ".pkl"])
def test_pickle_files_are_refused_with_the_reason(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04K\x01.")  # a valid pickle of the int 1; it must not be opened
    with pytest.raises(CheckpointError, match="executes arbitrary code"):
        load_checkpoint(path)


def test_directory_of_pickles_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin is a pickle-based file.*arbitrary code"):
        load_checkpoint(tmp_path)


def test_clear_errors_for_missing_and_broken_checkpoints(tmp_path):
    with pytest.raises(TypeError, match="checkpoint directory must be a str or path, got NoneType"):
        load_checkpoint(None)  # was pathlib's TypeError from inside
    with pytest.raises(CheckpointError, match="no checkpoint at .*nowhere"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(CheckpointError, match="not a diffusion_np checkpoint"):
        load_checkpoint(tmp_path / "other")

    save_checkpoint(tmp_path / "ck", {"m": _model()}, {}, {"step": 1, "x": np.zeros(3)})
    (tmp_path / "ck" / "training_state.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError, match="training_state.safetensors is not a valid safetensors file"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "m.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"m\.safetensors is missing"):
        load_checkpoint(tmp_path / "ck")


def test_key_mismatch_lists_the_keys(tmp_path):
    save_checkpoint(tmp_path / "ck", {"m": _model(hidden=16)}, {})
    ck = load_checkpoint(tmp_path / "ck")
    wider = ToyDenoiser(hidden=32, depth=2, time_dim=8)
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*shape mismatches: layers\.0\.weight"):
        ck.load_weights({"m": wider})
    deeper = ToyDenoiser(hidden=16, depth=3, time_dim=8)
    with pytest.raises(CheckpointError, match=r"missing keys: layers\.2\.weight"):
        ck.load_weights({"m": deeper})
    with pytest.raises(CheckpointError, match="no weights for vae; it holds m"):
        ck.load_weights({"vae": _model()})


def test_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("precious")
    with pytest.raises(CheckpointError, match="refusing to replace"):
        save_checkpoint(tmp_path / "docs", {"m": _model()}, {})
    assert (tmp_path / "docs" / "thesis.tex").read_text() == "precious"


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="becomes a file name"):
        save_checkpoint(tmp_path / "ck", {"../evil": _model()}, {})
    with pytest.raises(TypeError, match="diffusion_np Module"):
        save_checkpoint(tmp_path / "ck", {"m": object()}, {})
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tmp_path / "ck", {"m": _model()}, {"when": object()})
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tmp_path / "ck", {"m": _model()}, {}, {"loss": float("nan")})
    assert not (tmp_path / "ck").exists()


@pytest.mark.gpu
def test_cupy_model_saves_and_loads_into_numpy(tmp_path):
    model = _model()
    expected = _weights(model)
    model.to("cupy")
    save_checkpoint(tmp_path / "ck", {"m": model}, {})
    fresh = _model(seed=3)
    load_checkpoint(tmp_path / "ck").load_weights({"m": fresh})
    for name, value in expected.items():
        assert np.array_equal(fresh.state_dict()[name], value)


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda h: h.pop("modules"), '"modules" must map module names'),
        (lambda h: h.update(modules=[1, 2]), r"got \[1, 2\]"),
        (lambda h: h.update(modules={"m": "../m.safetensors"}), '"modules" must map'),
        (lambda h: h.pop("config"), '"config" must be a JSON object, got None'),
        (lambda h: h.update(config=[1]), '"config" must be a JSON object'),
    ],
)
def test_an_edited_header_is_one_clear_checkpoint_error(tmp_path, edit, fragment):
    save_checkpoint(tmp_path / "ck", {"m": _model()}, {"a": 1})
    path = tmp_path / "ck" / "config.json"
    header = json.loads(path.read_text())
    edit(header)
    path.write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match=fragment):
        load_checkpoint(tmp_path / "ck")


def test_writable_path_names_the_argument(tmp_path):
    writable_path = ckpt_module.writable_path
    assert writable_path(tmp_path / "a.png", "-o") == tmp_path / "a.png"
    assert writable_path(tmp_path / "new" / "deeper", "--out", directory=True) == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    (tmp_path / "file").write_text("x")
    for path, directory, fragment in [
        (tmp_path, False, "-o .* is a directory; give a file name"),
        (tmp_path / "missing" / "a.png", False, "-o .*the directory .*missing does not exist"),
        (tmp_path / "file", True, "-o .*file is a file, not a directory"),
        (tmp_path / "file" / "sub", True, "-o .*file is a file, not a directory"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            writable_path(path, "-o", directory=directory)
    if Path("/proc/self").is_dir():  # nothing can be created in /proc, even by root
        with pytest.raises(ValueError, match=r"--json /proc/x.json cannot be written"):
            writable_path("/proc/x.json", "--json")
        with pytest.raises(ValueError, match=r"--out /proc/a/b cannot be written"):
            writable_path("/proc/a/b", "--out", directory=True)
