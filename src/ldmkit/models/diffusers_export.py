"""ldmkit's networks as diffusers models, so diffusers' own ``from_pretrained`` loads a run.

``LdmkitUNet`` takes diffusers' discrete timesteps ``0..T-1`` and maps them to ldmkit's
continuous ``t = k / (T - 1)``; ``dit_to_diffusers`` writes ldmkit's DiT into diffusers' own
``DiTTransformer2DModel`` (the same architecture, Peebles & Xie 2023, and the same time
embedding of ``k``), so loading it needs diffusers only; ``discrete_scheduler`` gives the DDIM
scheduler whose ``alphas_cumprod[k]`` is ldmkit's schedule at that ``t``, so a diffusers
sampling loop reproduces ldmkit's model. ``LdmkitAutoencoder`` does the same for ldmkit's own
stage 1 (a diffusers VAE is exported as itself). A text-conditional backbone (``LdmkitUNet``,
``LdmkitDiT``) takes diffusers' ``encoder_hidden_states``; its encoder is written beside it as
pipelines keep it: ldmkit's built-in one as ``LdmkitTextEncoder``, a frozen Hugging Face one as
it was. Importing this module needs diffusers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import ConfigMixin, DDIMScheduler, DiTTransformer2DModel, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.unets.unet_2d import UNet2DOutput

from ldmkit.diffusion.parameterization import Parameterization
from ldmkit.diffusion.schedule import CosineSchedule
from ldmkit.models.autoencoder import Autoencoder
from ldmkit.models.dit import DiT
from ldmkit.models.hf_text import encoder_info
from ldmkit.models.text import ByteTextEncoder, EncodedText, Text, tokenize
from ldmkit.models.unet import UNet


def discrete_alphas_cumprod(schedule: CosineSchedule, steps: int) -> torch.Tensor:
    """``alpha_bar`` at ``t = k / (steps - 1)``, ``k = 0..steps-1`` (float64)."""
    t = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    return torch.sigmoid(schedule.logsnr(t))




def discrete_scheduler(param: Parameterization, steps: int = 1000) -> DDIMScheduler:
    """diffusers' DDIM scheduler on the VP schedule's discretisation, with the objective's
    ``prediction_type`` (eps, v and x0 objectives on the cosine schedule)."""
    alphas_cumprod = discrete_alphas_cumprod(param.schedule, steps)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    betas = (1 - alphas_cumprod / previous).tolist()
    return DDIMScheduler(num_train_timesteps=steps, trained_betas=betas, clip_sample=False,
                         prediction_type=param.spec.prediction_type, set_alpha_to_one=True,
                         timestep_spacing="trailing")


def _caption(net: UNet | DiT, hidden: torch.Tensor | None, mask: torch.Tensor | None,
             added: dict | None) -> Text | None:
    """diffusers' ``encoder_hidden_states [B, M, D]``, ``encoder_attention_mask [B, M]`` and
    ``added_cond_kwargs["text_embeds"] [B, P]`` (SDXL's pooled embedding) as ldmkit's ``Text``.
    A frozen encoder's go through the backbone's input (models/text.py: ``EncodedText``); the
    built-in encoder's (``LdmkitTextEncoder``) carry its start token, and a caption with no
    token after it is the empty one, which adds nothing."""
    if hidden is None:
        return None
    mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device) \
        if mask is None else mask.bool()
    pooled = (added or {}).get("text_embeds")
    if isinstance(net.text, EncodedText):
        return net.text(len(hidden), hidden.device, context=hidden, context_mask=mask,
                        pooled=pooled)
    present = mask[:, 1:].any(1).to(hidden.dtype)
    return Text(hidden, mask, hidden[:, 0] * present[:, None] if pooled is None else pooled,
                present)


def _denoise(wrapper: ModelMixin, x: torch.Tensor, timestep: torch.Tensor | float | int,
             labels: torch.Tensor | None, hidden: torch.Tensor | None,
             mask: torch.Tensor | None, added: dict | None) -> torch.Tensor:
    """The wrapped network at diffusers' discrete ``timestep`` (``t = k / (T - 1)``)."""
    steps = torch.as_tensor(timestep, device=x.device, dtype=torch.float32)
    t = steps.expand(x.shape[0]) / (wrapper.config.num_train_timesteps - 1)
    return wrapper.net.denoise(x, t, labels, _caption(wrapper.net, hidden, mask, added))


def _without_builtin_encoder(net: UNet | DiT) -> None:
    """The built-in encoder is exported on its own (``LdmkitTextEncoder``), as diffusers
    pipelines keep ``text_encoder`` apart from the denoiser."""
    if isinstance(net.text, ByteTextEncoder):
        net.text = None


class LdmkitUNet(ModelMixin, ConfigMixin):
    """ldmkit's UNet behind diffusers' ``UNet2DModel`` call convention (``class_labels`` for a
    class-conditional one, as ``UNet2DModel`` takes them; ``num_classes`` is the null class),
    and ``UNet2DConditionModel``'s for a text-conditional one (``encoder_hidden_states``,
    ``encoder_attention_mask``, ``added_cond_kwargs={"text_embeds": pooled}``)."""

    @register_to_config
    def __init__(self, in_channels: int = 4, sample_size: int = 8, base_channels: int = 64,
                 channel_mult: tuple[int, ...] = (1, 2), num_res_blocks: int = 2,
                 attention_resolutions: tuple[int, ...] = (4,), num_heads: int = 4,
                 dropout: float = 0.0, num_train_timesteps: int = 1000,
                 num_classes: int | None = None, text_encoder: str | None = None,
                 text_width: int = 128, text_depth: int = 2, text_max_length: int = 64,
                 text_context_dim: int | None = None, text_pooled_dim: int | None = None):
        super().__init__()
        self.net = UNet(in_channels, sample_size, base_channels, list(channel_mult),
                        num_res_blocks, list(attention_resolutions), num_heads, dropout,
                        num_classes, text_encoder, text_width, text_depth, text_max_length,
                        text_context_dim, text_pooled_dim)
        _without_builtin_encoder(self.net)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                encoder_hidden_states: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None,
                added_cond_kwargs: dict | None = None, return_dict: bool = True
                ) -> UNet2DOutput | tuple[torch.Tensor]:
        out = _denoise(self, sample, timestep, class_labels, encoder_hidden_states,
                       encoder_attention_mask, added_cond_kwargs)
        return UNet2DOutput(sample=out) if return_dict else (out,)


class LdmkitDiT(ModelMixin, ConfigMixin):
    """ldmkit's text-conditional DiT (cross-attention in each block, as PixArt-alpha) behind
    diffusers' transformer call convention; diffusers' ``DiTTransformer2DModel`` has no
    cross-attention, so unlike the class-conditional DiT it is not exported as that."""

    @register_to_config
    def __init__(self, in_channels: int = 4, sample_size: int = 8, patch_size: int = 2,
                 hidden_size: int = 256, depth: int = 6, num_heads: int = 4,
                 num_classes: int | None = None, text_encoder: str | None = None,
                 text_width: int = 128, text_depth: int = 2, text_max_length: int = 64,
                 text_context_dim: int | None = None, text_pooled_dim: int | None = None,
                 num_train_timesteps: int = 1000):
        super().__init__()
        self.net = DiT(in_channels, sample_size, patch_size, hidden_size, depth, num_heads,
                       num_classes, text_encoder, text_width, text_depth, text_max_length,
                       text_context_dim, text_pooled_dim)
        _without_builtin_encoder(self.net)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor | float | int,
                encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None,
                added_cond_kwargs: dict | None = None, return_dict: bool = True
                ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        out = _denoise(self, hidden_states, timestep, None, encoder_hidden_states,
                       encoder_attention_mask, added_cond_kwargs)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


class LdmkitTextEncoder(ModelMixin, ConfigMixin):
    """ldmkit's built-in byte-level encoder as a pipeline's ``text_encoder``: ``tokenize``
    (UTF-8 bytes; no vocabulary file) then ``forward(input_ids)`` -> ``Text`` (``context``
    is the denoiser's ``encoder_hidden_states``, ``mask`` its ``encoder_attention_mask``)."""

    @register_to_config
    def __init__(self, width: int = 128, depth: int = 2, max_length: int = 64):
        super().__init__()
        self.net = ByteTextEncoder(width, depth, max_length)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return tokenize(texts, self.config.max_length)

    def forward(self, input_ids: torch.Tensor) -> Text:
        return self.net(len(input_ids), input_ids.device, tokens=input_ids)


class LdmkitAutoencoder(ModelMixin, ConfigMixin):
    """ldmkit's KL autoencoder behind diffusers' ``AutoencoderKL`` encode/decode convention."""

    @register_to_config
    def __init__(self, in_channels: int = 1, base_channels: int = 32,
                 channel_mult: tuple[int, ...] = (1, 2, 2), latent_channels: int = 4,
                 scaling_factor: float = 1.0):
        super().__init__()
        self.net = Autoencoder(in_channels, base_channels, list(channel_mult), latent_channels)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        post = self.net.encode(x)
        dist = DiagonalGaussianDistribution(torch.cat([post.mean, post.logvar], dim=1))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        out = self.net.decode(z)
        return DecoderOutput(sample=out) if return_dict else (out,)


def dit_to_diffusers(model: DiT, in_channels: int, latent_size: int, patch_size: int,
                     hidden_size: int, depth: int, num_heads: int,
                     num_classes: int | None = None) -> DiTTransformer2DModel:
    """``model``'s weights in diffusers' class, which takes the discrete step ``k = 999 t``.

    diffusers' DiT always takes class labels (its null class, for guidance, is
    ``num_classes``, as ours) and gives each block its own copy of the time and label
    embeddings: the shared ones are copied into every block (the label table with its gain),
    and the unconditional model becomes one class whose label embedding is zero (pass
    ``class_labels = zeros``).
    """
    target = DiTTransformer2DModel(
        num_attention_heads=num_heads, attention_head_dim=hidden_size // num_heads,
        in_channels=in_channels, out_channels=in_channels, num_layers=depth,
        sample_size=latent_size, patch_size=patch_size, activation_fn="gelu-approximate",
        num_embeds_ada_norm=num_classes or 1, norm_eps=1e-6)
    source = model.state_dict()
    labels = model.label_emb.rows() if num_classes else torch.zeros(2, hidden_size)
    weights = {"pos_embed.proj.weight": source["patchify.weight"],
               "pos_embed.proj.bias": source["patchify.bias"]}
    for key in ("weight", "bias"):
        weights[f"proj_out_1.{key}"] = source[f"modulation_out.{key}"]
        weights[f"proj_out_2.{key}"] = source[f"out.{key}"]
    for i in range(depth):
        ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = theirs + "norm1.emb."
        weights[emb + "class_embedder.embedding_table.weight"] = labels
        for key in ("weight", "bias"):
            weights[f"{emb}timestep_embedder.linear_1.{key}"] = source[f"time_mlp.0.{key}"]
            weights[f"{emb}timestep_embedder.linear_2.{key}"] = source[f"time_mlp.2.{key}"]
            weights[f"{theirs}norm1.linear.{key}"] = source[f"{ours}modulation.{key}"]
            weights[f"{theirs}attn1.to_out.0.{key}"] = source[f"{ours}proj.{key}"]
            weights[f"{theirs}ff.net.0.proj.{key}"] = source[f"{ours}mlp.0.{key}"]
            weights[f"{theirs}ff.net.2.{key}"] = source[f"{ours}mlp.2.{key}"]
            for name, part in zip(("to_q", "to_k", "to_v"), source[f"{ours}qkv.{key}"].chunk(3),
                                  strict=True):
                weights[f"{theirs}attn1.{name}.{key}"] = part
    target.load_state_dict(weights)
    return target


PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # never copied: the export is safetensors


def _text_components(model: UNet | DiT, args: dict, out: Path) -> dict:
    """A text model's encoder beside its denoiser, as pipelines keep them: the built-in one as
    ``out/text_encoder`` (``LdmkitTextEncoder``), a frozen one's directory and tokenizer
    copied as they were (``out/text_encoder``, ``out/tokenizer``: transformers loads them;
    pickled weights left out). The denoiser's arguments, the encoder's path replaced by where
    it now is."""
    encoder = args.get("text_encoder")
    if not encoder:
        return args
    if encoder == "builtin":
        text = LdmkitTextEncoder(args["text_width"], args["text_depth"], args["text_max_length"])
        text.net.load_state_dict(model.text.state_dict())
        text.save_pretrained(out / "text_encoder", safe_serialization=True)
        return args
    info = encoder_info(encoder)
    for name, source in (("text_encoder", info.path), ("tokenizer", info.tokenizer)):
        (out / name).mkdir(parents=True, exist_ok=True)
        for path in source.iterdir():
            if path.is_file() and not path.is_symlink() and path.suffix not in PICKLES:
                shutil.copyfile(path, out / name / path.name)
    return {**args, "text_encoder": "text_encoder"}


def _weights(model: UNet | DiT) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()
            if not (isinstance(model.text, ByteTextEncoder) and k.startswith("text."))}


def export_unet(model: UNet, args: dict, out: Path) -> None:
    """``out/unet``: the UNet as ``LdmkitUNet`` (diffusers' ``UNet2DModel`` call convention,
    or ``UNet2DConditionModel``'s for a text model, its encoder beside it)."""
    args = _text_components(model, args, out)
    unet = LdmkitUNet(**{"sample_size" if k == "latent_size" else k: v for k, v in args.items()})
    unet.net.load_state_dict(_weights(model))
    unet.save_pretrained(out / "unet", safe_serialization=True)


def export_dit(model: DiT, args: dict, out: Path) -> None:
    """``out/transformer``: the DiT as diffusers' own ``DiTTransformer2DModel``, or a text one
    as ``LdmkitDiT``, its encoder beside it."""
    if not args.get("text_encoder"):
        dit_to_diffusers(model, **args).save_pretrained(out / "transformer",
                                                        safe_serialization=True)
        return
    args = _text_components(model, args, out)
    dit = LdmkitDiT(**{"sample_size" if k == "latent_size" else k: v for k, v in args.items()})
    dit.net.load_state_dict(_weights(model))
    dit.save_pretrained(out / "transformer", safe_serialization=True)
