"""Image folders on disk: their class folders and files, found without trusting links, and each file decoded to
8-bit RGB whatever its PIL mode.

* :func:`scan_folders`: ``root/<split>/<class>/**/<image>`` as file lists and labels. train/ defines the classes
  (sorted names, label = index); another split's class folder is labelled by its name and must be a train class.
  Links are followed once: a linked folder that leads back into the tree (an ancestor, a split or class folder)
  or one already visited is skipped, as is a file reached twice in one class; the skips are logged with counts.
  One file in two classes or two splits (links, hard links) is refused: it would be a label conflict or a leak.
* :func:`to_rgb`: a PIL image as a uint8 ``[H, W, 3]`` array: 16-bit and 32-bit integer images scaled from
  0..65535, float images from [0, 1], transparent pixels composited onto black.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np

from kdrun.errors import ConfigError, InputError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
HIGH_DEPTH = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}  # mode: white


def to_rgb(img, path: str) -> np.ndarray:
    """``img`` (any PIL mode) as uint8 ``[H, W, 3]``; ``path`` names the file in errors.

    PIL's own ``convert("RGB")`` clips 16-bit and float values to 255 (an all-white image) and drops alpha:
    here integer modes (``I;16*``, ``I``) are read as 16-bit (0..65535 -> 0..255), ``F`` as [0, 1], and an
    image with transparency (alpha band, or a palette / grey / RGB transparent colour) is composited onto black.
    """
    if img.mode in HIGH_DEPTH:
        top = HIGH_DEPTH[img.mode]
        a = np.asarray(img).astype(np.float64)
        if not np.isfinite(a).all() or a.min(initial=0) < 0 or a.max(initial=0) > top:
            bad = "non-finite values" if not np.isfinite(a).all() else f"values in [{a.min():g}, {a.max():g}]"
            raise InputError(f"{path}: a mode-{img.mode} image with {bad}; kdrun reads "
                             f"{'float images in [0, 1]' if top == 1.0 else 'integer images as 16-bit (0..65535)'}")
        grey = np.rint(a * (255.0 / top)).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    try:
        if img.has_transparency_data:
            rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
            return np.rint(rgba[:, :, :3] * (rgba[:, :, 3:] / 255.0)).astype(np.uint8)
        return np.array(img.convert("RGB"))  # a writable copy, for torch
    except ValueError as exc:  # e.g. "conversion from La to RGB not supported"
        raise InputError(f"{path}: cannot convert a mode-{img.mode} image to RGB ({exc})") from None


def scan_folders(root: Path, splits: tuple[str, ...]) -> dict:
    """``{split: (paths, labels)}`` of ``root/<split>/<class>/`` for each split (train first) and
    ``"classes"``: train's class names, in label order. Raises :class:`ConfigError` (``dataset.root``) for a class
    unknown to train, a train class without images, or a file in two classes or splits."""
    folders = {s: _class_folders(root / s) for s in splits}
    classes = sorted(folders["train"])
    if not classes:
        raise ConfigError("dataset.root", f"{root / 'train'} has no class folders (train/<class>/<image>)")
    blocked = {_ident(p) for tops in folders.values() for top in tops.values()
               for p in (top, *Path(os.path.realpath(top)).parents)}  # a link here loops or leaves its class
    skipped, owner, out = Counter(), {}, {"classes": classes}
    for split, tops in folders.items():
        unknown = sorted(set(tops) - set(classes))
        if unknown:
            raise ConfigError("dataset.root", f"class {unknown[0]!r} of the {split} split ({tops[unknown[0]]}) is not "
                                              f"a class of train/; train's classes: {', '.join(classes)}")
        paths, labels = [], []
        for name in sorted(tops):
            files, label = _images(tops[name], blocked, skipped), classes.index(name)
            for path, ident in files:
                if ident in owner and owner[ident][1:] != (split, name):
                    raise ConfigError("dataset.root", f"{path} ({split}/{name}) is the same file as {owner[ident][0]} "
                                                      f"({'/'.join(owner[ident][1:])}); an image may be in one class "
                                                      f"of one split only (a link or hard link?)")
                if ident in owner:
                    skipped["files reached twice"] += 1
                    continue
                owner[ident] = (path, split, name)
                paths.append(path)
                labels.append(label)
            if split == "train" and not files:
                raise ConfigError("dataset.root", f"train class {name!r} ({tops[name]}) holds no images "
                                                  f"({', '.join(IMAGE_SUFFIXES)})")
        missing = sorted(set(classes) - {classes[k] for k in set(labels)})
        if split != "train" and missing:
            log.warning(f"dataset=imagefolder: {split}/ of {root} has no images of {len(missing)} of the "
                        f"{len(classes)} train classes: {', '.join(missing)}")
        out[split] = (np.array(paths, dtype=str), np.array(labels, dtype=np.int64))
    if skipped:
        log.warning(f"dataset=imagefolder: {root}: links are followed once; skipped "
                    + ", ".join(f"{what}: {n}" for what, n in sorted(skipped.items())))
    return out


def _class_folders(split_dir: Path) -> dict[str, str]:
    with os.scandir(split_dir) as entries:
        return {e.name: os.path.join(str(split_dir), e.name) for e in entries if e.is_dir()}


def _ident(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _images(top: str, blocked: set, skipped: Counter) -> list[tuple[str, tuple[int, int]]]:
    """``(path, file identity)`` of each image under ``top``, in torchvision ImageFolder's order (folders by
    path, files by name), every real folder visited once, linked folders that lead into ``blocked`` skipped."""
    found, stack, seen = [], [top], set()
    while stack:
        folder = stack.pop()
        ident = _ident(folder)
        if ident in seen:
            skipped["folders reached twice"] += 1
            continue
        seen.add(ident)
        files = []
        with os.scandir(folder) as entries:
            for e in entries:
                if e.is_dir():  # follows links
                    if _ident(e.path) in blocked:
                        skipped["linked folders leading back into the tree"] += 1
                    else:
                        stack.append(e.path)
                elif e.name.lower().endswith(IMAGE_SUFFIXES):
                    file_ident = _file_ident(e, ident[0])
                    if file_ident is None:
                        skipped["broken links"] += 1
                    else:
                        files.append((e.name, file_ident))
        found.append((folder, sorted(files)))
    return [(os.path.join(folder, name), file_ident) for folder, files in sorted(found) for name, file_ident in files]


def _file_ident(entry: os.DirEntry, device: int):
    if not entry.is_symlink():
        return device, entry.inode()
    try:
        return _ident(entry.path)
    except OSError:
        return None
