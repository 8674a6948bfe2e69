"""The process a command runs in: MindSpore's set-up (:mod:`.process`: versions, device, execution mode, quiet
imports), the precision of frozen weights (:mod:`.precision`), recompute for gradient checkpointing
(:mod:`.recompute`) and the CPU backend (:mod:`.cpu`). Nothing here knows about LoRA."""
