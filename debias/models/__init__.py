"""Models: the convolutional VAE / DB-VAE and how a trained one is loaded from a run directory."""

from debias.models.vae import ConvVAE, VAEConfig, vae_loss

__all__ = ["ConvVAE", "VAEConfig", "vae_loss"]
