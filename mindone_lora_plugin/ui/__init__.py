"""``mindone-lora ui``: a local web UI to set up, queue, watch and use training runs (Starlette on uvicorn, no build
step, nothing fetched at run time).

Modules: :mod:`.paths` (every path confined to the allowed folders), :mod:`.form` (the new-run form built from the
``train`` parser, validation with the CLI's own checks, command line and TOML config), :mod:`.runs` (runs under
``--root``: detached training processes, the queue, their ``train_log.jsonl``, stop, resume and delete),
:mod:`.files` (inspect, convert, merge, generate through the commands' Python functions; merge and generate in a
worker process), :mod:`.bodies` (the JSON bodies, type-checked), :mod:`.server` (the gate, the routes and the page).
"""

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")  # the host names that reach only this machine
