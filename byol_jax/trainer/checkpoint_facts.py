"""What a checkpoint's files say: its layout, and whether it is damaged.

Damage is decided from facts, never from an error's wording: a missing
file, JSON that does not parse, an absent item, or TensorStore's codes
NOT_FOUND, DATA_LOSS, OUT_OF_RANGE. Other codes (UNAVAILABLE,
PERMISSION_DENIED ...) are the storage's and move nothing; nor does another
layout.
"""
import errno
import json
import os
import re
from typing import Any

import jax

from byol_jax.errors import ConfigError

_DAMAGE = re.compile(r"(NOT_FOUND|DATA_LOSS|OUT_OF_RANGE): ")  # TensorStore.
_WHAT = {"NOT_FOUND": "is missing", "DATA_LOSS": "does not decode",
         "OUT_OF_RANGE": "is truncated",
         "RESOURCE_EXHAUSTED": "could not be written"}
_CODE = re.compile(r"([A-Z][A-Z_]+): ")
_LOCAL_FILE = re.compile(r'(?:local )?file "([^"]+)"')
_SHOWN = 4   # Leaves named per kind of difference.
_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
           errno.EIO, errno.ENOENT)


class DamagedCheckpointError(RuntimeError):
  """A checkpoint's files or contents are bad (it is quarantined)."""


class LayoutError(ConfigError):
  """A checkpoint holds a state of another layout than the expected one."""


def flat(tree, **kwargs) -> dict[str, Any]:
  """{'params.x.kernel': leaf} of a pytree."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, **kwargs)
  return {jax.tree_util.keystr(path, simple=True, separator="."): leaf
          for path, leaf in leaves}


def check_layout(metadata: Any, abstract_state: Any, where: str) -> None:
  """Raises LayoutError (nothing moved) unless Orbax's `metadata` of a saved
  state matches `abstract_state`, DamagedCheckpointError if it is missing."""
  if metadata is None:
    raise DamagedCheckpointError(
        f"{where}: its state has no metadata file (_METADATA)")
  saved = flat(metadata, is_leaf=lambda m: hasattr(m, "shape"))
  want = flat(abstract_state)

  def changed(attr, as_):  # ['params.x.kernel (3, 3) -> (3, 4)']
    pairs = {k: (as_(getattr(saved[k], attr)), as_(getattr(want[k], attr)))
             for k in sorted(saved.keys() & want.keys())
             if getattr(saved[k], attr) is not None}
    return [f"{k} {a} -> {b}" for k, (a, b) in pairs.items() if a != b]
  kinds = {
      "leaves this version does not build:": sorted(set(saved) - set(want)),
      "leaves the checkpoint lacks:": sorted(set(want) - set(saved)),
      "reshaped:": changed("shape", tuple),
      "another dtype:": changed("dtype", str)}
  differences = [
      f"{kind} {', '.join(keys[:_SHOWN])}" +
      (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")
      for kind, keys in kinds.items() if keys]
  if differences:
    raise LayoutError(
        f"{where} holds a state of another layout than this version of "
        f"byol_jax builds for the config ({'; '.join(differences)}); nothing "
        "was moved. Resume it with the byol_jax version that wrote it, or "
        "start a new run with another --workdir (byol_jax.load_encoder and "
        "linear_eval still read its encoder).")


def is_damage(e: BaseException) -> bool:
  """Whether a read error is a fact about the checkpoint's own files."""
  return isinstance(e, (DamagedCheckpointError, FileNotFoundError,
                        json.JSONDecodeError, KeyError, EOFError)
                    ) or _DAMAGE.match(str(e)) is not None


def describe(e: BaseException) -> str:
  """One short line for an error: its code and the file, no specs."""
  text = str(e).strip()
  if isinstance(e, json.JSONDecodeError):
    return f"a JSON file does not parse ({e.msg})"
  if isinstance(e, KeyError):
    return f"an item is missing ({text.strip(chr(39) + chr(34))[:160]})"
  code, files = _CODE.match(text), _LOCAL_FILE.findall(text)
  if code and files:
    # The operating system's own words, where TensorStore passes them on.
    why = [os.strerror(n) for n in _ERRNOS if os.strerror(n) in text]
    return (f"{code[1]}: file {files[-1]} "
            f"{_WHAT.get(code[1], 'could not be read or written')}" +
            (f" ({why[0]})" if why else ""))
  first = text.splitlines()[0] if text else type(e).__name__
  return first.split(" [tensorstore_spec")[0][:200]

