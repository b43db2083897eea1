"""`python -m byol_jax.convert to-torch`: torchvision state_dicts of encoders.

The torchvision tests need torch and torchvision (the 'torch' extra, not in
CI: several GB) and skip without them; the refusal and naming tests run
everywhere.
"""
import os
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest

import byol_jax
from byol_jax.trainer import checkpoint
from byol_jax.interop import pretrained
from byol_jax.trainer import config_lib
from byol_jax.interop import convert_torch
from byol_jax.core.methods import network

from testlib import REPO, rel_err


def _workdir(path, depth, stem="imagenet", padding="symmetric",
             num_filters=64, width=1, seed=0):
  """A byol_jax checkpoint of a random encoder with non-trivial BN stats."""
  config = config_lib.base_config()
  config.model.update(dict(depth=depth, stem=stem, padding=padding,
                           num_filters=num_filters, width=width))
  shapes = jax.eval_shape(lambda: network.make_encoder(config).init(
      jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(0, np.prod(s.shape[:-1]) ** -0.5, s.shape)
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, s.shape)
    else:
      value = rng.normal(0, 0.1, s.shape)
    return value.astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(fill, shapes)
  state = {"step": np.asarray(7, np.int32),
           "params": {"encoder": variables["params"]},
           "batch_stats": {"encoder": variables["batch_stats"]}}
  ckpt = checkpoint.Checkpointer(str(path), config)
  ckpt.save(7, state)
  ckpt.close()
  return path


def _run_cli(*args):
  return subprocess.run([sys.executable, "-m", "byol_jax.convert", *args],
                        capture_output=True, text=True, cwd=REPO, timeout=600)


def test_state_dict_names_and_layout(tmp_path):
  """torchvision's names and counts (fc excluded) and OIHW kernels."""
  for depth, count in ((18, 120), (50, 318)):  # torchvision 0.29.1, no fc
    workdir = _workdir(tmp_path / str(depth), depth)
    config, state, _ = pretrained.load_run(str(workdir))
    sd = convert_torch.torchvision_state_dict(config, {
        "params": state["params"]["encoder"],
        "batch_stats": state["batch_stats"]["encoder"]})
    assert len(sd) == count and not any(k.startswith("fc.") for k in sd)
    encoder = state["params"]["encoder"]
    np.testing.assert_array_equal(
        sd["layer2.0.conv1.weight"],
        encoder["stage2_block1"]["conv1"]["kernel"].transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(
        sd["layer3.0.downsample.1.running_var"],
        state["batch_stats"]["encoder"]["stage3_block1"]["downsample_bn"]
        ["var"])
    assert sd["bn1.num_batches_tracked"].dtype == np.int64


def test_to_torch_refuses_same_padding(tmp_path):
  """A 'same'-padded encoder gets one error line and no file."""
  workdir = _workdir(tmp_path / "run", 18, padding="same", num_filters=8)
  out = tmp_path / "r18.pt"
  r = _run_cli("to-torch", f"--workdir={workdir}", f"--out={out}")
  assert r.returncode == 1 and "Traceback" not in r.stderr
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "model.padding='same'" in errors[0], r.stderr
  assert not out.exists()


@pytest.mark.parametrize("depth,stem", [(18, "imagenet"), (18, "cifar"),
                                        (50, "imagenet")])
def test_to_torch_loads_strictly_into_torchvision(tmp_path, nette_64, depth,
                                                  stem):
  """The README's one-liner loads the export; features equal byol_jax's."""
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  safetensors_torch = pytest.importorskip("safetensors.torch")
  workdir = _workdir(tmp_path / "run", depth, stem=stem)
  with jax.default_matmul_precision("highest"):
    encoder, variables = byol_jax.load_encoder(str(workdir))
    expected = np.asarray(encoder.apply(variables, nette_64, train=False))
  x = torch.from_numpy(np.ascontiguousarray(nette_64.transpose(0, 3, 1, 2)))

  pt, st = tmp_path / "encoder.pt", tmp_path / "encoder.safetensors"
  r = _run_cli("to-torch", f"--workdir={workdir}", f"--out={pt}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"ResNet-{depth} x1" in r.stdout
  convert_torch.export(str(workdir), str(st))  # What the CLI runs.
  for out in (pt, st):
    # Exactly the documented lines (README.md, "Pretrained weights").
    m = getattr(torchvision.models, f"resnet{depth}")()
    m.fc = torch.nn.Identity()
    if stem == "cifar":
      m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
      m.maxpool = torch.nn.Identity()
    sd = torch.load(out) if out == pt else safetensors_torch.load_file(out)
    m.load_state_dict(sd, strict=True)
    m.eval()
    with torch.no_grad():
      features = m(x).numpy()
    assert features.shape == expected.shape
    assert rel_err(features, expected) < 1e-4, out


def test_safetensors_file_has_a_new_files_permissions(tmp_path):
  """safetensors writes 0600; the export is an ordinary file (0644 under a
  022 umask) that others on the machine can read."""
  pytest.importorskip("safetensors.numpy")
  out = tmp_path / "a.safetensors"
  convert_torch.save({"a": np.zeros(3, np.float32)}, str(out))
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
