import sys

from mindone_lora_plugin.cli import entry

raise SystemExit(entry(["train"] + sys.argv[1:]))
