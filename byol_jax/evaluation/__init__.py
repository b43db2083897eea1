"""Evaluation of learned representations (DESIGN section 3).

- `online.classifier_accuracy`: the jointly trained online linear classifier.
- `knn.knn_accuracy`: the weighted kNN monitor (k = 200, T = 0.1).
- `linear.linear_eval`: the offline linear protocol, or fine-tuning.
"""
from byol_jax.evaluation import knn
from byol_jax.evaluation import linear
from byol_jax.evaluation import online
from byol_jax.evaluation.knn import extract_features
from byol_jax.evaluation.knn import knn_accuracy
from byol_jax.evaluation.knn import knn_predict
from byol_jax.evaluation.linear import linear_eval
from byol_jax.evaluation.online import classifier_accuracy

__all__ = ["knn", "linear", "online", "extract_features", "knn_accuracy",
           "knn_predict", "linear_eval", "classifier_accuracy"]
