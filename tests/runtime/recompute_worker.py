"""One forward + backward of a LoRA-adapted tiny SD1.x UNet, run as a script by ``test_checkpointing.py``.

    python tests/runtime/recompute_worker.py MODE GC LATENT BATCH OUT.npz

MODE is ``graph`` or ``pynative``, GC ``1`` to recompute the blocks (:mod:`mindone_lora_plugin.runtime.recompute`).
Writes the loss and every LoRA gradient to OUT.npz and prints ``peak_kib=N`` (the process's ``VmHWM``).
"""

import sys

import numpy as np


def build(gc: bool):
    """The tiny UNet with kohya-preset LoRA (non-zero B, fixed seed), its LoRA parameters and a loss cell."""
    import mindspore as ms
    from mindone.diffusers import UNet2DConditionModel

    from mindone_lora_plugin.architectures.sd.loss import DenoiseLoss, TextConditioner
    from mindone_lora_plugin.architectures.sd.tiny import SD1_UNET
    from mindone_lora_plugin.models import Models
    from mindone_lora_plugin.options import LoraOptions
    from mindone_lora_plugin.plugins import get_plugin_manager
    from mindone_lora_plugin.runtime import recompute

    ms.set_seed(0)
    unet = UNet2DConditionModel(**SD1_UNET)
    unet.set_train(False)
    for p in unet.get_parameters():
        p.requires_grad = False
    models = Models(unet=unet, architecture="sd1")
    options = LoraOptions(strategy="unet", rank=4, alpha=4, targets="kohya", init="gaussian", learning_rate=1e-4)
    pm = get_plugin_manager()
    pm.add_adapters(models, options)
    params = [p for g in pm.trainable_parameters(models, options) for p in g["params"]]
    rng = np.random.default_rng(0)
    for p in params:  # B ≠ 0, so every LoRA gradient is non-trivial
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.05))
    blocks = recompute.enable(unet, "unet") if gc else 0
    loss = DenoiseLoss(unet, TextConditioner(None), False, False, False)
    loss.set_train(True)
    return loss, params, blocks


def inputs(latent: int, batch: int):
    import mindspore as ms

    rng = np.random.default_rng(1)
    t = np.array([10, 500, 900, 250][:batch], np.int32)
    return [ms.Tensor(v) for v in (rng.standard_normal((batch, 4, latent, latent)).astype(np.float32),
                                   rng.standard_normal((batch, 4, latent, latent)).astype(np.float32), t,
                                   np.full(batch, 0.8, np.float32), np.full(batch, 0.6, np.float32),
                                   np.ones(batch, np.float32),
                                   rng.standard_normal((batch, 77, 32)).astype(np.float32))]


def main(mode, gc, latent, batch, out):
    from mindone_lora_plugin.runtime.process import setup

    setup("CPU", mode, seed=0)
    import mindspore as ms
    from mindspore import nn

    loss, params, blocks = build(gc == "1")
    grad_fn = ms.value_and_grad(loss, None, params)

    class Step(nn.Cell):
        def __init__(self):
            super().__init__()
            self.grad_fn = grad_fn

        def construct(self, *args):
            return self.grad_fn(*args)

    value, grads = Step()(*inputs(int(latent), int(batch)))
    np.savez(out, loss=value.asnumpy(), **{p.name: g.asnumpy() for p, g in zip(params, grads)})
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(f"blocks={blocks} peak_kib={peak}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:6])
