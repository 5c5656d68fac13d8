"""consistent_char: consistent characters for text-to-image diffusion models.

An implementation of "The Chosen One" (Avrahami et al., arXiv 2311.10093).
"""

__version__ = "0.1.0"
