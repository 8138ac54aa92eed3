"""The data pipeline: image sources (digits, IDX, folders), stage 1 (the autoencoder that
defines the latent space) and the latent cache that stage 2 trains on."""
