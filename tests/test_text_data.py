"""Text-to-image data (MS-COCO's path): captions files, the CLIP text encoder, preprocessing with
--captions (contexts, caption rows, null context, resume, bad input, several processes), and reading
(caption draw, loader invariance, verification)."""

import io
import json
import os
import shutil
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_VAE

import models
from errors import UserError
from preprocessing import store
from preprocessing.__main__ import main
from preprocessing.captions import read_captions
from preprocessing.dataset import CAPTION_STREAM, LatentDataset, ResumableSampler, make_loader
from preprocessing.text import CONTEXT_DTYPE, load_text_encoder, round_like_stored, to_stored
from tests.text_fixtures import tiny_text_encoder_dir, write_captioned_images

REPO = Path(__file__).resolve().parents[1]
RESOLUTION = 16
NUM_IMAGES = 7
IMAGES_PER_SHARD = 3  # 7 images -> shards of 3, 3, 1
WIDTH = 16  # the tiny text encoder's hidden size
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    return tiny_text_encoder_dir(tmp_path_factory.mktemp("text_encoder"))


@pytest.fixture(scope="module")
def encoder(encoder_dir):
    return load_text_encoder(str(encoder_dir))


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> tuple[Path, Path]:
    """(image folder, COCO captions JSON): 7 PNGs in one flat folder, 1 to 3 captions each."""
    root = tmp_path_factory.mktemp("coco")
    captions = write_captioned_images(root / "train2014", count=NUM_IMAGES, size=24)
    return root / "train2014", captions


def preprocess(images: Path, captions: Path | None, output: Path, encoder_dir: Path | None, *extra: str) -> dict:
    text = [] if captions is None else ["--captions", str(captions)]
    text += [] if encoder_dir is None else ["--text-encoder", str(encoder_dir)]
    return main([
        "--input", str(images), *text, "--output", str(output), "--resolution", str(RESOLUTION),
        "--vae", "none", "--batch-size", "2", "--num-workers", "0", "--images-per-shard", str(IMAGES_PER_SHARD),
        *extra,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def flipped(coco, encoder_dir, tmp_path_factory) -> Path:
    """The dataset every reading test shares (do not change it: copy it first): --flip, each caption
    encoded alone (--text-batch-size 1)."""
    output = tmp_path_factory.mktemp("flipped") / "data"
    preprocess(*coco, output, encoder_dir, "--flip", "--text-batch-size", "1")
    return output


def output_files(root: Path) -> dict[str, bytes]:
    """Everything a finished run leaves, but the log (it has timestamps) and a verification stamp."""
    return {
        path.name: path.read_bytes()
        for path in sorted(root.iterdir())
        if path.name not in (store.LOG_FILE, store.VERIFIED_FILE)
    }


def all_contexts(root: Path) -> np.ndarray:
    """(num_captions, L, D) float16: the context files joined in shard order (global rows)."""
    index = store.read_json(root / store.INDEX_FILE)
    return np.concatenate([np.load(root / shard["contexts_file"]) for shard in index["shards"]])


def bits(array: np.ndarray) -> bytes:
    """The exact bits of a float16 array (equal arrays of equal bits: -0.0 differs from 0.0, NaN equals NaN)."""
    assert array.dtype == np.float16
    return np.ascontiguousarray(array).tobytes()


def expected_caption_rows(captions: dict[str, list[str]], copies: int) -> np.ndarray:
    """[first global row, count] per sample, written out: images in sorted path order, mirror after image."""
    rows, first = [], 0
    for path in sorted(captions):
        rows += [[first, len(captions[path])]] * copies
        first += len(captions[path])
    return np.array(rows, dtype=np.int64)


# --- captions files ---


def write_formats(folder: Path, captions: dict[str, list[str]]) -> dict[str, Path]:
    """The same captions as COCO JSON, a JSON object and tab-separated lines (with blank lines, surrounding
    spaces, an image's lines not adjacent, and a caption holding a tab)."""
    folder.mkdir(parents=True, exist_ok=True)
    # Round r lists the r-th caption of every image that has one: an image's captions are not adjacent.
    numbered = list(enumerate(captions.items()))
    rounds = [(k, path, texts[r]) for r in range(3) for k, (path, texts) in numbered if r < len(texts)]
    images = [{"id": 10 + k, "file_name": path} for k, path in enumerate(captions)]
    annotations = [{"id": j, "image_id": 10 + k, "caption": f"  {text} "} for j, (k, _, text) in enumerate(rounds)]
    (folder / "coco.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    mapping = {path: texts if len(texts) > 1 else texts[0] for path, texts in captions.items()}
    (folder / "mapping.json").write_text(json.dumps(mapping))
    lines = [f"{path}\t {text}\n" for _, path, text in rounds]
    (folder / "captions.tsv").write_text("\n" + "\n".join(lines) + "\n\n")
    return {"coco": folder / "coco.json", "mapping": folder / "mapping.json", "tsv": folder / "captions.tsv"}


def test_the_three_formats_read_the_same_captions(tmp_path):
    captions = {"b.jpg": ["a cat", "a\tcat with a tab", "the cat"], "a/x.png": ["a dog"], "c.png": ["one", "two"]}
    files = write_formats(tmp_path, captions)
    for name, path in files.items():
        read = read_captions(path)
        assert read == captions, name
        assert list(read) == list(captions), name  # the order of first appearance
    # Paths are normalized ('./d/e.png' and 'd//e.png' are 'd/e.png'); an image's lines need not be adjacent.
    assert read_captions(_write(tmp_path / "dot.tsv", "./d/e.png\tx\nd//e.png\ty\n")) == {"d/e.png": ["x", "y"]}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


COCO_IMAGES = [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}]
BAD_CAPTIONS = {  # file name, content, what the error says (after the file's name)
    "caption not a string": (
        "c.json",
        {"images": COCO_IMAGES, "annotations": [{"image_id": 1, "caption": "ok"}, {"image_id": 2, "caption": 5}]},
        r"annotations\[1\] \(image_id 2\) has caption 5, which is not a string",
    ),
    "empty caption": (
        "c.json",
        {"images": COCO_IMAGES, "annotations": [{"image_id": 1, "caption": "ok"}, {"image_id": 2, "caption": " \n"}]},
        r"annotations\[1\] \(image_id 2\) has an empty caption",
    ),
    "unknown image_id": (
        "c.json",
        {"images": COCO_IMAGES, "annotations": [{"image_id": 1, "caption": "ok"}, {"image_id": 7, "caption": "x"}]},
        r"annotations\[1\] has image_id 7, which is not among its images",
    ),
    "image without captions": (
        "c.json",
        {"images": COCO_IMAGES, "annotations": [{"image_id": 1, "caption": "ok"}]},
        r"image b.png \(id 2\) has no captions",
    ),
    "annotation without caption": (
        "c.json",
        {"images": COCO_IMAGES, "annotations": [{"image_id": 1, "text": "ok"}]},
        r"annotations\[0\] lacks \"image_id\" or \"caption\"",
    ),
    "mapping caption not a string": ("m.json", {"a.png": ["ok", 3]}, r"the entry 'a.png' has caption 3, which is not"),
    "mapping without captions": ("m.json", {"a.png": "ok", "b.png": []}, r"the entry 'b.png' has no captions"),
    "mapping key twice": ("m.json", '{"a.png": "x", "a.png": "y"}', r"has the key 'a.png' twice"),
    "path outside the folder": ("m.json", {"../a.png": "x"}, r"image path '../a.png', not a path inside"),
    "json list": ("m.json", ["a.png", "x"], r"holds a JSON list, not an object"),
    "invalid json": ("c.json", '{"images": [{"id": 1, "file_name": "a.png"}], "annot', r"is not valid JSON"),
    "tsv line without tab": ("c.tsv", "a.png\tok\n\nb.png  no tab\n", r"line 3: no tab between .*'b.png  no tab'"),
    "tsv empty caption": ("c.tsv", "a.png\tok\nb.png\t  \n", r"line 2 has an empty caption"),
    "no captions at all": ("c.tsv", "\n\n", r"holds no captions"),
    "missing file": (None, None, r"the captions file .*missing.tsv does not exist"),
}


@pytest.mark.parametrize("case", BAD_CAPTIONS)
def test_malformed_captions_are_one_line_naming_the_entry_and_nothing_is_written(case, coco, encoder_dir, tmp_path):
    name, content, message = BAD_CAPTIONS[case]
    if name is None:
        path = tmp_path / "missing.tsv"
    else:
        text = content if isinstance(content, str) else json.dumps(content)
        path = _write(tmp_path / name, text)
    with pytest.raises(UserError, match=message) as error:
        read_captions(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(UserError, match=message):
        preprocess(coco[0], path, tmp_path / "out", encoder_dir)
    assert sorted(tmp_path.rglob("*")) == before  # no output folder, nothing else


# --- the text encoder ---


def test_the_text_encoder_is_clip_last_hidden_state_of_77_padded_tokens(encoder, encoder_dir):
    from transformers import CLIPTextModel, CLIPTokenizer

    assert (encoder.name, encoder.max_length, encoder.dim) == (str(encoder_dir.resolve()), 77, WIDTH)
    assert encoder.weights_sha256 == models.weights_sha256(CLIPTextModel.from_pretrained(encoder_dir).state_dict())
    assert not encoder.model.training and not any(p.requires_grad for p in encoder.model.parameters())
    captions = ["a red square", "", "x" * 200]  # the long one is cut at 77 tokens
    contexts = encoder.encode(captions)
    assert contexts.shape == (3, 77, WIDTH) and contexts.dtype == torch.float32 and contexts.device.type == "cpu"
    tokenizer, model = CLIPTokenizer.from_pretrained(encoder_dir), CLIPTextModel.from_pretrained(encoder_dir)
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(contexts, model(input_ids=ids).last_hidden_state, rtol=0, atol=0)
    assert torch.equal(encoder.null(), encoder.encode([""])[0])
    rounded = round_like_stored(contexts)
    assert rounded.dtype == torch.float32 and torch.equal(rounded, contexts.half().float())
    assert to_stored(contexts).dtype == CONTEXT_DTYPE and np.array_equal(to_stored(contexts), rounded.half().numpy())


def test_a_text_encoder_that_cannot_be_used_is_a_clear_error(encoder_dir, tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "bert")
    with pytest.raises(UserError, match="is a 'bert' model, not a CLIP text model"):
        load_text_encoder(str(tmp_path / "bert"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="cannot load the text encoder --text-encoder .*empty as a local directory"):
        load_text_encoder(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="neither a local directory nor a hub id"):
        load_text_encoder(str(tmp_path / "no" / "such"))
    unbounded = shutil.copytree(encoder_dir, tmp_path / "unbounded")
    config = json.loads((unbounded / "tokenizer_config.json").read_text())
    del config["model_max_length"]
    (unbounded / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"model_max_length 1000000000000000019884624838656: set model_max_length"):
        load_text_encoder(str(unbounded))


# --- preprocessing ---


def test_contexts_are_the_encoded_captions_in_float16_and_rows_follow_the_flip(flipped, coco, encoder):
    captions = read_captions(coco[1])
    index = store.read_json(flipped / store.INDEX_FILE)
    total = sum(map(len, captions.values()))
    assert (index["condition"], index["num_classes"], index["class_names"]) == ("text", 1, ["text"])
    assert (index["num_samples"], index["num_images"], index["num_captions"]) == (2 * NUM_IMAGES, NUM_IMAGES, total)
    assert (index["context_shape"], index["context_dtype"]) == ([77, WIDTH], "float16")
    assert (index["text_encoder"], index["text_encoder_sha256"]) == (encoder.name, encoder.weights_sha256)
    assert [shard["contexts_file"] for shard in index["shards"]] == [f"contexts-0000{k}.npy" for k in range(3)]
    assert np.load(flipped / store.LABELS_FILE).tolist() == [0] * 2 * NUM_IMAGES
    # Each caption's context is the encoder's output for it, rounded to float16: bit for bit.
    contexts, paths = all_contexts(flipped), sorted(captions)
    assert contexts.dtype == np.float16 and contexts.shape == (total, 77, WIDTH)
    texts = [text for path in paths for text in captions[path]]
    for row, text in enumerate(texts):
        assert bits(contexts[row]) == bits(to_stored(encoder.encode([text]))[0])
    rows = np.load(flipped / store.CAPTION_ROWS_FILE)
    assert rows.dtype == np.int64 and np.array_equal(rows, expected_caption_rows(captions, copies=2))
    null = np.load(flipped / store.NULL_CONTEXT_FILE)
    assert null.dtype == np.float16 and bits(null) == bits(to_stored(encoder.null()[None])[0])
    # The manifests hold the texts per image and the counts per sample; the files are plain .npy files.
    manifest = store.read_json(flipped / store.shard_manifest_file(1))
    assert manifest["images"] == paths[3:6] and manifest["captions"] == [captions[path] for path in paths[3:6]]
    assert manifest["caption_counts"] == [len(captions[path]) for path in paths[3:6] for _ in range(2)]
    assert manifest["num_contexts"] == index["shards"][1]["num_contexts"] == sum(manifest["caption_counts"]) // 2
    buffer = io.BytesIO()
    np.save(buffer, np.load(flipped / "contexts-00001.npy"))
    assert (flipped / "contexts-00001.npy").read_bytes() == buffer.getvalue()
    dataset = LatentDataset(flipped)
    assert dataset.condition == "text" and dataset.context_shape == (77, WIDTH)
    assert torch.equal(dataset.null_context(), round_like_stored(encoder.null()))
    assert dataset.verify(stamp=False) is True


def test_the_three_captions_formats_make_the_same_dataset(coco, encoder, encoder_dir, tmp_path):
    files = write_formats(tmp_path / "captions", read_captions(coco[1]))
    indexes = {name: preprocess(coco[0], path, tmp_path / name, encoder_dir, "--text-batch-size", "2")
               for name, path in files.items()}  # fmt: skip
    assert len({index["checksum"] for index in indexes.values()}) == 1
    data_files = lambda root: {name: data for name, data in output_files(root).items() if name.endswith(".npy")}
    assert data_files(tmp_path / "coco") == data_files(tmp_path / "mapping") == data_files(tmp_path / "tsv")
    differ = {"captions_file", "captions_sha256"}
    strip = lambda index: {key: value for key, value in index.items() if key not in differ}
    assert strip(indexes["coco"]) == strip(indexes["mapping"]) == strip(indexes["tsv"])
    assert indexes["tsv"]["captions_file"] == str(files["tsv"].resolve())
    # Batched: each context file is the shard's captions encoded 2 at a time, rounded.
    captions = read_captions(coco[1])
    for k, shard in enumerate(indexes["coco"]["shards"]):
        manifest = store.read_json(tmp_path / "coco" / store.shard_manifest_file(k))
        texts = [text for image in manifest["captions"] for text in image]
        assert manifest["captions"] == [captions[path] for path in manifest["images"]]
        expected = np.concatenate([to_stored(encoder.encode(texts[k : k + 2])) for k in range(0, len(texts), 2)])
        assert bits(np.load(tmp_path / "coco" / shard["contexts_file"])) == bits(expected)
    rows = np.load(tmp_path / "coco" / store.CAPTION_ROWS_FILE)
    assert np.array_equal(rows, expected_caption_rows(captions, copies=1))


def test_a_tiny_vae_dataset_has_the_same_text_files(coco, encoder_dir, flipped, tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**TINY_VAE).save_pretrained(tmp_path / "vae")
    index = main([
        "--input", str(coco[0]), "--captions", str(coco[1]), "--text-encoder", str(encoder_dir),
        "--output", str(tmp_path / "out"), "--resolution", str(RESOLUTION), "--vae", str(tmp_path / "vae"),
        "--flip", "--keep-images", "--text-batch-size", "1", "--batch-size", "2", "--num-workers", "0",
        "--images-per-shard", str(IMAGES_PER_SHARD),
    ])  # fmt: skip
    assert (index["kind"], index["condition"], index["stored_shape"]) == ("vae", "text", [8, 8, 8])
    text_files = [*(f"contexts-0000{k}.npy" for k in range(3)), store.CAPTION_ROWS_FILE, store.NULL_CONTEXT_FILE]
    for name in text_files:
        assert (tmp_path / "out" / name).read_bytes() == (flipped / name).read_bytes()
    dataset = LatentDataset(tmp_path / "out", expected_shape=(4, 8, 8), with_images=True)
    moments, contexts, images = dataset.get_batch([0, 5, 13], [0, 1, 2])
    assert moments.shape == (3, 8, 8, 8) and images.shape == (3, 3, RESOLUTION, RESOLUTION)
    assert contexts.shape == (3, 77, WIDTH) and contexts.dtype == torch.float16
    pixel = LatentDataset(flipped)
    assert torch.equal(contexts, pixel.get_batch([0, 5, 13], [0, 1, 2])[1])
    assert torch.equal(images, pixel.get_batch([0, 5, 13], [0, 1, 2])[0].add(1).mul(127.5).round().to(torch.uint8))
    assert dataset.verify() is True


def test_unreadable_images_are_skipped_with_their_captions(coco, encoder, encoder_dir, tmp_path):
    images = shutil.copytree(coco[0], tmp_path / "images")
    (images / "nested").mkdir()
    shutil.copy(images / "COCO_train2014_000000000000.png", images / "nested" / "copy.png")
    (images / "nested" / "broken.png").write_bytes(b"not a png at all" * 10)
    content = json.loads(coco[1].read_text())
    content["images"] += [{"id": 1, "file_name": "nested/broken.png"}, {"id": 2, "file_name": "nested/copy.png"}]
    content["annotations"] += [
        {"image_id": 1, "caption": "lost"}, {"image_id": 2, "caption": "kept"}, {"image_id": 1, "caption": "lost too"}
    ]  # fmt: skip
    captions = _write(tmp_path / "captions.json", json.dumps(content))
    index = preprocess(images, captions, tmp_path / "out", encoder_dir, "--text-batch-size", "1")
    skipped = (tmp_path / "out" / store.SKIPPED_FILE).read_text().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith("nested/broken.png\tUnidentifiedImageError")
    assert "skipped " + str(images / "nested" / "broken.png") in (tmp_path / "out" / store.LOG_FILE).read_text()
    read = read_captions(captions)
    kept = {path: texts for path, texts in read.items() if path != "nested/broken.png"}
    assert (index["num_images"], index["num_skipped"]) == (NUM_IMAGES + 1, 1)
    assert index["num_captions"] == sum(map(len, kept.values()))
    manifests = [store.read_json(tmp_path / "out" / store.shard_manifest_file(k)) for k in range(3)]
    assert [path for m in manifests for path in m["images"]] == sorted(kept)  # the flat folder, then nested/
    assert [texts for m in manifests for texts in m["captions"]] == [kept[path] for path in sorted(kept)]
    contexts = all_contexts(tmp_path / "out")
    texts = [text for path in sorted(kept) for text in kept[path]]
    assert np.array_equal(contexts, np.concatenate([to_stored(encoder.encode([text])) for text in texts]))
    assert np.array_equal(np.load(tmp_path / "out" / store.CAPTION_ROWS_FILE), expected_caption_rows(kept, 1))


@pytest.mark.parametrize(
    "case, message",
    [
        ("listed images missing", r"2 of the 9 images listed in .*captions.json are not files under --input "
                                  r".*train2014 \(first: gone/a.png, gone/b.png\)"),
        ("text encoder without captions", r"--text-encoder needs --captions"),
        ("text batch size 0", r"--text-batch-size must be positive, got 0"),
        ("text encoder that is not one", r"cannot load the text encoder --text-encoder .*not_an_encoder"),
        ("default text encoder", r"loading openai/clip-vit-large-patch14"),
    ],
)  # fmt: skip
def test_bad_text_input_is_a_clear_error_before_anything_is_written(case, message, coco, encoder_dir, tmp_path,
                                                                    monkeypatch):
    images, captions, encoder, extra = coco[0], coco[1], encoder_dir, []
    if case == "listed images missing":
        content = json.loads(coco[1].read_text())
        content["images"] += [{"id": 1, "file_name": "gone/b.png"}, {"id": 2, "file_name": "gone/a.png"}]
        content["annotations"] += [{"image_id": 1, "caption": "x"}, {"image_id": 2, "caption": "y"}]
        captions = _write(tmp_path / "captions.json", json.dumps(content))
    elif case == "text encoder without captions":
        captions = None
    elif case == "text batch size 0":
        extra = ["--text-batch-size", "0"]
    elif case == "text encoder that is not one":
        encoder = tmp_path / "not_an_encoder"
        encoder.mkdir()
    elif case == "default text encoder":  # cannot be downloaded here: show which one would be loaded
        import preprocessing.encode

        def loading(name, device):
            raise UserError(f"loading {name}")

        monkeypatch.setattr(preprocessing.encode, "load_text_encoder", loading)
        encoder = None
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(UserError, match=message) as error:
        preprocess(images, captions, tmp_path / "out", encoder, *extra)
    assert "\n" not in str(error.value)
    assert sorted(tmp_path.rglob("*")) == before


def test_resume_after_interruption_writes_the_files_of_an_uninterrupted_run(
    flipped, coco, encoder_dir, tmp_path, monkeypatch
):
    resumed = tmp_path / "resumed"
    real_write_npy = store._write_npy_atomic

    def write_npy_or_crash(path, blocks):  # the process dies while it writes the contexts of shard 1
        if path.name == store.shard_contexts_file(1):
            path.with_name(f".{path.name}.tmp-1").write_bytes(b"partial")
            raise KeyboardInterrupt
        return real_write_npy(path, blocks)

    monkeypatch.setattr(store, "_write_npy_atomic", write_npy_or_crash)
    with pytest.raises(KeyboardInterrupt):
        preprocess(*coco, resumed, encoder_dir, "--flip", "--text-batch-size", "1")
    monkeypatch.undo()
    assert store.is_shard_done(resumed, 0) and not store.is_shard_done(resumed, 1)
    written, real_write_shard = [], store.write_shard
    monkeypatch.setattr(
        store, "write_shard", lambda root, shard, *rest, **options: (
            real_write_shard(root, shard, *rest, **options), written.append(shard))
    )  # fmt: skip
    preprocess(*coco, resumed, encoder_dir, "--flip", "--text-batch-size", "1")
    assert written == [1, 2]
    assert output_files(resumed) == output_files(flipped)
    # A finished run whose index and a context file are lost, or a shard manifest: only that shard again.
    for lost in [store.shard_contexts_file(0), store.shard_manifest_file(2)]:
        written.clear()
        (resumed / store.INDEX_FILE).unlink()
        (resumed / lost).unlink()
        preprocess(*coco, resumed, encoder_dir, "--flip", "--text-batch-size", "1")
        assert written == [0 if lost.startswith("contexts") else 2]
        assert output_files(resumed) == output_files(flipped)
    written.clear()
    preprocess(*coco, resumed, encoder_dir, "--flip", "--text-batch-size", "1")  # finished: left as it is
    assert written == []


def test_a_rerun_with_other_captions_or_another_text_encoder_is_refused(coco, encoder_dir, tmp_path, monkeypatch):
    captions = shutil.copy(coco[1], tmp_path / "captions.json")
    encoder = shutil.copytree(encoder_dir, tmp_path / "encoder")

    def crash(*args):
        raise KeyboardInterrupt  # the run dies after its last shard, before writing the index

    monkeypatch.setattr(store, "finalize", crash)
    with pytest.raises(KeyboardInterrupt):
        preprocess(coco[0], captions, tmp_path / "out", encoder)
    monkeypatch.undo()
    before = output_files(tmp_path / "out")
    content = json.loads(Path(captions).read_text())
    content["annotations"][0]["caption"] = "a different caption"
    Path(captions).write_text(json.dumps(content))
    with pytest.raises(UserError, match=r"captions_sha256: '[0-9a-f]{64}' then, '[0-9a-f]{64}' now.*choose a new"):
        preprocess(coco[0], captions, tmp_path / "out", encoder)
    shutil.copy(coco[1], captions)  # the same captions again, but other weights under the same name
    shutil.rmtree(encoder)
    tiny_text_encoder_dir(encoder, seed=1)
    with pytest.raises(UserError, match=r"text_encoder_sha256: '[0-9a-f]{64}' then, '[0-9a-f]{64}' now"):
        preprocess(coco[0], captions, tmp_path / "out", encoder)
    with pytest.raises(UserError, match=r"captions_sha256: '[0-9a-f]{64}' then, None now"):  # class data now
        main(["--input", str(coco[0]), "--output", str(tmp_path / "out"), "--resolution", str(RESOLUTION),
              "--vae", "none", "--images-per-shard", str(IMAGES_PER_SHARD)])  # fmt: skip
    assert output_files(tmp_path / "out") == before


def test_several_processes_write_what_one_process_writes(flipped, coco, encoder_dir, tmp_path):
    """torch.distributed.run with 2 CPU processes (gloo), as torchrun on 2 GPUs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
         "-m", "preprocessing", "--input", str(coco[0]), "--captions", str(coco[1]), "--text-encoder",
         str(encoder_dir), "--output", str(tmp_path / "ranks"), "--resolution", str(RESOLUTION), "--vae", "none",
         "--batch-size", "2", "--num-workers", "0", "--images-per-shard", str(IMAGES_PER_SHARD), "--flip",
         "--text-batch-size", "1"],
        check=True, env=env, cwd=REPO, timeout=600, capture_output=True,
    )  # fmt: skip
    assert "2 process(es)" in (tmp_path / "ranks" / store.LOG_FILE).read_text()
    assert output_files(tmp_path / "ranks") == output_files(flipped)


# --- reading ---


def flip_a_byte(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("file", ["contexts-00001.npy", store.CAPTION_ROWS_FILE, store.NULL_CONTEXT_FILE])
def test_verify_finds_a_changed_byte_in_the_text_files(flipped, tmp_path, file):
    root = shutil.copytree(flipped, tmp_path / "data")
    (root / store.VERIFIED_FILE).unlink(missing_ok=True)
    assert LatentDataset(root).verify() is True
    # In caption_rows.npy the lowest byte of sample 0's first row: 0 becomes 1, still a valid row.
    flip_a_byte(root / file, -16 * 2 * NUM_IMAGES if file == store.CAPTION_ROWS_FILE else -1)
    with pytest.raises(UserError, match=rf"{root / file} has sha256 .* index.json says .*the dataset is corrupt"):
        LatentDataset(root).verify()


DAMAGE = {  # what is done to the dataset, the file the error names, what it says
    "contexts cut": (lambda r: r.joinpath("contexts-00002.npy").write_bytes(
        r.joinpath("contexts-00002.npy").read_bytes()[:-2]), "contexts-00002.npy", "truncated"),
    "contexts missing": (lambda r: r.joinpath("contexts-00000.npy").unlink(), "contexts-00000.npy", "is missing"),
    "null context of another shape": (lambda r: np.save(r / "null_context.npy", np.zeros((77, 8), np.float16)),
                                      "null_context.npy", r"holds float16 \(77, 8\), the index says .* \(77, 16\)"),
    "caption rows out of range": (lambda r: np.save(r / "caption_rows.npy", np.tile([[0, 99]], (14, 1))),
                                  "caption_rows.npy", "corrupt: sample 0 has 99 captions from row 0, outside"),
    "index without context shape": (lambda r: _edit_index(r, lambda i: i.pop("context_shape")), "index.json",
                                    "lacks context_shape;"),
    "shard entry without contexts": (lambda r: _edit_index(r, lambda i: i["shards"][1].pop("contexts_file")),
                                     "index.json", r"lacks shards\[\]\.contexts_file;"),
    "unknown condition": (lambda r: _edit_index(r, lambda i: i.update(condition="audio")), "index.json",
                          "has condition 'audio', neither 'class' nor 'text'"),
}  # fmt: skip


def _edit_index(root: Path, change) -> None:
    index = json.loads((root / store.INDEX_FILE).read_text())
    change(index)
    (root / store.INDEX_FILE).write_text(json.dumps(index))


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_text_file_is_a_one_line_error_naming_it(flipped, tmp_path, case):
    root = shutil.copytree(flipped, tmp_path / "data")
    damage, file, message = DAMAGE[case]
    damage(root)
    with pytest.raises(UserError, match=rf"{root / file}\b.*{message}") as error:
        LatentDataset(root)
    assert "\n" not in str(error.value)


def test_class_data_say_class_and_have_no_contexts(data_dir, tmp_path):
    dataset = LatentDataset(data_dir)
    assert dataset.meta["condition"] == "class" and dataset.condition == "class" and dataset.context_shape is None
    with pytest.raises(ValueError, match="class-conditional data .* no null context; preprocess .* with --captions"):
        dataset.null_context()
    root = shutil.copytree(data_dir, tmp_path / "data")
    _edit_index(root, lambda index: index.pop("condition"))  # written before text data existed
    old = LatentDataset(root)
    assert old.condition == "class" and old.verify(stamp=False) and len(old.get_batch([0, 1])) == 2


def caption_draw(dataset: LatentDataset, seed: int, epoch: int) -> np.ndarray:
    """The documented draw, written out: k = floor(u[i] * count_i), u from [seed, CAPTION_STREAM, epoch]."""
    u = np.random.default_rng([seed, CAPTION_STREAM, epoch]).random(len(dataset))
    return np.floor(u * dataset.caption_rows[:, 1]).astype(np.int64)


def test_the_caption_draw_is_the_formula_and_reaches_every_caption(flipped):
    dataset = LatentDataset(flipped, caption_seed=3)
    contexts, everything = all_contexts(flipped), np.arange(len(dataset))
    first, counts = dataset.caption_rows[:, 0], dataset.caption_rows[:, 1]
    seen = np.zeros(len(contexts), bool)
    for epoch in range(40):
        choice = dataset.caption_choice(everything, epoch)
        assert np.array_equal(choice, caption_draw(dataset, 3, epoch))
        assert (choice >= 0).all() and (choice < counts).all()
        seen[first + choice] = True
    assert seen.all()  # every caption of every image, and of its mirror's
    _, batch = dataset.get_batch(everything, 7)  # one epoch for all
    assert batch.dtype == torch.float16 and np.array_equal(batch.numpy(), contexts[first + caption_draw(dataset, 3, 7)])
    epochs = [0, 5, 5, 2, 0, 9]  # one per index
    _, batch = dataset.get_batch([1, 1, 4, 13, 0, 6], epochs)
    expected = [contexts[first[i] + caption_draw(dataset, 3, e)[i]] for i, e in zip([1, 1, 4, 13, 0, 6], epochs)]
    assert np.array_equal(batch.numpy(), np.stack(expected))
    sample, context = dataset[4]  # an item is its epoch-0 caption
    assert np.array_equal(context.numpy(), contexts[first[4] + caption_draw(dataset, 3, 0)[4]])
    assert torch.equal(sample, dataset.get_batch([4])[0][0])
    other = dataset.with_caption_seed(4)
    assert other.caption_seed == 4 and dataset.caption_seed == 3 and dataset.with_caption_seed(3) is dataset
    assert any(not np.array_equal(other.caption_choice(everything, e), dataset.caption_choice(everything, e))
               for e in range(3))  # fmt: skip


def drawn_contexts(flipped: Path, loader, sampler: ResumableSampler, num_batches: int, batch_size: int) -> dict:
    """{(index, epoch): context bytes} of what the loader yields, the draws known from the sampler."""
    draws = list(islice(sampler.draws(), num_batches * batch_size))
    out = {}
    for k, (_, contexts) in enumerate(islice(loader, num_batches)):
        for (index, epoch), context in zip(draws[k * batch_size : (k + 1) * batch_size], contexts, strict=True):
            out[index, epoch] = context.numpy().tobytes()
    return out


def test_the_draw_is_the_same_for_any_world_size_and_worker_count_and_resumes_exactly(flipped):
    dataset = LatentDataset(flipped, caption_seed=0)  # the loader's seed is the caption seed, not this one
    contexts, seed, batch_size, num_batches = all_contexts(flipped), 11, 4, 9  # 14 samples: batches span epochs
    expected = lambda index, epoch: contexts[dataset.caption_rows[index, 0] + caption_draw(dataset, seed, epoch)[index]]
    runs = {}
    for world_size, num_workers in [(1, 0), (2, 0), (1, 2)]:
        drawn = {}
        for rank in range(world_size):
            loader = make_loader(dataset, batch_size, rank=rank, world_size=world_size, seed=seed,
                                 num_workers=num_workers)  # fmt: skip
            sampler = ResumableSampler(len(dataset), rank=rank, world_size=world_size, seed=seed)
            drawn |= drawn_contexts(flipped, loader, sampler, num_batches, batch_size)
        assert all(context == expected(*key).tobytes() for key, context in drawn.items())
        runs[world_size, num_workers] = drawn
    assert runs[1, 0] == runs[1, 2]
    common = runs[1, 0].keys() & runs[2, 0].keys()
    assert len(common) > 14 and all(runs[1, 0][key] == runs[2, 0][key] for key in common)
    assert len({epoch for _, epoch in runs[2, 0]}) >= 3
    for num_workers in [0, 2]:  # resumed at `consumed`, a loader yields the batches of an uninterrupted one
        load = lambda consumed, workers: make_loader(dataset, batch_size, rank=1, world_size=2, seed=seed,
                                                     consumed=consumed, num_workers=workers)  # fmt: skip
        uninterrupted = list(islice(load(0, num_workers), 7))
        resumed = list(islice(load(3 * batch_size, num_workers), 4))
        for (x, c), (x_resumed, c_resumed) in zip(uninterrupted[3:], resumed, strict=True):
            assert torch.equal(x, x_resumed) and torch.equal(c, c_resumed)
