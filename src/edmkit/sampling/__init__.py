"""Seeds to images: generation with guidance, rejection sampling, the super-resolution cascade."""
