"""A small SD1.x text-to-image LoRA training script for this project's tests of ``mindone-lora run``.

Written for these tests (not taken from mindone). It touches LoRA only through the seams mindone's
``examples/diffusers/text_to_image/train_text_to_image_lora.py`` uses, so ``mindone-lora run`` meets it exactly as it
meets mindone's script: its flags are named as in mindone's LoRA guide (``--lora_rank``, ...);
``unet.add_adapter(LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian", target_modules=[to_k, ...]))``;
the optimized parameters are ``filter(lambda p: p.requires_grad, unet.get_parameters())``; a ``TrainStep`` subclass
from ``mindone.diffusers.training_utils``; a learning-rate list from ``get_scheduler`` that is read with
``optimizer.get_lr()`` after every step; ``StableDiffusionPipeline.save_lora_weights`` with
``convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))`` in ``checkpoint-N`` folders and at the end.
The data is an imagefolder (``metadata.jsonl`` with ``file_name`` and ``text``), read without ``datasets``.
"""

import argparse
import json
import os

import mindspore as ms
import numpy as np
from mindone.diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from mindone.diffusers.optimization import get_scheduler
from mindone.diffusers.training_utils import TrainStep, set_seed
from mindone.diffusers.utils import convert_state_dict_to_diffusers
from mindone.peft import LoraConfig
from mindone.peft.utils import get_peft_model_state_dict
from mindone.transformers import CLIPTextModel
from mindspore import mint, nn
from mindspore.amp import StaticLossScaler
from PIL import Image
from transformers import CLIPTokenizer


def parse_args():
    p = argparse.ArgumentParser(description="SD1.x text-to-image LoRA (test script with mindone's seams)")
    p.add_argument("--pretrained_model_name_or_path", type=str, required=True)
    p.add_argument("--train_data_dir", type=str, required=True)
    p.add_argument("--output_dir", type=str, default="sd-model-finetuned-lora")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--train_batch_size", type=int, default=1)
    p.add_argument("--max_train_steps", type=int, default=2)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--lr_scheduler", type=str, default="constant")
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--lora_rank", type=int, default=4, help="the dimension of the LoRA update matrices")
    p.add_argument("--gradient_checkpointing", action="store_true", help="as mindone's script: recompute the UNet")
    p.add_argument("--mode", choices=("graph", "pynative"), default="graph",
                   help="MindSpore mode (mindone's scripts always use GRAPH_MODE)")
    return p.parse_args()


def load_examples(folder, resolution, tokenizer):
    with open(os.path.join(folder, "metadata.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    pixels, ids = [], []
    for row in rows:
        image = Image.open(os.path.join(folder, row["file_name"])).convert("RGB").resize((resolution, resolution))
        pixels.append(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
        ids.append(tokenizer(row["text"], max_length=tokenizer.model_max_length, padding="max_length",
                             truncation=True, return_tensors="np").input_ids[0])
    return np.stack(pixels), np.stack(ids).astype(np.int32)


class TrainStepForSDLoRA(TrainStep):
    def __init__(self, vae, text_encoder, unet, optimizer, noise_scheduler, args, length_of_dataloader):
        super().__init__(unet, optimizer, StaticLossScaler(65536), args.max_grad_norm, 1,
                         gradient_accumulation_kwargs=dict(length_of_dataloader=length_of_dataloader))
        self.unet = self.model
        self.vae = vae
        self.vae_scaling_factor = vae.config.scaling_factor
        self.text_encoder = text_encoder
        self.noise_scheduler = noise_scheduler
        self.num_train_timesteps = noise_scheduler.config.num_train_timesteps

    def forward(self, pixel_values, input_ids):
        latents = self.vae.diag_gauss_dist.sample(self.vae.encode(pixel_values)[0]) * self.vae_scaling_factor
        noise = mint.randn_like(latents, dtype=latents.dtype)
        timesteps = mint.randint(0, self.num_train_timesteps, (latents.shape[0],)).long()
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps).to(latents.dtype)
        encoder_hidden_states = self.text_encoder(input_ids)[0]
        model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = mint.nn.functional.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss = self.scale_loss(loss)
        return loss, model_pred


def save_lora(unet, save_directory):
    unet_lora_state_dict = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(save_directory=save_directory, unet_lora_layers=unet_lora_state_dict,
                                              safe_serialization=True)


def main():
    args = parse_args()
    if args.mode == "graph":
        ms.set_context(mode=ms.GRAPH_MODE, jit_syntax_level=ms.STRICT)
    else:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    if args.seed is not None:
        set_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)

    model = args.pretrained_model_name_or_path
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    for m in (unet, vae, text_encoder):
        for p in m.get_parameters():
            p.requires_grad = False

    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    unet_lora_config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                  target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    unet.add_adapter(unet_lora_config)

    pixels, input_ids = load_examples(args.train_data_dir, args.resolution, tokenizer)
    batches = max(1, len(pixels) // args.train_batch_size)

    lr_scheduler = get_scheduler(args.lr_scheduler, args.learning_rate, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps)
    lora_layers = list(filter(lambda p: p.requires_grad, unet.get_parameters()))
    optimizer = nn.AdamWeightDecay(lora_layers, learning_rate=lr_scheduler)
    train_step = TrainStepForSDLoRA(vae, text_encoder, unet, optimizer, noise_scheduler, args, batches).set_train()

    rng = np.random.default_rng(args.seed)
    global_step = 0
    while global_step < args.max_train_steps:
        pick = rng.choice(len(pixels), size=args.train_batch_size, replace=False)
        loss, _ = train_step(ms.Tensor(pixels[pick]), ms.Tensor(input_ids[pick]))
        if train_step.sync_gradients:
            global_step += 1
            if global_step % args.checkpointing_steps == 0:
                save_path = os.path.join(args.output_dir, f"checkpoint-{global_step}")
                os.makedirs(save_path, exist_ok=True)
                save_lora(unet, save_path)
        lr = optimizer.get_lr().numpy().item()  # one entry past the schedule after the last step, as mindone's script
        print(f"step {global_step}: loss {loss.numpy().item():.5f}, lr {lr:.2e}")

    save_lora(unet.to(ms.float32), args.output_dir)


if __name__ == "__main__":
    main()
