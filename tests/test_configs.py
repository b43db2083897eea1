"""The shipped configs against DESIGN.md's tables (sections 3 and 4).

Every expected value below is written out from DESIGN, not read from the
configs or from `config_lib`, so a changed default (say grayscale 0.2 -> 0.0
in T') fails here. Learning rates are checked through the schedule that
`optim.build_optimizer` makes of the config, so the scaling rule is tested
too, not only the base value.
"""
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol_jax.core import optim
from testlib import REPO, load_config

# DESIGN 3, ImageNet presets: epochs -> (base LR, weight decay, tau_base).
BYOL_PRESETS = {
    40: (0.45, 1e-6, 0.97),
    100: (0.45, 1e-6, 0.99),
    300: (0.3, 1e-6, 0.99),
    1000: (0.2, 1.5e-6, 0.996),
}

# DESIGN 3, augmentations T | T' (probabilities, then jitter strengths:
# brightness +-0.4, contrast x U[0.6, 1.4], saturation x U[0.8, 1.2],
# hue +-0.1).
BYOL_T = dict(flip=0.5, color_jitter=0.8, brightness=0.4, contrast=0.4,
              saturation=0.2, hue=0.1, grayscale=0.2, blur=1.0, solarize=0.0)
BYOL_T_PRIME = dict(flip=0.5, color_jitter=0.8, brightness=0.4, contrast=0.4,
                    saturation=0.2, hue=0.1, grayscale=0.2, blur=0.1,
                    solarize=0.2)
BYOL_CROP = dict(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3))

# DESIGN 3, the rest of BYOL: ResNet-50, heads 4096 -> 256, LARS.
BYOL_COMMON = {
    "method": "byol", "batch_size": 4096, "warmup_epochs": 10,
    "model.depth": 50, "model.width": 1, "model.stem": "imagenet",
    "model.bn_momentum": 0.9, "model.bn_epsilon": 1e-5,
    "projector.hidden_dim": 4096, "projector.output_dim": 256,
    "projector.num_layers": 2,
    "predictor.hidden_dim": 4096, "predictor.output_dim": 256,
    "predictor.num_layers": 2,
    "optimizer.name": "lars", "optimizer.eta": 1e-3,
    "optimizer.momentum": 0.9, "optimizer.nesterov": False,
    "optimizer.lr_scaling": "linear", "optimizer.fixed_lr_predictor": False,
    # The online classifier in the LARS chain at the main LR (official code).
    "optimizer.classifier": "main",
    "data.image_size": 224, "data.eval_crop_fraction": 224 / 256,
    "augment.normalize": True,
}

# DESIGN 4, SimSiam (batch 512, 100 epochs): the same T for both views.
SIMSIAM = {
    "method": "simsiam", "batch_size": 512, "num_epochs": 100,
    "model.depth": 50, "model.stem": "imagenet",
    "projector.hidden_dim": 2048, "projector.output_dim": 2048,
    "projector.num_layers": 3,
    "predictor.hidden_dim": 512, "predictor.output_dim": 2048,
    "predictor.num_layers": 2,
    "optimizer.name": "sgd", "optimizer.base_lr": 0.05,
    "optimizer.lr_scaling": "linear", "optimizer.momentum": 0.9,
    "optimizer.weight_decay": 1e-4, "optimizer.fixed_lr_predictor": True,
    "data.crop_scale": (0.2, 1.0),
    # DESIGN 3: solo-learn's online classifier, SGD at 0.1 x batch / 256.
    "optimizer.classifier": "sgd", "optimizer.classifier_lr": 0.1,
}
SIMSIAM_VIEW = dict(flip=0.5, color_jitter=0.8, brightness=0.4, contrast=0.4,
                    saturation=0.4, hue=0.1, grayscale=0.2, blur=0.5,
                    solarize=0.0)

# DESIGN 4, SimCLR: 3-layer head to 128, temperature 0.1, LARS, 10 warm-up
# epochs; colour-jitter strength 1.0 (0.8/0.8/0.8/0.2), grayscale 0.2, blur
# p 0.5, no solarize, in both views.
SIMCLR = {
    "method": "simclr", "temperature": 0.1, "warmup_epochs": 10,
    "model.depth": 50, "projector.output_dim": 128, "projector.num_layers": 3,
    "optimizer.name": "lars", "optimizer.weight_decay": 1e-6,
    "optimizer.classifier": "sgd", "optimizer.classifier_lr": 0.1,
}
SIMCLR_VIEW = dict(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2,
                   grayscale=0.2, blur=0.5, solarize=0.0)


def _get(config, dotted):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def assert_fields(config, expected: dict, where: str):
  for key, want in expected.items():
    got = _get(config, key)
    if isinstance(want, tuple):
      got = tuple(got)
    assert got == pytest.approx(want), f"{where}: {key} = {got}, not {want}"


def assert_view(view, expected: dict, where: str):
  got = {k: float(view[k]) for k in expected}
  assert got == pytest.approx(expected), f"{where}"


def peak_and_warmup(config, steps_per_epoch=100):
  """(lr at step 0, lr at the end of warm-up, warm-up steps) of the schedule
  `build_optimizer` makes, the warm-up located from the schedule itself."""
  total = int(config.num_epochs * steps_per_epoch)
  _, schedule = optim.build_optimizer(config, total, steps_per_epoch)
  lrs = np.asarray(jax.vmap(schedule)(jnp.arange(total)))
  top = int(np.argmax(lrs))
  return float(lrs[0]), float(lrs[top]), top


@pytest.mark.parametrize("epochs", sorted(BYOL_PRESETS))
def test_byol_r50_preset_matches_design(epochs):
  base_lr, wd, tau_base = BYOL_PRESETS[epochs]
  c = load_config("byol_r50", f"epochs={epochs}")
  where = f"byol_r50 epochs={epochs}"
  assert_fields(c, dict(BYOL_COMMON, num_epochs=epochs, tau_base=tau_base,
                        **{"optimizer.base_lr": base_lr,
                           "optimizer.weight_decay": wd}), where)
  assert_view(c.augment.view1, BYOL_T, where + " T")
  assert_view(c.augment.view2, BYOL_T_PRIME, where + " T'")
  assert_fields(c, {f"data.{k}": v for k, v in BYOL_CROP.items()}, where)
  # LR = base_lr * 4096 / 256, reached linearly from 0 after 10 epochs.
  lr0, peak, warmup = peak_and_warmup(c)
  assert lr0 == 0.0
  assert peak == pytest.approx(base_lr * 4096 / 256, rel=1e-6)
  assert warmup == 10 * 100


# ImageNet's training set (TFDS imagenet2012 'train').
IMAGENET_TRAIN = 1_281_167


@pytest.mark.parametrize("epochs,total", [
    (100, 31_278), (300, 93_835), (1000, 312_784)])
def test_byol_r50_step_counts_are_the_official_code_s(epochs, total):
  """DESIGN 3: total = epochs * N // B and warm-up = 10 * N // B (the
  official configs' max_steps and warmup_steps), not epochs * (N // B)."""
  c = load_config("byol_r50", f"epochs={epochs}")
  assert total == epochs * IMAGENET_TRAIN // 4096
  got_total, got_warmup, per_epoch = optim.schedule_steps(c, IMAGENET_TRAIN)
  assert (got_total, got_warmup, per_epoch) == (total, 3_127, 312)
  assert got_warmup == 10 * IMAGENET_TRAIN // 4096
  # The schedule the trainer builds from them peaks there and ends at 0.
  _, schedule = optim.build_optimizer(c, got_total, per_epoch, got_warmup)
  peak = c.optimizer.base_lr * 16
  assert float(schedule(3_127)) == pytest.approx(peak, rel=1e-6)
  assert float(schedule(3_126)) < peak
  assert float(schedule(total)) == 0.0 < float(schedule(total - 100))


def test_byol_r50_has_no_other_presets():
  with pytest.raises(ValueError, match="40, 100, 300, 1000"):
    load_config("byol_r50", "epochs=200")


def test_byol_lars_excludes_biases_and_batch_norm():
  """The preset's optimizer: kernels get decay and the trust ratio, biases
  and BN parameters neither (DESIGN 3)."""
  c = load_config("byol_r50", "epochs=300")
  steps_per_epoch = 10
  tx, schedule = optim.build_optimizer(c, 3000, steps_per_epoch)
  rng = np.random.default_rng(0)
  params = {"encoder": {
      "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)),
                                     jnp.float32)},
      "bn": {"scale": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
             "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}},
      "projector": {"dense1": {
          "kernel": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32),
          "bias": jnp.asarray(rng.normal(size=(8,)), jnp.float32)}}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  state = tx.init(params)
  update = jax.jit(tx.update)
  _, state = update(zeros, state, params)      # step 0: lr 0
  updates, _ = update(zeros, state, params)    # step 1: lr = peak / 100
  lr1 = float(schedule(1))
  assert lr1 == pytest.approx(0.3 * 16 / 100, rel=1e-5)
  # With a zero gradient a kernel's decayed update wd * p has trust
  # eta ||p|| / ||wd p|| = eta / wd: the step is lr (1 + momentum) eta p,
  # whatever the (positive) weight decay.
  for kernel, upd in ((params["encoder"]["conv"]["kernel"],
                       updates["encoder"]["conv"]["kernel"]),
                      (params["projector"]["dense1"]["kernel"],
                       updates["projector"]["dense1"]["kernel"])):
    np.testing.assert_allclose(upd, -lr1 * 1.9 * 1e-3 * np.asarray(kernel),
                               rtol=1e-5)
  # Biases and BN scales/offsets: no decay, so no update at all.
  for leaf in (updates["encoder"]["bn"]["scale"],
               updates["encoder"]["bn"]["bias"],
               updates["projector"]["dense1"]["bias"]):
    np.testing.assert_array_equal(leaf, 0.0)
  # And no trust ratio: a unit gradient moves a bias by lr (1 + momentum).
  ones = jax.tree.map(jnp.ones_like, params)
  _, state = update(ones, tx.init(params), params)
  updates, _ = update(ones, state, params)
  np.testing.assert_allclose(updates["encoder"]["bn"]["bias"], -lr1 * 1.9,
                             rtol=1e-5)
  np.testing.assert_allclose(updates["projector"]["dense1"]["bias"],
                             -lr1 * 1.9, rtol=1e-5)


def test_simsiam_r50_matches_design():
  c = load_config("simsiam_r50")
  assert_fields(c, SIMSIAM, "simsiam_r50")
  assert_view(c.augment.view1, SIMSIAM_VIEW, "simsiam_r50 view1")
  assert_view(c.augment.view2, SIMSIAM_VIEW, "simsiam_r50 view2")
  _, peak, _ = peak_and_warmup(c)
  assert peak == pytest.approx(0.05 * 512 / 256, rel=1e-6)


@pytest.mark.parametrize("arg,batch,peak", [
    ("", 4096, 0.3 * 4096 / 256),
    ("lr_scaling=sqrt", 4096, 0.075 * math.sqrt(4096)),
    ("batch=1024", 1024, 0.3 * 1024 / 256),                   # 1.2
    ("batch=1024,lr_scaling=sqrt", 1024, 0.075 * math.sqrt(1024)),  # 2.4
])
def test_simclr_r50_matches_design(arg, batch, peak):
  c = load_config("simclr_r50", arg)
  assert_fields(c, dict(SIMCLR, batch_size=batch), f"simclr_r50:{arg}")
  assert_view(c.augment.view1, SIMCLR_VIEW, "simclr_r50 view1")
  assert_view(c.augment.view2, SIMCLR_VIEW, "simclr_r50 view2")
  lr0, got, warmup = peak_and_warmup(c)
  assert lr0 == 0.0 and warmup == 10 * 100
  assert got == pytest.approx(peak, rel=1e-6)


def test_byol_cifar10_is_the_imagenet_recipe_without_blur():
  """DESIGN 3: for CIFAR the blur is off in both views and crops are 32 px;
  the rest of T and T' is unchanged."""
  c = load_config("byol_cifar10")
  assert_view(c.augment.view1, dict(BYOL_T, blur=0.0), "byol_cifar10 T")
  assert_view(c.augment.view2, dict(BYOL_T_PRIME, blur=0.0), "byol_cifar10 T'")
  assert_fields(c, {"data.image_size": 32, "model.stem": "cifar",
                    "projector.hidden_dim": 4096, "projector.output_dim": 256,
                    "predictor.hidden_dim": 4096,
                    "predictor.output_dim": 256,
                    **{f"data.{k}": v for k, v in BYOL_CROP.items()}},
                "byol_cifar10")
  # DESIGN 5, solo-learn's CIFAR BYOL (the anchor's recipe): LARS eta 0.02
  # with LR clipping, base LR 1.0, wd 1e-5, batch 256, tau 0.99, classifier
  # LR 0.1.
  assert_fields(c, {"optimizer.name": "lars", "optimizer.eta": 0.02,
                    "optimizer.clip_lr": True, "optimizer.base_lr": 1.0,
                    "optimizer.weight_decay": 1e-5, "batch_size": 256,
                    "tau_base": 0.99, "optimizer.classifier": "sgd",
                    "optimizer.classifier_lr": 0.1}, "byol_cifar10")


@pytest.mark.parametrize("name", ["simsiam_cifar10", "simclr_cifar10"])
def test_cifar_configs_blur_off_and_same_views(name):
  c = load_config(name)
  assert c.data.image_size == 32 and c.model.stem == "cifar"
  assert c.augment.view1["blur"] == 0.0
  assert dict(c.augment.view1) == dict(c.augment.view2)
  assert c.optimizer.classifier == "sgd"
  assert c.optimizer.classifier_lr == 0.1
  if name == "simclr_cifar10":
    # DESIGN 4: temperature 0.2 to 0.5 on CIFAR; jitter strength 1.0; the
    # head's output 128; solo-learn's LARS (eta 0.02, LR clipping).
    assert 0.2 <= c.temperature <= 0.5
    assert_view(c.augment.view1, dict(SIMCLR_VIEW, blur=0.0), name)
    assert c.projector.output_dim == 128
    assert c.optimizer.eta == 0.02 and c.optimizer.clip_lr
  else:
    # DESIGN 4, SimSiam: crops from 20%, jitter 0.4/0.4/0.4/0.1.
    assert tuple(c.data.crop_scale) == (0.2, 1.0)
    assert_view(c.augment.view1, dict(SIMSIAM_VIEW, blur=0.0), name)


def test_imagenet_presets_use_the_measured_host_path():
  """The ResNet-50 presets' canvas follows the committed measurements: the
  2 S canvas where it gave more samples per host CPU-second on 500 x 375
  JPEGs than C = S, and its resampling on the TPU is under 2% of the
  step's FLOPs (benchmarks/results/)."""
  results = REPO / "benchmarks" / "results"
  pipeline = json.loads((results / "input_pipeline_cpu.json").read_text())
  big = [r for r in pipeline["host"] if r["jpegs"] == "imagenette_500x375"]
  assert big and all(r["canvas_size"] == 448 and "ratio_canvas_s" in r
                     for r in big), big
  faster = all(r["ratio"] > r["ratio_canvas_s"] for r in big)
  aot = {(r["preset"], r["slice"], r["program"], r["per_device_batch"]): r
         for r in json.loads((results / "tpu_aot.json").read_text())["rows"]}
  finish = aot[("byol_r50", "v3-8", "finish", 8)]
  step = aot[("byol_r50", "v3-8", "train_step", 8)]
  assert finish["canvas"] == 448
  negligible = finish["flops"] < 0.02 * step["flops"]
  for name in ("byol_r50", "simsiam_r50", "simclr_r50"):
    c = load_config(name)
    assert c.data.canvas_size == (2 * c.data.image_size
                                  if faster and negligible else 0), name


def test_readme_tpu_tables_are_the_committed_json():
  """README's "Fits on" and compiled-programs tables are what
  `benchmarks/tpu_aot.py --readme` prints from the committed JSON."""
  sys.path.insert(0, str(REPO / "benchmarks"))
  import tpu_aot_report  # pylint: disable=g-import-not-at-top
  result = json.loads(
      (REPO / "benchmarks" / "results" / "tpu_aot.json").read_text())
  readme = (REPO / "README.md").read_text()
  for table in (tpu_aot_report.fits_on(result),
                tpu_aot_report.compiled(result)):
    assert table in readme, table
