"""Embedders: images -> (N, D) float32 features (`consistent_char.interfaces.Embedder`).

`DINOv2Embedder` is the paper's choice; `DINOEmbedder`, `CLIPImageEmbedder` and the model-free
`PixelEmbedder` are there for ablations; the two DINOs are `ClsTokenEmbedder`s, which embed
with a vision transformer's CLS token. transformers is imported only when a model loads.
"""

from consistent_char.embedders.clip import CLIPImageEmbedder
from consistent_char.embedders.cls_token import ClsTokenEmbedder
from consistent_char.embedders.dino import DINOEmbedder
from consistent_char.embedders.dinov2 import DINOv2Embedder
from consistent_char.embedders.pixels import PixelEmbedder

__all__ = [
    "CLIPImageEmbedder",
    "ClsTokenEmbedder",
    "DINOEmbedder",
    "DINOv2Embedder",
    "PixelEmbedder",
]
