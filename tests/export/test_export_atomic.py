"""`mpvg export` writes atomically: the whole file (graph + metadata) goes to a temporary file beside --out, is read
back and checked, then renamed over --out. A failure at any stage (full disk, unwritable folder, a kill) leaves the
previous export as it was and no partial or temporary file; a bad --out or --opset is one line before any work.

Full disk and unwritable folders cannot be produced for real in a test (no small filesystem to mount; root writes
into read-only folders), so the OS error is injected at every place a file is written; a file size limit
(RLIMIT_FSIZE, a real EFBIG from the kernel) reproduces a writer failing half-way in a child process."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mpvg_kernels import export as E

pytest.importorskip("onnx")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from cli_limits import one_line_error, run_cli, snapshot  # noqa: E402
from test_export_guards import _train_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """A tiny `mpvg train` checkpoint (made once)."""
    return {"ckpt": _train_checkpoint(tmp_path_factory.mktemp("made") / "c.pt")}


def _previous(made: dict[str, Path], fmt: str, folder: Path) -> Path:
    """A previous export at ``folder/model.FMT`` (its bytes stand for a good export: they must survive as they are)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"model.{fmt}"
    out.write_bytes(f"previous good {fmt} export".encode() * 1000)
    return out


def _enospc(*args, **kwargs):
    """Stand-in for a writer: half a file into its target (path or file object), then a full disk."""
    target = kwargs.get("f", args[2] if len(args) > 2 else args[1])
    if isinstance(target, (str, os.PathLike)):
        Path(target).write_bytes(b"partial")
    else:
        target.write(b"partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _failing_os_write(monkeypatch, folder: Path, exc: OSError | None) -> None:
    """``os.write`` into a file under ``folder``: ``exc`` after writing a part (None: a silent short write)."""
    real = os.write

    def write(fd, data):
        if _fd_path(fd).startswith(str(folder)):
            real(fd, bytes(data[: max(1, len(data) // 2)]))
            if exc is not None:
                raise exc
            return len(data)  # claims it all
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


# ------------------------------------------------------------------------------------------------------------------
# failures while writing keep the previous export


@pytest.mark.parametrize(("fmt", "stage"), [("onnx", "graph"), ("onnx", "write"), ("pt2", "graph"), ("pt2", "write")])
def test_full_disk_keeps_the_previous_export(tmp_path, capsys, monkeypatch, made, fmt, stage) -> None:
    """ENOSPC while the graph is serialised or while the file is written: one line naming --out and the error,
    the previous file byte for byte, no partial or temporary file."""
    out = _previous(made, fmt, tmp_path / "exports")
    before = snapshot(tmp_path / "exports")
    if stage == "graph":
        monkeypatch.setattr(torch.onnx, "export", _enospc)
        monkeypatch.setattr(torch.export, "save", _enospc)
    else:
        _failing_os_write(monkeypatch, tmp_path / "exports", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    rc, _, err = run_cli(capsys, "export", "--checkpoint", made["ckpt"], "--format", fmt, "--out", out)
    line = one_line_error(err, "export")
    assert rc == 2 and "No space left on device" in line and str(out) in line
    assert snapshot(tmp_path / "exports") == before


@pytest.mark.parametrize("fmt", E.FORMATS)
def test_short_write_is_caught_by_the_read_back(tmp_path, capsys, monkeypatch, made, fmt) -> None:
    """A write that loses bytes without an error: the read-back check refuses the file; the previous one stays."""
    out = _previous(made, fmt, tmp_path / "exports")
    before = snapshot(tmp_path / "exports")
    _failing_os_write(monkeypatch, tmp_path / "exports", None)
    rc, _, err = run_cli(capsys, "export", "--checkpoint", made["ckpt"], "--format", fmt, "--out", out)
    line = one_line_error(err, "export")
    assert rc == 2 and "does not read back" in line and str(out) in line
    assert snapshot(tmp_path / "exports") == before


def test_not_enough_free_space_is_refused_before_writing(tmp_path, capsys, monkeypatch, made) -> None:
    out = _previous(made, "pt2", tmp_path / "exports")
    before = snapshot(tmp_path / "exports")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    rc, _, err = run_cli(capsys, "export", "--checkpoint", made["ckpt"], "--format", "pt2", "--out", out)
    line = one_line_error(err, "export")
    assert rc == 2 and "not enough free space" in line and str(out) in line
    assert snapshot(tmp_path / "exports") == before


def test_reexport_replaces_the_file_whole(tmp_path, capsys, made) -> None:
    """A successful re-export: the new file (with its metadata) in place, its mode kept, no temporary file."""
    import onnx

    out = _previous(made, "onnx", tmp_path / "exports")
    out.chmod(0o640)
    rc, _, err = run_cli(capsys, "export", "--checkpoint", made["ckpt"], "--format", "onnx", "--out", out)
    assert rc == 0, err
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]
    assert (out.stat().st_mode & 0o777) == 0o640
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["class_names"]) == [str(i) for i in range(10)]
    # a new file gets the usual mode (0666 less the umask), not the temporary file's 0600
    new = tmp_path / "new" / "sub" / "m.pt2"
    rc, _, err = run_cli(capsys, "export", "--checkpoint", made["ckpt"], "--format", "pt2", "--out", new)
    umask = os.umask(0)
    os.umask(umask)
    assert rc == 0 and (new.stat().st_mode & 0o777) == 0o666 & ~umask
    assert sorted(p.name for p in new.parent.iterdir()) == ["m.pt2"]


def test_sigkill_during_the_export_keeps_the_previous_file(tmp_path, made) -> None:
    """A process killed (SIGKILL) after the graph is serialised, before the file is complete, leaves --out as it
    was (never a graph without its metadata); the next export removes the dead process's temporary file."""
    out = _previous(made, "onnx", tmp_path / "exports")
    good = out.read_bytes()
    script = textwrap.dedent(f"""
        import os, signal, onnx
        from mpvg_kernels import cli
        die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        onnx.save = die            # where metadata used to be added to the written graph
        os.replace = die           # where the finished file is renamed over --out
        os.fsync = die             # the written temporary file is flushed
        cli.main(["export", "--checkpoint", {str(made["ckpt"])!r}, "--format", "onnx", "--out", {str(out)!r}])
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert out.read_bytes() == good
    from mpvg_kernels import cli

    assert cli.main(["export", "--checkpoint", str(made["ckpt"]), "--format", "onnx", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]


def test_file_size_limit_is_one_line_and_keeps_the_previous_files(tmp_path, made) -> None:
    """A real OS write error half-way (RLIMIT_FSIZE: EFBIG, as a full disk gives ENOSPC) in both formats: one line
    and status 2 each (pt2 used to abort with C++ frames, status 134), previous files intact, nothing else."""
    folder = tmp_path / "exports"
    outs = [_previous(made, fmt, folder) for fmt in ("onnx", "pt2")]
    before = snapshot(folder)
    script = textwrap.dedent(f"""
        import json, resource, signal, sys
        from mpvg_kernels import cli
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        rcs = [cli.main(["export", "--checkpoint", {str(made["ckpt"])!r}, "--format", f, "--out", o])
               for f, o in (("onnx", {str(outs[0])!r}), ("pt2", {str(outs[1])!r}))]
        print(json.dumps(rcs))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [2, 2]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 2 and all(ln.startswith("mpvg export: error: cannot write") for ln in lines), lines
    assert all("File too large" in ln for ln in lines)
    assert snapshot(folder) == before


# ------------------------------------------------------------------------------------------------------------------
# a bad --out or --opset: one line before any work


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the model is loaded or anything is exported."""
    monkeypatch.setattr(E, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: pytest.fail("exported"))
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: pytest.fail("exported"))


@pytest.mark.parametrize("fmt", E.FORMATS)
def test_unwritable_folder_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, made, no_work, fmt) -> None:
    """A folder where no file can be created (EACCES, injected: root writes into read-only folders; EROFS)."""
    folder = tmp_path / "ro"
    out = _previous(made, fmt, folder)
    before = snapshot(tmp_path)
    real_open = os.open

    for err_no in (errno.EACCES, errno.EROFS):

        def refusing_open(path, *a, _e=err_no, **k):
            if str(path).startswith(str(folder)) and (a and a[0] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                raise OSError(_e, os.strerror(_e), str(path))
            return real_open(path, *a, **k)

        monkeypatch.setattr(os, "open", refusing_open)
        rc, _, err = run_cli(capsys, "export", "--checkpoint", made["ckpt"], "--format", fmt, "--out", out)
        line = one_line_error(err, "export")
        assert rc == 2 and str(out) in line and os.strerror(err_no) in line
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_for_real(tmp_path, capsys, made, no_work) -> None:
    folder = tmp_path / "ro"
    out = _previous(made, "onnx", folder)
    folder.chmod(0o555)
    try:
        rc, _, err = run_cli(capsys, "export", "--checkpoint", made["ckpt"], "--format", "onnx", "--out", out)
        assert rc == 2 and "Permission denied" in one_line_error(err, "export")
    finally:
        folder.chmod(0o755)


def test_out_paths_that_cannot_be_an_export(tmp_path, capsys, made, no_work) -> None:
    """A dangling symlink, a path under /proc, a device file, a path below /proc/self: one line each."""
    dangling = tmp_path / "link.onnx"
    dangling.symlink_to(tmp_path / "missing" / "target.onnx")
    cases = [
        (dangling, "dangling symlink"),
        (Path("/proc/mpvg-test.onnx"), "cannot write"),
        (Path("/proc/self/mpvg/x.onnx"), "cannot write"),
        (Path("/dev/null"), "not a regular file"),
    ]
    for out, words in cases:
        rc, _, err = run_cli(capsys, "export", "--checkpoint", made["ckpt"], "--format", "onnx", "--out", out)
        line = one_line_error(err, "export")
        assert rc == 2 and str(out) in line and words in line, line
    assert dangling.is_symlink() and not (tmp_path / "missing").exists()
    assert Path("/dev/null").is_char_device()


def test_symlink_to_an_export_is_written_through(tmp_path, capsys, made) -> None:
    """--out a symlink to a previous export: the target is replaced, the link stays a link."""
    target = _previous(made, "pt2", tmp_path / "real")
    link = tmp_path / "current.pt2"
    link.symlink_to(target)
    rc, _, err = run_cli(capsys, "export", "--checkpoint", made["ckpt"], "--format", "pt2", "--out", link)
    assert rc == 0, err
    assert link.is_symlink() and link.resolve() == target
    assert json.loads(_pt2_metadata(target)["class_names"]) == [str(i) for i in range(10)]


def _pt2_metadata(path: Path) -> dict:
    import zipfile

    with zipfile.ZipFile(path) as z:
        return json.loads(z.read(next(n for n in z.namelist() if n.endswith("/extra/" + E.PT2_METADATA_FILE))))


@pytest.mark.parametrize("opset", ["1000", "-1", str(E.MIN_OPSET - 1), "99999999999999999999"])
def test_opset_outside_the_supported_range_is_one_line(tmp_path, capsys, made, no_work, opset) -> None:
    out = tmp_path / "m.onnx"
    rc, _, err = run_cli(
        capsys, "export", "--checkpoint", made["ckpt"], "--format", "onnx", "--out", out, "--opset", opset
    )
    line = one_line_error(err, "export")
    assert rc == 2 and f"--opset {opset}" in line and f"{E.MIN_OPSET} to {E.MAX_OPSET}" in line
    assert not out.exists()


def test_max_opset_is_the_exporters() -> None:
    constants = pytest.importorskip("torch.onnx._constants")
    assert constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET == E.MAX_OPSET


def test_opset_above_the_exporters_supported_one_is_refused(tmp_path, capsys, made, no_work) -> None:
    rc, _, err = run_cli(
        capsys,
        "export",
        "--checkpoint",
        made["ckpt"],
        "--format",
        "onnx",
        "--out",
        tmp_path / "m.onnx",
        "--opset",
        str(E.MAX_OPSET + 1),
    )
    assert rc == 2 and f"--opset {E.MAX_OPSET + 1}" in one_line_error(err, "export")


def test_opset_with_pt2_is_refused(tmp_path, capsys, made, no_work) -> None:
    rc, _, err = run_cli(
        capsys, "export", "--checkpoint", made["ckpt"], "--format", "pt2", "--out", tmp_path / "m.pt2", "--opset", "18"
    )
    assert rc == 2 and "--opset applies to --format onnx" in one_line_error(err, "export")


@pytest.mark.parametrize(
    ("option", "words"),
    [
        (["--num-classes", "10000000000"], "GiB for its weights"),
        (["--model-arg", "depth=10000000"], "integers above"),
        (["--model-arg", "img_size=10000"], "beyond 4096 pixels"),
        (["--model-arg", "embed_dim=-5"], "embed_dim must be"),
    ],
)
def test_model_without_checkpoint_is_bounded_before_allocating(tmp_path, capsys, option, words) -> None:
    """Without --checkpoint the model is sized on the meta device first: weights beyond the available memory, an
    absurd option or input size are one line, nothing allocated (the address space is capped)."""
    out = tmp_path / "m.pt2"
    rc, _, err = run_cli(
        capsys, "export", "--model", "vit_digits", "--pe", "mpvg", "--format", "pt2", "--out", out, *option
    )
    assert rc == 2 and words in one_line_error(err, "export") and not out.exists()
