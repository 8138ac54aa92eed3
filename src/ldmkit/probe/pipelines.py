"""A local diffusers pipeline as the probe measures it: its denoiser called at any noise level,
its VAE, its prompt encoders and its own sampler.

``load_base`` reads ``model_index.json`` first and refuses, in one line, what it cannot probe
(no such directory, another pipeline class, diffusers missing, a component that does not
load), then loads with ``local_files_only=True``: nothing is downloaded. One ``Family`` per
kind of denoiser says how it is called, written once:

- ``unet``: ``StableDiffusionPipeline`` (1.x, 2.x) and ``StableDiffusionXLPipeline`` (its
  pooled embedding and size ids as ``added_cond_kwargs``, as its pipeline passes them);
- ``sd3``: ``StableDiffusion3Pipeline``'s ``SD3Transformer2DModel`` (timestep ``1000 sigma``);
- ``flux``: ``FluxPipeline``'s ``FluxTransformer2DModel``: latents packed 2x2 into tokens, the
  timestep ``sigma``, the guidance distilled into an embedding (no unconditional pass).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldmkit.errors import CheckpointError, ConfigError
from ldmkit.platform.files import read_json
from ldmkit.probe.schedules import NoisePath, discrete_path, flow_path

INSTALL = "pip install 'ldmkit[probe]'"
FAMILIES = {"StableDiffusionPipeline": "unet", "StableDiffusionXLPipeline": "unet",
            "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
DEFAULT_GUIDANCE = {"unet": 7.5, "sd3": 7.0, "flux": 3.5}
Text = dict[str, torch.Tensor]


def diffusers_module() -> Any:
    """diffusers, or the one-line error saying what to install."""
    try:
        import diffusers
    except ImportError:
        raise ConfigError(f"ldmkit probe needs diffusers, transformers and peft: {INSTALL}") \
            from None
    return diffusers


def pipeline_index(base: Path) -> dict[str, Any]:
    """``BASE/model_index.json``; a one-line error for what is not a pipeline ldmkit probes."""
    index = base / "model_index.json"
    if not base.is_dir():
        raise CheckpointError(f"base '{base}' is not a directory; pass a diffusers pipeline "
                              "directory (with model_index.json), saved by save_pretrained or "
                              "downloaded with `hf download`")
    if not index.is_file():
        raise CheckpointError(f"'{base}' has no model_index.json: it is not a diffusers pipeline "
                              "directory; pass the folder that holds model_index.json")
    try:
        content = read_json(index)
        name = content.get("_class_name")
    except (OSError, ValueError, AttributeError):
        raise CheckpointError(f"'{index}' is not a JSON object; restore the pipeline's "
                              "model_index.json") from None
    if name not in FAMILIES:
        raise CheckpointError(f"'{base}' is a {str(name)[:60]}; ldmkit probes "
                              f"{', '.join(FAMILIES)}")
    return content


@dataclass
class Family:
    """How one kind of pipeline's denoiser is called. ``pipe`` is the diffusers pipeline."""

    pipe: Any
    name: str
    path: NoisePath = field(init=False)

    def __post_init__(self) -> None:
        config = dict(self.pipe.scheduler.config)
        if self.name == "unet":
            self.path = discrete_path(config, self.pipe.scheduler.alphas_cumprod)
        else:
            self.path = flow_path(config, None, 1000.0 if self.name == "sd3" else 1.0)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet if self.name == "unet" else self.pipe.transformer

    @property
    def vae_scale(self) -> int:
        return int(self.pipe.vae_scale_factor)

    def default_resolution(self) -> int:
        size = getattr(self.denoiser.config, "sample_size", None)
        if self.name == "flux" or not isinstance(size, int):
            return int(getattr(self.pipe, "default_sample_size", 128)) * self.vae_scale
        return size * self.vae_scale

    def passes(self, guidance: float) -> int:
        """Network evaluations per sampling step: two under classifier-free guidance (SD,
        SDXL, SD3 above 1), one for Flux, whose guidance is an embedding."""
        return 2 if self.name != "flux" and guidance > 1 else 1

    def at_resolution(self, resolution: int) -> None:
        """Flux's shift depends on the number of image tokens it samples."""
        if self.name == "flux":
            tokens = (resolution // (2 * self.vae_scale)) ** 2
            self.path = flow_path(dict(self.pipe.scheduler.config), tokens, 1.0)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Text:
        """The text inputs of ``prompts``, batch first, as the pipeline computes them."""
        pipe, device = self.pipe, self.denoiser.device
        if self.name == "unet" and hasattr(pipe, "text_encoder_2"):
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device=device,
                                                      num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            return {"embeds": embeds, "pooled": pooled}
        if self.name == "unet":
            return {"embeds": pipe.encode_prompt(prompts, device, 1, False)[0]}
        if self.name == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None,
                                                      prompt_3=None, device=device,
                                                      do_classifier_free_guidance=False)
            return {"embeds": embeds, "pooled": pooled}
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None,
                                                      device=device)
        return {"embeds": embeds, "pooled": pooled, "text_ids": text_ids}

    def __call__(self, z_t: torch.Tensor, timestep: torch.Tensor, text: Text,
                 guidance: float) -> torch.Tensor:
        """The denoiser's output ``[B, C, h, w]`` for ``z_t`` at ``timestep`` given ``text``."""
        net, dtype = self.denoiser, self.denoiser.dtype
        z_t, embeds = z_t.to(dtype), text["embeds"].to(dtype)
        if self.name == "unet":
            extra = None
            if "pooled" in text:
                size = z_t.shape[-1] * self.vae_scale
                ids = self.pipe._get_add_time_ids(
                    (size, size), (0, 0), (size, size), dtype,
                    text_encoder_projection_dim=self.pipe.text_encoder_2.config.projection_dim)
                extra = {"text_embeds": text["pooled"].to(dtype),
                         "time_ids": ids.to(z_t.device).expand(len(z_t), -1)}
            return net(z_t, timestep, encoder_hidden_states=embeds, added_cond_kwargs=extra,
                       return_dict=False)[0]
        if self.name == "sd3":
            return net(hidden_states=z_t, timestep=timestep.to(dtype), encoder_hidden_states=embeds,
                       pooled_projections=text["pooled"].to(dtype), return_dict=False)[0]
        b, c, h, w = z_t.shape
        ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, z_t.device, dtype)
        scale = torch.full((b,), guidance, device=z_t.device, dtype=torch.float32) \
            if net.config.guidance_embeds else None
        out = net(hidden_states=self.pipe._pack_latents(z_t, b, c, h, w),
                  timestep=timestep.to(dtype), guidance=scale,
                  pooled_projections=text["pooled"].to(dtype), encoder_hidden_states=embeds,
                  txt_ids=text["text_ids"], img_ids=ids, return_dict=False)[0]
        return self.pipe._unpack_latents(out, h * self.vae_scale, w * self.vae_scale,
                                         self.vae_scale)

    @torch.no_grad()
    def sample(self, prompts: list[str], start: torch.Tensor, steps: int, guidance: float
               ) -> torch.Tensor:
        """The pipeline's own sampler from the noise ``start [B, C, h, w]`` (unit variance):
        the scaled latents it ends at ``[B, C, h, w]``."""
        b, c, h, w = start.shape
        size = h * self.vae_scale
        latents = start.to(self.denoiser.device, self.denoiser.dtype)
        if self.name == "flux":
            latents = self.pipe._pack_latents(latents, b, c, h, w)
        out = self.pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance,
                        latents=latents, height=size, width=size, output_type="latent").images
        if self.name == "flux":
            out = self.pipe._unpack_latents(out, size, size, self.vae_scale)
        return out.float()

    def vae_factors(self) -> tuple[float, float]:
        """The VAE's ``scaling_factor`` and ``shift_factor`` (0 when it has none)."""
        config = self.pipe.vae.config
        return float(config.scaling_factor), float(getattr(config, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] ``[B, 3, H, W]`` -> scaled latents (posterior means: fixed)."""
        scale, shift = self.vae_factors()
        vae = self.pipe.vae
        mean = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean.float()
        return (mean - shift) * scale

    def decoder_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> what the VAE decodes (``final_latent_stats``' units)."""
        scale, shift = self.vae_factors()
        return z.float() / scale + shift

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] ``[B, 3, H, W]``."""
        vae = self.pipe.vae
        latents = self.decoder_latents(z).to(vae.device, vae.dtype)
        return vae.decode(latents, return_dict=False)[0].float().clamp(-1, 1).cpu()


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """diffusers' and transformers' load-time chatter (progress bars, hints) off."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = [log.get_verbosity() for log in (diffusers_logging, transformers_logging)]
    for log in (diffusers_logging, transformers_logging):
        log.set_verbosity_error()
        log.disable_progress_bar()
    try:
        yield
    finally:
        for log, level in zip((diffusers_logging, transformers_logging), levels, strict=True):
            log.set_verbosity(level)
            log.enable_progress_bar()


def dtype_of(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that has it, else fp16 there; fp32 on a CPU."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _dtype_key() -> str:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (deprecation_utils' ``_resolve_dtype``)."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def load_base(base: Path, device: torch.device, dtype: torch.dtype) -> Family:
    """The pipeline at ``base``, on ``device`` in ``dtype``, loaded from local files only."""
    index = pipeline_index(base)
    name = index["_class_name"]
    # components saved as None ([null, null]: SD3 without its T5) are passed as None, which
    # from_pretrained does not do by itself
    absent = {key: None for key, value in index.items()
              if isinstance(value, list) and value and value[0] is None}
    diffusers = diffusers_module()
    try:
        import peft  # noqa: F401 (load_lora_weights needs it)
    except ImportError:
        raise ConfigError(f"ldmkit probe loads LoRAs through peft: {INSTALL}") from None
    with quiet_diffusers():
        try:
            pipe = getattr(diffusers, name).from_pretrained(base, local_files_only=True,
                                                            **{_dtype_key(): dtype}, **absent)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
            detail = " ".join(str(exc).split())[:200]
            raise CheckpointError(f"the pipeline '{base}' does not load ({type(exc).__name__}: "
                                  f"{detail}); check that every folder model_index.json names is "
                                  "there with its config and weights") from None
    pipe.to(device)
    if dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows fp16, as its pipeline knows
    pipe.set_progress_bar_config(disable=True)
    return Family(pipe, FAMILIES[name])
