"""Blocks of the batch on threads (nn/fast/parallel.py): the same numbers as one pass, in float64."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from diffusion_np.nn.conv import conv2d_backward, conv2d_forward
from diffusion_np.nn.fast import parallel


def test_run_blocks_covers_the_batch_in_order_on_every_thread_count():
    for n in (1, 2, 3):
        with parallel.threads(n):
            assert parallel.get_threads() == n
            spans = parallel.run_blocks(lambda lo, hi: (lo, hi), 10, 3)
        assert spans == [(0, 3), (3, 6), (6, 9), (9, 10)]


def test_block_size_fits_the_budget_and_gives_every_thread_a_block():
    with parallel.threads(1):
        assert parallel.block_size(64, 2**20, budget_bytes=4 * 2**20) == 4
        assert parallel.block_size(64, 10 * 2**20, budget_bytes=4 * 2**20) == 1  # at least one item
        assert parallel.block_size(5, 1, budget_bytes=4 * 2**20) == 5
    with parallel.threads(2):
        assert parallel.block_size(5, 1, budget_bytes=4 * 2**20) == 3  # two blocks for two threads


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_threads_refuses_what_is_not_a_positive_int(n):
    with pytest.raises(ValueError, match="threads: n must be a positive int"):
        with parallel.threads(n):
            pass


def test_the_environment_sets_the_thread_count():
    code = "from diffusion_np.nn.fast import parallel; print(parallel.get_threads())"
    env = {**os.environ, "DIFFUSION_NP_THREADS": "3", "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"
    env.pop("DIFFUSION_NP_THREADS")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"  # OpenBLAS's own variable: one thread for both


@pytest.mark.parametrize("method", ["rows", "rows_stacked"])
@pytest.mark.parametrize(
    "x_shape,w_shape,padding",
    [((5, 9, 8, 4), (3, 3, 4, 6), 1), ((7, 8, 10, 3), (3, 2, 3, 5), (0, 2, 1, 0))],
)
def test_blocked_rows_equal_one_pass_in_float64(monkeypatch, split_everything, method, x_shape, w_shape, padding):
    """Blocks of one or two images, on one and on three threads: forward, dx and dw as the reference."""
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal(x_shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[3])
    y_ref, cache = conv2d_forward(x, w, b, 1, padding, method="reference")
    dout = rng.standard_normal(y_ref.shape)
    grads_ref = conv2d_backward(dout, cache)
    real_block_size = parallel.block_size
    for budget, n in ((1, 1), (1, 3), (2**30, 3)):
        monkeypatch.setattr(parallel, "block_size", lambda n_items, nbytes, budget=budget: real_block_size(
            n_items, nbytes, budget_bytes=budget))
        with parallel.threads(n):
            y, cache = conv2d_forward(x, w, b, 1, padding, method=method)
            grads = conv2d_backward(dout, cache)
        np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
        for g, g_ref in zip(grads, grads_ref):
            np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method,kernel,stride,padding", [("im2col", 3, 1, 1), ("im2col", 3, 2, (0, 1, 0, 1)),
                                                         ("im2col", 3, 2, 1), ("matmul", 1, 1, 0)])
def test_blocked_im2col_equals_one_pass_in_float64(monkeypatch, split_everything, method, kernel, stride, padding):
    """"im2col" with columns above the size it keeps (the VAE's stride-2 convolutions): built and
    multiplied block by block, dw and db summed over the blocks; as the reference on 1 and 3 threads.
    A 1x1 "matmul" convolution, which keeps x too, still returns its bias gradient."""
    from diffusion_np.nn.fast import conv as fast_conv

    monkeypatch.setattr(fast_conv, "_MAX_SAVED_COLUMNS_BYTES", 0)
    rng = np.random.default_rng(1)
    x, w, b = (rng.standard_normal((5, 9, 8, 4)), rng.standard_normal((kernel, kernel, 4, 6)),
               rng.standard_normal(6))
    y_ref, cache = conv2d_forward(x, w, b, stride, padding, method="reference")
    dout = rng.standard_normal(y_ref.shape)
    grads_ref = conv2d_backward(dout, cache)
    real_block_size = parallel.block_size
    monkeypatch.setattr(parallel, "block_size", lambda n_items, nbytes: real_block_size(n_items, nbytes, 1))
    for n in (1, 3):
        with parallel.threads(n):
            y, cache = conv2d_forward(x, w, b, stride, padding, method=method)
            assert cache.saved is x
            grads = conv2d_backward(dout, cache)
            assert grads[2] is not None
        np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
        for g, g_ref in zip(grads, grads_ref):
            np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=1e-12)


@pytest.fixture
def split_everything(monkeypatch):
    """No minimum of work per thread: the tiny test shapes run in blocks and split products."""
    monkeypatch.setattr(parallel, "MIN_SPLIT_BYTES", 0)
    monkeypatch.setattr(parallel, "MIN_SPLIT_MACS", 0)


def test_a_unet_on_three_threads_gives_the_one_thread_numbers_in_float64(split_everything):
    """GroupNorm (+ SiLU), LayerNorm, GEGLU and attention in blocks of the batch, the blocked
    convolutions and the split products (Linear, 1x1 and im2col convolutions): forward, input
    gradients and every parameter gradient as on one thread."""
    from diffusion_np.models import UNet2DConditionModel

    config = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=6,
                  attention_head_dim=2, norm_num_groups=4)
    unet = UNet2DConditionModel(**config).to(dtype=np.float64)
    rng = np.random.default_rng(0)
    x, text = rng.standard_normal((5, 8, 8, 4)), rng.standard_normal((5, 3, 6))
    dout = rng.standard_normal((5, 8, 8, 4))

    def run(n):
        unet.zero_grad()
        with parallel.threads(n):
            y = unet(x, np.arange(5) * 100, text)
            kinds = {type(m._cache).__name__ for _, m in unet.named_modules()}
            g = unet.backward(dout)
        return kinds, [y, g.dx, g.dcontext] + [grad.copy() for _, grad in unet.named_grads()]

    kinds_1, one = run(1)
    kinds_3, three = run(3)
    assert "BlockCaches" in kinds_3 and "BlockCaches" not in kinds_1
    for a, b in zip(one, three):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_split_products_equal_one_call_in_float64(split_everything):
    rng = np.random.default_rng(0)
    a, b, c = rng.standard_normal((37, 5)), rng.standard_normal((5, 7)), rng.standard_normal((37, 7))
    for n in (1, 2, 3):
        with parallel.threads(n):
            np.testing.assert_allclose(parallel.matmul(a, b), a @ b, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(parallel.matmul_tn(a, c), a.T @ c, rtol=1e-12, atol=1e-12)


def test_small_work_stays_on_the_calling_thread():
    """Below the minimum of work per thread nothing is split: a helper's wake-up would cost more."""
    x = np.zeros((16, 8, 8, 64), dtype=np.float32)  # 256 KiB: one GroupNorm of the sampling U-Net
    with parallel.threads(2):
        assert not parallel.splits((x,))
        assert parallel.splits((np.zeros((16, 8, 8, 128), dtype=np.float32),))
        assert not parallel.worth_splitting(parallel.MIN_SPLIT_MACS, parallel.MIN_SPLIT_MACS)
        threads_seen = set()
        parallel.run_blocks(lambda lo, hi: threads_seen.add(threading.get_ident()), 8, 1, macs=1000)
        assert threads_seen == {threading.get_ident()}


def test_an_error_in_a_block_reaches_the_caller_and_the_threads_keep_working():
    def fail_on_block_two(lo, hi):
        if lo == 2:
            raise KeyError("block two")
        return lo

    with parallel.threads(2):
        with pytest.raises(KeyError, match="block two"):
            parallel.run_blocks(fail_on_block_two, 6, 1)
        assert parallel.run_blocks(lambda lo, hi: lo, 6, 1) == [0, 1, 2, 3, 4, 5]


def test_openblas_runs_on_one_thread_inside_a_layer_on_two_threads_and_is_restored_after():
    """Inside a Module call (and backward) on two threads the layers' own threads do the parallel
    work; OpenBLAS's count comes back afterwards (where NumPy's OpenBLAS has the setter)."""
    from diffusion_np.nn.linear import Linear

    if parallel._blas_local is None:
        pytest.skip("NumPy's BLAS has no openblas_set_num_threads_local")
    seen = []

    class Probe(Linear):
        def forward(self, x):
            count = parallel._set_blas_threads_here(1)  # the count the layer runs under, read
            parallel._set_blas_threads_here(count)  # and put back
            seen.append(count)
            return super().forward(x)

    layer, x = Probe(3, 2), np.ones((4, 3))
    before = parallel._set_blas_threads_here(2)
    try:
        with parallel.threads(2):
            layer(x)
        with parallel.threads(1):
            layer(x)
        assert seen == [1, 2]
        assert parallel._set_blas_threads_here(2) == 2  # restored
    finally:
        parallel._set_blas_threads_here(before)
