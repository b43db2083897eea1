"""The run's directory: writable, config.json (its lock: `lock.py`)."""
import json
import uuid

import jax
import ml_collections
from etils import epath

from byol_jax.trainer import checkpoint
from byol_jax.errors import ConfigError



def check_writable(workdir: epath.Path) -> None:
  """Creates the workdir and writes and removes a probe file in it.

  Raises:
    ConfigError: it is a file, or cannot be created or written.
  """
  if workdir.exists() and not workdir.is_dir():
    raise ConfigError(f"--workdir={workdir} is a file, not a directory; pass "
                      "a directory (it is created if missing).")
  probe = workdir / f".write_test.{uuid.uuid4().hex[:8]}"
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(
        f"--workdir={workdir} is not writable ({type(e).__name__}: "
        f"{checkpoint.first_line(e)}); pass a directory you can write to."
    ) from e


def write_config(workdir: epath.Path,
                 config: ml_collections.ConfigDict) -> None:
  """WORKDIR/config.json: the resolved config of the latest start."""
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(json.dumps(
        checkpoint.config_to_json(config), indent=2, sort_keys=True))
