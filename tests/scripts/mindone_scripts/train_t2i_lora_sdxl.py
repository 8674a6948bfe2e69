"""A small SDXL text-to-image LoRA training script for this project's tests of ``mindone-lora run``.

Written for these tests (not taken from mindone). It touches LoRA only through the seams mindone's
``examples/diffusers/text_to_image/train_text_to_image_lora_sdxl.py`` uses: ``unet.add_adapter(LoraConfig(...))``
with ``to_k/to_q/to_v/to_out.0``; with ``--train_text_encoder`` also ``text_encoder_one.add_adapter(cfg)`` and
``text_encoder_two.add_adapter(cfg)`` with ``q_proj/k_proj/v_proj/out_proj``; parameter names prefixed per text
encoder before the optimizer is built (both encoders share names); the optimized parameters are the
``requires_grad`` ones of the UNet (+ both text encoders); a ``TrainStep`` subclass that encodes the prompts inside
the step (penultimate hidden states of both encoders, pooled output of the second, SDXL ``add_time_ids``);
``get_scheduler`` + ``optimizer.get_lr()``; and ``StableDiffusionXLPipeline.save_lora_weights`` with
``convert_state_dict_to_diffusers(get_peft_model_state_dict(...))`` per model.

``--optimize_unet_only`` makes it a broken script on purpose: it adds adapters to the text encoders but leaves their
parameters out of the optimizer (what ``mindone-lora run`` must refuse).
"""

import argparse
import json
import os

import mindspore as ms
import numpy as np
from mindone.diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from mindone.diffusers.optimization import get_scheduler
from mindone.diffusers.training_utils import TrainStep, set_seed
from mindone.diffusers.utils import convert_state_dict_to_diffusers
from mindone.peft import LoraConfig
from mindone.peft.utils import get_peft_model_state_dict
from mindone.transformers import CLIPTextModel, CLIPTextModelWithProjection
from mindspore import mint, nn
from mindspore.amp import StaticLossScaler
from PIL import Image
from transformers import CLIPTokenizer


def parse_args():
    p = argparse.ArgumentParser(description="SDXL text-to-image LoRA (test script with mindone's seams)")
    p.add_argument("--pretrained_model_name_or_path", type=str, required=True)
    p.add_argument("--train_data_dir", type=str, required=True)
    p.add_argument("--output_dir", type=str, default="sd-model-finetuned-lora")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--train_batch_size", type=int, default=1)
    p.add_argument("--max_train_steps", type=int, default=2)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--lr_scheduler", type=str, default="constant")
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--lora_rank", type=int, default=4, help="the dimension of the LoRA update matrices")
    p.add_argument("--train_text_encoder", action="store_true", help="also train both text encoders")
    p.add_argument("--optimize_unet_only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("graph", "pynative"), default="graph",
                   help="MindSpore mode (mindone's scripts always use GRAPH_MODE)")
    return p.parse_args()


def load_examples(folder, resolution, tokenizers):
    with open(os.path.join(folder, "metadata.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    pixels, ids_one, ids_two, time_ids = [], [], [], []
    for row in rows:
        image = Image.open(os.path.join(folder, row["file_name"])).convert("RGB")
        original = (image.height, image.width)
        image = image.resize((resolution, resolution))
        pixels.append(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
        ids = [t(row["text"], max_length=t.model_max_length, padding="max_length", truncation=True,
                 return_tensors="np").input_ids[0] for t in tokenizers]
        ids_one.append(ids[0])
        ids_two.append(ids[1])
        time_ids.append(original + (0, 0) + (resolution, resolution))  # original size, crop top-left, target size
    return (np.stack(pixels), np.stack(ids_one).astype(np.int32), np.stack(ids_two).astype(np.int32),
            np.asarray(time_ids, dtype=np.float32))


def prefix_parameter_names(model, prefix):
    for name, param in model.parameters_and_names():
        param.name = f"{prefix}.{name}"
    return model


class TrainStepForSDXLLoRA(TrainStep):
    def __init__(self, vae, text_encoder_one, text_encoder_two, unet, optimizer, noise_scheduler, args,
                 length_of_dataloader):
        super().__init__(unet, optimizer, StaticLossScaler(65536), args.max_grad_norm, 1,
                         gradient_accumulation_kwargs=dict(length_of_dataloader=length_of_dataloader))
        self.unet = self.model
        self.vae = vae
        self.vae_scaling_factor = vae.config.scaling_factor
        self.text_encoder_one = text_encoder_one
        self.text_encoder_two = text_encoder_two
        self.noise_scheduler = noise_scheduler
        self.num_train_timesteps = noise_scheduler.config.num_train_timesteps

    def forward(self, pixel_values, input_ids_one, input_ids_two, add_time_ids):
        latents = self.vae.diag_gauss_dist.sample(self.vae.encode(pixel_values)[0]) * self.vae_scaling_factor
        noise = mint.randn_like(latents, dtype=latents.dtype)
        timesteps = mint.randint(0, self.num_train_timesteps, (latents.shape[0],)).long()
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps).to(latents.dtype)
        out_one = self.text_encoder_one(input_ids_one, output_hidden_states=True)
        out_two = self.text_encoder_two(input_ids_two, output_hidden_states=True)
        prompt_embeds = mint.cat([out_one[-1][-2], out_two[-1][-2]], dim=-1)
        pooled_prompt_embeds = out_two[0]
        model_pred = self.unet(noisy_latents, timesteps, prompt_embeds,
                               added_cond_kwargs={"text_embeds": pooled_prompt_embeds, "time_ids": add_time_ids},
                               return_dict=False)[0]
        loss = mint.nn.functional.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss = self.scale_loss(loss)
        return loss, model_pred


def save_lora(unet, text_encoder_one, text_encoder_two, train_text_encoder, save_directory):
    unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    te_one_layers = te_two_layers = None
    if train_text_encoder:
        te_one_layers = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(text_encoder_one, save_embedding_layers=False))
        te_two_layers = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(text_encoder_two, save_embedding_layers=False))
    StableDiffusionXLPipeline.save_lora_weights(save_directory, unet_lora_layers=unet_layers,
                                                text_encoder_lora_layers=te_one_layers,
                                                text_encoder_2_lora_layers=te_two_layers)


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
    tokenizer_one = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    tokenizer_two = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2")
    text_encoder_one = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    text_encoder_two = CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    for m in (vae, text_encoder_one, text_encoder_two, unet):
        for p in m.get_parameters():
            p.requires_grad = False

    unet_lora_config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                  target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    unet.add_adapter(unet_lora_config)
    if args.train_text_encoder:
        text_lora_config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                      target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
        text_encoder_one.add_adapter(text_lora_config)
        text_encoder_two.add_adapter(text_lora_config)

    data = load_examples(args.train_data_dir, args.resolution, (tokenizer_one, tokenizer_two))
    batches = max(1, len(data[0]) // args.train_batch_size)

    lr_scheduler = get_scheduler(args.lr_scheduler, args.learning_rate, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps)
    text_encoder_one = prefix_parameter_names(text_encoder_one, "text_encoder_one")
    text_encoder_two = prefix_parameter_names(text_encoder_two, "text_encoder_two")
    params_to_optimize = list(filter(lambda p: p.requires_grad, unet.get_parameters()))
    if args.train_text_encoder and not args.optimize_unet_only:
        params_to_optimize += list(filter(lambda p: p.requires_grad, text_encoder_one.get_parameters()))
        params_to_optimize += list(filter(lambda p: p.requires_grad, text_encoder_two.get_parameters()))
    optimizer = nn.AdamWeightDecay(params_to_optimize, learning_rate=lr_scheduler)
    train_step = TrainStepForSDXLLoRA(vae, text_encoder_one, text_encoder_two, unet, optimizer, noise_scheduler, args,
                                      batches).set_train()

    rng = np.random.default_rng(args.seed)
    global_step = 0
    while global_step < args.max_train_steps:
        pick = rng.choice(len(data[0]), size=args.train_batch_size, replace=False)
        loss, _ = train_step(*(ms.Tensor(d[pick]) for d in data))
        if train_step.sync_gradients:
            global_step += 1
            if global_step % args.checkpointing_steps == 0:
                save_path = os.path.join(args.output_dir, f"checkpoint-{global_step}")
                os.makedirs(save_path, exist_ok=True)
                save_lora(unet, text_encoder_one, text_encoder_two, args.train_text_encoder, save_path)
        lr = optimizer.get_lr().numpy().item()
        print(f"step {global_step}: loss {loss.numpy().item():.5f}, lr {lr:.2e}")

    save_lora(unet.to(ms.float32), text_encoder_one, text_encoder_two, args.train_text_encoder, args.output_dir)


if __name__ == "__main__":
    main()
