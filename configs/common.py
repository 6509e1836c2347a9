"""Defaults shared by every experiment config; each configs/*.py starts from these.

Not an experiment itself: `get_config()` here returns the base that
`configs/<experiment>.py` files override.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # ce | ce_extra | tied | fixed | loose (paper section 4): a preset of network, loss
  # terms and impostor policy (fgjax/schemes.py); the fields model.net, loss.terms and
  # impostors.policy override its parts when set.
  c.scheme = "fixed"
  c.seed = 0
  # Multi-host runs (fgjax.parallel.initialize_distributed): jax.distributed.initialize()
  # with cluster auto-detection (SLURM, Open MPI, TPU pods, Kubernetes), or, where
  # coordinator_address is set, with it, num_processes and this process's process_id.
  c.distributed = False
  c.coordinator_address = ""  # e.g. "10.0.0.1:1234"
  c.num_processes = 0
  c.process_id = -1
  c.num_devices = 0           # 0: every visible device; n: the first n (data parallel)
  # Start from another run's final checkpoint (two-stage recipes, fgjax/init_from.py):
  # its workdir, and which parts to take: net (always), impostors, loss_state.
  c.init_from = ""
  c.init_from_parts = "net"

  c.model = ml_collections.ConfigDict()
  c.model.backbone = "efficientnet_lite0"
  c.model.pretrained = True
  c.model.weights_path = ""   # empty: the package / cache default
  c.model.net = ""            # '' = the scheme's: convnet | convnet_extra | impostor
  c.model.pooling = "avg"     # avg | max | kmax | weighted_kmax (fgjax/models/pooling.py)
  c.model.pooling_k = 4       # K of kmax / weighted_kmax (ELoPE Table 2)
  c.model.embed_dim = 512     # d_em (paper default)
  # Net 'convnet_exits': backbone outputs that get a trained softmax exit head.
  c.model.exit_stages = ()
  # ELoPE's localization module (net 'elope_localized', fgjax/models/localized.py): the
  # backbone up to localizer_stop on a localizer_size^2 resize, predicting a
  # localizer_map_size^2 heat map (the classifier's map size); box threshold tau
  # (ELoPE Table 2: 0.3 birds, 0.2 otherwise).
  c.model.localizer_stop = "stage2"
  c.model.localizer_size = 64
  c.model.localizer_map_size = 7
  c.model.localizer_tau = 0.2
  # BAP networks (fgjax/models/bap.py: 'bap', 'bap_impostor'; coarse2fine.py: 'c2f'):
  # M attention maps (WS-DAN 32, Coarse2Fine 8), the factor on the unit BAP vector
  # (WS-DAN's 100), Coarse2Fine's orthogonal init of the attention conv (Algorithm 1),
  # WS-DAN's attention cropping / dropping (net 'bap'; not on cached features).
  c.model.attention_maps = 32
  c.model.bap_scale = 100.0
  c.model.attention_orthogonal_init = False
  c.model.attention_crop_drop = False
  # Net 'c2f': which prediction 'logits' is (coarse | fine | average), the up-sampler's
  # width and its synthetic pre-training at init (the paper: 60,000 pairs, 100 epochs;
  # 0 pairs: none).
  c.model.c2f_mode = "average"
  c.model.upsampler_width = 8
  c.model.upsampler_pretrain_pairs = 0
  c.model.upsampler_pretrain_epochs = 1
  c.model.trainable = "all"   # 'all' | 'head' | 'last:N' backbone blocks (CPU budgets)
  # Top-level parameter groups that do not train either, comma-separated (e.g.
  # 'embed,classifier' while only a localization module trains).
  c.model.frozen = ""

  c.data = ml_collections.ConfigDict()
  c.data.source = "birds525"  # image_folder | birds525 | cars196 | tfds | digits
  c.data.root = ""            # empty: ../shared/data/birds525 next to the repo
  c.data.split = "canonical"
  c.data.seed = 0
  c.data.tfds_name = ""
  c.data.tfds_data_dir = ""
  c.data.bbox_crop = False
  c.data.classes_subset = ()
  c.data.holdout_classes = ()
  # Open set as in the paper (section 4.2): unknown images from another data set, a
  # source name ('birds525', 'cars196') or a folder; evaluation only.
  c.data.unknown_root = ""

  c.input = ml_collections.ConfigDict()
  c.input.image_size = 224    # crop side
  c.input.resize_size = 256   # paper: resize to 256, random / centre crop
  c.input.flip = True
  c.input.worker_count = 0

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32
  c.train.num_epochs = 30
  c.train.num_steps = 0       # > 0 overrides num_epochs
  c.train.log_every_steps = 10
  c.train.checkpoint_every_steps = 200
  # fgjax.divergence: stop (keeping the last good checkpoint) when a row of the
  # embedding grows past this L2 norm; 0: only non-finite values stop a run.
  c.train.max_embedding_norm = 1e6
  # Train on cached backbone outputs: all of them ('head'), or those before the last N
  # blocks ('last:N'); computed on the evaluation transform (no crops, no flips).
  c.train.cache_features = False
  # With cache_features: a directory shared by runs, so a sweep computes the backbone
  # features of each split once (fgjax.feature_cache); empty: per run, in memory.
  c.train.feature_cache_dir = ""

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-4
  c.optim.weight_decay = 5e-4     # paper: Adam, weight decay 5e-4
  c.optim.schedule = "constant"   # constant | cosine
  c.optim.warmup_steps = 0
  c.optim.final_lr_fraction = 0.0
  c.optim.grad_clip_norm = 0.0
  c.optim.impostor_lr_multiplier = 1.0

  # The loss: a weighted sum of registered terms (fgjax/objectives.py), each configured
  # by its section below (weight, the output it reads, its options).
  c.loss = ml_collections.ConfigDict()
  c.loss.terms = ""           # comma-separated term names; '' = the scheme's preset
  # Terms added to those, e.g. 'elope' (ELoPE eq. 1, L = L_scheme + lambda L_e) or
  # 'center' (Wen et al. 2016).
  c.loss.extra_terms = ""
  c.loss.ce = ml_collections.ConfigDict({"weight": 1.0, "input": "logits"})
  # The exit heads of net 'convnet_exits' (config.model.exit_stages), early exit.
  c.loss.exit_ce = ml_collections.ConfigDict({"weight": 1.0, "input": "exit_logits"})
  # sigma: kernel width of eq. (2) in the training loss (the test-time sigma is chosen
  # on val from eval.sigma_grid).
  c.loss.nca = ml_collections.ConfigDict({"weight": 1.0, "input": "embedding",
                                          "sigma": 0.2})
  # weight: lambda of eq. (6), loose scheme.
  c.loss.attachment = ml_collections.ConfigDict({"weight": 1.0, "input": "embedding"})
  # Class-mean terms: the means (num_classes, E) live in the training state
  # (checkpointed, not optimised), start at zero and follow the online update of ELoPE
  # eq. (6)-(8) / Wen et al. eq. (4) with rate alpha. normalize: l2-normalise the input
  # first (ELoPE Sec. 4.1; it makes the margin scale-free: squared distances of unit
  # vectors are <= 4); Wen et al.'s center loss uses raw features (normalize=False).
  c.loss.center = ml_collections.ConfigDict({"weight": 1.0, "input": "embedding",
                                             "alpha": 0.5, "normalize": True})
  # ELoPE Table 2: lambda 2, alpha 0.5, gamma 16 (weight of L_b, eq. 10), m 0.75.
  c.loss.elope = ml_collections.ConfigDict({"weight": 2.0, "input": "embedding",
                                            "alpha": 0.5, "gamma": 16.0,
                                            "margin": 0.75, "normalize": True})
  # Second heads' cross-entropies: Coarse2Fine's fine pass (eq. 4), WS-DAN's attention
  # crops and drops (WS-DAN.PyTorch weighs raw, crop and drop 1/3 each).
  c.loss.ce_fine = ml_collections.ConfigDict({"weight": 1.0, "input": "fine_logits"})
  c.loss.ce_crop = ml_collections.ConfigDict({"weight": 1.0, "input": "crop_logits"})
  c.loss.ce_drop = ml_collections.ConfigDict({"weight": 1.0, "input": "drop_logits"})
  # Attention center loss (Coarse2Fine eq. 2-3, WS-DAN): weight = lambda of eq. (4)
  # (1.0), centers moved by beta (WS-DAN 5e-2) towards the part features; the centers
  # l2-normalised in the loss (normalize_center, WS-DAN.PyTorch); fine_input: a second
  # part-feature output joining it (net 'c2f': 'fine_part_features', Algorithm 1).
  c.loss.attention_center = ml_collections.ConfigDict({
      "weight": 1.0, "input": "part_features", "beta": 0.05, "normalize_center": True,
      "fine_input": ""})
  # ELoPE section 5: smooth L1 of the localization module's heat map.
  c.loss.heatmap = ml_collections.ConfigDict({"weight": 1.0, "input": "heatmap",
                                              "target": "heatmap_target"})

  c.impostors = ml_collections.ConfigDict()
  # '' = the scheme's: none | fixed | loose | tied | compressed_fixed, or knn (with
  # scheme fixed) | knn_loose (with scheme loose) (fgjax/impostor_policies.py).
  c.impostors.policy = ""
  c.impostors.reset_every_epochs = 10  # tied scheme
  # knn / knn_loose: term 'nca' over each training image's knn_k nearest impostors
  # (Meyer et al.: 32 or more suffice), lists refreshed from the current embeddings
  # every knn_refresh_every_steps steps (0: only at init), searched by knn_backend:
  # exact (on device) | scann (host CPU, `pip install scann`).
  c.impostors.knn_k = 64
  c.impostors.knn_refresh_every_steps = 500
  c.impostors.knn_backend = "exact"
  # Learnable per-impostor weights w_j = exp(u_j), u_j = 0 at the start, trained with
  # the impostors' learning rate in every scheme (fixed ones too) and used by the loss
  # and the rule eq. (3): the NNGK review's eq. 4 / 7 (fgjax.impostors.ImpostorSet).
  c.impostors.weights = False
  c.impostors.weights_learning_rate = 1e-2  # Adam, constant; no weight decay
  # Product-quantised impostors: bytes (= subspaces of 8-bit codes) per impostor, 0 off.
  # 'fixed' trains against the compressed impostors (paper); other schemes compress
  # after training.
  c.impostors.pq_bytes = 0
  c.impostors.pq_opq = True

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64
  # The RBF rule's sigma is re-chosen on the validation split from this grid after
  # training (no extra forward passes); empty: use loss.nca.sigma.
  c.eval.sigma_grid = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 4.0)
  # How val picks sigma from the grid: top1 (accuracy) or nll (calibration).
  c.eval.sigma_criterion = "top1"
  c.eval.search = "exact"   # exact (all impostors) | exact_knn | scann
  # ELoPE Table 4 on the test split (IoU >= 0.5 with ground-truth boxes where the
  # source has them) and <workdir>/localization.png (heat maps, boxes).
  c.eval.localization = False
  c.eval.k = 64
  # More softmax heads to report besides 'logits', by output name, e.g. Coarse2Fine's
  # ('coarse_logits', 'fine_logits'): every inference mode from one evaluation.
  c.eval.extra_logits = ()
  # The impostor paper's RBF-SVM baseline (section 4, fgjax/rbf_svm.py): after training,
  # SVC(kernel='rbf') on the network's pooled 'features' of the training split, C and
  # gamma (multiples of 1 / (F Var(x_train)), scikit-learn's 'scale') chosen on val
  # top-1 from these grids, features normalised by l2 | standardize first.
  c.eval.rbf_svm = False
  c.eval.rbf_svm_C_grid = (0.1, 1.0, 10.0, 100.0)
  c.eval.rbf_svm_gamma_grid = (0.25, 0.5, 1.0, 2.0, 4.0)
  c.eval.rbf_svm_normalize = "l2"

  # What the artifact (<workdir>/artifact) carries for serving. engine='onnx-int8'
  # (fgjax.export.int8) needs activation ranges: calibrated at export on this many
  # training images, spread over the split (0: no int8 engine). Op types without int8
  # kernels are refused unless listed here to run in fp32, e.g. ('Sqrt', 'Div').
  c.export = ml_collections.ConfigDict()
  c.export.int8_calibration_images = 64
  c.export.int8_float_ops = ()

  # Sequential early exit (Savchenko 2021; fgjax/early_exit): exit heads on these
  # backbone outputs (forward order; the last always answers), fitted after training
  # on the frozen network, thresholds by eq. (4) at `alpha` with `rule` (adaptive:
  # Benjamini-Hochberg alpha m / M; fixed: alpha), held-out ratio `delta`; results for
  # every alpha of `alpha_grid`. Empty: no exits. Heads: svm (linear, squared hinge,
  # the paper's), logreg, rbf (the impostor rule over the stage's features; sigma 0:
  # chosen by leave-one-out).
  c.early_exit = ml_collections.ConfigDict()
  c.early_exit.exits = ()
  c.early_exit.head = "svm"
  c.early_exit.alpha = 0.1
  c.early_exit.rule = "adaptive"
  c.early_exit.delta = 0.5
  c.early_exit.alpha_grid = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
  c.early_exit.C = 1.0
  c.early_exit.sigma = 0.0
  return c


def birds525(scheme: str, learning_rate: float,
             sigma: float = 0.2) -> ml_collections.ConfigDict:
  """birds525 (../shared/data/birds525, canonical 3/1/1 split): `folder_schemes`."""
  return folder_schemes("birds525", scheme, learning_rate, sigma)


def folder_schemes(dataset: str, scheme: str, learning_rate: float,
                   sigma: float = 0.2) -> ml_collections.ConfigDict:
  """One of the paper's five schemes on a folder data set ('birds525', 'cars196'),
  EfficientNet-Lite0.

  Head-only training on cached backbone features by default: the setting whose
  learning rate and training sigma were chosen on the validation split on a 2-core CPU
  (BENCHMARKS.md, sections 5 and 16). With an accelerator, fine-tune more of the
  backbone with --config.model.trainable=last:3 (or all)
  --config.train.cache_features=False.
  """
  c = get_config()
  c.scheme = scheme
  c.data.source = dataset
  c.model.backbone = "efficientnet_lite0"
  c.model.trainable = "head"
  c.train.cache_features = True
  c.train.log_every_steps = 50
  c.optim.learning_rate = learning_rate
  c.loss.nca.sigma = sigma
  return c


def cub(scheme: str) -> ml_collections.ConfigDict:
  """CUB-200-2011 through TFDS with the bounding-box crop, SqueezeNet 1.1 (paper)."""
  c = get_config()
  c.scheme = scheme
  c.data.source = "tfds"
  c.data.tfds_name = "caltech_birds2011"
  c.data.bbox_crop = True
  c.model.backbone = "squeezenet1_1"
  c.train.num_epochs = 60  # paper: 60 epochs
  return c


def elope(dataset: str, learning_rate: float) -> ml_collections.ConfigDict:
  """ELoPE (Hanselmann & Ney 2020) on a folder data set, EfficientNet-Lite0.

  Net 'elope' (pooling -> 512-d embedding layer -> classifier) with global k-max pooling
  (K = 4) and L = L_CE + 2 L_e (eq. 1, Table 2: alpha 0.5, gamma 16, m 0.75), trained
  head-only on cached features of the frozen ImageNet backbone (a 2-core CPU budget;
  the paper fine-tunes ResNet-50 at 448 px for 90 epochs). Adam with the project's
  coupled weight decay 5e-4, not the paper's SGD. Box threshold tau 0.3 for birds,
  0.2 otherwise (Table 2).
  """
  c = get_config()
  c.scheme = "ce"
  c.data.source = dataset
  c.model.backbone = "efficientnet_lite0"
  c.model.net = "elope"
  c.model.pooling = "kmax"
  c.model.localizer_tau = 0.3 if "bird" in dataset else 0.2
  c.loss.extra_terms = "elope"
  c.model.trainable = "head"
  c.train.cache_features = True
  c.train.log_every_steps = 50
  c.optim.learning_rate = learning_rate
  return c

