"""Product quantisation (PQ) and optimised PQ (OPQ) of impostors, in JAX.

Impostor networks (Lebedev et al., "Impostor Networks for Fast Fine-Grained
Recognition", Sec. 3.2 "Impostor compression" and Sec. 4 "Impostors
compression", Fig. 2 right) store M impostors c_1..c_M of dimension d. With
product quantisation (Jegou et al. 2011) each impostor becomes m bytes: the
rotated vector c R is split into m sub-vectors of d/m dimensions, and each
sub-vector is replaced by the index of its nearest centroid in a per-subspace
codebook of 256 centroids. OPQ (Ge et al. 2013, non-parametric version) also
learns the orthogonal rotation R by alternating PQ training with an orthogonal
Procrustes update.

The package: `codes` (the quantizer type, encoding, decoding and asymmetric distance
computation, with the conventions), `kmeans` (per-subspace k-means) and `training`
(PQ and OPQ).

Example:
  pq = train_opq(centers, num_subspaces=16)        # 16 bytes per impostor
  codes = encode(pq, centers)                       # (M, 16) uint8
  sq = adc_squared_distances(pq, queries, codes)    # (B, M) float32
  log_probs = rbf_log_probs_from_sq_distances(sq, labels, sigma, num_classes)

The paper trains the 'fixed' scheme against the compressed impostors, which are
``decode(pq, encode(pq, centers))`` (see `reconstruct`).
"""

from fgjax.quantize.codes import (INIT_METHODS, MAX_CENTROIDS, OPQ_INIT_ROTATIONS,
                                  ProductQuantizer, adc_squared_distances,
                                  adc_squared_distances_from_tables, adc_tables, decode,
                                  encode, nbytes, rbf_log_probs_from_sq_distances,
                                  reconstruct)
from fgjax.quantize.training import train_opq, train_pq

__all__ = [
    "INIT_METHODS", "MAX_CENTROIDS", "OPQ_INIT_ROTATIONS", "ProductQuantizer",
    "adc_squared_distances", "adc_squared_distances_from_tables", "adc_tables",
    "decode", "encode", "nbytes", "rbf_log_probs_from_sq_distances", "reconstruct",
    "train_opq", "train_pq",
]
