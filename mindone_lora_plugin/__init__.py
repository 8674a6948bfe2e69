"""mindone-lora-plugin: pluggable LoRA training for diffusion models on MindSpore/mindone.

Importing this package is cheap: MindSpore and mindone are imported only where they are used.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
