"""Stages 5 and 6: the Oh-LoRA conditional StyleGAN variants (v1, v2, v3), their fine-tuning and generation."""
