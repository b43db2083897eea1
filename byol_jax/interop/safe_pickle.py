"""Reads pickles that hold only arrays, scalars and containers.

A pickle is a program: `pickle.load` of an untrusted file can run anything.
`load` resolves each name the pickle asks for against an allow-list that
builds only numeric NumPy arrays, scalars, bytes, tuples, named tuples,
dicts and lists, and refuses every other name before calling it. The list
covers the official BYOL checkpoints (dill, protocol 2): Haiku mappings
read as dicts, their NamedTuples as plain named tuples, dill's helpers
reimplemented, and a pickled jax.Array read as the NumPy array it wraps.
"""
import collections
import os
import pickle
from typing import Any, Callable

import numpy as np

from byol_jax.errors import ConfigError

# Dtype kinds an array may have: bool, signed, unsigned, float, complex.
_NUMERIC_KINDS = "biufc"


class PickleRefusedError(ConfigError):
  """The pickle names a class or function outside the allow-list."""


def _dtype(spec: Any, align: bool = False, copy: bool = True) -> np.dtype:
  del copy  # np.dtype's pickle passes it; a dtype is immutable anyway.
  dtype = np.dtype(spec, align=align)
  if dtype.kind not in _NUMERIC_KINDS:
    raise PickleRefusedError(f"the pickle holds an array of dtype {dtype}; "
                             "only numeric arrays are read.")
  return dtype


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> np.ndarray:
  """An empty ndarray that the pickle's BUILD then fills (__setstate__)."""
  if cls is not np.ndarray:
    raise PickleRefusedError(
        f"the pickle reconstructs an array of type {cls!r}; only plain "
        "numpy.ndarray is read.")
  return np.ndarray.__new__(np.ndarray, shape, _dtype(typecode))


def _scalar(dtype: np.dtype, data: bytes = b"") -> np.generic:
  """A NumPy scalar from its raw bytes."""
  if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS:
    raise PickleRefusedError(f"the pickle holds a scalar of dtype {dtype!r}; "
                             "only numeric scalars are read.")
  return np.frombuffer(data, dtype=dtype, count=1)[0]


def _encode(text: str, encoding: str = "utf-8") -> bytes:
  if encoding not in ("latin1", "latin-1"):
    raise PickleRefusedError(
        f"the pickle encodes bytes as {encoding!r}; only latin1 is read.")
  return text.encode("latin1")


def _mapping(items: Any = ()) -> dict:
  """Haiku's immutable mappings (FlatMapping, frozendict) as plain dicts."""
  if not isinstance(items, dict):
    raise PickleRefusedError(
        f"a Haiku mapping holds {type(items).__name__}, not a dict.")
  return dict(items)


def _create_namedtuple(name: str, fields: Any, module: str,
                       defaults: Any = None) -> type:
  """A plain named tuple class standing for `module.name` (dill's helper)."""
  del defaults  # Every field is present in a pickled instance.
  if not (isinstance(fields, (tuple, list)) and
          all(isinstance(x, str) for x in (module, name, *fields))):
    raise PickleRefusedError(
        f"the pickle defines a named tuple {name!r} with fields {fields!r}.")
  try:  # namedtuple rejects names that are not identifiers.
    return collections.namedtuple(name, fields, module=__name__)
  except ValueError as e:
    raise PickleRefusedError(
        f"the pickle defines an invalid named tuple {name!r}: {e}") from e


# The official checkpoint's NamedTuples, for pickles that name them directly.
_OFFICIAL_NAMEDTUPLES = {
    ("byol.byol_experiment", "_ByolExperimentState"): (
        "online_params", "target_params", "online_state", "target_state",
        "opt_state"),
    ("byol.utils.optimizers", "ScaleByLarsState"): ("mu",),
    ("byol.utils.optimizers", "AddWeightDecayState"): (),
    ("optax._src.transform", "ScaleState"): (),
    ("optax._src.base", "EmptyState"): (),
}


class _ModuleName(str):
  """What dill's `_import_module` gives here: a module's name, not imported."""


def _import_module(name: str, safe: bool = False) -> _ModuleName:
  del safe
  if not any(m == name for m, _ in ALLOWED):
    raise PickleRefusedError(
        f"the pickle imports module {name!r}, which could run code; only "
        "arrays, scalars and containers are read.")
  return _ModuleName(name)


def _get_attr(module: Any, name: str) -> Any:
  if not isinstance(module, _ModuleName):
    raise PickleRefusedError(
        f"the pickle reads attribute {name!r} of {type(module).__name__}.")
  return _lookup(str(module), name)


def _create_array(f: Callable[..., np.ndarray], args: tuple, state: tuple,
                  npdict: Any = None) -> np.ndarray:
  """f(*args).__setstate__(state), as NumPy's own pickles do."""
  if npdict:
    raise PickleRefusedError("the pickle sets attributes on an array.")
  if f is not _reconstruct:
    raise PickleRefusedError("the pickle builds an array with a function "
                             "other than NumPy's _reconstruct.")
  array = f(*args)
  array.__setstate__(state)
  return array


def _reconstruct_array(fun: Callable[..., np.ndarray], args: tuple,
                       state: tuple, aval_state: Any = None) -> np.ndarray:
  """A pickled jax.Array as the NumPy array it holds (no device)."""
  if not (aval_state is None or (
      isinstance(aval_state, dict) and
      all(k == "weak_type" and isinstance(v, bool)
          for k, v in aval_state.items()))):
    raise PickleRefusedError(
        f"the pickle sets {aval_state!r} on a jax.Array; only weak_type is "
        "read.")
  return _create_array(fun, args, state)


_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray",
                  "numpy.core._multiarray_umath",
                  "numpy._core._multiarray_umath")
ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _encode,
    ("codecs", "encode"): _encode,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("jax._src.array", "_reconstruct_array"): _reconstruct_array,
    **{(m, "_reconstruct"): _reconstruct for m in _NUMPY_MODULES},
    **{(m, "scalar"): _scalar for m in _NUMPY_MODULES},
    **{("haiku._src.data_structures", n): _mapping
       for n in ("FlatMapping", "FlatMap", "frozendict")},
    **{(d, f.__name__): f for d in ("dill._dill", "dill.dill")
       for f in (_import_module, _get_attr, _create_array,
                 _create_namedtuple)},
    **{(m, n): _create_namedtuple(n, v, m)
       for (m, n), v in _OFFICIAL_NAMEDTUPLES.items()},
}


def _lookup(module: str, name: str) -> Any:
  if (module, name) not in ALLOWED:
    raise PickleRefusedError(
        f"the pickle asks for {module}.{name}, which could run code; only "
        "arrays, scalars and containers are read.")
  return ALLOWED[(module, name)]


class RestrictedUnpickler(pickle.Unpickler):
  """`pickle.Unpickler` that resolves names only through the allow-list."""

  def find_class(self, module: str, name: str) -> Any:
    return _lookup(module, name)


def load(path: str | os.PathLike) -> Any:
  """Reads a pickle of arrays, scalars and containers (see the module).

  Raises:
    PickleRefusedError: the pickle names anything else; nothing it names
      has been called.
    ConfigError: the file does not exist or is not a readable pickle.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConfigError(f"{path} does not exist or is not a file.")
  with open(path, "rb") as f:
    try:
      return RestrictedUnpickler(f).load()
    except PickleRefusedError as e:
      raise PickleRefusedError(f"{path}: refused: {e}") from None
    except Exception as e:  # pylint: disable=broad-except
      # Truncated or foreign files fail with anything from EOFError to
      # TypeError; the user only needs to know it is not a readable pickle.
      raise ConfigError(f"{path} is not a readable pickle "
                        f"({type(e).__name__}: {e}).") from None
