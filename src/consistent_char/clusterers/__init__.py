"""Clusterers (`consistent_char.interfaces.Clusterer`) and the paper's choice of cluster.

`FaissKMeansClusterer` is k-means with k-means++ seeding; `choose_cluster` picks the most
cohesive cluster with at least ``d_min_c`` members (or, with a core size, the cluster with the
densest core, `densest_core`).
"""

from consistent_char.clusterers.faiss_kmeans import FaissKMeansClusterer, kmeans_plusplus
from consistent_char.clusterers.selection import (
    ClusterChoice,
    choose_cluster,
    cohesion,
    densest_core,
)

__all__ = [
    "ClusterChoice",
    "FaissKMeansClusterer",
    "choose_cluster",
    "cohesion",
    "densest_core",
    "kmeans_plusplus",
]
