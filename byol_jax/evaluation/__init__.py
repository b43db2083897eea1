"""Evaluation of learned representations (DESIGN section 3).

- `monitor.Monitor`: during pretraining, the online classifier's accuracy
  and the weighted kNN monitor (k = 200, T = 0.1), built once per run.
- `linear.LinearEvaluator`: the offline linear protocol, or fine-tuning.
- `knn`: the sharded kNN vote and feature extraction; `online`: hit counts.
"""
