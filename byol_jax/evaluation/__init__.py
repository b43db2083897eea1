"""Evaluation of learned representations (DESIGN section 3).

- `monitor.Monitor`: during pretraining, the online classifier's accuracy
  and the weighted kNN monitor (k = 200, T = 0.1), built once per run.
- `linear.LinearEvaluator`: the offline linear protocol, or fine-tuning.
- `knn`: the kNN vote and feature extraction.
"""
from byol_jax.evaluation import knn
from byol_jax.evaluation import linear
from byol_jax.evaluation import monitor
from byol_jax.evaluation import online

__all__ = ["knn", "linear", "monitor", "online"]
