"""Package namespaces that import a submodule only when one of its names is first used (PEP 562)."""
import importlib
from typing import Callable, Dict, List, Tuple


def lazy_exports(package: str, exports: Dict[str, str]) -> Tuple[Callable, Callable]:
    """``__getattr__`` and ``__dir__`` for package ``package`` whose public ``name`` lives in the submodule
    ``exports[name]`` (relative, e.g. ``'.dynamic_swin'``): ``from package import name`` imports that submodule
    alone, so a package of families built on different frameworks does not import them all."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f'module {package!r} has no attribute {name!r}')
        return getattr(importlib.import_module(exports[name], package), name)

    def __dir__() -> List[str]:
        return sorted(exports)

    return __getattr__, __dir__
