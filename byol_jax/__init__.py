"""byol_jax: BYOL, SimSiam and SimCLR self-supervised learning in JAX/Flax."""

__version__ = "0.1.0"


def load_encoder(path, step=None):
  """Loads the pretrained online encoder; see `byol_jax.checkpoint.load_encoder`."""
  from byol_jax import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.load_encoder(path, step=step)
