"""The built-in plugins, the one list of them: plugin name → module. The plugin manager registers these modules
before any third-party plugin, exactly as it registers an entry point of another distribution. Each model family
is one plugin registering its architectures, strategies and flags."""

BUILTIN_PLUGINS = {
    "core": "mindone_lora_plugin.core_plugin",
    "lora": "mindone_lora_plugin.algorithms.lora",
    "diffusers": "mindone_lora_plugin.formats.diffusers",
    "kohya": "mindone_lora_plugin.formats.kohya",
    "sd": "mindone_lora_plugin.architectures.sd.plugin",
    "flux": "mindone_lora_plugin.architectures.flux.plugin",
    "sd3": "mindone_lora_plugin.architectures.sd3.plugin",
    "features": "mindone_lora_plugin.train.features.plugin",
}
