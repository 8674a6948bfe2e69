"""``mindone-lora ui``: a local web UI to set up, watch and use training runs (standard library server, no build step).

Modules: :mod:`.paths` (every path confined to the allowed folders), :mod:`.form` (the new-run form built from the
``train`` parser, validation with the CLI's own checks, command line and TOML config), :mod:`.runs` (runs under
``--root``: detached training processes, their ``train_log.jsonl``, stop and resume), :mod:`.files` (inspect,
convert, merge, generate through the commands' Python functions), :mod:`.server` (the HTTP/JSON API and the page).
"""
