from mindone_lora_plugin.train.cli import main

raise SystemExit(main())
