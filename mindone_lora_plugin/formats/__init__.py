"""LoRA file formats: the :class:`~mindone_lora_plugin.formats.base.LoraFormat` plugin interface, the built-in
``diffusers`` and ``kohya`` formats (built-in plugins, registered like any third-party format), and the
reader that turns any plain-LoRA file into a :class:`~mindone_lora_plugin.state.LoraState`.

Import submodules directly (``from mindone_lora_plugin.formats.reader import read_lora``); this package imports nothing
heavy.
"""
