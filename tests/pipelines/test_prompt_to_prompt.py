"""Prompt-to-prompt: the attention hook (default path unchanged, rows copied, one column re-weighted) and the
pipeline on a tiny latent model."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import tiny_text_to_image_model

from benchmarks import edit as bench
from diffusion_np.nn.attention import Attention
from diffusion_np.pipelines.prompt_to_prompt import AttentionEdit, prompt_to_prompt, token_position

CAPTIONS = ["a small red circle", "a small blue circle", "a large red square", "a large blue square"]


def tiny_model():
    return tiny_text_to_image_model(CAPTIONS)


def test_an_identity_hook_changes_nothing_and_the_default_path_keeps_its_backward():
    rng = np.random.default_rng(0)
    layer = Attention(8, 6, heads=2, dim_head=4, rng=rng)
    x, c = rng.standard_normal((2, 5, 8)).astype(np.float32), rng.standard_normal((2, 3, 6)).astype(np.float32)
    plain = layer(x, c)
    layer.backward(np.ones_like(plain))  # the default path keeps a cache for the backward
    layer.attention_edit = lambda probs, self_attention: probs
    np.testing.assert_allclose(layer(x, c), plain, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="attention_edit"):
        layer.backward(np.ones_like(plain))  # an edited forward is inference only
    layer.attention_edit = None
    np.testing.assert_array_equal(layer(x, c), plain)


def test_the_edit_copies_source_maps_while_active_and_reweights_one_token():
    rng = np.random.default_rng(1)
    probs = rng.uniform(size=(8, 2, 5, 6))  # 2 branches x [2 sources, 2 edits]
    edit = AttentionEdit(2, cross_steps=1, self_steps=0, reweight=(3, 2.0))
    out = edit(probs.copy(), self_attention=False)
    view, before = out.reshape(2, 2, 2, 2, 5, 6), probs.reshape(2, 2, 2, 2, 5, 6)
    np.testing.assert_array_equal(view[0, 1], before[0, 0])  # unconditional edits: the source's maps
    expected = before[1, 0].copy()
    expected[..., 3] *= 2.0  # conditional edits: the source's maps, token 3 doubled
    np.testing.assert_allclose(view[1, 1], expected)
    np.testing.assert_array_equal(view[:, 0], before[:, 0])  # the sources are untouched
    np.testing.assert_array_equal(edit(probs.copy(), self_attention=True), probs)  # self_steps = 0: no copy
    edit.step = 1
    late = edit(probs.copy(), self_attention=False).reshape(2, 2, 2, 2, 5, 6)
    np.testing.assert_array_equal(late[0, 1], before[0, 1])  # after cross_steps the edits attend on their own
    with pytest.raises(ValueError, match="pairs"):
        edit(rng.uniform(size=(6, 2, 5, 6)), self_attention=False)


def test_prompt_to_prompt_returns_both_images_and_clears_its_hooks():
    model = tiny_model()
    src, edited = prompt_to_prompt(model, CAPTIONS[::2], CAPTIONS[1::2][::-1], steps=3, guidance_scale=2.0)
    assert src.shape == edited.shape == (2, 8, 8, 3) and np.all(np.abs(edited) <= 1)
    assert all(m.attention_edit is None for _, m in model.unet.named_modules() if isinstance(m, Attention))
    # with the maps injected at every step and the same caption, the edit is the source exactly
    same_a, same_b = prompt_to_prompt(model, CAPTIONS[:1], CAPTIONS[:1], steps=3, cross_replace=1.0,
                                      self_replace=1.0)
    np.testing.assert_allclose(same_a, same_b, atol=1e-5)  # float32, rows of one batch
    _, weighted = prompt_to_prompt(model, CAPTIONS[:1], CAPTIONS[:1], steps=3, reweight=("red", 3.0))
    assert np.abs(weighted - same_a).max() > 1e-4


def test_captions_that_do_not_line_up_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="as many words"):
        prompt_to_prompt(model, ["a red circle"], ["a small blue circle"], steps=2)
    with pytest.raises(ValueError, match="one edited caption"):
        prompt_to_prompt(model, ["a red circle"], [], steps=2)
    with pytest.raises(ValueError, match="not a word"):
        token_position(model.tokenizer, "a red circle", "green")
    assert token_position(model.tokenizer, "a small red circle", "red") == 3


def test_the_edit_benchmark_scores_every_method(tmp_path):
    rows = bench.main(["--json", str(tmp_path / "edit.json"), "--n", "2", "--steps", "2", "--strengths", "0.5"])
    assert [r["method"] for r in rows] == ["prompt_to_prompt", "same_noise", "sdedit"]
    for r in rows:
        assert 0 <= r["edit_accuracy"] <= 1 and 0 <= r["unchanged"] <= 1 and 0 <= r["mask_iou"] <= 1 and r["n"] == 2
