"""Which of MindSpore's primitives the CPU backend's replacement tables could find: the replacements are looked up by
name, so a primitive a MindSpore release renamed or dropped is listed in :data:`ABSENT_PRIMITIVES` and skipped instead
of failing the import (docs/compatibility.md)."""

from __future__ import annotations

#: primitives a replacement table names that the running MindSpore does not have (renamed or removed internals):
#: their replacements are skipped, the rest of the backend is installed
ABSENT_PRIMITIVES: list[str] = []


def primitive_table(module, replacements: dict) -> dict:
    """``{primitive class: replacement}`` for the classes named in ``replacements`` (``{name: replacement}``) that
    ``module`` has; a name it lacks joins :data:`ABSENT_PRIMITIVES` instead of failing the import."""
    table = {}
    for name, replacement in replacements.items():
        cls = getattr(module, name, None)
        if isinstance(cls, type):
            table[cls] = replacement
        else:
            ABSENT_PRIMITIVES.append(f"{module.__name__}.{name}")
    return table
