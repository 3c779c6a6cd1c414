"""Importers: a dataset from where users keep it, into the harness's layout, validated by content.

- `cifar100`: CIFAR-100's python pickles (train, test, meta), the whole set or a subset;
- `cifar10`: CIFAR-10's python pickles (data_batch_1..N, test_batch, batches.meta);
- `images`: a folder of images, SRC/train/<class>/*.png|jpg|jpeg and SRC/test/<class>/*; classes
  in sorted order of their folder names, every image decoded to RGB and brought to S x S
  pixels (shorter side resized to S with the stated filter, then the centre S x S cut out;
  an image already S x S is kept as it is).

Every problem is one line naming the file (a corrupt image, a pickle without labels, a test
class that train lacks); nothing is installed unless the whole dataset is valid.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np

from harness import data as data_mod
from harness.data import DataError, file_digest

FORMATS = ("auto", "cifar100", "cifar10", "images")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
RESIZE_FILTERS = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_CLASSES = 10
# md5 of the official CIFAR-10 python pickles (as the archive at cs.toronto.edu unpacks, and as
# torchvision checks them): all seven matching means the data is the official CIFAR-10.
CIFAR10_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}

Log = Callable[[str], None] | None


# -- recognising a layout ---------------------------------------------------------------------

def _has_class_folders(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_dir() for p in folder.iterdir())


def detect_format(src: Path) -> tuple[str, Path]:
    """(format, folder) of what `src` holds, looking inside it one level for the usual folder names."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: folder not found")
    for folder in (src, src / data_mod.FOLDER, src / CIFAR10_FOLDER):
        if (folder / "data_batch_1").is_file() or (folder / "test_batch").is_file():
            return "cifar10", folder
        if (folder / "train").is_file():  # a pickle named train: CIFAR-100's (its loader says what is missing)
            return "cifar100", folder
    if _has_class_folders(src / "train"):
        return "images", src
    raise DataError(f"{src}: not a dataset layout the harness knows: expected CIFAR-100 pickles (train, test), "
                    "CIFAR-10 pickles (data_batch_1.., test_batch) or image folders (train/<class>/*.png|jpg, "
                    "test/<class>/...)")


def default_name(fmt: str, src: Path) -> str:
    """cifar100 / cifar10 for the pickles; for images the source folder's name, made a valid name."""
    if fmt in ("cifar100", "cifar10"):
        return fmt
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "-", Path(src).resolve().name).strip("-.") or "images"
    return name[:64]


def prepare_from(src: Path, root: Path, fmt: str = "auto", name: str | None = None, image_size: int = 32,
                 resize_filter: str = "bicubic", skip_bad: bool = False, log: Log = None) -> data_mod.Dataset:
    """Import `src` (in format `fmt`, or the one detected) as dataset `name` under `root`."""
    if fmt not in FORMATS:
        raise DataError(f"unknown --format {fmt!r}; one of {', '.join(FORMATS)}")
    found, folder = detect_format(src)
    if fmt != "auto" and fmt != found:
        if fmt == "images" or found == "images":
            raise DataError(f"{src}: holds {found} data, not {fmt} (drop --format to import what is there)")
        found = fmt  # two pickle layouts: let the chosen importer say what is missing
    name = data_mod.check_dataset_name(name or default_name(found, folder))
    if found == "cifar100":
        if name != data_mod.PAPER_DATASET:  # the pickles under another name: the general layout
            d = data_mod.load_cifar100(folder)
            arrays = {k: getattr(d, k) for k in data_mod.ARRAYS}
            return data_mod.write_dataset(root, name, arrays, d.class_names,
                                          {"format": "cifar100", "path": str(folder)}, log=log)
        return data_mod.import_folder(folder, root, log=log)
    if name == data_mod.PAPER_DATASET:
        raise DataError(f"{data_mod.PAPER_DATASET!r} names the CIFAR-100 pickle folder; choose another --name")
    if found == "cifar10":
        return import_cifar10(folder, root, name, log)
    return import_images(folder, root, name, image_size, resize_filter, skip_bad, log)


# -- CIFAR-10 python pickles --------------------------------------------------------------------

def cifar10_batches(folder: Path) -> list[Path]:
    """data_batch_1..N in order, N >= 1, without gaps (a subset of the five is fine)."""
    batches = []
    while (folder / f"data_batch_{len(batches) + 1}").is_file():
        batches.append(folder / f"data_batch_{len(batches) + 1}")
    stray = sorted(p.name for p in folder.glob("data_batch_*") if p not in batches)
    if not batches:
        raise DataError(f"{folder}: no data_batch_1 (CIFAR-10's first train batch)")
    if stray:
        raise DataError(f"{folder}: {stray[0]} follows a missing batch (have data_batch_1..{len(batches)}); "
                        "batches must be numbered from 1 without gaps")
    if not (folder / "test_batch").is_file():
        raise DataError(f"{folder}: no test_batch (CIFAR-10's test set)")
    return batches


def import_cifar10(folder: Path, root: Path, name: str = "cifar10", log: Log = None) -> data_mod.Dataset:
    folder = Path(folder)
    batches = cifar10_batches(folder)
    meta = folder / "batches.meta"
    if meta.is_file():
        names = data_mod._read_pickle(meta).get("label_names")
        if not (isinstance(names, list) and len(names) >= 2):
            raise DataError(f"{meta}: no list of label_names (is this CIFAR-10, python version?)")
        names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    else:  # the layout is CIFAR-10's: ten classes
        names = [f"class_{i}" for i in range(CIFAR10_CLASSES)]
    parts = [data_mod.parse_pickle_part(b, "labels", len(names), "CIFAR-10") for b in batches]
    test_x, test_y = data_mod.parse_pickle_part(folder / "test_batch", "labels", len(names), "CIFAR-10")
    arrays = {"train_images": np.concatenate([x for x, _ in parts]),
              "train_labels": np.concatenate([y for _, y in parts]), "test_images": test_x, "test_labels": test_y}
    files = [*(b.name for b in batches), "test_batch", "batches.meta"]
    official = all((folder / f).is_file() and file_digest(folder / f, "md5") == CIFAR10_MD5.get(f) for f in files) \
        and len(batches) == 5
    source = {"format": "cifar10", "path": str(folder), "batches": len(batches),
              "official_files": official}
    return data_mod.write_dataset(root, name, arrays, names, source, known="cifar10" if official else None,
                                  log=log)


# -- folders of images -------------------------------------------------------------------------

def _image_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(images, other files) directly in `folder`, sorted by name."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return ([p for p in files if p.suffix.lower() in IMAGE_SUFFIXES],
            [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES and not p.name.startswith(".")])


def _pil_filter(name: str):
    from PIL import Image

    if name not in RESIZE_FILTERS:
        raise DataError(f"unknown --resize-filter {name!r}; one of {', '.join(RESIZE_FILTERS)}")
    return getattr(Image.Resampling, name.upper())


def square_image(path: Path, size: int, resample) -> np.ndarray:
    """(3, size, size) uint8: decoded to RGB, shorter side resized to `size`, centre cut out.
    Raises DataError naming the file when it cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")  # decodes the whole file: a truncated one fails here
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                        ) from None
    w, h = im.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), resample)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def scan_image_folders(src: Path, log: Log = None) -> tuple[list[str], dict[str, dict[str, list[Path]]]]:
    """Class names (sorted folder names of train/ holding images) and the image files per split and class."""
    src = Path(src)
    say = log or (lambda m: None)
    for part in ("train", "test"):
        if not (src / part).is_dir():
            raise DataError(f"{src / part}: folder not found (expected {src}/{part}/<class>/*.png|jpg)")
    files: dict[str, dict[str, list[Path]]] = {}
    others = 0
    for part in ("train", "test"):
        files[part] = {}
        for d in sorted(p for p in (src / part).iterdir() if p.is_dir()):
            images, other = _image_files(d)
            others += len(other)
            files[part][d.name] = images
    empty = [f"{part}/{c}" for part in ("train", "test") for c, fs in files[part].items() if not fs]
    classes = sorted(c for c, fs in files["train"].items() if fs)
    if empty:
        say(f"skipped {len(empty)} empty class folder(s): {', '.join(empty[:10])}{', ...' if len(empty) > 10 else ''}")
    if others:
        say(f"ignored {others} file(s) that are not {'/'.join(IMAGE_SUFFIXES)}")
    if len(classes) < 2:
        raise DataError(f"{src / 'train'}: {len(classes)} class folder(s) with images; a dataset needs at least two")
    extra = sorted(c for c, fs in files["test"].items() if fs and c not in classes)
    if extra:
        raise DataError(f"{src / 'test' / extra[0]}: class {extra[0]!r} has test images but no train images "
                        f"(train/{extra[0]} is missing or empty)")
    if not any(files["test"].get(c) for c in classes):
        raise DataError(f"{src / 'test'}: no test images in any class folder")
    untested = [c for c in classes if not files["test"].get(c)]
    if untested:
        say(f"no test images for {len(untested)} class(es): {', '.join(untested[:10])}")
    return classes, files


def import_images(src: Path, root: Path, name: str, image_size: int = 32, resize_filter: str = "bicubic",
                  skip_bad: bool = False, log: Log = None) -> data_mod.Dataset:
    """Decode every image of SRC/train and SRC/test into a dataset NAME under ROOT."""
    if not 1 <= image_size <= 1024:
        raise DataError(f"--image-size {image_size}: must be from 1 to 1024 pixels")
    resample = _pil_filter(resize_filter)
    classes, files = scan_image_folders(src, log)
    arrays, bad = {}, []
    for part in ("train", "test"):
        images, labels = [], []
        for label, c in enumerate(classes):
            for path in files[part].get(c, []):
                try:
                    images.append(square_image(path, image_size, resample))
                except DataError as e:
                    if not skip_bad:
                        raise DataError(f"{e}; remove or replace it, or pass --skip-bad-images") from None
                    bad.append(path)
                    continue
                labels.append(label)
        arrays[f"{part}_images"] = (np.stack(images) if images else
                                    np.zeros((0, 3, image_size, image_size), np.uint8))
        arrays[f"{part}_labels"] = np.asarray(labels, dtype=np.int64)
    if bad and log:
        log(f"skipped {len(bad)} unreadable image(s): {', '.join(str(p) for p in bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}")
    source = {"format": "images", "path": str(Path(src).resolve()), "image_size": image_size,
              "resize": f"shorter side to {image_size} px ({resize_filter}), centre {image_size}x{image_size} crop",
              "resize_filter": resize_filter, "skipped_unreadable": [str(p) for p in bad]}
    return data_mod.write_dataset(root, name, arrays, classes, source, log=log)
