"""ldmkit: latent diffusion models whose vital signs are measured, logged and interpreted."""

__version__ = "0.1.0"
