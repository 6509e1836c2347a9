"""Losses of fgjax: pure jax/numpy functions (jit-, grad- and vmap-compatible).

* `nca_loss`: impostor-network / NCA loss, Lebedev et al. eq. (4) (custom VJP,
  optionally streamed over the centers in chunks).
* `knn_nca_loss`: the same over each query's k selected impostors (Meyer et al.'s
  k-NN RBF solver; NNGK review eq. 6-7). Both take optional per-impostor weights
  (`center_log_weights`, NNGK review eq. 4 / 7).
* `soft_nca_loss`: the NCA loss with soft impostor labels (the NNGK review's
  continual learning, eq. 13 redistributes them).
* `attachment_loss`: loose-impostor attachment term, eq. (6).
* `center_loss`: Wen et al. 2016.
* `update_class_means`, `elope_loss`: ELoPE Sec. 4, eq. (5)-(10).
* `attention_center_loss`, `update_attention_centers`: Coarse2Fine eq. (2)-(3) / WS-DAN.
* `squared_distances`, `rbf_logits`, `masked_logsumexp`: kernel helpers shared
  with `fgjax.impostors`.
* `l2_normalize`: unit rows with a finite gradient at zero (ELoPE's and BAP's
  normalised features, WS-DAN's normalised centers).
"""

from fgjax.losses.attention import attention_center_loss
from fgjax.losses.attention import update_attention_centers
from fgjax.losses.center import attachment_loss
from fgjax.losses.center import center_loss
from fgjax.losses.elope import elope_loss
from fgjax.losses.elope import update_class_means
from fgjax.losses.knn_nca import knn_nca_loss
from fgjax.losses.nca import l2_normalize
from fgjax.losses.nca import masked_logsumexp
from fgjax.losses.nca import nca_loss
from fgjax.losses.nca import rbf_logits
from fgjax.losses.nca import squared_distances
from fgjax.losses.soft_nca import soft_nca_loss

__all__ = [
    "attachment_loss", "attention_center_loss", "update_attention_centers",
    "center_loss", "elope_loss", "update_class_means",
    "knn_nca_loss", "l2_normalize", "masked_logsumexp", "nca_loss", "rbf_logits",
    "soft_nca_loss", "squared_distances",
]
