"""preprocessing/: ADM center crop, RGB conversion, encoding to a dataset, flips, clean images, resume,
bad input."""

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_VAE
from PIL import Image

from errors import UserError
from preprocessing import SD_VAE_SCALING, VAE_SCALE_FACTORS, store
from preprocessing.__main__ import main
from preprocessing.dataset import LatentDataset
from preprocessing.encode import encode_shards, finalize_run, pending_shards, prepare_run, start_run
from preprocessing.image import center_crop_adm, load_rgb, pixels_to_unit_range

REPO = Path(__file__).resolve().parents[1]
RESOLUTION = 16
IMAGES_PER_SHARD = 3  # 10 files -> 4 shards, the last one partial
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def adm_center_crop_reference(image: Image.Image, size: int) -> np.ndarray:
    """The ADM rule written out directly (guided-diffusion `center_crop_arr`)."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    crop_y = (arr.shape[0] - size) // 2
    crop_x = (arr.shape[1] - size) // 2
    return arr[crop_y : crop_y + size, crop_x : crop_x + size]


def random_image(rng: np.random.Generator, width: int, height: int, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4}.get(mode)
    shape = (height, width) if channels is None else (height, width, channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """3 classes, 10 files: several sizes, grayscale, RGBA, CMYK, a nested file, 2 unreadable files."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("apple", "banana", "cherry"):
        (root / name).mkdir()
    random_image(rng, 40, 30).save(root / "apple" / "wide.png")
    random_image(rng, 17, 23).save(root / "apple" / "odd.png")
    random_image(rng, 21, 35, "L").save(root / "apple" / "gray.png")
    random_image(rng, 33, 19, "RGBA").save(root / "banana" / "alpha.png")
    (root / "banana" / "cmyk.jpg").write_bytes(jpeg_bytes(random_image(rng, 25, 27, "CMYK")))
    (root / "banana" / "nested").mkdir()
    random_image(rng, 64, 48).save(root / "banana" / "nested" / "deep.png")
    random_image(rng, 16, 16).save(root / "cherry" / "exact.png")
    random_image(rng, 50, 37).save(root / "cherry" / "tall.bmp")
    (root / "cherry" / "corrupt.png").write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    whole = jpeg_bytes(random_image(rng, 40, 40))
    (root / "cherry" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "cherry" / "notes.txt").write_text("not an image, not listed")
    return root


READABLE = [  # (relative path, label) in dataset order: sorted class, then sorted path
    ("apple/gray.png", 0), ("apple/odd.png", 0), ("apple/wide.png", 0),
    ("banana/alpha.png", 1), ("banana/cmyk.jpg", 1), ("banana/nested/deep.png", 1),
    ("cherry/exact.png", 2), ("cherry/tall.bmp", 2),
]  # fmt: skip
UNREADABLE = ["cherry/corrupt.png", "cherry/truncated.jpg"]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae")
    AutoencoderKL(**TINY_VAE).save_pretrained(path)
    return path


def preprocess(image_folder: Path, output: Path, vae: str | Path = "none", *extra: str) -> dict:
    return main([
        "--input", str(image_folder), "--output", str(output), "--resolution", str(RESOLUTION),
        "--vae", str(vae), "--batch-size", "2", "--num-workers", "0",
        "--images-per-shard", str(IMAGES_PER_SHARD), *extra,
    ])  # fmt: skip


def expected_pixels(image_folder: Path, path: str) -> np.ndarray:
    return center_crop_adm(load_rgb(image_folder / path), RESOLUTION).transpose(2, 0, 1)  # (3, R, R)


def output_files(root: Path) -> dict[str, bytes]:
    """Everything a finished run leaves, but the log (it has timestamps)."""
    return {path.name: path.read_bytes() for path in sorted(root.iterdir()) if path.name != store.LOG_FILE}


# --- center crop and colour conversion ---


@pytest.mark.parametrize("resolution", [32, 256])
@pytest.mark.parametrize("size", [(1, 1), (17, 23), (40, 30), (255, 256), (1031, 771), (600, 2001)])
def test_center_crop_output_size(size, resolution):
    image = random_image(np.random.default_rng(1), *size)
    assert center_crop_adm(image, resolution).shape == (resolution, resolution, 3)


@pytest.mark.parametrize(
    "size", [(17, 23), (33, 19), (65, 63), (127, 129), (257, 511), (1031, 771), (515, 2049), (31, 31)]
)
def test_center_crop_matches_the_adm_rule_on_odd_sizes(size):
    image = random_image(np.random.default_rng(2), *size)
    np.testing.assert_array_equal(center_crop_adm(image, 32), adm_center_crop_reference(image, 32))


def test_center_crop_closed_forms():
    pixels = np.random.default_rng(3).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    # A square of the target size is returned unchanged; a 2:1 image of the right height loses
    # a quarter of its width on each side (no resampling: the short side already matches).
    np.testing.assert_array_equal(center_crop_adm(Image.fromarray(pixels[:, :32]), 32), pixels[:, :32])
    np.testing.assert_array_equal(center_crop_adm(Image.fromarray(pixels), 32), pixels[:, 16:48])
    # Odd margins: the extra column goes to the right, as ADM's floor division does.
    np.testing.assert_array_equal(center_crop_adm(Image.fromarray(pixels[:, :35]), 32), pixels[:, 1:33])


def test_load_rgb_converts_grayscale_alpha_cmyk(tmp_path):
    rng = np.random.default_rng(4)
    gray = random_image(rng, 9, 7, "L")
    gray.save(tmp_path / "gray.png")
    np.testing.assert_array_equal(
        np.array(load_rgb(tmp_path / "gray.png")), np.repeat(np.array(gray)[..., None], 3, 2)
    )
    rgba = random_image(rng, 9, 7, "RGBA")
    rgba.save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(np.array(load_rgb(tmp_path / "rgba.png")), np.array(rgba)[..., :3])
    cmyk = random_image(rng, 9, 7, "CMYK")
    cmyk.save(tmp_path / "cmyk.tif")
    np.testing.assert_array_equal(np.array(load_rgb(tmp_path / "cmyk.tif")), np.array(cmyk.convert("RGB")))
    assert all(load_rgb(tmp_path / name).mode == "RGB" for name in ("gray.png", "rgba.png", "cmyk.tif"))


# --- pixel-space datasets ---


def test_pixel_dataset_holds_the_cropped_images_with_folder_labels(image_folder, tmp_path):
    index = preprocess(image_folder, tmp_path / "out")
    dataset = LatentDataset(tmp_path / "out", expected_shape=(3, RESOLUTION, RESOLUTION), num_classes=3)
    assert dataset.meta == index
    assert (index["kind"], index["class_names"], index["num_samples"]) == (
        "pixels",
        ["apple", "banana", "cherry"],
        8,
    )
    assert [shard["num_samples"] for shard in index["shards"]] == [3, 3, 2, 0]
    for i, (path, label) in enumerate(READABLE):
        pixels, y = dataset[i]
        assert y == label and pixels.dtype == torch.float32
        torch.testing.assert_close(
            pixels,
            pixels_to_unit_range(torch.from_numpy(expected_pixels(image_folder, path))),
            rtol=0,
            atol=0,
        )
    dataset.verify()


def test_unreadable_images_are_reported_and_skipped(image_folder, tmp_path):
    index = preprocess(image_folder, tmp_path / "out")
    assert index["num_skipped"] == 2 and index["num_images"] == len(READABLE)
    skipped = [line.split("\t") for line in (tmp_path / "out" / store.SKIPPED_FILE).read_text().splitlines()]
    assert [path for path, _ in skipped] == UNREADABLE
    assert "UnidentifiedImageError" in skipped[0][1] and "truncated" in skipped[1][1]
    log = (tmp_path / "out" / store.LOG_FILE).read_text()
    assert all(f"skipped {image_folder / path}" in log for path in UNREADABLE)
    assert "2 unreadable images skipped" in log


def test_flip_stores_each_image_then_its_mirror(image_folder, tmp_path):
    index = preprocess(image_folder, tmp_path / "out", "none", "--flip")
    dataset = LatentDataset(tmp_path / "out")
    assert index["flip"] and len(dataset) == 2 * len(READABLE)
    for k, (path, label) in enumerate(READABLE):
        original, flipped = dataset[2 * k], dataset[2 * k + 1]
        assert original[1] == flipped[1] == label
        torch.testing.assert_close(flipped[0], original[0].flip(-1), rtol=0, atol=0)
        torch.testing.assert_close(
            original[0],
            pixels_to_unit_range(torch.from_numpy(expected_pixels(image_folder, path))),
            rtol=0,
            atol=0,
        )


def test_cli_runs_as_a_module(image_folder, tmp_path):
    command = [
        sys.executable,
        "-m",
        "preprocessing",
        "--input",
        str(image_folder),
        "--output",
        str(tmp_path / "out"),
        "--resolution",
        "32",
        "--vae",
        "none",
        "--num-workers",
        "1",
    ]
    result = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "done: 8 samples from 8 images" in result.stderr
    assert LatentDataset(tmp_path / "out", expected_shape=(3, 32, 32))[0][0].shape == (3, 32, 32)


# --- VAE datasets ---


def test_vae_dataset_holds_the_posterior_moments(image_folder, vae_dir, tmp_path):
    from diffusers import AutoencoderKL

    index = preprocess(image_folder, tmp_path / "out", vae_dir, "--flip")
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    assert (index["kind"], index["sample_shape"], index["stored_shape"]) == ("vae", [4, 8, 8], [8, 8, 8])
    assert (index["vae"], index["vae_downsample"], index["scale"]) == (
        str(vae_dir.resolve()),
        2,
        vae.config.scaling_factor,
    )
    dataset = LatentDataset(tmp_path / "out", expected_shape=(4, 8, 8), num_classes=3)
    for k, (path, label) in enumerate(READABLE):
        pixels = torch.from_numpy(expected_pixels(image_folder, path))[None]  # (1, 3, R, R)
        for copy, image in enumerate([pixels, pixels.flip(-1)]):  # the mirror image is encoded, not flipped
            with torch.no_grad():
                posterior = vae.encode(pixels_to_unit_range(image)).latent_dist
            moments, y = dataset[2 * k + copy]
            assert y == label and moments.dtype == torch.float16
            expected = torch.cat([posterior.mean, posterior.std], dim=1)[0]  # (8, 8, 8)
            torch.testing.assert_close(moments.float(), expected.half().float(), rtol=2e-3, atol=1e-4)


def test_keep_images_stores_the_clean_crop_of_every_sample_and_its_mirror(image_folder, vae_dir, tmp_path):
    index = preprocess(image_folder, tmp_path / "out", vae_dir, "--flip", "--keep-images")
    root, side = tmp_path / "out", RESOLUTION
    assert (index["has_images"], index["image_shape"], index["image_dtype"]) == (True, [3, side, side], "uint8")
    assert [shard["images_file"] for shard in index["shards"]] == [f"images-0000{k}.npy" for k in range(4)]
    dataset = LatentDataset(root, expected_shape=(4, 8, 8), with_images=True)
    plain = LatentDataset(tmp_path / "out")
    for k, (path, label) in enumerate(READABLE):
        pixels = expected_pixels(image_folder, path)  # (3, R, R) uint8, the ADM crop of the source file
        for copy, image in enumerate([pixels, pixels[:, :, ::-1]]):
            moments, y, stored = dataset[2 * k + copy]
            assert y == label and stored.dtype == torch.uint8
            np.testing.assert_array_equal(stored.numpy(), image)
            assert torch.equal(moments, plain[2 * k + copy][0])  # the sample the image belongs to
    for k, shard in enumerate(index["shards"]):  # plain .npy files, as np.save writes them, a row per sample
        path = root / shard["images_file"]
        images = np.load(path, mmap_mode="r" if shard["num_samples"] else None)
        assert images.shape == (shard["num_samples"], 3, side, side) and images.dtype == np.uint8
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(images))
        assert path.read_bytes() == buffer.getvalue()
        manifest = store.read_json(root / store.shard_manifest_file(k))
        assert manifest["images_sha256"] == shard["images_sha256"] == store.sha256_file(path)
    assert dataset.verify() is True
    # Everything else is what a run without --keep-images writes.
    without = preprocess(image_folder, tmp_path / "plain", vae_dir, "--flip")
    image_keys = {"has_images", "image_shape", "image_dtype", "image_layout", "images_file", "images_sha256"}
    strip = lambda entries: {key: value for key, value in entries.items() if key not in image_keys}
    assert [strip(shard) for shard in index["shards"]] == without["shards"]
    assert strip(index) | {"shards": None, "checksum": None} == strip(without) | {"shards": None, "checksum": None}
    assert without["has_images"] is False and "image_shape" not in without
    for name in [store.LABELS_FILE] + [store.shard_data_file(k) for k in range(4)]:
        assert (root / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


def test_shard_files_are_written_block_by_block_as_np_save_writes_them(tmp_path):
    rng = np.random.default_rng(6)
    blocks = [rng.integers(0, 256, (count, 3, 4, 4), dtype=np.uint8) for count in (0, 2, 3)]
    store.write_shard(tmp_path, 0, blocks, [0] * 5, ["a.png"], [], clean_images=blocks[::-1])
    for name, array in [(store.shard_data_file(0), blocks), (store.shard_images_file(0), blocks[::-1])]:
        buffer = io.BytesIO()
        np.save(buffer, np.concatenate(array))
        assert (tmp_path / name).read_bytes() == buffer.getvalue()
    with pytest.raises(ValueError, match="differ in dtype or row shape"):
        store.write_shard(tmp_path, 1, [blocks[1], blocks[2].astype(np.int16)], [0] * 5, ["a.png"], [])
    with pytest.raises(ValueError, match="shard 1 has 5 samples but 2 clean images"):
        store.write_shard(tmp_path, 1, blocks, [0] * 5, ["a.png"], [], clean_images=blocks[1])
    assert not store.is_shard_done(tmp_path, 1)


def test_pixel_space_keeps_no_second_copy_of_its_images(image_folder, tmp_path):
    index = preprocess(image_folder, tmp_path / "kept", "none", "--keep-images")
    preprocess(image_folder, tmp_path / "plain")
    assert output_files(tmp_path / "kept") == output_files(tmp_path / "plain")  # the flag changes nothing
    assert (index["has_images"], index["image_shape"]) == (True, [3, RESOLUTION, RESOLUTION])
    assert not list((tmp_path / "kept").glob("images-*")) and "images_file" not in index["shards"][0]
    dataset = LatentDataset(tmp_path / "kept", with_images=True)
    for i, (path, _) in enumerate(READABLE):
        pixels, _, image = dataset[i]
        np.testing.assert_array_equal(image.numpy(), expected_pixels(image_folder, path))
        torch.testing.assert_close(pixels, pixels_to_unit_range(image), rtol=0, atol=0)
    # A rerun with the other choice of the flag resumes the same run.
    preprocess(image_folder, tmp_path / "kept")


def test_sd_vae_scaling_is_the_papers():
    assert (SD_VAE_SCALING.scale, SD_VAE_SCALING.shift) == (0.18215, 0.0)
    assert VAE_SCALE_FACTORS["stabilityai/sd-vae-ft-ema"] is SD_VAE_SCALING
    assert "SPEC §4" in SD_VAE_SCALING.source


# --- resume and several processes ---


@pytest.mark.parametrize("flags", [["--flip"], ["--flip", "--keep-images"]])
def test_resume_after_interruption_equals_an_uninterrupted_run(flags, image_folder, vae_dir, tmp_path, monkeypatch):
    """An interrupted run, rerun, writes exactly the files of a run never interrupted (the images too)."""
    preprocess(image_folder, tmp_path / "whole", vae_dir, *flags)

    keep_images, resumed = "--keep-images" in flags, tmp_path / "resumed"
    # The process dies while it writes the last array file of shard 2 (with --keep-images, its samples
    # are written by then), leaving a temp file.
    last_file = store.shard_images_file(2) if keep_images else store.shard_data_file(2)
    real_write_npy = store._write_npy_atomic

    def write_npy_or_crash(path, blocks):
        if path.name == last_file:
            path.with_name(f".{path.name}.tmp-1").write_bytes(b"partial")
            raise KeyboardInterrupt
        return real_write_npy(path, blocks)

    monkeypatch.setattr(store, "_write_npy_atomic", write_npy_or_crash)
    with pytest.raises(KeyboardInterrupt):
        preprocess(image_folder, resumed, vae_dir, *flags)
    monkeypatch.undo()
    assert not (resumed / store.INDEX_FILE).exists()
    assert store.is_shard_done(resumed, 1) and not store.is_shard_done(resumed, 2)
    (resumed / last_file).write_bytes(b"partial")  # what a write that is not atomic would leave

    real_write_shard = store.write_shard
    written = []
    monkeypatch.setattr(
        store,
        "write_shard",
        lambda root, shard, *rest, **options: (real_write_shard(root, shard, *rest, **options), written.append(shard)),
    )
    preprocess(image_folder, resumed, vae_dir, *flags)
    assert written == [2, 3]  # only the unfinished shards were encoded
    assert output_files(resumed) == output_files(tmp_path / "whole")
    assert keep_images == (store.shard_images_file(3) in output_files(tmp_path / "whole"))
    written.clear()
    preprocess(image_folder, resumed, vae_dir, *flags)  # a finished run is left as it is
    assert written == []
    LatentDataset(resumed, with_images=keep_images).verify()


def test_several_processes_write_what_one_process_writes(image_folder, tmp_path):
    preprocess(image_folder, tmp_path / "single")
    run = prepare_run(
        image_folder, tmp_path / "ranks", RESOLUTION, "none", False, IMAGES_PER_SHARD, torch.device("cpu")
    )
    start_run(run)
    pending = pending_shards(run)
    world_size = 3
    for rank in reversed(range(world_size)):  # ranks finish in any order
        encode_shards(
            run,
            pending[rank::world_size],
            batch_size=2,
            num_workers=0,
            device=torch.device("cpu"),
            progress=False,
        )
    finalize_run(run)
    assert output_files(tmp_path / "ranks") == output_files(tmp_path / "single")


# --- bad input: clear errors before any work ---


def test_a_rerun_with_other_vae_weights_under_the_same_path_is_refused(image_folder, tmp_path):
    """The VAE is compared by its weights: new weights in the same directory cannot finish a dataset
    begun with the old ones. A run.json from before the weights were recorded resumes and records them."""
    from diffusers import AutoencoderKL

    import models

    def save_vae(seed):
        torch.manual_seed(seed)
        AutoencoderKL(**TINY_VAE).save_pretrained(tmp_path / "vae_cur")
        return models.weights_sha256(AutoencoderKL.from_pretrained(tmp_path / "vae_cur").state_dict())

    def interrupt():  # as if the run had died while writing shard 1
        for path in [out / store.INDEX_FILE, *out.glob("shard-00001.*")]:
            path.unlink()

    old, out = save_vae(0), tmp_path / "out"
    assert preprocess(image_folder, out, tmp_path / "vae_cur")["vae_sha256"] == old
    interrupt()
    new = save_vae(1)
    before = output_files(out)
    with pytest.raises(UserError, match=rf"vae_sha256: '{old}' then, '{new}' now"):
        preprocess(image_folder, out, tmp_path / "vae_cur")
    assert output_files(out) == before  # refused before encoding anything
    # A run.json written before the weights were recorded: accepted, and the weights recorded from now on.
    settings = store.read_json(out / store.RUN_FILE)
    del settings["vae_sha256"]
    store.write_json(out / store.RUN_FILE, settings)
    assert preprocess(image_folder, out, tmp_path / "vae_cur")["vae_sha256"] == new
    assert store.read_json(out / store.RUN_FILE)["vae_sha256"] == new
    interrupt()
    save_vae(0)
    with pytest.raises(UserError, match=rf"vae_sha256: '{new}' then, '{old}' now"):
        preprocess(image_folder, out, tmp_path / "vae_cur")
    # A finished dataset whose index.json predates the weights' record still opens for training.
    save_vae(1)
    preprocess(image_folder, out, tmp_path / "vae_cur")
    index = store.read_json(out / store.INDEX_FILE)
    del index["vae_sha256"]
    store.write_json(out / store.INDEX_FILE, index)
    assert LatentDataset(out).meta["vae"] == str((tmp_path / "vae_cur").resolve())


def test_rerun_with_other_settings_is_refused(image_folder, tmp_path):
    preprocess(image_folder, tmp_path / "out")
    with pytest.raises(UserError, match=r"resolution: 16 then, 32 now"):
        main(["--input", str(image_folder), "--output", str(tmp_path / "out"), "--resolution", "32", "--vae", "none"])


def test_keep_images_is_a_setting_a_resumed_run_must_match(image_folder, vae_dir, tmp_path, monkeypatch):
    def crash(*args):
        raise KeyboardInterrupt  # the run dies after its last shard, before writing the index

    monkeypatch.setattr(store, "finalize", crash)
    with pytest.raises(KeyboardInterrupt):
        preprocess(image_folder, tmp_path / "out", vae_dir)
    monkeypatch.undo()
    before = output_files(tmp_path / "out")
    with pytest.raises(UserError, match=r"keep_images: False then, True now.*choose a new --output"):
        preprocess(image_folder, tmp_path / "out", vae_dir, "--keep-images")
    assert output_files(tmp_path / "out") == before
    # A run.json written before keep_images existed is a run without it.
    settings = store.read_json(tmp_path / "out" / store.RUN_FILE)
    del settings["keep_images"]
    store.write_json(tmp_path / "out" / store.RUN_FILE, settings)
    with pytest.raises(UserError, match=r"keep_images: False then, True now"):
        preprocess(image_folder, tmp_path / "out", vae_dir, "--keep-images")
    assert not preprocess(image_folder, tmp_path / "out", vae_dir)["has_images"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing input", "--input .*/no/such/folder does not exist"),
        ("input is a file", "--input .*/a_file is not a directory"),
        ("empty folder", "contains no images"),
        ("empty class folder", "class folder .*empty_class contains no images"),
        ("missing vae directory", "neither a local directory nor a hub id"),
        ("vae directory without a model", "cannot load the VAE .* no file named config.json"),
        ("resolution the vae cannot divide", "--resolution 15 is not divisible by 2"),
        ("resolution 0", "--resolution must be positive, got 0"),
        ("batch size 0", "--batch-size must be positive, got 0"),
        ("negative workers", "--num-workers must be non-negative, got -1"),
        ("images per shard 0", "--images-per-shard must be positive, got 0"),
        ("output folder of something else", "is not empty and holds no run.json"),
        ("output is a file", "--output .*/out exists and is not a directory"),
        ("output inside a file", "--output .*/a_file/out cannot be created: .*/a_file is not a directory"),
        ("output in a read-only folder", "--output .*/locked/out: no permission to write in .*/locked$"),
        ("damaged run.json", "run.json is not valid JSON .* truncated or corrupt"),
        ("output inside the input", "--output .*/images/out is inside --input .*/images: "),
        ("output is the input", "--output .*/images is the --input folder: "),
        ("input inside the output", "--input .*/data/images is inside --output .*/data: "),
    ],
)
def test_bad_input_is_a_clear_error_before_any_work(case, message, image_folder, vae_dir, tmp_path, monkeypatch):
    input_dir, vae, resolution, output = image_folder, vae_dir, RESOLUTION, tmp_path / "out"
    extra = []
    (tmp_path / "a_file").write_text("not a folder")
    if case == "missing input":
        input_dir = tmp_path / "no" / "such" / "folder"
    elif case == "input is a file":
        input_dir = tmp_path / "a_file"
    elif case == "empty folder":
        input_dir = tmp_path / "empty"
        input_dir.mkdir()
    elif case == "empty class folder":
        input_dir = tmp_path / "classes"
        (input_dir / "empty_class").mkdir(parents=True)
        (input_dir / "full_class").mkdir()
        random_image(np.random.default_rng(5), 8, 8).save(input_dir / "full_class" / "a.png")
    elif case == "missing vae directory":
        vae = tmp_path / "no" / "such" / "vae"
    elif case == "vae directory without a model":
        vae = tmp_path / "not_a_vae"
        vae.mkdir()
    elif case == "resolution the vae cannot divide":
        resolution = 15
    elif case == "resolution 0":
        resolution = 0
    elif case == "batch size 0":
        extra = ["--batch-size", "0"]
    elif case == "negative workers":
        extra = ["--num-workers", "-1"]
    elif case == "images per shard 0":
        extra = ["--images-per-shard", "0"]
    elif case == "output folder of something else":
        output.mkdir()
        (output / "thesis.tex").write_text("precious")
    elif case == "output is a file":
        output.write_text("precious")
    elif case == "output inside a file":
        output = tmp_path / "a_file" / "out"
    elif case == "output in a read-only folder":
        output = tmp_path / "locked" / "out"
        output.parent.mkdir()
        # chmod does not lock out root (as tests in a container often run), so the folder is locked
        # where the check asks.
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != output.parent and access(path, mode))
    elif case == "damaged run.json":
        output.mkdir()
        (output / store.RUN_FILE).write_text('{"format_version": 1, "inpu')
    elif case == "output inside the input":  # a rerun would take the output for an empty class folder
        input_dir = Path(shutil.copytree(image_folder, tmp_path / "images"))
        output = input_dir / "out"
    elif case == "output is the input":
        input_dir = output = Path(shutil.copytree(image_folder, tmp_path / "images"))
    elif case == "input inside the output":
        output = tmp_path / "data"
        input_dir = Path(shutil.copytree(image_folder, output / "images"))
    before = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*"))
    argv = ["--input", str(input_dir), "--output", str(output), "--resolution", str(resolution), "--vae", str(vae)]
    with pytest.raises(UserError, match=message) as error:
        main(argv + extra)
    assert "\n" not in str(error.value)
    assert sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*")) == before  # nothing written


def test_input_without_one_readable_image_is_a_clear_error(image_folder, tmp_path):
    (tmp_path / "images" / "cherry").mkdir(parents=True)
    for path in UNREADABLE:
        (tmp_path / "images" / path).write_bytes((image_folder / path).read_bytes())
    with pytest.raises(UserError, match=rf"none of the 2 input images could be read; see {tmp_path}/out/skipped.txt"):
        preprocess(tmp_path / "images", tmp_path / "out")
    assert not (tmp_path / "out" / store.INDEX_FILE).exists()


def test_a_mistake_on_the_command_line_is_one_line_and_exit_status_2(image_folder, tmp_path):
    (tmp_path / "out").write_text("precious")
    command = [sys.executable, "-m", "preprocessing", "--input", str(image_folder), "--output", str(tmp_path / "out")]
    result = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == f"error: --output {tmp_path / 'out'} exists and is not a directory\n"
