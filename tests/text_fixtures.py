"""Tiny CLIP models with random weights and a byte-level vocabulary, saved as the folders
`from_pretrained` reads: they stand in for openai/clip-vit-large-patch14 and PickScore, which cannot be
downloaded here. Captions and images for the text-to-image tests are generated too."""
import json
from pathlib import Path

import numpy as np

MAX_LENGTH = 77  # CLIP's tokenizer length, as the real text encoder
START, END = "<|startoftext|>", "<|endoftext|>"


def _byte_vocabulary():
    """CLIP's byte-to-character table (GPT-2's), each character alone and as a word end, plus the two
    special tokens: every text tokenizes, one token per byte, without any merges."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    characters = [chr(code) for code in codes]
    vocabulary = {}
    for character in characters:
        vocabulary[character] = len(vocabulary)
    for character in characters:
        vocabulary[character + "</w>"] = len(vocabulary)
    vocabulary[START] = len(vocabulary)
    vocabulary[END] = len(vocabulary)
    return vocabulary


def save_tokenizer(path):
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(_byte_vocabulary()))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=MAX_LENGTH)
    tokenizer.save_pretrained(path)
    return tokenizer


def _text_config(width, seed_vocabulary):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(seed_vocabulary), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_LENGTH, projection_dim=width,
        bos_token_id=seed_vocabulary[START], eos_token_id=seed_vocabulary[END], pad_token_id=seed_vocabulary[END],
    )


def tiny_text_encoder_dir(path, width=16, seed=0):
    """A CLIP text encoder folder (tokenizer + CLIPTextModel, 2 layers of `width`): what
    `--text-encoder openai/clip-vit-large-patch14` loads, at 77 × `width` per caption."""
    import torch
    from transformers import CLIPTextModel

    vocabulary = _byte_vocabulary()
    save_tokenizer(path)
    torch.manual_seed(seed)
    CLIPTextModel(_text_config(width, vocabulary)).save_pretrained(path)
    return Path(path)


def tiny_clip_dir(path, width=16, image_size=32, seed=0, logit_scale=None):
    """A full CLIP folder (CLIPModel: text and vision towers, tokenizer, image processor) for CLIP score
    and PickScore tests; `logit_scale` sets the learned temperature's log (PickScore's is log 100)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig

    vocabulary = _byte_vocabulary()
    save_tokenizer(path)
    vision = CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                              num_attention_heads=2, image_size=image_size, patch_size=8, projection_dim=width)
    config = CLIPConfig(text_config=_text_config(width, vocabulary).to_dict(), vision_config=vision.to_dict(),
                        projection_dim=width)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(logit_scale)
    model.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(path)
    return Path(path)


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "stripe")


def write_captioned_images(folder, count=12, size=16, seed=0, captions_per_image=(1, 3)):
    """`count` PNGs in one flat folder (as COCO's train2014) of a coloured square or stripe on grey, and a
    COCO-style annotation file beside the folder describing each in 1–3 captions. Returns the JSON path."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    names = list(COLOURS)
    for index in range(count):
        colour, shape = names[index % len(names)], SHAPES[(index // len(names)) % len(SHAPES)]
        pixels = np.full((size, size, 3), 128, np.uint8)
        if shape == "square":
            pixels[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = COLOURS[colour]
        else:
            pixels[:, size // 3: 2 * size // 3] = COLOURS[colour]
        file_name = f"COCO_train2014_{index:012d}.png"
        Image.fromarray(pixels).save(folder / file_name)
        images.append({"id": 1000 + index, "file_name": file_name, "height": size, "width": size})
        for k in range(int(rng.integers(captions_per_image[0], captions_per_image[1] + 1))):
            text = [f"a {colour} {shape}", f"A {shape} in {colour} on grey.", f"{colour} {shape}, centred"][k % 3]
            annotations.append({"id": len(annotations), "image_id": 1000 + index, "caption": text})
    path = folder.parent / f"captions_{folder.name}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path
