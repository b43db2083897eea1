"""Reads pickles that hold only arrays, scalars and containers.

A pickle is a program: every class or function it names is called while it
loads, so `pickle.load` of an untrusted file can run anything (`os.system`
through `__reduce__`). `load` instead resolves each name the pickle asks for
against an allow-list of constructors that build nothing but NumPy arrays,
NumPy scalars and dtypes, bytes, tuples, named tuples, dicts and lists, and
refuses every other name with one line before calling it.

The allow-list covers the official BYOL checkpoints (`dill.dump(...,
protocol=2)` of NumPy arrays in Haiku mappings and NamedTuples):

  - NumPy's `_reconstruct`, `ndarray`, `dtype` and `scalar`, and
    `_codecs.encode` (protocol 2 writes bytes as latin-1 text), numeric
    dtypes only (an object array would be a container of anything);
  - Haiku's `FlatMapping` / `frozendict` / `FlatMap`, read as plain dicts;
  - the checkpoint's NamedTuples (`_ByolExperimentState`, the LARS and optax
    states), rebuilt here as plain named tuples: no official code is imported;
  - dill's helpers `_create_namedtuple`, `_import_module`, `_get_attr` and
    `_create_array`, reimplemented so that they only produce the above
    (`_import_module` names a module without importing it, and `_get_attr`
    only reaches names of the allow-list);
  - JAX's `jax._src.array._reconstruct_array(fun, args, state, aval_state)`,
    which is how a jax.Array pickles (the official Checkpointer's `rng` under
    today's JAX): read as the NumPy array it wraps, and only when `fun` is
    NumPy's `_reconstruct` above; nothing goes to a device.
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
  """A NumPy scalar from its raw bytes, e.g. a step count of type int64."""
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


_NAMEDTUPLES: dict[tuple[str, str, tuple[str, ...]], type] = {}


def _namedtuple(module: str, name: str, fields: Any) -> type:
  """A plain named tuple class standing for `module.name` (cached)."""
  if not (isinstance(name, str) and isinstance(module, str) and
          isinstance(fields, (tuple, list)) and
          all(isinstance(f, str) for f in fields)):
    raise PickleRefusedError(
        f"the pickle defines a named tuple {name!r} with fields {fields!r}.")
  key = (module, name, tuple(fields))
  if key not in _NAMEDTUPLES:
    try:  # namedtuple rejects names that are not identifiers.
      cls = collections.namedtuple(name, fields)
    except ValueError as e:
      raise PickleRefusedError(
          f"the pickle defines an invalid named tuple {name!r}: {e}") from e
    cls.__module__ = __name__
    _NAMEDTUPLES[key] = cls
  return _NAMEDTUPLES[key]


# The NamedTuples of the official checkpoint, for pickles that name them
# directly (plain pickle, or a dill that pickles them by reference).
_KNOWN_NAMEDTUPLES = {
    ("byol.byol_experiment", "_ByolExperimentState"): (
        "online_params", "target_params", "online_state", "target_state",
        "opt_state"),
    ("byol.utils.optimizers", "ScaleByLarsState"): ("mu",),
    ("byol.utils.optimizers", "AddWeightDecayState"): (),
    ("optax._src.transform", "ScaleState"): (),
    ("optax._src.base", "EmptyState"): (),
}

_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray",
                  "numpy.core._multiarray_umath",
                  "numpy._core._multiarray_umath")
_HAIKU_MODULE = "haiku._src.data_structures"

ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _encode,
    ("codecs", "encode"): _encode,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{(m, "_reconstruct"): _reconstruct for m in _NUMPY_MODULES},
    **{(m, "scalar"): _scalar for m in _NUMPY_MODULES},
    **{(_HAIKU_MODULE, n): _mapping
       for n in ("FlatMapping", "FlatMap", "frozendict")},
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
  """dill's ndarray: f(*args), then __setstate__(state)."""
  if f is not _reconstruct or npdict:
    raise PickleRefusedError(
        "the pickle builds an array with a custom constructor or attributes.")
  array = f(*args)
  array.__setstate__(state)
  return array


def _reconstruct_array(fun: Callable[..., np.ndarray], args: tuple,
                       state: tuple, aval_state: Any = None) -> np.ndarray:
  """A pickled jax.Array, as the NumPy array it holds.

  JAX's own version calls `fun(*args)`, `__setstate__(state)`, then puts the
  result on a device and updates its abstract value with `aval_state`.
  """
  if fun is not _reconstruct:
    raise PickleRefusedError(
        "the pickle rebuilds a jax.Array with a function other than "
        "NumPy's _reconstruct.")
  if not (aval_state is None or (
      isinstance(aval_state, dict) and
      all(k == "weak_type" and isinstance(v, bool)
          for k, v in aval_state.items()))):
    raise PickleRefusedError(
        f"the pickle sets {aval_state!r} on a jax.Array; only weak_type is "
        "read.")
  array = fun(*args)
  array.__setstate__(state)
  return array


def _create_namedtuple(name: str, fieldnames: Any, modulename: str,
                       defaults: Any = None) -> type:
  del defaults  # Every field is present in a pickled instance.
  return _namedtuple(modulename, name, fieldnames)


ALLOWED[("jax._src.array", "_reconstruct_array")] = _reconstruct_array

for _dill in ("dill._dill", "dill.dill"):
  ALLOWED.update({
      (_dill, "_import_module"): _import_module,
      (_dill, "_get_attr"): _get_attr,
      (_dill, "_create_array"): _create_array,
      (_dill, "_create_namedtuple"): _create_namedtuple,
  })


def _lookup(module: str, name: str) -> Any:
  if (module, name) in ALLOWED:
    return ALLOWED[(module, name)]
  if (module, name) in _KNOWN_NAMEDTUPLES:
    return _namedtuple(module, name, _KNOWN_NAMEDTUPLES[(module, name)])
  raise PickleRefusedError(
      f"the pickle asks for {module}.{name}, which could run code; only "
      "arrays, scalars and containers are read.")


class RestrictedUnpickler(pickle.Unpickler):
  """`pickle.Unpickler` that resolves names only through the allow-list."""

  def find_class(self, module: str, name: str) -> Any:
    return _lookup(module, name)


def load(path: str | os.PathLike) -> Any:
  """Reads a pickle of arrays, scalars and containers.

  Args:
    path: the pickle file.

  Returns:
    The unpickled object: dicts, lists, tuples, named tuples (plain
    `collections.namedtuple` classes), NumPy arrays and scalars, Python
    numbers, strings and bytes.

  Raises:
    PickleRefusedError: the pickle names anything else (it would run code);
      nothing it names has been called.
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
