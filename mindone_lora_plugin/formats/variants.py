"""Recognise adapter files whose algorithm no installed plugin provides, and refuse them by name.

A module's tensors decide its algorithm; reading a file as plain LoRA when it is not would silently produce a
different model (mindone 0.5.0, for example, drops DoRA's ``dora_scale`` with a warning). Each signature below names
the algorithm (as ``--lora_algo`` spells it, when a plugin provides one) and the distribution that provides it, so
the error says what to install. Signatures of installed algorithms are not refused: their algorithm reads them.
DoRA (``dora_scale``, ``lora_magnitude_vector``) is read by the built-in ``lora`` algorithm, so it has no signature.
"""

from __future__ import annotations

import re

from mindone_lora_plugin.errors import LoraError

LYCORIS_DIST = "mindone-lora-lycoris"
# algorithm → the distribution that provides it (for "install ..." hints)
PROVIDERS = {"loha": LYCORIS_DIST, "lokr": LYCORIS_DIST}

# (variant name, the algorithm reading it or None, regex on a tensor key), most specific first
_SIGNATURES = (
    ("LyCORIS LoHa (hada_w1_a/hada_w2_a)", "loha", re.compile(r"\.hada_(?:w[12]_[ab]|t[12])(?:\.|$)")),
    ("LyCORIS LoKr (lokr_w1/lokr_w2)", "lokr", re.compile(r"\.lokr_(?:w[12](?:_[ab])?|t[12])(?:\.|$)")),
    ("LyCORIS LoCon with CP/Tucker decomposition (lora_mid)", None, re.compile(r"\.lora_mid\.weight$")),
    ("LyCORIS (IA)^3 (on_input)", None, re.compile(r"\.on_input$")),
    ("LyCORIS GLoRA (a1/a2/b1/b2)", None, re.compile(r"\.(?:a1|a2|b1|b2)\.weight$")),
    ("LyCORIS full weight difference (diff)", None, re.compile(r"\.diff(?:_b)?$")),
    ("LyCORIS norm-layer training (w_norm/b_norm)", None, re.compile(r"\.(?:w_norm|b_norm)$")),
    ("OFT/BOFT (orthogonal fine-tuning)", None, re.compile(r"(?:^oft_|\.oft_blocks$|\.oft_diag|\.oft_[rR](?:\.|$)|"
                                                           r"\.boft_[rRs](?:\.|$))")),
    ("PEFT (IA)^3 (ia3_l)", None, re.compile(r"\.ia3_l(?:\.|$)")),
    ("PEFT VeRA (vera_lambda)", None, re.compile(r"\.vera_lambda_[bd](?:\.|$)")),
    ("LoRA with bias terms (lora_bias)", None, re.compile(r"\.lora_[AB]\.bias$|\.lora_(?:down|up)\.bias$")),
    ("embedding LoRA (lora_embedding_A/B)", None, re.compile(r"\.lora_embedding_[AB](?:\.|$)")),
)


def plugin_for_algorithm(name: str) -> str:
    """``"install mindone-lora-lycoris"``-style hint for an algorithm a known plugin provides, else ``""``."""
    dist = PROVIDERS.get(name)
    return f"the {dist} plugin provides it: pip install {dist}" if dist else ""


def detect_variant(keys, installed=()) -> tuple[str, str, str | None] | None:
    """``(variant name, example key, algorithm)`` for the first signature found in ``keys`` whose algorithm is not
    in ``installed``, else None."""
    keys = list(keys)
    for name, algo, regex in _SIGNATURES:
        if algo is not None and algo in installed:
            continue
        for k in keys:
            if regex.search(k):
                return name, k, algo
    return None


def refuse_variants(keys, metadata: dict[str, str] | None, where: str, installed) -> None:
    """Raise :class:`LoraError` naming the variant when ``keys`` hold an algorithm no installed plugin provides
    (``installed``: the installed algorithm names)."""
    found = detect_variant(keys, installed)
    if found is None:
        return
    name, example, algorithm = found
    algo = ""
    args = (metadata or {}).get("ss_network_args", "")
    m = re.search(r'"algo"\s*:\s*"([^"]+)"', args)
    if m:
        algo = f", ss_network_args algo={m.group(1)}"
    hint = plugin_for_algorithm(algorithm) if algorithm else ""
    if hint:
        raise LoraError(f"{where} is a {name} file (key '{example}'{algo}) and no installed plugin provides the "
                        f"'{algorithm}' algorithm; {hint} (or check {'MINDONE_LORA_PLUGINS'})")
    raise LoraError(f"{where} is a {name} file (key '{example}'{algo}); no installed plugin reads that algorithm: "
                    f"installed are {', '.join(sorted(installed)) or 'none'}; merge/extract a plain LoRA with LyCORIS "
                    "or kohya tools first")
