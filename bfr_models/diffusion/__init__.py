"""Diffusion priors for face restoration: ``schedule`` (DDPM schedule, respacing), ``lowpass`` (Φ_N), ``samplers`` (DR2, low-frequency pseudo targets, DiffBFR TEM polish)."""
