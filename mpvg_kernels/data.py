"""Data sets for ``mpvg train/eval/predict``. Nothing here downloads anything.

Specs (``--data``):

- ``digits`` (default): scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``; 1,797 8x8
  grayscale images, 10 classes), split once into a FIXED stratified 80/20 train/test split (seed 0:
  1,437 / 360 images) that does not depend on the training seed.
- ``cifar10:PATH`` / ``cifar100:PATH``: the pickled ``cifar-10-batches-py`` / ``cifar-100-python`` folder
  (PATH is that folder or its parent). CIFAR-100 uses the 100 fine labels.
- ``folder:PATH``: ImageNet-style ``PATH/train/<class>/<image>`` and ``PATH/val/<class>/<image>``; images are
  decoded with PIL in the DataLoader workers. An unreadable image is an error naming its path. Symbolic links are
  followed, each real file counted once per split (:func:`_scan_split`); 16-bit, 32-bit integer and float images
  are scaled to 0..255 or refused, never clipped (:func:`read_image`).

Every data set yields ``(uint8 tensor [C, H, W], int label)``; conversion to float, resizing to the model's input
size, augmentation and normalisation happen on the batch (see :mod:`mpvg_kernels.augment`). Channels follow the
model's ``in_chans``: grayscale -> 3 channels by repetition, RGB -> 1 channel by the ITU-R 601 luma weights
(what PIL's ``convert("L")`` does); any other combination is an error.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .errors import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
KINDS = ("digits", "cifar10", "cifar100", "folder")
_LUMA = (0.299, 0.587, 0.114)


class ImageReadError(UserError):
    """An image file exists but cannot be decoded."""


@dataclass
class DataSpec:
    """A parsed ``--data`` value."""

    kind: str
    path: Path | None = None

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


def parse_data_spec(text: str) -> DataSpec:
    """``digits`` | ``cifar10:PATH`` | ``cifar100:PATH`` | ``folder:PATH`` -> :class:`DataSpec`."""
    kind, sep, path = text.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise UserError(f"--data {text!r}: unknown data set kind {kind!r}; use one of digits, cifar10:PATH, "
                        "cifar100:PATH, folder:PATH")
    if kind == "digits":
        if path:
            raise UserError(f"--data {text!r}: 'digits' is bundled with scikit-learn and takes no path")
        return DataSpec("digits")
    if not path:
        raise UserError(f"--data {text!r}: {kind} needs a path, e.g. --data {kind}:/data/{kind}")
    return DataSpec(kind, Path(os.path.expanduser(path)))


# ----------------------------------------------------------------------------------------------------------------
# channel conversion and resizing (shared by the loaders, the batch pipeline and `mpvg predict`)


def convert_channels(img: torch.Tensor, in_chans: int, what: str = "image") -> torch.Tensor:
    """uint8/float ``[..., C, H, W]`` -> ``in_chans`` channels (gray->3 by repeat, 3->gray by luma), else error."""
    c = img.shape[-3]
    if c == in_chans:
        return img
    if c == 1 and in_chans == 3:
        return img.expand(*img.shape[:-3], 3, *img.shape[-2:])
    if c == 3 and in_chans == 1:
        w = torch.tensor(_LUMA, dtype=torch.float32).view(3, 1, 1)
        gray = (img.float() * w).sum(dim=-3, keepdim=True)
        return gray.round().clamp(0, 255).to(torch.uint8) if img.dtype == torch.uint8 else gray.to(img.dtype)
    raise UserError(f"{what} has {c} channels but the model expects in_chans={in_chans}; only 1<->3 channel "
                    "conversion is supported")


def resize_batch(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Float ``[B, C, H, W]`` -> ``[B, C, *size]``, bilinear (antialiased when shrinking); no-op when equal."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def resize_center_crop(img: torch.Tensor, size: Sequence[int], crop_pct: float = 1.0) -> torch.Tensor:
    """uint8 ``[C, H, W]``: resize the shorter side to ``size / crop_pct`` (bicubic), center-crop ``size``.

    This is the DeiT/timm evaluation transform (``crop_pct=0.875``: 256 then 224).
    """
    th, tw = int(size[0]), int(size[1])
    h, w = img.shape[-2:]
    scale_size = math.floor(min(th, tw) / crop_pct)
    if h <= w:
        nh, nw = scale_size, max(scale_size, int(round(w * scale_size / h)))
    else:
        nh, nw = max(scale_size, int(round(h * scale_size / w))), scale_size
    if (nh, nw) != (h, w):
        x = F.interpolate(img[None].float(), size=(nh, nw), mode="bicubic", align_corners=False,
                          antialias=(nh < h or nw < w))[0]
        img = x.round_().clamp_(0, 255).to(torch.uint8)
    top, left = max(0, (nh - th) // 2), max(0, (nw - tw) // 2)
    return img[..., top : top + th, left : left + tw].contiguous()


#: PIL modes of 16-bit unsigned gray images (little-, big-, native-endian): divided by 257 (65535 -> 255).
_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _high_depth_to_8bit(im: Any, path: str | os.PathLike) -> Any:
    """A PIL image of mode ``I;16*`` / ``I`` / ``F`` -> mode ``L`` scaled to 0..255 (other modes unchanged).

    16-bit and 32-bit integer pixels are read as 16-bit data, v / 257 rounded (0 -> 0, 65535 -> 255); a 32-bit
    integer image must hold values in 0..65535. Float pixels must be finite and in [0, 1]: v * 255 rounded.
    Anything else (values out of range, signed 16-bit or raw 32-bit ``I;...`` modes) is an :class:`ImageReadError`
    naming the file, the mode and the value range.
    """
    from PIL import Image

    if im.mode.startswith("I;") and im.mode not in _MODES_16BIT:
        raise ImageReadError(f"cannot read image {path}: PIL mode {im.mode} (signed or 32-bit raw integer pixels) "
                             f"is not supported; save it as 8-bit, unsigned 16-bit or float in [0, 1]")
    if im.mode not in (*_MODES_16BIT, "I", "F"):
        return im
    arr = np.asarray(im)
    if im.mode == "F":
        if not np.isfinite(arr).all():
            raise ImageReadError(f"cannot read image {path}: mode F (32-bit float) with values that are not finite "
                                 "(NaN or Inf)")
        lo, hi, top = float(arr.min(initial=0.0)), float(arr.max(initial=0.0)), 1.0
    else:
        lo, hi, top = int(arr.min(initial=0)), int(arr.max(initial=0)), 65535
    if lo < 0 or hi > top:
        expected = "[0, 1] (scaled by 255)" if im.mode == "F" else "0..65535 (read as 16-bit data, divided by 257)"
        raise ImageReadError(f"cannot read image {path}: mode {im.mode} with values {lo}..{hi}; mpvg reads "
                             f"{'float' if im.mode == 'F' else '32-bit integer'} images only with values in {expected}")
    scaled = arr.astype(np.float64) * 255.0 if im.mode == "F" else arr.astype(np.float64) / 257.0
    return Image.fromarray(np.rint(scaled).astype(np.uint8))


def read_image(path: str | os.PathLike, in_chans: int) -> torch.Tensor:
    """Decode an image file with PIL into a uint8 tensor ``[in_chans, H, W]``; errors name the path.

    8-bit images are converted with PIL (``L``: ITU-R 601 luma, ``RGB``: gray repeated). 16-bit, 32-bit integer
    and float gray images are scaled to 0..255 first (:func:`_high_depth_to_8bit`: 16-bit / 257, float * 255 from
    [0, 1]) or refused with an :class:`ImageReadError` naming the mode; they are never clipped."""
    from PIL import Image, UnidentifiedImageError

    mode = {1: "L", 3: "RGB"}.get(in_chans)
    if mode is None:
        raise UserError(f"cannot read images for a model with in_chans={in_chans} (supported: 1 or 3)")
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(_high_depth_to_8bit(im, path).convert(mode), dtype=np.uint8)
    except FileNotFoundError:
        raise ImageReadError(f"image not found: {path}") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"cannot read image {path}: {e}") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"cannot read image {path}: {e}") from None
    t = torch.from_numpy(arr.copy())
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# data sets


class TensorImageDataset(Dataset):
    """In-memory uint8 images ``[N, C, H, W]`` and int64 labels, converted to ``in_chans`` on access."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, in_chans: int, name: str = "images") -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("images must be uint8 [N, C, H, W]")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        convert_channels(images[:1], in_chans, name)  # fail early on an impossible conversion
        self.images, self.labels, self.in_chans, self.name = images, labels.long(), in_chans, name

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return convert_channels(self.images[i], self.in_chans, self.name), int(self.labels[i])


class ImageFolderDataset(Dataset):
    """``(path, label)`` samples decoded with PIL, resized to a fixed square so they can be batched.

    ``load_size=(h, w)`` with ``crop_pct``: shorter side to ``size / crop_pct``, then a center crop of ``size``.
    """

    def __init__(self, samples: list[tuple[str, int]], in_chans: int, load_size: Sequence[int],
                 crop_pct: float) -> None:
        self.samples, self.in_chans = samples, in_chans
        self.load_size, self.crop_pct = (int(load_size[0]), int(load_size[1])), crop_pct

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        img = read_image(path, self.in_chans)
        return resize_center_crop(img, self.load_size, self.crop_pct), label


@dataclass
class DataSplits:
    """Train and held-out data sets plus what the pipeline needs to know about them."""

    train: Dataset
    test: Dataset
    classes: list[str]
    #: ``full``: the batch pipeline resizes whole images to the input size (digits, CIFAR);
    #: ``center_crop``: images arrive already cropped (folder data) with :func:`resize_center_crop`.
    eval_resize: str
    test_name: str
    in_memory: bool
    notes: list[str] = field(default_factory=list)


def class_names(spec: DataSpec) -> list[str]:
    """The class names of a data set, read cheaply (folder names / CIFAR meta) without loading images."""
    if spec.kind == "digits":
        return [str(i) for i in range(10)]
    if spec.kind in ("cifar10", "cifar100"):
        return _cifar_classes(_cifar_root(spec), spec.kind)
    root = _folder_root(spec)
    return _folder_classes(root / "train")


def load_data(spec: DataSpec | str, in_chans: int, input_size: Sequence[int], crop_pct: float = 0.875,
              train_crop: bool = True) -> DataSplits:
    """Build the train and held-out data sets for a model with ``in_chans`` and ``input_size`` (H, W).

    ``crop_pct`` only matters for folder data: held-out images are resized to ``input / crop_pct`` and
    center-cropped to ``input``; training images are resized and center-cropped to a square of ``input /
    crop_pct`` (the random resized crop then works on the batch) when ``train_crop``, else treated like held-out.
    """
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    if spec.kind == "digits":
        return _load_digits(in_chans)
    if spec.kind in ("cifar10", "cifar100"):
        return _load_cifar(spec, in_chans)
    return _load_folder(spec, in_chans, input_size, crop_pct, train_crop)


def _channel_note(src: int, in_chans: int, name: str) -> list[str]:
    if src == in_chans:
        return []
    how = "repeating the gray channel" if src == 1 else "converting RGB to gray (ITU-R 601 luma)"
    return [f"{name} images have {src} channel(s); the model takes {in_chans}: {how}"]


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 [N, 8, 8], labels, train indices, test indices) of the fixed stratified digits split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = d.target.astype(np.int64)
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=DIGITS_TEST_FRACTION, stratify=labels,
                                           random_state=DIGITS_SPLIT_SEED, shuffle=True)
    return images, labels, np.sort(train_idx), np.sort(test_idx)


def _load_digits(in_chans: int) -> DataSplits:
    images, labels, train_idx, test_idx = digits_split()
    x = torch.from_numpy(images)[:, None]  # [N, 1, 8, 8]
    y = torch.from_numpy(labels)
    return DataSplits(
        train=TensorImageDataset(x[train_idx], y[train_idx], in_chans, "digits"),
        test=TensorImageDataset(x[test_idx], y[test_idx], in_chans, "digits"),
        classes=[str(i) for i in range(10)],
        eval_resize="full",
        test_name="test",
        in_memory=True,
        notes=_channel_note(1, in_chans, "digits"),
    )


_CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": ("batches.meta", b"label_names"),
        "label_key": b"labels",
        "num_classes": 10,
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": ("meta", b"fine_label_names"),
        "label_key": b"fine_labels",
        "num_classes": 100,
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    },
}


def _cifar_expected(kind: str) -> str:
    c = _CIFAR[kind]
    files = ", ".join(c["train"] + c["test"] + [c["meta"][0]])
    return (f"the '{c['folder']}' folder of the python version of {kind.upper()} (extract {c['url']}; mpvg "
            f"downloads nothing), containing {files}; pass --data {kind}:/path/to/{c['folder']} or its parent")


def _cifar_root(spec: DataSpec) -> Path:
    c = _CIFAR[spec.kind]
    path = spec.path
    assert path is not None
    if not path.exists():
        raise UserError(f"{spec.kind} data not found: {path} does not exist. Expected {_cifar_expected(spec.kind)}")
    if (path / c["folder"]).is_dir():
        path = path / c["folder"]
    missing = [f for f in c["train"] + c["test"] if not (path / f).is_file()]
    if missing:
        raise UserError(f"{spec.kind} data at {path} is incomplete: missing {', '.join(missing)}. "
                        f"Expected {_cifar_expected(spec.kind)}")
    return path


def _unpickle(path: Path, kind: str) -> dict:
    try:
        with path.open("rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a malformed file
        raise UserError(f"{kind} file {path} is not a readable CIFAR pickle ({type(e).__name__}: {e}). "
                        f"Expected {_cifar_expected(kind)}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{kind} file {path} holds a {type(obj).__name__}, expected a dict with b'data' and labels")
    return obj


def _cifar_classes(root: Path, kind: str) -> list[str]:
    c = _CIFAR[kind]
    meta_file, key = c["meta"]
    n = c["num_classes"]
    if (root / meta_file).is_file():
        meta = _unpickle(root / meta_file, kind)
        names = meta.get(key)
        if isinstance(names, list) and len(names) == n:
            return [v.decode() if isinstance(v, bytes) else str(v) for v in names]
    return [str(i) for i in range(n)]


def _read_cifar_files(root: Path, files: list[str], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    c = _CIFAR[kind]
    xs, ys = [], []
    for name in files:
        path = root / name
        d = _unpickle(path, kind)
        if b"data" not in d or c["label_key"] not in d:
            raise UserError(f"{kind} file {path} lacks b'data' or {c['label_key']!r} (keys: {sorted(d)[:8]}). "
                            f"Expected {_cifar_expected(kind)}")
        data = np.asarray(d[b"data"])
        labels = np.asarray(d[c["label_key"]], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
            raise UserError(f"{kind} file {path}: b'data' has shape {data.shape} dtype {data.dtype}, expected "
                            "uint8 [N, 3072] (3 x 32 x 32, channel-major)")
        if len(labels) != len(data):
            raise UserError(f"{kind} file {path}: {len(data)} images but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= c["num_classes"]):
            raise UserError(f"{kind} file {path}: labels outside 0..{c['num_classes'] - 1}")
        xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        ys.append(torch.from_numpy(labels))
    return torch.cat(xs), torch.cat(ys)


def _load_cifar(spec: DataSpec, in_chans: int) -> DataSplits:
    root = _cifar_root(spec)
    c = _CIFAR[spec.kind]
    xtr, ytr = _read_cifar_files(root, c["train"], spec.kind)
    xte, yte = _read_cifar_files(root, c["test"], spec.kind)
    return DataSplits(
        train=TensorImageDataset(xtr, ytr, in_chans, spec.kind),
        test=TensorImageDataset(xte, yte, in_chans, spec.kind),
        classes=_cifar_classes(root, spec.kind),
        eval_resize="full",
        test_name="test",
        in_memory=True,
        notes=_channel_note(3, in_chans, spec.kind),
    )


_FOLDER_EXPECTED = ("an ImageNet-style folder with PATH/train/<class>/<image> and PATH/val/<class>/<image> "
                    f"(image extensions: {' '.join(IMG_EXTENSIONS)})")


def _folder_root(spec: DataSpec) -> Path:
    root = spec.path
    assert root is not None
    if not root.is_dir():
        raise UserError(f"folder data not found: {root} is not a directory. Expected {_FOLDER_EXPECTED}")
    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise UserError(f"folder data at {root} has no '{sub}' subfolder. Expected {_FOLDER_EXPECTED}")
    return root


def _folder_classes(split_dir: Path) -> list[str]:
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{split_dir} has no class subfolders. Expected {_FOLDER_EXPECTED}")
    return classes


def _walk_error(err: OSError) -> None:
    raise UserError(f"cannot list folder {err.filename}: {err.strerror}")


def _class_files(class_dir: Path) -> list[str]:
    """The image files under ``class_dir`` in sorted walk order. Symbolic links to files and folders are followed,
    but a folder whose real path was already walked (a loop, or a second link to it) is not walked again."""
    files: list[str] = []
    walked: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True, onerror=_walk_error):
        real = os.path.realpath(dirpath)
        if real in walked:
            dirnames[:] = []
            continue
        walked.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and os.path.realpath(os.path.join(dirpath, d)) not in walked)
        files += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if not f.startswith(".") and f.lower().endswith(IMG_EXTENSIONS)]
    return files


def _scan_split(split_dir: Path, class_to_idx: dict[str, int], require_all: bool) -> list[tuple[str, int]]:
    """``(path, label)`` of every image file of a split, each real file once (symbolic links resolved); the same
    file under two classes, or a broken link, is an error."""
    samples: list[tuple[str, int]] = []
    first: dict[str, tuple[str, str]] = {}  # real path -> (path it was found at, class)
    present = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [c for c in present if c not in class_to_idx]
    if unknown:
        raise UserError(f"{split_dir} has class folders not present in train/: {', '.join(unknown[:10])}")
    for cls in present:
        files = []
        for f in _class_files(split_dir / cls):
            real = os.path.realpath(f)
            if not os.path.exists(real):
                raise UserError(f"{f} is a broken symbolic link (to {real})")
            if real in first:
                seen, seen_cls = first[real]
                if seen_cls != cls:
                    raise UserError(f"{f} is the same file as {seen} ({real}): one image in classes "
                                    f"{seen_cls!r} and {cls!r}")
                continue
            first[real] = (f, cls)
            files.append(f)
        if not files and require_all:
            raise UserError(f"class folder {split_dir / cls} has no image files ({' '.join(IMG_EXTENSIONS)})")
        samples += [(f, class_to_idx[cls]) for f in files]
    if not samples:
        raise UserError(f"{split_dir} has no image files. Expected {_FOLDER_EXPECTED}")
    return samples


def _load_folder(spec: DataSpec, in_chans: int, input_size: Sequence[int], crop_pct: float,
                 train_crop: bool) -> DataSplits:
    if in_chans not in (1, 3):
        raise UserError(f"folder data: the model has in_chans={in_chans}; images can be read as 1 or 3 channels")
    root = _folder_root(spec)
    classes = _folder_classes(root / "train")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    train = _scan_split(root / "train", class_to_idx, require_all=True)
    val = _scan_split(root / "val", class_to_idx, require_all=False)
    h, w = int(input_size[0]), int(input_size[1])
    if train_crop:
        s = math.floor(min(h, w) / crop_pct)
        train_ds = ImageFolderDataset(train, in_chans, (s, s), 1.0)
    else:
        train_ds = ImageFolderDataset(train, in_chans, (h, w), crop_pct)
    return DataSplits(
        train=train_ds,
        test=ImageFolderDataset(val, in_chans, (h, w), crop_pct),
        classes=classes,
        eval_resize="center_crop",
        test_name="val",
        in_memory=False,
        notes=[f"folder images decoded with PIL as {'RGB' if in_chans == 3 else 'grayscale (L)'}"],
    )


# ----------------------------------------------------------------------------------------------------------------
# evaluation preprocessing (what eval, predict, analyze and training's held-out pass apply)


def channel_stats(values: Sequence[float], channels: int, name: str) -> torch.Tensor:
    """Per-channel mean/std as ``[1, C]``; a single value is broadcast to all channels."""
    v = [float(x) for x in values]
    if len(v) == 1:
        v = v * channels
    if len(v) != channels:
        raise ValueError(f"{name} has {len(v)} values but the images have {channels} channels")
    return torch.tensor(v, dtype=torch.float32).view(1, channels)


def channel_normalize(mean: Sequence[float], std: Sequence[float], channels: int) -> nn.Module:
    """kornia's ``Normalize``: ``(x - mean) / std`` per channel, the statistics as non-persistent buffers."""
    from kornia.enhance import Normalize

    return Normalize(channel_stats(mean, channels, "mean"), channel_stats(std, channels, "std"))


class EvalTransform(nn.Module):
    """uint8 batch -> float, resized to the input size when needed, normalised."""

    def __init__(self, input_size: Sequence[int], channels: int, mean: Sequence[float],
                 std: Sequence[float]) -> None:
        super().__init__()
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.normalize = channel_normalize(mean, std, channels)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(resize_batch(x.float() / 255.0, self.input_size)).contiguous()
