"""Optional dependencies ("extras" of the distribution): a missing one is one line naming the
``pip install`` that brings it, not an ImportError traceback from deep inside a command."""
from __future__ import annotations

import importlib
from types import ModuleType

DISTRIBUTION = "torch-metarl"
"""The name on PyPI ("metarl" there is an unrelated project); the import name stays ``metarl``."""


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` (needed for ``what``) or raise :class:`MissingExtra` naming ``[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(f"{what} needs {module.split('.')[0]} ({e}): pip install '{DISTRIBUTION}[{extra}]'") from None
