"""Datasets (one module per source format), pixel conversion and image files, augmentation, conversion."""
