"""diffusers ``config.json`` -> :class:`~diffusion_np.models.config.UNetConfig` / ``VAEConfig`` / ``ControlNetConfig``.

A diffusers model config carries every field of its class, most of which Stable
Diffusion 1.x leaves at their defaults. Each field is one of:

* a field of our config dataclass: passed on (the dataclass validates it);
* in ``*_UNSUPPORTED``: a feature we do not implement; accepted only at the value
  that switches it off (diffusers' default), otherwise a ValueError names it;
* in ``*_IGNORED``: changes nothing in the network we build; accepted with any value;
* anything else: a ValueError naming the unknown field.

Keys starting with ``_`` (``_class_name``, ``_diffusers_version``) are bookkeeping and skipped.
"""

from __future__ import annotations

from diffusion_np.models.config import ControlNetConfig, UNetConfig, VAEConfig, field_names

#: diffusers U-Net fields we do not implement, with the only value we accept (diffusers' default).
UNET_UNSUPPORTED = {
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,  # diffusers itself refuses it; attention_head_dim carries the heads
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
}

#: diffusers U-Net fields that change nothing for the block types we build, accepted with any value:
#: skip_time_act and out_scale_factor reach only the Resnet*/Simple* block types, the next two
#: only the "simple" mid block and the text addition embedding, and upcast_attention only
#: changes float16 models (it computes the scores in float32, which we always do).
UNET_IGNORED = (
    "resnet_skip_time_act",
    "resnet_out_scale_factor",
    "cross_attention_norm",
    "mid_block_only_cross_attention",
    "addition_embed_type_num_heads",
    "upcast_attention",
)

#: diffusers AutoencoderKL fields that we accept but that change nothing in the model itself
VAE_IGNORED = ("force_upcast", "latents_mean", "latents_std")


def _split(config: dict, ours: tuple, unsupported: dict, ignored: tuple, model: str) -> dict:
    """Our fields of ``config``; refuses unknown fields and unsupported values, naming them."""
    fields = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(k for k in fields if k not in ours and k not in unsupported and k not in ignored)
    if unknown:
        raise ValueError(f"{model}: unknown config field(s) {', '.join(unknown)}")
    refused = [f"{k}={v!r} (only {unsupported[k]!r} is supported)"
               for k, v in fields.items() if k in unsupported and v != unsupported[k]]
    if refused:
        raise ValueError(f"{model} does not support " + "; ".join(refused))
    return {k: v for k, v in fields.items() if k in ours}


def unet_config(config: dict) -> UNetConfig:
    """A :class:`UNetConfig` from a diffusers ``unet/config.json`` (parsed) or any dict of its fields."""
    return UNetConfig(**_split(config, field_names(UNetConfig), UNET_UNSUPPORTED, UNET_IGNORED,
                               "UNet2DConditionModel"))


def vae_config(config: dict) -> VAEConfig:
    """A :class:`VAEConfig` from a diffusers ``vae/config.json`` (parsed) or any dict of its fields."""
    return VAEConfig(**_split(config, field_names(VAEConfig), {}, VAE_IGNORED, "AutoencoderKL"))


#: diffusers ControlNetModel fields we do not implement, with the only value we accept (diffusers' default)
CONTROLNET_UNSUPPORTED = {
    **{k: UNET_UNSUPPORTED[k] for k in ("encoder_hid_dim", "encoder_hid_dim_type", "num_attention_heads",
                                        "class_embed_type", "addition_embed_type", "addition_time_embed_dim",
                                        "num_class_embeds", "resnet_time_scale_shift",
                                        "projection_class_embeddings_input_dim")},
    "global_pool_conditions": False,
}
#: ControlNetModel fields that change nothing in the network we build (see UNET_IGNORED; sample_size
#: appears in some older ControlNet configs and is read by nothing)
CONTROLNET_IGNORED = ("upcast_attention", "addition_embed_type_num_heads", "sample_size")


def controlnet_config(config: dict) -> ControlNetConfig:
    """A :class:`ControlNetConfig` from a diffusers ControlNet ``config.json`` (parsed) or any dict of its fields."""
    return ControlNetConfig(**_split(config, field_names(ControlNetConfig), CONTROLNET_UNSUPPORTED,
                                     CONTROLNET_IGNORED, "ControlNetModel"))
