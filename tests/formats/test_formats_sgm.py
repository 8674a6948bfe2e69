"""SDXL diffusers ⇄ SGM module-path mapping (reference §2.3/§2.4)."""

import pytest

from mindone_lora_plugin.architectures.sd import sgm

# §2.3: the real SDXL base layout (3 down blocks, layers_per_block 2, transformer layers (1, 2, 10))
SDXL_TABLE = [
    ("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"),
    ("down_blocks.0.resnets.1.conv2", "input_blocks.2.0.out_layers.3"),
    ("down_blocks.0.resnets.1.time_emb_proj", "input_blocks.2.0.emb_layers.1"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
    ("down_blocks.1.resnets.1.conv1", "input_blocks.5.0.in_layers.2"),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.1.attentions.1.transformer_blocks.1.ff.net.2", "input_blocks.5.1.transformer_blocks.1.ff.net.2"),
    ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
    ("down_blocks.2.resnets.0.conv1", "input_blocks.7.0.in_layers.2"),
    ("down_blocks.2.resnets.1.conv2", "input_blocks.8.0.out_layers.3"),
    ("down_blocks.2.attentions.0.transformer_blocks.9.ff.net.2", "input_blocks.7.1.transformer_blocks.9.ff.net.2"),
    ("down_blocks.2.attentions.1.proj_in", "input_blocks.8.1.proj_in"),
    ("mid_block.resnets.0.conv1", "middle_block.0.in_layers.2"),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_k", "middle_block.1.transformer_blocks.0.attn2.to_k"),
    ("mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
    ("up_blocks.0.resnets.0.conv1", "output_blocks.0.0.in_layers.2"),
    ("up_blocks.0.resnets.2.conv_shortcut", "output_blocks.2.0.skip_connection"),
    ("up_blocks.0.attentions.0.proj_out", "output_blocks.0.1.proj_out"),
    ("up_blocks.0.attentions.2.transformer_blocks.9.attn1.to_out.0",
     "output_blocks.2.1.transformer_blocks.9.attn1.to_out.0"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("up_blocks.1.resnets.0.conv1", "output_blocks.3.0.in_layers.2"),
    ("up_blocks.1.resnets.2.conv2", "output_blocks.5.0.out_layers.3"),
    ("up_blocks.1.attentions.1.transformer_blocks.1.attn2.to_v", "output_blocks.4.1.transformer_blocks.1.attn2.to_v"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("up_blocks.2.resnets.0.conv1", "output_blocks.6.0.in_layers.2"),
    ("up_blocks.2.resnets.2.time_emb_proj", "output_blocks.8.0.emb_layers.1"),
    ("conv_in", "input_blocks.0.0"),
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
    ("conv_out", "out.2"),
]

# the tiny SDXL layout (2 blocks: DownBlock2D + CrossAttnDownBlock2D; layers_per_block 2)
TINY_TABLE = [
    ("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
    ("down_blocks.1.attentions.1.transformer_blocks.1.attn1.to_k", "input_blocks.5.1.transformer_blocks.1.attn1.to_k"),
    ("mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
    ("up_blocks.0.attentions.2.proj_out", "output_blocks.2.1.proj_out"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("up_blocks.1.resnets.2.conv1", "output_blocks.5.0.in_layers.2"),
]


@pytest.mark.parametrize("diffusers_path,sgm_path", SDXL_TABLE + TINY_TABLE)
def test_table(diffusers_path, sgm_path):
    assert sgm.diffusers_to_sgm(diffusers_path, 2) == sgm_path
    assert sgm.sgm_to_diffusers(sgm_path, 2) == diffusers_path


def test_reference_example_keys():
    """The kohya SDXL example names of §2.2."""
    from mindone_lora_plugin.formats.kohya import kohya_module_name

    examples = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "lora_unet_input_blocks_7_1_transformer_blocks_9_ff_net_2":
            "down_blocks.2.attentions.0.transformer_blocks.9.ff.net.2",
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k":
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
        "lora_unet_output_blocks_0_1_proj_out": "up_blocks.0.attentions.0.proj_out",
        "lora_unet_input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
        "lora_unet_input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
        "lora_unet_output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    }
    for name, path in examples.items():
        assert kohya_module_name("unet", path, "sdxl", {"layers_per_block": 2}) == name


@pytest.mark.parametrize("layout", ["real_sdxl", "real_sd1", "tiny_sdxl"])
def test_every_module_round_trips(layout, sd_fakes):
    real_sd1_unet, real_sdxl_unet, tiny_sdxl = sd_fakes.real_sd1_unet, sd_fakes.real_sdxl_unet, sd_fakes.tiny_sdxl
    modules = {"real_sdxl": real_sdxl_unet, "real_sd1": real_sd1_unet,
               "tiny_sdxl": lambda: tiny_sdxl().modules["unet"]}[layout]()
    attn_blocks = {int(p.split(".")[1]) for p in modules if p.startswith("up_blocks.") and ".attentions." in p}
    seen = {}
    for path in modules:
        s = sgm.diffusers_to_sgm(path, 2, lambda b: b in attn_blocks)
        assert sgm.is_sgm_path(s)
        assert s not in seen, (s, path, seen.get(s))
        seen[s] = path
        assert sgm.sgm_to_diffusers(s, 2) == path


def test_sd1_layout_upsampler_without_attention():
    """In an SD1-layout LDM UNet the first up block has no attention: its upsampler is at inner index 1."""
    assert sgm.diffusers_to_sgm("up_blocks.0.upsamplers.0.conv", 2, lambda b: False) == "output_blocks.2.1.conv"
    assert sgm.sgm_to_diffusers("output_blocks.2.1.conv", 2) == "up_blocks.0.upsamplers.0.conv"


def test_other_layers_per_block():
    # L = 1: a down block = 1 resnet (+ downsampler), an up block = 2 resnets
    assert sgm.diffusers_to_sgm("down_blocks.1.resnets.0.conv1", 1) == "input_blocks.3.0.in_layers.2"
    assert sgm.diffusers_to_sgm("down_blocks.0.downsamplers.0.conv", 1) == "input_blocks.2.0.op"
    assert sgm.diffusers_to_sgm("up_blocks.1.upsamplers.0.conv", 1) == "output_blocks.3.2.conv"
    for p in ("down_blocks.1.attentions.0.proj_in", "up_blocks.1.resnets.1.conv2", "down_blocks.2.downsamplers.0.conv"):
        assert sgm.sgm_to_diffusers(sgm.diffusers_to_sgm(p, 3), 3) == p


def test_invalid_paths():
    for bad in ("down_blocks.0.resnets.2.conv1", "up_blocks.0.resnets.3.conv1", "mid_block.resnets.2.conv1",
                "foo.bar", "down_blocks.0.resnets.0.nonsense"):
        with pytest.raises(ValueError):
            sgm.diffusers_to_sgm(bad, 2)
    for bad in ("input_blocks.3.0.in_layers.2", "input_blocks.0.1.proj_in", "middle_block.3.proj_in",
                "output_blocks.1.2.conv", "input_blocks.4.0.op", "nonsense.1"):
        with pytest.raises(ValueError):
            sgm.sgm_to_diffusers(bad, 2)


def test_infer_layers_per_block(sd_fakes):
    kohya_targets, real_sdxl_unet = sd_fakes.kohya_targets, sd_fakes.real_sdxl_unet
    paths = [sgm.diffusers_to_sgm(p, 2) for p in kohya_targets(real_sdxl_unet(), conv=True)]
    assert sgm.infer_layers_per_block(paths) == 2
    l3 = [sgm.diffusers_to_sgm(p, 3) for p in ("down_blocks.0.downsamplers.0.conv", "down_blocks.1.resnets.2.conv1")]
    assert sgm.infer_layers_per_block(l3) == 3
    assert sgm.infer_layers_per_block(["input_blocks.4.1.proj_in"]) == 2
    assert sgm.infer_layers_per_block([]) is None


def test_upsampler_either_inner_index_resolves_with_base(sd_fakes):
    from mindone_lora_plugin.formats.names import NameResolver

    tiny_sd1 = sd_fakes.tiny_sd1

    r = NameResolver(tiny_sd1())
    for spelling in ("output_blocks.2.2.conv", "output_blocks.2.1.conv"):
        assert r.resolve("unet", spelling, False) == "up_blocks.0.upsamplers.0.conv"
        assert r.resolve("unet", spelling.replace(".", "_"), True) == "up_blocks.0.upsamplers.0.conv"
    assert NameResolver(None).resolve("unet", "output_blocks_2_1_conv", True) == "up_blocks.0.upsamplers.0.conv"
