"""Densities over the latents and what is built on them: rarity for the audit, the novelty score, its conformal
calibration, the fitted detector, the encoding of images into latents, and reconstruction-error heatmaps."""
