"""byol_jax: BYOL, SimSiam and SimCLR self-supervised learning in JAX/Flax."""
# First: environment variables that TensorFlow and epath read at import.
from byol_jax import environ  # noqa: F401  pylint: disable=unused-import
from byol_jax.interop.pretrained import load_encoder

__version__ = "0.1.0"
__all__ = ["load_encoder"]
