"""The input side: which images to encode, with which labels, in which order.

An ImageNet-style folder has one subfolder per class; the label of an image is the index of its
class subfolder in sorted order (as torchvision's `ImageFolder`), and images may sit at any depth
inside it. A folder with images and no subfolders is one class (label 0), for unconditional data.
The order (sorted by class, then by path) is fixed, so every process and every rerun agree on it.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

from errors import UserError
from preprocessing.image import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class ImageRecord:
    path: str  # relative to the input folder, '/'-separated
    label: int


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


def scan_image_folder(root: str | Path) -> ImageFolder:
    """List the images and labels, or raise UserError naming what is wrong with the folder."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"--input {root} does not exist")
    if not root.is_dir():
        raise UserError(f"--input {root} is not a directory")
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
