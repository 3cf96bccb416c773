"""Data loaders on small data sets written in the real on-disk formats, and every data error path."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mpvg_kernels import data as D
from mpvg_kernels.errors import UserError

# ------------------------------------------------------------------------------------------------------------------
# helpers that write the real formats


def _cifar_arrays(n: int, num_classes: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, num_classes, size=n)]
    return data, labels


def write_cifar10(root: Path, per_batch: int = 6) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        data, labels = _cifar_arrays(per_batch, 10, i)
        with (folder / f"data_batch_{i}").open("wb") as f:
            pickle.dump({b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * per_batch}, f)
    data, labels = _cifar_arrays(7, 10, 99)
    with (folder / "test_batch").open("wb") as f:
        pickle.dump({b"labels": labels, b"data": data}, f)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch}, f)
    return folder


def write_cifar100(root: Path) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, n, seed in (("train", 20, 1), ("test", 9, 2)):
        data, labels = _cifar_arrays(n, 100, seed)
        with (folder / split).open("wb") as f:
            pickle.dump({b"fine_labels": labels, b"coarse_labels": [v // 5 for v in labels], b"data": data}, f)
    with (folder / "meta").open("wb") as f:
        pickle.dump({b"fine_label_names": [f"class{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}, f)
    return folder


def write_folder(root: Path) -> Path:
    """train/ and val/ with PNG (RGB, gray) and JPEG files of different sizes in 3 class folders."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for ci, cls in enumerate(("cat", "dog", "eel")):
            d = root / split / cls
            d.mkdir(parents=True)
            for j in range(n):
                h, w = 20 + 4 * j, 28 - 2 * j
                arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                if (ci + j) % 3 == 0:
                    Image.fromarray(arr).save(d / f"img{j}.png")
                elif (ci + j) % 3 == 1:
                    Image.fromarray(arr).save(d / f"img{j}.JPEG", quality=95)
                else:
                    Image.fromarray(arr[..., 0]).save(d / f"img{j}.png")  # grayscale file
            (d / "notes.txt").write_text("not an image: ignored")
    return root


# ------------------------------------------------------------------------------------------------------------------
# specs and digits


def test_parse_data_spec() -> None:
    assert D.parse_data_spec("digits").kind == "digits"
    spec = D.parse_data_spec("cifar100:/data/c100")
    assert spec.kind == "cifar100" and str(spec.path) == "/data/c100"
    assert str(D.parse_data_spec("folder:/x/y")) == "folder:/x/y"
    with pytest.raises(UserError, match="unknown data set kind 'mnist'"):
        D.parse_data_spec("mnist:/x")
    with pytest.raises(UserError, match="needs a path"):
        D.parse_data_spec("cifar10")
    with pytest.raises(UserError, match="takes no path"):
        D.parse_data_spec("digits:/x")


def test_digits_split_is_fixed_and_stratified() -> None:
    images, labels, tr, te = D.digits_split()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 255
    assert len(tr) == 1437 and len(te) == 360 and not set(tr) & set(te)
    counts = np.bincount(labels[te], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class
    _, _, tr2, te2 = D.digits_split()
    assert np.array_equal(te, te2) and np.array_equal(tr, tr2)


def test_digits_channels() -> None:
    s1 = D.load_data("digits", in_chans=1, input_size=(16, 16))
    x, y = s1.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.uint8 and 0 <= y < 10
    assert s1.classes == [str(i) for i in range(10)] and not s1.notes
    s3 = D.load_data("digits", in_chans=3, input_size=(16, 16))
    x3, _ = s3.train[0]
    assert x3.shape == (3, 8, 8) and torch.equal(x3[0], x3[2])
    assert "repeating the gray channel" in s3.notes[0]
    with pytest.raises(UserError, match="2 channels|1 channels"):
        D.load_data("digits", in_chans=2, input_size=(16, 16))


# ------------------------------------------------------------------------------------------------------------------
# CIFAR


def test_cifar10_loader(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path)
    for spec in (f"cifar10:{folder}", f"cifar10:{tmp_path}"):  # the folder itself or its parent
        s = D.load_data(spec, in_chans=3, input_size=(32, 32))
        assert len(s.train) == 30 and len(s.test) == 7
        assert s.classes[0] == "airplane" and len(s.classes) == 10
    x, y = s.train[7]
    # image 7 = batch 2, row 1; b'data' rows are R plane, G plane, B plane of 32x32
    data, labels = _cifar_arrays(6, 10, 2)
    assert torch.equal(x, torch.from_numpy(data[1].reshape(3, 32, 32)))
    assert y == labels[1]
    assert D.class_names(D.parse_data_spec(spec))[9] == "truck"
    gray = D.load_data(spec, in_chans=1, input_size=(32, 32))
    g, _ = gray.train[7]
    pil = np.array(Image.fromarray(data[1].reshape(3, 32, 32).transpose(1, 2, 0)).convert("L"))
    assert g.shape == (1, 32, 32) and (g[0].int() - torch.from_numpy(pil).int()).abs().max() <= 1
    assert "luma" in gray.notes[0]


def test_cifar100_loader(tmp_path: Path) -> None:
    folder = write_cifar100(tmp_path)
    s = D.load_data(f"cifar100:{folder}", in_chans=3, input_size=(32, 32))
    assert len(s.train) == 20 and len(s.test) == 9 and len(s.classes) == 100 and s.classes[3] == "class3"
    _, labels = _cifar_arrays(9, 100, 2)
    assert [s.test[i][1] for i in range(9)] == labels  # fine labels, not coarse


def test_cifar_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"cifar100 data not found: .*nowhere does not exist.*cifar-100-python"):
        D.load_data(f"cifar100:{tmp_path / 'nowhere'}", 3, (32, 32))
    folder = write_cifar10(tmp_path / "a")
    (folder / "data_batch_3").unlink()
    with pytest.raises(UserError, match="incomplete: missing data_batch_3"):
        D.load_data(f"cifar10:{folder}", 3, (32, 32))
    folder = write_cifar10(tmp_path / "b")
    (folder / "test_batch").write_bytes(b"this is not a pickle")
    with pytest.raises(UserError, match=r"test_batch is not a readable CIFAR pickle"):
        D.load_data(f"cifar10:{folder}", 3, (32, 32))
    folder = write_cifar100(tmp_path / "c")
    with (folder / "train").open("wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"fine_labels": [0, 1, 2, 3]}, f)
    with pytest.raises(UserError, match=r"expected uint8 \[N, 3072\]"):
        D.load_data(f"cifar100:{folder}", 3, (32, 32))
    with (folder / "train").open("wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}, f)  # cifar-10 key
    with pytest.raises(UserError, match="lacks b'data' or b'fine_labels'"):
        D.load_data(f"cifar100:{folder}", 3, (32, 32))


# ------------------------------------------------------------------------------------------------------------------
# image folders


def test_folder_loader(tmp_path: Path) -> None:
    root = write_folder(tmp_path)
    s = D.load_data(f"folder:{root}", in_chans=3, input_size=(16, 16), crop_pct=0.875)
    assert s.classes == ["cat", "dog", "eel"] and len(s.train) == 9 and len(s.test) == 6
    assert s.eval_resize == "center_crop" and s.test_name == "val"
    x, y = s.test[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and y == 0
    xt, _ = s.train[0]
    assert xt.shape == (3, 18, 18)  # floor(16 / 0.875): the random resized crop happens on the batch
    # decoded in DataLoader workers
    xb, yb = next(iter(DataLoader(s.test, batch_size=6, num_workers=2)))
    assert xb.shape == (6, 3, 16, 16) and yb.tolist() == [0, 0, 1, 1, 2, 2]
    g = D.load_data(f"folder:{root}", in_chans=1, input_size=(16, 16))
    assert g.test[1][0].shape == (1, 16, 16)
    assert D.class_names(D.parse_data_spec(f"folder:{root}")) == ["cat", "dog", "eel"]


def test_folder_bad_image_reports_path(tmp_path: Path) -> None:
    root = write_folder(tmp_path)
    bad = root / "val" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a complete jpeg")
    s = D.load_data(f"folder:{root}", in_chans=3, input_size=(16, 16))
    idx = [i for i, (p, _) in enumerate(s.test.samples) if p.endswith("broken.jpg")][0]
    with pytest.raises(D.ImageReadError, match=r"cannot read image .*broken\.jpg"):
        s.test[idx]
    # through worker processes the error still names the file (not skipped)
    with pytest.raises(D.ImageReadError, match=r"broken\.jpg"):
        for _ in DataLoader(s.test, batch_size=4, num_workers=1):
            pass


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"folder data not found: .*missing is not a directory.*PATH/train/<class>"):
        D.load_data(f"folder:{tmp_path / 'missing'}", 3, (16, 16))
    (tmp_path / "a" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="has no 'val' subfolder"):
        D.load_data(f"folder:{tmp_path / 'a'}", 3, (16, 16))
    (tmp_path / "a" / "val").mkdir()
    with pytest.raises(UserError, match=r"class folder .*cat has no image files"):
        D.load_data(f"folder:{tmp_path / 'a'}", 3, (16, 16))
    root = write_folder(tmp_path / "b")
    (root / "val" / "zebra").mkdir()
    with pytest.raises(UserError, match="class folders not present in train/: zebra"):
        D.load_data(f"folder:{root}", 3, (16, 16))
    (root / "val" / "zebra").rmdir()
    with pytest.raises(UserError, match="in_chans=4"):
        D.load_data(f"folder:{root}", 4, (16, 16))


def test_read_image_errors(tmp_path: Path) -> None:
    with pytest.raises(D.ImageReadError, match="image not found: .*nope.png"):
        D.read_image(tmp_path / "nope.png", 3)
    p = tmp_path / "x.png"
    p.write_text("text")
    with pytest.raises(D.ImageReadError, match=r"cannot read image .*x\.png"):
        D.read_image(p, 1)


def test_resize_helpers() -> None:
    img = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8)
    out = D.resize_center_crop(img, (24, 24), crop_pct=0.875)
    assert out.shape == (3, 24, 24) and out.dtype == torch.uint8
    same = D.resize_center_crop(img[:, :24, :24].contiguous(), (24, 24), crop_pct=1.0)
    assert torch.equal(same, img[:, :24, :24])
    x = torch.rand(2, 1, 8, 8)
    assert D.resize_batch(x, (16, 16)).shape == (2, 1, 16, 16) and D.resize_batch(x, (8, 8)) is x


def test_decompression_bomb_names_the_file(tmp_path, monkeypatch):
    """PIL refuses images over its pixel limit; the error must say which file (it reaches the user as one line)."""
    from PIL import Image

    path = tmp_path / "huge.png"
    Image.new("L", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2 x the limit: a "bomb"
    with pytest.raises(D.ImageReadError, match="huge.png"):
        D.read_image(path, 1)


# ------------------------------------------------------------------------------------------------------------------
# high bit depth images: scaled to the 8-bit range the models are trained on, or refused


def test_read_image_scales_high_bit_depth(tmp_path: Path) -> None:
    ramp16 = np.linspace(0, 32767, 8).astype(np.uint16).reshape(2, 4)
    Image.fromarray(ramp16).save(tmp_path / "ramp16.png")  # PIL mode I;16
    Image.fromarray(ramp16.astype(">u2")).save(tmp_path / "ramp16b.tif")  # big-endian I;16B
    full16 = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    Image.fromarray(full16).save(tmp_path / "full16.png")
    ramp_f = np.linspace(0, 1, 8).astype(np.float32).reshape(2, 4)
    Image.fromarray(ramp_f).save(tmp_path / "float.tif")  # mode F
    ramp_i = np.linspace(0, 65535, 8).astype(np.int32).reshape(2, 4)
    Image.fromarray(ramp_i).save(tmp_path / "int32.tif")  # mode I
    want16 = np.rint(ramp16 / 257.0).astype(np.uint8)
    assert want16.tolist() == [[0, 18, 36, 55], [73, 91, 109, 127]]
    for name in ("ramp16.png", "ramp16b.tif"):
        assert D.read_image(tmp_path / name, 1)[0].numpy().tolist() == want16.tolist(), name
    assert D.read_image(tmp_path / "full16.png", 1)[0].tolist() == [[0, 1, 255, 128]]
    assert D.read_image(tmp_path / "float.tif", 1)[0].tolist() == [[0, 36, 73, 109], [146, 182, 219, 255]]
    assert D.read_image(tmp_path / "int32.tif", 1)[0].tolist() == np.rint(ramp_i / 257.0).astype(int).tolist()
    rgb = D.read_image(tmp_path / "ramp16.png", 3)  # gray repeated, as for 8-bit gray files
    assert rgb.shape == (3, 2, 4) and all(rgb[c].numpy().tolist() == want16.tolist() for c in range(3))
    assert D.read_image(tmp_path / "float.tif", 3).dtype == torch.uint8


@pytest.mark.parametrize(("name", "arr", "match"), [
    ("f255.tif", np.full((2, 3), 200.0, np.float32), r"f255\.tif.*mode F.*0\.0\.\.200\.0.*\[0, 1\]"),
    ("fneg.tif", np.full((2, 3), -0.5, np.float32), r"fneg\.tif.*mode F.*-0\.5"),
    ("fnan.tif", np.array([[0.5, np.nan]], np.float32), r"fnan\.tif.*mode F.*not finite"),
    ("ibig.tif", np.array([[0, 70000]], np.int32), r"ibig\.tif.*mode I.*0\.\.70000.*0\.\.65535"),
    ("ineg.tif", np.array([[-3, 10]], np.int32), r"ineg\.tif.*mode I.*-3\.\.10"),
])
def test_read_image_refuses_out_of_range(tmp_path: Path, name: str, arr: np.ndarray, match: str) -> None:
    Image.fromarray(arr).save(tmp_path / name)
    with pytest.raises(D.ImageReadError, match=match):
        D.read_image(tmp_path / name, 3)


# ------------------------------------------------------------------------------------------------------------------
# symbolic links in folder data sets: each real file once


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6), value, np.uint8)).save(path)


def test_folder_symlink_loop_and_duplicates_count_each_file_once(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for split in ("train", "val"):
        _png(root / split / "cat" / "a.png", 10)
        _png(root / split / "cat" / "sub" / "b.png", 20)
        _png(root / split / "dog" / "c.png", 30)
        (root / split / "cat" / "sub" / "loop").symlink_to(root / split / "cat", target_is_directory=True)
        _png(root / split / "cat" / "sub2" / "e.png", 50)
        (root / split / "cat" / "again").symlink_to(root / split / "cat" / "sub2", target_is_directory=True)
        (root / split / "cat" / "z_dup.png").symlink_to(root / split / "cat" / "a.png")
    outside = tmp_path / "elsewhere" / "d.png"  # a link to a file outside the data set is followed
    _png(outside, 40)
    (root / "train" / "dog" / "d_link.png").symlink_to(outside)
    s = D.load_data(f"folder:{root}", in_chans=1, input_size=(6, 6), crop_pct=1.0)
    real = sorted((os.path.realpath(p), y) for p, y in s.train.samples)
    assert real == sorted([(os.path.realpath(root / "train" / "cat" / "a.png"), 0),
                           (os.path.realpath(root / "train" / "cat" / "sub" / "b.png"), 0),
                           (os.path.realpath(root / "train" / "cat" / "sub2" / "e.png"), 0),
                           (os.path.realpath(root / "train" / "dog" / "c.png"), 1), (os.path.realpath(outside), 1)])
    assert len(s.test.samples) == 4 and len({os.path.realpath(p) for p, _ in s.test.samples}) == 4


def test_folder_same_file_in_two_classes_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for split in ("train", "val"):
        _png(root / split / "cat" / "a.png", 10)
        _png(root / split / "dog" / "c.png", 30)
    (root / "train" / "dog" / "cat_too.png").symlink_to(root / "train" / "cat" / "a.png")
    with pytest.raises(UserError, match=r"cat_too\.png.*same file as .*cat/a\.png.*classes 'cat' and 'dog'"):
        D.load_data(f"folder:{root}", in_chans=1, input_size=(6, 6))


def test_folder_broken_symlink_is_refused_before_work(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for split in ("train", "val"):
        _png(root / split / "cat" / "a.png", 10)
    (root / "train" / "cat" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(UserError, match=r"gone\.png is a broken symbolic link"):
        D.load_data(f"folder:{root}", in_chans=1, input_size=(6, 6))
