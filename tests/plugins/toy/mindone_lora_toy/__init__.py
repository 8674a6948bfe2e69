"""A test plugin from outside mindone_lora_plugin: a toy model family and a toy training feature."""
