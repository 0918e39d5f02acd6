"""The diffusion core: schedules, the forward process and losses, the denoiser and guidance, samplers.

schedules.py (β, ᾱ, σ, sampling σ's) → forward.py (noising, targets, loss) → guidance.py (network → denoiser
D(x, σ), classifier-free guidance) → samplers.py (the sampling loops and their names; noise.py supplies their
randomness); explain.py draws the schedules.
"""
