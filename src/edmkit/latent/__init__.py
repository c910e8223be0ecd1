"""Latent spaces: the ``Encoder`` seam between images and what a network sees (pixels, a diffusers VAE)."""
