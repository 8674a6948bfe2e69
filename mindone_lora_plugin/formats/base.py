"""The format plugin object: turns a :class:`~mindone_lora_plugin.state.LoraState` into a file and back.

A plugin offers formats by yielding instances of a :class:`LoraFormat` subclass from its
``mindone_lora_formats()`` hook implementation. Formats are pure numpy: they never import MindSpore.
"""

from __future__ import annotations

import os
from typing import ClassVar

from mindone_lora_plugin.base_model_info import BaseModelInfo
from mindone_lora_plugin.state import LoraState

CLAIM_WEAK = 1  # the default claim of a format that only sniffs
CLAIM_SURE = 100  # a marker only this format writes (diffusers' lora_adapter_metadata header entry)


def share_claim(mine: int, total: int) -> int:
    """A claim from the share of keys in a format's naming: 0 for none, else 10 (a few) to 99 (all of them)."""
    return 0 if not mine or not total else 10 + (89 * mine) // total


class LoraFormat:
    """Base class of a LoRA file format.

    Subclasses set :attr:`name` (what ``--save_formats`` and ``convert --to`` accept) and :attr:`description`
    (one line shown by ``mindone-lora plugins``), and implement :meth:`sniff`, :meth:`read` and :meth:`write`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def default_filename(self, output_name: str) -> str:
        """The file name this format writes into an output folder (``output_name`` is the run's name)."""
        return f"{output_name}.safetensors"

    def output_path(self, out: str, output_name: str = "lora") -> str:
        """Where :meth:`write` puts the file when given ``out``: ``out`` itself, or a file inside a folder."""
        if os.path.isdir(out) or out.endswith(os.sep) or not os.path.splitext(out)[1]:
            return os.path.join(out, self.default_filename(output_name))
        return out

    def supports(self, algorithm) -> bool:
        """True when this format can hold modules of ``algorithm`` (a
        :class:`~mindone_lora_plugin.algorithms.base.LoraAlgorithm`); default: plain LoRA only."""
        return algorithm.name == "lora"

    def check_algorithms(self, state: LoraState) -> None:
        """Raise one :class:`LoraError` line when ``state`` holds an algorithm this format cannot hold, naming the
        installed formats that can."""
        from mindone_lora_plugin.errors import LoraError

        for name in sorted(state.algorithms()):
            from mindone_lora_plugin.algorithms import get_algorithm

            algo = get_algorithm(name)
            if self.supports(algo):
                continue
            from mindone_lora_plugin.plugins import get_plugin_manager

            able = [n for n, f in get_plugin_manager().formats().items() if f.supports(algo)]
            raise LoraError(f"the {self.name} format cannot hold {name} modules; formats that can: "
                            f"{', '.join(able) or 'none installed'} "
                            f"(e.g. --save_formats/--to {able[0] if able else 'kohya'})")

    def sniff(self, keys: list[str], metadata: dict[str, str]) -> bool:
        """True when a file with these tensor keys and header metadata is in this format."""
        raise NotImplementedError

    def claim(self, keys: list[str], metadata: dict[str, str]) -> int:
        """How strongly this format claims a file with these keys and metadata: 0 = not mine, higher = surer.

        The reader picks the strongest claim among all installed formats, whoever provides them; equal top claims are
        an error naming both. Scale: :data:`CLAIM_WEAK` (the default: :meth:`sniff` accepts it, nothing more),
        up to :data:`CLAIM_SURE` (a marker only this format writes). The built-ins claim between 10 and 100 by the
        share of keys in their naming, so a plugin outbids them only with a claim of its own.
        """
        return CLAIM_WEAK if self.sniff(keys, metadata) else 0

    def sniff_folder(self, path: str) -> bool:
        """True when the folder ``path`` is a LoRA in this format (formats stored as folders override this)."""
        return False

    def read(self, path: str, base: BaseModelInfo | None = None) -> LoraState:
        """Read ``path`` into a :class:`LoraState` keyed by diffusers module paths.

        ``base`` (optional) describes the base model; with it, every key is checked against the real modules.
        Raise :class:`~mindone_lora_plugin.errors.LoraError` with one clear line for anything wrong with the file.
        """
        raise NotImplementedError

    def write(self, state: LoraState, out: str, *, dtype: str | None = None,
              metadata: dict[str, str] | None = None, output_name: str = "lora") -> str:
        """Write ``state`` atomically to ``out`` (a file, or a folder to put :meth:`default_filename` in).

        ``dtype`` is ``fp32``, ``fp16``, ``bf16`` or ``None`` (keep). ``metadata`` holds training arguments and names
        (string values). Returns the path written.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
