"""FLUX.1 (dev and schnell) as an architecture: tiny models (:mod:`.tiny`), LoRA targets (:mod:`.targets`), the
flow-matching loss (:mod:`.loss`, :mod:`.timesteps`) and generation (:mod:`.pipeline`). Key names and file layouts
are :mod:`.keys`' business."""
