"""SD3 Medium, SD3.5 Medium and SD3.5 Large as an architecture (:mod:`.arch`, registered by the ``sd3`` plugin of
:mod:`.plugin` with the ``sd3`` strategy of :mod:`.strategy` and the training flags of :mod:`.arguments`): tiny models
(:mod:`.tiny`), LoRA targets (:mod:`.targets`), training (:mod:`.training`, the loss :mod:`.loss` with
:mod:`.timesteps`) and generation (:mod:`.pipeline`). Key names and file layouts are :mod:`.keys` and :mod:`.files`."""
