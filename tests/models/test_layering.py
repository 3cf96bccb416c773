"""Where things live: the tools sit beside training (not on it), the models import no circle, and one function
says which PE modes exist."""

from __future__ import annotations

import ast
import re
import traceback
from pathlib import Path

import pytest

import mpvg_kernels
from mpvg_kernels.layers import pe_walk
from mpvg_kernels.models import create_model
from mpvg_kernels.models.ceit import CeiT
from mpvg_kernels.models.swin import SwinTransformer
from mpvg_kernels.models.vision_transformer import VisionTransformer

PKG = Path(mpvg_kernels.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    """Whether ``name`` (``mpvg_kernels.x.y``) is a module or package of this package."""
    path = PKG.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, function-level ones included: ``from X import Y``
    imports the module ``X.Y`` where Y is a submodule, else ``X``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                out.append((node.lineno, f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base))
    return out


def test_tools_do_not_import_training() -> None:
    """analysis, export and benchmark are tools beside training: they take the model factory, checkpoint reading
    and device choice from below (``mpvg_kernels.models.factory``, ``mpvg_kernels.device``), never from
    ``mpvg_kernels.train``."""
    files = [*sorted((PKG / "analysis").glob("*.py")), PKG / "export.py", *sorted((PKG / "benchmark").glob("*.py"))]
    bad = [
        f"{f.relative_to(PKG.parent)}:{line} imports {mod}"
        for f in files
        for line, mod in _imports(f)
        if mod == "mpvg_kernels.train" or mod.startswith("mpvg_kernels.train.")
    ]
    assert not bad, "\n".join(bad)


def test_the_training_names_still_work() -> None:
    """``mpvg_kernels.train`` keeps the names it had (they are the ones below)."""
    from mpvg_kernels import device
    from mpvg_kernels.models import factory
    from mpvg_kernels.train import checkpoint, distributed

    for name in (
        "build_model",
        "model_from_checkpoint",
        "load_checkpoint",
        "read_torch_file",
        "is_train_checkpoint",
        "validate_checkpoint",
        "mismatch_parts",
        "load_state_dict_checked",
        "FORMAT",
        "VERSION",
    ):
        assert getattr(checkpoint, name) is getattr(factory, name), name
    assert distributed.resolve_device is device.resolve_device


def test_models_import_no_circle() -> None:
    """The import graph of ``mpvg_kernels.models`` (every import, function-level ones included) has no cycle."""
    files = sorted((PKG / "models").glob("*.py"))
    nodes = {_module_name(f): f for f in files}
    graph = {n: sorted({m for _, m in _imports(f) if m in nodes and m != n}) for n, f in nodes.items()}
    # the package itself: importing a submodule runs it first, so an edge to it is an edge to every module it
    # imports; a module it imports may not import it back (``from . import x`` names a submodule, not the package)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in graph[n]:
            if state.get(m) == 1:
                cycle = stack[stack.index(m) :] + [m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n)


def _raiser(exc: BaseException) -> object:
    """The code object of the function that raised ``exc`` (the innermost frame)."""
    return traceback.extract_tb(exc.__traceback__)[-1], list(traceback.walk_tb(exc.__traceback__))[-1][0].f_code


@pytest.mark.parametrize(
    "build",
    [
        lambda: pe_walk.resolve_pe_knobs("vit", 4),
        lambda: VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=1, pe="vit"),
        lambda: CeiT(img_size=32, patch_size=2, stem_chans=8, embed_dim=16, depth=1, num_heads=1, pe="vit"),
        lambda: SwinTransformer(
            img_size=32, patch_size=2, window_size=4, embed_dim=8, depths=(1,), num_heads=(1,), pe="vit"
        ),
        lambda: create_model("vit_digits", pe="vit"),
        lambda: create_model("swin_tiny_patch4_window7_224", pe="vit", tiny=True),
        lambda: create_model("ceit_tiny_patch16_224", pe="vit", tiny=True),
    ],
    ids=[
        "resolve_pe_knobs",
        "VisionTransformer",
        "CeiT",
        "SwinTransformer",
        "create_model",
        "create_model-swin",
        "create_model-ceit",
    ],
)
def test_one_function_raises_the_pe_error(build) -> None:
    """Every entry point refuses an unknown PE mode with the same message, raised by :func:`check_pe_mode`."""
    with pytest.raises(ValueError) as info:
        build()
    assert str(info.value) == f"pe must be one of {pe_walk.PE_MODES}, got 'vit'"
    _, code = _raiser(info.value)
    assert code is pe_walk.check_pe_mode.__code__


def test_from_timm_raises_the_same_pe_error() -> None:
    timm = pytest.importorskip("timm", reason="timm is not installed here (the timm tier runs this)")
    from mpvg_kernels.models.timm_bridge import from_timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    with pytest.raises(ValueError) as info:
        from_timm(model, pe="vit")
    assert _raiser(info.value)[1] is pe_walk.check_pe_mode.__code__


def test_the_pe_error_is_written_once() -> None:
    """The message is in one place in the package source."""
    message = re.compile(r"\bpe must be one of")
    hits = [str(p.relative_to(PKG.parent)) for p in PKG.rglob("*.py") if message.search(p.read_text())]
    assert hits == ["mpvg_kernels/layers/pe_walk.py"], hits
