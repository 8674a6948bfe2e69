"""Confine every path the UI touches to ``--root`` and the ``--allow`` folders (symlinks resolved, no traversal)."""

from __future__ import annotations

import os

from mindone_lora_plugin.errors import LoraError


class PathGuard:
    """The folders the UI may read and write: ``root`` (runs, outputs) and the extra ``allowed`` ones."""

    def __init__(self, root: str, allowed=()):
        self.root = os.path.realpath(root)
        self.folders = [self.root] + [os.path.realpath(a) for a in allowed if a]

    def describe(self) -> str:
        return ", ".join(self.folders)

    def inside(self, real: str) -> bool:
        return any(real == f or real.startswith(f.rstrip(os.sep) + os.sep) for f in self.folders)

    def resolve(self, path: str, what: str = "path", must_exist: bool = False) -> str:
        """The real absolute path of ``path`` (relative paths are taken from the root); LoraError when outside."""
        if not isinstance(path, str) or not path.strip():
            raise LoraError(f"{what}: give a path")
        if "\x00" in path:
            raise LoraError(f"{what}: the path contains a NUL character")
        path = os.path.expanduser(path.strip())
        full = path if os.path.isabs(path) else os.path.join(self.root, path)
        real = os.path.realpath(full)  # follows every symlink, removes .. components
        if not self.inside(real):
            raise LoraError(f"{what} {path} is outside the allowed folders ({self.describe()}); choose a path inside "
                            f"them or restart the UI with --allow DIR")
        if must_exist and not os.path.exists(real):
            raise LoraError(f"{what} {path} does not exist")
        return real
