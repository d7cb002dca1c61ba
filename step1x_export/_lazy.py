"""Lazy package exports (PEP 562): `import step1x_export.runtime` stays cheap until a name is used.

The CLI imports every command module to build `--help`; without this, that pulls in transformers'
Qwen2.5-VL processor and the whole runtime before a single option is parsed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` resolving each exported name from its submodule on first use."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name], package), name)

    return __getattr__
