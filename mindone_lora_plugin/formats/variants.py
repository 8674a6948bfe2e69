"""Recognise LoRA-like files that are not plain LoRA (LyCORIS algorithms, DoRA, OFT, ...) and refuse them by name.

A plain LoRA module is ``down``/``up`` (+ ``alpha``); anything else changes the maths, so converting it as plain LoRA
would silently produce a different model (mindone 0.5.0, for example, drops DoRA's ``dora_scale`` with a warning).
"""

from __future__ import annotations

import re

from mindone_lora_plugin.errors import LoraError

# (variant name, regex on a tensor key), most specific first
_SIGNATURES = (
    ("DoRA (weight-decomposed LoRA: dora_scale)", re.compile(r"\.dora_scale$")),
    ("DoRA (weight-decomposed LoRA: PEFT lora_magnitude_vector)", re.compile(r"\.lora_magnitude_vector(?:\.|$)")),
    ("LyCORIS LoHa (hada_w1_a/hada_w2_a)", re.compile(r"\.hada_(?:w[12]_[ab]|t[12])(?:\.|$)")),
    ("LyCORIS LoKr (lokr_w1/lokr_w2)", re.compile(r"\.lokr_(?:w[12](?:_[ab])?|t[12])(?:\.|$)")),
    ("LyCORIS LoCon with CP/Tucker decomposition (lora_mid)", re.compile(r"\.lora_mid\.weight$")),
    ("LyCORIS (IA)^3 (on_input)", re.compile(r"\.on_input$")),
    ("LyCORIS GLoRA (a1/a2/b1/b2)", re.compile(r"\.(?:a1|a2|b1|b2)\.weight$")),
    ("LyCORIS full weight difference (diff)", re.compile(r"\.diff(?:_b)?$")),
    ("LyCORIS norm-layer training (w_norm/b_norm)", re.compile(r"\.(?:w_norm|b_norm)$")),
    ("OFT/BOFT (orthogonal fine-tuning)", re.compile(r"(?:^oft_|\.oft_blocks$|\.oft_diag|\.oft_[rR](?:\.|$)|"
                                                     r"\.boft_[rRs](?:\.|$))")),
    ("PEFT (IA)^3 (ia3_l)", re.compile(r"\.ia3_l(?:\.|$)")),
    ("PEFT VeRA (vera_lambda)", re.compile(r"\.vera_lambda_[bd](?:\.|$)")),
    ("LoRA with bias terms (lora_bias)", re.compile(r"\.lora_[AB]\.bias$|\.lora_(?:down|up)\.bias$")),
    ("embedding LoRA (lora_embedding_A/B)", re.compile(r"\.lora_embedding_[AB](?:\.|$)")),
)


def detect_variant(keys) -> tuple[str, str] | None:
    """``(variant name, example key)`` for the first non-plain-LoRA signature found in ``keys``, else None."""
    keys = list(keys)
    for name, regex in _SIGNATURES:
        for k in keys:
            if regex.search(k):
                return name, k
    return None


def refuse_variants(keys, metadata: dict[str, str] | None = None, where: str = "the LoRA file") -> None:
    """Raise :class:`LoraError` naming the variant when ``keys`` are not plain LoRA."""
    found = detect_variant(keys)
    if found is None:
        return
    name, example = found
    algo = ""
    args = (metadata or {}).get("ss_network_args", "")
    m = re.search(r'"algo"\s*:\s*"([^"]+)"', args)
    if m:
        algo = f", ss_network_args algo={m.group(1)}"
    raise LoraError(f"{where} is a {name} file (key '{example}'{algo}), not plain LoRA; only plain LoRA "
                    "(lora_down/lora_up or lora_A/lora_B with alpha) can be read; use a plain LoRA, or merge/extract "
                    "one with LyCORIS or kohya tools first")
