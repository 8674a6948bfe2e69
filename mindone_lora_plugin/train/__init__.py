"""The training entrypoint ``mindone-lora train``: arguments, data, the compiled step, checkpoints, the loop."""
