"""Architectures (model families) as plugins: lookups and name errors, the hook's example, detection of SD1.x/2.x/SDXL
model folders and LoRA files through the installed architectures, a third-party family that is detected and listed,
and the SD facts the core now asks the architecture for (names, metadata, presets, component classes).
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from mindone_lora_plugin import safetensors_io
from mindone_lora_plugin.architectures import FolderInfo, component_of, detect_folder, detect_lora, known_components
from mindone_lora_plugin.architectures.base import METADATA, STRUCTURE, Architecture, Component, Evidence, TargetRule
from mindone_lora_plugin.architectures.sd.arch import SD1
from mindone_lora_plugin.base_model_info import BaseModelInfo
from mindone_lora_plugin.cli import main
from mindone_lora_plugin.errors import LoraError, PluginError
from mindone_lora_plugin.formats.diffusers import DiffusersFormat
from mindone_lora_plugin.formats.kohya import KohyaFormat
from mindone_lora_plugin.formats.names import parse_key, parse_keys
from mindone_lora_plugin.formats.reader import read_lora
from mindone_lora_plugin.hookspecs import hookimpl
from mindone_lora_plugin.state import LoraModule, LoraState


def tiny_sd2(sd_fakes) -> BaseModelInfo:
    clip_modules, unet_modules = sd_fakes.clip_modules, sd_fakes.unet_modules
    return BaseModelInfo("sd2", {"layers_per_block": 2}, {"unet": unet_modules(cross=1024, linear_proj=True),
                                    "text_encoder": clip_modules(hidden=1024, layers=2, intermediate=64)},
                         source="<tiny-sd2>")


def small_sd1(sd_fakes) -> BaseModelInfo:
    """SD1.x's real cross-attention width (768) on a tiny UNet (the tiny test model's 32 says nothing)."""
    clip_modules, unet_modules = sd_fakes.clip_modules, sd_fakes.unet_modules
    return BaseModelInfo("sd1", {"layers_per_block": 2}, {"unet": unet_modules(cross=768, linear_proj=False),
                                    "text_encoder": clip_modules(hidden=768, layers=2, intermediate=64)},
                         source="<small-sd1>")


def base_of(sd_fakes, arch: str) -> BaseModelInfo:
    """The fake base model of ``arch`` (sd1: a smaller SD1.x than the shared one, sd2, sdxl)."""
    return {"sd1": small_sd1, "sd2": tiny_sd2, "sdxl": lambda _: sd_fakes.tiny_sdxl()}[arch](sd_fakes)


def register(pm, name: str, *architectures):
    class Plugin:
        @hookimpl
        def mindone_lora_architectures(self):
            yield from architectures

    pm.register_plugin(Plugin(), name=name)


# ---------------------------------------------------------------------------------------------- registry


def test_builtin_architectures_are_listed_with_their_family_plugins(plugin_manager, capsys):
    assert list(plugin_manager.architectures()) == ["flux", "sd1", "sd2", "sd3", "sdxl"]
    assert main(["plugins", "--json"]) == 0
    listed = {a["name"]: a for a in json.loads(capsys.readouterr().out)["architectures"]}
    assert {n: a["plugin"] for n, a in listed.items()} == {"flux": "flux", "sd1": "sd", "sd2": "sd", "sd3": "sd3",
                                                           "sdxl": "sd"}
    assert listed["sdxl"]["components"] == ["unet", "text_encoder", "text_encoder_2"]
    assert listed["sdxl"]["default_strategy"] == "sdxl" and listed["sd1"]["presets"] == ["attn", "kohya",
                                                                                           "kohya-conv"]
    assert main(["plugins"]) == 0
    table = capsys.readouterr().out
    assert "Architectures:" in table and "  sdxl " in table.split("Architectures:")[1] and "[sd]" in table


def test_unknown_and_duplicate_architecture_names(plugin_manager):
    with pytest.raises(PluginError, match=r"^unknown architecture 'sd9'; choose one of: flux, sd1, sd2, sd3, sdxl$"):
        plugin_manager.get_architecture("sd9")

    class Again(SD1):
        pass

    register(plugin_manager, "again", Again())
    with pytest.raises(PluginError, match=r"two plugins offer the architecture 'sd1': 'sd' and 'again'"):
        plugin_manager.architectures()


def test_a_nameless_architecture_drops_its_plugin_in_one_warning(plugin_manager, caplog):
    register(plugin_manager, "nameless", Architecture())
    assert list(plugin_manager.architectures()) == ["flux", "sd1", "sd2", "sd3", "sdxl"]
    assert "nameless" in plugin_manager.broken and "has no name" in plugin_manager.broken["nameless"]


def test_hookspec_example_registers_detects_and_is_listed(plugin_manager, tmp_path, capsys, sd_fakes):
    """The ``mindone_lora_architectures`` docstring example is real code: its family is found in folders and files."""
    from mindone_lora_plugin import hookspecs

    fake_model_folder, random_state, tiny_sd1 = sd_fakes.fake_model_folder, sd_fakes.random_state, sd_fakes.tiny_sd1

    ns: dict = {}
    exec(compile(textwrap.dedent(hookspecs.mindone_lora_architectures.__doc__.split("Example::", 1)[1]),
                 "<hookspec example>", "exec"), ns)
    plugin_manager.register_plugin(type("P", (), {"mindone_lora_architectures": staticmethod(
        ns["mindone_lora_architectures"])}), name="mysd")
    assert plugin_manager.get_architecture("mysd").label == "MySD"
    # a model folder: the pipeline class decides, over SD1.x's score
    folder = fake_model_folder(tiny_sd1(), tmp_path / "model")
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert BaseModelInfo.from_folder(folder).architecture == "sd1"
    (tmp_path / "model" / "model_index.json").write_text(json.dumps(dict(index, _class_name="MySDPipeline")))
    info = BaseModelInfo.from_folder(folder)
    assert info.architecture == "mysd" and set(info.modules) == {"unet", "text_encoder"}
    # a LoRA file: its header decides (structure beats SD1.x's shapes)
    state = random_state(tiny_sd1(), np.random.default_rng(1))
    path = KohyaFormat().write(state, str(tmp_path / "a.safetensors"), metadata={"mysd.version": "1"})
    assert read_lora(path).architecture == "mysd"
    assert read_lora(path, base=info).architecture == "mysd"
    with pytest.raises(LoraError, match=r"is a LoRA for MySD \(its header has mysd.version\) but the base model .* "
                                        r"is SD1.x"):
        read_lora(path, base=tiny_sd1())
    # listed
    assert main(["plugins"]) == 0
    assert "  mysd " in capsys.readouterr().out.split("Architectures:")[1]


# ---------------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_model_folders_are_detected_through_the_architectures(tmp_path, plugin_manager, arch, sd_fakes):
    fake_model_folder = sd_fakes.fake_model_folder
    folder = fake_model_folder(base_of(sd_fakes, arch), tmp_path / arch)
    info = BaseModelInfo.from_folder(folder)
    assert info.architecture == arch and info.components() == list(plugin_manager.get_architecture(arch)
                                                                   .component_names())
    assert detect_folder(FolderInfo({}, {"unet": {"addition_embed_type": "text_time"}})) == "sdxl"
    assert detect_folder(FolderInfo({"_class_name": "StableDiffusionXLPipeline"}, {"unet": {}})) == "sdxl"
    assert detect_folder(FolderInfo({}, {"unet": {}, "text_encoder": {"hidden_size": 1024}})) == "sd2"


def test_a_folder_no_architecture_knows_is_one_line(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("{}")
    (tmp_path / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "Unknown"],
                                                           "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(LoraError, match=r"^no installed architecture \(flux, sd1, sd2, sd3, sdxl\) recognises the "
                                        r"model folder .* \(components with a config: transformer\)"):
        BaseModelInfo.from_folder(str(tmp_path))


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("fmt", [KohyaFormat, DiffusersFormat])
def test_lora_files_are_detected_through_the_architectures(tmp_path, arch, fmt, sd_fakes):
    random_state = sd_fakes.random_state
    state = random_state(base_of(sd_fakes, arch), np.random.default_rng(3))
    path = fmt().write(state, str(tmp_path / "x.safetensors"))
    tensors, metadata = safetensors_io.load(path)
    found = detect_lora(parse_keys(tensors, path), tensors, {})  # keys and shapes alone, no header
    assert found is not None and found.architecture == arch and found.strong
    assert read_lora(path).architecture == arch


def test_lora_metadata_names_the_architecture():
    keys = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.zeros((2, 8), np.float32)}
    parsed = parse_keys(keys, "f")
    cases = {"sdxl_base_v1-0": "sdxl", "sd_v2_768_v": "sd2", "sd_v1": "sd1"}
    for version, arch in cases.items():
        found = detect_lora(parsed, keys, {"ss_base_model_version": version})
        assert (found.architecture, found.score) == (arch, METADATA)
    found = detect_lora(parsed, keys, {"modelspec.architecture": "stable-diffusion-v2-768-v/lora"})
    assert found.architecture == "sd2" and found.reason == "modelspec.architecture=stable-diffusion-v2-768-v/lora"
    assert detect_lora(parsed, keys, {"ss_v2": "True"}).architecture == "sd2"
    assert detect_lora(parsed, keys, {}) is None


def test_only_a_clip_second_text_encoder_makes_a_file_sdxl():
    """SDXL's structural evidence is a second *CLIP* encoder: another family's second encoder (FLUX's T5) is not it."""
    clip = {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.zeros((2, 8), np.float32)}
    found = detect_lora(parse_keys(clip, "f"), clip, {})
    assert (found.architecture, found.score) == ("sdxl", STRUCTURE)
    t5 = {"lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": np.zeros((2, 8), np.float32)}
    assert detect_lora(parse_keys(t5, "f"), t5, {}) is None


# ---------------------------------------------------------------------------------------------- a third-party family


class Toy(Architecture):
    """A made-up family: a ``denoiser`` component with ``blocks.N.attn.qkv`` modules."""

    name = "toy"
    label = "Toy-1"
    description = "a made-up family for tests"
    components = (Component("denoiser", "builtins:object", "lora_toy", class_names=("ToyDenoiser",)),)
    denoiser = "denoiser"
    default_strategy = "toy"
    kohya_base_model_version = "toy_v1"
    kohya_version_family = "toy_"
    modelspec_architecture = "toy-1/lora"
    modelspec_prefix = "toy-1"

    def detect_folder(self, folder):
        return 100 if folder.configs.get("denoiser", {}).get("_class_name") == "ToyDenoiser" else 0

    def detect_lora(self, parsed, tensors, metadata, sgm_used=False):
        if any(pk.component == "denoiser" for pk in parsed):
            return Evidence(self.name, STRUCTURE, "it has weights for a toy denoiser")
        return super().detect_lora(parsed, tensors, metadata, sgm_used)

    def resolve_name(self, component, name, flat, base_config=None):
        path = name.replace("_", ".") if flat else name
        return path if path.startswith("blocks.") else None

    def target_rules(self, component):
        return {"attn": TargetRule(names=("qkv",)), "everything": TargetRule(containers=("ToyBlock",))}


def toy_folder(tmp_path) -> str:
    folder = tmp_path / "toy"
    (folder / "denoiser").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "ToyPipeline",
                                                         "denoiser": ["toy", "ToyDenoiser"]}))
    (folder / "denoiser" / "config.json").write_text(json.dumps({"_class_name": "ToyDenoiser"}))
    safetensors_io.save({"blocks.0.attn.qkv.weight": np.zeros((12, 4), np.float16)},
                        str(folder / "denoiser" / "diffusion_pytorch_model.safetensors"))
    return str(folder)


def test_a_third_party_family_is_detected_named_written_and_listed(plugin_manager, tmp_path, capsys, sd_fakes):
    random_state, tiny_sd1 = sd_fakes.random_state, sd_fakes.tiny_sd1
    register(plugin_manager, "toy_plugin", Toy())
    folder = toy_folder(tmp_path)
    info = BaseModelInfo.from_folder(folder)
    assert info.architecture == "toy" and info.modules == {"denoiser": {"blocks.0.attn.qkv": (12, 4)}}
    assert "denoiser" in known_components()
    # its component's key prefix is understood, and its files are read against its folders
    assert parse_key("denoiser.blocks.0.attn.qkv.lora_A.weight").component == "denoiser"
    rng = np.random.default_rng(0)
    state = LoraState(architecture="toy")
    state.add("denoiser", "blocks.0.attn.qkv", LoraModule(rng.standard_normal((2, 4)).astype(np.float32),
                                                          rng.standard_normal((12, 2)).astype(np.float32), 4.0))
    kohya = KohyaFormat().write(state, str(tmp_path / "k.safetensors"))
    tensors, meta = safetensors_io.load(kohya)
    assert "lora_toy_blocks_0_attn_qkv.lora_down.weight" in tensors
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"], meta["ss_v2"]) == ("toy_v1",
                                                                                            "toy-1/lora", "False")
    for path in (kohya, DiffusersFormat().write(state, str(tmp_path / "d.safetensors"))):
        back = read_lora(path, base=info)
        assert back.architecture == "toy" and float(back.components["denoiser"]["blocks.0.attn.qkv"].alpha) == 4.0
        with pytest.raises(LoraError, match=r"is a LoRA for Toy-1 \(it has weights for a toy denoiser\) but the "
                                            r"base model .* is SD1.x"):
            read_lora(path, base=tiny_sd1())
    assert read_lora(kohya).architecture == "toy"  # no base: the family's own grammar names the modules
    # an SD LoRA on the toy model is refused in one line naming both
    sd = KohyaFormat().write(random_state(tiny_sd1(), rng), str(tmp_path / "sd.safetensors"))
    with pytest.raises(LoraError, match=r"is a LoRA for SD1.x .* but the base model .* is Toy-1"):
        read_lora(sd, base=info)
    # inspect names it; merge fuses it into its own folder layout
    capsys.readouterr()
    assert main(["inspect", kohya]) == 0
    assert "Toy-1 (it has weights for a toy denoiser)" in capsys.readouterr().out
    assert main(["merge", "--model", folder, "--lora", kohya, "--out", str(tmp_path / "merged")]) == 0
    merged, _ = safetensors_io.load(str(tmp_path / "merged" / "denoiser" / "diffusion_pytorch_model.safetensors"))
    np.testing.assert_allclose(merged["blocks.0.attn.qkv.weight"].astype(np.float32),
                               state.components["denoiser"]["blocks.0.attn.qkv"].delta(), rtol=2e-3, atol=2e-3)
    # live cells are named by its component classes; listed by mindone-lora plugins
    ToyDenoiser = type("ToyDenoiser", (), {"config": {"_class_name": "ToyDenoiser"}})
    assert component_of(ToyDenoiser()) == "denoiser"
    from mindone_lora_plugin.models import Models

    assert Models(denoiser=ToyDenoiser()).architecture == "toy"  # live models: detected from their configs
    capsys.readouterr()
    assert main(["plugins", "--json"]) == 0
    listed = {a["name"]: a for a in json.loads(capsys.readouterr().out)["architectures"]}
    assert listed["toy"]["plugin"] == "toy_plugin" and listed["toy"]["presets"] == ["attn", "everything"]


def test_a_family_preset_reaches_the_parser_and_the_strategy(plugin_manager):
    from mindone_lora_plugin.options import LoraOptions, parse_targets
    from mindone_lora_plugin.strategies.base import target_rule

    assert parse_targets("everything") == ["everything"]  # not a preset while no family defines it
    register(plugin_manager, "toy_plugin", Toy())
    assert parse_targets("everything") == "everything"
    rule = target_rule("denoiser", object(), LoraOptions(targets="everything", architecture="toy"))
    assert rule.containers == ("ToyBlock",)
    with pytest.raises(LoraError, match=r"the target preset 'kohya' is not defined for the Toy-1 denoiser; choose "
                                        r"one of attn, everything"):
        target_rule("denoiser", object(), LoraOptions(targets="kohya", architecture="toy"))


# ---------------------------------------------------------------------------------------------- SD facts


def test_sd_facts_come_from_the_architectures(plugin_manager):
    sd1, sd2, sdxl = (plugin_manager.get_architecture(n) for n in ("sd1", "sd2", "sdxl"))
    assert sdxl.kohya_name("unet", "down_blocks.1.attentions.0.proj_in") == "lora_unet_input_blocks_4_1_proj_in"
    assert sd1.kohya_name("unet", "down_blocks.1.attentions.0.proj_in") == \
        "lora_unet_down_blocks_1_attentions_0_proj_in"
    assert [a.kohya_prefix("text_encoder") for a in (sd1, sd2, sdxl)] == ["lora_te", "lora_te", "lora_te1"]
    with pytest.raises(LoraError, match="a sd1 model has one text encoder"):
        sd1.kohya_prefix("text_encoder_2")
    assert sd2.modelspec_name(True) == "stable-diffusion-v2-768-v/lora" and sd2.modelspec_resolution(False) == \
        "512x512"
    assert sdxl.kohya_metadata({"ss_base_model_version": "sd_v1"}, False)["ss_base_model_version"] == \
        "sdxl_base_v1-0"
    assert sd2.kohya_metadata({"ss_base_model_version": "sd_v2_768_v"}, True) == {
        "ss_base_model_version": "sd_v2_768_v", "ss_v2": "True"}
    assert [a.default_resolution for a in (sd1, sd2, sdxl)] == [512, 768, 1024]
    assert sd1.target_rules("unet")["attn"].names == ("to_q", "to_k", "to_v", "to_out.0")
    assert sdxl.target_rules("text_encoder_2")["kohya"].containers == ("CLIPAttention", "CLIPSdpaAttention",
                                                                      "CLIPMLP")
    assert "ResnetBlock2D" in sd2.target_rules("unet")["kohya-conv"].containers
    assert sd1.target_rules("text_encoder_2") == {}


def test_live_cells_are_named_by_the_sd_component_classes():
    from mindone.diffusers import UNet2DConditionModel
    from mindone.transformers import CLIPTextModel, CLIPTextModelWithProjection

    def bare(cls):
        return cls.__new__(cls)  # only the class matters

    assert component_of(bare(UNet2DConditionModel)) == "unet"
    assert component_of(bare(CLIPTextModel)) == "text_encoder"
    assert component_of(bare(CLIPTextModelWithProjection)) == "text_encoder_2"  # the longest class name wins
    assert component_of(object()) is None


class FusedToy(Toy):
    """The toy family with its own kohya layout: the module is written as ``toy_fused`` (a name the core's key parser
    does not know), read back by the family itself."""

    kohya_network_module = "networks.lora_toy"

    def kohya_modules(self, state):
        return {"toy_fused": (state.components["denoiser"]["blocks.0.attn.qkv"], "denoiser.blocks.0.attn.qkv")}

    def count_file_keys(self, keys, kohya):
        return sum(k.startswith("toy_fused.") for k in keys) if kohya else 0

    def read_file(self, tensors, metadata, base, where):
        from mindone_lora_plugin.formats.plain import ReadInfo

        if not any(k.startswith("toy_fused.") for k in tensors):
            return None
        state = LoraState(architecture=self.name, metadata=dict(metadata))
        state.add("denoiser", "blocks.0.attn.qkv", LoraModule(tensors["toy_fused.lora_down.weight"],
                                                              tensors["toy_fused.lora_up.weight"],
                                                              float(tensors["toy_fused.alpha"])))
        return state, ReadInfo(styles={"kohya"})


def test_a_family_with_its_own_kohya_layout_writes_claims_and_reads_it(plugin_manager, tmp_path, capsys):
    register(plugin_manager, "toy_plugin", FusedToy())
    info = BaseModelInfo.from_folder(toy_folder(tmp_path))
    rng = np.random.default_rng(5)
    state = LoraState(architecture="toy")
    state.add("denoiser", "blocks.0.attn.qkv", LoraModule(rng.standard_normal((2, 4)).astype(np.float32),
                                                          rng.standard_normal((12, 2)).astype(np.float32), 3.0))
    path = KohyaFormat().write(state, str(tmp_path / "fused.safetensors"))
    tensors, meta = safetensors_io.load(path)
    assert sorted(tensors) == ["toy_fused.alpha", "toy_fused.lora_down.weight", "toy_fused.lora_up.weight"]
    assert meta["ss_network_module"] == "networks.lora_toy" and meta["modelspec.architecture"] == "toy-1/lora"
    for base in (None, info):
        back = read_lora(path, base=base)  # claimed by kohya through the family's key count, read by the family
        mod = back.components["denoiser"]["blocks.0.attn.qkv"]
        assert back.architecture == "toy" and mod.alpha == 3.0
        np.testing.assert_array_equal(mod.up, state.components["denoiser"]["blocks.0.attn.qkv"].up)
    assert main(["convert", path, str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 0
    assert read_lora(str(tmp_path / "d.safetensors")).architecture == "toy"


class SharedPrefixToy(Architecture):
    """A made-up family whose ``transformer`` shares SD's kohya prefix ``lora_unet_`` (as FLUX.1 and most DiT
    families do)."""

    name = "dit_toy"
    label = "DiT-toy"
    components = (Component("transformer", "builtins:object", "lora_unet"),)
    denoiser = "transformer"

    def detect_lora(self, parsed, tensors, metadata, sgm_used=False):
        if any(pk.component == "transformer" and pk.name.startswith("dit_blocks_") for pk in parsed):
            return Evidence(self.name, STRUCTURE, "it has dit_blocks")
        return None

    def resolve_name(self, component, name, flat, base_config=None):
        if flat:
            name = "dit_blocks." + name[len("dit_blocks_"):].replace("_", ".") if name.startswith("dit_blocks_") else ""
        return name if component == "transformer" and name.startswith("dit_blocks.") else None


def test_each_family_parses_a_shared_prefix_into_its_own_components(plugin_manager, tmp_path):
    """``lora_unet_`` is SD's ``unet`` in an SD file and the toy's ``transformer`` in a toy file: the reader parses
    a file with the prefixes of the family it belongs to, nothing is renamed afterwards."""
    register(plugin_manager, "dit_toy_plugin", SharedPrefixToy())
    rng = np.random.default_rng(0)
    down, up = rng.standard_normal((2, 4)).astype(np.float32), rng.standard_normal((4, 2)).astype(np.float32)
    toy = {"lora_unet_dit_blocks_0_qkv.lora_down.weight": down, "lora_unet_dit_blocks_0_qkv.lora_up.weight": up}
    safetensors_io.save(toy, str(tmp_path / "toy.safetensors"))
    state = read_lora(str(tmp_path / "toy.safetensors"))
    assert state.architecture == "dit_toy" and list(state.components) == ["transformer"]
    assert list(state.components["transformer"]) == ["dit_blocks.0.qkv"]
    sd = {"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": down,
          "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": up}
    safetensors_io.save(sd, str(tmp_path / "sd.safetensors"))
    assert list(read_lora(str(tmp_path / "sd.safetensors")).components) == ["unet"]
    assert plugin_manager.get_architecture("dit_toy").key_prefixes().flat == (("lora_unet_", "transformer"),)


def test_text_encoders_follow_the_components_kind(plugin_manager):
    """``--train_text_encoder``/``--text_encoder_lr`` concern the components whose kind is ``text_encoder``,
    whatever a family calls them."""
    from mindone_lora_plugin.architectures import text_encoders
    from mindone_lora_plugin.options import build_options

    class Captioned(SharedPrefixToy):
        name = "captioned_toy"
        components = SharedPrefixToy.components + (
            Component("captioner", "builtins:object", "lora_cap", kind="text_encoder"),)

    register(plugin_manager, "captioned_plugin", Captioned())
    assert text_encoders("sdxl") == ("text_encoder", "text_encoder_2") and text_encoders("sd1") == ("text_encoder",)
    assert text_encoders("captioned_toy") == ("captioner",)
    assert "captioner" in text_encoders()  # no architecture: every installed family's
    opts = build_options(plugin_manager, strategy="unet", architecture="captioned_toy", text_encoder_lr=1e-5)
    assert opts.learning_rates == {"captioner": 1e-5}
