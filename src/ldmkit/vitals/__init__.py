"""Vital signs of latent diffusion training (../shared/spec/ldm-metrics-guide.md)."""
