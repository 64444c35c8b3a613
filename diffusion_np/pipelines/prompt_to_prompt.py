"""Prompt-to-prompt editing (Hertz et al. 2022, "Prompt-to-Prompt Image Editing with Cross Attention
Control"): change one word of the caption and keep the rest of the picture.

Generating from the same noise with an edited caption ("a small red circle ..." -> "a small blue
circle ...") changes more than the colour: the whole trajectory depends on the text, so the
object may move or change shape. Prompt-to-prompt's observation (Sec. 3) is that the *layout*
lives in the cross-attention maps, the probabilities P = softmax(q k^T / sqrt(d)) with which every
pixel attends to every token. So the source caption and the edited caption are sampled together,
from the same noise, and for the first steps the edited run uses the source run's maps::

    word swap (Sec. 3.2):      P_edit <- P_source      in every cross-attention layer, steps < tau_c N
                               (and in self-attention, steps < tau_s N: the paper's Sec. 4 "attention
                               injection" of self-attention maps keeps the shapes' geometry)
    re-weighting (Sec. 3.2):   P_edit[..., j] <- c P_edit[..., j]   for the token j of one word

Swapping the maps is only meaningful when the two captions' tokens line up (here: the same number
of words, so token j of one is token j of the other). The values V still come from each caption's
own text, so the swapped word's meaning flows in through V while the maps (where each pixel looks)
are the source's. After tau_c N steps the edited run goes on alone and can fix details.

How the maps are reached: :class:`~diffusion_np.nn.attention.Attention` has a hook attribute,
``attention_edit``; with it set, the layer hands its probabilities (B, heads, N, L) to the hook
before they weight the values. :class:`AttentionEdit` is that hook. The batch is laid out as the
guided denoiser stacks it: [unconditional rows, conditional rows], each [source captions, edited
captions]; the hook copies source rows onto edited rows. The default path of every layer is
unchanged (the hook is None outside :func:`prompt_to_prompt`).

Left out: the paper's refinement edit (added words, with an alignment of tokens), local blending,
null-text inversion (an inverted image is edited from plain DDIM inversion's noise, with the
reconstruction error of :mod:`~diffusion_np.pipelines.inversion`).
"""

from __future__ import annotations

import numpy as np

from diffusion_np.backend import default_rng
from diffusion_np.nn.attention import Attention
from diffusion_np.nn.module import inference_mode
from diffusion_np.samplers.loop import sample

__all__ = ["AttentionEdit", "prompt_to_prompt", "token_position"]


class AttentionEdit:
    """The ``attention_edit`` hook of prompt-to-prompt, for ``n`` (source, edited) pairs.

    Parameters
    ----------
    n : number of caption pairs; the batch holds 2n rows per guidance branch (sources first).
    cross_steps : steps during which the edited rows take the source's cross-attention maps.
    self_steps : steps during which they take its self-attention maps.
    reweight : optional (token position, c): the edited rows' attention to that token times c
        (conditional branch only), at every step.

    Notes
    -----
    ``step`` counts the sampler's steps; :func:`prompt_to_prompt` advances it.
    """

    def __init__(self, n: int, cross_steps: int, self_steps: int, reweight: tuple[int, float] | None = None):
        self.n, self.cross_steps, self.self_steps, self.reweight = int(n), int(cross_steps), int(self_steps), reweight
        self.step = 0

    def __call__(self, probs, self_attention: bool):
        B = probs.shape[0]
        if B % (2 * self.n):
            raise ValueError(f"AttentionEdit: a batch of {B} rows is not [sources, edits] for {self.n} pairs")
        # (B, heads, N, L) -> (branches, 2, n, heads, N, L): branch = unconditional / conditional
        view = probs.reshape(B // (2 * self.n), 2, self.n, *probs.shape[1:])
        if self.step < (self.self_steps if self_attention else self.cross_steps):
            view[:, 1] = view[:, 0]  # the edited captions' pixels look where the source's looked
        if self.reweight is not None and not self_attention:
            j, c = self.reweight
            view[-1, 1, ..., j] *= c  # the conditional branch's edited rows: one token's column times c
        return probs

    def __repr__(self) -> str:
        return f"AttentionEdit(n={self.n}, cross_steps={self.cross_steps}, self_steps={self.self_steps}, " \
               f"reweight={self.reweight})"


def token_position(tokenizer, prompt: str, word: str) -> int:
    """Index of ``word`` in the tokenizer's ids of ``prompt`` (after <bos>); ValueError if absent."""
    words = tokenizer.split(prompt)
    if word.lower() not in words:
        raise ValueError(f"{word!r} is not a word of {prompt!r}")
    return 1 + words.index(word.lower())  # +1: <bos> comes first


def prompt_to_prompt(model, source_prompts, edit_prompts, steps: int = 25, guidance_scale: float = 4.0,
                     cross_replace: float = 0.8, self_replace: float = 0.4, reweight: tuple[str, float] | None = None,
                     seed: int = 0, noise=None, progress: bool = False):
    """Sample each source caption and its edit from the same noise, the edit under the source's
    attention maps (module docstring); DDIM, eta = 0.

    Parameters
    ----------
    model : TextToImageModel (``pretrained:shapes``)
    source_prompts, edit_prompts : lists of captions, pairwise with the same number of words
    steps, guidance_scale : DDIM steps and classifier-free guidance w
    cross_replace, self_replace : tau_c and tau_s, the fractions of the steps with injected
        cross- and self-attention maps
    reweight : optional (word, c): scale the edited caption's attention to ``word`` by c
    seed : seeds the shared initial noise
    noise : (n, h, w, C), optional: replaces the seeded noise (e.g. DDIM inversion's)
    progress : show a progress bar

    Returns
    -------
    (source images, edited images), each (n, H, W, C) float32 in [-1, 1] on the host.
    """
    sources, edits = list(source_prompts), list(edit_prompts)
    if len(sources) != len(edits) or not sources:
        raise ValueError(f"give one edited caption per source caption, got {len(sources)} and {len(edits)}")
    tok = model.tokenizer
    for s, e in zip(sources, edits):
        if len(tok.split(s)) != len(tok.split(e)):
            raise ValueError(f"prompt-to-prompt swaps words: {s!r} and {e!r} must have as many words")
    if not 0.0 <= cross_replace <= 1.0 or not 0.0 <= self_replace <= 1.0:
        raise ValueError(f"cross_replace and self_replace must be in [0, 1], got {cross_replace}, {self_replace}")
    n = len(sources)
    pipe = model.pipeline("ddim")
    shape = pipe._sample_shape(2 * n, None, None)
    if noise is None:
        noise = default_rng(seed).standard_normal((n, *shape[1:]))
    noise = np.asarray(noise)
    if noise.shape != (n, *shape[1:]):
        raise ValueError(f"noise must be {(n, *shape[1:])}, got {noise.shape}")
    weight = None
    if reweight is not None:
        weight = (token_position(tok, edits[0], reweight[0]), float(reweight[1]))
        if any(token_position(tok, e, reweight[0]) != weight[0] for e in edits):
            raise ValueError(f"{reweight[0]!r} must be at the same place in every edited caption")
    edit = AttentionEdit(n, round(cross_replace * steps), round(self_replace * steps), weight)
    layers = [m for _, m in model.unet.named_modules() if isinstance(m, Attention)]
    xp, dtype = pipe._xp_dtype()
    with inference_mode(model.unet, model.text_encoder, model.vae):
        prompts, denoiser = pipe._prepare(sources + edits, None, guidance_scale, 1)

        def model_fn(x, t):
            out = denoiser(x, t)
            edit.step += 1  # one U-Net call per DDIM step
            return out

        for layer in layers:
            layer.attention_edit = edit
        try:
            x0 = sample(model_fn, shape, pipe.sampler, steps, noise=np.concatenate([noise, noise]),
                        progress=progress, xp=xp, dtype=dtype, eta=0.0)
        finally:
            for layer in layers:
                layer.attention_edit = None
        images = pipe._output(x0, prompts, None).images
    return images[:n], images[n:]
