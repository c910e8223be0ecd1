"""The math of one denoiser: preconditioning (EDM Table 1), losses, noise schedules, samplers, guidance, inverse problems,
the noise-aware classifier."""
