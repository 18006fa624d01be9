"""Names a package exports, imported on first use: `import ef_jax` (or a subpackage) costs no jax import, so the
command line answers a refused command at once and host-only parts load without jax."""
from __future__ import annotations

import importlib


def lazy_exports(package: str, namespace: dict, exports: dict[str, str]):
    """A module `__getattr__` for `package` whose attribute `name` is `exports[name]`'s attribute of that name,
    imported and cached in `namespace` (the package's globals()) on first access."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    return __getattr__
