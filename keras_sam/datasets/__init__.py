"""Data sets for the experiments: `fashion_mnist` (a verified loader) and `label_noise`."""
