"""The parameters of a UNet2DConditionModel, from its configuration alone; and a bar plot of them.

Tutorial 06 uses these to count Stable Diffusion 1.5's 859,520,964 parameters without allocating 3.4 GB,
and to show where in the network they sit. ``unet_param_shapes`` walks a diffusers UNet config in the
order ``UNet2DConditionModel.__init__`` builds the network (diffusers' ``state_dict`` keys, this library's
channels-last conv weights ``(k, k, C_in, C_out)``); ``tests/models/test_unet_params.py`` checks it name by
name and shape by shape against real models. Deliberately left out: the config options the library's U-Net
does not build (class embeddings, addition embeddings, ``only_cross_attention``).
"""

from __future__ import annotations

import numpy as np

# (label, substring of a parameter name that marks it), tested in this order; "" matches everything left
PARAM_KINDS = (("ResNet blocks", ".resnets."), ("transformers", ".attentions."),
               ("down/upsample convs", "samplers."), ("other", ""))


def unet_param_shapes(cfg: dict) -> dict:
    """{state_dict key: shape} of ``UNet2DConditionModel(**cfg)``, from the config (nothing is allocated).

    The rules: a conv ``k x k``, ``C_in -> C_out`` has weight ``(k, k, C_in, C_out)`` and bias ``(C_out,)``;
    a Linear ``in -> out`` has ``(out, in)`` and ``(out,)``; a norm over ``C`` has weight and bias ``(C,)``;
    attention has ``to_q``, ``to_k``, ``to_v`` without bias and ``to_out.0`` with it; up block ``j`` has
    ``layers_per_block + 1`` ResNet blocks, and resnet ``i`` reads ``C_h + C_skip`` channels.
    """
    if not isinstance(cfg, dict) or "block_out_channels" not in cfg:
        raise ValueError(f"cfg must be a UNet config dict with block_out_channels, got {type(cfg).__name__}")
    shapes = {}

    def conv(name, c_in, c_out, k=3):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (k, k, c_in, c_out), (c_out,)

    def linear(name, n_in, n_out, bias=True):
        shapes[f"{name}.weight"] = (n_out, n_in)
        if bias:
            shapes[f"{name}.bias"] = (n_out,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resnet(name, c_in, c_out):
        norm(f"{name}.norm1", c_in)
        conv(f"{name}.conv1", c_in, c_out)
        linear(f"{name}.time_emb_proj", temb_dim, c_out)
        norm(f"{name}.norm2", c_out)
        conv(f"{name}.conv2", c_out, c_out)
        if c_in != c_out:
            conv(f"{name}.conv_shortcut", c_in, c_out, k=1)

    def attention(name, c, kv_dim):
        linear(f"{name}.to_q", c, c, bias=False)
        linear(f"{name}.to_k", kv_dim, c, bias=False)
        linear(f"{name}.to_v", kv_dim, c, bias=False)
        linear(f"{name}.to_out.0", c, c)

    def transformer(name, c, n_layers):
        norm(f"{name}.norm", c)
        proj = linear if cfg.get("use_linear_projection", False) else (lambda n, a, b: conv(n, a, b, k=1))
        proj(f"{name}.proj_in", c, c)
        for k in range(n_layers):
            b = f"{name}.transformer_blocks.{k}"
            norm(f"{b}.norm1", c)
            attention(f"{b}.attn1", c, c)
            norm(f"{b}.norm2", c)
            attention(f"{b}.attn2", c, cfg["cross_attention_dim"])
            norm(f"{b}.norm3", c)
            linear(f"{b}.ff.net.0.proj", c, 2 * 4 * c)  # GEGLU: value and gate
            linear(f"{b}.ff.net.2", 4 * c, c)
        proj(f"{name}.proj_out", c, c)

    ch = list(cfg["block_out_channels"])
    n = len(ch)
    layers = _per_level(cfg.get("layers_per_block", 2), n)
    t_layers = _per_level(cfg.get("transformer_layers_per_block", 1), n)
    temb_dim = 4 * ch[0]
    conv("conv_in", cfg["in_channels"], ch[0])
    linear("time_embedding.linear_1", ch[0], temb_dim)
    linear("time_embedding.linear_2", temb_dim, temb_dim)
    for i, kind in enumerate(cfg["down_block_types"]):
        for r in range(layers[i]):
            resnet(f"down_blocks.{i}.resnets.{r}", ch[max(i - 1, 0)] if r == 0 else ch[i], ch[i])
            if kind.startswith("CrossAttn"):
                transformer(f"down_blocks.{i}.attentions.{r}", ch[i], t_layers[i])
        if i < n - 1:
            conv(f"down_blocks.{i}.downsamplers.0.conv", ch[i], ch[i])
    resnet("mid_block.resnets.0", ch[-1], ch[-1])
    transformer("mid_block.attentions.0", ch[-1], t_layers[-1])
    resnet("mid_block.resnets.1", ch[-1], ch[-1])
    rev = ch[::-1]
    for j, kind in enumerate(cfg["up_block_types"]):
        prev, out, skip_below = rev[max(j - 1, 0)], rev[j], rev[min(j + 1, n - 1)]
        n_res = layers[::-1][j] + 1
        for r in range(n_res):
            c_h = prev if r == 0 else out
            c_skip = skip_below if r == n_res - 1 else out  # the last skip comes from the level below
            resnet(f"up_blocks.{j}.resnets.{r}", c_h + c_skip, out)
            if kind.startswith("CrossAttn"):
                transformer(f"up_blocks.{j}.attentions.{r}", out, t_layers[::-1][j])
        if j < n - 1:
            conv(f"up_blocks.{j}.upsamplers.0.conv", out, out)
    norm("conv_norm_out", ch[0])
    conv("conv_out", ch[0], cfg["out_channels"])
    return shapes


def block_of(name: str) -> str:
    """'down_blocks.1.resnets.0.conv1.weight' -> 'down_blocks.1';  'conv_in.weight' -> 'conv_in'."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]


def kind_of(name: str) -> str:
    """The PARAM_KINDS label of a parameter name: 'ResNet blocks', 'transformers', ... or 'other'."""
    return next(kind for kind, key in PARAM_KINDS if key in name)


def params_per_block(shapes: dict) -> dict:
    """{parameter name: shape} -> {block: number of parameters}, in the order the blocks appear."""
    counts = {}
    for name, shape in shapes.items():
        counts[block_of(name)] = counts.get(block_of(name), 0) + int(np.prod(shape))
    return counts


def params_per_kind(shapes: dict) -> dict:
    """{parameter name: shape} -> {PARAM_KINDS label: share of all parameters}."""
    total = sum(int(np.prod(s)) for s in shapes.values())
    return {kind: sum(int(np.prod(s)) for name, s in shapes.items() if kind_of(name) == kind) / total
            for kind, _ in PARAM_KINDS}


def plot_param_bars(shapes: dict, ax, title: str):
    """Stacked bars on ``ax``: parameters per block, split by kind of layer."""
    blocks = list(params_per_block(shapes))
    bottom = np.zeros(len(blocks))
    for kind, _ in PARAM_KINDS:
        n = np.zeros(len(blocks))
        for name, shape in shapes.items():
            if kind_of(name) == kind:
                n[blocks.index(block_of(name))] += np.prod(shape)
        ax.bar(range(len(blocks)), n, bottom=bottom, label=kind)
        bottom += n
    ax.set_xticks(range(len(blocks)), blocks, rotation=60, ha="right", fontsize=8)
    ax.set(title=title, ylabel="parameters")
    ax.legend(fontsize=8)


def _per_level(value, n: int) -> list:
    """An int repeated for each of the n levels, or a per-level tuple's entries."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * n
