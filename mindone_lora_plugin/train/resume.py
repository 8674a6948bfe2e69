"""What a run writes into a checkpoint and reads back on ``--resume_from_checkpoint``: the LoRA weights, the
optimizer state, the counters and every training feature's state (the folder mechanics are in
:mod:`~mindone_lora_plugin.train.checkpoint`)."""

from __future__ import annotations

import os

import numpy as np

from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.train import checkpoint
from mindone_lora_plugin.train.flags.settings import replace_options, training_metadata


def lora_settings(trainer) -> dict:
    """The LoRA set-up a checkpoint records; a resume with another one is refused."""
    o = trainer.options
    return {"strategy": o.strategy, "algorithm": o.algorithm, "rank": o.rank, "alpha": o.effective_alpha,
            "targets": o.targets if isinstance(o.targets, str) else sorted(o.targets),
            "conv_rank": o.effective_conv_rank, "conv_alpha": o.effective_conv_alpha,
            "components": sorted(trainer.adapted), "architecture": trainer.architecture}


def maybe_resume(trainer) -> dict:
    """Continue from ``--resume_from_checkpoint``: the weights, optimizer and features' state; the start counters."""
    start = {"global_step": 0, "losses": []}
    if not trainer.args.resume_from_checkpoint:
        return start
    folder = checkpoint.resolve(trainer.args.resume_from_checkpoint, trainer.args.output_dir)
    if folder is None:
        trainer.say(f"no complete checkpoint in {trainer.args.output_dir}; starting from scratch")
        return start
    state = checkpoint.read_state(folder)
    checkpoint.check_compatible(state.get("lora", {}), lora_settings(trainer), folder)
    trainer.pm.load_weights(trainer.models, trainer.options,
                            os.path.join(folder, trainer.exact_format.default_filename(trainer.output_name)))
    load_optimizer(trainer, os.path.join(folder, checkpoint.OPTIMIZER_FILE))
    trainer.features.resume(folder, state)
    trainer.say(f"resumed from {folder} at step {state['global_step']}")
    return {"global_step": int(state["global_step"]), "losses": list(state.get("losses", []))}


def optimizer_state(optimizer) -> dict:
    """The optimizer's state tensors (not the trained parameters), by name."""
    trained = {id(p) for p in optimizer.parameters}
    return {p.name: p for _, p in optimizer.parameters_and_names() if id(p) not in trained}


def schedule_names(optimizer) -> set[str]:
    """Names of the optimizer's learning-rate schedule tensors (one per parameter group)."""
    from mindspore import Parameter, nn

    lr = optimizer.learning_rate
    cells = list(lr) if isinstance(lr, (nn.CellList, list, tuple)) else [lr]
    ids = {id(c) for c in cells if isinstance(c, Parameter)}
    ids |= {id(p) for c in cells if isinstance(c, nn.Cell) for p in c.get_parameters()}
    return {name for name, p in optimizer_state(optimizer).items() if id(p) in ids}


def load_optimizer(trainer, path: str):
    """Moments and step counter from the checkpoint. The learning-rate schedule is not read back: it is a
    function of the flags (``--max_train_steps``, ``--lr_scheduler``, ``--lr_warmup_steps``, ``--learning_rate``)
    and was just built from them, so a resume with the same flags continues exactly and one with other schedule
    flags continues from the saved step on the new schedule (said in one line)."""
    from mindspore import Tensor

    from mindone_lora_plugin import safetensors_io

    tensors, _ = safetensors_io.load(path)
    current = optimizer_state(trainer.optimizer)
    schedule = schedule_names(trainer.optimizer)
    missing = sorted(set(current) - set(tensors) - schedule)
    if missing:
        raise LoraError(f"the checkpoint's optimizer state lacks {len(missing)} tensor(s) (e.g. {missing[0]}); it "
                        f"was made with other settings")
    changed = False
    for name, p in current.items():
        if name in schedule:
            old, new = tensors.get(name), p.asnumpy()
            changed |= old is None or old.shape != new.shape or not np.array_equal(old, new)
            continue
        p.set_data(Tensor(tensors[name], dtype=p.dtype))
    if changed:
        trainer.say(f"the learning-rate schedule differs from the checkpoint's (other --max_train_steps, "
                    f"--lr_scheduler, --lr_warmup_steps or --learning_rate); continuing on the new schedule for "
                    f"{trainer.max_steps} steps")


def save_checkpoint(trainer, global_step: int, losses: list[float]) -> str | None:
    """Write ``checkpoint-<global_step>`` (main worker only); its path."""
    if not trainer.is_main:
        return None
    from mindone_lora_plugin import safetensors_io

    def fill(tmp):
        # the exact file (diffusers; kohya for algorithms diffusers cannot hold) is what a resume reads, so it is
        # always there and always exact (fp32)
        metadata = training_metadata(trainer, global_step)
        first = trainer.exact_format.name
        others = [f for f in trainer.formats if f != first]
        if trainer.options.save_dtype is None:
            trainer.pm.save_weights(trainer.models, trainer.options, tmp, [first] + others, trainer.output_name,
                                    metadata)
        else:
            exact = replace_options(trainer.options, save_dtype=None)
            trainer.pm.save_weights(trainer.models, exact, tmp, [first], trainer.output_name, metadata)
            if others:
                trainer.pm.save_weights(trainer.models, trainer.options, tmp, others, trainer.output_name, metadata)
        safetensors_io.save({k: p.asnumpy() for k, p in optimizer_state(trainer.optimizer).items()},
                            os.path.join(tmp, checkpoint.OPTIMIZER_FILE))
        checkpoint.write_state(tmp, {"global_step": global_step, "epoch": global_step // trainer.updates_per_epoch,
                                     "seed": trainer.seed, "lora": lora_settings(trainer), "losses": losses,
                                     "rng": "derived from (seed, micro-step); see train/data/loader.py and trainer.py",
                                     **trainer.features.checkpoint(tmp)})

    return checkpoint.write(trainer.args.output_dir, global_step, fill, trainer.args.checkpoints_total_limit)


def weights_digest(groups) -> str:
    """sha256 of the trained parameters (names and float32 values), to compare workers."""
    import hashlib

    h = hashlib.sha256()
    for g in groups:
        for p in g["params"]:
            h.update(p.name.encode())
            h.update(np.ascontiguousarray(p.asnumpy(), dtype=np.float32).tobytes())
    return h.hexdigest()
