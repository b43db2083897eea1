"""The self-supervised methods, wired explicitly by name.

Each has `HAS_TARGET`, `make_network(config)` and `loss_fn` (see byol.loss_fn).
"""
from types import ModuleType

from byol_jax.core.methods import byol
from byol_jax.core.methods import simclr
from byol_jax.core.methods import simsiam
from byol_jax.errors import ConfigError

METHODS: dict[str, ModuleType] = {
    "byol": byol, "simsiam": simsiam, "simclr": simclr}


def get(name: str) -> ModuleType:
  """The method module called `name`, or a ConfigError naming the choices."""
  if name not in METHODS:
    raise ConfigError(f"Unknown method {name!r}; set --config.method to one "
                      f"of {sorted(METHODS)}.")
  return METHODS[name]
