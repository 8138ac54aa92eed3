"""``ldmkit export RUN OUT``: a trained run as diffusers model directories.

Writes the EMA weights as ``OUT/unet`` (``LdmkitUNet``) or ``OUT/transformer`` (diffusers' own
``DiTTransformer2DModel``, unconditional as its class 0), ``OUT/scheduler`` (``DDIMScheduler`` matching
ldmkit's schedule), ``OUT/vae`` (the run's diffusers ``AutoencoderKL`` as it was, or ldmkit's own
as ``LdmkitAutoencoder``), each loadable with diffusers' ``from_pretrained`` from safetensors,
and the calibrated scale as the VAE's ``scaling_factor``, where diffusers users look for it. A
text-conditional run adds its encoder (``OUT/text_encoder``, and ``OUT/tokenizer`` for a frozen
Hugging Face one), as a diffusers pipeline keeps them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ldmkit.config import from_dict
from ldmkit.diffusion.registry import OBJECTIVES
from ldmkit.errors import CheckpointError, LdmkitError
from ldmkit.models.diffusers_vae import CONFIG_FILE, is_diffusers_vae
from ldmkit.models.registry import export_backbone
from ldmkit.platform.files import check_plain_tree, read_json
from ldmkit.run.layout import RunDir
from ldmkit.sampling.generate import parameterization


def export_diffusers(run_dir: str | Path, out: str | Path) -> Path:
    try:
        from ldmkit.models.diffusers_export import LdmkitAutoencoder, discrete_scheduler
    except ImportError:
        raise LdmkitError("export needs diffusers: pip install diffusers") from None
    from ldmkit.sampling.trained import load_for_sampling

    run_dir, out = Path(run_dir), Path(out)
    check_plain_tree(run_dir)  # what is exported comes from inside the run
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"'{out}' is not empty; choose a new directory for the export")
    cfg_dict, step, model, ae, scale, backbone = load_for_sampling(run_dir)
    cfg = from_dict(cfg_dict)
    objective = OBJECTIVES[cfg.diffusion.objective]
    if objective.prediction_type is None:
        raise LdmkitError(f"export writes diffusers' DDIM scheduler, which has no prediction "
                          f"type for the {objective.name} objective; sample the run with "
                          "`ldmkit sample` instead")
    export_backbone(backbone, model, out)
    discrete_scheduler(parameterization(cfg)).save_pretrained(out / "scheduler")
    source = RunDir(run_dir).autoencoder
    if is_diffusers_vae(source):
        shutil.copytree(source, out / "vae", ignore=shutil.ignore_patterns("*.bin", "*.png"))
        config = read_json(out / "vae" / CONFIG_FILE)
        config["scaling_factor"] = scale
        (out / "vae" / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    else:
        a = cfg.autoencoder
        vae = LdmkitAutoencoder(ae.in_channels, a.base_channels, tuple(a.channel_mult),
                                a.latent_channels, scale)
        vae.net.load_state_dict(ae.state_dict())
        vae.save_pretrained(out / "vae", safe_serialization=True)
    (out / "ldmkit.json").write_text(json.dumps({"source": str(run_dir), "step": step,
                                                 "latent_scale_factor": scale}, indent=2))
    return out
