"""Stage 2: the gender and image-quality CNNs, their training, ensemble scoring and the filter."""
