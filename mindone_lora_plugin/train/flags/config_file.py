"""``--config_file train.toml`` and ``--output_config``, as kohya's ``train_network.py`` has them.

The file's keys are flag names without dashes (kohya's own names are accepted too, see :data:`KOHYA_KEYS`);
``[sections]`` are flattened as kohya flattens them. The values become the parser's defaults, so a flag given on the
command line overrides the file. An unknown key, or a value of the wrong kind, ends in one line naming it.
``--output_config`` writes the effective flags to the ``--config_file`` path (which must not exist yet) and exits,
as kohya does.
"""

from __future__ import annotations

import argparse
import difflib
import os

from mindone_lora_plugin.errors import LoraError

# kohya's key → this trainer's flag (same meaning)
KOHYA_KEYS = {"network_dim": "lora_rank", "network_alpha": "lora_alpha", "conv_dim": "lora_conv_rank",
              "conv_alpha": "lora_conv_alpha", "max_train_epochs": "num_train_epochs", "save_precision": "save_dtype",
              "max_data_loader_n_workers": "dataloader_num_workers", "unet_lr": "learning_rate",
              "min_snr_gamma": "snr_gamma", "full_fp16": None, "save_model_as": None, "network_module": None}
# kohya keys whose value is checked, then dropped: they state what this trainer always does
KOHYA_FIXED = {"save_model_as": ("safetensors",), "network_module": ("networks.lora",)}
SAVE_PRECISION = {"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
NOT_FROM_FILE = {"config_file", "output_config", "help"}


def find_config_path(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--config_file" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config_file="):
            return a.split("=", 1)[1]
    return None


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in NOT_FROM_FILE and a.dest != argparse.SUPPRESS}


def read_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """The file's flags as ``{dest: value}``, checked against ``parser``'s flags."""
    import tomllib

    if not os.path.isfile(path):
        raise LoraError(f"--config_file {path} does not exist; it accepts a .toml file of flag names and values")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise LoraError(f"--config_file {path} is not valid TOML: {e}") from None
    flat = {}
    for key, value in raw.items():  # kohya: one level of [sections], flattened
        for k, v in (value.items() if isinstance(value, dict) else [(key, value)]):
            flat[k] = v
    actions = _actions(parser)
    out = {}
    for key, value in flat.items():
        dest = KOHYA_KEYS.get(key, key) if key not in actions else key
        if key in KOHYA_FIXED:
            if str(value) not in KOHYA_FIXED[key]:
                raise LoraError(f"--config_file {path}: {key} = {value!r} is not supported; it accepts "
                                f"{' or '.join(KOHYA_FIXED[key])}")
            continue
        if dest is None:
            raise LoraError(f"--config_file {path}: {key} has no equivalent here; remove it")
        if dest not in actions:
            close = difflib.get_close_matches(key, list(actions) + list(KOHYA_KEYS), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else "; keys are flag names without the leading dashes"
            raise LoraError(f"--config_file {path}: unknown key {key!r}{hint}")
        if key == "save_precision":
            value = SAVE_PRECISION.get(str(value), value)
        if dest == "resolution" and isinstance(value, str) and "," in value:  # kohya writes "512,512"
            sides = [s.strip() for s in value.split(",")]
            if len(sides) != 2 or sides[0] != sides[1]:
                raise LoraError(f"--config_file {path}: resolution = {value!r}; it accepts one side (square "
                                f"training, e.g. 512 or \"512,512\"); for other shapes use enable_bucket = true")
            value = sides[0]
        if type(actions[dest]).__name__ == "_Refuse":
            from mindone_lora_plugin.train.flags.training import REFUSED

            raise LoraError(f"--config_file {path}: {key} is not supported: {REFUSED[dest]}")
        out[dest] = _checked(path, key, value, actions[dest])
    return out


def _checked(path: str, key: str, value, action: argparse.Action):
    where = f"--config_file {path}: {key}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise LoraError(f"{where} = {value!r}; it accepts true or false")
        return value
    if action.nargs == 0:
        raise LoraError(f"{where} cannot be set in a file")
    if isinstance(value, list) and action.nargs in ("*", "+"):
        return [_one(where, v, action) for v in value]
    return _one(where, value, action)


def _one(where: str, value, action: argparse.Action):
    kind = action.type
    if isinstance(value, (dict, list)) or (isinstance(value, bool) and kind is not None):
        raise LoraError(f"{where} = {value!r}; it accepts one {getattr(kind, '__name__', 'value')}")
    if kind is int and not (isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit())):
        raise LoraError(f"{where} = {value!r}; it accepts a whole number")
    if kind is float and not isinstance(value, (int, float)):
        try:
            value = float(value)
        except ValueError:
            raise LoraError(f"{where} = {value!r}; it accepts a number") from None
    if kind is not None and value is not None:
        value = kind(value)
    if action.choices is not None and value not in action.choices:
        raise LoraError(f"{where} = {value!r}; it accepts one of {', '.join(map(str, action.choices))}")
    return value


def install(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` read ``--config_file`` first: the file's values become defaults, the command line wins."""
    plain = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        argv = list(args) if args is not None else []
        path = find_config_path(argv)
        if path and "--output_config" not in argv:
            values = read_config(path, parser)
            saved = {dest: a.default for dest, a in _actions(parser).items()}
            parser.set_defaults(**values)
            try:
                return plain(argv, namespace)
            finally:
                parser.set_defaults(**saved)
        return plain(argv, namespace)

    parser.parse_known_args = parse_known_args


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    s = str(value)
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def write_config(args, path: str) -> str:
    """Write the effective flags (those with a value) to ``path`` as TOML; refuse to overwrite a file."""
    from mindone_lora_plugin.safetensors_io import write_bytes_atomic
    from mindone_lora_plugin.train.flags.settings import plain_args

    if os.path.exists(path):
        raise LoraError(f"--output_config: {path} already exists; choose a new --config_file path (nothing is "
                        f"overwritten)")
    lines = ["# mindone-lora train: effective flags (read back with --config_file)"]
    for key, value in plain_args(args).items():
        if key in NOT_FROM_FILE or key in ("command", "demo") or value is None:
            continue
        lines.append(f"{key} = {toml_value(value)}")
    write_bytes_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path
