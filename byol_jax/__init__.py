"""byol_jax: BYOL, SimSiam and SimCLR self-supervised learning in JAX/Flax."""
# First: environment variables that TensorFlow and epath read at import.
from byol_jax import environ  # noqa: F401  pylint: disable=unused-import

__version__ = "0.1.0"
__all__ = ["load_encoder", "load_run"]


def __getattr__(name):
  # Lazy, so that importing the algorithm (byol_jax.core) loads no trainer.
  if name in __all__:
    from byol_jax.interop import pretrained  # pylint: disable=g-import-not-at-top
    return getattr(pretrained, name)
  raise AttributeError(f"module 'byol_jax' has no attribute {name!r}")
