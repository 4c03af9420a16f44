"""Datasets, losses and training regimes."""
