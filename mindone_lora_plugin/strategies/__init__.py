"""Built-in LoRA strategies (``unet``, ``text_encoder``, ``sdxl``) and the :class:`LoraStrategy` base class.

Each built-in lives in its own module that registers it through the ``mindone_lora`` entry-point group, exactly as a
third-party plugin would.
"""
