"""kdrun/data/images.py through the imagefolder dataset: class folders labelled by name across splits, links
followed once (loops skipped, a file in two places refused), and every PIL mode decoded with its own scaling."""
from __future__ import annotations

import logging
import multiprocessing
import os

import numpy as np
import pytest
import torch
from conftest import THREADS

from kdrun.data.sources import LazyImages, imagefolder
from kdrun.errors import ConfigError, InputError

torch.set_num_threads(THREADS)
SHADE = {"a": 10, "b": 120, "c": 240, "d": 60}  # each class's grey level: identifies a class by its pixels


def write_folder(root, layout: dict, per_class: int = 4, size: int = 4):
    """``layout``: split -> class names; every image of a class is the class's uniform ``SHADE``."""
    from PIL import Image

    for split, classes in layout.items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((size, size, 3), SHADE[name], np.uint8)).save(folder / f"{i}.png")
    return root


def load(root) -> dict:
    return imagefolder(str(root), image_size=4, stream="false", num_workers=0)


def shade_of_label(x: np.ndarray, y: np.ndarray) -> dict:
    """label -> the set of grey levels its images hold."""
    return {int(k): set(np.unique(x[y == k, 0]).tolist()) for k in np.unique(y)}


# --- class folders: labels by name, train defines them ----------------------------------------------------

def test_a_test_split_missing_a_class_keeps_labels_by_name(tmp_path, caplog):
    """train {a,b,c}, test {a,c}: c is label 2 in every split (not 1 in test), and the gap is logged."""
    root = write_folder(tmp_path / "img", {"train": "abc", "val": "abc", "test": "ac"})
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        out = load(root)
    (tx, ty), (vx, vy) = out["train"], out["test"]
    assert shade_of_label(tx, ty) == {0: {10}, 1: {120}, 2: {240}}
    assert shade_of_label(vx, vy) == {0: {10}, 2: {240}}
    assert out["num_classes"] == 3
    assert "test/" in caplog.text and "1 of the 3 train classes: b" in caplog.text


def test_a_class_unknown_to_train_is_refused(tmp_path):
    root = write_folder(tmp_path / "img", {"train": "abc", "val": "abd"})
    with pytest.raises(ConfigError) as err:
        load(root)
    message = str(err.value)
    assert err.value.key == "dataset.root" and "\n" not in message
    assert "class 'd' of the val split" in message and str(root / "val" / "d") in message


def test_a_train_class_without_images_is_refused(tmp_path):
    root = write_folder(tmp_path / "img", {"train": "ab", "val": "ab"})
    (root / "train" / "c").mkdir()
    with pytest.raises(ConfigError, match="train class 'c' .* holds no images"):
        load(root)
    empty = write_folder(tmp_path / "empty", {"val": "ab"})
    (empty / "train").mkdir()
    with pytest.raises(ConfigError, match="train has no class folders"):
        load(empty)


# --- links: followed once ---------------------------------------------------------------------------------

def test_a_symlink_loop_is_skipped_and_counted(tmp_path, caplog):
    """train/a/loop -> .. (train/) would repeat the tree under class a about 40 times."""
    root = write_folder(tmp_path / "img", {"train": "abc", "val": "abc"}, per_class=8)
    os.symlink("..", root / "train" / "a" / "loop")
    os.symlink(str(root), root / "train" / "b" / "up")  # the dataset root: val/ would leak into train
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        out = load(root)
    (tx, ty), (vx, vy) = out["train"], out["test"]
    assert len(ty) == len(vy) == 24
    assert shade_of_label(tx, ty) == shade_of_label(vx, vy) == {0: {10}, 1: {120}, 2: {240}}
    assert "linked folders leading back into the tree: 2" in caplog.text


def test_linked_folders_and_files_inside_a_class_count_once(tmp_path, caplog):
    root = write_folder(tmp_path / "img", {"train": "ab", "val": "ab"})
    (root / "train" / "a" / "sub").mkdir()
    (root / "train" / "a" / "0.png").rename(root / "train" / "a" / "sub" / "0.png")
    os.symlink("sub", root / "train" / "a" / "again")  # the same folder twice
    os.symlink("1.png", root / "train" / "a" / "copy.png")  # the same file twice
    os.link(root / "train" / "a" / "2.png", root / "train" / "a" / "hard.png")
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        _, ty = load(root)["train"]
    assert len(ty) == 8
    assert "files reached twice: 2" in caplog.text and "folders reached twice: 1" in caplog.text


def test_one_file_in_two_splits_is_refused(tmp_path):
    """A link from val/ to a train image would leak train into the evaluation."""
    root = write_folder(tmp_path / "img", {"train": "ab", "val": "ab"})
    os.symlink(root / "train" / "a" / "0.png", root / "val" / "a" / "leak.png")
    with pytest.raises(ConfigError, match=r"leak\.png \(val/a\) is the same file as .*0\.png \(train/a\)"):
        load(root)


def test_scan_keeps_torchvision_imagefolder_order(tmp_path):
    """Same files in the same order as before (torchvision's ImageFolder): splits and fingerprints keep."""
    from torchvision.datasets import ImageFolder

    root = write_folder(tmp_path / "img", {"train": "abc", "val": "abc"}, per_class=3)
    (root / "train" / "b" / "z").mkdir()
    (root / "train" / "b" / "0.png").rename(root / "train" / "b" / "z" / "10.png")
    from kdrun.data.images import scan_folders

    paths, labels = scan_folders(root, ("train", "val"))["train"]
    reference = ImageFolder(str(root / "train")).samples
    assert list(zip(paths.tolist(), labels.tolist())) == [(p, t) for p, t in reference]


# --- decoding every PIL mode ------------------------------------------------------------------------------

def _palette(transparent: bool):
    from PIL import Image

    img = Image.new("P", (2, 2))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    img.putdata([0, 1, 2, 1])
    if transparent:
        img.info["transparency"] = 0
    return img


def _make(mode: str, values):
    from PIL import Image

    if mode in ("P", "P+t"):
        return _palette(mode == "P+t")
    if mode in ("I;16", "I;16B", "I", "F"):
        dtype = {"I;16": "<u2", "I;16B": ">u2", "I": "<i4", "F": "<f4"}[mode]
        return Image.frombytes(mode, (2, 2), np.array(values, dtype=dtype).tobytes())
    img = Image.new(mode, (2, 2))
    if mode == "PA":
        img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
    img.putdata(values)
    return img


# mode, file suffix, the four pixels as PIL takes them, the four decoded RGB pixels
MODES = {
    "1": ("1", "png", [0, 1, 1, 0], [(0,) * 3, (255,) * 3, (255,) * 3, (0,) * 3]),
    "L": ("L", "png", [0, 64, 128, 255], [(0,) * 3, (64,) * 3, (128,) * 3, (255,) * 3]),
    "LA": ("LA", "png", [(200, 255), (200, 0), (200, 128), (0, 255)], [(200,) * 3, (0,) * 3, (100,) * 3, (0,) * 3]),
    "P": ("P", "png", None, [(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 255, 0)]),
    "P+transparency": ("P+t", "png", None, [(0, 0, 0), (0, 255, 0), (0, 0, 255), (0, 255, 0)]),
    "RGB": ("RGB", "png", [(255, 0, 0), (1, 2, 3), (0, 0, 255), (9, 9, 9)],
            [(255, 0, 0), (1, 2, 3), (0, 0, 255), (9, 9, 9)]),
    "RGBA": ("RGBA", "png", [(255, 0, 0, 255), (255, 0, 0, 0), (200, 100, 50, 128), (1, 2, 3, 255)],
             [(255, 0, 0), (0, 0, 0), (100, 50, 25), (1, 2, 3)]),
    "PA": ("PA", "tif", [(1, 255), (1, 0), (2, 128), (0, 255)], [(255, 0, 0), (0, 0, 0), (0, 0, 128), (0, 0, 0)]),
    "CMYK": ("CMYK", "tif", [(0, 0, 0, 0), (0, 0, 0, 255), (255, 0, 0, 0), (0, 255, 255, 0)],
             [(255,) * 3, (0,) * 3, (0, 255, 255), (255, 0, 0)]),
    "YCbCr": ("YCbCr", "tif", [(255, 128, 128), (0, 128, 128), (128, 128, 128), (255, 128, 128)],
              [(255,) * 3, (0,) * 3, (128,) * 3, (255,) * 3]),
    "I;16": ("I;16", "png", [0, 32768, 65535, 16384], [(0,) * 3, (128,) * 3, (255,) * 3, (64,) * 3]),
    "I;16B": ("I;16B", "tif", [0, 32768, 65535, 16384], [(0,) * 3, (128,) * 3, (255,) * 3, (64,) * 3]),
    "I": ("I", "tif", [0, 32768, 65535, 16384], [(0,) * 3, (128,) * 3, (255,) * 3, (64,) * 3]),
    "I from a 16-bit PGM": ("I", "pgm", [0, 32768, 65535, 16384], [(0,) * 3, (128,) * 3, (255,) * 3, (64,) * 3]),
    "F": ("F", "tif", [0.0, 0.5, 1.0, 0.25], [(0,) * 3, (128,) * 3, (255,) * 3, (64,) * 3]),
}


@pytest.mark.parametrize("case", list(MODES))
def test_every_pil_mode_decodes_with_its_scaling(tmp_path, case):
    from PIL import Image

    mode, suffix, values, expected = MODES[case]
    path = tmp_path / f"img.{suffix}"
    _make(mode, values).save(path)
    with Image.open(path) as img:
        opened = img.mode
    x = LazyImages(np.array([str(path)]), 2, 0).load(0)
    assert x.dtype == torch.uint8 and x.shape == (3, 2, 2), opened
    assert x.permute(1, 2, 0).reshape(4, 3).tolist() == [list(p) for p in expected], opened


def test_lab_decodes_through_pil_colour_conversion(tmp_path):
    _make("LAB", [(255, 128, 128), (0, 128, 128), (255, 128, 128), (0, 128, 128)]).save(tmp_path / "lab.tif")
    x = LazyImages(np.array([str(tmp_path / "lab.tif")]), 2, 0).load(0)
    assert (x[:, 0, 0].int() - 255).abs().max() <= 2 and x[:, 0, 1].max() <= 2  # white, black


@pytest.mark.parametrize("mode, values, fragment", [
    ("F", [0.0, 2.0, 0.5, 0.5], "values in [0, 2]"),
    ("F", [0.0, float("nan"), 0.5, 0.5], "non-finite"),
    ("I", [0, 70000, 1, 1], "16-bit"),
])
def test_out_of_range_high_depth_images_are_refused(tmp_path, mode, values, fragment):
    """Also through DataLoader workers: one line naming the file, not the worker's traceback."""
    path = tmp_path / "bad.tif"
    _make(mode, values).save(path)
    with pytest.raises(InputError) as err:
        LazyImages(np.array([str(path)]), 2, 0).load(0)
    assert str(path) in str(err.value) and fragment in str(err.value)
    with pytest.raises(InputError) as err:
        LazyImages(np.array([str(path)]), 2, 1).decode_all()
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    # the worker is stopped with the error, not left to the garbage collector (which waited 5 s to stop it)
    assert multiprocessing.active_children() == []
