"""ldmkit: latent diffusion models whose vital signs are measured, logged and interpreted."""

__version__ = "0.1.0"
__all__ = ["VitalsMonitor", "normalize_timesteps"]


def __getattr__(name: str):  # lazy, so `ldmkit --help` does not import torch
    if name in __all__:
        from ldmkit.vitals import observer

        return getattr(observer, name)
    raise AttributeError(f"module 'ldmkit' has no attribute {name!r}")
