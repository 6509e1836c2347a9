"""Sequential early-exit inference (Savchenko 2021): exit heads, thresholds, runtime.

Savchenko, "Sequential analysis in image recognition" (OpenTalks.AI 2021; IJCNN
2020, Information Sciences 2021): exit branches (global average pooling and
l2-normalisation) at M intermediate backbone stages each feed a classifier
(`heads`); an image leaves at the first exit whose maximal confidence score
exceeds that exit's threshold (eq. 3), and the thresholds are chosen on a
held-out part of the training set for the false acceptance rate
alpha_m = alpha * m / M of the Benjamini-Hochberg correction (eq. 4,
`thresholds`).

Modules: `heads` (exit classifiers), `thresholds` (eq. 4), `fit` (the training
algorithm and scoring from features), `sequential` (segment-by-segment inference with
batch compaction), `training` (exits for a trained run, config.early_exit).
"""
