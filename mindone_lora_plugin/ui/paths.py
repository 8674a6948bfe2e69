"""Confine every path the UI touches to ``--root`` and the ``--allow`` folders (symlinks resolved, no traversal).

Read-only folders (the demo model shipped in the package) may be read, never written.
"""

from __future__ import annotations

import os

from mindone_lora_plugin.errors import LoraError


class PathGuard:
    """The folders the UI may read and write: ``root`` (runs, outputs) and the extra ``allowed`` ones; and the
    ``readonly`` ones it may only read."""

    def __init__(self, root: str, allowed=(), readonly=()):
        self.root = os.path.realpath(root)
        self.writable = [self.root] + [os.path.realpath(a) for a in allowed if a]
        self.readonly = [os.path.realpath(r) for r in readonly if r]
        self.folders = self.writable + self.readonly

    def describe(self) -> str:
        return ", ".join(self.writable) + (f" (read-only: {', '.join(self.readonly)})" if self.readonly else "")

    def inside(self, real: str, write: bool = False) -> bool:
        folders = self.writable if write else self.folders
        return any(real == f or real.startswith(f.rstrip(os.sep) + os.sep) for f in folders)

    def resolve(self, path: str, what: str = "path", must_exist: bool = False, write: bool = False) -> str:
        """The real absolute path of ``path`` (relative paths are taken from the root); LoraError when outside (or,
        with ``write``, inside a read-only folder)."""
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
        if write and not self.inside(real, write=True):
            raise LoraError(f"{what} {path} is in a read-only folder; choose a path inside {', '.join(self.writable)}")
        if must_exist and not os.path.exists(real):
            raise LoraError(f"{what} {path} does not exist")
        return real
