"""``import mpvg_kernels`` is enough for timm: the models are registered with timm as soon as both are imported, in
either order, without importing timm for a user who never does."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType

_BRIDGE = "mpvg_kernels.models.timm_bridge"


def _register() -> None:
    """Import the bridge (it registers every model with timm); a bridge that cannot load (timm too old, torchvision
    missing) leaves timm as it is: ``import timm`` must never fail because of this package."""
    try:
        importlib.import_module(_BRIDGE)
    except Exception as exc:  # noqa: BLE001 (reported when the bridge is imported explicitly)
        sys.modules.pop(_BRIDGE, None)
        _state["error"] = f"{type(exc).__name__}: {exc}"


_state: dict[str, str] = {}


class _Loader(importlib.abc.Loader):
    """timm's own loader, then the registration."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):  # type: ignore[no-untyped-def]
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)  # type: ignore[attr-defined]
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of ``timm`` (found by the other finders) once, then steps aside."""

    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Register with timm now if timm is imported, else when it is."""
    if "timm" in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
