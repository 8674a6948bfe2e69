"""Subcommands of ``mindone-lora`` (one module each: ``add_parser(subparsers)`` and ``run(args)``)."""
