"""Padding modes, official BYOL checkpoints in, torchvision state_dicts out."""
import collections
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import byol_jax
from byol_jax.trainer import checkpoint
from byol_jax.interop import pretrained
from byol_jax.trainer import config_lib
from byol_jax.interop import convert_official
from byol_jax.core import models
from byol_jax.core import optim
from byol_jax.interop import safe_pickle
from byol_jax.core import sharding
from byol_jax.core import train_state
from byol_jax.errors import ConfigError
from byol_jax.core.methods import byol

import official_pickle
from testlib import REPO, assert_error_first, noisy_lines, rel_err



def _randomize_batch_stats(variables, seed=0):
  """Non-trivial moving averages so that inference-mode BN matters."""
  rng = np.random.default_rng(seed)
  stats = jax.tree_util.tree_map_with_path(
      lambda p, x: (rng.uniform(0.5, 2.0, x.shape) if p[-1].key == "var"
                    else rng.normal(0.0, 0.2, x.shape)).astype(np.float32),
      variables["batch_stats"])
  return {"params": variables["params"], "batch_stats": stats}


# --------------------------------------------------------------- padding ----
def _reference_forward(variables, x, padding):
  """A 2-stage bottleneck ResNet written with lax ops directly.

  `padding` is lax's 'SAME' or PyTorch's symmetric k // 2 ('symmetric').
  """
  p, s = variables["params"], variables["batch_stats"]

  def pad(k):
    return "SAME" if padding == "same" else [(k // 2, k // 2)] * 2

  def conv(x, w, stride=1):
    k = w.shape[0]
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), pad(k) if k > 1 else "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST)

  def bn(x, p, s):
    return (x - s["mean"]) / jnp.sqrt(s["var"] + 1e-5) * p["scale"] + p["bias"]

  x = conv(x, p["stem_conv"]["kernel"], 2)
  x = jax.nn.relu(bn(x, p["stem_bn"], s["stem_bn"]))
  x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1),
                            (1, 2, 2, 1),
                            "SAME" if padding == "same"
                            else [(0, 0), (1, 1), (1, 1), (0, 0)])
  for name, stride in (("stage1_block1", 1), ("stage2_block1", 2)):
    bp, bs = p[name], s[name]
    y = jax.nn.relu(bn(conv(x, bp["conv1"]["kernel"]), bp["bn1"], bs["bn1"]))
    y = jax.nn.relu(bn(conv(y, bp["conv2"]["kernel"], stride), bp["bn2"],
                       bs["bn2"]))
    y = bn(conv(y, bp["conv3"]["kernel"]), bp["bn3"], bs["bn3"])
    r = bn(conv(x, bp["downsample_conv"]["kernel"], stride),
           bp["downsample_bn"], bs["downsample_bn"])
    x = jax.nn.relu(y + r)
  return jnp.mean(x, axis=(1, 2))


@pytest.mark.parametrize("size", [64, 63])
def test_same_padding_is_lax_same(nette_64, size):
  """'same' is lax/TF/Haiku 'SAME' in every strided layer, even and odd sizes.

  'symmetric' matches the symmetric reference, and the two modes differ on
  real images (the stride-2 layers sample other pixels), so the comparison
  can tell them apart.
  """
  x = nette_64[:, :size, :size]
  out = {}
  for padding in ("same", "symmetric"):
    net = models.ResNet(stage_sizes=(1, 1), bottleneck=True, num_filters=4,
                        padding=padding)
    variables = _randomize_batch_stats(
        net.init(jax.random.key(0), x, train=False))
    with jax.default_matmul_precision("highest"):
      out[padding] = net.apply(variables, x, train=False)
    ref = _reference_forward(variables, x, padding)
    assert rel_err(out[padding], ref) < 1e-5, padding
  if size % 2 == 0:
    assert rel_err(out["same"], out["symmetric"]) > 1e-2


def test_unknown_padding_is_one_config_error():
  from byol_jax.core.methods import network  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config.model.padding = "reflect"
  with pytest.raises(ConfigError, match="model.padding='reflect'"):
    network.make_encoder(config)


def test_config_without_classifier_optimizer_loads_as_its_own_sgd():
  """Before optimizer.classifier existed every classifier had its own SGD:
  an old SimSiam or SimCLR checkpoint's config says so, and resumes."""
  old = config_lib.config_to_json(config_lib.base_config())
  del old["optimizer"]["classifier"]
  assert config_lib.config_from_json(old).optimizer.classifier == "sgd"
  assert config_lib.base_config().optimizer.classifier == "main"


def test_config_without_padding_loads_as_symmetric():
  """A checkpoint config written before model.padding existed still loads."""
  old = config_lib.config_to_json(config_lib.base_config())
  del old["model"]["padding"]
  old["model"]["depth"] = 18
  config = config_lib.config_from_json(old)
  assert config.model.padding == "symmetric"
  assert config.model.depth == 18


# ------------------------------------------- official checkpoints (Haiku) ---
def _haiku_byol(width: int, blocks=(3, 4, 6, 3), name="res_net50"):
  """BYOL's network in Haiku, as the official code builds it.

  hk.nets.ResNet is the official encoder's module tree (res_net50/~/...) and
  SAME padding; its logits layer, which the official encoder never calls, is
  set to the identity so that it returns the pooled representation. The
  heads are the official MLP (Linear, BatchNorm, ReLU, Linear without bias).
  """
  hk = pytest.importorskip("haiku")

  class MLP(hk.Module):

    def __init__(self, hidden, out, name):
      super().__init__(name=name)
      self.hidden, self.out = hidden, out

    def __call__(self, x, is_training):
      x = hk.Linear(self.hidden)(x)
      x = hk.BatchNorm(True, True, decay_rate=0.9, eps=1e-5)(x, is_training)
      return hk.Linear(self.out, with_bias=False)(jax.nn.relu(x))

  def forward(x, is_training):
    dim = 2048 * width
    y = hk.nets.ResNet(
        blocks_per_group=blocks, num_classes=dim, bottleneck=True,
        channels_per_group=tuple(c * width for c in (256, 512, 1024, 2048)),
        initial_conv_config=dict(output_channels=64 * width),
        name=name)(x, is_training)
    z = MLP(64, 16, "projector")(y, is_training)
    return dict(repr=y, proj=z, pred=MLP(32, 16, "predictor")(z, is_training),
                logits=hk.Linear(10, name="classifier")(y))

  return hk.transform_with_state(forward)


def _random_haiku_variables(net, x, seed):
  """Random weights, BN affines and moving averages in Haiku's trees.

  `hidden` differs from `average` (the official files have them equal) so
  that reading the wrong one shows.
  """
  rng = np.random.default_rng(seed)
  shapes, state_shapes = jax.eval_shape(
      lambda: net.init(jax.random.key(0), x, True))
  params = {}
  for module, leaves in shapes.items():
    params[module] = {}
    for name, s in leaves.items():
      if name == "scale":
        value = rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
      else:  # float32 draws: fast for ResNet-50's kernels.
        std = np.prod(s.shape[:-1]) ** -0.5 if name == "w" else 0.1
        value = rng.standard_normal(s.shape, np.float32) * np.float32(std)
      params[module][name] = value
  state = {}
  for module, leaves in state_shapes.items():
    shape = leaves["average"].shape
    average = (rng.uniform(0.5, 2.0, shape) if module.endswith("var_ema")
               else rng.normal(0, 0.2, shape))
    state[module] = dict(average=average.astype(np.float32),
                         hidden=rng.normal(0, 1, shape).astype(np.float32),
                         counter=np.asarray(1000, np.int32))
  return params, state


def _official_checkpoint(path, width, x):
  """Writes an official-layout pickle; returns Haiku's online outputs on x.

  Returns:
    {'outputs': Haiku's online outputs on x, 'online', 'target',
    'target_state', 'mu'}: the Haiku trees written.
  """
  net = _haiku_byol(width)
  online, online_state = _random_haiku_variables(net, x, seed=1)
  target, target_state = _random_haiku_variables(net, x, seed=2)
  mu, _ = _random_haiku_variables(net, x, seed=3)
  dim = 2048 * width
  logits = {"w": np.eye(dim, dtype=np.float32),
            "b": np.zeros(dim, np.float32)}
  outputs, _ = net.apply({**online, "res_net50/~/logits": logits},
                         online_state, None, x, False)
  for tree in (online, target, mu):  # The official encoder has no logits.
    del tree["res_net50/~/logits"]
  fields = ("online_params", "target_params", "online_state", "target_state",
            "opt_state")
  state_cls = collections.namedtuple("_ByolExperimentState", fields,
                                     module="byol.byol_experiment")
  lars_cls = collections.namedtuple("ScaleByLarsState", ("mu",),
                                    module="byol.utils.optimizers")
  decay_cls = collections.namedtuple("AddWeightDecayState", (),
                                     module="byol.utils.optimizers")
  scale_cls = collections.namedtuple("ScaleState", (),
                                     module="optax._src.transform")
  tree = official_pickle.haiku_tree
  official_pickle.dump(dict(
      experiment_state=state_cls(
          tree(online), tree(target), tree(online_state), tree(target_state),
          (decay_cls(), lars_cls(mu=tree(mu)), scale_cls())),
      step=12345, rng=np.array([0, 42], np.uint32)), path)

  def experiment_state():  # As today's Haiku holds it: plain dicts.
    return state_cls(online, target, online_state, target_state,
                     (decay_cls(), lars_cls(mu=mu), scale_cls()))

  return dict(outputs=jax.tree.map(np.asarray, outputs), online=online,
              target=target, target_state=target_state, mu=mu,
              experiment_state=experiment_state)


def _run_cli(*args):
  return subprocess.run([sys.executable, "-m", "byol_jax.convert", *args],
                        capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def official_r50(tmp_path_factory, nette_64):
  """An official-layout ResNet-50 x1 checkpoint and Haiku's outputs on x."""
  pkl = tmp_path_factory.mktemp("official") / "pretrain_res50x1.pkl"
  x = nette_64[:4]
  return dict(pkl=pkl, x=x, **_official_checkpoint(pkl, 1, x))


@pytest.fixture(scope="module")
def official_r50_workdir(tmp_path_factory, official_r50):
  """The CLI's conversion of the numpy-only official-layout file."""
  workdir = tmp_path_factory.mktemp("converted") / "workdir"
  r = _run_cli("from-official", f"--checkpoint={official_r50['pkl']}",
               f"--workdir={workdir}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "ResNet-50 x1, step 12345, LARS momentum kept" in r.stdout
  # A quiet console: its one line, no Orbax INFO, no TensorFlow notices.
  assert len((r.stdout + r.stderr).strip().splitlines()) == 1, r.stderr
  assert not noisy_lines(r.stdout + r.stderr), r.stderr[-3000:]
  return workdir


def test_from_official_matches_haiku(official_r50, official_r50_workdir):
  """An official-layout ResNet-50 converts; byol_jax computes what Haiku does.

  Representations (via load_encoder), projections, predictions and logits
  agree with Haiku's inference mode on real images; the target network and
  the LARS momentum (the classifier's too: it is in the LARS chain) land
  where the trainer restores them.
  """
  x, expected = official_r50["x"], official_r50["outputs"]
  target, mu = official_r50["target"], official_r50["mu"]
  workdir = official_r50_workdir

  encoder, variables = byol_jax.load_encoder(str(workdir))
  assert encoder.padding == "same"
  with jax.default_matmul_precision("highest"):
    features = encoder.apply(variables, x, train=False)
  assert rel_err(features, expected["repr"]) < 1e-4

  config, state, step = pretrained.load_run(str(workdir))
  assert step == 12345 and config.model.padding == "same"
  model = byol.make_network(config)
  with jax.default_matmul_precision("highest"):
    out = model.apply({"params": state["params"],
                       "batch_stats": state["batch_stats"]}, x, train=False)
  for key in ("repr", "proj", "pred", "logits"):
    assert rel_err(out[key], expected[key]) < 1e-4, key

  # The trainer's own restore: same structure, step, counts and momentum.
  tx, _ = optim.build_optimizer(config, 20000, 100)
  mesh = sharding.make_mesh()
  abstract = train_state.abstract(config, model, tx, mesh, True)
  ckpt = checkpoint.Checkpointer(str(workdir), config)
  restored = jax.device_get(ckpt.restore(abstract, max(ckpt.all_steps())))
  ckpt.close()
  assert int(restored.step) == 12345
  main = restored.opt_state.inner_states["main"].inner_state
  np.testing.assert_array_equal(
      main[2].trace["encoder"]["stage2_block1"]["conv2"]["kernel"],
      mu["res_net50/~/block_group_1/~/block_0/~/conv_1"]["w"])
  np.testing.assert_array_equal(
      main[2].trace["projector"]["bn1"]["scale"],
      mu["projector/batch_norm"]["scale"].reshape(-1))
  assert int(main[3].count) == 12345
  np.testing.assert_array_equal(main[2].trace["classifier"]["kernel"],
                                mu["classifier"]["w"])
  np.testing.assert_array_equal(main[2].trace["classifier"]["bias"],
                                mu["classifier"]["b"])
  np.testing.assert_array_equal(
      restored.target["params"]["encoder"]["stage4_block3"]["conv3"]["kernel"],
      target["res_net50/~/block_group_3/~/block_2/~/conv_2"]["w"])
  for head in ("projector", "predictor"):  # No output bias, as Haiku's.
    assert set(restored.params[head]["dense2"]) == {"kernel"}


def test_from_official_target_network(tmp_path, official_r50,
                                      official_r50_dill):
  """--which=target: the EMA network in the online slot, fresh momentum.

  Converted from the file the official Checkpointer writes today (dill,
  `rng` a jax.Array).
  """
  workdir = tmp_path / "target"
  summary = convert_official.from_official(str(official_r50_dill),
                                           str(workdir), which="target")
  assert summary["which"] == "target" and not summary["momentum"]
  _, state, _ = pretrained.load_run(str(workdir))
  target, target_state = official_r50["target"], official_r50["target_state"]
  for slot in (state["params"], state["target"]["params"]):
    np.testing.assert_array_equal(
        slot["encoder"]["stage3_block6"]["bn2"]["scale"],
        target["res_net50/~/block_group_2/~/block_5/~/batchnorm_1"]["scale"]
        .reshape(-1))
  np.testing.assert_array_equal(
      state["params"]["predictor"]["dense1"]["kernel"],
      target["predictor/linear"]["w"])
  np.testing.assert_array_equal(
      state["batch_stats"]["encoder"]["stem_bn"]["mean"],
      target_state["res_net50/~/initial_batchnorm/~/mean_ema"]["average"]
      .reshape(-1))
  traces = [leaf for path, leaf in
            jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
            if "trace" in jax.tree_util.keystr(path)]
  assert traces and all(not np.any(t) for t in traces)


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _dill_checkpoint(path, experiment_state, rng):
  """What the official Checkpointer writes today: dill protocol 2 of
  dict(experiment_state, step, rng), `rng` as the run holds it."""
  dill = pytest.importorskip("dill")
  with open(path, "wb") as f:
    dill.dump(dict(experiment_state=experiment_state, step=12345, rng=rng),
              f, protocol=2)


@pytest.fixture(scope="module")
def official_r50_dill(tmp_path_factory, official_r50):
  """official_r50's state as the official Checkpointer writes it today."""
  pkl = tmp_path_factory.mktemp("dill") / "pretrain_res50x1.pkl"
  _dill_checkpoint(pkl, official_r50["experiment_state"](),
                   jax.random.PRNGKey(42))
  assert b"jax._src.array\n_reconstruct_array" in pkl.read_bytes()
  return pkl


def test_jax_array_in_a_dill_pickle_is_read_as_numpy(tmp_path, official_r50):
  """`rng` a jax.random.PRNGKey array pickles as jax._src.array.
  _reconstruct_array(numpy's _reconstruct, ...): read as the NumPy array
  it holds, dtype and values, next to a state of today's plain dicts."""
  pkl = tmp_path / "small.pkl"
  rng = jax.random.PRNGKey(42)
  state = official_r50["experiment_state"]()._replace(
      online_params={"classifier": {"w": np.arange(6.0).reshape(2, 3)}},
      target_params={}, online_state={}, target_state={}, opt_state=())
  _dill_checkpoint(pkl, state, rng)
  assert b"jax._src.array\n_reconstruct_array" in pkl.read_bytes()
  loaded = safe_pickle.load(pkl)
  assert type(loaded["rng"]) is np.ndarray  # pylint: disable=unidiomatic-typecheck
  assert loaded["rng"].dtype == np.uint32
  np.testing.assert_array_equal(loaded["rng"], np.asarray(rng))
  np.testing.assert_array_equal(
      loaded["experiment_state"].online_params["classifier"]["w"],
      np.arange(6.0).reshape(2, 3))
  assert loaded["step"] == 12345


@pytest.mark.slow
def test_from_official_dill_file_converts_into_the_same_run(
    tmp_path, official_r50_dill, official_r50_workdir):
  """The file as the official Checkpointer writes it today converts into
  exactly the run, leaf by leaf, that the numpy-only file gives (slow:
  a second ResNet-50 conversion)."""
  workdir = tmp_path / "workdir"
  summary = convert_official.from_official(str(official_r50_dill),
                                           str(workdir))
  assert summary["step"] == 12345 and summary["momentum"]
  config_a, state_a, step_a = pretrained.load_run(str(official_r50_workdir))
  config_b, state_b, step_b = pretrained.load_run(str(workdir))
  assert step_a == step_b == 12345
  assert config_a.to_dict() == config_b.to_dict()
  a, b = _leaves(state_a), _leaves(state_b)
  assert a.keys() == b.keys() and len(a) > 400
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


class _ArrayOf:
  """Pickles as a jax.Array whose reconstruction calls `fun(*args)`."""

  def __init__(self, fun, args):
    self.fun, self.args = fun, args

  def __reduce__(self):
    from jax._src import array  # pylint: disable=g-import-not-at-top
    state = (1, (2,), np.dtype(np.uint32), False, bytes(8))
    return array._reconstruct_array, (  # pylint: disable=protected-access
        self.fun, self.args, state, {"weak_type": False})


@pytest.mark.parametrize("fun,what", [
    ("os.system", "posix.system"),
    ("codecs.encode", "other than NumPy's _reconstruct"),
])
def test_from_official_refuses_other_functions_in_a_jax_array(
    tmp_path, official_r50, fun, what):
  """The same file with another function inside _reconstruct_array: one
  refusal, nothing run, no workdir."""
  import codecs  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  marker = tmp_path / "ran"
  rng = (_ArrayOf(os.system, (f"touch {marker}",)) if fun == "os.system"
         else _ArrayOf(codecs.encode, ("x", "latin1")))
  pkl = tmp_path / "evil.pkl"
  # The Checkpointer's dict with a small state: the refusal comes at rng.
  _dill_checkpoint(pkl, official_r50["experiment_state"]()._replace(
      online_params={}, target_params={}, online_state={}, target_state={},
      opt_state=()), rng)
  with pytest.raises(safe_pickle.PickleRefusedError, match="refused") as e:
    convert_official.from_official(str(pkl), str(tmp_path / "workdir"))
  assert what in str(e.value) and "\n" not in str(e.value)
  assert not marker.exists() and not (tmp_path / "workdir").exists()


@pytest.mark.parametrize("depth,width", [(50, 2), (200, 1)])
def test_from_official_mapping_other_sizes(depth, width):
  """ResNet-50 x2 and ResNet-200 trees map leaf by leaf onto byol_jax's."""
  x = np.zeros((1, 32, 32, 3), np.float32)
  blocks = {50: (3, 4, 6, 3), 200: (3, 24, 36, 3)}[depth]
  net = _haiku_byol(width, blocks, name=f"res_net{depth}")
  params, state = _random_haiku_variables(net, x, seed=0)
  prefix = f"res_net{depth}"
  del params[prefix + "/~/logits"]
  assert convert_official.encoder_prefix(params) == prefix
  arch = convert_official.architecture(params, prefix)
  assert arch == dict(depth=depth, width=width, num_filters=64)
  converted, stats = convert_official.convert_tree(params, state, prefix)
  config = convert_official.make_config(arch, converted)
  want = jax.eval_shape(lambda: byol.make_network(config).init(
      jax.random.key(0), x, train=True))
  for got, ref in ((converted, want["params"]), (stats, want["batch_stats"])):
    assert jax.tree.structure(got) == jax.tree.structure(ref)
    assert jax.tree.map(np.shape, got) == jax.tree.map(lambda s: s.shape, ref)
  # byol_jax's network has exactly the official parameters: the same count,
  # and a bias on exactly the layers that have one in Haiku (the heads'
  # hidden layers and the classifier, not the heads' output layers).
  assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(want["params"])) \
      == sum(np.size(v) for leaves in params.values() for v in leaves.values())
  biased = {m for m, leaves in params.items() if "b" in leaves}
  assert biased == {"projector/linear", "predictor/linear", "classifier"}
  for head in ("projector", "predictor"):
    assert "bias" in want["params"][head]["dense1"]
    assert "bias" not in want["params"][head]["dense2"]
  assert "bias" in want["params"]["classifier"]
  stem = converted["encoder"]["stem_conv"]["kernel"]
  assert stem.shape == (7, 7, 3, 64 * width)
  np.testing.assert_array_equal(stem, params[prefix + "/~/initial_conv"]["w"])
  np.testing.assert_array_equal(
      converted["encoder"]["stage2_block1"]["conv2"]["kernel"],  # stride 2
      params[prefix + "/~/block_group_1/~/block_0/~/conv_1"]["w"])
  np.testing.assert_array_equal(
      stats["encoder"]["stage3_block1"]["downsample_bn"]["var"],
      state[prefix + "/~/block_group_2/~/block_0/~/shortcut_batchnorm/~/"
            "var_ema"]["average"].reshape(-1))


def test_from_official_refuses_basic_block_resnets():
  """BYOL's Haiku ResNet-18 has a projection shortcut byol_jax lacks.

  (The official ResNetTorso sets use_projection on every group, unlike
  hk.nets.ResNet18.)
  """
  hk = pytest.importorskip("haiku")
  net = hk.transform_with_state(lambda x: hk.nets.ResNet(
      (2, 2, 2, 2), 10, bottleneck=False,
      channels_per_group=(64, 128, 256, 512), use_projection=(True,) * 4,
      name="res_net18")(x, True))
  params, _ = jax.eval_shape(lambda: net.init(
      jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)))
  assert "res_net18/~/block_group_0/~/block_0/~/shortcut_conv" in params
  with pytest.raises(ConfigError, match="res_net18 has basic blocks"):
    convert_official.architecture(params, "res_net18")


def test_from_official_refuses_other_pickles(tmp_path):
  """Foreign or malicious files get one error line and no workdir."""
  not_byol = tmp_path / "weights.pkl"
  official_pickle.dump({"params": {"w": np.ones(3, np.float32)}}, not_byol)
  with pytest.raises(ConfigError, match="not an official BYOL checkpoint"):
    convert_official.from_official(str(not_byol), str(tmp_path / "a"))
  evil = tmp_path / "evil.pkl"
  evil.write_bytes(pickle.dumps(official_pickle.RunsCode(f"touch {tmp_path / 'ran'}"),
                                protocol=2))
  r = _run_cli("from-official", f"--checkpoint={evil}",
               f"--workdir={tmp_path / 'b'}")
  error = assert_error_first(r)
  assert "refused" in error and "posix.system" in error
  assert not (tmp_path / "ran").exists() and not (tmp_path / "b").exists()
