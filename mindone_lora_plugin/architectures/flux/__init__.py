"""FLUX.1 (dev and schnell) as an architecture (:mod:`.arch`, registered by the ``flux`` plugin of :mod:`.plugin`
with the ``flux`` strategy of :mod:`.strategy` and the training flags of :mod:`.arguments`): tiny models
(:mod:`.tiny`), LoRA targets (:mod:`.targets`), the flow-matching loss (:mod:`.loss`, :mod:`.timesteps`) and
generation (:mod:`.pipeline`). Key names and file layouts are :mod:`.keys`, :mod:`.files` and :mod:`.fuse`."""
