"""The training loop of ``mindone-lora train``: LoRA for any installed architecture (SD1.x/2.x, SDXL and FLUX.1
built in), talking to LoRA only through plugin hooks and to the model family only through its architecture object.

Order of work: check arguments → load the models → add adapters (hook) → pick trainable parameters (hook) → build
the optimizer and compiled step → resume if asked → train, checkpoint, validate → save every format (hook).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np

from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.train import resume
from mindone_lora_plugin.train.flags.settings import check_writable, start_distributed, training_metadata, write_hparams
from mindone_lora_plugin.train.sampling import validation_images

log = logging.getLogger("mindone_lora.train")


@dataclass
class TrainResult:
    output_dir: str
    files: list[str]
    global_step: int
    losses: list[float]
    checkpoints: list[str] = field(default_factory=list)
    validation_images: list[str] = field(default_factory=list)
    loss_curve: str | None = None
    models: object = None  # the trained Models bundle (in-process callers and the demo use it)
    skipped_images: int = 0
    validation_losses: list = field(default_factory=list)  # [step, loss]
    samples: list[str] = field(default_factory=list)


class Trainer:
    """One training run. ``args`` is the namespace ``mindone-lora train`` parses (see ``train/flags/training.py``)."""

    def __init__(self, args):
        self.args = args
        self.rank, self.world = 0, 1
        self.is_main = True

    # ------------------------------------------------------------------ set-up

    def run(self) -> TrainResult:
        args = self.args
        from mindone_lora_plugin.plugins import get_plugin_manager
        from mindone_lora_plugin.train.data import setup as data_setup
        from mindone_lora_plugin.train.flags.checks import check_flags

        self.pm = get_plugin_manager()
        checked = check_flags(args, self.pm)  # every flag, before any model is loaded
        self.architecture, self.arch, self.resolution = checked.info.architecture, checked.arch, checked.resolution
        self.sizer, self.masks, self.options = checked.sizer, checked.masks, checked.options
        self.formats, self.exact_format = checked.formats, checked.exact_format
        self.features = checked.features  # EMA, validation loss, caches, buckets, samples, save cadence, ...
        strategy = self.pm.get_strategy(self.options.strategy)
        self._setup_runtime()
        if self.is_main:
            check_writable(args.output_dir)
        self.output_name = args.output_name or os.path.basename(os.path.abspath(args.output_dir)) or "lora"

        self._load_models()
        strategy.check(self.models, self.options)  # before data loading: a wrong strategy fails fast
        from mindone_lora_plugin.train.flags.rules import check_fused_targets

        check_fused_targets(self.arch, strategy, self.models, self.options,
                            set(self.formats) | {self.exact_format.name})  # LoHa/LoKr on FLUX's fused qkv
        self._is_dreambooth = bool(args.instance_data_dir)
        examples, prior = data_setup.load_data(self)
        examples = self.features.select_examples(self, examples)
        self.plan = data_setup.make_plan(self, examples, prior)
        self.adapted = self.pm.add_adapters(self.models, self.options)
        self.groups = self.pm.trainable_parameters(self.models, self.options)
        self._log_parameter_summary()
        self._build_optimizer()
        self._build_step()
        self.features.setup(self)  # in order: validation-loss inputs are encoded before the caches are filled
        start = resume.maybe_resume(self)
        return self.train_loop(start)

    def _setup_runtime(self):
        args = self.args
        from mindone_lora_plugin.runtime.process import current_mode, resolve_mode, setup

        self.seed = args.seed if args.seed is not None else 0

        target = setup(args.device_target, args.mode, seed=self.seed, model_path=args.pretrained_model_name_or_path)
        notice = resolve_mode(args.mode, target, args.pretrained_model_name_or_path)[1]
        if notice:
            self.say(notice)
        args.mode = current_mode()
        import mindspore as ms

        if args.distributed:
            self.rank, self.world = start_distributed()
            self.is_main = self.rank == 0
        from mindone_lora_plugin.runtime.precision import weight_dtype

        self.weight_dtype = weight_dtype(args.mixed_precision, ms.get_context("device_target"))

    def _load_models(self):
        import mindspore as ms

        from mindone_lora_plugin.model_files import model_folder
        from mindone_lora_plugin.models import load_models

        folder = model_folder(self.args)
        self.models = load_models(folder, dtype=self.weight_dtype if self.weight_dtype != ms.float32 else None,
                                  variant=self.args.variant)
        for cell in self.models.values():
            cell.set_train(False)
            for p in cell.get_parameters():
                p.requires_grad = False
        self.parts = self.arch.load_training_parts(folder, self.args, self.models, self.weight_dtype)

    def _log_parameter_summary(self):
        trainable = sum(int(np.prod(p.shape)) for g in self.groups for p in g["params"])
        total = sum(int(np.prod(p.shape)) for cell in self.models.values() for p in cell.get_parameters())
        modules = ", ".join(f"{c}: {len(v)} modules" for c, v in self.adapted.items())
        self.say(f"LoRA strategy '{self.options.strategy}' ({modules}); trainable parameters {trainable:,} of "
                 f"{total:,} ({100.0 * trainable / max(total, 1):.3f}%)")

    def _build_optimizer(self):
        args = self.args
        import mindspore as ms
        from mindone.diffusers.optimization import get_scheduler

        accum = max(1, args.gradient_accumulation_steps)
        updates_per_epoch = max(1, self.plan.batches_per_epoch // accum)
        if args.max_train_steps is None:
            args.max_train_steps = args.num_train_epochs * updates_per_epoch
        self.max_steps = args.max_train_steps
        self.num_epochs = -(-self.max_steps // updates_per_epoch)
        self.updates_per_epoch = updates_per_epoch
        scale = args.train_batch_size * accum * self.world if args.scale_lr else 1

        def schedule(base):
            lrs = get_scheduler(args.lr_scheduler, base * scale, num_warmup_steps=args.lr_warmup_steps * self.world,
                                num_training_steps=self.max_steps * self.world)
            lrs = [float(x) for x in (lrs if isinstance(lrs, (list, tuple)) else [lrs] * self.max_steps)]
            return lrs + [lrs[-1]]  # the optimizer reads one entry past the last step when logging

        from mindone_lora_plugin.train import optimizers  # --optimizer_type, --optimizer_args, LoRA+

        self.optimizer, self.lr_schedules = optimizers.build(args, self.groups, schedule,
                                                             self.pm.get_strategy(self.options.strategy))
        self._ms = ms

    def _build_step(self):
        from mindspore import nn

        from mindone_lora_plugin.architectures.context import TrainingContext
        from mindone_lora_plugin.train.data.setup import StepInputs
        from mindone_lora_plugin.train.step import VaeEncode, build_steps

        te_trained = {c for c in self.adapted if c != self.arch.denoiser}
        self.train_text = bool(te_trained)
        if self.args.gradient_checkpointing:  # the UNet, and the text encoders that train
            from mindone_lora_plugin.runtime.recompute import enable_for_training

            counts = enable_for_training(self.models, [self.arch.denoiser] + sorted(te_trained))
            self.say("gradient checkpointing: " + ", ".join(f"{c} {n} blocks" for c, n in counts.items()))
        self.conditioner = self.arch.text_conditioner(self.models)
        self.inputs = StepInputs(self.args, self.parts, VaeEncode(self.parts.vae), self.conditioner, self.train_text,
                                 bool(self.plan.prior))
        self.context = TrainingContext(self.args, self.models, self.parts, self.conditioner, self.train_text,
                                       self.inputs)  # all a family sees of the run
        self.loss_cell = self.arch.make_loss(self.context)
        self.loss_cell.masked = bool(self.args.masked_loss)
        self.loss_cell.set_train(True)
        reducer = None
        if self.world > 1:
            reducer = nn.DistributedGradReducer(self.optimizer.parameters, mean=True, degree=self.world)
        accum = max(1, self.args.gradient_accumulation_steps)
        self.micro_step, self.update_step = build_steps(self.loss_cell, self.optimizer, self.args.max_grad_norm,
                                                        accum, reducer)

    def _weights_finite(self) -> bool:
        return all(np.isfinite(p.asnumpy()).all() for g in self.groups for p in g["params"])

    # ------------------------------------------------------------------ the loop

    def train_loop(self, start: dict) -> TrainResult:
        """The training loop from ``start`` (the resume point), once everything is set up; ``run`` ends with it."""
        from tqdm.auto import tqdm

        from mindone_lora_plugin.train.events import RunEvents

        args = self.args
        global_step, losses = start["global_step"], list(start["losses"])
        result = TrainResult(args.output_dir, [], global_step, losses, skipped_images=self.skipped,
                             models=self.models)
        self.writer = self._tensorboard()
        if self.is_main and args.validation_prompt and global_step == 0 and getattr(args, "_validate_before", False):
            result.validation_images.append(validation_images(self, "before"))
        self.say(f"training {self.max_steps} steps ({self.num_epochs} epochs × {self.updates_per_epoch} steps, "
                 f"batch {args.train_batch_size} × {max(1, args.gradient_accumulation_steps)} accumulation × "
                 f"{self.world} worker(s)) in {args.mode} mode on {self._ms.get_context('device_target')}")
        self.bar = tqdm(total=self.max_steps, initial=global_step, desc="steps", disable=not self.is_main,
                        dynamic_ncols=True)
        self.events = RunEvents(args.output_dir, enabled=self.is_main).install()  # SIGTERM → stop
        self.events.start(global_step, self.max_steps)
        self.last_checkpoint = None
        t0 = time.time()
        while global_step < self.max_steps:
            global_step += 1
            loss = self._update(global_step)
            losses.append(loss)
            self._report(global_step, loss)
            if self.events.stop_requested and global_step < self.max_steps:  # a graceful stop: checkpoint, return
                return self._stop(result, global_step, losses)
            self._periodic(result, global_step, losses)
        return self._finish(result, global_step, losses, time.time() - t0)

    def _update(self, step: int) -> float:
        """Optimizer update number ``step`` (from 1): its micro-steps; their mean loss (non-finite ends the run)."""
        accum = max(1, self.args.gradient_accumulation_steps)
        epoch, in_epoch = divmod(step - 1, self.updates_per_epoch)
        micro_losses = []
        for k in range(accum):
            inputs = self.micro_inputs(epoch, in_epoch * accum + k, (step - 1) * accum + k)
            cell = self.update_step if k == accum - 1 else self.micro_step
            started = time.perf_counter()
            micro_losses.append(float(cell(*inputs).asnumpy()))
            self._note_shape(inputs[0].shape, time.perf_counter() - started)
        loss = float(np.mean(micro_losses))
        if not np.isfinite(loss):
            self._end_loop()
            kept = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                    else "no checkpoint was written yet")
            raise LoraError(f"the loss became {loss} at step {step}; training stopped and nothing more was "
                            f"saved ({kept}); lower --learning_rate or check the data")
        return loss

    def _end_loop(self) -> None:
        self.bar.close()
        self.events.uninstall()  # the signal handlers go with the loop, also when it fails

    def _report(self, step: int, loss: float) -> None:
        """The progress bar, scalars and log line of update ``step``, then every feature's per-step work."""
        lr = self.lr_schedules[next(iter(self.lr_schedules))][step - 1]
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        self.bar.update(1)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
        log.info("step %d loss %.6f lr %.3e", step, loss, lr)
        self.features.after_step(self, step, self.writer)  # EMA, validation loss, samples, save cadence
        self.events.step(step, self.max_steps, loss, lr)

    def _stop(self, result: TrainResult, step: int, losses: list[float]) -> TrainResult:
        self.bar.close()
        result.global_step, result.checkpoints = step, [resume.save_checkpoint(self, step, losses)]
        self.events.end("stopped", step)
        self.events.uninstall()
        self.say(f"stopped at step {step}; resume with --resume_from_checkpoint latest")
        return result

    def _periodic(self, result: TrainResult, step: int, losses: list[float]) -> None:
        """The checkpoint and validation images due after update ``step`` (after the last one, the end writes
        them)."""
        args = self.args
        if step >= self.max_steps:
            return
        if args.checkpointing_steps and step % args.checkpointing_steps == 0:
            if not self._weights_finite():  # never write a poisoned checkpoint over a good one
                self._end_loop()
                raise LoraError(f"the LoRA weights became non-finite at step {step}; training stopped "
                                f"(the last good checkpoint is {self.last_checkpoint or 'none'}); lower "
                                f"--learning_rate")
            self.last_checkpoint = resume.save_checkpoint(self, step, losses) or self.last_checkpoint
        epochs, in_epoch = divmod(step, self.updates_per_epoch)
        if self.is_main and args.validation_prompt and (
                (in_epoch == 0 and epochs % max(1, args.validation_epochs) == 0)
                or (args.validation_steps and step % args.validation_steps == 0)):
            result.validation_images.append(validation_images(self, f"step-{step:06d}"))

    def _finish(self, result: TrainResult, global_step: int, losses: list[float], elapsed: float) -> TrainResult:
        """The final files, the features' finish, the last checkpoint, hparams, loss curve and images."""
        args, writer = self.args, self.writer
        self.bar.close()
        result.global_step = global_step
        if self.is_main:
            result.files = self.pm.save_weights(self.models, self.options, args.output_dir, self.formats,
                                                self.output_name, training_metadata(self, global_step))
        result.files += self.features.finish(self, global_step, writer)  # final validation loss, <name>-ema files
        for name, value in self.features.results().items():  # validation losses, samples
            setattr(result, name, value)
        if self.is_main:
            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                resume.save_checkpoint(self, global_step, losses)
            from mindone_lora_plugin.train.checkpoint import complete_checkpoints

            result.checkpoints = [p for _, p in complete_checkpoints(args.output_dir)]  # after pruning
            write_hparams(args, os.path.join(args.output_dir, "hparams.yml"))
            from mindone_lora_plugin.train.visuals import save_loss_curve

            result.loss_curve = save_loss_curve(losses, os.path.join(args.output_dir, "loss_curve.png"),
                                                f"{self.output_name}: loss per step",
                                                validation=result.validation_losses)
            if args.validation_prompt:
                result.validation_images.append(validation_images(self, "final"))
            self.say(f"trained {global_step} steps in {elapsed:.1f}s; wrote {', '.join(result.files)}")
        if self.world > 1:  # every worker reports, so identical weights across workers can be checked
            digest = resume.weights_digest(self.groups)
            print(f"worker {self.rank}/{self.world}: LoRA weights sha256 {digest}", flush=True)
        if writer is not None:
            writer.close()
        self.events.end("finished", global_step)
        self.events.uninstall()
        return result

    def _note_shape(self, shape, seconds: float) -> None:
        """Log the first step of each batch shape (in graph mode it includes that shape's compile)."""
        seen = self.__dict__.setdefault("_shapes_seen", set())
        if tuple(shape) not in seen:
            seen.add(tuple(shape))
            if self.sizer is not None:
                self.say(f"first step at latent shape {tuple(shape)}: {seconds:.1f}s (shape {len(seen)} of "
                         f"{len(self.sizer.used) or '?'}; includes its compile in graph mode)")

    def micro_inputs(self, epoch: int, batch_index: int, micro: int):
        """The model inputs of one micro-step (its batch, noise and adapter-dropout masks seeded by ``micro``)."""
        batch = self.plan.batch(epoch, batch_index % self.plan.batches_per_epoch)
        from mindone_lora_plugin.algorithms.layers import dropout_rates, seed_dropout

        if dropout_rates(self.options):  # the adapter dropout masks of this micro-step, the same after a resume
            seed_dropout(self.seed, micro, self.rank)
        return self.model_inputs(batch, np.random.default_rng([self.seed, micro, self.rank, 101]))

    def model_inputs(self, batch, rng, weighted: bool = True):
        """The compiled step's inputs for ``batch``, every random draw from ``rng`` (validation passes a fixed one):
        the architecture's (:meth:`~mindone_lora_plugin.architectures.base.Architecture.model_inputs`)."""
        return self.arch.model_inputs(self.context, batch, rng, weighted)

    # ------------------------------------------------------------------ validation, logging, metadata

    # ------------------------------------------------------------------ what features see (features/base.FeatureRun)

    def drawing_weights(self):
        return self.features.drawing_weights()

    def draw(self, prompt: str, num_images: int, steps: int, seed: int, **options) -> list:
        from mindone_lora_plugin.train.sampling import generate

        return generate(self, prompt, num_images, steps=steps, seed=seed, **options)

    def metadata(self, global_step: int) -> dict[str, str]:
        return training_metadata(self, global_step)

    def save_lora(self, name: str, metadata: dict) -> list[str]:
        paths = []
        for fmt_name in self.formats:
            folder = self.args.output_dir
            if name not in self.pm.get_format(fmt_name).default_filename(name):  # diffusers: a folder of that name
                folder = os.path.join(folder, name)
                os.makedirs(folder, exist_ok=True)
            paths += self.pm.save_weights(self.models, self.options, folder, [fmt_name], name, metadata)
        return paths

    def save_named(self, name: str, metadata: dict) -> list[str]:
        return self.save_lora(name, metadata) + self.features.on_save(self, name, metadata)

    def log_event(self, kind: str, **fields) -> None:
        events = getattr(self, "events", None)  # train_log.jsonl, which the UI draws
        if events is not None:
            events.write(kind, **fields)

    def _tensorboard(self):
        if self.args.report_to != "tensorboard" or not self.is_main:
            return None
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            log.info("tensorboardX is not installed; no tensorboard scalars (pip install tensorboardX)")
            return None
        return SummaryWriter(os.path.join(self.args.output_dir, self.args.logging_dir))

    def say(self, message: str) -> None:
        if self.is_main:
            log.info(message)
            print(message, flush=True)
