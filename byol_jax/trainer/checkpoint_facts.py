"""What a checkpoint's files say: its layout, and whether it is damaged.

Damage is decided from facts, never from words in an error message:
- the state's metadata (Orbax's `_METADATA`, read with the arrays' zarr
  metadata) against the expected state's tree, shapes and dtypes: a
  difference is a layout the running code does not build (a config or a
  library change), not damage (`layout_differences`);
- the status codes of TensorStore, which reads the arrays: NOT_FOUND (a
  file is missing), DATA_LOSS (a file does not decode) and OUT_OF_RANGE (a
  file is shorter than its index says) are damage; every other code
  (UNAVAILABLE, PERMISSION_DENIED, RESOURCE_EXHAUSTED, INVALID_ARGUMENT ...)
  is the storage or the code, and moves nothing;
- Python's own facts: a missing file, JSON that does not parse, an item of
  the checkpoint that is absent;
- the checksums written at save time (`checksums.py`, checked by
  `checkpoint.Checkpointer.restore`).
"""
import errno
import json
import os
import re
import sys
from typing import Any

import jax

from byol_jax.errors import ConfigError

_DAMAGE_CODES = ("NOT_FOUND", "DATA_LOSS", "OUT_OF_RANGE")
_CODE = re.compile(r"^([A-Z][A-Z_]+): ")
_LOCAL_FILE = re.compile(r'(?:local )?file "([^"]+)"')
_SHOWN = 4   # Leaves named per kind of difference.
_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
           errno.EIO, errno.ENOENT)


class DamagedCheckpointError(RuntimeError):
  """A checkpoint's files or contents are bad (it is quarantined)."""


class LayoutError(ConfigError):
  """A checkpoint holds a state of another layout than the expected one."""


def _key_name(k) -> str:
  for attr in ("name", "key", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _flat(tree, **kwargs) -> dict[str, Any]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, **kwargs)
  return {".".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def layout_differences(metadata: Any, abstract_state: Any) -> list[str]:
  """How a saved state's layout differs from the expected one (empty: same).

  Args:
    metadata: Orbax's tree metadata of the saved state (leaves with
      `.shape` and `.dtype`).
    abstract_state: the state the running code builds (ShapeDtypeStructs).

  Returns:
    Short phrases naming the leaves that are missing, extra, reshaped or of
    another dtype ('params.x.kernel (3, 3) -> (3, 4)').
  """
  saved = _flat(metadata, is_leaf=lambda m: hasattr(m, "shape"))
  want = _flat(abstract_state)
  out = []

  def named(kind, keys):
    if keys:
      more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
      out.append(f"{kind} {', '.join(keys[:_SHOWN])}{more}")
  named("leaves this version does not build:", sorted(set(saved) - set(want)))
  named("leaves the checkpoint lacks:", sorted(set(want) - set(saved)))
  both = sorted(set(saved) & set(want))
  named("reshaped:", [f"{k} {tuple(saved[k].shape)} -> {tuple(want[k].shape)}"
                      for k in both
                      if tuple(saved[k].shape) != tuple(want[k].shape)])
  named("another dtype:", [f"{k} {saved[k].dtype} -> {want[k].dtype}"
                           for k in both if saved[k].dtype is not None and
                           str(saved[k].dtype) != str(want[k].dtype)])
  return out


def check_layout(metadata: Any, abstract_state: Any, where: str) -> None:
  """Raises unless the saved state's layout is the expected one.

  Raises:
    LayoutError: another layout (one line naming the leaves; nothing is
      moved: the files are sound, the running code builds another state).
    DamagedCheckpointError: the metadata is missing.
  """
  if metadata is None:
    raise DamagedCheckpointError(
        f"{where}: its state has no metadata file (_METADATA)")
  differences = layout_differences(metadata, abstract_state)
  if differences:
    raise LayoutError(
        f"{where} holds a state of another layout than this version of "
        f"byol_jax builds for the config ({'; '.join(differences)}); nothing "
        "was moved. Resume it with the byol_jax version that wrote it, or "
        "start a new run with another --workdir (byol_jax.load_encoder and "
        "linear_eval still read its encoder).")


def status_code(e: BaseException) -> str | None:
  """The canonical status code of a TensorStore error ('DATA_LOSS'), if any."""
  m = _CODE.match(str(e))
  return m.group(1) if m else None


def is_damage(e: BaseException) -> bool:
  """Whether a read error is a fact about the checkpoint's own files."""
  if isinstance(e, (DamagedCheckpointError, FileNotFoundError,
                    json.JSONDecodeError, KeyError, EOFError)):
    return True
  return status_code(e) in _DAMAGE_CODES


def describe(e: BaseException) -> str:
  """One short line for a read error: its code and the file, no specs."""
  text = str(e).strip()
  if isinstance(e, json.JSONDecodeError):
    return f"a JSON file does not parse ({e.msg})"
  if isinstance(e, KeyError):
    return f"an item is missing ({text.strip(chr(39) + chr(34))[:160]})"
  code = status_code(e)
  if code:
    files = _LOCAL_FILE.findall(text)
    what = {"NOT_FOUND": "is missing", "DATA_LOSS": "does not decode",
            "OUT_OF_RANGE": "is truncated",
            "RESOURCE_EXHAUSTED": "could not be written",
            }.get(code, "could not be read or written")
    # The operating system's own words, where TensorStore passes them on.
    why = [os.strerror(n) for n in _ERRNOS if os.strerror(n) in text]
    what += f" ({why[0]})" if why else ""
    return (f"{code}: file {files[-1]} {what}" if files else
            text.split(" [tensorstore_spec")[0].splitlines()[0][:200])
  first = text.splitlines()[0] if text else type(e).__name__
  return first.split(" [tensorstore_spec")[0][:200]


def quiet_closed_event_loops() -> None:
  """Drops the 'Event loop is closed' errors of TensorStore's callbacks.

  After a failed read or write, TensorStore completes futures whose asyncio
  loop Orbax has closed already; each prints a traceback (hundreds on a
  damaged checkpoint) that says nothing about the run. Everything else
  reaches the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_byol_jax_quiet", False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
      return
    previous(unraisable)
  hook._byol_jax_quiet = True  # pylint: disable=protected-access
  sys.unraisablehook = hook
