"""Networks: the stage-1 autoencoder and the stage-2 UNet."""
