"""mindone-lora-fa: an example mindone-lora plugin.

It adds the ``lora-fa`` strategy (LoRA-FA: the A matrices are randomly initialised and frozen, only B trains) and the
``peft`` format (a PEFT adapter folder per component). The hook implementations are in :mod:`mindone_lora_fa.plugin`,
registered through the ``mindone_lora`` entry-point group in ``setup.cfg``.
"""

__version__ = "0.1.0"
