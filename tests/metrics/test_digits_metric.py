import numpy as np
import pytest
import scipy.linalg

from diffusion_np.data.digits import load_digits
from diffusion_np.gradcheck import check_module
from diffusion_np.metrics.digits import (
    WEIGHTS_PATH,
    DigitClassifier,
    _random_shift,
    classifier_features,
    conditional_accuracy,
    digits_frechet_distance,
    frechet_distance,
    load_digit_classifier,
    real_baseline,
    save_digit_classifier,
    train_digit_classifier,
)


@pytest.fixture(scope="module")
def classifier():
    return load_digit_classifier()


@pytest.fixture(scope="module")
def test_split():
    images, _, labels = load_digits("test")
    return images, labels


@pytest.fixture(scope="module")
def train_images():
    return load_digits("train")[0]


# ----------------------------------------------------------------------------- the classifier
@pytest.mark.parametrize("x_shape", [(2, 8, 8, 1), (1, 16, 16, 1), (3, 8, 8, 1)])
def test_classifier_gradcheck(x_shape):
    model = DigitClassifier(channels=(3, 4), hidden=5, rng=np.random.default_rng(1)).to(dtype=np.float64)
    x = np.random.default_rng(2).uniform(-1, 1, x_shape)
    # measured: <= 2e-7 (input0, whose gradient is small, so finite-difference round-off shows; 1e-8 elsewhere)
    errors = check_module(model, x)
    assert set(errors) == {"input0"} | {
        f"{layer}.{p}" for layer in ("conv1", "conv2", "fc1", "fc2") for p in ("weight", "bias")
    }
    assert max(errors.values()) < 1e-6, errors


def test_classifier_shapes_and_features():
    model = DigitClassifier()
    x = np.random.default_rng(0).uniform(-1, 1, (5, 8, 8, 1)).astype(np.float32)
    logits = model(x)
    assert logits.shape == (5, 10) and logits.dtype == np.float32
    feats = model.features(x)
    assert feats.shape == (5, 64) and feats.dtype == np.float32
    # the logits are the last layer applied to the features
    np.testing.assert_allclose(feats @ model.fc2.weight.T + model.fc2.bias, logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="backward called without a preceding forward"):
        model.backward(np.ones((5, 10), np.float32))  # features() leaves nothing to backpropagate


def test_16x16_input_is_pooled_to_8x8():
    model = DigitClassifier()
    x8 = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
    x16 = x8.repeat(2, axis=1).repeat(2, axis=2)  # nearest upsampling: pooling undoes it exactly
    np.testing.assert_allclose(model(x16), model(x8), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "x,error,match",
    [
        (np.zeros((8, 8, 1), np.float32), ValueError, r"DigitClassifier expects x of shape \(B, H, W, C\) with C=1"),
        (np.zeros((2, 8, 8, 3), np.float32), ValueError, r"with C=1 .*got \(2, 8, 8, 3\)"),
        (np.zeros((2, 12, 12, 1), np.float32), ValueError, r"S = 8, 16, 32.*got \(2, 12, 12, 1\)"),
        (np.zeros((2, 8, 16, 1), np.float32), ValueError, r"square.*got \(2, 8, 16, 1\)"),
        (np.zeros((2, 4, 4, 1), np.float32), ValueError, r"S = 8, 16"),
        (np.zeros((2, 8, 8, 1), np.int64), TypeError, "DigitClassifier expects x with a floating dtype"),
        (np.full((2, 8, 8, 1), np.nan, np.float32), ValueError, "DigitClassifier got a non-finite value"),
    ],
)
def test_classifier_bad_input(x, error, match):
    with pytest.raises(error, match=match):
        DigitClassifier()(x)


def test_random_shift_moves_by_at_most_one_pixel_and_fills_background():
    images = np.full((200, 8, 8, 1), -1.0, np.float32)
    images[:, 3, 4, 0] = 1.0  # one ink pixel
    shifted = _random_shift(images, np.random.default_rng(0), max_shift=1)
    rows, cols = np.nonzero(shifted[..., 0] == 1.0)[1:]
    assert np.all(shifted.sum(axis=(1, 2, 3)) == images.sum(axis=(1, 2, 3)))  # one ink pixel, rest -1
    assert set(rows.tolist()) == {2, 3, 4} and set(cols.tolist()) == {3, 4, 5}  # all nine shifts occur
    edge = np.full((1, 8, 8, 1), -1.0, np.float32)
    edge[0, 0, :, 0] = 1.0  # a top row can leave the frame: background comes in, never wraps
    out = _random_shift(np.repeat(edge, 50, axis=0), np.random.default_rng(1))
    assert np.all(out[:, 7] == -1.0)


def test_training_a_few_steps_learns(test_split):
    model, losses = train_digit_classifier(steps=60, seed=3)
    assert losses.shape == (60,) and not model.training
    assert losses[-10:].mean() < 0.75 * losses[:10].mean()  # starts at ~log(10) = 2.3
    assert conditional_accuracy(*test_split, classifier=model) > 0.5  # chance is 0.1


def test_training_refuses_bad_steps():
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        train_digit_classifier(steps=0)


# ----------------------------------------------------------------------------- the shipped weights
def test_shipped_weights_file_is_small_and_documented():
    assert WEIGHTS_PATH.is_file()
    assert WEIGHTS_PATH.stat().st_size < 500 * 1024
    readme = (WEIGHTS_PATH.parent / "README.md").read_text()
    assert "python -m diffusion_np.metrics.digits" in readme and "seed" in readme


def test_shipped_classifier_accuracy_on_the_test_split(classifier, test_split):
    images, labels = test_split
    # measured: 0.9944 (357 of 359); the bar is the one the metric promises
    assert conditional_accuracy(images, labels, classifier) >= 0.97
    # generated digits are usually 16 x 16: the bilinear upsampled test split, pooled back (measured 0.9916)
    images16 = load_digits("test", image_size=16)[0]
    assert conditional_accuracy(images16, labels, classifier) >= 0.97


def test_conditional_accuracy_is_the_classifiers_accuracy(classifier, test_split):
    images, labels = test_split
    predicted = classifier(images).argmax(axis=1)
    assert conditional_accuracy(images, labels, classifier) == np.mean(predicted == labels)
    assert conditional_accuracy(images, labels) == np.mean(predicted == labels)  # default: the shipped weights
    # the intended label matters: shuffled labels score near chance
    wrong = np.random.default_rng(0).permutation(labels)
    assert conditional_accuracy(images, wrong, classifier) < 0.2


def test_save_and_load_round_trip(tmp_path, classifier, test_split):
    path = tmp_path / "clf.safetensors"
    save_digit_classifier(classifier, path, {"note": "copy"})
    again = load_digit_classifier(path)
    for (name, a), (_, b) in zip(classifier.named_parameters(), again.named_parameters()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    with pytest.raises(FileNotFoundError, match="no digit classifier weights"):
        load_digit_classifier(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    "images,labels,match",
    [
        (np.zeros((3, 8, 8, 1), np.float32), np.zeros(2, np.int64), r"labels must be an integer array of shape \(3,\)"),
        (np.zeros((3, 8, 8, 1), np.float32), np.zeros(3), "labels must be an integer array"),
        (np.zeros((3, 8, 8), np.float32), np.zeros(3, np.int64), r"images must be \(N, S, S, 1\)"),
        (np.zeros((0, 8, 8, 1), np.float32), np.zeros(0, np.int64), "N >= 1"),
    ],
)
def test_conditional_accuracy_bad_input(images, labels, match):
    with pytest.raises(ValueError, match=match):
        conditional_accuracy(images, labels)


# ----------------------------------------------------------------------------- Frechet distance
def _with_moments(mean, std, n=400, seed=0):
    """n points whose sample mean and (ddof=1) covariance are exactly mean and diag(std^2)."""
    z = np.random.default_rng(seed).standard_normal((n, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whiten: cov(z) = I
    return mean + z * std


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).standard_normal((300, 16))
    assert abs(frechet_distance(x, x)) < 1e-8


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    d = 6
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)  # variances
    a, b = _with_moments(mu1, np.sqrt(s1), seed=2), _with_moments(mu2, np.sqrt(s2), n=250, seed=3)
    # ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), (S1 S2)^(1/2) = diag(sqrt(s1 s2))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2.0 * np.sqrt(s1 * s2))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_the_eigenvalue_form_for_full_covariances():
    # tr((S1 S2)^(1/2)) = sum of sqrt(eigenvalues of S1 S2) (torch-fidelity computes it so)
    rng = np.random.default_rng(4)
    a = rng.standard_normal((200, 5)) @ rng.standard_normal((5, 5))
    b = rng.standard_normal((150, 5)) @ rng.standard_normal((5, 5)) + 0.5
    S1, S2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    tr_sqrt = np.sum(np.sqrt(np.linalg.eigvals(S1 @ S2)).real)
    diff = a.mean(0) - b.mean(0)
    expected = diff @ diff + np.trace(S1) + np.trace(S2) - 2.0 * tr_sqrt
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)  # symmetric
    Q = scipy.linalg.qr(rng.standard_normal((5, 5)))[0]
    assert frechet_distance(a @ Q, b @ Q) == pytest.approx(expected, rel=1e-9)  # rotation invariant


def test_frechet_distance_survives_a_singular_covariance():
    # 3 points in 10-d: rank-2 covariances, S1 S2 singular
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((3, 10)), rng.standard_normal((3, 10))
    value = frechet_distance(a, b)
    assert np.isfinite(value) and value > 0


@pytest.mark.parametrize(
    "a,b,match",
    [
        (np.zeros(5), np.zeros((5, 2)), r"feats_a must be \(n, d\) features with n >= 2"),
        (np.zeros((1, 3)), np.zeros((5, 3)), r"n >= 2, got shape \(1, 3\)"),
        (np.zeros((4, 3)), np.zeros((4, 2)), "same dimension, got 3 and 2"),
        (np.full((4, 3), np.nan), np.zeros((4, 3)), "feats_a contains NaN"),
    ],
)
def test_frechet_distance_bad_input(a, b, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(a, b)


# ----------------------------------------------------------------------------- digits FD: is it meaningful?
def test_digits_fd_grows_with_noise(classifier, test_split, train_images):
    images = test_split[0]
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(images.shape).astype(np.float32)
    values = [digits_frechet_distance(images + s * noise, train_images, classifier) for s in (0.0, 0.2, 0.4, 0.8)]
    # measured: 2.3, 3.0, 10.6, 57
    assert all(lo < hi for lo, hi in zip(values, values[1:])), values
    pure_noise = rng.uniform(-1, 1, images.shape).astype(np.float32)
    assert digits_frechet_distance(pure_noise, train_images, classifier) > 10 * values[-1] / 4


def test_digits_fd_sees_missing_classes(classifier, test_split, train_images):
    images, labels = test_split
    full = digits_frechet_distance(images, train_images, classifier)
    half = digits_frechet_distance(images[labels < 5], train_images, classifier)  # mode dropping
    assert half > 5 * full


def test_real_baseline_is_below_real_vs_noisy(classifier):
    n = 300
    baseline = real_baseline(n, seed=0, classifier=classifier)
    assert baseline == real_baseline(n, seed=0, classifier=classifier)  # seeded
    assert 0 < baseline < real_baseline(60, seed=0, classifier=classifier)  # small samples inflate FD
    images = load_digits("all")[0]
    order = np.random.default_rng(0).permutation(len(images))  # the draw real_baseline makes
    real, other = images[order[:n]], images[order[n : 2 * n]]
    noisy = other + 0.4 * np.random.default_rng(1).standard_normal(other.shape).astype(np.float32)
    assert digits_frechet_distance(real, other, classifier) == pytest.approx(baseline)
    assert digits_frechet_distance(real, noisy, classifier) > 1.5 * baseline


def test_real_baseline_bad_n():
    with pytest.raises(ValueError, match=r"n must be an integer in 2\.\.898"):
        real_baseline(899)


def test_features_in_batches_equal_one_pass(classifier, test_split):
    images = test_split[0][:70]
    np.testing.assert_allclose(
        classifier_features(images, classifier, batch_size=32), classifier.features(images), rtol=1e-6, atol=1e-6
    )


@pytest.mark.gpu
def test_classifier_cupy_matches_numpy():
    import cupy

    x = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 1))
    cpu = DigitClassifier(rng=np.random.default_rng(1)).to(dtype=np.float64)
    gpu = DigitClassifier(rng=np.random.default_rng(1)).to("cupy", dtype=np.float64)
    y, y_gpu = cpu(x), gpu(cupy.asarray(x))
    assert isinstance(y_gpu, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(y_gpu), y, rtol=1e-10, atol=1e-10)
    dy = np.random.default_rng(2).standard_normal(y.shape)
    np.testing.assert_allclose(cupy.asnumpy(gpu.backward(cupy.asarray(dy))), cpu.backward(dy), rtol=1e-9, atol=1e-10)
    for (key, g), (_, g_gpu) in zip(cpu.named_grads(), gpu.named_grads()):
        np.testing.assert_allclose(cupy.asnumpy(g_gpu), g, rtol=1e-9, atol=1e-10, err_msg=key)
    shifted = _random_shift(cupy.asarray(x), np.random.default_rng(3))
    np.testing.assert_array_equal(cupy.asnumpy(shifted), _random_shift(x, np.random.default_rng(3)))
