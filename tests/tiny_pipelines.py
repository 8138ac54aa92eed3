"""Tiny diffusers pipelines for the probe's tests, built from configs with random weights as
diffusers' own tests build theirs, but with tokenizers that need no file (an in-memory
``tokenizers`` character vocabulary for CLIP, ``ByT5Tokenizer`` for T5), saved with
``save_pretrained`` so ``ldmkit probe`` loads them as it loads a real one: nothing downloads.

16 x 16 images (the digits are 8 x 8), a 2-level VAE (8 x 8 x 4 latents), 32-wide encoders. Each VAE's
``scaling_factor`` is calibrated to the data as a real pipeline's is (1 / std of its latents),
so ``latent/z_std`` is ~1 for a healthy base.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZE = 16
CLIP_LENGTH = 24


def char_tokenizer():
    """CLIP's conventions (start and end tokens, padded with the end token) over characters."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits + " ,.-'":
        vocab[char] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=CLIP_LENGTH)


def clip(projection: bool, seed: int):
    import transformers

    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        vocab_size=len(char_tokenizer()), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=CLIP_LENGTH,
        projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).eval()


def t5():
    import transformers

    torch.manual_seed(3)
    config = transformers.T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                   num_heads=4, decoder_start_token_id=0)
    return transformers.T5EncoderModel(config).eval(), transformers.ByT5Tokenizer()


def vae(shift: float | None = None):
    from diffusers import AutoencoderKL

    torch.manual_seed(4)
    return AutoencoderKL(block_out_channels=[16, 32], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4,
                         norm_num_groups=8, sample_size=SIZE, shift_factor=shift).eval()


def train_vae(pipe, images: torch.Tensor, steps: int, lr: float = 2e-3) -> None:
    """Fit the VAE to the images (reconstruction, a touch of KL): a random decoder renders
    every latent as nearly the same blur, and the copy check compares decoded images."""
    x_all = images.float() / 127.5 - 1
    vae = pipe.vae
    optim = torch.optim.Adam(vae.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(2)
    vae.train()
    for _ in range(steps):
        x = x_all[torch.randint(0, len(x_all), (16,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        loss = (vae.decode(posterior.sample(generator=gen)).sample - x).pow(2).mean() \
            + 1e-6 * posterior.kl().mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
    vae.eval()
    calibrate(pipe, images)


def calibrate(pipe, images: torch.Tensor) -> None:
    """Set the VAE's ``scaling_factor`` to 1 / std of the images' centred latents."""
    with torch.no_grad():
        mean = pipe.vae.encode(images.float() / 127.5 - 1).latent_dist.mean
    shift = pipe.vae.config.shift_factor or 0.0
    pipe.vae.register_to_config(scaling_factor=float(1 / (mean - shift).std()))


SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
            "steps_offset": 1}  # Stable Diffusion's schedulers


def unet(seed: int, context: int, **extra):
    """A 2-level UNet2DConditionModel on 8 x 8 x 4 latents, attending to ``context``-wide
    text at the first level."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=context,
        norm_num_groups=8, attention_head_dim=4, **extra)


def sd_pipeline(images: torch.Tensor):
    """Stable Diffusion 1.x's layout: UNet2DConditionModel, CLIPTextModel, DDIM epsilon."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae(), text_encoder=clip(False, 6),
                                   tokenizer=char_tokenizer(), unet=unet(5, 32),
                                   scheduler=DDIMScheduler(**SD_BETAS, clip_sample=False),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    calibrate(pipe, images)
    return pipe


def sdxl_pipeline(images: torch.Tensor):
    """SDXL's layout: two CLIPs (hidden states concatenated, the second's pooled projection
    and the size ids as ``added_cond_kwargs``), Euler, epsilon."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    net = unet(12, 64, addition_embed_type="text_time", addition_time_embed_dim=8,
               projection_class_embeddings_input_dim=6 * 8 + 16)  # 6 size ids, 16 pooled
    pipe = StableDiffusionXLPipeline(
        vae=vae(), text_encoder=clip(False, 13), tokenizer=char_tokenizer(),
        text_encoder_2=clip(True, 14), tokenizer_2=char_tokenizer(), unet=net,
        scheduler=EulerDiscreteScheduler(**SD_BETAS))
    calibrate(pipe, images)
    return pipe


def sd3_pipeline(images: torch.Tensor):
    """SD3's layout without its optional T5: two CLIPs with projection, an
    SD3Transformer2DModel, flow matching with shift 3."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(7)
    transformer = SD3Transformer2DModel(
        sample_size=SIZE // 2, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
        pooled_projection_dim=32, out_channels=4, pos_embed_max_size=SIZE // 2)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(), text_encoder=clip(True, 8), tokenizer=char_tokenizer(),
        text_encoder_2=clip(True, 9), tokenizer_2=char_tokenizer(), text_encoder_3=None,
        tokenizer_3=None)
    calibrate(pipe, images)
    return pipe


def flux_pipeline(images: torch.Tensor):
    """Flux's layout: CLIPTextModel (pooled) and T5 (sequence), a guidance-distilled
    FluxTransformer2DModel on 2 x 2 packed latents, dynamic shift, a VAE with a shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(10)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=True, axes_dims_rope=[4, 6, 6])
    encoder, tokenizer = t5()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=vae(shift=0.1), text_encoder=clip(False, 11), tokenizer=char_tokenizer(),
        text_encoder_2=encoder, tokenizer_2=tokenizer, transformer=transformer)
    calibrate(pipe, images)
    return pipe


PIPELINES = {"sd": sd_pipeline, "sdxl": sdxl_pipeline, "sd3": sd3_pipeline,
             "flux": flux_pipeline}


def save_pipeline(kind: str, images: torch.Tensor, path: Path) -> Path:
    PIPELINES[kind](images).save_pretrained(path, safe_serialization=True)
    return path


def captioned_digits(root: Path, count: int, offset: int = 0, caption_files: bool = True
                     ) -> Path:
    """``count`` sklearn digits as 32 x 32 RGB PNGs, each captioned "a handwritten <digit>"
    (a .txt beside it, kohya's layout; or one metadata.jsonl, Hugging Face's)."""
    import json

    from sklearn.datasets import load_digits

    digits = load_digits()
    root.mkdir(parents=True, exist_ok=True)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    lines = []
    for i in range(offset, offset + count):
        pixels = (digits.images[i] * 255 / 16).astype(np.uint8)
        image = Image.fromarray(pixels).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        name = f"{i:05d}.png"
        image.convert("RGB").save(root / name)
        caption = f"a handwritten {words[digits.target[i]]}"
        if caption_files:
            (root / name).with_suffix(".txt").write_text(caption)
        else:
            lines.append(json.dumps({"file_name": name, "text": caption}))
    if lines:
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def folder_images(root: Path) -> torch.Tensor:
    """The folder's PNGs as uint8 ``[N, 3, 32, 32]`` (to calibrate a VAE on)."""
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(root.glob("*.png"))]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def encode_folder(pipe, root: Path) -> tuple[torch.Tensor, list[str]]:
    """The folder's images as scaled latents and its .txt captions."""
    images = folder_images(root)
    captions = [p.with_suffix(".txt").read_text() for p in sorted(root.glob("*.png"))]
    with torch.no_grad():
        mean = pipe.vae.encode(images.float() / 127.5 - 1).latent_dist.mean
    return mean * pipe.vae.config.scaling_factor, captions


def _loss(pipe, z0: torch.Tensor, text: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Stable Diffusion's training loss (eps, uniform timestep) on one batch."""
    t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(z0),), generator=gen)
    eps = torch.randn(z0.shape, generator=gen)
    z_t = pipe.scheduler.add_noise(z0, eps, t)
    return (pipe.unet(z_t, t, encoder_hidden_states=text).sample - eps).pow(2).mean()


def _steps(pipe, optim: torch.optim.Optimizer, z: torch.Tensor, text: torch.Tensor, steps: int,
           batch: int, gen: torch.Generator) -> Iterator[int]:
    """Stable Diffusion's training loop on an encoded folder: each step's number after its
    update."""
    for step in range(1, steps + 1):
        rows = torch.randint(0, len(z), (batch,), generator=gen)
        loss = _loss(pipe, z[rows], text[rows], gen)
        optim.zero_grad()
        loss.backward()
        optim.step()
        yield step


def pretrain(pipe, root: Path, steps: int, lr: float = 2e-3, batch: int = 16) -> None:
    """Train the UNet and the text encoder together on a folder: the 'pretrained' base that
    LoRAs fine-tune, whose prompts select what it draws (a random CLIP's states for two
    captions differ by ~10 %, too little to follow)."""
    z, captions = encode_folder(pipe, root)
    gen = torch.Generator().manual_seed(0)
    optim = torch.optim.AdamW([*pipe.unet.parameters(), *pipe.text_encoder.parameters()], lr=lr)
    for _ in range(steps):
        rows = torch.randint(0, len(z), (batch,), generator=gen)
        text = pipe.encode_prompt([captions[i] for i in rows.tolist()], "cpu", 1, False)[0]
        loss = _loss(pipe, z[rows], text, gen)
        optim.zero_grad()
        loss.backward()
        optim.step()
    pipe.unet.eval()
    pipe.text_encoder.eval()


LORA_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                "ff.net.2", "conv1", "conv2", "time_emb_proj"]  # kohya's LoRA-C3Lier's reach


def lora_series(base: Path, root: Path, out: Path, saves: list[int], rank: int = 8,
                lr: float = 1e-2, batch: int = 8, name: str = "tiny") -> dict[str, Path]:
    """Fine-tune a LoRA of the UNet of the pipeline saved at ``base`` on a folder and save it
    after each of ``saves`` steps in two trainers' layouts, the same weights in each:
    ``out/peft/checkpoint-N/`` (diffusers' ``save_lora_weights``, as its dreambooth script)
    and ``out/kohya/NAME-step0000000N.safetensors`` (``convert_state_dict_to_kohya``)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True)
    z, captions = encode_folder(pipe, root)
    with torch.no_grad():
        text = pipe.encode_prompt(captions, "cpu", 1, False)[0]
    unet = pipe.unet
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=LORA_MODULES))
    optim = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(1)
    folders = {"peft": out / "peft", "kohya": out / "kohya"}
    for step in _steps(pipe, optim, z, text, max(saves), batch, gen):
        if step not in saves:
            continue
        state = get_peft_model_state_dict(unet)
        # peft's names as they are (lora_A/lora_B): convert_state_dict_to_diffusers would
        # rename only the attention layers' (to lora.down), a mix load_lora_weights loads half of
        StableDiffusionPipeline.save_lora_weights(
            folders["peft"] / f"checkpoint-{step}", unet_lora_layers=state,
            safe_serialization=True)
        kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
        folders["kohya"].mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in kohya.items()},
                  folders["kohya"] / f"{name}-step{step:08d}.safetensors")
    return folders


def sd3_lora_series(base: Path, root: Path, out: Path, saves: list[int], lr: float = 1e-2,
                    batch: int = 8) -> Path:
    """A LoRA of an SD3 pipeline's transformer, trained on the flow-matching loss with the
    scheduler's shift and saved as diffusers saves it (``checkpoint-N/``)."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusion3Pipeline.from_pretrained(base, local_files_only=True,
                                                    text_encoder_3=None, tokenizer_3=None)
    images = folder_images(root)
    captions = [p.with_suffix(".txt").read_text() for p in sorted(root.glob("*.png"))]
    with torch.no_grad():
        mean = pipe.vae.encode(images.float() / 127.5 - 1).latent_dist.mean
        z = (mean - (pipe.vae.config.shift_factor or 0.0)) * pipe.vae.config.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, device="cpu",
                                                  do_classifier_free_guidance=False)
    net = pipe.transformer
    net.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                               target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    optim = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr)
    gen, shift = torch.Generator().manual_seed(4), pipe.scheduler.config.shift
    for step in range(1, max(saves) + 1):
        rows = torch.randint(0, len(z), (batch,), generator=gen)
        u = torch.rand(batch, generator=gen)
        sigma = (shift * u / (1 + (shift - 1) * u)).view(-1, 1, 1, 1)
        eps = torch.randn(z[rows].shape, generator=gen)
        z_t = (1 - sigma) * z[rows] + sigma * eps
        out_v = net(hidden_states=z_t, timestep=sigma.flatten() * 1000,
                    encoder_hidden_states=embeds[rows], pooled_projections=pooled[rows]).sample
        loss = (out_v - (eps - z[rows])).pow(2).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
        if step in saves:
            StableDiffusion3Pipeline.save_lora_weights(
                out / f"checkpoint-{step}", transformer_lora_layers=get_peft_model_state_dict(net),
                safe_serialization=True)
    return out


def full_series(base: Path, root: Path, out: Path, saves: list[int], lr: float = 1e-3,
                batch: int = 2, name: str = "tiny") -> list[Path]:
    """Fine-tune the whole UNet of the pipeline at ``base`` on a folder and save its weights
    after each of ``saves`` steps as one ``.safetensors`` file named as ai-toolkit names its
    saves (``NAME_000000100``)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True)
    z, captions = encode_folder(pipe, root)
    with torch.no_grad():
        text = pipe.encode_prompt(captions, "cpu", 1, False)[0]
    optim = torch.optim.AdamW(pipe.unet.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(3)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for step in _steps(pipe, optim, z, text, max(saves), batch, gen):
        if step in saves:
            written.append(out / f"{name}_{step:09d}.safetensors")
            save_file({k: v.contiguous() for k, v in pipe.unet.state_dict().items()},
                      written[-1])
    return written
