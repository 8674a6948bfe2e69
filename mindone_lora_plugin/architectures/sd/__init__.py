"""Stable Diffusion 1.x, 2.x and SDXL as a family package, shaped like :mod:`..flux`: the architectures
(:mod:`.arch`), registered by the ``sd`` plugin of :mod:`.plugin` with the strategies of :mod:`.strategies`; the key
grammar of SD module names (:mod:`.keys`) and SDXL's SGM block names (:mod:`.sgm`); the loss and text conditioning
(:mod:`.loss`); tiny models (:mod:`.tiny`)."""
