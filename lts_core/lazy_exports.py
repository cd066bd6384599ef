"""Names of a package imported on first use (PEP 562), so importing the package does not import every module."""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, list[str]]) -> tuple[list[str], Callable, Callable]:
    """`__all__, __getattr__, __dir__` for `package` exporting `{module: [names]}` from its submodules.

    >>> __all__, __getattr__, __dir__ = lazy_exports(__name__, {"store": ["open_run"]})   # in a package
    """
    where = {name: module for module, names in exports.items() for name in names}
    names = sorted(where)
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str):
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return names, __getattr__, __dir__
