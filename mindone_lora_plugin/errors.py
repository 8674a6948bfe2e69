"""User-facing errors.

A :class:`LoraError` is a mistake the user can fix (a bad flag, a wrong file, an unknown name). The command line
prints its message as one line on stderr and exits with status 2; no traceback. Messages name the problem and the fix.
"""


class LoraError(Exception):
    """A user mistake, reported in one line that names the problem and the fix."""

    exit_code = 2

    def __str__(self) -> str:  # always one line
        return " ".join(str(self.args[0]).split()) if self.args else self.__class__.__name__


class PluginError(LoraError):
    """A plugin problem: a duplicate or unknown strategy/format name."""
