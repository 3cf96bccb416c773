"""Export an inference graph with the PE cache frozen into constants: ONNX (standard operators) or ``torch.export``.

- :class:`FrozenPEModel` wraps a copy of a model whose image-independent PE terms (the chain pos_1..pos_L, the
  last PE term and the pooled last-LN bias c; ``docs/design.md#why-the-pe-term-collapses-into-a-pooled-bias``)
  are computed once (``model.compute_pe_terms()``) and held as buffers; its forward runs the model with those
  terms (``model(x, pe_terms=...)``), so no LN'(pos) is computed in the exported graph.
- ONNX (:func:`export_onnx`): the TorchScript-based exporter (``dynamo=False``; it needs no ``onnxscript``), opset
  >= 17. The ``mpvg::layer_norm_add`` / ``mpvg::layer_norm_pool`` custom ops are translated to the standard
  ``LayerNormalization`` (+ ``Add``, + ``ReduceMean`` for the pooled op); where the backend resolves to ``torch``
  the reference math is exported as plain operators. Either way the graph holds no custom-domain op, so
  onnxruntime (or any ONNX runtime) runs it. Batch size is dynamic.
- ``torch.export`` (:func:`export_pt2`): keeps the ``mpvg::`` ops as they are (with the C++ backend built; saved
  with ``torch.export.save``; load with ``torch.export.load`` after ``import mpvg_kernels``). Batch is dynamic.

- :func:`export_model`: one call for either format (optional backend, optional verification run), what
  ``mpvg export --model NAME --pe MODE [--checkpoint FILE] --format onnx|pt2 --out FILE`` calls after
  :func:`load_model`. With a checkpoint, every parameter and buffer of the exported model comes from it
  (:func:`load_model` refuses anything else).
- :func:`deployment_metadata`: the preprocessing (input size, mean/std, resize policy, interpolation,
  antialiasing, crop_pct), class names, model name, PE mode and backend, written into the file (ONNX
  ``metadata_props``; ``mpvg_metadata.json`` in a pt2 archive); ``docs/deploy.md`` says how to read it.
- Every file is written atomically (:func:`write_file_atomically`): the whole export (graph and metadata) is
  serialised in memory, checked, written to a temporary file beside the output, read back, and renamed over the
  output. A failure at any point (a full disk, an unwritable folder, an interrupt; a kill before the rename) leaves
  the previous file as it was and no partial file; a temporary file left by a killed export is removed by the next
  export into that folder.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import io
import os
import re
import shutil
import socket
import stat
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .layers.pe_walk import PETerms
from .ops import backends

#: Opset used unless told otherwise (LayerNormalization needs >= 17).
DEFAULT_OPSET = 18
MIN_OPSET = 17
#: The newest opset the TorchScript-based exporter supports (``torch.onnx._constants.
#: ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET``; it warns "not supported" above it). A constant, so that the ``mpvg``
#: command does not import ``torch.onnx`` to build its parser.
MAX_OPSET = 20
FORMATS = ("onnx", "pt2", "safetensors")


# ----------------------------------------------------------------------------------------------- frozen model


class FrozenPEModel(nn.Module):
    """Inference-only copy of a model with its image-independent PE terms precomputed and held as buffers.

    ``model`` is any model with ``compute_pe_terms(grid)`` and ``forward(x, pe_terms=...)`` (every model of
    :mod:`mpvg_kernels.models`). The terms are computed for the model's token grid (its ``img_size``); the wrapper
    takes images of that size at any batch size. Parameters are frozen (``requires_grad=False``) and the wrapper
    stays in eval mode. The original model is not modified.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        model = copy.deepcopy(model).eval()
        model.requires_grad_(False)
        self.model = model
        with torch.no_grad():
            terms = model.compute_pe_terms()
        self._buffer_names: dict[str, str] = {}
        if terms is not None:
            for key, t in terms.tensors().items():
                name = "pe_" + key.replace(".", "_")
                self.register_buffer(name, t.detach().clone())
                self._buffer_names[key] = name
        self.depth = 0 if terms is None else len(terms.terms)
        self.eval()

    def frozen_terms(self) -> PETerms | None:
        """The frozen PE terms (None for a model without PE)."""
        if not self._buffer_names:
            return None
        return PETerms.from_tensors({k: getattr(self, n) for k, n in self._buffer_names.items()}, self.depth)

    def train(self, mode: bool = True) -> FrozenPEModel:
        """Always eval: the frozen terms are inference-only."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> logits [B, num_classes], through the model's path for precomputed PE terms."""
        return self.model(x, pe_terms=self.frozen_terms())


def _prepare(model: nn.Module, freeze: bool, example_batch: int) -> tuple[nn.Module, torch.Tensor]:
    """(the model to trace, in eval mode and frozen if asked; an input)."""
    if freeze and not isinstance(model, FrozenPEModel):
        model = FrozenPEModel(model)
    model.eval()
    return model, example_input(model, example_batch)


def example_input(model: nn.Module, batch: int = 2) -> torch.Tensor:
    """A random image batch of the model's input size (``default_cfg["input_size"]``)."""
    inner = model.model if isinstance(model, FrozenPEModel) else model
    c, h, w = inner.default_cfg["input_size"]
    g = torch.Generator().manual_seed(0)
    p = next(inner.parameters())
    return torch.randn(batch, c, h, w, generator=g).to(device=p.device, dtype=p.dtype)


# ----------------------------------------------------------------------------------------------- ONNX


def _onnx_ln(g: Any, x: Any, weight: Any, bias: Any, eps: Any) -> tuple[Any, Any, Any]:
    from torch.onnx import symbolic_helper as sh

    eps_f = sh._get_const(eps, "f", "eps")
    y, mean, rstd = g.op("LayerNormalization", x, weight, bias, axis_i=-1, epsilon_f=eps_f, outputs=3)
    return y, mean, rstd


def _onnx_add_pe(g: Any, y: Any, pe: Any) -> Any:
    from torch.onnx import symbolic_helper as sh

    return y if sh._is_none(pe) else g.op("Add", y, pe)


def _onnx_stats(g: Any, mean: Any, rstd: Any) -> Any:
    """The ops' statistics output (one buffer: the means, then the reciprocal stds; unused at inference)."""
    flat = g.op("Constant", value_t=torch.tensor([-1], dtype=torch.int64))
    return g.op("Concat", g.op("Reshape", mean, flat), g.op("Reshape", rstd, flat), axis_i=0)


def _make_sym_layer_norm(pool: bool, axes_as_input: bool = False) -> Any:
    """The symbolic of ``mpvg::layer_norm_add`` (``pool`` False) or ``mpvg::layer_norm_pool``."""

    def sym(g: Any, x: Any, pe: Any, weight: Any, bias: Any, eps: Any) -> tuple[Any, Any]:
        y, mean, rstd = _onnx_ln(g, x, weight, bias, eps)
        y = _onnx_add_pe(g, y, pe)
        if pool and axes_as_input:  # opset >= 18: axes is an input
            axes = g.op("Constant", value_t=torch.tensor([-2], dtype=torch.int64))
            y = g.op("ReduceMean", y, axes, keepdims_i=0)
        elif pool:
            y = g.op("ReduceMean", y, axes_i=[-2], keepdims_i=0)
        return y, _onnx_stats(g, mean, rstd)

    return sym


_SYMBOLICS_REGISTERED = [False]


def register_onnx_symbolics() -> None:
    """Teach the TorchScript ONNX exporter to write the ``mpvg::`` ops as standard ONNX operators (idempotent).

    ``layer_norm_add`` -> ``LayerNormalization`` (+ ``Add`` of the PE); ``layer_norm_pool`` -> ``LayerNormalization``
    (+ ``Add``) + ``ReduceMean`` over the tokens. The saved statistics map to LayerNormalization's optional
    Mean / InvStdDev outputs, concatenated (unused at inference).
    """
    if _SYMBOLICS_REGISTERED[0]:
        return
    from torch.onnx import register_custom_op_symbolic

    register_custom_op_symbolic("mpvg::layer_norm_add", _make_sym_layer_norm(False), MIN_OPSET)
    register_custom_op_symbolic("mpvg::layer_norm_pool", _make_sym_layer_norm(True), MIN_OPSET)
    register_custom_op_symbolic("mpvg::layer_norm_pool", _make_sym_layer_norm(True, axes_as_input=True), 18)
    _SYMBOLICS_REGISTERED[0] = True


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the exporters' tracer and deprecation warnings (shape checks that are constant per graph)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*dynamic_axes.*")
        yield


def export_onnx(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    example_batch: int = 2,
    freeze: bool = True,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` (frozen with :class:`FrozenPEModel` unless ``freeze=False`` or already frozen) as ONNX.

    Input ``images`` [batch, C, H, W] float32, output ``logits`` [batch, num_classes]; ``batch`` is dynamic. The
    graph uses standard operators only (checked: a custom-domain node raises RuntimeError). ``metadata`` goes into
    ``metadata_props``. The file is written atomically (:func:`write_file_atomically`). Returns the path written
    (through a symlink: its target).
    """
    import onnx

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be from {MIN_OPSET} (LayerNormalization) to {MAX_OPSET}, got {opset}")
    register_onnx_symbolics()
    model, x = _prepare(model, freeze, example_batch)
    buf = io.BytesIO()
    with torch.no_grad(), _quiet_export():
        torch.onnx.export(
            model,
            (x,),
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
        )
    proto = onnx.load_from_string(buf.getvalue())
    bad = custom_domain_ops(proto)
    if bad:
        raise RuntimeError(f"the exported ONNX graph holds non-standard operators: {', '.join(sorted(bad))}")
    _set_metadata_props(proto, metadata or {})
    data = proto.SerializeToString()
    _check_onnx_bytes(data, metadata or {})
    return write_file_atomically(out, data)


def _check_onnx_bytes(data: bytes, metadata: dict[str, str]) -> None:
    """RuntimeError unless ``data`` parses as a valid ONNX model (``onnx.checker``) carrying ``metadata``."""
    import onnx

    proto = onnx.load_from_string(data)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise RuntimeError(f"the exported ONNX model is not valid: {str(e).strip().splitlines()[0]}") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if any(props.get(k) != v for k, v in metadata.items()):
        raise RuntimeError("the exported ONNX model lost its metadata")


def custom_domain_ops(path: str | os.PathLike | Any) -> set[str]:
    """``domain::op_type`` of every node (subgraphs included) outside the standard ONNX domains; ``path``: an
    ONNX file or an ``onnx.ModelProto``."""
    import onnx

    standard = {"", "ai.onnx"}
    found: set[str] = set()

    def walk(graph: Any) -> None:
        for node in graph.node:
            if node.domain not in standard:
                found.add(f"{node.domain}::{node.op_type}")
            for attr in node.attribute:
                if attr.g is not None and len(attr.g.node):
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    proto = path if isinstance(path, onnx.ModelProto) else onnx.load(str(path), load_external_data=False)
    walk(proto.graph)
    return found


def onnx_op_types(path: str | os.PathLike) -> dict[str, int]:
    """Operator type -> count of the top-level graph (for reports)."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# ----------------------------------------------------------------------------------------------- torch.export


def export_pt2(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    example_batch: int = 2,
    max_batch: int = 4096,
    freeze: bool = True,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` (frozen as for ONNX) as a ``torch.export`` program (``torch.export.save``), dynamic batch.

    The ``mpvg::`` custom ops stay in the graph (when the backend in force resolves to a fused kernel); the program
    loads with ``torch.export.load`` in a process that has imported ``mpvg_kernels``. ``metadata`` is stored as
    the JSON file :data:`PT2_METADATA_FILE` in the archive. The archive is serialised in memory (so a failing
    disk cannot abort the C++ writer) and written atomically (:func:`write_file_atomically`). Returns the path
    written (through a symlink: its target).
    """
    model, x = _prepare(model, freeze, example_batch)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.no_grad():
        ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    extra = None
    if metadata:
        import json

        extra = {PT2_METADATA_FILE: json.dumps(metadata, indent=1)}
    buf = io.BytesIO()
    torch.export.save(ep, buf, extra_files=extra)
    data = buf.getvalue()
    _check_pt2_bytes(data, metadata or {})
    return write_file_atomically(out, data)


def _check_pt2_bytes(data: bytes, metadata: dict[str, str]) -> None:
    """RuntimeError unless ``data`` is an intact zip archive (CRCs) carrying ``metadata`` as JSON."""
    import json
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as z:
        if z.testzip() is not None:
            raise RuntimeError("the exported pt2 archive is corrupt")
        if metadata:
            names = [n for n in z.namelist() if n.endswith("/extra/" + PT2_METADATA_FILE)]
            if len(names) != 1 or json.loads(z.read(names[0])) != metadata:
                raise RuntimeError("the exported pt2 archive lost its metadata")


# ----------------------------------------------------------------------------------------------- atomic writes

#: Temporary files of an export in progress: ``.mpvg-export-HOST-PID-XXXXXXXX.tmp`` beside the output.
_TMP_PREFIX = ".mpvg-export-"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:32] or "host"


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files that exports on this host by processes no longer running left in ``folder``
    (POSIX only: elsewhere ``os.kill(pid, 0)`` is no liveness test)."""
    if os.name != "posix":
        return
    mine = f"{_TMP_PREFIX}{_host()}-"
    for p in folder.glob(f"{mine}*.tmp"):
        pid = p.name[len(mine):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                p.unlink()
        except OSError:
            pass  # alive (another user's process)


def _new_file_mode() -> int:
    """The permission bits ``open()`` gives a new file: 0o666 less the umask."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def out_target(out: str | os.PathLike, example_name: str = "model.onnx") -> Path:
    """The file an export to ``out`` writes: ``out`` itself, or the target of a symlink ``out`` (the link is kept);
    a :class:`~mpvg_kernels.errors.UserError` for a dangling symlink, a folder (the message suggests
    ``out/example_name``) or a file that is not regular (a device, a FIFO: it would be replaced), a path below a
    file, a folder where no file can be created."""
    from .errors import UserError

    path = Path(out)
    target = path
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if not target.exists():
            raise UserError(f"--out {path} is a dangling symlink (to {os.readlink(path)}); remove it or give "
                            "another path")
    if target.is_dir():
        raise UserError(f"--out {path} is a folder; give the file to write, e.g. {path / example_name}")
    if target.exists() and not target.is_file():
        raise UserError(f"--out {path} is not a regular file (a device, FIFO or socket); an export writes a new "
                        "file and renames it over --out")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--out {path}: {parent} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise UserError(f"cannot write --out {path}: no file can be created in {parent} "
                        f"({e.strerror or type(e).__name__})") from None
    return target


def write_file_atomically(out: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``out`` so that ``out`` is either its previous content or ``data``, never anything else.

    The bytes go to a temporary file in ``out``'s folder (missing folders are created), are flushed to the disk and
    read back, and the file is renamed over ``out`` (a symlink ``out``: over its target). A new file gets the
    usual permissions (0o666 less the umask), a replaced one keeps its own. Not enough free space, an OS error or
    bytes that do not read back are a :class:`~mpvg_kernels.errors.UserError`; then the temporary file and the
    folders created are removed and ``out`` is left as it was. Returns the path written.
    """
    from .errors import UserError

    target = out_target(out)
    existed = target.exists()
    kept = f"; {out} is left as it was" if existed else ""
    created: list[Path] = []
    d = target.parent
    while not d.exists():
        created.append(d)
        d = d.parent
    tmp: str | None = None
    done = False
    try:
        for folder in reversed(created):
            folder.mkdir()
        _remove_stale_temporaries(target.parent)
        free = shutil.disk_usage(target.parent).free
        if free < len(data):
            raise UserError(f"cannot write {out}: not enough free space in {target.parent} ({len(data) / 1e6:.1f} MB "
                            f"needed, {free / 1e6:.1f} MB free){kept}")
        mode = stat.S_IMODE(target.stat().st_mode) if existed else _new_file_mode()
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f"{_TMP_PREFIX}{_host()}-{os.getpid()}-",
                                   suffix=".tmp")
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                if n <= 0:
                    raise OSError(errno.EIO, "write wrote nothing")
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            back = f.read()
        if back != data:
            raise UserError(f"cannot write {out}: the written file does not read back as written ({len(back)} bytes "
                            f"on disk, {len(data)} written){kept}")
        os.replace(tmp, target)
        done = True
        with contextlib.suppress(OSError):  # make the rename durable where the folder can be opened
            dfd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}{kept}") from None
    finally:
        if not done:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            for folder in created:  # innermost first; only the empty ones this call made
                with contextlib.suppress(OSError):
                    folder.rmdir()
    return target


def export_safetensors(model: nn.Module, out: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write the weights of ``model`` as a ``.safetensors`` checkpoint that ``mpvg eval/predict/export
    --checkpoint`` and :func:`~mpvg_kernels.models.load_pretrained` read (no pickle): the tensors of its state dict,
    and as metadata (str -> str, values JSON) ``model`` {name, pe, kwargs, num_classes}, ``data`` (classes,
    in_chans, input_size, mean, std, crop_pct, eval_resize, spec), ``config``, ``epoch`` and ``metadata`` (the
    deployment keys of :func:`deployment_metadata`). Atomic (:func:`write_file_atomically`). A model not built by
    :func:`~mpvg_kernels.models.factory.build_model` (no registered name to rebuild it from) is a
    :class:`~mpvg_kernels.errors.UserError`."""
    import json

    from .errors import UserError
    from .models.factory import MODEL_META_ATTR, safetensors_checkpoint_bytes

    inner = model.model if isinstance(model, FrozenPEModel) else model
    meta = dict(inner.__dict__.get(MODEL_META_ATTR) or {})
    if not meta:
        raise UserError("--format safetensors needs a registered model (--model NAME or an `mpvg train` checkpoint)")
    epoch = meta.pop("epoch", None)
    if epoch is None:  # weights that did not come from an `mpvg train` run: no epoch of ours (the field is required)
        epoch = 0
    props = {**deployment_metadata(inner), **(metadata or {})}
    data = inner.__dict__.get(_PREPROCESSING_ATTR)
    if not data:  # the preprocessing the deployment metadata states (the model's default_cfg)
        c, h, w = json.loads(props["input_size"])
        n = int(props["num_classes"])
        data = {"classes": json.loads(props["class_names"]) or [str(i) for i in range(n)],  # no data set: no spec
                "in_chans": c, "input_size": [h, w], "mean": json.loads(props["mean"]),
                "std": json.loads(props["std"]), "crop_pct": float(props["crop_pct"]),
                "eval_resize": props["eval_resize"]}
    entries = {"model": meta, "data": dict(data), "config": {}, "epoch": epoch}
    return write_file_atomically(out, safetensors_checkpoint_bytes(inner.state_dict(), entries, props))


def load_pt2(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """``torch.export.load`` after registering the ``mpvg::`` ops (importing this package does that)."""
    return torch.export.load(str(path))


def graph_custom_ops(ep: torch.export.ExportedProgram) -> set[str]:
    """Names of the ``mpvg::`` ops an exported program calls."""
    names = set()
    for node in ep.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("mpvg."):
            names.add(str(node.target))
    return names


# ----------------------------------------------------------------------------------------------- model loading


def load_model(
    name: str | None,
    pe: str | None,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = None,
    weights: str = "auto",
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """The model to export, in eval mode; the loading itself is :mod:`mpvg_kernels.models.factory`'s and
    :func:`mpvg_kernels.models.checkpoint_filter_fn`'s, the file is read once.

    Every parameter and buffer of the returned model comes from the checkpoint (when one is given); anything else
    is a :class:`~mpvg_kernels.errors.UserError` naming what is missing, unused or of another shape:

    - an ``mpvg train`` checkpoint: the model is rebuilt from it (name, PE mode and options recorded there; a
      ``name``, ``pe``, ``num_classes`` or ``model_kwargs`` entry that disagrees is an error); ``weights`` picks
      ``auto``/``ema``/``model``;
    - a timm/DeiT-format checkpoint or plain state dict: needs ``name`` (and ``pe``), adapted with the models'
      checkpoint filter (PE grid resampling and RGB -> gray patch filters are allowed), then every tensor of the
      model must be there with its shape and every tensor of the checkpoint must be used;
    - no checkpoint: ``create_model(name, pe=pe, num_classes=..., **model_kwargs)`` with its random init (for smoke
      tests and benchmarking); ``num_classes`` None keeps the registered one.

    A model from an ``mpvg train`` checkpoint carries the checkpoint's preprocessing and class names
    (:func:`attach_preprocessing`), which :func:`export_model` writes into the exported file
    (:func:`deployment_metadata`).
    """
    from .errors import UserError
    from .models import factory as C

    raw = None
    if checkpoint is not None:
        path = Path(checkpoint)
        raw = C.read_torch_file(path)  # read once: a train checkpoint or timm/DeiT-format weights
        if C.is_train_checkpoint(raw):
            ckpt = C.validate_checkpoint(raw, path)
            meta = ckpt["model"]
            for what, given, stored in (("model", name, meta["name"]), ("pe", pe, meta["pe"])):
                if given is not None and given != stored:
                    raise UserError(f"--{what} {given!r} disagrees with the checkpoint, which holds {stored!r}")
            model = C.model_from_checkpoint(ckpt, weights=weights, where=str(path)).eval()
            _check_options_against_checkpoint(meta, num_classes, model_kwargs or {}, model)
            attach_preprocessing(model, ckpt.get("data") or {})
            return model
        if name is None:
            raise UserError(f"{path} is not an `mpvg train` checkpoint: pass --model (and --pe) to load it")
        if weights != "auto":
            raise UserError(f"--weights {weights} picks the EMA or trained weights of an `mpvg train` checkpoint; "
                            f"{path} is not an `mpvg train` checkpoint (it holds one set of weights): drop --weights")
    if name is None:
        raise UserError("pass --model NAME (or --checkpoint of an `mpvg train` run)")
    C.check_model_fits(name, pe or "default", num_classes, dict(model_kwargs or {}))  # before allocating
    model = C.build_model(name, pe or "default", num_classes, dict(model_kwargs or {}))  # type: ignore[arg-type]
    if raw is not None:
        _load_complete(model, raw, f"{checkpoint}", f"{name} (pe={pe or 'default'})")
    return model.eval()


def _norm_value(v: Any) -> Any:
    """Lists and tuples compare alike (``img_size=[16, 16]`` from a YAML file, ``(16, 16)`` from Python)."""
    return tuple(_norm_value(x) for x in v) if isinstance(v, (list, tuple)) else v


def _check_options_against_checkpoint(meta: dict[str, Any], num_classes: int | None,
                                      model_kwargs: dict[str, Any], model: nn.Module) -> None:
    """``--num-classes`` / ``--model-arg`` given with an ``mpvg train`` checkpoint must equal what it holds (its
    recorded options, else the registered defaults, else what the rebuilt ``model`` resolved a None default to):
    the model is rebuilt from the checkpoint, never changed."""
    import inspect

    from .errors import UserError
    from .models import MODEL_CFGS

    stored_classes = int(meta["num_classes"])
    if num_classes is not None and int(num_classes) != stored_classes:
        raise UserError(f"--num-classes {num_classes} disagrees with the checkpoint, which holds {stored_classes} "
                        "(the model is rebuilt from the checkpoint; drop --num-classes)")
    if not model_kwargs:
        return
    effective: dict[str, Any] = {
        k: p.default for k, p in inspect.signature(type(model).__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    effective.update(MODEL_CFGS.get(meta["name"], {}).get("model", {}))
    effective.update(dict(meta.get("kwargs") or {}))
    for key, value in model_kwargs.items():
        if effective.get(key, "") is None and isinstance(getattr(model, key, None), (str, int, float, bool)):
            effective[key] = getattr(model, key)  # e.g. pool=None: resolved by the model
        if key not in effective:
            raise UserError(f"--model-arg {key}={value!r}: {key!r} is not an option of {meta['name']} (the model "
                            "is rebuilt from the checkpoint; drop --model-arg)")
        if _norm_value(value) != _norm_value(effective[key]):
            raise UserError(f"--model-arg {key}={value!r} disagrees with the checkpoint, which holds "
                            f"{effective[key]!r} (the model is rebuilt from the checkpoint; drop --model-arg)")


def _load_complete(model: nn.Module, raw: Any, where: str, what: str) -> None:
    """Load timm/DeiT-format weights (or a plain state dict) into ``model`` only if they give every one of its
    parameters and buffers and every checkpoint tensor is used; else a UserError listing the differences."""
    from .errors import UserError
    from .models.factory import mismatch_parts
    from .models.pretrained import checkpoint_filter_fn, map_checkpoint_keys, unwrap_state_dict

    try:
        sd = map_checkpoint_keys(unwrap_state_dict(raw), model)  # published layouts in our key names
        filtered = checkpoint_filter_fn(raw, model)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"cannot load {where} into {what}: {e}") from None
    own = model.state_dict()
    shapes, missing = [], []
    for k, t in own.items():
        v = filtered.get(k, sd.get(k))  # the filter drops a head of another size: report its shape
        if v is None:
            missing.append(k)
        elif tuple(v.shape) != tuple(t.shape):
            shapes.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(t.shape)}")
    has_cls_src = "cls_token" in sd or "dist_token" in sd
    if "pos_embed" in filtered and getattr(model, "cls_token", None) is not None and not has_cls_src:
        missing.append("pos_embed[class-token row]")  # the filter keeps the model's own (random) row
    unused = [k for k in sd if k not in filtered and k not in own] + [k for k in filtered if k not in own]
    if "cls_token" in unused and "pos_embed" in filtered:
        unused.append("pos_embed[class-token row]")  # dropped with the class token
    parts = mismatch_parts(missing, unused, shapes, missing_note="(they would keep their initial values)",
                           unexpected_word="unused", unexpected_note="(in the checkpoint, not in the model)")
    if parts:
        raise UserError(f"{where} does not fit {what}: the exported model would not be entirely from the "
                        f"checkpoint: {'; '.join(parts)}")
    model.load_state_dict(filtered, strict=True)


def max_abs_diff_onnx(model: nn.Module, path: str | os.PathLike, x: torch.Tensor) -> float:
    """Max |onnxruntime(x) - model(x)| (the model in eval mode, no grad, the backend in force)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        ref = model.eval()(x)
    return float((got - ref).abs().max())


def max_abs_diff_safetensors(model: nn.Module, path: str | os.PathLike, x: torch.Tensor) -> float:
    """Max |model rebuilt from the ``.safetensors`` checkpoint (x) - model(x)|, both in eval mode, no grad."""
    from .models import factory as C

    rebuilt = C.model_from_checkpoint(C.load_checkpoint(path), where=str(path))
    with torch.no_grad():
        return float((rebuilt(x) - model.eval()(x)).abs().max())


# ----------------------------------------------------------------------------------------------- metadata

#: Version of the metadata layout written by :func:`deployment_metadata` (docs/deploy.md).
METADATA_VERSION = 1
#: The file inside a ``.pt2`` archive that holds the same metadata as JSON (``torch.export.load(extra_files=...)``).
PT2_METADATA_FILE = "mpvg_metadata.json"
_PREPROCESSING_ATTR = "_mpvg_preprocessing"
#: How ``mpvg predict`` / ``mpvg eval`` resize for each eval resize policy (mpvg_kernels/data.py: ``resize_batch`` for
#: ``full``, ``resize_center_crop`` for ``center_crop``): (interpolation, antialias).
_RESIZE = {"full": ("bilinear", "true"), "center_crop": ("bicubic", "when_downscaling")}


def attach_preprocessing(model: nn.Module, data: dict[str, Any]) -> nn.Module:
    """Record a checkpoint's ``data`` entry (classes, in_chans, input_size, mean, std, crop_pct, eval_resize) on
    ``model`` for :func:`deployment_metadata`; returns the model."""
    model.__dict__[_PREPROCESSING_ATTR] = dict(data)
    return model


def deployment_metadata(model: nn.Module, backend: str | None = None) -> dict[str, str]:
    """What a deployment needs to run the exported file exactly like ``mpvg predict``, as strings (lists as JSON).

    From the ``mpvg train`` checkpoint the model was loaded from (``preprocessing_source`` ``checkpoint``), else
    from the model's ``default_cfg`` (``model default_cfg``: timm's resize + center crop, no class names). Keys:
    ``model_name``, ``pe``, ``pool``, ``backend`` (the op backend the graph was traced with), ``input_name``,
    ``output_name``, ``input_size`` [C, H, W], ``color_mode`` (PIL mode: L or RGB), ``mean``, ``std`` (per
    channel, on pixels / 255), ``eval_resize`` (``full``: the whole image to H x W; ``center_crop``: shorter side
    to floor(min(H, W) / crop_pct), rounded to uint8, then a centered H x W crop), ``interpolation``,
    ``antialias``, ``bicubic_a`` (JSON, the cubic kernel's a for down/upscaling) and ``resize_dtype`` (uint8: the
    resized image is rounded to uint8; float: resized on pixels / 255) of that resize, ``crop_pct``,
    ``class_names`` (JSON list, index = logit), ``num_classes``, ``preprocessing_source``,
    ``mpvg_kernels_version``, ``metadata_version``. See docs/deploy.md.
    """
    import json

    from . import __version__

    inner = model.model if isinstance(model, FrozenPEModel) else model
    cfg = dict(getattr(inner, "default_cfg", {}) or {})
    data = inner.__dict__.get(_PREPROCESSING_ATTR)
    head = getattr(inner, "head", None)
    num_classes = int(getattr(head, "out_features", cfg.get("num_classes", 0)) or 0)
    c, h, w = (int(v) for v in cfg.get("input_size", (0, 0, 0)))
    if data:
        source = "checkpoint"
        c = int(data.get("in_chans", c))
        h, w = (int(v) for v in data.get("input_size", (h, w)))
        mean, std = list(data.get("mean", cfg.get("mean", ()))), list(data.get("std", cfg.get("std", ())))
        crop_pct = float(data.get("crop_pct", cfg.get("crop_pct", 1.0)))
        eval_resize = str(data.get("eval_resize") or "full")
        classes = [str(x) for x in data.get("classes", ())]
    else:
        source = "model default_cfg"
        mean, std = list(cfg.get("mean", ())), list(cfg.get("std", ()))
        crop_pct = float(cfg.get("crop_pct", 1.0))
        eval_resize = "center_crop"
        classes = []
    if len(mean) == 1 and c > 1:  # one value for every channel, as the transforms broadcast it
        mean, std = mean * c, std * c
    interpolation, antialias = _RESIZE.get(eval_resize, ("bilinear", "true"))
    # center_crop resizes uint8 images (rounded back to uint8 before the crop); its bicubic kernel is PyTorch's:
    # a = -0.5 when antialiased (downscaling; PIL's BICUBIC), a = -0.75 otherwise (upscaling)
    cubic = {"downscale": -0.5, "upscale": -0.75} if interpolation == "bicubic" else {}
    resolved = backend if backend not in (None, "auto") else backends.resolve_backend(torch.device("cpu"))
    return {
        "model_name": str(cfg.get("architecture", type(inner).__name__)),
        "pe": str(getattr(inner, "pe", cfg.get("pe", ""))),
        "pool": str(getattr(inner, "pool", cfg.get("pool", ""))),
        "backend": str(resolved),
        "input_name": "images",
        "output_name": "logits",
        "input_size": json.dumps([c, h, w]),
        "color_mode": {1: "L", 3: "RGB"}.get(c, str(c)),
        "mean": json.dumps([float(v) for v in mean]),
        "std": json.dumps([float(v) for v in std]),
        "eval_resize": eval_resize,
        "interpolation": interpolation,
        "antialias": antialias,
        "bicubic_a": json.dumps(cubic),
        "resize_dtype": "uint8" if eval_resize == "center_crop" else "float",
        "crop_pct": repr(crop_pct),
        "class_names": json.dumps(classes),
        "num_classes": str(num_classes),
        "preprocessing_source": source,
        "mpvg_kernels_version": str(__version__),
        "metadata_version": str(METADATA_VERSION),
    }


def _set_metadata_props(proto: Any, metadata: dict[str, str]) -> None:
    """Set ``metadata_props`` of an ``onnx.ModelProto`` (existing keys replaced, others kept)."""
    kept = {p.key: p.value for p in proto.metadata_props if p.key not in metadata}
    del proto.metadata_props[:]
    for key, value in {**kept, **metadata}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)


def write_onnx_metadata(path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Set ``metadata_props`` of an ONNX file (existing keys replaced, others kept), rewriting it atomically."""
    import onnx

    m = onnx.load(str(path))
    _set_metadata_props(m, metadata)
    data = m.SerializeToString()
    _check_onnx_bytes(data, metadata)
    write_file_atomically(path, data)


# ----------------------------------------------------------------------------------------------- one call


def check_export_options(out: str | os.PathLike, format: str, *, opset: int | None = None,
                         backend: str | None = None, device: torch.device | str = "cpu") -> None:
    """Refuse, before any work, what an export cannot do (a :class:`~mpvg_kernels.errors.UserError` naming the
    value): an unknown format, an opset outside :data:`MIN_OPSET`..:data:`MAX_OPSET` (or any opset for pt2), an
    output path :func:`out_target` refuses (a folder, a dangling symlink, a device file, a path below a file, a
    folder where no file can be created), a backend that is unknown or not available for tensors on ``device``
    (where the model is traced). ``opset`` None: the default (onnx)."""
    from .errors import UserError

    if format not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == "onnx" and opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"--opset {opset}: ONNX export supports opsets {MIN_OPSET} to {MAX_OPSET} "
                        f"(LayerNormalization needs {MIN_OPSET}; {MAX_OPSET} is the newest the TorchScript exporter "
                        "supports)")
    if format != "onnx" and opset is not None:
        raise UserError(f"--opset {opset}: --opset applies to --format onnx only")
    out_target(out, f"model.{format}")
    if backend is not None:
        if backend not in backends.KNOWN_BACKENDS:
            raise UserError(f"--backend {backend}: unknown backend; choose one of "
                            f"{', '.join(backends.KNOWN_BACKENDS)}")
        dev = torch.device(device)
        why = None if backend == "auto" else backends._unavailable_reason(backend, dev)
        if why is not None:
            raise UserError(f"--backend {backend} is not available to trace a model on {dev.type}: {why}")


class ExportResult(NamedTuple):
    """What :func:`export_model` wrote: the file, a one-line report, and the verification's max |diff| (or None)."""

    path: Path
    message: str
    max_abs_diff: float | None


def export_model(
    model: nn.Module,
    out: str | os.PathLike,
    format: str,
    *,
    opset: int | None = None,
    backend: str | None = None,
    verify: bool = False,
    verify_batch: int = 3,
    metadata: dict[str, str] | None = None,
) -> ExportResult:
    """Export ``model`` (frozen, see :class:`FrozenPEModel`) as ``format`` (``onnx`` or ``pt2``) to ``out``, or its
    weights with their metadata as ``safetensors`` (:func:`export_safetensors`; ``verify`` rebuilds the model from
    the file and compares its logits).

    ``opset``: ONNX only (None: :data:`DEFAULT_OPSET`). ``backend``: the op backend while tracing (None: the
    configured one, i.e. the fused kernels). ``verify``: run the exported graph once at batch ``verify_batch``
    (onnxruntime for ONNX, ``torch.export.load`` for pt2) and report the max |diff| to the PyTorch model. A failed
    export is a :class:`~mpvg_kernels.errors.UserError`, and leaves ``out`` as it was (the file is written
    atomically: :func:`write_file_atomically`).

    The file carries :func:`deployment_metadata` (plus ``metadata``, which wins): ONNX ``metadata_props``, and for
    pt2 the JSON file :data:`PT2_METADATA_FILE` in the archive.
    """
    from .errors import UserError

    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    check_export_options(out, format, opset=opset, backend=backend, device=device)

    def backend_scope() -> contextlib.AbstractContextManager:
        return backends.use_backend(backend) if backend else contextlib.nullcontext()

    with backend_scope():
        try:
            resolved = backends.resolve_backend(device)  # the backend the graph is traced with
            props = {**deployment_metadata(model, resolved), **(metadata or {})}
            if format == "onnx":
                path = export_onnx(model, out, opset=DEFAULT_OPSET if opset is None else opset, metadata=props)
            elif format == "safetensors":
                path = export_safetensors(model, out, metadata=props)
            else:
                path = export_pt2(model, out, metadata=props)
        except (RuntimeError, ValueError) as e:
            raise UserError(f"export failed: {e}") from e
        except OSError as e:  # while serialising; writing the file reports its own errors
            raise UserError(f"export to {out} failed: {e.strerror or e}; {out} is left as it was") from None
    how = "weights and metadata" if format == "safetensors" else f"dynamic batch; backend {resolved}"
    msg = f"wrote {path} ({format}, {path.stat().st_size / 1e6:.1f} MB; {how})"
    diff = None
    if verify:
        x = example_input(model, verify_batch)
        with backend_scope():
            if format == "onnx":
                diff = max_abs_diff_onnx(model, path, x)
            elif format == "safetensors":
                diff = max_abs_diff_safetensors(model, path, x)
            else:
                with torch.no_grad():
                    diff = float((load_pt2(path).module()(x) - model(x)).abs().max())
        msg += f"; verified at batch {verify_batch}: max |diff| = {diff:.2e}"
    return ExportResult(path, msg, diff)
