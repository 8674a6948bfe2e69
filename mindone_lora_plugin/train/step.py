"""The compiled pieces of a training step common to every family: the VAE encoder and the optimizer steps.

Each architecture brings its own loss cell (SD's :class:`~mindone_lora_plugin.architectures.sd.loss.DenoiseLoss`,
FLUX.1's :class:`~mindone_lora_plugin.architectures.flux.loss.FlowMatchLoss`); the optimizer steps here work for any.

Randomness (noise, timesteps) is drawn on the host and passed in, together with the per-sample noise-schedule
coefficients and loss weights, so the graph is plain arithmetic: identical on CPU and Ascend, in GRAPH_MODE and
PyNative, and exactly reproducible on resume.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops


class VaeEncode(nn.Cell):
    """The VAE encoder: images in [-1, 1] → the latent distribution's moments (mean and log-variance)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def construct(self, x):
        return self.vae.encode(x)[0]


class AccumulateStep(nn.Cell):
    """Forward and backward only; adds the gradients to ``buffers`` (a micro-step of gradient accumulation)."""

    def __init__(self, grad_fn, buffers):
        super().__init__()
        self.grad_fn = grad_fn
        self.buffers = buffers
        self.hyper_map = ops.HyperMap()

    def construct(self, *inputs):
        loss, grads = self.grad_fn(*inputs)
        self.hyper_map(ops.assign_add, self.buffers, grads)
        return loss


_average = ops.MultitypeFuncGraph("average")
_clear = ops.MultitypeFuncGraph("clear")


@_average.register("Number", "Tensor", "Tensor")
def _average_tensor(scale, grad, buffer):
    return (grad + buffer) * scale


@_clear.register("Tensor")
def _clear_tensor(buffer):
    return ops.assign(buffer, ops.zeros_like(buffer))


class UpdateStep(nn.Cell):
    """The last micro-step: its gradients plus the buffers, averaged, reduced, clipped, applied; buffers cleared."""

    def __init__(self, grad_fn, buffers, optimizer, accumulation: int, max_grad_norm: float | None,
                 grad_reducer=None):
        super().__init__()
        self.grad_fn = grad_fn
        self.buffers = buffers
        self.optimizer = optimizer
        self.scale = 1.0 / accumulation
        self.max_grad_norm = float(max_grad_norm) if max_grad_norm else 0.0
        self.grad_reducer = grad_reducer if grad_reducer is not None else ops.identity
        self.hyper_map = ops.HyperMap()

    def construct(self, *inputs):
        loss, grads = self.grad_fn(*inputs)
        grads = self.hyper_map(ops.partial(_average, self.scale), grads, self.buffers)
        grads = self.grad_reducer(grads)
        if self.max_grad_norm > 0:
            grads = ops.clip_by_global_norm(grads, self.max_grad_norm)
        self.optimizer(grads)
        self.hyper_map(_clear, self.buffers)
        return loss


class TrainStep(nn.Cell):
    """Forward, backward, (all-reduce), clip and optimizer update in one compiled step."""

    def __init__(self, grad_fn, optimizer, max_grad_norm, grad_reducer=None):
        super().__init__()
        self.grad_fn = grad_fn
        self.optimizer = optimizer
        self.max_grad_norm = float(max_grad_norm) if max_grad_norm else 0.0
        self.grad_reducer = grad_reducer if grad_reducer is not None else ops.identity

    def construct(self, *inputs):
        loss, grads = self.grad_fn(*inputs)
        grads = self.grad_reducer(grads)
        if self.max_grad_norm > 0:
            grads = ops.clip_by_global_norm(grads, self.max_grad_norm)
        self.optimizer(grads)
        return loss


def build_steps(loss, optimizer, max_grad_norm, accumulation: int, grad_reducer=None):
    """``(micro_step, update_step)`` cells. Without accumulation ``micro_step`` is None and ``update_step`` does it all;
    with it, ``micro_step`` adds gradients to buffers and ``update_step`` (the last micro-batch) applies them."""
    grad_fn = ms.value_and_grad(loss, None, optimizer.parameters)
    if accumulation <= 1:
        return None, TrainStep(grad_fn, optimizer, max_grad_norm, grad_reducer)
    buffers = optimizer.parameters.clone(prefix="accum", init="zeros")
    return (AccumulateStep(grad_fn, buffers),
            UpdateStep(grad_fn, buffers, optimizer, accumulation, max_grad_norm, grad_reducer))
