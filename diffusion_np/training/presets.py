"""Named sizes for the text-to-image tasks: "tiny" (tests), "demo" (minutes), "full" (shipped weights).

A preset fixes the shapes of the networks and the training schedule of one task
(:mod:`diffusion_np.training.tasks`)::

    tiny   a few seconds: tests and `train ... --steps 2` smoke runs; learns nothing useful
    demo   about 10 minutes on 2 CPU cores (``make demo-train``): digits you can recognise,
           a VAE that reconstructs shapes, latent samples with the right colours
    full   the runs behind the shipped weights (diffusion_np/pretrained, ``make demo-train``):
           digits 4000 steps (58 min), shapes-vae 3000 steps (31 min), shapes 4500 steps
           (~60 min), each on one core of a shared 2-core machine; their model cards have the rest

Times were measured with ``OPENBLAS_NUM_THREADS=1`` on a 2-core machine shared with
other jobs: digits U-Net (32, 64) at 8x8, batch 64: 0.75 s a step; shapes VAE
(32, 32, 64), batch 32: 1.1 s; shapes U-Net (64, 128) on 8x8x4 latents, batch 32:
0.7 s. Those numbers set the demo step counts.

Each entry holds only what differs from the task's defaults:

* ``unet``: diffusers ``UNet2DConditionModel`` fields; the task adds ``in_channels``,
  ``out_channels``, ``sample_size`` and ``cross_attention_dim`` (the text encoder's width);
* ``text_encoder``: ``TextEncoderConfig`` fields; the task adds ``vocab_size`` and
  ``max_position_embeddings`` from the tokenizer;
* ``vae``: diffusers ``AutoencoderKL`` fields (shapes-vae only);
* ``train``: :class:`~diffusion_np.training.trainer.TrainConfig` fields;
* ``preview``: how many images and sampler steps a preview PNG uses.

Left out: presets for the toy task (it has one size), and any automatic scaling of
the step count with the machine's speed.
"""

from __future__ import annotations

import copy

__all__ = ["PRESETS", "get_preset"]

_CROSS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
_CROSS_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
_VAE3 = dict(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
             latent_channels=4, sample_size=32)


def _unet(channels, groups, heads, layers=1) -> dict:
    """A U-Net with cross-attention at every level (two levels: 8x8 -> 4x4)."""
    return dict(block_out_channels=channels, layers_per_block=layers, down_block_types=_CROSS,
                up_block_types=_CROSS_UP, norm_num_groups=groups, attention_head_dim=heads)


def _text(hidden, layers, heads) -> dict:
    """A CLIP-shaped text encoder of width ``hidden`` (MLP 2x wide: short captions, small vocabulary)."""
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=2 * hidden)


def _train(steps, batch_size, lr, ema_decay, checkpoint_every, sample_every, warmup=None) -> dict:
    return dict(steps=steps, batch_size=batch_size, lr=lr, ema_decay=ema_decay, weight_decay=1e-2,
                grad_clip=1.0, warmup_steps=warmup if warmup is not None else max(1, steps // 20),
                checkpoint_every=checkpoint_every, sample_every=sample_every)


#: task -> preset name -> {"unet", "text_encoder", "vae", "train", "preview"}
PRESETS: dict[str, dict[str, dict]] = {
    "digits": {
        "tiny": dict(unet=_unet((16, 32), 8, 2), text_encoder=_text(16, 1, 2),
                     train=_train(30, 8, 2e-3, 0.9, 0, 0), preview=dict(n=10, steps=4)),
        "demo": dict(unet=_unet((32, 64), 8, 4), text_encoder=_text(64, 2, 4),
                     train=_train(700, 64, 1e-3, 0.995, 100, 350), preview=dict(n=40, steps=25)),
        "full": dict(unet=_unet((64, 128), 16, 4), text_encoder=_text(64, 2, 4),
                     train=_train(4000, 64, 1e-3, 0.999, 250, 1000), preview=dict(n=100, steps=50)),
    },
    "shapes-vae": {
        "tiny": dict(vae=dict(_VAE3, block_out_channels=(8, 8, 16), norm_num_groups=4),
                     train=_train(30, 4, 2e-3, 0.9, 0, 0), preview=dict(n=4, steps=0)),
        "demo": dict(vae=dict(_VAE3, block_out_channels=(32, 32, 64), norm_num_groups=8),
                     train=_train(500, 32, 1e-3, 0.99, 100, 250), preview=dict(n=8, steps=0)),
        "full": dict(vae=dict(_VAE3, block_out_channels=(32, 32, 64), norm_num_groups=8),
                     train=_train(3000, 32, 1e-3, 0.995, 250, 1000), preview=dict(n=16, steps=0)),
    },
    "shapes": {
        "tiny": dict(unet=_unet((16, 32), 8, 2), text_encoder=_text(16, 1, 2), latent_pool=64,
                     train=_train(30, 8, 2e-3, 0.9, 0, 0), preview=dict(n=4, steps=4)),
        "demo": dict(unet=_unet((64, 128), 16, 4), text_encoder=_text(64, 2, 4), latent_pool=4096,
                     train=_train(700, 32, 1e-3, 0.995, 100, 350), preview=dict(n=16, steps=25)),
        "full": dict(unet=_unet((64, 128), 16, 4), text_encoder=_text(64, 2, 4), latent_pool=16384,
                     train=_train(4500, 64, 1e-3, 0.999, 250, 1000), preview=dict(n=32, steps=50)),
    },
    # the ControlNet's copy of the encoder comes from the base U-Net; a preset sets its conditioning
    # embedding (32x32 control image -> 8x8 latent: three widths, two stride-2 convs) and the schedule
    "shapes-controlnet": {
        "tiny": dict(conditioning_embedding_out_channels=(4, 8, 16), latent_pool=16,
                     train=_train(30, 4, 1e-3, 0.9, 0, 0), preview=dict(n=4, steps=4)),
        "demo": dict(conditioning_embedding_out_channels=(16, 32, 64), latent_pool=4096,
                     train=_train(600, 32, 3e-4, 0.99, 100, 300), preview=dict(n=8, steps=25)),
        "full": dict(conditioning_embedding_out_channels=(16, 32, 64), latent_pool=8192,
                     train=_train(1500, 32, 3e-4, 0.995, 250, 500), preview=dict(n=16, steps=25)),
    },
    # consistency distillation: the student is the teacher's U-Net; a preset sets the schedule and the data pool
    "lcm": {
        "tiny": dict(latent_pool=16, train=_train(4, 4, 1e-4, 0.9, 0, 0), preview=dict(n=4, steps=2)),
        "demo": dict(latent_pool=2048, train=_train(300, 32, 1e-4, 0.99, 100, 150), preview=dict(n=16, steps=4)),
        "full": dict(latent_pool=8192, train=_train(2500, 32, 1e-4, 0.995, 250, 500, warmup=100),
                     preview=dict(n=32, steps=4)),
    },
    # progressive distillation, one round (halving the steps); the preview samples at the student's steps
    "progressive": {
        "tiny": dict(latent_pool=16, train=_train(4, 4, 1e-4, 0.9, 0, 0), preview=dict(n=4)),
        "demo": dict(latent_pool=2048, train=_train(200, 32, 1e-4, 0.99, 100, 100), preview=dict(n=16)),
        "full": dict(latent_pool=8192, train=_train(500, 32, 1e-4, 0.99, 250, 250, warmup=25),
                     preview=dict(n=32)),
    },
}


def get_preset(task: str, name: str) -> dict:
    """A deep copy of preset ``name`` of ``task`` (so callers may change it freely)."""
    if task not in PRESETS:
        raise ValueError(f"no presets for task {task!r}; tasks with presets: {', '.join(PRESETS)}")
    if name not in PRESETS[task]:
        raise ValueError(f"unknown preset {name!r} for {task}; choose one of {', '.join(PRESETS[task])}")
    return copy.deepcopy(PRESETS[task][name])
