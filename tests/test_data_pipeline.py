"""Input pipelines: sources, host (tf.data) and on-device paths, sharding.

Real images from ../shared/datasets; the image-folder tests expand the
Imagenette subset (300 train + 100 val JPEGs) into a temporary folder.
"""
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image

from byol_jax.trainer import config_lib
from byol_jax import data
from byol_jax.core import sharding
from byol_jax.data import crops
from byol_jax.data import device
from byol_jax.data import order
from byol_jax.data import sources
from byol_jax.data import store
from byol_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh()


@pytest.fixture(scope="module")
def host():
  """The tf.data host path (skipped where TensorFlow is not installed)."""
  pytest.importorskip("tensorflow")
  pytest.importorskip("tensorflow_datasets")
  # pylint: disable-next=g-import-not-at-top
  from byol_jax.data import host as host_module
  return host_module


@pytest.fixture(scope="module")
def folder(nette_folder):
  """ROOT/{train,val}/<synset>/*.JPEG from the Imagenette subset."""
  return str(nette_folder)


def make_config(source="folder", path="", size=64, batch=16, on_device=False,
                eval_split="val", fraction=0.875):
  c = config_lib.base_config()
  c.seed = 3
  c.batch_size = batch
  c.data.source = source
  c.data.path = str(path)
  c.data.train_split = "train"
  c.data.eval_split = eval_split
  c.data.image_size = size
  c.data.eval_crop_fraction = fraction
  c.data.on_device = on_device
  c.data.num_parallel_calls = 2
  return c


def _np(batch):
  return {k: np.asarray(v) for k, v in batch.items()}


# ---------------------------------------------------------------------------
# Sources and errors.
# ---------------------------------------------------------------------------


def test_folder_listing_labels_and_unlabelled(folder, tmp_path, mesh, host):
  paths, labels, classes = sources.list_folder(folder, "train")
  assert len(paths) == 300 and len(classes) == 10
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, 30))
  assert classes[0] == "n01440764"
  # Images directly under ROOT/<split>/ are unlabelled (-1).
  (tmp_path / "train").mkdir()
  for p in paths[:16]:
    os.link(p, tmp_path / "train" / os.path.basename(p))
  _, labels, classes = sources.list_folder(str(tmp_path), "train")
  assert classes == () and np.all(labels == -1)
  batch = data.build_pretrain(make_config(path=tmp_path, size=32), mesh).batch(0)
  assert np.all(np.asarray(batch["label"]) == -1)


def _one_line(excinfo):
  return "\n" not in str(excinfo.value) and str(excinfo.value)


def test_config_errors(folder, tmp_path, cifar_npz, mesh, host):
  c = make_config(source="tfds")
  c.data.name = "no_such_dataset_xyz"
  with pytest.raises(ConfigError, match="Unknown TFDS dataset") as e:
    data.build_pretrain(c, mesh)
  assert _one_line(e)
  c.data.name, c.data.data_dir = "cifar10", str(tmp_path / "empty_tfds")
  with pytest.raises(ConfigError, match="not prepared") as e:
    data.build_eval(c, mesh, "test", 16)
  assert _one_line(e)

  with pytest.raises(ConfigError, match="does not exist") as e:
    data.build_pretrain(make_config(path=tmp_path / "missing"), mesh)
  assert _one_line(e)
  (tmp_path / "empty" / "train" / "cls").mkdir(parents=True)
  with pytest.raises(ConfigError, match="No .* images") as e:
    data.build_pretrain(make_config(path=tmp_path / "empty"), mesh)
  assert _one_line(e)
  with pytest.raises(ConfigError, match="Split 'validation' not found") as e:
    data.build_eval(make_config(path=folder), mesh, "validation", 16)
  assert _one_line(e) and "train, val" in str(e.value)
  with pytest.raises(ConfigError, match="Split 'val' not found") as e:
    data.build_eval(make_config("npz", cifar_npz, on_device=True), mesh,
                    "val", 16)
  assert _one_line(e) and "test, train" in str(e.value)
  with pytest.raises(ConfigError, match="not divisible by the 8 devices") as e:
    data.build_pretrain(make_config("npz", cifar_npz, batch=12), mesh)
  assert _one_line(e)
  with pytest.raises(ConfigError, match="not divisible"):
    data.build_eval(make_config("npz", cifar_npz), mesh, "test", 20)
  with pytest.raises(ConfigError, match="source"):
    data.build_pretrain(make_config("webdataset"), mesh)


def _truncate(path, out):
  b = open(path, "rb").read()
  out.write_bytes(b[:len(b) // 2])


def test_corrupt_files_are_skipped_and_counted(folder, tmp_path, mesh, caplog,
                                              host):
  paths, _, _ = sources.list_folder(folder, "val")
  cls = tmp_path / "val" / "a"
  cls.mkdir(parents=True)
  for p in paths[:20]:
    os.link(p, cls / os.path.basename(p))
  _truncate(paths[0], cls / "truncated.jpg")
  (cls / "garbage.jpg").write_bytes(b"this is not an image" * 40)
  (cls / "empty.png").write_bytes(b"")
  os.makedirs(tmp_path / "train")
  os.link(paths[1], tmp_path / "train" / "x.jpg")
  # Passes the cheap header check, fails in the decoder: dropped by tf.data.
  (cls / "sneaky.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(600) +
                                   b"\xff\xd9")
  split = sources.folder_split(str(tmp_path), "val", True)
  assert split.num_skipped == 3 and split.num_examples == 21
  assert "Skipping 3 corrupt" in caplog.text
  c = make_config(path=tmp_path, size=32, batch=8)
  c.data.train_split = "val"
  batch = data.build_pretrain(c, mesh).batch(0)
  assert batch["view1"].shape == (8, 32, 32, 3)
  evals = list(data.build_eval(c, mesh, "val", 8))
  assert sum(int(np.sum(b["mask"])) for b in evals) == 20
  c.data.on_device = True      # The PIL path skips the undecodable one too.
  images, labels = data.load_arrays(c.data, "val")
  assert images.shape[0] == 20 and labels.shape == (20,)
  c.data.skip_corrupt = False
  with pytest.raises(ConfigError, match="corrupt image file") as e:
    data.build_eval(c, mesh, "val", 8)
  assert _one_line(e)


def test_undecodable_images_never_shift_the_stream(folder, tmp_path, host):
  """JPEGs that pass the start-up scan but fail to decode are replaced in
  place (by the next element that decodes) and counted: a stream started
  at any step gives the batches of one started at 0."""
  paths, _, _ = sources.list_folder(folder, "val")
  cls = tmp_path / "train" / "a"
  cls.mkdir(parents=True)
  for p in paths[:21]:
    os.link(p, cls / os.path.basename(p))
  for i, p in enumerate(paths[21:24]):  # Real headers, garbage inside.
    b = bytearray(open(p, "rb").read())
    b[600:-2] = os.urandom(len(b) - 602)
    (cls / f"bad{i}.jpg").write_bytes(bytes(b))
  assert sources.folder_split(str(tmp_path), "train", True).num_skipped == 0
  c = make_config(path=tmp_path, size=32, batch=8)

  def batches(start, n):
    ds, _ = host.train_dataset(c, "pretrain", start_step=start,
                               process_index=0, process_count=1)
    return list(ds.take(n).as_numpy_iterator())
  whole = batches(0, 9)                        # 3 epochs of 24 images.
  failed = np.concatenate([b["failed"] for b in whole])
  assert failed.sum() == 9                     # Each bad file, every epoch.
  for start in (2, 5):
    for a, b in zip(whole[start:], batches(start, 9 - start)):
      for k in ("view1", "view2", "label", "failed"):
        np.testing.assert_array_equal(a[k], b[k])
  # A replacement is the element after it (the next one that decoded).
  flat = np.concatenate([b["view1"] for b in whole])
  i = int(np.flatnonzero(failed[:-3])[0])
  j = i + int(np.argmin(failed[i:]))
  np.testing.assert_array_equal(flat[i], flat[j])


def test_load_arrays(cifar_npz, folder, tmp_path):
  c = make_config("npz", cifar_npz, size=32)
  images, labels = data.load_arrays(c.data, "train")
  assert images.shape == (5000, 32, 32, 3) and images.dtype == np.uint8
  assert labels.dtype == np.int32
  with np.load(cifar_npz) as d:
    np.testing.assert_array_equal(labels, d["train_labels"])
  # Same-sized images keep their size; `size` forces one.
  c = make_config("folder", folder, size=64)
  images, labels = data.load_arrays(c.data, "val")
  assert images.shape == (100, 224, 224, 3)
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, 10))
  images64, _ = data.load_arrays(c.data, "val", size=64)
  assert images64.shape == (100, 64, 64, 3)
  # 'arrays' .npz: plain images/labels are the train split.
  path = tmp_path / "arrays.npz"
  np.savez(path, images=images64[:40], labels=labels[:40])
  got, got_labels = data.load_arrays(make_config("arrays", path).data, "train")
  np.testing.assert_array_equal(got, images64[:40])
  with pytest.raises(ConfigError, match="Split 'val' not found"):
    data.load_arrays(make_config("arrays", path).data, "val")


def _config_with(path, source="folder", **data):
  c = make_config(source, path)
  c.data.eval_split, c.data.num_classes = "", -1
  c.data.update(data)
  return c


def test_describe_image_folders(folder, tmp_path, mesh):
  """Classes from the class folders, eval split found, one-line mistakes."""
  info = data.describe(_config_with(folder))
  assert (info.name, info.source) == (folder, "folder")
  assert (info.train_split, info.eval_split) == ("train", "val")
  assert (info.num_train, info.num_eval, info.num_classes) == (300, 100, 10)
  assert info.class_names[0] == "n01440764" and len(info.class_names) == 10
  assert data.describe(_config_with(folder, num_classes=10)).num_classes == 10
  assert data.describe(_config_with(folder, num_classes=0)).num_classes == 0
  with pytest.raises(ConfigError, match="num_classes=5 but .* has 10 "
                     "classes; set --config.data.num_classes=10") as e:
    data.describe(_config_with(folder, num_classes=5))
  assert _one_line(e)
  with pytest.raises(ConfigError, match="Split 'test' not found") as e:
    data.describe(_config_with(folder, eval_split="test"))
  assert _one_line(e) and "(splits: train, val)" in str(e.value)
  with pytest.raises(ConfigError, match="Split 'training' not found.*"
                     "train_split") as e:
    data.describe(_config_with(folder, train_split="training"))
  assert _one_line(e)
  # Unlabelled: images directly in ROOT/train/, and no eval split.
  (tmp_path / "train").mkdir()
  for p in sources.list_folder(folder, "train")[0][::10]:
    os.link(p, tmp_path / "train" / os.path.basename(p))
  c = _config_with(tmp_path, on_device=True, image_size=16)
  info = data.describe(c)
  assert (info.num_train, info.num_classes, info.eval_split) == (30, 0, None)
  assert np.all(np.asarray(data.build_pretrain(c, mesh).batch(0)["label"]) ==
                -1)
  with pytest.raises(ConfigError, match="num_classes=10 but .* is "
                     "unlabelled") as e:
    data.describe(_config_with(tmp_path, num_classes=10))
  assert _one_line(e)


def test_describe_npz(cifar_npz, tmp_path):
  info = data.describe(_config_with(cifar_npz, "npz"))
  assert (info.eval_split, info.num_train, info.num_eval) == ("test", 5000,
                                                              1000)
  assert info.num_classes == 10 and info.class_names[0] == "airplane"
  with pytest.raises(ConfigError, match="has 10 classes") as e:
    data.describe(_config_with(cifar_npz, "npz", num_classes=11))
  assert _one_line(e)
  # Without class_names: more classes than the largest label is allowed.
  path = tmp_path / "arrays.npz"
  labels = np.arange(12, dtype=np.int32) % 7
  np.savez(path, images=np.zeros((12, 8, 8, 3), np.uint8), labels=labels)
  assert data.describe(_config_with(path, "arrays")).num_classes == 7
  assert data.describe(_config_with(path, "arrays", num_classes=9)
                      ).num_classes == 9
  with pytest.raises(ConfigError, match="labels up to 6") as e:
    data.describe(_config_with(path, "arrays", num_classes=6))
  assert _one_line(e)


# ---------------------------------------------------------------------------
# Pretraining batches.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("on_device", [False, True])
def test_pretrain_batches_shapes_sharding_and_resume(folder, cifar_npz, mesh,
                                                     on_device):
  if not on_device:
    pytest.importorskip("tensorflow")
  if on_device:
    c, n = make_config("npz", cifar_npz, size=24, on_device=True), 5000
  else:
    c, n = make_config(path=folder, size=32), 300
  pre = data.build_pretrain(c, mesh)
  assert pre.num_examples == n and pre.steps_per_epoch == n // 16
  batches = [pre.batch(s) for s in range(3)]
  b = batches[0]
  dtype = np.float32 if on_device else np.uint8
  for k in ("view1", "view2"):
    assert b[k].shape == (16, c.data.image_size, c.data.image_size, 3)
    assert b[k].dtype == dtype
    assert b[k].sharding == sharding.batch_sharding(mesh)
    x = np.asarray(b[k]).astype(np.float32) / (1 if on_device else 255)
    assert x.min() >= 0 and x.max() <= 1 and 0.2 < x.mean() < 0.7
  assert b["label"].dtype == np.int32 and b["label"].shape == (16,)
  assert b["label"].sharding == sharding.batch_sharding(mesh)
  assert set(np.asarray(b["label"])) <= set(range(10))
  # Two independent crops of each image.
  assert not np.array_equal(np.asarray(b["view1"]), np.asarray(b["view2"]))
  # Resuming reproduces the uninterrupted batches exactly.
  resumed = data.build_pretrain(c, mesh, start_step=2).batch(2)
  for k in ("view1", "view2", "label"):
    np.testing.assert_array_equal(np.asarray(resumed[k]),
                                  np.asarray(batches[2][k]))
  # A jump (not the next step) is served too.
  np.testing.assert_array_equal(np.asarray(pre.batch(1)["label"]),
                                np.asarray(batches[1]["label"]))
  if not on_device:   # Device-side augmentation finishes the uint8 batches.
    v1, v2 = jax.jit(lambda r, x: data.augment_views(r, x, c.augment))(
        jax.random.PRNGKey(0), b)
    assert v1.shape == (16, 32, 32, 3) and v1.dtype == np.float32
    assert np.isfinite(np.asarray(v2)).all()


@pytest.mark.parametrize("on_device", [False, True])
def test_epochs_are_permutations(cifar_npz, mesh, on_device):
  """Each epoch sees every example once; epochs are reshuffled."""
  if not on_device:
    pytest.importorskip("tensorflow")
  images, _ = data.load_arrays(make_config("npz", cifar_npz, 32).data, "train")
  n = 64
  arrays = (images[:n], np.arange(n, dtype=np.int32))
  c = make_config("arrays", size=16, on_device=on_device)
  pre = data.build_pretrain(c, mesh, arrays=arrays)
  labels = np.concatenate([np.asarray(pre.batch(s)["label"])
                           for s in range(8)])
  e0, e1 = labels[:n], labels[n:]
  np.testing.assert_array_equal(np.sort(e0), np.arange(n))
  np.testing.assert_array_equal(np.sort(e1), np.arange(n))
  assert not np.array_equal(e0, e1) and not np.array_equal(e0, np.arange(n))


def test_host_batches_do_not_depend_on_process_count(cifar_npz, host):
  """Two simulated processes read disjoint halves of each global batch."""
  c = make_config("npz", cifar_npz, size=32, batch=16)
  single, _ = host.train_dataset(c, "pretrain", start_step=5, process_index=0,
                                 process_count=1)
  halves = [host.train_dataset(c, "pretrain", start_step=5, process_index=p,
                               process_count=2)[0] for p in (0, 1)]
  whole = next(single.as_numpy_iterator())
  parts = [next(h.as_numpy_iterator()) for h in halves]
  for k in ("view1", "view2", "label"):
    np.testing.assert_array_equal(
        whole[k], np.concatenate([parts[0][k], parts[1][k]]))


def test_linear_train_batches(cifar_npz, mesh, host):
  for on_device in (False, True):
    c = make_config("npz", cifar_npz, size=32, on_device=on_device)
    lin = data.build_linear_train(c, mesh, batch_size=16, seed=1)
    b = lin.batch(0)
    assert b["image"].shape == (16, 32, 32, 3) and b["image"].dtype == np.float32
    assert b["image"].sharding == sharding.batch_sharding(mesh)
    x = np.asarray(b["image"])
    assert x.min() >= 0 and x.max() <= 1
    assert b["label"].dtype == np.int32
    np.testing.assert_array_equal(np.asarray(lin.batch(1)["label"]),
                                  np.asarray(data.build_linear_train(
                                      c, mesh, 16, 1).batch(1)["label"]))


@pytest.mark.parametrize("on_device", [False, True])
def test_linear_train_on_a_seeded_class_balanced_subset(folder, mesh,
                                                        on_device):
  if not on_device:
    pytest.importorskip("tensorflow")
  c = make_config(path=folder, size=16, batch=8, on_device=on_device)
  lin = data.build_linear_train(c, mesh, 8, seed=1, fraction=0.1)
  assert lin.num_examples == 30 and lin.steps_per_epoch == 3
  # 15 steps of 8 are 4 epochs of the 30-example subset: 3 per class each.
  labels = np.concatenate([np.asarray(lin.batch(s)["label"])
                           for s in range(15)])
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, 12))
  _, all_labels, _ = sources.list_folder(folder, "train")
  a, b = (order.subset(all_labels, 0.1, seed) for seed in (1, 2))
  np.testing.assert_array_equal(np.bincount(all_labels[a]), np.full(10, 3))
  assert not np.array_equal(a, b)
  np.testing.assert_array_equal(a, order.subset(all_labels, 0.1, 1))


# ---------------------------------------------------------------------------
# Evaluation batches and sharding over processes.
# ---------------------------------------------------------------------------


def _coverage(local_batches_per_process, n):
  counts = [len(b) for b in local_batches_per_process]
  assert len(set(counts)) == 1, counts          # Same batch count everywhere.
  seen = np.concatenate([b["index"][b["mask"]]
                         for bs in local_batches_per_process for b in bs])
  np.testing.assert_array_equal(np.sort(seen), np.arange(n))  # Exactly once.
  for bs in local_batches_per_process:
    for b in bs:
      assert np.all(b["label"][~b["mask"]] == -1)


def test_host_eval_two_processes_cover_split_once(folder, mesh, host):
  c = make_config(path=folder, size=56)
  per_process = []
  for p in (0, 1):
    ds, total, num_batches = host.eval_dataset(c, "val", 24, process_index=p,
                                               process_count=2)
    per_process.append(list(ds.as_numpy_iterator()))
    assert total == 100 and num_batches == 5 == len(per_process[-1])
  _coverage(per_process, 100)
  b = per_process[0][0]
  assert b["image"].shape == (12, 56, 56, 3)
  # Labels agree with the folder.
  _, labels, _ = sources.list_folder(folder, "val")
  for bs in per_process:
    for b in bs:
      np.testing.assert_array_equal(b["label"][b["mask"]],
                                    labels[b["index"][b["mask"]]])
  # The global batches: float32 [0, 1], mesh sharding, every example once.
  ev = data.build_eval(c, mesh, "val", 24)
  assert ev.num_examples == 100 and len(ev) == 5
  total = 0
  for b in ev:
    assert b["image"].shape == (24, 56, 56, 3)
    assert b["image"].dtype == np.float32 and b["mask"].dtype == bool
    assert b["image"].sharding == sharding.batch_sharding(mesh)
    assert b["mask"].sharding == sharding.batch_sharding(mesh)
    x = np.asarray(b["image"])
    assert x.min() >= 0 and x.max() <= 1
    total += int(np.sum(b["mask"]))
  assert total == 100


def test_array_eval_two_processes_cover_split_once(cifar_npz, mesh):
  c = make_config("npz", cifar_npz, size=32, on_device=True, fraction=1.0)
  images, labels = data.load_arrays(c.data, "test")
  per_process = [[dict(b, index=b["ids"][:, 0]) for b in device.eval_batches(
      labels, 24, p, 2)] for p in (0, 1)]
  _coverage(per_process, 1000)
  ev = data.build_eval(c, mesh, "test", 48)
  got = [_np(b) for b in ev]
  assert len(got) == 21 and sum(b["mask"].sum() for b in got) == 1000
  # Fraction 1.0 at 32 px: the centre crop is the image itself.
  np.testing.assert_allclose(got[0]["image"], images[:48] / 255.0, atol=1e-6)


def _count_compiles():
  """A list that grows by one per XLA compilation while registered."""
  events = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      events.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  return events, listener


@pytest.mark.parametrize("on_device", [True, False])
def test_eval_built_once_compiles_once_for_three_passes(cifar_npz, mesh,
                                                        on_device):
  if not on_device:
    pytest.importorskip("tensorflow")
  c = make_config("npz", cifar_npz, size=24, on_device=on_device)
  events, listener = _count_compiles()
  try:
    ev = data.build_eval(c, mesh, "test", 200)
    counts = [sum(int(np.asarray(b["mask"]).sum()) for b in ev)
              for _ in range(3)]
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert counts == [1000] * 3
  assert len(events) <= 1, events


def test_device_batches_make_no_implicit_transfers(cifar_npz, mesh):
  c = make_config("npz", cifar_npz, size=16, on_device=True)
  pre = data.build_pretrain(c, mesh)
  lin = data.build_linear_train(c, mesh, 16, seed=1)
  ev = data.build_eval(c, mesh, "test", 16)
  with jax.transfer_guard("disallow"):
    for step in (0, 1, 2, 7):                     # 7: a jump.
      jax.block_until_ready((pre.batch(step), lin.batch(step)))
    jax.block_until_ready(next(iter(ev)))


def test_host_prefetches_the_next_global_batches(cifar_npz, mesh, host):
  c = make_config("npz", cifar_npz, size=16)
  pre = data.build_pretrain(c, mesh, start_step=4)
  assert pre.ready_steps == ()
  pre.batch(4)
  assert pre.ready_steps == (5, 6)      # Built while step 4 runs.
  pre.batch(5)
  assert pre.ready_steps == (6, 7)
  pre.batch(9)                           # A jump restarts the stream there.
  assert pre.ready_steps == (10, 11)


def _pil_center_crop(image, size, fraction):
  """Reference: centred square, `fraction` of the shorter side, PIL bicubic."""
  h, w = image.shape[:2]
  side = round(fraction * min(h, w))
  y0, x0 = (h - side) // 2, (w - side) // 2
  crop = Image.fromarray(image[y0:y0 + side, x0:x0 + side])
  return np.asarray(crop.resize((size, size), Image.BICUBIC), np.float32)


def test_eval_centre_crop(folder, mesh, host):
  """Both paths' centre crops match PIL's on the same images."""
  split = sources.folder_split(folder, "val")
  for size in (64, 224):     # 196 px crops: shrunk, then enlarged.
    for on_device in (False, True):
      c = make_config(path=folder, size=size, on_device=on_device)
      got = _np(next(iter(data.build_eval(c, mesh, "val", 16))))
      for j in range(4):     # One process: batch 0 holds examples 0..15.
        want = _pil_center_crop(split.read(j), size, 0.875)
        assert np.abs(got["image"][j] * 255 - want).mean() < 3.0, (size, j)


# ---------------------------------------------------------------------------
# Crop statistics, and the two paths against each other.
# ---------------------------------------------------------------------------


def _crop_stats(boxes, hw):
  """Area fractions and aspect ratios (w / h) of (y, x, h, w) boxes in pixels."""
  h, w = boxes[:, 2], boxes[:, 3]
  return h * w / (hw[0] * hw[1]), w / h


def _reference_crops(hw, n=200_000, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """NumPy model of the specified sampler: first of 10 candidates that fits."""
  rng = np.random.default_rng(0)
  area = rng.uniform(*scale, (n, 10)) * hw[0] * hw[1]
  r = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (n, 10)))
  w, h = np.sqrt(area * r), np.sqrt(area / r)
  fits = (w <= hw[1]) & (h <= hw[0])
  first = np.argmax(fits, axis=1)
  ok = fits.any(axis=1)
  pick = lambda x: x[np.arange(n), first][ok]
  return pick(h * w) / (hw[0] * hw[1]), pick(w / h)


@pytest.mark.parametrize("hw", [(224, 224), (375, 500)])
def test_crop_area_and_aspect_distribution(hw, request):
  request.getfixturevalue("host")
  from byol_jax.data import host_decode  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  n = 3000
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  jboxes = np.stack(jax.jit(jax.vmap(
      lambda k: crops.sample_crop_box(k, hw[0], hw[1])))(keys), -1)
  seeds = tf.data.Dataset.range(n).map(lambda i: tf.stack([i, 7 * i]))
  tboxes = next(seeds.map(lambda s: host_decode.crop_window(s, hw[0], hw[1]))
                .batch(n).as_numpy_iterator()).astype(float)
  ref_area, ref_aspect = _reference_crops(hw)
  for boxes, tol in ((jboxes, 1e-4), (tboxes, 0.02)):
    area, aspect = _crop_stats(boxes, hw)
    assert np.all(boxes[:, :2] >= 0)
    assert np.all(boxes[:, 0] + boxes[:, 2] <= hw[0] + 1e-3)
    assert np.all(boxes[:, 1] + boxes[:, 3] <= hw[1] + 1e-3)
    # Within the configured ranges (integer windows round a little) ...
    assert area.min() >= 0.08 - tol and area.max() <= 1.0 + 1e-6
    assert aspect.min() >= 0.75 - tol and aspect.max() <= 4 / 3 + tol
    # ... and spread over them as the specified sampler is.
    assert area.min() < 0.1 and area.max() > 0.9
    assert aspect.min() < 0.77 and aspect.max() > 1.3
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
      assert abs(np.quantile(area, q) - np.quantile(ref_area, q)) < 0.04, q
      assert abs(np.quantile(np.log(aspect), q) -
                 np.quantile(np.log(ref_aspect), q)) < 0.03, q
    assert abs(area.std() - ref_area.std()) < 0.015


def test_host_crops_that_fit_are_enlarged_on_the_devices(folder, mesh, host):
  """Crops no larger than S go to the devices as they are and are enlarged
  there; the views equal the host's own bicubic enlarging within 1 level."""
  c = make_config(path=folder, size=224, batch=16)
  local = host.train_dataset(c, "pretrain", process_index=0, process_count=1)
  b = next(local[0].as_numpy_iterator())
  assert np.all(b["hw1"] <= 224) and np.any(b["hw1"] < 224)
  i = int(np.argmin(b["hw1"][:, 0]))
  h, w = b["hw1"][i]
  assert h < 224 and np.all(b["view1"][i, h:] == 0)          # Zero padding.
  assert np.all(b["view1"][i, :, w:] == 0)
  ref = next(host.train_dataset(c, "pretrain", process_index=0,
                                process_count=1, device_resize=False
                                )[0].as_numpy_iterator())
  assert np.all(ref["hw1"] == 224)
  got = _np(host.build(c, mesh, "pretrain", "train", 16, c.seed).batch(0))
  for k in ("view1", "view2"):
    assert got[k].dtype == np.uint8
    diff = np.abs(got[k].astype(int) - ref[k].astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.05, (k, diff.max())


def test_host_crops_on_a_larger_canvas_are_shrunk_on_the_devices(
    folder, mesh, host):
  """With canvas C > S, crops up to C x C go unresized and the devices
  shrink them with the host's plain bicubic: the views equal the host's
  own resizing within 1 level."""
  c = make_config(path=folder, size=96, batch=16)
  c.data.canvas_size = 224              # Every crop of the 224 px images.
  b = next(host.train_dataset(c, "pretrain", process_index=0,
                              process_count=1)[0].as_numpy_iterator())
  assert b["view1"].shape == (16, 224, 224, 3)
  hw = np.concatenate([b["hw1"], b["hw2"]])
  assert np.any(np.all(hw > 96, axis=1)) and np.any(np.all(hw < 96, axis=1))
  ref = next(host.train_dataset(c, "pretrain", process_index=0,
                                process_count=1, device_resize=False
                                )[0].as_numpy_iterator())
  assert np.all(ref["hw1"] == 96) and ref["view1"].shape == (16, 224, 224, 3)
  got = _np(host.build(c, mesh, "pretrain", "train", 16, c.seed).batch(0))
  for k in ("view1", "view2"):
    assert got[k].shape == (16, 96, 96, 3)
    diff = np.abs(got[k].astype(int) - ref[k][:, :96, :96].astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.05, (k, diff.max())


def test_device_and_host_paths_match(imagenette_npz, mesh, host):
  """Same examples in the same order, same crop distribution and pixel
  statistics on both paths."""
  c = make_config("arrays", size=32, batch=64)
  arrays = data.load_arrays(make_config("npz", imagenette_npz).data, "train",
                            size=96)                  # [300, 96, 96, 3]
  hst = host.build(c, mesh, "pretrain", "train", 64, c.seed, arrays=arrays,
                   return_boxes=True)
  host_batches = [_np(hst.batch(s)) for s in range(5)]
  dev = device.build(c, mesh, "pretrain", "train", 64, c.seed, arrays=arrays,
                     return_boxes=True)
  dev_batches = [_np(dev.batch(s)) for s in range(5)]
  for h, d in zip(host_batches, dev_batches):      # One shared order.
    np.testing.assert_array_equal(h["label"], d["label"])

  def stats(batches, scale):
    boxes = np.concatenate([b[k] for b in batches for k in ("box1", "box2")])
    pixels = np.concatenate([b[k] for b in batches
                             for k in ("view1", "view2")]) / scale
    return boxes[:, 2] * boxes[:, 3], pixels.mean(axis=(1, 2))  # [640], [640, 3]

  h_area, h_mean = stats(host_batches, 255.0)
  d_area, d_mean = stats(dev_batches, 1.0)
  assert abs(h_area.mean() - d_area.mean()) < 0.05, (h_area.mean(),
                                                     d_area.mean())
  assert abs(h_area.std() - d_area.std()) < 0.04
  np.testing.assert_allclose(h_mean.mean(0), d_mean.mean(0), atol=0.03)
  assert abs(h_mean.std() - d_mean.std()) < 0.03


def test_linear_crops_cover_their_own_scale(imagenette_npz, mesh, host):
  """Linear evaluation and fine-tuning crop areas ~ U[0.08, 1] (the BYOL,
  SimSiam and SimCLR protocols) on both paths, whatever the pretraining
  crop scale (here tiny's (0.2, 1), as simsiam_r50's)."""
  c = make_config("arrays", size=32, batch=64)
  c.data.crop_scale = (0.2, 1.0)
  arrays = data.load_arrays(make_config("npz", imagenette_npz).data, "train",
                            size=96)                  # [300, 96, 96, 3]
  ref_area, _ = _reference_crops((96, 96))
  for build in (host.build, device.build):
    lin = build(c, mesh, "linear", "train", 64, c.seed, arrays=arrays,
                return_boxes=True)
    boxes = np.concatenate([_np(lin.batch(s))["box"] for s in range(10)])
    area = boxes[:, 2] * boxes[:, 3]                  # [640]
    assert area.min() >= 0.075 and area.max() > 0.9, build
    # About 13% of U[0.08, 1] lies below the pretraining floor of 0.2.
    assert 0.07 < np.mean(area < 0.2) < 0.2, (build, np.mean(area < 0.2))
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
      assert abs(np.quantile(area, q) - np.quantile(ref_area, q)) < 0.06, (
          build, q)


def test_device_crop_resize_is_tf_bicubic_and_never_reads_padding(folder,
                                                                 host):
  """The on-device resampling equals TensorFlow's ScaleAndTranslate
  (antialiased Keys cubic; for training crops plain up to a 3x shrink) of
  the same box of the image, and the canvas padding does not change it."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  image = sources.folder_split(folder, "val").read(3)          # [224, 224, 3]
  canvas = np.random.default_rng(0).integers(0, 256, (260, 300, 3), np.uint8)
  canvas[:224, :224] = image
  zeros = np.zeros_like(canvas)
  zeros[:224, :224] = image
  fn = jax.jit(crops.crop_resize, static_argnums=(3, 4))
  for y, x, h, w in ((10, 20, 150, 120), (50, 60, 20, 30), (0, 0, 224, 224)):
    want = tf.raw_ops.ScaleAndTranslate(
        images=image[None].astype(np.float32) / 255, size=[64, 64],
        scale=[64 / h, 64 / w], translation=[-y * 64 / h, -x * 64 / w],
        kernel_type="keyscubic", antialias=True)[0]
    hw = np.array([224, 224], np.int32)
    box = np.array([y, x, h, w], np.float32)
    got = np.asarray(fn(image, hw, box, 64))
    np.testing.assert_allclose(got, np.clip(want.numpy(), 0, 1), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(fn(canvas, hw, box, 64)),
                                  np.asarray(fn(zeros, hw, box, 64)))
    np.testing.assert_allclose(np.asarray(fn(canvas, hw, box, 64)), got,
                               atol=1e-6)
    # Training's plain bicubic up to a 3x shrink: the kernel not widened
    # (the (0, 0, 224, 224) box is a 3.5x shrink, antialiased as above).
    plain = tf.raw_ops.ScaleAndTranslate(
        images=image[None].astype(np.float32) / 255, size=[64, 64],
        scale=[64 / h, 64 / w], translation=[-y * 64 / h, -x * 64 / w],
        kernel_type="keyscubic", antialias=h > 3 * 64)[0]
    assert (h > 3 * 64) == (w > 3 * 64)
    np.testing.assert_allclose(np.asarray(fn(zeros, hw, box, 64, 3.0)),
                               np.clip(plain.numpy(), 0, 1), atol=2e-5)


@pytest.fixture(scope="module")
def nonsquare(tmp_path_factory, imagenette_npz):
  """ROOT/train/{wide,tall}/: 48 Imagenette JPEGs cut to 150 x 224 (wide)
  and 48 to 224 x 150 (tall), re-encoded."""
  root = tmp_path_factory.mktemp("nonsquare")
  with np.load(imagenette_npz) as d:
    off, jpeg = d["train_offsets"], d["train_jpeg"]
    for i in range(96):
      image = sources.decode_image(jpeg[off[i]:off[i + 1]].tobytes())
      kind = ("wide", "tall")[i % 2]
      cut = image[37:187] if kind == "wide" else image[:, 37:187]
      path = root / "train" / kind / f"{i}.jpg"
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(cut).save(path, quality=95)
  return str(root)


def _boxes_by_shape(batches, hw_of_label):
  """Area fractions and pixel aspect ratios of the crops, per label."""
  out = {}
  for label, (h, w) in hw_of_label.items():
    boxes = np.concatenate([b[k][b["label"] == label] for b in batches
                            for k in ("box1", "box2")])           # [M, 4]
    assert np.all(boxes >= -1e-6)
    assert np.all(boxes[:, 0] + boxes[:, 2] <= 1 + 1e-5)   # Inside the real
    assert np.all(boxes[:, 1] + boxes[:, 3] <= 1 + 1e-5)   # image.
    out[label] = (boxes[:, 2] * boxes[:, 3],
                  boxes[:, 3] * w / (boxes[:, 2] * h))
  return out


def test_device_crops_keep_the_full_extent_of_non_square_images(
    nonsquare, mesh, host):
  c = make_config(path=nonsquare, size=32, batch=64)
  ds, _ = host.train_dataset(c, "pretrain", return_boxes=True)
  it = ds.as_numpy_iterator()
  host_stats = _boxes_by_shape([next(it) for _ in range(16)],
                               {0: (224, 150), 1: (150, 224)})
  canvas = store.load_canvas(c.data, "train")
  # Shorter side 37 = ceil(32 / 0.875), aspect kept, one padded canvas.
  assert canvas.images.shape == (96, 55, 55, 3)
  tall = canvas.sizes[canvas.labels == 0]
  wide = canvas.sizes[canvas.labels == 1]
  assert np.all(tall == (55, 37)) and np.all(wide == (37, 55))
  dev = device.build(c, mesh, "pretrain", "train", 64, c.seed, canvas=canvas,
                     return_boxes=True)
  dev_batches = [_np(dev.batch(s)) for s in range(16)]
  dev_stats = _boxes_by_shape(dev_batches, {0: (55, 37), 1: (37, 55)})
  for label, hw in ((0, (224, 150)), (1, (150, 224))):
    ref_area, ref_aspect = _reference_crops(hw)
    for area, aspect in (host_stats[label], dev_stats[label]):
      # Up to 0.89 of the real image (150 x 200 of 150 x 224 at aspect 3/4);
      # a centre square would cap it at 0.67.
      assert area.max() > 0.75
      for q in (0.1, 0.25, 0.5, 0.75, 0.9):    # About 1,000 crops each.
        assert abs(np.quantile(area, q) - np.quantile(ref_area, q)) < 0.05
        assert abs(np.quantile(np.log(aspect), q) -
                   np.quantile(np.log(ref_aspect), q)) < 0.04
    (h_area, h_aspect), (d_area, d_aspect) = host_stats[label], dev_stats[label]
    assert abs(h_area.mean() - d_area.mean()) < 0.04
    assert abs(np.log(h_aspect).mean() - np.log(d_aspect).mean()) < 0.03
  # The padding is never read: other padding, the same crops.
  pad = np.ones(canvas.images.shape[1:3], bool)
  noisy = canvas.images.copy()
  rng = np.random.default_rng(1)
  for i, (h, w) in enumerate(canvas.sizes):
    pad[:] = True
    pad[:h, :w] = False
    noisy[i][pad] = rng.integers(0, 256, (pad.sum(), 3), np.uint8)
  other = device.build(c, mesh, "pretrain", "train", 64, c.seed,
                       canvas=store.Canvas(noisy, canvas.sizes, canvas.labels))
  for s in (0, 5):
    got, want = _np(other.batch(s)), dev_batches[s]
    np.testing.assert_array_equal(got["view1"], want["view1"])
    np.testing.assert_array_equal(got["view2"], want["view2"])


# ---------------------------------------------------------------------------
# TFDS (a small dataset written locally) and the TF-free path.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory, folder):
  tfds = pytest.importorskip("tensorflow_datasets")
  import importlib.resources  # pylint: disable=g-import-not-at-top
  import importlib.resources.abc  # pylint: disable=g-import-not-at-top,unused-import
  # tfds' writer imports `importlib_resources`; the stdlib module serves.
  sys.modules.setdefault("importlib_resources", importlib.resources)
  path = tmp_path_factory.mktemp("tfds")
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "label": tfds.features.ClassLabel(num_classes=10)})

  def examples(split, n):
    s = sources.folder_split(folder, split)
    return [(str(i), dict(image=s.read(i), label=int(s.labels[i])))
            for i in range(0, s.num_examples, s.num_examples // n)][:n]
  tfds.dataset_builders.store_as_tfds_dataset(
      name="tiny_nette", version="1.0.0", features=features,
      split_datasets=dict(train=examples("train", 40),
                          validation=examples("val", 30)),
      data_dir=str(path),
      # Several files: TFDS pretraining shuffles their order per epoch.
      download_config=tfds.download.DownloadConfig(num_shards=5))
  return str(path)


def test_tfds_files_shuffled_per_epoch_from_seed_and_epoch(tfds_dir, host):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from byol_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  c = make_config("tfds")
  c.data.name, c.data.data_dir = "tiny_nette", tfds_dir
  b = tfds_source.builder(c.data)
  blocks = tfds_source._file_blocks(b, "train")  # pylint: disable=protected-access
  assert len(blocks[0]) == 5, blocks

  def read(seed, epoch):
    return [int(ex["index"]) for ex in tfds_source.epoch_records(
        b, "train", seed, tf.constant(epoch, tf.int64)).as_numpy_iterator()]
  orders = {(s, e): read(s, e) for s, e in ((0, 0), (0, 1), (0, 2), (1, 0))}
  for o in orders.values():  # Every record once per epoch.
    assert sorted(o) == list(range(40))
  assert len({tuple(o) for o in orders.values()}) == 4  # Epochs, seeds differ.
  assert read(0, 1) == orders[(0, 1)]  # A pure function of (seed, epoch).
  assert orders[(0, 0)] != list(range(40))  # Not the files' order.


def test_tfds_source(tfds_dir, mesh, host):
  c = make_config("tfds", size=32, batch=8, eval_split="validation")
  c.data.name, c.data.data_dir = "tiny_nette", tfds_dir
  c.data.shuffle_buffer = 16
  pre = data.build_pretrain(c, mesh)
  assert pre.num_examples == 40
  batches = [_np(pre.batch(s)) for s in range(7)]   # Crosses an epoch.
  assert batches[0]["view1"].shape == (8, 32, 32, 3)
  assert batches[0]["view1"].dtype == np.uint8
  resumed = _np(data.build_pretrain(c, mesh, start_step=6).batch(6))
  np.testing.assert_array_equal(resumed["view2"], batches[6]["view2"])
  per_process = [list(host.eval_dataset(c, "validation", 8, process_index=p,
                                        process_count=2)[0].as_numpy_iterator())
                 for p in (0, 1)]
  _coverage(per_process, 30)
  assert sum(int(np.sum(b["mask"])) for b in data.build_eval(
      c, mesh, "validation", 8)) == 30
  with pytest.raises(ConfigError, match="Split 'test' not found in TFDS"):
    data.build_eval(c, mesh, "test", 8)
  c.data.on_device = True      # Small TFDS sets can live on the devices.
  assert data.build_pretrain(c, mesh).batch(0)["view1"].dtype == np.float32


def test_tfds_describe_and_linear_subsets(tfds_dir, mesh, host):
  c = make_config("tfds", size=16, batch=8, eval_split="")
  c.data.name, c.data.data_dir, c.data.num_classes = "tiny_nette", tfds_dir, -1
  info = data.describe(c)
  assert (info.name, info.eval_split, info.num_train, info.num_eval,
          info.num_classes) == ("tiny_nette", "validation", 40, 30, 10)
  c.data.num_classes = 12
  with pytest.raises(ConfigError, match="has 10 classes") as e:
    data.describe(c)
  assert _one_line(e)
  c.data.num_classes, c.data.eval_split = -1, "val"
  with pytest.raises(ConfigError, match="Split 'val' not found in TFDS "
                     r"dataset 'tiny_nette' \(splits: train, validation\)"):
    data.describe(c)
  c.data.shuffle_buffer = 8
  lin = data.build_linear_train(c, mesh, 8, seed=1, fraction=0.25)
  assert lin.num_examples == 10
  b = _np(lin.batch(0))
  assert b["image"].shape == (8, 16, 16, 3) and b["image"].dtype == np.float32
  again = data.build_linear_train(c, mesh, 8, seed=1, fraction=0.25)
  np.testing.assert_array_equal(_np(again.batch(1))["label"],
                                _np(lin.batch(1))["label"])
  half = data.build_linear_train(c, mesh, 8, seed=1, split="train[:50%]")
  assert half.num_examples == 20 and half.batch(0)["label"].shape == (8,)


def test_on_device_path_runs_without_tensorflow(cifar_npz):
  script = textwrap.dedent(f"""
      import os, sys
      os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
      os.environ["JAX_PLATFORMS"] = "cpu"
      sys.modules["tensorflow"] = None           # Any import of it fails.
      sys.modules["tensorflow_datasets"] = None
      import jax
      from byol_jax.trainer import config_lib
      from byol_jax import data
      from byol_jax.core import sharding
      c = config_lib.base_config()
      c.batch_size, c.data.source, c.data.path = 16, "npz", {str(cifar_npz)!r}
      c.data.image_size, c.data.eval_crop_fraction = 32, 1.0
      c.data.on_device, c.data.eval_split, c.data.num_classes = True, "", -1
      info = data.describe(c)
      assert (info.eval_split, info.num_classes) == ("test", 10), info
      mesh = sharding.make_mesh()
      b = data.build_pretrain(c, mesh).batch(0)
      v1, v2 = jax.jit(lambda r, b: data.augment_views(r, b, c.augment))(
          jax.random.PRNGKey(0), b)
      n = sum(int(e["mask"].sum()) for e in data.build_eval(c, mesh, "test", 64))
      assert n == 1000 and v1.shape == (16, 32, 32, 3), (n, v1.shape)
      assert "tensorflow" not in [m.split(".")[0] for m in sys.modules
                                  if sys.modules[m] is not None]
      print("OK")
  """)
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True,
                       text=True, env=env, timeout=120, check=False)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
