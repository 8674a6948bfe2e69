from mindone_lora_plugin.cli import main

raise SystemExit(main())
