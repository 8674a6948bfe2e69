"""``mindone-lora run``: mindone's own LoRA training scripts with this plugin's flags. :mod:`.seams` switches the calls
the scripts share to a :class:`~.session.ScriptSession`, which does the LoRA work."""
