"""The new-run form: built from ``mindone-lora train``'s own parser, validated with the CLI's own checks. (Over 400
lines: the field rules, the argv/TOML round trip and the validation read together, as one table of flags.)

Every flag of the parser becomes a field in the group it has in ``--help`` (plugin flags in the "plugins" group), so a
flag another module adds appears by itself. :data:`BASIC` marks the flags shown without opening "more options". Each
field says when it applies, and the page shows (and sends) only the fields that do: ``source`` (the way of giving the
training images it belongs to, :func:`_sources`), ``scope`` (the algorithm, architecture or strategy it is for,
:func:`scope`) and ``needs`` (the flag it only works with, from the trainer's own ``train/flags/rules.NEEDS`` and
the training features' ``needs``).
Values come from the page as strings (booleans as booleans); :func:`to_argv` turns them into the ``train`` argument
list, :func:`validate` reports one message per mistake keyed by flag dest, :func:`to_toml` writes a config file whose
keys are the flag dests (kohya-style ``key = value``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex

from mindone_lora_plugin.demo.shapes_eval import shipped_model
from mindone_lora_plugin.errors import LoraError

# shown without "more options"; the rest of each group is folded
BASIC = ("pretrained_model_name_or_path", "train_data_dir", "dataset_name", "instance_data_dir", "instance_prompt",
         "class_data_dir", "class_prompt", "with_prior_preservation", "resolution", "output_dir", "seed",
         "train_batch_size", "max_train_steps", "learning_rate", "lr_scheduler", "lr_warmup_steps",
         "checkpointing_steps", "validation_prompt", "validation_steps", "num_validation_images", "lora_rank",
         "lora_alpha", "lora_strategy", "lora_algo", "lora_targets", "train_text_encoder", "save_formats",
         "output_name", "mode", "device_target")
# folders the UI confines to the allowed ones (and checks); so is every flag named like a path (PATHISH), e.g. one a
# plugin or a newer train adds, and --dataset_name when its value is a path
PATH_FIELDS = ("pretrained_model_name_or_path", "train_data_dir", "instance_data_dir", "class_data_dir", "output_dir",
               "cache_dir", "config_file", "output_config", "sample_prompts")
# folders the run writes (missing class images are generated into --class_data_dir): never a read-only one
WRITTEN = ("output_dir", "cache_dir", "output_config", "class_data_dir")
PATHISH = re.compile(r"(_dir|_path|_file|_folder|config|cache)$")
# set by the UI itself, not by the form
HIDDEN = ("demo", "distributed", "resume_from_checkpoint", "help", "output_config")
REQUIRED = ("pretrained_model_name_or_path", "output_dir")  # and one of DATA_FIELDS
DATA_FIELDS = ("train_data_dir", "dataset_name", "instance_data_dir")
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SKIPPED_GROUPS = ("positional arguments", "options", "optional arguments")

PRESETS = {
    "SD1.x quick": dict(resolution="512", train_batch_size="1", max_train_steps="500", learning_rate="1e-4",
                        lr_scheduler="constant", lr_warmup_steps="0", lora_rank="8", lora_alpha="8",
                        lora_targets="attn", checkpointing_steps="100", validation_steps="100",
                        num_validation_images="2", save_formats="diffusers,kohya"),
    "SDXL": dict(resolution="1024", train_batch_size="1", max_train_steps="1000", learning_rate="1e-4",
                 lr_scheduler="constant", lr_warmup_steps="0", lora_rank="16", lora_alpha="16", lora_targets="attn",
                 gradient_checkpointing=True, checkpointing_steps="200", validation_steps="200",
                 num_validation_images="2", save_formats="diffusers,kohya"),
    "DreamBooth": dict(train_data_dir="", instance_prompt="a photo of sks dog", class_prompt="a photo of a dog",
                       with_prior_preservation=True, class_data_dir="class-images", num_class_images="100",
                       resolution="512", train_batch_size="1", max_train_steps="500", learning_rate="1e-4",
                       lr_scheduler="constant", lr_warmup_steps="0", lora_rank="8", checkpointing_steps="100",
                       validation_prompt="a photo of sks dog in a bucket", validation_steps="100",
                       num_validation_images="2"),
    "tiny model on CPU (a quick check)": dict(pretrained_model_name_or_path=shipped_model(), resolution="32",
                                              train_batch_size="1", max_train_steps="40", learning_rate="1e-3",
                                              lr_warmup_steps="0", lora_targets="attn", checkpointing_steps="5",
                                              validation_prompt="a red circle", validation_steps="10",
                                              num_validation_images="1", num_inference_steps="2",
                                              device_target="CPU", mode="pynative", report_to="none"),
}


class _ParseError(Exception):
    pass


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message):  # noqa: D401 - argparse API
        raise _ParseError(message)


def train_parser() -> argparse.ArgumentParser:
    """A fresh ``mindone-lora train`` parser (with the installed plugins' flags) that raises instead of exiting."""
    from mindone_lora_plugin.train import cli as train_cli

    top = _RaisingParser(prog="mindone-lora")
    sub = top.add_subparsers(parser_class=_RaisingParser)
    return train_cli.add_parser(sub)


def _kind(action) -> str:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "bool"
    if action.choices:
        return "choice"
    return {int: "int", float: "float"}.get(action.type, "str")


def _plain(value):
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def schema(parser=None) -> dict:
    """The form: ``{"groups": [{"title", "fields": [...]}], "presets", "sources", "architectures"}``, in ``--help``
    order; ``architectures`` maps each installed architecture's name to its label."""
    from mindone_lora_plugin.plugins import get_plugin_manager
    from mindone_lora_plugin.train.features.active import needs as feature_needs
    from mindone_lora_plugin.train.flags.rules import NEEDS

    needs = {**NEEDS, **feature_needs(get_plugin_manager())}
    parser = parser or train_parser()
    groups = []
    for group in parser._action_groups:
        if group.title in SKIPPED_GROUPS or group.title.startswith("refused"):
            continue
        fields = []
        for a in group._group_actions:
            if a.help == argparse.SUPPRESS or a.dest in HIDDEN or not a.option_strings:
                continue
            fields.append({"dest": a.dest, "flag": _flag(a), "label": label(a), "kind": _kind(a),
                           "default": _plain(_default(a)), "required": a.dest in REQUIRED or a.dest in DATA_FIELDS,
                           "choices": [c for c in (a.choices or ()) if c is not None] or None,
                           "help": (a.help or "").replace("%(default)s", str(a.default)),
                           "basic": a.dest in BASIC or group.title == "plugins", "path": a.dest in PATH_FIELDS,
                           "written": a.dest in WRITTEN,
                           "needs": needs[a.dest][0] if a.dest in needs else None,
                           "source": None, "scope": None})
        if fields:
            groups.append({"title": group.title, "fields": fields})
    architectures = _installed_names(groups)
    return {"groups": groups, "presets": PRESETS, "sources": _sources(groups), "architectures": architectures}


# words of flag names spelled out in labels made from a name
NAME_WORDS = {"lora": "LoRA", "lr": "learning-rate", "dir": "folder", "num": "number of", "reso": "resolution",
              "ema": "EMA", "snr": "SNR", "dora": "DoRA"}


def _clause(text: str) -> str:
    return re.split(r"[;(:]|\. |, e\.g\.| — ", text, maxsplit=1)[0].strip()


def label(action) -> str:
    """A field's label in words: the first clause of the flag's own help, else (no help, or a clause that says less
    than the name: "a preset", "AdamW") its name in words (``lr_warmup_steps`` → "Learning-rate warmup steps")."""
    text = _clause((action.help or "").replace("%(default)s", ""))
    if (not text or len(text) > 60 or text.lower().startswith(("e.g", "default"))
            or re.fullmatch(r"((a|an|the) )?\S+", text.lower())):
        text = " ".join(NAME_WORDS.get(w, w) for w in action.dest.split("_"))
    return text[0].upper() + text[1:]


def _scoped_label(help_text: str, current: str) -> str:
    """The label of a flag whose help starts with its scope (``FLUX: how noise levels are drawn``, ``FLUX
    logit_normal sampling: mean``): the words after the scope's name."""
    head, _, rest = help_text.partition(":")
    words, clause = head.split()[1:], _clause(rest)
    if len(clause.split()) == 1 and words:
        clause = f"{' '.join(words)}: {clause}"
    elif not clause or len(clause) > 60:
        return current
    return clause[0].upper() + clause[1:]


def scope(help_text: str, names) -> list | None:
    """``[kind, [name]]`` when a flag's help starts with the name of an installed algorithm, architecture or strategy
    before a colon, as plugin flags' help does (``lokr: …``, ``FLUX: …``, ``lora-fa strategy: …``): the page shows
    the flag only while that one is chosen. None for every other flag."""
    head, colon, _ = help_text.partition(":")
    if not colon or not head.strip():
        return None
    first = head.split()[0].lower()
    for kind, known in names:
        for name in known:
            if first == name or (kind == "architecture" and first.startswith(name + ".")):
                return [kind, [name]]
    return None


def _installed_names(groups) -> dict:
    """Offer the installed algorithms and strategies as choices (each strategy with the architectures it fits), name
    the installed formats (all come from plugins), give each plugin flag its scope (see :func:`scope`) and each flag
    an architecture does not use (its ``unused_flags``, which training refuses) the other architectures; return the
    architectures' labels."""
    from mindone_lora_plugin.plugins import get_plugin_manager

    pm = get_plugin_manager()
    archs = pm.architectures()
    names = [("algorithm", sorted(pm.algorithms())), ("architecture", sorted(archs)),
             ("strategy", sorted(pm.strategies()))]
    ignored = {dest: [a for a in sorted(archs) if dest not in archs[a].unused_flags]
               for arch in archs.values() for dest in arch.unused_flags}
    for g in groups:
        for f in g["fields"]:
            if g["title"] == "plugins":
                f["scope"] = scope(f["help"], names)
                if f["scope"]:
                    f["label"] = _scoped_label(f["help"], f["label"])
            elif f["dest"] in ignored:
                f["scope"] = ["architecture", ignored[f["dest"]]]
            if f["dest"] == "lora_strategy":
                f.update(kind="choice", choices=sorted(pm.strategies()),
                         fits={n: list(s.architectures) if s.architectures else None
                               for n, s in pm.strategies().items()})
            elif f["dest"] == "lora_algo":
                f.update(kind="choice", choices=sorted(pm.algorithms()))
            elif f["dest"] == "save_formats":
                f["help"] = f"comma-separated; installed: {', '.join(sorted(pm.formats()))}"
    return {n: a.label or n for n, a in sorted(archs.items())}


def _sources(groups) -> list[dict]:
    """The ways of giving the training images (:data:`DATA_FIELDS`), for the page's "Training images" choice: a data
    field shows only while its way is chosen, and so does every field of a group it leads (DreamBooth's group starts
    with ``--instance_data_dir``)."""
    found = {}
    for g in groups:
        for i, f in enumerate(g["fields"]):
            if f["dest"] not in DATA_FIELDS:
                continue
            words = f["label"]
            if i == 0:  # the group is this way of training
                for other in g["fields"]:
                    other["source"] = f["dest"]
                words = f"{g['title'].split(' (')[0]}: {words[0].lower()}{words[1:]}"
            f["source"] = f["dest"]
            found[f["dest"]] = {"dest": f["dest"], "label": f"{words} ({f['flag']})"}
    return [found[d] for d in DATA_FIELDS if d in found]


def _flag(action) -> str:
    longs = [o for o in action.option_strings if o.startswith("--")]
    return next((o for o in longs if o[2:] == action.dest), longs[0] if longs else action.option_strings[0])


def _default(action):
    """An action's default for the form: None for a flag left out of the arguments unless given (SUPPRESS)."""
    return None if action.default == argparse.SUPPRESS else action.default


def _actions(parser) -> dict:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help",)}


def _is_default(action, value) -> bool:
    if action.default is None:
        return False
    try:
        return (action.type or str)(value) == action.default
    except (TypeError, ValueError):
        return False


def to_argv(values: dict, parser=None) -> list[str]:
    """The ``train`` arguments for the form values (empty and default values are left out)."""
    parser = parser or train_parser()
    argv = []
    for dest, action in _actions(parser).items():
        if dest not in values or dest in HIDDEN:
            continue
        value = values[dest]
        if _kind(action) == "bool":
            if bool(value) != bool(action.default):
                argv.append(_flag(action))
            continue
        value = "" if value is None else str(value).strip()
        if value == "" or _is_default(action, value):
            continue
        argv += [_flag(action), value]
    return argv


def command_line(argv: list[str]) -> str:
    return "mindone-lora train " + " ".join(shlex.quote(a) for a in argv)


def _field_of(message: str, actions: dict) -> str:
    """The dest of the first flag a message names (``_form`` when it names none)."""
    by_flag = {o: d for d, a in actions.items() for o in a.option_strings}
    for flag in re.findall(r"--[A-Za-z0-9_-]+", message):
        if flag in by_flag:
            return by_flag[flag]
    return "_form"


def validate(values: dict, guard, running_dirs=(), facts: dict | None = None) -> tuple[dict, list[str] | None]:
    """``(errors, argv)``: ``errors`` maps a flag dest (or ``_form``) to one message; ``argv`` is None on errors.

    The checks are the CLI's: the parser's types and choices, the model folder read as ``train`` reads it
    (:class:`BaseModelInfo`), ``check_args`` and ``options_from_args`` of ``train/flags/settings.py``, the plugin
    manager's
    strategy and format names; plus the UI's own: every path inside the allowed folders.
    """
    from mindone_lora_plugin.base_model_info import BaseModelInfo
    from mindone_lora_plugin.plugins import get_plugin_manager
    from mindone_lora_plugin.train.flags.rules import check_resolution
    from mindone_lora_plugin.train.flags.settings import check_args, default_resolution, options_from_args

    parser = train_parser()
    actions = _actions(parser)
    errors: dict[str, str] = {}
    values = dict(values)
    if str(values.get("config_file") or "").strip():  # its values join the form's, and are checked as the form's
        try:
            values = _with_config(values, guard, parser)
        except LoraError as e:
            errors["config_file"] = str(e)
    # --cache_latents_to_disk writes into the image folders
    written = WRITTEN + (DATA_FIELDS if values.get("cache_latents_to_disk") is True else ())
    for dest in _path_dests(actions, values, guard):  # confine, and give the checks the resolved path
        try:
            values[dest] = guard.resolve(str(values[dest]), _flag(actions[dest]), write=dest in written)
        except LoraError as e:
            errors[dest] = str(e)
    name = str(values.get("output_name") or "").strip()
    if name and (os.sep in name or name in (".", "..")):
        errors["output_name"] = f"--output_name {name}: a file name, not a path (the file goes into --output_dir)"
    logs = str(values.get("logging_dir") or "").strip()
    if logs and "output_dir" not in errors and str(values.get("output_dir") or "").strip():
        try:  # relative to the output folder, as the trainer reads it
            guard.resolve(os.path.join(values["output_dir"], logs), "--logging_dir", write=True)
        except LoraError as e:
            errors["logging_dir"] = str(e)
    for dest, action in actions.items():  # types and choices, one field at a time
        value = values.get(dest)
        if dest in errors or _kind(action) == "bool" or value is None or str(value).strip() == "":
            continue
        try:
            parser.parse_args([_flag(action), str(value).strip()])
        except _ParseError as e:
            errors[dest] = _one_line(str(e))
        except LoraError as e:
            errors[dest] = str(e)
    model = values.get("pretrained_model_name_or_path")
    info = None
    if not str(model or "").strip():
        errors.setdefault("pretrained_model_name_or_path", "--pretrained_model_name_or_path is required: a "
                                                           "diffusers-layout model folder")
    elif "pretrained_model_name_or_path" not in errors:
        try:
            from mindone_lora_plugin.model_files import resolve_model

            info = BaseModelInfo.from_folder(resolve_model(values["pretrained_model_name_or_path"],
                                                           values.get("vae") or None,
                                                           values.get("model_config") or None))
        except LoraError as e:
            errors["pretrained_model_name_or_path"] = str(e)
    data_fields = [d for d in DATA_FIELDS if str(values.get(d) or "")]
    if not data_fields:
        errors.setdefault("train_data_dir", "give the training images: --train_data_dir (an imagefolder), "
                                            "--dataset_name, or --instance_data_dir (DreamBooth)")
    for dest in ("train_data_dir", "instance_data_dir"):
        if dest in data_fields and dest not in errors and not os.path.isdir(values[dest]):
            errors[dest] = f"{_flag(actions[dest])} {values[dest]}: no such folder"
    out = values.get("output_dir")
    if not str(out or "").strip():
        errors.setdefault("output_dir", "--output_dir is required: the folder the run writes (inside the root)")
    elif "output_dir" not in errors and os.path.realpath(values["output_dir"]) in running_dirs:
        errors["output_dir"] = f"--output_dir {values['output_dir']}: a run is writing there now; choose another"
    elif "output_dir" not in errors and _holds_run(values["output_dir"]):
        errors["output_dir"] = (f"--output_dir {values['output_dir']} holds another run; choose a new folder (or "
                                f"resume that run from the Runs page)")
    _check_batch(values, actions, errors)
    if info is None:  # the whole-run checks need the model
        return errors, None
    if facts is not None:
        facts["architecture"] = info.architecture
    # the whole-run checks, each on its own so that every mistake shows at once, on the fields that passed
    argv = to_argv({k: v for k, v in values.items() if k not in errors}, parser)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = parser.parse_args(argv)
    except _ParseError as e:
        errors.setdefault("_form", _one_line(str(e)))
        return errors, None
    pm = get_plugin_manager()
    checks = [lambda: check_resolution(args.resolution or default_resolution(args.pretrained_model_name_or_path, info)),
              lambda: check_args(args),
              lambda: pm.get_strategy(options_from_args(args, info.architecture, pm).strategy)]
    checks += [lambda n=n: pm.get_format(n) for n in [f.strip() for f in args.save_formats.split(",") if f.strip()]]
    for check in checks:
        try:
            check()
        except LoraError as e:
            errors.setdefault(_field_of(str(e), actions), str(e))
    return errors, (None if errors else argv)


def _with_config(values: dict, guard, parser) -> dict:
    """The form's values with a ``--config_file``'s filled in where the form leaves a field empty; the file itself
    is dropped, so the run's command line holds every value and each goes through the form's checks."""
    from mindone_lora_plugin.train.flags.config_file import read_config

    path = guard.resolve(str(values["config_file"]), "--config_file", must_exist=True)
    out = dict(values, config_file="")
    for dest, value in read_config(path, parser).items():
        if out.get(dest) in (None, "", False):
            out[dest] = " ".join(map(str, value)) if isinstance(value, list) else value
    return out


def load_config(guard, path: str) -> dict:
    """A TOML config (as Save config writes it) as form values, for the page's Load config."""
    from mindone_lora_plugin.train.flags.config_file import read_config

    real = guard.resolve(path, "config file", must_exist=True)
    values = read_config(real, train_parser())
    return {k: (v if isinstance(v, bool) else " ".join(map(str, v)) if isinstance(v, list) else str(v))
            for k, v in values.items() if k not in HIDDEN}


def output_dir(argv: list[str]) -> str:
    """The ``--output_dir`` of a validated argument list (validate made it a confined absolute path)."""
    return argv[argv.index("--output_dir") + 1]


def _holds_run(folder: str) -> bool:
    from mindone_lora_plugin.train.events import LOG_FILE

    return any(os.path.exists(os.path.join(folder, n)) for n in ("ui_run.json", LOG_FILE))


def _check_batch(values: dict, actions: dict, errors: dict) -> None:
    """A batch larger than the image folder fails right after Start: say so at Check."""
    if "train_batch_size" in errors:
        return
    try:
        batch = int(str(values.get("train_batch_size") or actions["train_batch_size"].default).strip())
    except (TypeError, ValueError, KeyError):
        return
    for dest in ("train_data_dir", "instance_data_dir"):
        folder = str(values.get(dest) or "")
        if dest in errors or not os.path.isdir(folder):
            continue
        count = 0
        for _, dirs, names in os.walk(folder):
            count += sum(n.lower().endswith(IMAGE_EXT) for n in names)
            if count >= batch:
                break
        if count < batch:
            errors["train_batch_size"] = (f"--train_batch_size {batch} is larger than the {count} image(s) in "
                                          f"{_flag(actions[dest])}; lower it or add images")


def _path_dests(actions: dict, values: dict, guard) -> list[str]:
    """The flags whose given value is a path the UI must confine."""
    found = []
    for dest, action in actions.items():
        value = str(values.get(dest) or "").strip()
        if not value or _kind(action) == "bool" or dest == "logging_dir":
            continue
        if dest == "dataset_name":  # a path, or the name of a dataset in the offline cache
            if os.path.isabs(value) or value.startswith(("~", ".")) or os.path.exists(os.path.join(guard.root, value)):
                found.append(dest)
        elif dest in PATH_FIELDS or PATHISH.search(dest):
            found.append(dest)
    return found


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string


def to_toml(argv: list[str], parser=None) -> str:
    """A TOML config of the given ``train`` arguments: one ``dest = value`` line per flag, typed as the parser types."""
    parser = parser or train_parser()
    with contextlib.redirect_stderr(io.StringIO()):
        args = parser.parse_args(argv)
    given = {a.dest for a in _actions(parser).values() for o in a.option_strings if o in argv}
    lines = ["# mindone-lora train config (keys are the flag names without --); written by mindone-lora ui"]
    for dest in sorted(given):
        lines.append(f"{dest} = {_toml_value(getattr(args, dest))}")
    return "\n".join(lines) + "\n"
