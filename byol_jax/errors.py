"""User-facing errors: one clear line naming the problem and the fix."""


class ConfigError(ValueError):
  """A bad config or input that the user must fix (shown without traceback)."""


class StorageError(RuntimeError):
  """Checkpoints, metrics or events cannot be written or read; the run stops
  (one line)."""
