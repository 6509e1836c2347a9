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

Conventions: vectors are rows; the rotated vector is ``x @ rotation``; a code
decodes to ``concat_j(codebooks[j, code_j]) @ rotation.T``. Because R is
orthogonal, ||q - decode(code)||^2 = sum_j ||(q R)_j - codebooks[j, code_j]||^2,
which is what asymmetric distance computation (ADC) evaluates from per-query
lookup tables of shape (m, 256) without decoding any impostor. Those squared
distances plug straight into the RBF rule (eqs. 2-3 of the paper).

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
