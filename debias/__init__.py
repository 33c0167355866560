"""debias: find what an image dataset is missing, reweight training towards it, and flag novel inputs."""

__version__ = "0.1.0"
