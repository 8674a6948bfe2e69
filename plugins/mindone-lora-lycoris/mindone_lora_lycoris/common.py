"""What LoHa and LoKr share: conv kernels flattened into the factors, and the base shape kept in the settings.

LyCORIS stores a conv module's factors with the kernel folded into the input side (``[r, in * k * k]``), so a file
alone does not say the kernel size. The base weight's shape is therefore kept in the module's settings (``shape``)
when it is known: at training time from the wrapped layer, when reading with a base model from the model.
"""

from __future__ import annotations

import numpy as np

from mindone_lora_plugin.algorithms.base import LoraAlgorithm
from mindone_lora_plugin.errors import LoraError


class LycorisAlgorithm(LoraAlgorithm):
    network_module = "lycoris.kohya"
    peft_names = None  # no diffusers/PEFT layout that diffusers loads: kohya/LyCORIS files only

    def flat_shape(self, mod) -> tuple[int, int]:
        """``(out, in × k × k)`` of the weight change, from the tensors."""
        raise NotImplementedError

    def base_shape(self, mod) -> tuple[int, ...]:
        flat = self.flat_shape(mod)
        shape = mod.settings.get("shape")
        if shape and int(np.prod(shape)) == flat[0] * flat[1] and int(shape[0]) == flat[0]:
            return tuple(int(s) for s in shape)
        return flat

    def fit_base_shape(self, mod, shape, where: str) -> None:
        flat = self.flat_shape(mod)
        if int(shape[0]) != flat[0] or int(np.prod(shape)) != flat[0] * flat[1]:
            raise LoraError(f"shape mismatch at {where}: the base weight is {list(shape)} but the {self.name} module "
                            f"implies {list(flat)}; the LoRA was made for another base model")
        mod.settings["shape"] = [int(s) for s in shape]

    def metadata(self, modules) -> dict[str, str]:
        return {"algo": self.name}


def mindspore_kron(a, b):
    """``kron(a, b)`` of two 2-D MindSpore tensors by broadcasting (``[p, q] ⊗ [r, s] → [p r, q s]``)."""
    p, q = a.shape
    r, s = b.shape
    return (a.reshape(p, 1, q, 1) * b.reshape(1, r, 1, s)).reshape(p * r, q * s)
