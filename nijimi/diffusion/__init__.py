"""The diffusion core: schedules, the forward process and losses, the denoiser wrapper, guidance and samplers.

schedules.py (β, ᾱ, σ, sampling σ's) → forward.py (noising, targets, loss) → denoiser.py (network → D(x, σ)) →
guidance.py (classifier-free guidance) → samplers.py (the sampling loops; noise.py supplies their randomness);
explain.py draws the schedules.
"""
