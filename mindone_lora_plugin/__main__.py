from mindone_lora_plugin.cli import entry

raise SystemExit(entry())
