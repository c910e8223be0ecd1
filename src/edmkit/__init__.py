"""edmkit: EDM / EDM2 pixel-space diffusion models — train, sample, evaluate."""

__version__ = "0.1.0"
