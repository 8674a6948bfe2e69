"""The fair reader: every format claims a file with a strength; the strongest wins whoever provides it; ties name
both formats in one line."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.formats.base import CLAIM_SURE, CLAIM_WEAK, LoraFormat
from mindone_lora_plugin.formats.diffusers import DiffusersFormat
from mindone_lora_plugin.formats.kohya import KohyaFormat
from mindone_lora_plugin.formats.reader import builtin_formats, detect_format, format_claims, open_lora
from mindone_lora_plugin.state import LoraModule, LoraState


def _state():
    st = LoraState(architecture="sd1")
    st.add("unet", "mid_block.attentions.0.proj_in", LoraModule(np.ones((2, 4), np.float32),
                                                                np.ones((4, 2), np.float32), 2.0))
    return st


class SureKohyaLike(LoraFormat):
    """A plugin format that claims kohya files carrying its own header marker more strongly than kohya does."""

    name = "sure"
    description = "test"

    def claim(self, keys, metadata):
        return CLAIM_SURE if metadata.get("writer") == "sure" else 0

    def read(self, path, base=None):
        return _state()


class SniffOnly(LoraFormat):
    name = "sniffer"
    description = "test"

    def sniff(self, keys, metadata):
        return True  # claims everything, weakly

    def read(self, path, base=None):
        return _state()


class Twin(SureKohyaLike):
    name = "twin"


class BrokenClaim(LoraFormat):
    name = "broken"
    description = "test"

    def claim(self, keys, metadata):
        raise RuntimeError("bug in a plugin")


def test_builtin_claims_follow_the_share_of_keys():
    kohya, diffusers = KohyaFormat(), DiffusersFormat()
    k = ["lora_unet_a_b.lora_down.weight", "lora_unet_a_b.lora_up.weight", "lora_unet_a_b.alpha"]
    d = ["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight",
         "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight"]
    assert kohya.claim(k, {}) == 99 and diffusers.claim(k, {}) == 0
    assert diffusers.claim(d, {}) == 99 and kohya.claim(d, {}) == 0
    assert diffusers.claim(["x.y"], {"lora_adapter_metadata": "{}"}) == CLAIM_SURE
    mostly_kohya = k + d[:1]
    assert kohya.claim(mostly_kohya, {}) > diffusers.claim(mostly_kohya, {}) > 0
    assert detect_format(mostly_kohya, {}).name == "kohya"
    assert SniffOnly().claim(k, {}) == CLAIM_WEAK


def test_strongest_claim_wins_whoever_offers_it(tmp_path, sd_fakes):
    random_state, tiny_sd1 = sd_fakes.random_state, sd_fakes.tiny_sd1
    path = KohyaFormat().write(random_state(tiny_sd1(), conv=False), str(tmp_path / "k.safetensors"),
                               metadata={"writer": "sure"})
    formats = builtin_formats() + [SniffOnly(), BrokenClaim()]
    assert open_lora(path, formats=formats).format.name == "kohya"  # a weak claim does not beat the built-in
    lf = open_lora(path, formats=formats + [SureKohyaLike()])
    assert lf.format.name == "sure" and len(lf.state) == 1
    claims = [(s, f.name) for s, f in format_claims(["lora_unet_a_b.lora_down.weight"], {"writer": "sure"},
                                                  formats + [SureKohyaLike()])]
    assert claims[0] == (CLAIM_SURE, "sure") and (CLAIM_WEAK, "sniffer") in claims


def test_a_tie_names_both_formats(tmp_path):
    p = tmp_path / "t.safetensors"
    save_file({"lora_unet_a_b.lora_down.weight": np.ones((2, 4), np.float32)}, str(p), {"writer": "sure"})
    with pytest.raises(LoraError) as err:
        open_lora(str(p), formats=builtin_formats() + [SureKohyaLike(), Twin()])
    msg = str(err.value)
    assert "'sure' and 'twin'" in msg and "claim it equally" in msg and "\n" not in msg
    p2 = tmp_path / "w.safetensors"
    save_file({"weird/a": np.ones(2, np.float32)}, str(p2))
    with pytest.raises(LoraError, match="'sniffer' and 'sniffer2' claim it equally"):
        open_lora(str(p2), formats=[SniffOnly(), type("S2", (SniffOnly,), {"name": "sniffer2"})()])
