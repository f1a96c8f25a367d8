"""Shared plumbing of the Oh-LoRA pipeline: on-disk layout, weight sources, atomic I/O, CLI conventions.

The models live in the stage packages (``stylegan``, ``cnn``, ``segmentation``, ``stylegan_modified``);
this package holds only what every stage needs the same way.
"""
