"""The sizes of the U-Net, the VAE and the text encoder: validated dataclasses, apart from the networks.

:class:`UNetConfig` and :class:`VAEConfig` hold the fields that change the network, with
diffusers' names and defaults (Stable Diffusion 1.x's U-Net; a one-level VAE);
:class:`TextEncoderConfig` those of transformers' ``CLIPTextConfig``. Each checks its
fields when it is made, so a wrong size fails here with the field's name instead of
deep inside a constructor. ``UNet2DConditionModel(config)``, ``AutoencoderKL(config)`` and
``TextEncoder(config)`` build from them; ``to_dict()`` is what a checkpoint stores.

A diffusers ``config.json`` has more fields than these: the ones we refuse (SDXL's class
embeddings, ...) or accept and ignore (``upcast_attention``, ...) are listed, and mapped
onto these dataclasses, in :mod:`diffusion_np.io.diffusers_config`.

One naming trap, kept for compatibility: diffusers' ``attention_head_dim`` is the *number
of heads*, not their width (diffusers issue #2011); each block then uses heads of
``channels // attention_head_dim`` channels. Stable Diffusion 1.x: 8 heads everywhere;
2.x: ``attention_head_dim=(5, 10, 20, 20)`` heads of 64 channels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from diffusion_np.models.tokenizer import EOS_ID

#: diffusers' block-type names -> does the block have cross-attention (DownBlock2D / UpBlock2D's switch)
DOWN_BLOCK_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
UP_BLOCK_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)

#: the fields that may be one value for every level or a tuple with one value per level
_PER_LEVEL = ("only_cross_attention", "layers_per_block", "transformer_layers_per_block", "attention_head_dim")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _positive_int(owner: str, name: str, value, allow_none: bool = False) -> None:
    """TypeError for a value that is not an int (a bool is not one), ValueError for one below 1."""
    if value is None and allow_none:
        return
    if not _is_int(value):
        raise TypeError(f"{owner}: {name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def _tuple_of_str(owner: str, name: str, value) -> tuple:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{owner}: {name} must be a list or tuple of block-type names, got {value!r}")
    return tuple(value)


def _channels(owner: str, value) -> tuple:
    if not isinstance(value, (list, tuple)) or not all(_is_int(c) for c in value):
        raise TypeError(f"{owner}: block_out_channels must be a non-empty tuple of positive ints, got {value!r}")
    if not value or min(value) < 1:
        raise ValueError(f"{owner}: block_out_channels must be a non-empty tuple of positive ints, got {value!r}")
    return tuple(int(c) for c in value)


@dataclass(frozen=True)
class UNetConfig:
    """The fields of :class:`~diffusion_np.models.UNet2DConditionModel`; names and defaults as diffusers'.

    ``attention_head_dim`` is the number of heads (see the module docstring). The four
    per-level fields (``layers_per_block``, ``attention_head_dim``,
    ``transformer_layers_per_block``, ``only_cross_attention``) take one value or a tuple
    with one entry per level; :meth:`per_level` expands them. Lists become tuples.
    """

    sample_size: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                               "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: bool | tuple = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int | tuple = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple = 1
    attention_head_dim: int | tuple = 8
    use_linear_projection: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    def __post_init__(self) -> None:
        name = "UNetConfig"
        # lists (a parsed config.json) become tuples, so a config compares equal to its saved copy
        set_ = object.__setattr__  # the dataclass is frozen
        set_(self, "down_block_types", _tuple_of_str(name, "down_block_types", self.down_block_types))
        set_(self, "up_block_types", _tuple_of_str(name, "up_block_types", self.up_block_types))
        set_(self, "block_out_channels", _channels(name, self.block_out_channels))
        for field in _PER_LEVEL:
            if isinstance(getattr(self, field), list):
                set_(self, field, tuple(getattr(self, field)))

        down, up, n = self.down_block_types, self.up_block_types, self.num_levels
        bad = [t for t in down if t not in DOWN_BLOCK_TYPES] + [t for t in up if t not in UP_BLOCK_TYPES]
        if bad:
            raise ValueError(
                f"{name}: unsupported block type(s) {bad}; down blocks may be {tuple(DOWN_BLOCK_TYPES)}, "
                f"up blocks {tuple(UP_BLOCK_TYPES)}"
            )
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(
                f"{name}: unsupported mid_block_type {self.mid_block_type!r}; use one of {MID_BLOCK_TYPES}"
            )
        if len(down) != n or len(up) != n:
            raise ValueError(
                f"{name}: down_block_types ({len(down)}), up_block_types ({len(up)}) and "
                f"block_out_channels ({n}) must have the same length"
            )
        for field in ("in_channels", "out_channels", "conv_in_kernel", "conv_out_kernel"):
            _positive_int(name, field, getattr(self, field))
        _positive_int(name, "time_embedding_dim", self.time_embedding_dim, allow_none=True)
        if self.norm_num_groups is None:
            raise ValueError(f"{name}: norm_num_groups=None (no output norm) is not supported")
        _positive_int(name, "norm_num_groups", self.norm_num_groups)
        if not _is_int(self.cross_attention_dim):
            raise ValueError(f"{name}: cross_attention_dim must be one int, got {self.cross_attention_dim!r}")
        if any(self.per_level("only_cross_attention")):
            raise ValueError(f"{name}: only_cross_attention=True is not supported")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"{name}: act_fn='silu' only is supported, got {self.act_fn!r}")
        if self.time_embedding_type != "positional":
            raise ValueError(
                f"{name}: time_embedding_type='positional' only is supported, got {self.time_embedding_type!r}"
            )
        if self.conv_in_kernel % 2 == 0 or self.conv_out_kernel % 2 == 0:
            raise ValueError(f"{name}: conv_in_kernel and conv_out_kernel must be odd")
        for field in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
            for value in self.per_level(field):
                _positive_int(name, field, value)
        for level, (h, c) in enumerate(zip(self.per_level("attention_head_dim"), self.block_out_channels)):
            if c % h != 0:
                raise ValueError(
                    f"{name}: block_out_channels[{level}]={c} is not divisible by "
                    f"attention_head_dim[{level}]={h} (diffusers' attention_head_dim is the number of heads)"
                )

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    def per_level(self, field: str) -> list:
        """One value of a per-level field for every level: an int repeated, or the tuple's entries."""
        if field not in _PER_LEVEL:
            raise ValueError(f"UNetConfig.per_level: {field!r} is not one of the per-level fields {_PER_LEVEL}")
        value, n = getattr(self, field), self.num_levels
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(f"UNetConfig: {field} has {len(value)} entries for {n} levels: {value}")
            return list(value)
        return [value] * n

    def to_dict(self) -> dict:
        """A dict of every field (diffusers' names); ``UNetConfig(**d)`` reads it back."""
        return asdict(self)


@dataclass(frozen=True)
class VAEConfig:
    """The fields of :class:`~diffusion_np.models.AutoencoderKL`; names and defaults as diffusers'.

    Every level is a ``DownEncoderBlock2D`` in the encoder and an ``UpDecoderBlock2D`` in
    the decoder (the only block types Stable Diffusion's VAE uses). Lists become tuples.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        name = "VAEConfig"
        set_ = object.__setattr__  # the dataclass is frozen
        set_(self, "down_block_types", _tuple_of_str(name, "down_block_types", self.down_block_types))
        set_(self, "up_block_types", _tuple_of_str(name, "up_block_types", self.up_block_types))
        set_(self, "block_out_channels", _channels(name, self.block_out_channels))
        down, up, n = self.down_block_types, self.up_block_types, len(self.block_out_channels)
        bad = [t for t in down if t != "DownEncoderBlock2D"] + [t for t in up if t != "UpDecoderBlock2D"]
        if bad:
            raise ValueError(
                f"{name}: unsupported block type(s) {bad}; down blocks must be 'DownEncoderBlock2D' "
                "and up blocks 'UpDecoderBlock2D'"
            )
        if len(down) != n or len(up) != n:
            raise ValueError(
                f"{name}: down_block_types ({len(down)}), up_block_types ({len(up)}) and "
                f"block_out_channels ({n}) must have the same length"
            )
        for field in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            _positive_int(name, field, getattr(self, field))
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"{name}: act_fn='silu' only is supported, got {self.act_fn!r}")
        odd = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if odd:
            raise ValueError(
                f"{name}: every block_out_channels entry must be divisible by "
                f"norm_num_groups={self.norm_num_groups}, got {self.block_out_channels}"
            )
        if not self.scaling_factor > 0:
            raise ValueError(f"{name}: scaling_factor must be > 0, got {self.scaling_factor!r}")

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    def to_dict(self) -> dict:
        """A dict of every field (diffusers' names); ``VAEConfig(**d)`` reads it back."""
        return asdict(self)


@dataclass(frozen=True)
class ControlNetConfig:
    """The fields of :class:`~diffusion_np.models.controlnet.ControlNetModel`; names and defaults as
    diffusers' ``ControlNetModel`` (Stable Diffusion 1.x's ControlNets).

    The down path and the middle block copy a U-Net's, so their fields are the U-Net's
    (:meth:`unet_config` is the :class:`UNetConfig` of that encoder, and validates them);
    the ControlNet adds the control image's ``conditioning_channels``, the widths of its
    small encoder (``conditioning_embedding_out_channels``: one stride-2 conv between
    consecutive entries, so the control image is ``2 ** (len - 1)`` times the latent's side)
    and the order of the control image's channels. ``layers_per_block`` is one int, as in
    diffusers' ControlNet.
    """

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                               "DownBlock2D")
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool | tuple = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple = 1
    attention_head_dim: int | tuple = 8
    use_linear_projection: bool = False
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)

    def __post_init__(self) -> None:
        name = "ControlNetConfig"
        set_ = object.__setattr__  # the dataclass is frozen
        set_(self, "conditioning_embedding_out_channels",
             _embedding_channels(name, self.conditioning_embedding_out_channels))
        set_(self, "down_block_types", _tuple_of_str(name, "down_block_types", self.down_block_types))
        set_(self, "block_out_channels", _channels(name, self.block_out_channels))
        for field in ("only_cross_attention", "transformer_layers_per_block", "attention_head_dim"):
            if isinstance(getattr(self, field), list):
                set_(self, field, tuple(getattr(self, field)))
        _positive_int(name, "conditioning_channels", self.conditioning_channels)
        _positive_int(name, "layers_per_block", self.layers_per_block)
        if len(self.down_block_types) != len(self.block_out_channels):
            raise ValueError(f"{name}: down_block_types ({len(self.down_block_types)}) and block_out_channels "
                             f"({len(self.block_out_channels)}) must have the same length")
        if self.mid_block_type != "UNetMidBlock2DCrossAttn":
            raise ValueError(f"{name}: mid_block_type 'UNetMidBlock2DCrossAttn' only is supported, "
                             f"got {self.mid_block_type!r}")
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(f"{name}: controlnet_conditioning_channel_order must be 'rgb' or 'bgr', "
                             f"got {self.controlnet_conditioning_channel_order!r}")
        try:
            self.unet_config()  # the encoder's fields, checked as a U-Net's
        except (TypeError, ValueError) as err:
            raise type(err)(str(err).replace("UNetConfig", name)) from None

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def conditioning_downscale(self) -> int:
        """Control image side / latent side: one stride-2 conv per step of ``conditioning_embedding_out_channels``."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def unet_config(self) -> UNetConfig:
        """The :class:`UNetConfig` of a U-Net with this down path and middle block (its up path mirrors
        the down path): what the ControlNet copies, and what ``from_unet`` compares with."""
        mirror = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
        shared = {f.name: getattr(self, f.name) for f in fields(UNetConfig) if hasattr(self, f.name)}
        up = tuple(mirror.get(t, t) for t in reversed(self.down_block_types))
        return UNetConfig(**shared, out_channels=self.in_channels, up_block_types=up)

    def to_dict(self) -> dict:
        """A dict of every field (diffusers' names); ``ControlNetConfig(**d)`` reads it back."""
        return asdict(self)


def _embedding_channels(owner: str, value) -> tuple:
    if not isinstance(value, (list, tuple)) or not value or not all(_is_int(c) and c >= 1 for c in value):
        raise ValueError(f"{owner}: conditioning_embedding_out_channels must be a non-empty tuple of positive ints, "
                         f"got {value!r}")
    return tuple(int(c) for c in value)


#: the text encoder's activations (transformers' ACT2FN names; text_encoder.ACTIVATIONS maps them to modules)
HIDDEN_ACTS = ("quick_gelu", "gelu", "gelu_pytorch_tanh")


@dataclass(frozen=True)
class TextEncoderConfig:
    """Sizes of the text encoder; field names and defaults as transformers' ``CLIPTextConfig``.

    Stable Diffusion 1.5 (CLIP ViT-L/14): vocab_size=49408, hidden_size=768,
    num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2 (see
    :func:`~diffusion_np.models.text_encoder.eos_positions`).

    ``eos_token_id`` defaults to the <eos> id of :class:`~diffusion_np.models.tokenizer.WordTokenizer`;
    it is used only for the pooled output.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = EOS_ID

    def __post_init__(self) -> None:
        sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings")
        for name in sizes:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"TextEncoderConfig: {name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"TextEncoderConfig: hidden_size={self.hidden_size} must be divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"TextEncoderConfig: hidden_act must be one of {sorted(HIDDEN_ACTS)}, "
                             f"got {self.hidden_act!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"TextEncoderConfig: layer_norm_eps must be > 0, got {self.layer_norm_eps}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        """JSON-ready dict; ``TextEncoderConfig(**d)`` reads it back."""
        return asdict(self)


def given_config(model: str, config_class, config, fields: dict):
    """The config a model's constructor got: a TypeError unless it is a ``config_class`` given alone."""
    if not isinstance(config, config_class):
        raise TypeError(
            f"{model} expects a {config_class.__name__}, got {type(config).__name__} "
            f"(a dict goes through {model}.from_config)"
        )
    if fields:
        raise TypeError(f"{model}: pass a {config_class.__name__} or fields, not both (got {sorted(fields)})")
    return config


def field_names(config_class) -> tuple:
    """The field names of :class:`UNetConfig` or :class:`VAEConfig`."""
    return tuple(f.name for f in fields(config_class))
