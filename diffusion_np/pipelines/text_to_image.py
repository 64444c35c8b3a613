"""Text-to-image: sample from noise with a text-conditioned U-Net and classifier-free guidance.

The pipeline of Stable Diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models") in its plainest form::

    1. c   = text_encoder(tokenizer(prompt))              (B, L, D)   the condition
       c_0 = text_encoder(tokenizer(negative or ""))      (B, L, D)   the "unconditional" one
    2. x_T = init_noise_sigma * z,  z ~ N(0, I)           (B, h, w, C) in pixel or latent space
    3. for t in sampler.timesteps:
           eps_u, eps_c = unet([x_t, x_t], t, [c_0, c])  ONE batch of 2B
           eps = eps_u + w (eps_c - eps_u)                classifier-free guidance
           x_t = sampler.step(eps, t, x_t)
    4. image = vae.decode(x_0 / scaling_factor)          (latent space) or x_0 itself (pixel space)

Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", Eq. 6,
written with w = 1 + their w)::

    eps_guided = eps(x_t, c_0) + w (eps(x_t, c) - eps(x_t, c_0))

w = 1 is the conditional model alone; w > 1 moves further away from the unconditional
prediction, trading diversity for fidelity to the prompt (SD uses w = 7.5). The
"unconditional" prediction is the same network given the empty caption "": the model
learns it because about 10% of training captions are replaced by "" (the negative
prompt replaces "" when given). Both predictions come from one U-Net call on a batch of
2B (unconditional first, then conditional) -- the same arithmetic as two calls, with
half the Python overhead and larger matrix products. With w = 1 the unconditional branch
is skipped and the U-Net sees a batch of B.

Pixel or latent space: with ``vae=None`` the U-Net works on images directly (its
``in_channels`` are the image channels); with a VAE it works on latents
``z = scaling_factor * vae.encode(x).mode()`` (``vae.encode_latents``), of 1 / f the image
size (f = the VAE's downsampling factor, 8 in SD), and decodes the final latents once at the end.

The loop itself is :func:`diffusion_np.samplers.loop.sample`: every sampler works (Heun's
second call per step is one more entry of ``sampler.timesteps``; DPM-Solver++ keeps its
history inside the sampler), and all randomness is drawn on the host from
``numpy.random.default_rng(seed)``.

This file also holds what the image-to-image and inpainting pipelines share:
:class:`GuidedDenoiser`, :class:`PipelineOutput`, and the prompt, VAE and shape checks.

Left out: CLIP's 77-token truncation warnings and prompt weighting, safety checking,
attention slicing or other memory tricks, guidance rescaling (Lin et al. 2023, Sec. 3.4),
and per-sample guidance scales.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from diffusion_np.backend import asnumpy, get_xp
from diffusion_np.nn.module import inference_mode
from diffusion_np.pipelines.image_io import to_uint8
from diffusion_np.samplers.base import Sampler
from diffusion_np.samplers.loop import Trajectory, sample


# ----------------------------------------------------------------------------- guidance
class GuidedDenoiser:
    """``model_fn(x, t)`` for a sampling loop: the U-Net, conditioned on text, with classifier-free guidance.

    Parameters
    ----------
    unet : anything with ``forward(sample (B, h, w, C), timestep, encoder_hidden_states (B, L, D))``
        (a :class:`~diffusion_np.models.UNet2DConditionModel`, or a test double).
    cond : array (B, L, D)
        Text embeddings of the prompts, one row per sample.
    uncond : array (B, L, D), optional
        Embeddings of the negative prompts (or of ""). None: no guidance, the U-Net runs on
        ``cond`` alone.
    guidance_scale : float
        w of ``eps_u + w (eps_c - eps_u)`` (Ho & Salimans 2022, Eq. 6). Any real w is computed
        here (w = 0 gives the unconditional prediction, w = 1 the conditional one); the
        pipelines only accept w >= 1.

    Notes
    -----
    The guidance is applied to whatever the U-Net predicts (eps, v or x_0): the combination is
    linear, so it means the same for each.
    """

    def __init__(self, unet, cond, uncond=None, guidance_scale: float = 1.0) -> None:
        if uncond is not None and tuple(uncond.shape) != tuple(cond.shape):
            raise ValueError(
                f"GuidedDenoiser: uncond must have cond's shape {tuple(cond.shape)}, got {tuple(uncond.shape)}"
            )
        if not math.isfinite(guidance_scale):
            raise ValueError(f"GuidedDenoiser: guidance_scale must be finite, got {guidance_scale!r}")
        self.unet = unet
        self.cond = cond
        self.uncond = uncond
        self.guidance_scale = float(guidance_scale)  # a Python float keeps float32 float32
        # both conditions stacked once: (2B, L, D), unconditional rows first
        self._context = None if uncond is None else get_xp(cond).concatenate([uncond, cond], axis=0)

    def __call__(self, x, t):
        B = x.shape[0]
        if B != self.cond.shape[0]:
            raise ValueError(f"GuidedDenoiser: x has batch {B} but there are {self.cond.shape[0]} text embeddings")
        if self.uncond is None:
            return self.unet(x, t, self.cond)  # (B, h, w, C)
        xp = get_xp(x)
        x_in = xp.concatenate([x, x], axis=0)  # (2B, h, w, C): the same x_t for both conditions
        out = self.unet(x_in, t, self._context)  # (2B, h, w, C)
        out_uncond, out_cond = out[:B], out[B:]  # (B, h, w, C) each
        return out_uncond + self.guidance_scale * (out_cond - out_uncond)


def check_guidance_scale(guidance_scale: float) -> float:
    """The guidance weight as a float; ValueError for w < 1 or non-finite w, with the reason."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"guidance_scale must be a number, got {type(guidance_scale).__name__}")
    w = float(guidance_scale)
    if not math.isfinite(w) or w < 1.0:
        raise ValueError(
            f"guidance_scale must be a finite number >= 1, got {guidance_scale!r}. "
            "In eps_u + w (eps_c - eps_u), w = 1 is the text-conditional model alone (no guidance) and "
            "w > 1 strengthens the prompt (Stable Diffusion uses 7.5); w < 1 would pull the sample towards "
            "the unconditional model, i.e. weaken the prompt, which is not what guidance is for"
        )
    return w


# ----------------------------------------------------------------------------- output
@dataclass
class PipelineOutput:
    """What a pipeline returns.

    Attributes
    ----------
    images : np.ndarray (B, H, W, C) float32 in [-1, 1], on the host
        B = len(prompts) * num_images_per_prompt, ordered prompt by prompt.
    prompts : list of str
        The prompt of each image (repeated ``num_images_per_prompt`` times).
    latents : array or None
        The final sample in the U-Net's space (the latents before decoding; the
        unclipped pixels in pixel space), on the sampling device.
    trajectory : Trajectory or None
        With ``return_trajectory=True``: ``timesteps``, ``x_t`` (len steps + 1) and
        ``x0_pred`` (len steps), in the U-Net's space and as the sampler holds them
        (Euler-type samplers keep x_t / sqrt(alpha_bar_t); see ``samplers.euler``).
        Use :meth:`trajectory_images` for pixels.
    """

    images: np.ndarray
    prompts: list
    latents: object = None
    trajectory: Trajectory | None = None
    vae: object = field(default=None, repr=False)

    def to_uint8(self) -> np.ndarray:
        """The images as uint8 (B, H, W, C), ready for PIL or ``plt.imshow``."""
        return to_uint8(self.images)

    def trajectory_images(self, which: str = "x0_pred", every: int = 1) -> list:
        """The trajectory in pixel space, decoding latents now (one VAE decode per kept entry).

        ``which`` is "x0_pred" (the model's running estimate of the final image: the
        informative one to plot) or "x_t"; ``every`` keeps every k-th entry and always the
        last. Returns a list of (B, H, W, C) host arrays, unclipped.
        """
        if self.trajectory is None:
            raise ValueError("this output has no trajectory: call the pipeline with return_trajectory=True")
        if which not in ("x0_pred", "x_t"):
            raise ValueError(f"which must be 'x0_pred' or 'x_t', got {which!r}")
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        entries = getattr(self.trajectory, which)
        keep = sorted(set(range(0, len(entries), every)) | {len(entries) - 1})
        return [asnumpy(decode_latents(self.vae, entries[i])) for i in keep]


# ----------------------------------------------------------------------------- VAE helpers
def vae_downsampling_factor(vae) -> int:
    """f = image side / latent side: 1 without a VAE, else the VAE's ``downscale`` (2 ** (levels - 1))."""
    return 1 if vae is None else int(vae.downscale)


def encode_images(vae, images):
    """Pixels (B, H, W, 3) in [-1, 1] -> what the U-Net works on.

    Without a VAE the images themselves; with one ``vae.encode_latents(x, sample_posterior=False)``
    = ``scaling_factor * (mode of q(z | x) - shift_factor)``: the posterior mean, scaled to roughly
    unit variance (0.18215 for SD). The mean, not a sample: the forward process adds the noise.
    """
    if vae is None:
        return images
    return vae.encode_latents(images, sample_posterior=False)


def decode_latents(vae, latents):
    """The inverse of :func:`encode_images`: ``vae.decode_latents(z)``, or z itself without a VAE."""
    if vae is None:
        return latents
    return vae.decode_latents(latents)


# ----------------------------------------------------------------------------- the pipeline
def forward_only(call):
    """Run a pipeline call with its networks in inference mode: no layer keeps a backward
    cache, so activations are freed as sampling goes (the networks' modes are restored after)."""

    @functools.wraps(call)
    def wrapper(self, *args, **kwargs):
        with inference_mode(self.unet, self.text_encoder, self.vae):
            return call(self, *args, **kwargs)

    return wrapper


class TextToImagePipeline:
    """Text-to-image sampling with classifier-free guidance (see the module docstring).

    Parameters
    ----------
    unet : UNet2DConditionModel (or anything with its forward signature)
        The denoiser; its ``cross_attention_dim`` must match the text encoder's width.
    text_encoder : TextEncoder
        ``forward(input_ids (B, L)) -> (B, L, D)``.
    tokenizer : WordTokenizer
        ``encode(texts) -> Encoding(ids, lengths)``.
    sampler : Sampler
        Any of ``diffusion_np.samplers`` (DDPM, DDIM, Euler, Euler ancestral, Heun, DPM-Solver++);
        ``set_timesteps`` is called on every run, so one sampler serves many runs (not in parallel).
    vae : AutoencoderKL, optional
        None: the U-Net works on pixels. Otherwise on the VAE's latents.
    """

    def __init__(self, unet, text_encoder, tokenizer, sampler: Sampler, vae=None) -> None:
        if not isinstance(sampler, Sampler):
            raise TypeError(f"sampler must be a diffusion_np Sampler, got {type(sampler).__name__}")
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.sampler = sampler
        self.vae = vae

    # ---- properties of the models -------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        """Image side / sample side: the VAE's downsampling factor, 1 in pixel space."""
        return vae_downsampling_factor(self.vae)

    @property
    def unet_factor(self) -> int:
        """The U-Net halves its input ``levels - 1`` times, so sample sides must divide by this."""
        return 2 ** int(getattr(self.unet, "num_upsamplers", 0))

    def _xp_dtype(self):
        """(array module, float dtype) of the U-Net's parameters: where and in what the sampling runs."""
        return _module_xp_dtype(self.unet)

    # ---- the run ---------------------------------------------------------------------------------
    @forward_only
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float = 5.0,
        num_inference_steps: int = 50,
        seed: int | None = 0,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        noise=None,
        return_trajectory: bool = False,
        progress: bool = True,
        **step_kwargs,
    ) -> PipelineOutput:
        """Generate images for ``prompt``.

        Parameters
        ----------
        prompt : str or list of str
            One caption, or one per image group.
        negative_prompt : str or list of str, optional
            Replaces "" as the unconditional caption (one for all, or one per prompt).
        guidance_scale : float >= 1
            w of classifier-free guidance; 1 switches guidance off (one batch of B).
        num_inference_steps : int
            Sampler steps (Heun makes 2N - 1 U-Net calls for N steps).
        seed : int or None
            Seeds the host-side generator of all noise: same seed, same images, on NumPy and CuPy.
        num_images_per_prompt : int
            Images per caption; the batch is ``len(prompts) * num_images_per_prompt``.
        height, width : int, optional
            Image size in pixels; default ``unet.config["sample_size"] * vae_scale_factor``.
            Must be divisible by ``vae_scale_factor * unet_factor``.
        noise : array (B, h, w, C), optional
            The initial z (before ``init_noise_sigma``), in the U-Net's space; drawn from the seed if None.
        return_trajectory : bool
            Keep every x_t and x0_pred (see :class:`PipelineOutput`).
        progress : bool
            Show a progress bar.
        **step_kwargs
            Passed to ``sampler.step`` (e.g. ``eta=1.0`` for DDIM).
        """
        prompts, denoiser = self._prepare(prompt, negative_prompt, guidance_scale, num_images_per_prompt)
        shape = self._sample_shape(len(prompts), height, width)
        xp, dtype = self._xp_dtype()
        result = sample(
            denoiser, shape, self.sampler, num_inference_steps, seed=seed, noise=noise, progress=progress,
            xp=xp, dtype=dtype, return_trajectory=return_trajectory, **step_kwargs,
        )  # fmt: skip
        x0, trajectory = result if return_trajectory else (result, None)
        return self._output(x0, prompts, trajectory)

    # ---- steps shared with image-to-image and inpainting -----------------------------------------
    def _prepare(self, prompt, negative_prompt, guidance_scale, num_images_per_prompt):
        """Check the arguments, encode the text once: (prompt of each image, GuidedDenoiser)."""
        prompts = _as_prompts(prompt, "prompt")
        w = check_guidance_scale(guidance_scale)
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, (int, np.integer)) \
                or num_images_per_prompt < 1:  # fmt: skip
            raise ValueError(f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt!r}")
        n = int(num_images_per_prompt)
        if negative_prompt is None:
            negatives = [""] * len(prompts)  # the empty caption the model was trained with
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        else:
            negatives = _as_prompts(negative_prompt, "negative_prompt")
            if len(negatives) != len(prompts):
                raise ValueError(
                    f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}: "
                    "give one negative prompt per prompt, or a single string for all"
                )
        if w == 1.0:
            if negative_prompt is not None:
                warnings.warn(
                    "negative_prompt has no effect with guidance_scale=1 (there is no unconditional branch)",
                    stacklevel=3,
                )
            cond = self._encode_text(prompts)  # (P, L, D)
            uncond = None
        else:
            # 1. both captions through the text encoder in one batch: (2P, L, D), negatives first
            both = self._encode_text(negatives + prompts)
            uncond, cond = both[: len(prompts)], both[len(prompts) :]
        # 2. num_images_per_prompt copies of each row, prompt by prompt: (P * n, L, D)
        xp = get_xp(cond)
        cond = xp.repeat(cond, n, axis=0)
        uncond = None if uncond is None else xp.repeat(uncond, n, axis=0)
        image_prompts = [p for p in prompts for _ in range(n)]
        return image_prompts, GuidedDenoiser(self.unet, cond, uncond, w)

    def _encode_text(self, texts: list[str]):
        """Captions -> (B, L, D) embeddings on the U-Net's device, in its dtype."""
        ids, _ = self.tokenizer.encode(texts)  # (B, L) int64 on the host
        ids = _module_xp_dtype(self.text_encoder)[0].asarray(ids)  # the ids go where the embedding table is
        hidden = self.text_encoder(ids)  # (B, L, D)
        xp, dtype = self._xp_dtype()
        return xp.asarray(hidden, dtype=dtype)

    def _sample_shape(self, batch: int, height, width) -> tuple:
        """(B, h, w, C) of the sample in the U-Net's space, from the image size in pixels."""
        f = self.vae_scale_factor
        default = (getattr(self.unet, "config", None) or {}).get("sample_size")
        if height is None or width is None:
            if default is None:
                raise ValueError("height and width are needed: the U-Net's config has no sample_size")
            size = default if isinstance(default, (int, np.integer)) else None
            if size is None:  # (h, w) as some diffusers configs give it
                height = default[0] * f if height is None else height
                width = default[1] * f if width is None else width
            else:
                height = size * f if height is None else height
                width = size * f if width is None else width
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self._check_size(int(height), int(width))
        return (batch, int(height) // f, int(width) // f, int(self.unet.in_channels))

    def _check_size(self, height: int, width: int) -> None:
        """ValueError unless the image size survives the VAE's and the U-Net's downsampling."""
        f, g = self.vae_scale_factor, self.unet_factor
        if height % (f * g) or width % (f * g):
            where = f"the U-Net downsamples by {g}"
            if f > 1:
                where = f"the VAE downsamples by {f} and the U-Net by {g} more"
            raise ValueError(
                f"image size {height}x{width} must be divisible by {f * g} ({where}); "
                f"try {max(f * g, height // (f * g) * f * g)}x{max(f * g, width // (f * g) * f * g)}"
            )

    def _output(self, x0, prompts, trajectory) -> PipelineOutput:
        """Decode (if latent), clip to [-1, 1], bring to the host."""
        images = asnumpy(decode_latents(self.vae, x0)).astype(np.float32, copy=False)
        images = np.clip(images, -1.0, 1.0)
        return PipelineOutput(images, prompts, x0, trajectory, self.vae)


def _module_xp_dtype(module):
    """(array module, dtype) of a Module's first parameter; (numpy, float32) for parameter-free callables."""
    first = next(module.named_parameters(), None) if hasattr(module, "named_parameters") else None
    if first is None:
        return np, np.dtype(np.float32)
    return get_xp(first[1]), first[1].dtype


def _as_prompts(prompt, name: str) -> list[str]:
    """A str or a non-empty list of str -> list of str, with clear errors."""
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, (list, tuple)):
        raise TypeError(f"{name} must be a string or a list of strings, got {type(prompt).__name__}")
    if len(prompt) == 0:
        raise ValueError(f"{name} is an empty list: give at least one caption (\"\" is a valid, empty caption)")
    bad = [i for i, p in enumerate(prompt) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{name} must hold strings only; entry {bad[0]} is {type(prompt[bad[0]]).__name__}")
    return list(prompt)
