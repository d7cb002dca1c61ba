"""The FLUX VAE."""
