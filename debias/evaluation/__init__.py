"""Evaluation metrics: a classifier's accuracy per group, and the quality of generated images."""
