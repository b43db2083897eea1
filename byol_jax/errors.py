"""User-facing errors: one clear line naming the problem and the fix."""


class ConfigError(ValueError):
  """A bad config or input that the user must fix (shown without traceback)."""
