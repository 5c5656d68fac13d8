"""consistent_char: consistent characters for text-to-image diffusion models.

An implementation of "The Chosen One" (Avrahami et al., arXiv 2311.10093): generate, embed,
cluster, keep the most cohesive cluster, refine (tokens + LoRA), repeat until the images agree.
"""

from consistent_char._version import __version__
from consistent_char.config import (
    ClustererConfig,
    ConfigError,
    ConvergenceConfig,
    EmbedderConfig,
    ExtractorConfig,
    GeneratorConfig,
    RefinerConfig,
)
from consistent_char.extractor import IterativeIdentityExtractor, ProgressEvent
from consistent_char.identity import Identity, IdentityError
from consistent_char.interfaces import (
    Clusterer,
    ConvergenceCriterion,
    Embedder,
    ExtractionResult,
    Generator,
    IterationRecord,
    Refiner,
)

__all__ = [
    "__version__",
    "Clusterer",
    "ClustererConfig",
    "ConfigError",
    "ConvergenceConfig",
    "ConvergenceCriterion",
    "Embedder",
    "EmbedderConfig",
    "ExtractionResult",
    "ExtractorConfig",
    "Generator",
    "GeneratorConfig",
    "Identity",
    "IdentityError",
    "IterationRecord",
    "IterativeIdentityExtractor",
    "ProgressEvent",
    "Refiner",
    "RefinerConfig",
]
