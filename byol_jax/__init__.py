"""byol_jax: BYOL, SimSiam and SimCLR self-supervised learning in JAX/Flax."""
from byol_jax import storage  # noqa: F401  (first: how gs:// is reached)
from byol_jax.interop.pretrained import load_encoder  # noqa: E402

__version__ = "0.1.0"
__all__ = ["load_encoder"]
