"""The training loops (VAE / DB-VAE, classifier, GAN, CycleGAN), where each epoch's draws come from (sampling), and
the GAN's differentiable augmentation. Every loop opens its run directory through :mod:`debias.training.run_dir`."""
