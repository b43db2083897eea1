"""Writes pickles in the layout of the official BYOL checkpoints, without dill.

The official code saves `dict(experiment_state=_ByolExperimentState(...),
step=step, rng=rng)` with `dill.dump(..., protocol=2)` (dill 0.3.x, 2020),
after `jax.device_get` turned every leaf into a NumPy array. dill 0.3.3 writes
such a file differently from plain pickle in three ways, which `dump`
reproduces opcode for opcode:

  - NamedTuple classes: `dill._dill._create_namedtuple(name, fields, module)`
    instead of a reference to the class;
  - builtin functions, NumPy's `_reconstruct` and `_codecs.encode` among them:
    `dill._dill._get_attr(dill._dill._import_module(module), name)`;
  - Haiku's parameter mappings: `haiku._src.data_structures.FlatMapping(dict)`
    (Haiku's own `__reduce__`, not dill's).

Some dill builds wrap each array in `dill._dill._create_array(f, args, state,
None)` (its ndarray-subclass check compares bound-method ids);
`wrap_arrays=True` writes that variant.
"""
import os
import pickle
from typing import Any

import numpy as np


class HaikuMapping(dict):
  """Marks a dict that Haiku would have held as a FlatMapping."""


class _Global:
  """A module.name reference written as a GLOBAL opcode."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # save_reduce wants a callable.
    raise NotImplementedError


class _Call:
  """The result of func(*args), written as REDUCE (and memoised)."""

  def __init__(self, func: Any, args: tuple):
    self.func, self.args = func, args

  def __call__(self, *args):
    raise NotImplementedError


class _DillLikePickler(pickle._Pickler):  # pylint: disable=protected-access
  """The pure-Python pickler with dill 0.3.3's reductions."""

  dispatch = pickle._Pickler.dispatch.copy()  # pylint: disable=protected-access

  def __init__(self, file, wrap_arrays: bool):
    super().__init__(file, protocol=2)
    self._wrap_arrays = wrap_arrays
    # One object each, so that later uses are memo references (BINGET).
    self._globals = {}
    self._reconstruct = self._builtin("numpy.core._multiarray_umath",
                                      "_reconstruct")
    self._encode = self._builtin("_codecs", "encode")

  def _global(self, module: str, name: str) -> _Global:
    key = (module, name)
    if key not in self._globals:
      self._globals[key] = _Global(module, name)
    return self._globals[key]

  def _builtin(self, module: str, name: str) -> _Call:
    """dill's reduction of a builtin function: _get_attr(module, name)."""
    return _Call(self._global("dill._dill", "_get_attr"),
                 (_Call(self._global("dill._dill", "_import_module"),
                        (module,)), name))

  def save_global_ref(self, obj, name=None):
    del name
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    self.memoize(obj)

  def save_call(self, obj):
    self.save(obj.func)
    self.save(obj.args)
    self.write(pickle.REDUCE)
    self.memoize(obj)

  dispatch[_Global] = save_global_ref
  dispatch[_Call] = save_call

  def reducer_override(self, obj):
    if isinstance(obj, np.ndarray):
      _, args, state = obj.__reduce__()
      if self._wrap_arrays:
        return (self._global("dill._dill", "_create_array"),
                (self._reconstruct, args, state, None))
      return self._reconstruct, args, state
    if isinstance(obj, bytes):
      return self._encode, (obj.decode("latin1"), "latin1")
    if isinstance(obj, HaikuMapping):
      return (self._global("haiku._src.data_structures", "FlatMapping"),
              (dict(obj),))
    if isinstance(obj, type) and issubclass(obj, tuple) and hasattr(
        obj, "_fields"):
      return (self._global("dill._dill", "_create_namedtuple"),
              (obj.__qualname__, obj._fields, obj.__module__))
    return NotImplemented


def dump(obj: Any, path, wrap_arrays: bool = False) -> None:
  """Writes `obj` as dill 0.3.3 would (protocol 2)."""
  with open(path, "wb") as f:
    _DillLikePickler(f, wrap_arrays).dump(obj)


def haiku_tree(tree: dict) -> HaikuMapping:
  """{module: {name: array}} as nested FlatMappings, as Haiku 0.0.2+ held it."""
  return HaikuMapping({k: HaikuMapping({n: np.asarray(v) for n, v in d.items()})
                       for k, d in tree.items()})


class RunsCode:
  """Unpickling it runs a shell command (the classic pickle exploit)."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)
