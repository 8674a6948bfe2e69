"""Optimizers of ``mindone-lora train --optimizer_type``: AdamW (MindSpore's), Lion, Adafactor and Prodigy, and LoRA+.

AdamW is ``mindspore.nn.AdamWeightDecay``, as before. MindSpore has no Lion or Prodigy; its ``nn.AdaFactor`` uses
another decay-rate convention than the paper and keeps unnamed state tensors (which a checkpoint cannot key by
name), so these three are written here from their published update rules (Chen et al. 2023 "Symbolic Discovery of
Optimization Algorithms"; Shazeer & Stern 2018 "Adafactor", as ``transformers.Adafactor`` implements it; Mishchenko &
Defazio 2023 "Prodigy", as ``prodigyopt.Prodigy`` implements it). ``tests/train/test_train_optimizers.py`` checks each
against a numpy transcription of the rule. Every state tensor is a named ``Parameter`` of the optimizer, so
checkpoints save it and a resume continues exactly.

LoRA+ (Hayou et al. 2024): the up (B) matrices learn at ``ratio × lr``. Which parameters are "up" is decided by
:func:`is_up_parameter`, which asks the strategy first (an algorithm with other tensor names answers there).
"""

from __future__ import annotations

import ast
import difflib

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from mindone_lora_plugin.errors import LoraError

# name → (class path recorded in ss_optimizer, {argument: (kind, default)}); kinds: pair, number, number?, bool
OPTIMIZERS = {
    "AdamW": ("mindspore.nn.AdamWeightDecay",  # defaults: --adam_beta1/--adam_beta2/--adam_epsilon/--adam_weight_decay
              {"betas": ("pair", None), "eps": ("number", None), "weight_decay": ("number", None)}),
    "Lion": ("mindone_lora_plugin.train.optimizers.Lion",
             {"betas": ("pair", (0.9, 0.99)), "weight_decay": ("number", 0.0)}),
    "Adafactor": ("mindone_lora_plugin.train.optimizers.Adafactor",
                  {"eps": ("pair", (1e-30, 1e-3)), "clip_threshold": ("number", 1.0), "decay_rate": ("number", -0.8),
                   "beta1": ("number?", None), "weight_decay": ("number", 0.0), "scale_parameter": ("bool", True),
                   "relative_step": ("bool", False), "warmup_init": ("bool", False)}),
    "Prodigy": ("mindone_lora_plugin.train.optimizers.Prodigy",
                {"betas": ("pair", (0.9, 0.999)), "beta3": ("number?", None), "eps": ("number", 1e-8),
                 "weight_decay": ("number", 0.0), "decouple": ("bool", True), "use_bias_correction": ("bool", False),
                 "safeguard_warmup": ("bool", False), "d0": ("number", 1e-6), "d_coef": ("number", 1.0),
                 "growth_rate": ("number", float("inf"))}),
}
_WORDS = {"true": True, "false": False, "none": None, "inf": float("inf")}


def optimizer_name(value: str) -> str:
    """The canonical spelling of ``--optimizer_type`` (case-insensitive, as kohya), or a one-line error."""
    for name in OPTIMIZERS:
        if value.lower() == name.lower():
            return name
    close = difflib.get_close_matches(value, list(OPTIMIZERS), n=1, cutoff=0.3)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise LoraError(f"--optimizer_type {value!r} is not available{hint}; choose one of {', '.join(OPTIMIZERS)}")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_optimizer_args(optimizer_type: str, items) -> dict:
    """``--optimizer_args key=value ...`` → keyword arguments (Python literals), checked against what it takes."""
    name = optimizer_name(optimizer_type)
    takes = OPTIMIZERS[name][1]
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key:
            raise LoraError(f"--optimizer_args {item!r} is not key=value, e.g. --optimizer_args weight_decay=0.01")
        if key not in takes:
            raise LoraError(f"--optimizer_args: {name} does not take {key!r}; it takes {', '.join(takes)}")
        try:
            value = _WORDS[raw.lower()] if raw.lower() in _WORDS else ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        kind, default = takes[key]
        ok = {"pair": isinstance(value, (tuple, list)) and len(value) == 2 and all(_number(v) for v in value),
              "number": _number(value), "number?": value is None or _number(value),
              "bool": isinstance(value, bool)}[kind]
        if not ok:
            want = {"pair": "two numbers, e.g. 0.9,0.99", "number": "a number", "number?": "a number or None",
                    "bool": "True or False"}[kind]
            raise LoraError(f"--optimizer_args {key}={raw}: {name} needs {want} there"
                            + (f" (default {default})" if default is not None else ""))
        out[key] = tuple(value) if kind == "pair" else value
    return out


def describe(optimizer_type: str, items) -> str:
    """``ss_optimizer`` as kohya writes it: the class, with the arguments in brackets when there are any."""
    name = optimizer_name(optimizer_type)
    args = [i.strip() for i in items or []]
    return OPTIMIZERS[name][0] + (f"({','.join(args)})" if args else "")


def is_up_parameter(name: str, strategy=None) -> bool:
    """True for an up (B) tensor, the one LoRA+ trains at ``ratio × lr``.

    A strategy (or adapter algorithm) with other tensor names defines ``is_up_parameter(name)`` and is asked first;
    plain LoRA's up tensors are named ``...lora_B...``.
    """
    ask = getattr(strategy, "is_up_parameter", None)
    if callable(ask):
        return bool(ask(name))
    return "lora_B" in name


def loraplus_ratio(args, component: str) -> float | None:
    """The LoRA+ ratio for one component (the denoiser, ``unet``, or a text encoder), or None when LoRA+ is off for
    it."""
    from mindone_lora_plugin.architectures import text_encoders

    own = args.loraplus_text_encoder_lr_ratio if component in text_encoders() else args.loraplus_unet_lr_ratio
    return own if own is not None else args.loraplus_lr_ratio


def build(args, groups: list[dict], schedule, strategy=None):
    """The optimizer for the trainer's parameter ``groups`` and ``{group label: lr per step}``.

    ``schedule(base_lr)`` turns a base learning rate into the per-step list (warm-up and decay included).
    """
    name = optimizer_name(args.optimizer_type)
    kwargs = parse_optimizer_args(name, args.optimizer_args)
    split = []  # (label, params, base lr)
    for g in groups:
        ratio = loraplus_ratio(args, g["component"])
        if ratio is None:
            split.append((g["component"], g["params"], g["lr"]))
            continue
        ups = [p for p in g["params"] if is_up_parameter(p.name, strategy)]
        downs = [p for p in g["params"] if not is_up_parameter(p.name, strategy)]
        if not ups:
            raise LoraError(f"--loraplus_lr_ratio: no up (B) parameters found in {g['component']}; this adapter "
                            f"algorithm does not say which tensors are 'up', so LoRA+ cannot apply")
        split += [(g["component"], downs, g["lr"])] if downs else []
        split.append((g["component"] + ".up", ups, g["lr"] * ratio))
    schedules = {label: schedule(lr) for label, _, lr in split}
    if name == "AdamW":
        betas = kwargs.get("betas") or (args.adam_beta1, args.adam_beta2)
        eps = kwargs.get("eps") or args.adam_epsilon
        wd = kwargs["weight_decay"] if kwargs.get("weight_decay") is not None else args.adam_weight_decay
        params = [{"params": ps, "lr": schedules[label], "weight_decay": wd} for label, ps, _ in split]
        # one group: a plain parameter list (per-group learning-rate lists make the graph compile slower)
        return nn.AdamWeightDecay(params[0]["params"] if len(params) == 1 else params,
                                  learning_rate=params[0]["lr"], beta1=float(betas[0]), beta2=float(betas[1]),
                                  eps=float(eps), weight_decay=wd), schedules
    # the others: one flat parameter list on the first schedule, each parameter's lr a constant multiple of it
    # (every scheduler of mindone is base lr × a factor of the step, so this equals per-group schedules)
    base = split[0][2]
    params, scales = [], []
    for _, ps, lr in split:
        params += ps
        scales += [lr / base] * len(ps)
    cls = {"Lion": Lion, "Adafactor": Adafactor, "Prodigy": Prodigy}[name]
    return cls(params, schedules[split[0][0]], tuple(scales), **kwargs), schedules


class _Flat(nn.Optimizer):
    """A flat parameter list, a learning rate (list per step, or a number) and one constant lr multiple each."""

    def __init__(self, params, learning_rate, scales=None):
        super().__init__(learning_rate, list(params), weight_decay=0.0)
        self.scales = tuple(float(s) for s in (scales or [1.0] * len(self.parameters)))

    def _next_lr(self):
        lr = self.get_lr()
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        return lr


# ---------------------------------------------------------------- Lion


class Lion(_Flat):
    """Lion: ``p ← p·(1 − lr·wd) − lr·sign(β1·m + (1−β1)·g)``, then ``m ← β2·m + (1−β2)·g``."""

    def __init__(self, params, learning_rate, scales=None, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, learning_rate, scales)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.weight_decay = float(weight_decay)
        self.exp_avg = self.parameters.clone(prefix="lion_exp_avg", init="zeros")

    def construct(self, gradients):
        lr = self._next_lr()
        for param, exp_avg, grad, scale in zip(self.parameters, self.exp_avg, gradients, self.scales):
            step = lr * scale
            c = self.beta1 * exp_avg + (1.0 - self.beta1) * grad
            ops.assign(param, param * (1.0 - step * self.weight_decay) - step * ops.sign(c))
            ops.assign(exp_avg, self.beta2 * exp_avg + (1.0 - self.beta2) * grad)
        return True


# ---------------------------------------------------------------- Adafactor


def _rms(x):
    return ops.sqrt(ops.mean(ops.square(x)))


class Adafactor(_Flat):
    """Adafactor with factored second moments for matrices (``transformers.Adafactor``'s rule).

    With ``relative_step=True`` the step size is ``min(1e-2, 1/√t)`` (``1e-6·t`` with ``warmup_init``) and the
    scheduled learning rate is not used.
    """

    def __init__(self, params, learning_rate, scales=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8,
                 beta1=None, weight_decay=0.0, scale_parameter=True, relative_step=False, warmup_init=False):
        super().__init__(params, learning_rate, scales)
        self.eps1, self.eps2 = float(eps[0]), float(eps[1])
        self.clip = float(clip_threshold)
        self.decay_rate = float(decay_rate)
        self.beta1 = None if beta1 is None else float(beta1)
        self.weight_decay = float(weight_decay)
        self.scale_parameter, self.relative_step, self.warmup_init = scale_parameter, relative_step, warmup_init
        self.step = ms.Parameter(ms.Tensor(0.0, ms.float32), name="adafactor_step", requires_grad=False)
        self.factored = tuple(len(p.shape) >= 2 for p in self.parameters)

        def state(prefix, shape_of):
            return ms.ParameterTuple(ms.Parameter(ms.Tensor(np.zeros(shape_of(tuple(p.shape), f), np.float32)),
                                                  name=f"{prefix}.{p.name}", requires_grad=False)
                                     for p, f in zip(self.parameters, self.factored))

        self.row = state("adafactor_row", lambda s, f: s[:-1] if f else (1,))
        self.col = state("adafactor_col", lambda s, f: s[:-2] + s[-1:] if f else (1,))
        self.sq = state("adafactor_sq", lambda s, f: (1,) if f else s)
        self.exp_avg = state("adafactor_exp_avg", lambda s, f: s if self.beta1 is not None else (1,))
        self.one = ms.Tensor(1.0, ms.float32)
        self.eps2_t = ms.Tensor(self.eps2, ms.float32)
        self.floor = ms.Tensor(1e-2, ms.float32)

    def construct(self, gradients):
        lr = self._next_lr()
        step = self.step + 1.0
        ops.assign(self.step, step)
        if self.relative_step:
            lr = ops.minimum(step * 1e-6 if self.warmup_init else self.floor, ops.rsqrt(step))
        beta2t = 1.0 - ops.pow(step, self.decay_rate)
        for i in range(len(self.scales)):
            param, grad = self.parameters[i], gradients[i]
            p_lr = lr * self.scales[i]
            if self.scale_parameter:
                p_lr = p_lr * ops.maximum(self.eps2_t, _rms(param))
            update = ops.square(grad) + self.eps1
            if self.factored[i]:
                row = beta2t * self.row[i] + (1.0 - beta2t) * update.mean(axis=-1)
                col = beta2t * self.col[i] + (1.0 - beta2t) * update.mean(axis=-2)
                ops.assign(self.row[i], row)
                ops.assign(self.col[i], col)
                r = ops.rsqrt(row / row.mean(axis=-1, keep_dims=True)).expand_dims(-1)
                update = r * ops.rsqrt(col).expand_dims(-2) * grad
            else:
                sq = beta2t * self.sq[i] + (1.0 - beta2t) * update
                ops.assign(self.sq[i], sq)
                update = ops.rsqrt(sq) * grad
            update = update / ops.maximum(_rms(update) / self.clip, self.one) * p_lr
            if self.beta1 is not None:
                update = self.beta1 * self.exp_avg[i] + (1.0 - self.beta1) * update
                ops.assign(self.exp_avg[i], update)
            new = param - self.weight_decay * p_lr * param if self.weight_decay != 0.0 else param
            ops.assign(param, new - update)
        return True


# ---------------------------------------------------------------- Prodigy


class Prodigy(_Flat):
    """Prodigy (Adam form): AdamW whose step size ``d·lr`` is estimated on the fly (use ``--learning_rate 1``).

    ``d`` is estimated with the largest parameter learning rate, as ``prodigyopt`` does; each parameter then steps
    with ``d ×`` its own lr, so LoRA+ and a separate text-encoder lr keep their ratios (``prodigyopt`` refuses them).
    """

    def __init__(self, params, learning_rate, scales=None, betas=(0.9, 0.999), beta3=None, eps=1e-8,
                 weight_decay=0.0, decouple=True, use_bias_correction=False, safeguard_warmup=False, d0=1e-6,
                 d_coef=1.0, growth_rate=float("inf")):
        super().__init__(params, learning_rate, scales)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.beta3 = float(beta3) if beta3 is not None else self.beta2 ** 0.5
        self.eps, self.weight_decay, self.decouple = float(eps), float(weight_decay), bool(decouple)
        self.bias_correction, self.safeguard = bool(use_bias_correction), bool(safeguard_warmup)
        self.d0, self.d_coef, self.growth = float(d0), float(d_coef), float(growth_rate)
        self.max_scale = max(self.scales)
        self.rel = tuple(s / self.max_scale for s in self.scales)
        self.p0 = ms.ParameterTuple(ms.Parameter(ms.Tensor(p.asnumpy()), name=f"prodigy_p0.{p.name}",
                                                 requires_grad=False) for p in self.parameters)
        self.exp_avg = self.parameters.clone(prefix="prodigy_exp_avg", init="zeros")
        self.exp_avg_sq = self.parameters.clone(prefix="prodigy_exp_avg_sq", init="zeros")
        self.s = self.parameters.clone(prefix="prodigy_s", init="zeros")

        def scalar(name, value):
            return ms.Parameter(ms.Tensor(value, ms.float32), name=f"prodigy_{name}", requires_grad=False)

        self.d, self.d_max = scalar("d", self.d0), scalar("d_max", self.d0)
        self.d_numerator, self.k = scalar("d_numerator", 0.0), scalar("k", 0.0)
        self.one = ms.Tensor(1.0, ms.float32)
        self.tiny = ms.Tensor(1e-30, ms.float32)

    def construct(self, gradients):
        lr = self._next_lr() * self.max_scale
        d = self.d * 1.0
        k = self.k + 1.0
        bc = ops.sqrt(1.0 - ops.pow(self.beta2, k)) / (1.0 - ops.pow(self.beta1, k)) if self.bias_correction \
            else self.one
        dlr = d * lr * bc
        s_rate = d / self.d0 * d if self.safeguard else d / self.d0 * dlr
        numerator = self.beta3 * self.d_numerator
        denom = self.tiny * 0.0
        for i in range(len(self.rel)):
            param, grad = self.parameters[i], gradients[i]
            if not self.decouple and self.weight_decay != 0.0:
                grad = grad + self.weight_decay * param
            numerator = numerator + d / self.d0 * dlr * ops.sum(grad * (self.p0[i] - param))
            ops.assign(self.exp_avg[i], self.beta1 * self.exp_avg[i] + d * (1.0 - self.beta1) * grad)
            ops.assign(self.exp_avg_sq[i], self.beta2 * self.exp_avg_sq[i] + d * d * (1.0 - self.beta2)
                       * ops.square(grad))
            s = self.beta3 * self.s[i] + s_rate * grad
            ops.assign(self.s[i], s)
            denom = denom + ops.sum(ops.abs(s))
        ok = denom > 0
        d_hat = self.d_coef * numerator / ops.maximum(denom, self.tiny)
        new_d = ops.select(ops.logical_and(ok, d == self.d0), ops.maximum(d, d_hat), d)
        new_max = ops.select(ok, ops.maximum(self.d_max, d_hat), self.d_max)
        new_d = new_max if self.growth == float("inf") else ops.minimum(new_max, new_d * self.growth)
        ops.assign(self.d_numerator, numerator)
        ops.assign(self.d, new_d)
        ops.assign(self.d_max, new_max)
        ops.assign(self.k, k)
        go = ops.select(ok, self.one, self.one * 0.0)  # prodigyopt skips the step while every gradient is zero
        for i in range(len(self.rel)):
            param = self.parameters[i]
            step = dlr * self.rel[i] * go
            denom_i = ops.sqrt(self.exp_avg_sq[i]) + new_d * self.eps
            new = param - self.weight_decay * step * param if self.decouple and self.weight_decay != 0.0 else param
            ops.assign(param, new - step * self.exp_avg[i] / denom_i)
        return True
