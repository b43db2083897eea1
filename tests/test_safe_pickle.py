"""The restricted unpickler: it reads checkpoints and refuses code."""
import collections
import pickle

import numpy as np
import pytest

from byol_jax.interop import safe_pickle
from byol_jax.errors import ConfigError

import official_pickle


def _evil_pickles(marker):
  command = f"touch {marker}"
  dill_style = official_pickle._Call(  # pylint: disable=protected-access
      official_pickle._Call(  # pylint: disable=protected-access
          official_pickle._Global("dill._dill", "_get_attr"),
          (official_pickle._Call(
              official_pickle._Global("dill._dill", "_import_module"),
              ("os",)), "system")), (command,))
  return {
      "os.system": lambda path: path.write_bytes(
          pickle.dumps(official_pickle.RunsCode(command), protocol=2)),
      "builtins.eval": lambda path: path.write_bytes(pickle.dumps(
          _Eval(f"__import__('os').system({command!r})"), protocol=2)),
      "dill _get_attr(os)": lambda path: official_pickle.dump(
          {"x": dill_style}, path),
  }


class _Eval:

  def __init__(self, source):
    self.source = source

  def __reduce__(self):
    return eval, (self.source,)


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval",
                                  "dill _get_attr(os)"])
def test_restricted_unpickler_refuses_code(tmp_path, kind):
  """A pickle that would run a command is refused before anything runs."""
  marker = tmp_path / "ran"
  path = tmp_path / "evil.pkl"
  _evil_pickles(marker)[kind](path)
  with pytest.raises(safe_pickle.PickleRefusedError) as e:
    safe_pickle.load(path)
  message = str(e.value)
  assert "\n" not in message and "refused" in message, message
  assert "could run code" in message, message
  assert not marker.exists()
  if kind == "os.system":  # The payload is live: plain pickle runs it.
    pickle.loads(path.read_bytes())
    assert marker.exists()


def test_restricted_unpickler_refuses_object_arrays(tmp_path):
  path = tmp_path / "objects.pkl"
  path.write_bytes(pickle.dumps(np.array([1, "a"], dtype=object), protocol=2))
  with pytest.raises(safe_pickle.PickleRefusedError, match="dtype object"):
    safe_pickle.load(path)


def test_restricted_unpickler_names_bad_files(tmp_path):
  with pytest.raises(ConfigError, match="does not exist"):
    safe_pickle.load(tmp_path / "missing.pkl")
  path = tmp_path / "truncated.pkl"
  official_pickle.dump({"w": np.ones((4, 4), np.float32)}, path)
  path.write_bytes(path.read_bytes()[:-20])
  with pytest.raises(ConfigError, match="is not a readable pickle"):
    safe_pickle.load(path)


@pytest.mark.parametrize("wrap_arrays", [False, True])
def test_restricted_unpickler_reads_dill_checkpoint_layout(tmp_path,
                                                          wrap_arrays):
  """Arrays, scalars, Haiku mappings and NamedTuples written as dill does."""
  state_cls = collections.namedtuple("ScaleByLarsState", ("mu",),
                                     module="byol.utils.optimizers")
  rng = np.random.default_rng(0)
  params = {"res_net50/~/initial_conv": {"w": rng.normal(
      size=(7, 7, 3, 8)).astype(np.float32)}}
  obj = dict(experiment_state=(state_cls(
      mu=official_pickle.haiku_tree(params)),), step=np.int64(1234),
             rng=np.array([7, 9], np.uint32), counter=np.array(5, np.int32))
  path = tmp_path / "ckpt.pkl"
  official_pickle.dump(obj, path, wrap_arrays=wrap_arrays)
  got = safe_pickle.load(path)
  (lars,) = got["experiment_state"]
  assert type(lars).__name__ == "ScaleByLarsState" and lars._fields == ("mu",)
  assert type(lars.mu) is dict
  assert type(lars.mu["res_net50/~/initial_conv"]) is dict
  np.testing.assert_array_equal(lars.mu["res_net50/~/initial_conv"]["w"],
                                params["res_net50/~/initial_conv"]["w"])
  assert got["step"] == 1234 and got["step"].dtype == np.int64
  np.testing.assert_array_equal(got["rng"], [7, 9])
  assert got["counter"].shape == () and got["counter"] == 5


class _JaxArrayWithAval:
  """Pickles as a jax.Array that also sets `aval` fields other than weak_type."""

  def __reduce__(self):
    from jax._src import array  # pylint: disable=g-import-not-at-top
    fun, args, state = np.zeros(2, np.uint32).__reduce__()
    return array._reconstruct_array, (  # pylint: disable=protected-access
        fun, args, state, {"weak_type": False, "dtype": "object"})


def test_jax_array_reads_as_numpy_and_only_weak_type_is_accepted(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  ok = tmp_path / "ok.pkl"
  ok.write_bytes(pickle.dumps({"rng": jax.random.PRNGKey(7)}, protocol=2))
  rng = safe_pickle.load(ok)["rng"]
  assert type(rng) is np.ndarray  # pylint: disable=unidiomatic-typecheck
  np.testing.assert_array_equal(rng, np.asarray(jax.random.PRNGKey(7)))
  bad = tmp_path / "bad.pkl"
  bad.write_bytes(pickle.dumps(_JaxArrayWithAval(), protocol=2))
  with pytest.raises(safe_pickle.PickleRefusedError, match="only weak_type"):
    safe_pickle.load(bad)
