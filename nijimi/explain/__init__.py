"""Explain views: pictures and plots of what the diffusion maths does to a user's own images (``nijimi explain``)."""
