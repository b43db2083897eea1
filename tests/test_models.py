"""ResNet encoders and MLP heads: parameter counts, shapes, dtypes, init."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol_jax.core import models


def _abstract_variables(model, size, dtype=jnp.float32):
  """Shapes of model.init's variables without computing anything."""
  x = jax.ShapeDtypeStruct((1, size, size, 3), dtype)
  return jax.eval_shape(lambda k, x: model.init(k, x, train=False),
                        jax.random.PRNGKey(0), x)


def _num_params(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("depth,stem,size,expected", [
    # torchvision counts minus the 1000-way fc layer (2048*1000+1000 and
    # 512*1000+1000); the CIFAR stem swaps 7x7x3x64 for 3x3x3x64.
    (50, "imagenet", 224, 23_508_032),
    (18, "imagenet", 224, 11_176_512),
    (18, "cifar", 32, 11_168_832),
])
def test_encoder_param_count(depth, stem, size, expected):
  variables = _abstract_variables(models.resnet(depth, stem=stem), size)
  assert _num_params(variables["params"]) == expected


@pytest.mark.parametrize("depth,width,expected", [
    (18, 1, 512), (34, 2, 1024), (50, 1, 2048), (101, 2, 4096),
    (152, 1, 2048), (200, 3, 6144)])
def test_representation_dim_and_output_shape(depth, width, expected):
  assert models.representation_dim(depth, width) == expected
  model = models.resnet(depth, width=width, stem="cifar")
  variables = _abstract_variables(model, 32)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                       jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.float32))
  assert out.shape == (3, expected)
  assert out.dtype == jnp.float32


def test_width_scales_stem_and_blocks():
  params = _abstract_variables(models.resnet(50, width=2), 64)["params"]
  assert params["stem_conv"]["kernel"].shape == (7, 7, 3, 128)
  assert params["stage1_block1"]["conv3"]["kernel"].shape == (1, 1, 128, 512)
  assert params["stage4_block3"]["bn3"]["scale"].shape == (4096,)


@pytest.mark.parametrize("stem,stem_side,stage_sides", [
    # CIFAR stem: 3x3/1 conv, no max-pool, so stage 1 runs at the full 32 px
    # and the last stage at 32 / 8 = 4 px.
    ("cifar", 32, (32, 16, 8, 4)),
    # ImageNet stem: 7x7/2 conv, then a 3x3/2 max-pool: stage 1 at a quarter.
    ("imagenet", 16, (8, 4, 2, 1)),
])
def test_stem_resolution_into_the_stages(stem, stem_side, stage_sides):
  """Spatial sizes the network actually produces at 32 px, layer by layer."""
  model = models.resnet(18, stem=stem, num_filters=4)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = _abstract_variables(model, 32)
  _, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, capture_intermediates=True,
                               mutable=["intermediates"]), variables, x)
  inter = state["intermediates"]
  assert inter["stem_conv"]["__call__"][0].shape == (2, stem_side,
                                                      stem_side, 4)
  for i, side in enumerate(stage_sides):
    for j in (1, 2):  # ResNet-18: two blocks per stage
      out = inter[f"stage{i + 1}_block{j}"]["__call__"][0]
      assert out.shape == (2, side, side, 4 * 2**i), (i, j, out.shape)


def test_partials_match_resnet():
  a = _abstract_variables(models.ResNet34(), 64)
  b = _abstract_variables(models.resnet(34), 64)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert _num_params(a) == _num_params(b)


def test_resnet18_forward_train_and_eval():
  model = models.ResNet18(stem="cifar")
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  variables = jax.jit(lambda k, x: model.init(k, x, train=True))(
      jax.random.PRNGKey(0), x)

  @jax.jit
  def run(variables, x):
    y, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    y_eval = model.apply(variables, x, train=False)
    return y, y_eval, updates

  y, y_eval, updates = run(variables, x)
  for out in (y, y_eval):
    assert out.shape == (2, 512)
    assert out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))
  # Training moves the moving averages away from their init (mean 0, var 1).
  old = variables["batch_stats"]["stem_bn"]
  new = updates["batch_stats"]["stem_bn"]
  assert not np.allclose(old["mean"], new["mean"])
  assert not np.allclose(old["var"], new["var"])
  assert (jax.tree.structure(updates["batch_stats"])
          == jax.tree.structure(variables["batch_stats"]))


def test_bfloat16_computation_float32_params_and_output():
  model = models.ResNet18(stem="cifar", dtype=jnp.bfloat16)
  variables = _abstract_variables(model, 32)
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                       jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float16))
  assert out.shape == (2, 512)
  assert out.dtype == jnp.float32


@pytest.mark.parametrize("bottleneck,last_bn", [(False, "bn2"),
                                                (True, "bn3")])
def test_zero_init_residual(bottleneck, last_bn):
  # A small two-stage network keeps this fast; the block code is the same.
  kwargs = dict(stage_sizes=(2, 1), bottleneck=bottleneck, num_filters=4,
                stem="cifar")
  x = jnp.zeros((1, 8, 8, 3))

  @jax.jit
  def init_both(key, x):
    zero = models.ResNet(zero_init_residual=True, **kwargs).init(
        key, x, train=False)
    plain = models.ResNet(**kwargs).init(key, x, train=False)
    return zero["params"], plain["params"]

  zero, plain = init_both(jax.random.PRNGKey(0), x)
  blocks = [k for k in zero if k.startswith("stage")]
  assert len(blocks) == 3
  for name in blocks:
    np.testing.assert_array_equal(zero[name][last_bn]["scale"], 0.0)
    np.testing.assert_array_equal(plain[name][last_bn]["scale"], 1.0)
    # Only the last BN of the residual branch is zeroed.
    np.testing.assert_array_equal(zero[name]["bn1"]["scale"], 1.0)
  np.testing.assert_array_equal(zero["stage2_block1"]["downsample_bn"]["scale"],
                                1.0)


def test_conv_init_is_he_fan_out():
  """The model's initialised kernels: untruncated normal, var 2 / fan_out.

  Layers whose fan-in and fan-out differ tell fan-out from fan-in (the stem
  by a factor sqrt(576 / 27)); the tolerance is 4 standard errors of a sample
  std over the layer's n weights, 4 / sqrt(2 n) relative.
  """
  model = models.resnet(18, stem="cifar")
  params = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)),
                                        train=False))(
                                            jax.random.key(0, impl="rbg"))[
                                                "params"]
  assert "bias" not in params["stem_conv"]
  layers = {  # name -> (kh, kw, in, out)
      ("stem_conv",): (3, 3, 3, 64),
      ("stage2_block1", "conv1"): (3, 3, 64, 128),
      ("stage2_block1", "downsample_conv"): (1, 1, 64, 128),
      ("stage4_block1", "conv1"): (3, 3, 256, 512),
      ("stage4_block2", "conv2"): (3, 3, 512, 512),
  }
  for path, shape in layers.items():
    node = params
    for key in path:
      node = node[key]
    kernel = np.asarray(node["kernel"], np.float64)
    assert kernel.shape == shape
    std = np.sqrt(2.0 / (shape[0] * shape[1] * shape[3]))
    tol = 4.0 / np.sqrt(2.0 * kernel.size)
    np.testing.assert_allclose(kernel.std(), std, rtol=tol, err_msg=path)
    assert abs(kernel.mean()) < 4 * std / np.sqrt(kernel.size), path
    if kernel.size > 10**6:
      # A normal has 4.55% of its mass beyond 2 std; a normal truncated
      # there (Flax's default) has none, a uniform of this std 0%.
      tail = np.mean(np.abs(kernel) > 2 * std)
      assert abs(tail - 0.0455) < 0.002, (path, tail)


def test_unknown_depth_raises():
  with pytest.raises(ValueError, match="18, 34, 50, 101, 152, 200"):
    models.resnet(42)
  with pytest.raises(ValueError, match="allowed"):
    models.representation_dim(26, 1)


@pytest.mark.parametrize("kwargs,in_dim,out_dim,dense_shapes,bn_params", [
    # BYOL projector: Linear -> BN -> ReLU -> Linear without bias (official).
    (dict(hidden_dim=64, output_dim=16), 32, 16,
     {"dense1": ((32, 64), True), "dense2": ((64, 16), False)},
     {"bn1": {"scale", "bias"}}),
    # SimSiam predictor: its reference's last Linear keeps its bias.
    (dict(hidden_dim=8, output_dim=32, hidden_bias=False, output_bias=True),
     32, 32, {"dense1": ((32, 8), False), "dense2": ((8, 32), True)},
     {"bn1": {"scale", "bias"}}),
    # SimSiam projector: last BN without affine parameters.
    (dict(hidden_dim=48, output_dim=24, num_layers=3, hidden_bias=False,
          output_bias=False, output_bn=True, output_bn_scale=False,
          output_bn_bias=False), 32, 24,
     {"dense1": ((32, 48), False), "dense2": ((48, 48), False),
      "dense3": ((48, 24), False)},
     {"bn1": {"scale", "bias"}, "bn2": {"scale", "bias"}, "bn3": set()}),
    # SimCLR v2 head: last BN scales but does not centre.
    (dict(hidden_dim=48, output_dim=8, num_layers=3, hidden_bias=False,
          output_bias=False, output_bn=True, output_bn_bias=False), 32, 8,
     {"dense1": ((32, 48), False), "dense2": ((48, 48), False),
      "dense3": ((48, 8), False)},
     {"bn1": {"scale", "bias"}, "bn2": {"scale", "bias"}, "bn3": {"scale"}}),
])
def test_mlp_structure(kwargs, in_dim, out_dim, dense_shapes, bn_params):
  mlp = models.MLP(**kwargs)
  x = jax.ShapeDtypeStruct((4, in_dim), jnp.float32)
  variables = jax.eval_shape(lambda k, x: mlp.init(k, x, train=True),
                             jax.random.PRNGKey(0), x)
  params = flax.core.unfreeze(variables["params"])
  assert set(params) == set(dense_shapes) | {k for k, v in bn_params.items()
                                             if v}
  for name, (shape, has_bias) in dense_shapes.items():
    assert params[name]["kernel"].shape == shape
    assert ("bias" in params[name]) == has_bias
  for name, expected in bn_params.items():
    assert set(params.get(name, {})) == expected
    # Moving averages exist even without affine parameters.
    assert set(variables["batch_stats"][name]) == {"mean", "var"}
  out = jax.eval_shape(lambda v, x: mlp.apply(v, x, train=False), variables, x)
  assert out.shape == (4, out_dim)
  assert out.dtype == jnp.float32


def test_mlp_forward_bfloat16_and_normalised_output():
  mlp = models.MLP(16, 8, num_layers=3, hidden_bias=False, output_bias=False,
                   output_bn=True, output_bn_scale=False, output_bn_bias=False,
                   dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.PRNGKey(0), (32, 12))
  variables = jax.jit(lambda k, x: mlp.init(k, x, train=True))(
      jax.random.PRNGKey(1), x)
  for leaf in jax.tree.leaves(variables["params"]):
    assert leaf.dtype == jnp.float32
  y, _ = jax.jit(lambda v, x: mlp.apply(v, x, train=True,
                                        mutable=["batch_stats"]))(variables, x)
  assert y.shape == (32, 8)
  assert y.dtype == jnp.float32
  # Affine-free output BN in training mode: zero mean, unit variance columns.
  np.testing.assert_allclose(np.mean(np.asarray(y), axis=0), 0.0, atol=0.05)
  np.testing.assert_allclose(np.std(np.asarray(y), axis=0), 1.0, atol=0.05)


def test_byol_classifier_init_is_haiku_linear_default(tiny_config):
  """The official classifier is hk.Linear with its default initialiser: a
  normal of std 1/sqrt(fan_in) truncated at 2 std (actual std 0.8796 /
  sqrt(fan_in); Flax's lecun_normal rescales it to 1 / sqrt(fan_in))."""
  hk = pytest.importorskip("haiku")
  from byol_jax.core.methods import byol  # pylint: disable=g-import-not-at-top
  from byol_jax.core.methods import network  # pylint: disable=g-import-not-at-top
  fan_in, classes = 512, 1000
  ours = np.asarray(network.HAIKU_LINEAR_INIT(
      jax.random.key(0), (fan_in, classes)), np.float64)
  theirs = hk.transform(lambda x: hk.Linear(classes)(x)).init(
      jax.random.key(1), jnp.zeros((1, fan_in)))["linear"]["w"]
  theirs = np.asarray(theirs, np.float64)
  tol = 4.0 / np.sqrt(2.0 * ours.size)   # 4 standard errors of a std
  for w in (ours, theirs):
    np.testing.assert_allclose(w.std() * np.sqrt(fan_in), 0.87962566,
                               rtol=tol)
    assert np.abs(w).max() <= 2.0 / np.sqrt(fan_in) + 1e-7
  # And the BYOL network uses it (SimSiam and SimCLR keep Flax's default).
  config = tiny_config("byol")
  assert byol.make_network(config).classifier_init is network.HAIKU_LINEAR_INIT
