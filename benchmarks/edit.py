"""Editing benchmark: prompt-to-prompt word swaps against plain regeneration and SDEdit.

    python -m benchmarks.edit --json edit.json [--n 180] [--steps 25] [--strengths 0.1 0.2 0.3 0.5 0.7]

Every caption of the shapes data (180 combinations; ``--n`` takes the first n of a seeded
shuffle) gets one word swapped: its colour becomes the next colour of the palette ("red" ->
"yellow" -> ... -> "red"). The source image is generated from the caption (DDIM, guidance 4,
seed 0), then edited three ways:

* ``prompt_to_prompt``: source and edit sampled together from the same noise, the edit under the
  source's cross-attention maps for the first 80% of the steps and its self-attention maps for the
  first 40% (:mod:`diffusion_np.pipelines.prompt_to_prompt`);
* ``same_noise``: the edited caption from the same noise, no attention control;
* ``sdedit``: the source image noised to ``strength`` and denoised under the edited caption
  (:class:`~diffusion_np.pipelines.ImageToImagePipeline`), for each strength.

Each row: ``method``, ``strength`` (SDEdit), ``edit_accuracy`` (the share whose colour the shapes
analyser reads as the new colour), ``unchanged`` (the share whose shape, size and position read the
same as the source image's), ``mask_iou`` (mean IoU of the edited object's mask with the source's: the
layout kept at the pixel level), ``n`` and ``seconds``. ``source_accuracy`` is the share of source
images with every attribute right.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from benchmarks.common import machine_info
from diffusion_np.data.shapes import caption, combos
from diffusion_np.metrics.control import mask_iou, shape_mask
from diffusion_np.metrics.shapes import analyse_shapes
from diffusion_np.pipelines import ImageToImagePipeline
from diffusion_np.pipelines.prompt_to_prompt import prompt_to_prompt
from diffusion_np.training.model import TextToImageModel

GUIDANCE = 4.0


def swap_colour(labels: np.ndarray) -> np.ndarray:
    """The same rows with the colour moved to the next one of the palette."""
    new = labels.copy()
    new[:, 0] = (labels[:, 0] + 1) % 6
    return new


def score(method, images, source, new_labels, seconds, strength=None) -> dict:
    read, read_source = analyse_shapes(images), analyse_shapes(source)
    return {"method": method, "strength": strength, "edit_accuracy": float(np.mean(read[:, 0] == new_labels[:, 0])),
            "unchanged": float(np.mean((read[:, 1:] == read_source[:, 1:]).all(axis=1))),
            "mask_iou": float(np.mean(mask_iou(shape_mask(images), shape_mask(source)))), "n": len(images),
            "seconds": round(seconds, 1)}


def run(n: int = 180, steps: int = 25, strengths=(0.1, 0.2, 0.3, 0.5, 0.7), batch: int = 60,
        progress: bool = False) -> list:
    model = TextToImageModel.load("pretrained:shapes")
    labels = combos("all")[np.random.default_rng(0).permutation(180)[:n]]
    new = swap_colour(labels)
    sources, edits = caption(labels), caption(new)
    if n == 1:
        sources, edits = [sources], [edits]
    rows, results = [], {}
    for method, kwargs in (("prompt_to_prompt", {}), ("same_noise", {"cross_replace": 0.0, "self_replace": 0.0})):
        start = time.perf_counter()
        parts = [prompt_to_prompt(model, sources[i:i + batch], edits[i:i + batch], steps, GUIDANCE, seed=i, **kwargs)
                 for i in range(0, n, batch)]
        results[method] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                           time.perf_counter() - start)
    source = results["prompt_to_prompt"][0]
    source_accuracy = float(np.mean((analyse_shapes(source) == labels).all(axis=1)))
    for method, (_, images, seconds) in results.items():
        rows.append({**score(method, images, source, new, seconds), "source_accuracy": source_accuracy})
    pipe = ImageToImagePipeline(model.unet, model.text_encoder, model.tokenizer, model.make_sampler("ddim"), model.vae)
    for strength in strengths:
        start = time.perf_counter()
        images = np.concatenate([pipe(edits[i:i + batch], source[i:i + batch], strength=strength,
                                      guidance_scale=GUIDANCE, num_inference_steps=steps, seed=i,
                                      progress=progress).images for i in range(0, n, batch)])
        rows.append({**score("sdedit", images, source, new, time.perf_counter() - start, strength),
                     "source_accuracy": source_accuracy})
    for r in rows:
        print(f"{r['method']:17s} strength {r['strength'] if r['strength'] is not None else '-':>4}  edit right "
              f"{r['edit_accuracy']:.3f}  others unchanged {r['unchanged']:.3f}  mask IoU {r['mask_iou']:.3f}  "
              f"{r['seconds']:6.1f} s", flush=True)
    return rows


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.edit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="write the rows here")
    parser.add_argument("--n", type=int, default=180, help="captions (default all 180)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 0.7],
                        help="SDEdit strengths")
    args = parser.parse_args(argv)
    if not 1 <= args.n <= 180:
        parser.error("--n must be between 1 and 180")
    start = time.perf_counter()
    rows = run(args.n, args.steps, tuple(args.strengths))
    with open(args.json, "w") as f:
        json.dump({"machine": machine_info(), "seconds": round(time.perf_counter() - start, 1), "results": rows}, f,
                  indent=1)
    return rows


if __name__ == "__main__":
    main()
