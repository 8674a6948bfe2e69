"""Optimizers and LoRA+ on small tensors, against numpy transcriptions of the published update rules (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from mindone_lora_plugin.errors import LoraError

SHAPES = {"unet.m.lora_A.weight": (3, 5), "unet.m.lora_B.weight": (5, 3), "unet.c.bias": (4,),
          "unet.k.lora_A.weight": (2, 3, 1, 1)}
STEPS = 4


def _grads(step):
    rng = np.random.default_rng([7, step])
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _start():
    rng = np.random.default_rng(5)
    return {k: rng.standard_normal(s).astype(np.float32) * 0.5 for k, s in SHAPES.items()}


def _run(optimizer_type, optimizer_args=(), lrs=(0.01, 0.02, 0.03, 0.04), loraplus=None, mode="graph"):
    """Run the package's optimizer ``STEPS`` steps on fixed gradients; return the final parameters (numpy)."""
    import argparse

    import mindspore as ms

    from mindone_lora_plugin.train import optimizers

    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    params = [ms.Parameter(ms.Tensor(v), name=k) for k, v in _start().items()]
    args = argparse.Namespace(optimizer_type=optimizer_type, optimizer_args=list(optimizer_args),
                              loraplus_lr_ratio=loraplus, loraplus_unet_lr_ratio=None,
                              loraplus_text_encoder_lr_ratio=None, adam_beta1=0.9, adam_beta2=0.999,
                              adam_epsilon=1e-8, adam_weight_decay=0.01)
    groups = [{"params": params, "lr": 1.0, "component": "unet"}]
    opt, _ = optimizers.build(args, groups, lambda base: [base * x for x in lrs] + [base * lrs[-1]])
    for step in range(STEPS):
        g = _grads(step)
        opt(tuple(ms.Tensor(g[p.name]) for p in opt.parameters))  # LoRA+ regroups them
    return {p.name: p.asnumpy() for p in params}, opt


# ------------------------------------------------------------------ the published rules, in numpy

def ref_adamw(p, lrs, b1=0.9, b2=0.999, eps=1e-8, wd=0.01):
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t in range(STEPS):
        for k, g in _grads(t).items():  # MindSpore's AdamWeightDecay: no bias correction
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            p[k] = p[k] - lrs[t] * (m[k] / (np.sqrt(v[k]) + eps) + wd * p[k])
    return p


def ref_lion(p, lrs, b1=0.9, b2=0.99, wd=0.0):
    m = {k: np.zeros_like(v) for k, v in p.items()}
    for t in range(STEPS):
        for k, g in _grads(t).items():
            c = b1 * m[k] + (1 - b1) * g
            p[k] = p[k] * (1 - lrs[t] * wd) - lrs[t] * np.sign(c)
            m[k] = b2 * m[k] + (1 - b2) * g
    return p


def ref_adafactor(p, lrs, eps=(1e-30, 1e-3), clip=1.0, decay=-0.8, beta1=None, wd=0.0, scale_parameter=True):
    state = {k: {} for k in p}
    rms = lambda x: np.sqrt(np.mean(x * x))  # noqa: E731
    for t in range(STEPS):
        step = t + 1
        for k, g in _grads(t).items():
            g, s = g.astype(np.float64), state[k]
            lr = lrs[t] * (max(eps[1], rms(p[k])) if scale_parameter else 1.0)
            beta2t = 1.0 - step ** decay
            u = g * g + eps[0]
            if g.ndim >= 2:
                s["r"] = beta2t * s.get("r", 0) + (1 - beta2t) * u.mean(-1)
                s["c"] = beta2t * s.get("c", 0) + (1 - beta2t) * u.mean(-2)
                r = 1 / np.sqrt(s["r"] / s["r"].mean(-1, keepdims=True))
                u = r[..., None] * (1 / np.sqrt(s["c"]))[..., None, :] * g
            else:
                s["v"] = beta2t * s.get("v", 0) + (1 - beta2t) * u
                u = g / np.sqrt(s["v"])
            u = u / max(1.0, rms(u) / clip) * lr
            if beta1 is not None:
                s["m"] = beta1 * s.get("m", 0) + (1 - beta1) * u
                u = s["m"]
            p[k] = p[k] - wd * lr * p[k] - u
    return p


def ref_prodigy(p, lrs, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, d0=1e-6, d_coef=1.0, bias_correction=False):
    b3 = b2 ** 0.5
    p0 = {k: v.copy() for k, v in p.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    s = {k: np.zeros_like(v) for k, v in p.items()}
    d, d_max, num = d0, d0, 0.0
    for t in range(STEPS):
        bc = np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1)) if bias_correction else 1.0
        dlr = d * lrs[t] * bc
        num *= b3
        den = 0.0
        for k, g in _grads(t).items():
            num += d / d0 * dlr * float(np.dot(g.ravel(), (p0[k] - p[k]).ravel()))
            m[k] = b1 * m[k] + d * (1 - b1) * g
            v2[k] = b2 * v2[k] + d * d * (1 - b2) * g * g
            s[k] = b3 * s[k] + d / d0 * dlr * g
            den += float(np.abs(s[k]).sum())
        d_hat = d_coef * num / den
        if d == d0:
            d = max(d, d_hat)
        d_max = max(d_max, d_hat)
        d = d_max  # min(d_max, d * growth_rate) with the default growth_rate = inf
        for k in p:
            p[k] = p[k] - wd * dlr * p[k] - dlr * m[k] / (np.sqrt(v2[k]) + d * eps)
    return p


LRS = (0.01, 0.02, 0.03, 0.04)


@pytest.mark.parametrize("name,optimizer_args,reference", [
    ("AdamW", (), lambda p: ref_adamw(p, LRS)),
    ("Lion", ("betas=0.95,0.98", "weight_decay=0.1"), lambda p: ref_lion(p, LRS, 0.95, 0.98, 0.1)),
    ("Adafactor", (), lambda p: ref_adafactor(p, LRS)),
    ("adafactor", ("beta1=0.9", "weight_decay=0.01", "scale_parameter=False"),
     lambda p: ref_adafactor(p, LRS, beta1=0.9, wd=0.01, scale_parameter=False)),
    ("Prodigy", (), lambda p: ref_prodigy(p, [1.0] * 4)),
    ("Prodigy", ("weight_decay=0.01", "use_bias_correction=True", "d0=1e-4"),
     lambda p: ref_prodigy(p, [1.0] * 4, wd=0.01, d0=1e-4, bias_correction=True)),
])
def test_updates_follow_the_published_rule(name, optimizer_args, reference):
    lrs = [1.0] * 4 if name == "Prodigy" else LRS
    got, _ = _run(name, optimizer_args, lrs=lrs)
    want = reference(_start())
    for k in SHAPES:
        assert np.abs(got[k] - _start()[k]).max() > 1e-5, k  # it moved
        np.testing.assert_allclose(got[k], want[k], rtol=2e-4, atol=5e-6, err_msg=f"{name} {k}")


def test_optimizer_state_is_named_for_checkpoints():
    _, opt = _run("Prodigy", lrs=[1.0] * 4, mode="pynative")
    trained = {id(p) for p in opt.parameters}
    names = [p.name for _, p in opt.parameters_and_names() if id(p) not in trained]
    assert len(names) == len(set(names))
    assert {"prodigy_d", "prodigy_k", "prodigy_exp_avg.unet.m.lora_B.weight"} <= set(names)


@pytest.mark.parametrize("name,optimizer_args", [("Lion", ()), ("AdamW", ("weight_decay=0",))])
def test_loraplus_moves_b_ratio_times_as_far(name, optimizer_args):
    """On fixed gradients (and no weight decay) a step is proportional to the lr: with LoRA+ ratio 4 the B matrices
    move 4× as far, the others as far as without."""
    plain, _ = _run(name, optimizer_args, lrs=LRS, mode="pynative")
    plus, _ = _run(name, optimizer_args, lrs=LRS, loraplus=4.0, mode="pynative")
    start = _start()
    for k in SHAPES:
        ratio = np.abs(plus[k] - start[k]).sum() / np.abs(plain[k] - start[k]).sum()
        assert ratio == pytest.approx(4.0 if "lora_B" in k else 1.0, rel=1e-5), k


def test_loraplus_asks_the_strategy_which_tensors_are_up():
    from mindone_lora_plugin.train.optimizers import is_up_parameter

    class Algo:
        def is_up_parameter(self, name):
            return name.endswith("hada_w2_a")

    assert is_up_parameter("unet.x.lora_B.weight") and not is_up_parameter("unet.x.lora_A.weight")
    assert is_up_parameter("unet.x.hada_w2_a", Algo()) and not is_up_parameter("unet.x.lora_B.weight", Algo())


@pytest.mark.parametrize("args,words", [
    (("Lion", ["eps=1e-8"]), ["Lion does not take 'eps'", "betas, weight_decay"]),
    (("Prodigy", ["d0"]), ["not key=value"]),
    (("Adafactor", ["relative_step=maybe"]), ["relative_step", "True or False"]),
    (("Lion", ["betas=0.9"]), ["two numbers"]),
])
def test_bad_optimizer_args_are_one_line(args, words):
    from mindone_lora_plugin.train.optimizers import parse_optimizer_args

    with pytest.raises(LoraError) as e:
        parse_optimizer_args(*args)
    for w in words:
        assert w in str(e.value)


def test_unknown_optimizer_type_names_the_choices():
    from mindone_lora_plugin.train.optimizers import optimizer_name

    assert optimizer_name("prodigy") == "Prodigy"
    with pytest.raises(LoraError, match="did you mean Lion.*AdamW, Lion, Adafactor, Prodigy"):
        optimizer_name("Lio")
