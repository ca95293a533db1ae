"""Datasets, augmentation, losses, the training loop and metrics."""
