"""`mpvg eval` / `mpvg predict` refuse what would give a meaningless figure: data whose class names (or their
order) differ from the checkpoint's, a batch size or top-k below 1. One line, exit status 2, before any work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mpvg_kernels import cli
from mpvg_kernels.errors import UserError
from mpvg_kernels.train import checkpoint as C

DIGIT_CLASSES = [str(i) for i in range(10)]


def _folder(root: Path, classes: list[str]) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / split / c / "a.png")
    return root


def _checkpoint(path: Path, classes: list[str], spec: str = "digits") -> Path:
    model = C.build_model("vit_digits", "mpvg", len(classes))
    eval_resize = "full" if spec == "digits" else "center_crop"
    C.save_checkpoint(path, {
        "model": {"name": "vit_digits", "pe": "mpvg", "kwargs": {}, "num_classes": len(classes)},
        "data": {"spec": spec, "classes": list(classes), "in_chans": 1, "input_size": [16, 16], "mean": [0.3053],
                 "std": [0.376], "crop_pct": 1.0, "eval_resize": eval_resize},
        "config": {}, "epoch": 1, "state_dict": model.state_dict()})
    return path


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_line(err: str, cmd: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"mpvg {cmd}: error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------------------------------
# class names


def test_eval_on_folder_with_other_class_names_is_an_error(tmp_path, capsys) -> None:
    ckpt = _checkpoint(tmp_path / "c.pt", DIGIT_CLASSES)
    root = _folder(tmp_path / "data", [f"digit{i}" for i in range(10)])
    rc, out, err = _run(capsys, "eval", "--checkpoint", str(ckpt), "--data", f"folder:{root}", "--num-workers", "0")
    line = _one_line(err, "eval")
    assert rc == 2 and out == ""
    assert "class names of" in line and "differ from the checkpoint's" in line
    assert "index 0: checkpoint '0', data 'digit0'" in line and "index 2: checkpoint '2', data 'digit2'" in line
    assert "10 of 10 differ" in line and "index 5" not in line  # the first few only


def test_eval_on_folder_with_classes_in_another_order_is_an_error(tmp_path, capsys) -> None:
    names = ["cat", "dog", "eel", "fox"]
    root = _folder(tmp_path / "data", names)
    ckpt = _checkpoint(tmp_path / "c.pt", ["dog", "cat", "eel", "fox"], spec=f"folder:{root}")
    rc, out, err = _run(capsys, "eval", "--checkpoint", str(ckpt), "--num-workers", "0")  # its own data set
    line = _one_line(err, "eval")
    assert rc == 2 and "same names in another order" in line
    assert "index 0: checkpoint 'dog', data 'cat'" in line and "index 1: checkpoint 'cat', data 'dog'" in line


def test_eval_with_matching_class_names_runs(tmp_path, capsys) -> None:
    names = ["cat", "dog", "eel"]
    root = _folder(tmp_path / "data", names)
    ckpt = _checkpoint(tmp_path / "c.pt", names, spec=f"folder:{root}")
    rc, out, err = _run(capsys, "eval", "--checkpoint", str(ckpt), "--num-workers", "0")
    assert rc == 0 and "top-1" in out and "warning" not in err


# ------------------------------------------------------------------------------------------------------------------
# sizes below 1, checked before the checkpoint is read


@pytest.mark.parametrize("value", ["0", "-3"])
def test_eval_batch_size_below_one(tmp_path, capsys, value) -> None:
    missing = tmp_path / "missing.pt"  # never read: the option is checked first
    rc, out, err = _run(capsys, "eval", "--checkpoint", str(missing), "--batch-size", value)
    line = _one_line(err, "eval")
    assert rc == 2 and f"--batch-size {value}" in line and "at least 1" in line


def test_eval_num_workers_below_zero(tmp_path, capsys) -> None:
    rc, out, err = _run(capsys, "eval", "--checkpoint", str(tmp_path / "missing.pt"), "--num-workers", "-1")
    assert rc == 2 and "--num-workers -1" in _one_line(err, "eval")


def test_evaluate_checkpoint_checks_batch_size_too(tmp_path) -> None:
    from mpvg_kernels.train.evaluate import evaluate_checkpoint

    with pytest.raises(UserError, match="batch_size 0"):
        evaluate_checkpoint(tmp_path / "missing.pt", batch_size=0)


@pytest.mark.parametrize("value", ["0", "-2"])
def test_predict_topk_below_one(tmp_path, capsys, value) -> None:
    rc, out, err = _run(capsys, "predict", "--checkpoint", str(tmp_path / "missing.pt"), "--topk", value,
                        str(tmp_path / "a.png"))
    line = _one_line(err, "predict")
    assert rc == 2 and out == "" and f"--topk {value}" in line and "at least 1" in line


def test_predict_images_checks_topk_too(tmp_path) -> None:
    from mpvg_kernels.train.predict import predict_images

    with pytest.raises(UserError, match="topk 0"):
        predict_images(tmp_path / "missing.pt", [tmp_path / "a.png"], topk=0)


def test_eval_on_cifar_without_meta_compares_by_index_with_a_warning(tmp_path, capsys) -> None:
    """CIFAR data without its meta file has no class names (0..9): only then is a mismatch a warning."""
    from test_data import write_cifar10

    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    cifar = write_cifar10(tmp_path / "c")
    ckpt = _checkpoint(tmp_path / "c.pt", names, spec=f"cifar10:{cifar}")
    (cifar / "batches.meta").unlink()
    rc, out, err = _run(capsys, "eval", "--checkpoint", str(ckpt))
    assert rc == 0 and "top-1" in out and "class names are unknown; comparing classes by index" in err
    # with the meta file, other names are an error
    write_cifar10(tmp_path / "other")
    meta = tmp_path / "other" / "cifar-10-batches-py" / "batches.meta"
    import pickle

    with meta.open("wb") as f:
        pickle.dump({b"label_names": [n.upper().encode() for n in names]}, f)
    rc, out, err = _run(capsys, "eval", "--checkpoint", str(ckpt), "--data", f"cifar10:{tmp_path / 'other'}")
    assert rc == 2 and "index 0: checkpoint 'airplane', data 'AIRPLANE'" in _one_line(err, "eval")
