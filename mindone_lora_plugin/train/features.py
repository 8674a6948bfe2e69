"""The training features around the step: EMA, validation loss, sample prompts and save cadence.

The trainer calls these few methods at fixed points (see ``train/trainer.py``); everything they need lives here, so
each feature's state is saved into checkpoints and restored on resume in one place.
"""

from __future__ import annotations

import contextlib
import os

from mindone_lora_plugin.train import cadence, feature_args


class TrainingFeatures:
    def __init__(self, trainer):
        """Check the flags (before any model loads)."""
        self.t = trainer
        self.args = trainer.args
        feature_args.check(self.args)
        self.ema = None
        self.validation = None
        self.validation_losses: list[list] = []  # [step, loss]
        self.prompts = []
        if self.args.sample_prompts:
            from mindone_lora_plugin.train.sample_prompts import read_prompts

            self.prompts = read_prompts(self.args.sample_prompts)
        self.samples: list[str] = []

    # ------------------------------------------------------------------ set-up

    def split(self, examples: list) -> list:
        """The training examples, the validation ones taken out (or loaded from --validation_data_dir)."""
        from mindone_lora_plugin.train.validation import split

        train, self.held_out = split(examples, self.args, self.t.seed, self.t.resolution)
        if self.held_out:
            self.t._say(f"validation loss on {len(self.held_out)} image(s); training on {len(train)}")
        return train

    def setup(self) -> None:
        """After the optimizer and step exist: the EMA copy and the fixed validation inputs."""
        if self.args.use_ema:
            from mindone_lora_plugin.train.ema import EMA

            self.ema = EMA([p for g in self.t.groups for p in g["params"]], feature_args.ema_decay(self.args))
        if self.held_out:
            from mindone_lora_plugin.train.validation import ValidationLoss

            seed = self.args.validation_seed if self.args.validation_seed is not None else self.t.seed
            self.validation = ValidationLoss(self.t, self.held_out, seed)

    def image_weights(self):
        """A context in which validation and sample images are drawn (the EMA weights when --use_ema)."""
        return self.ema.swapped() if self.ema is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ each step

    def after_update(self, global_step: int, writer) -> None:
        t, args = self.t, self.args
        if self.ema is not None:
            self.ema.update(global_step)
        if self.validation is not None and args.validate_every_n_steps and \
                global_step % args.validate_every_n_steps == 0:
            self._validate(global_step, writer)
        if not t.is_main:
            return
        from mindone_lora_plugin.train.sample_prompts import draw, is_due

        if self.prompts and is_due(args, global_step, t.updates_per_epoch):
            with self.image_weights():
                self.samples += draw(t, self.prompts, global_step)
        epoch_end = global_step % t.updates_per_epoch == 0
        epoch = global_step // t.updates_per_epoch
        if cadence.due(args.save_every_n_steps, global_step, t.max_steps):
            self._save(cadence.step_name(t.output_name, global_step), global_step)
            if args.save_last_n_steps:
                cadence.prune(args.output_dir, t.output_name, "step",
                              lambda s: s > global_step - args.save_last_n_steps)
        if epoch_end and cadence.due(args.save_every_n_epochs, epoch, t.num_epochs):
            self._save(cadence.epoch_name(t.output_name, epoch), global_step)
            if args.save_last_n_epochs:
                cadence.prune(args.output_dir, t.output_name, "epoch",
                              lambda e: e > epoch - args.save_every_n_epochs * args.save_last_n_epochs)

    def _validate(self, global_step: int, writer) -> float:
        loss = self.validation()
        self.validation_losses.append([global_step, loss])
        self.t._say(f"step {global_step}: validation loss {loss:.6f}")
        if writer is not None:
            writer.add_scalar("val/loss", loss, global_step)
        events = getattr(self.t, "events", None)  # train_log.jsonl, which the UI draws
        if events is not None:
            events.write("val_loss", step=global_step, val_loss=loss)
        return loss

    def _save(self, name: str, global_step: int) -> list[str]:
        from mindone_lora_plugin.train.settings import training_metadata

        metadata = training_metadata(self.t, global_step)
        paths = cadence.save_named(self.t, name, metadata)
        if self.ema is not None:
            with self.ema.swapped():
                paths += cadence.save_named(self.t, name + "-ema", dict(metadata, ss_ema_weights="True"))
        return paths

    # ------------------------------------------------------------------ end, checkpoints, resume

    def finish(self, global_step: int, writer) -> list[str]:
        """After the final files: the final validation loss and the EMA files; return the EMA paths."""
        if self.validation is not None and (not self.validation_losses or self.validation_losses[-1][0] != global_step):
            self._validate(global_step, writer)
        if self.ema is None or not self.t.is_main:
            return []
        from mindone_lora_plugin.train.settings import training_metadata

        with self.ema.swapped():
            return cadence.save_named(self.t, self.t.output_name + "-ema",
                                      dict(training_metadata(self.t, global_step), ss_ema_weights="True"))

    def checkpoint(self, folder: str) -> dict:
        """Write this part of a checkpoint into ``folder``; return what goes into its trainer_state.json."""
        if self.ema is not None:
            from mindone_lora_plugin import safetensors_io
            from mindone_lora_plugin.train.ema import FILE

            safetensors_io.save(self.ema.state(), os.path.join(folder, FILE))
        return {"validation_losses": self.validation_losses, "ema": self.ema is not None}

    def resume(self, folder: str, state: dict) -> None:
        from mindone_lora_plugin.errors import LoraError

        self.validation_losses = [list(x) for x in state.get("validation_losses", [])]
        if self.ema is None:
            return
        from mindone_lora_plugin import safetensors_io
        from mindone_lora_plugin.train.ema import FILE

        path = os.path.join(folder, FILE)
        if not os.path.isfile(path):
            raise LoraError(f"{folder} holds no EMA weights ({FILE}): it was saved without --use_ema; resume "
                            f"without --use_ema or start a new --output_dir")
        tensors, _ = safetensors_io.load(path)
        self.ema.load(tensors)
