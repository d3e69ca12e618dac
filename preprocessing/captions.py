"""Captions files: which captions describe which image.

`read_captions(path)` returns {image path: [caption, ...]}, the path relative to the image folder and
'/'-separated, the captions in the order of the file. Three formats are read:

  * COCO's annotation JSON (captions_train2014.json): {"images": [{"id", "file_name", ...}, ...],
    "annotations": [{"image_id", "caption", ...}, ...]}; an image's captions are its annotations in
    file order, and every image listed must have at least one;
  * a JSON object {"relative/path.jpg": "a caption" or ["a caption", ...], ...};
  * tab-separated text: one `relative/path<TAB>caption` per line, several lines per image allowed,
    blank lines ignored.

A file whose name ends in `.json` (any case) is JSON, the COCO format when it has both "images" and
"annotations"; any other file is tab-separated. Caption texts are stripped of surrounding whitespace.
Every malformed input is a UserError naming the file and its first offending entry. The module has no
side effects: preprocessing and sampling (`sample_ddp.py --captions`) both read captions through it.
"""

import hashlib
import json
from pathlib import Path, PurePosixPath

from errors import UserError

SHOW_TEXT = 60  # characters of an offending line or value quoted in an error


def _quote(value) -> str:
    text = repr(value)
    return text if len(text) <= SHOW_TEXT else text[: SHOW_TEXT - 3] + "..."


def captions_sha256(path: str | Path) -> str:
    """sha256 of the file's bytes: a resumed run must read exactly the same captions file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")  # a byte order mark, as some editors write, is dropped
    except FileNotFoundError as error:
        raise UserError(f"the captions file {path} does not exist") from error
    except IsADirectoryError as error:
        raise UserError(f"the captions file {path} is a directory, not a file") from error
    except OSError as error:
        raise UserError(f"cannot read the captions file {path}: {error.strerror}") from error
    except UnicodeDecodeError as error:
        raise UserError(f"the captions file {path} is not UTF-8 text ({error})") from error


def _image_path(file: Path, where: str, value) -> str:
    """A path relative to the image folder, '/'-separated and normalized ('./a.jpg' is 'a.jpg')."""
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{file}: {where} has image path {_quote(value)}, not a non-empty string")
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or str(path) == ".":
        raise UserError(f"{file}: {where} has image path {_quote(value)}, not a path inside the image folder")
    return str(path)


def _caption(file: Path, where: str, value) -> str:
    if not isinstance(value, str):
        raise UserError(f"{file}: {where} has caption {_quote(value)}, which is not a string")
    text = value.strip()
    if not text:
        raise UserError(f"{file}: {where} has an empty caption ({_quote(value)})")
    return text


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """json's object hook: a key given twice would silently lose captions."""
    content = dict(pairs)
    if len(content) != len(pairs):
        keys = [key for key, _ in pairs]
        raise _DuplicateKey(next(key for key in keys if keys.count(key) > 1))
    return content


class _DuplicateKey(Exception):
    pass


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(_read_text(path), object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as error:
        raise UserError(f"the captions file {path} is not valid JSON ({error})") from error
    except _DuplicateKey as error:
        raise UserError(f"the captions file {path} has the key {_quote(error.args[0])} twice in one object") from error
    if not isinstance(content, dict):
        raise UserError(f"the captions file {path} holds a JSON {type(content).__name__}, not an object")
    return content


def _coco(path: Path, content: dict) -> dict[str, list[str]]:
    """COCO annotations: images by id, then each annotation's caption appended to its image's list."""
    images, annotations = content["images"], content["annotations"]
    for key, value in (("images", images), ("annotations", annotations)):
        if not isinstance(value, list) or not all(isinstance(entry, dict) for entry in value):
            raise UserError(f"{path}: \"{key}\" is not a list of objects, as in COCO's annotation files")
    names, captions = {}, {}  # image id -> relative path; relative path -> captions
    for k, image in enumerate(images):
        where = f"images[{k}]"
        if "id" not in image or "file_name" not in image:
            raise UserError(f"{path}: {where} lacks \"id\" or \"file_name\"")
        if isinstance(image["id"], (dict, list)):
            raise UserError(f"{path}: {where} has id {_quote(image['id'])}, not a number or a string")
        name = _image_path(path, f"{where} (id {image['id']})", image["file_name"])
        if image["id"] in names or name in captions:
            raise UserError(f"{path}: {where} repeats the id {image['id']!r} or the file {name!r} of an earlier image")
        names[image["id"]] = name
        captions[name] = []
    for k, annotation in enumerate(annotations):
        where = f"annotations[{k}]"
        if "image_id" not in annotation or "caption" not in annotation:
            raise UserError(f"{path}: {where} lacks \"image_id\" or \"caption\"")
        image_id = annotation["image_id"]
        if isinstance(image_id, (dict, list)) or image_id not in names:
            raise UserError(f"{path}: {where} has image_id {_quote(image_id)}, which is not among its images")
        captions[names[image_id]].append(_caption(path, f"{where} (image_id {image_id})", annotation["caption"]))
    for image_id, name in names.items():
        if not captions[name]:
            raise UserError(
                f"{path}: image {name} (id {image_id}) has no captions; remove it from \"images\" or caption it"
            )
    return captions


def _mapping(path: Path, content: dict) -> dict[str, list[str]]:
    """{"relative/path.jpg": "caption" or ["caption", ...]}."""
    captions = {}
    for key, value in content.items():
        name = _image_path(path, "an entry", key)
        where = f"the entry {_quote(key)}"
        if name in captions:
            raise UserError(f"{path}: {where} names the image {name} of an earlier entry")
        texts = value if isinstance(value, list) else [value]
        if not texts:
            raise UserError(f"{path}: {where} has no captions (an empty list)")
        captions[name] = [_caption(path, where, text) for text in texts]
    return captions


def _tab_separated(path: Path) -> dict[str, list[str]]:
    """`relative/path<TAB>caption` lines; an image's lines need not be adjacent."""
    captions = {}
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise UserError(
                f"{path}, line {number}: no tab between the image path and its caption: {_quote(line.rstrip())}"
            )
        name, text = line.split("\t", 1)
        where = f"line {number}"
        captions.setdefault(_image_path(path, where, name), []).append(_caption(path, where, text))
    return captions


def read_captions(path: str | Path) -> dict[str, list[str]]:
    """{image path relative to the image folder, '/'-separated: its captions in file order}, in the order
    the images first appear in the file; UserError naming the file and its first bad entry."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        content = _read_json(path)
        captions = _coco(path, content) if {"images", "annotations"} <= content.keys() else _mapping(path, content)
    else:
        captions = _tab_separated(path)
    if not captions:
        raise UserError(f"the captions file {path} holds no captions")
    return captions
