"""Networks: the stage-1 autoencoder and the stage-2 backbones (UNet, DiT; registry.py)."""
