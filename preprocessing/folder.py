"""The input side: which images to encode, with which labels, in which order.

An ImageNet-style folder has one subfolder per class; the label of an image is the index of its
class subfolder in sorted order (as torchvision's `ImageFolder`), and images may sit at any depth
inside it. A folder with images and no subfolders is one class (label 0), for unconditional data.
The order (sorted by class, then by path) is fixed, so every process and every rerun agree on it.

Text-to-image data (--captions) take their images from the captions file instead: exactly the images it
lists, sorted by relative path, each with its captions; the folder layout is then free (MS-COCO's
train2014 is one flat folder) and every image has label 0, the one class "text".
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

from errors import UserError
from preprocessing.captions import read_captions
from preprocessing.image import IMAGE_EXTENSIONS

TEXT_CLASS_NAME = "text"  # the one class of text-to-image data
SHOW_MISSING = 3  # missing images named in the error


@dataclass(frozen=True)
class ImageRecord:
    path: str  # relative to the input folder, '/'-separated
    label: int
    captions: tuple[str, ...] = ()  # text-to-image data: the image's captions, in captions-file order


@dataclass(frozen=True)
class ImageFolder:
    root: Path
    class_names: list[str]
    records: list[ImageRecord]

    def fingerprint(self) -> str:
        """sha256 of the file list and labels: a resumed run must see exactly the same input."""
        digest = hashlib.sha256()
        for record in self.records:
            digest.update(f"{record.label}\t{record.path}\n".encode())
        return digest.hexdigest()


def _is_image_file(path: Path) -> bool:
    # Hidden files are skipped: macOS leaves `._name.jpg` metadata files next to real images.
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def _image_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if _is_image_file(path))


def _check_root(root: Path) -> None:
    if not root.exists():
        raise UserError(f"--input {root} does not exist")
    if not root.is_dir():
        raise UserError(f"--input {root} is not a directory")


def scan_image_folder(root: str | Path) -> ImageFolder:
    """List the images and labels, or raise UserError naming what is wrong with the folder."""
    root = Path(root)
    _check_root(root)
    class_dirs = sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
    top_level_images = [path for path in root.iterdir() if _is_image_file(path)]
    if class_dirs and top_level_images:
        raise UserError(
            f"--input {root} has both class subfolders ({len(class_dirs)}) and images at the top level "
            f"(e.g. {top_level_images[0].name}); put every image in its class subfolder"
        )
    if not class_dirs:
        files = _image_files(root)
        if not files:
            raise UserError(f"--input {root} contains no images (extensions: {sorted(IMAGE_EXTENSIONS)})")
        records = [ImageRecord(path.relative_to(root).as_posix(), 0) for path in files]
        return ImageFolder(root, [root.name], records)
    records = []
    for label, class_dir in enumerate(class_dirs):
        files = _image_files(class_dir)
        if not files:
            raise UserError(f"class folder {class_dir} contains no images; remove it or add its images")
        records += [ImageRecord(path.relative_to(root).as_posix(), label) for path in files]
    return ImageFolder(root, [path.name for path in class_dirs], records)


def captioned_image_folder(root: str | Path, captions_file: str | Path) -> ImageFolder:
    """The images the captions file lists (`preprocessing.captions.read_captions`), sorted by relative
    path, with their captions and label 0; UserError when any of them is not a file under `root`."""
    root = Path(root)
    _check_root(root)
    captions = read_captions(captions_file)
    paths = sorted(captions)
    missing = [path for path in paths if not (root / path).is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} of the {len(paths)} images listed in {captions_file} are not files under --input "
            f"{root} (first: {', '.join(missing[:SHOW_MISSING])})"
        )
    records = [ImageRecord(path, 0, tuple(captions[path])) for path in paths]
    return ImageFolder(root, [TEXT_CLASS_NAME], records)
