"""The MindSpore layers of LoHa and LoKr: :func:`~mindone_lora_plugin.algorithms.layers.adapter_layer_class`
subclasses that build ΔW from their factors on every call (built on first use, so importing stays MindSpore-free)."""

from __future__ import annotations

import functools

from mindone_lora_lycoris.common import mindspore_kron
from mindone_lora_plugin.algorithms.layers import adapter_layer_class


@functools.lru_cache(maxsize=1)
def loha_layer_class():
    from mindspore import ops

    class LohaLayer(adapter_layer_class()):
        def rank(self):
            return int(self.hada_w1_b.shape[0])

        def delta_weight(self):
            w1 = ops.matmul(self.hada_w1_a, self.hada_w1_b)
            w2 = ops.matmul(self.hada_w2_a, self.hada_w2_b)
            return (w1 * w2 * self.scaling).reshape(self.base_shape)

    return LohaLayer


@functools.lru_cache(maxsize=1)
def lokr_layer_class():
    from mindspore import ops

    class LokrLayer(adapter_layer_class()):
        def rank(self):
            for name in ("lokr_w1_a", "lokr_w2_a"):
                if name in self.role_names:
                    return int(getattr(self, name).shape[1])
            return 1

        def scale_for(self, alpha):
            full = "lokr_w1" in self.role_names and "lokr_w2" in self.role_names
            return 1.0 if full else float(alpha) / self.rank()

        def _w1(self):
            if "lokr_w1" in self.role_names:
                return self.lokr_w1
            return ops.matmul(self.lokr_w1_a, self.lokr_w1_b)

        def _w2(self):
            if "lokr_w2" in self.role_names:
                w = self.lokr_w2
                return w.reshape(w.shape[0], -1)
            return ops.matmul(self.lokr_w2_a, self.lokr_w2_b)

        def delta_weight(self):
            return (mindspore_kron(self._w1(), self._w2()) * self.scaling).reshape(self.base_shape)

    return LokrLayer
