"""``ldmkit export RUN OUT``: a trained run as diffusers model directories.

Writes the EMA weights as ``OUT/unet`` (``LdmkitUNet``) or ``OUT/transformer`` (diffusers' own
``DiTTransformer2DModel``, unconditional as its class 0), ``OUT/scheduler`` (``DDIMScheduler`` matching
ldmkit's schedule), ``OUT/vae`` (the run's diffusers ``AutoencoderKL`` as it was, or ldmkit's own
as ``LdmkitAutoencoder``), each loadable with diffusers' ``from_pretrained`` from safetensors,
and the calibrated scale as the VAE's ``scaling_factor``, where diffusers users look for it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ldmkit.config import from_dict
from ldmkit.errors import CheckpointError, LdmkitError
from ldmkit.models.diffusers_vae import CONFIG_FILE, is_diffusers_vae
from ldmkit.platform.files import check_no_links
from ldmkit.run.layout import AE_DIR
from ldmkit.sampling.generate import parameterization


def export_diffusers(run_dir: str | Path, out: str | Path) -> Path:
    try:
        from ldmkit.models.diffusers_export import (
            LdmkitAutoencoder,
            LdmkitUNet,
            discrete_scheduler,
            dit_to_diffusers,
        )
    except ImportError:
        raise LdmkitError("export needs diffusers: pip install diffusers") from None
    from ldmkit.sampling.trained import load_for_sampling

    run_dir, out = Path(run_dir), Path(out)
    check_no_links(run_dir)  # what is exported comes from inside the run
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"'{out}' is not empty; choose a new directory for the export")
    cfg_dict, step, model, ae, scale, backbone = load_for_sampling(run_dir)
    cfg = from_dict(cfg_dict)
    if cfg.diffusion.objective == "flow":
        raise LdmkitError("export writes diffusers' DDIM scheduler, which has no flow-matching "
                          "prediction type; sample the run with `ldmkit sample` instead")
    args = backbone["args"]
    if backbone["type"] == "dit":
        dit_to_diffusers(model, **args).save_pretrained(out / "transformer",
                                                        safe_serialization=True)
    else:
        unet = LdmkitUNet(**{"sample_size" if k == "latent_size" else k: v
                             for k, v in args.items()})
        unet.net.load_state_dict(model.state_dict())
        unet.save_pretrained(out / "unet", safe_serialization=True)
    discrete_scheduler(parameterization(cfg)).save_pretrained(out / "scheduler")
    source = run_dir / AE_DIR
    if is_diffusers_vae(source):
        shutil.copytree(source, out / "vae", ignore=shutil.ignore_patterns("*.bin", "*.png"))
        config = json.loads((out / "vae" / CONFIG_FILE).read_text())
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
