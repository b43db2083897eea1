r"""Host input pipeline against a plain transcription of the paper's recipe.

  python benchmarks/input_pipeline.py                  # 224 px, 1 and all cores
  python benchmarks/input_pipeline.py --threads=1,8 --trials=5

Side by side in one run, on the same JPEGs, with the same tf.data thread
count and options (deterministic, a private pool of N threads, N parallel
map calls, max_intra_op_parallelism = 1), two-view samples per CPU-second
(this process's CPU time, all threads; wall-clock rates are printed too):
- transcription: per image and view, a `tf.image.
  stateless_sample_distorted_bounding_box` window (area 0.08..1, aspect
  3/4..4/3, 10 attempts), `tf.image.decode_and_crop_jpeg`,
  `tf.image.resize(..., 'bicubic')`, then /255 clipped to [0, 1] (float32);
- ours: `host.train_dataset(config, 'pretrain')`, the pipeline the trainer
  runs (one decode per image over the union of its two windows; crops that
  fit on the C x C canvas go to the accelerator unresized, larger ones are
  shrunk on the host; uint8 out), with the canvas C = S (the default) on
  the 224 px JPEGs and C = 2 S (`--config.data.canvas_size`, advised for
  images much larger than S) on the 500 x 375 ones;
- ours, host resizes all: the same with `device_resize=False`, so that
  the host does every resize (what the offload buys);
- on the 500 x 375 JPEGs also ours at C = S beside C = 2 S: the two
  canvases a config chooses between (`data.canvas_size` 0 or 2 S).
On the Imagenette JPEGs as they are (224 x 224) and re-encoded at ImageNet's
typical 500 x 375 (bicubic upscale, JPEG quality 90), where most crops are
larger than S.

Also measured, on the default JAX devices: the resampling that ours leaves
to the accelerator (`host.finish_fn`), the device-side augmentations
(`augment.augment_views`, T and T'), and the on-device path's crops.

Prints a table and writes benchmarks/results/input_pipeline_<device>.json.
"""
import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import PIL  # noqa: E402
from PIL import Image  # noqa: E402
import tensorflow as tf  # noqa: E402

from byol_jax.trainer import config_lib  # noqa: E402
from byol_jax.core import sharding  # noqa: E402
from byol_jax.data import augment  # noqa: E402
from byol_jax.data import device  # noqa: E402
from byol_jax.data import host  # noqa: E402
from byol_jax.data import store  # noqa: E402

DEFAULT_NPZ = os.path.join(REPO, "..", "shared", "datasets",
                           "imagenette_small.npz")
TARGET_RATIO = 1.2


def load_jpegs(npz: str) -> tuple[list[bytes], np.ndarray]:
  with np.load(npz) as d:
    off, data = d["train_offsets"], d["train_jpeg"]
    return ([data[off[i]:off[i + 1]].tobytes() for i in range(len(off) - 1)],
            d["train_labels"].astype(np.int32))


def reencode(jpegs: list[bytes], width: int, height: int) -> list[bytes]:
  """The images at width x height (bicubic), JPEG quality 90."""
  out = []
  for b in jpegs:
    im = Image.open(io.BytesIO(b)).convert("RGB")
    f = io.BytesIO()
    im.resize((width, height), Image.BICUBIC).save(f, "JPEG", quality=90)
    out.append(f.getvalue())
  return out


def write_npz(path: str, jpegs: list[bytes], labels: np.ndarray) -> None:
  """The packed layout of ../shared/datasets, as one 'train' split."""
  off = np.cumsum([0] + [len(b) for b in jpegs]).astype(np.int64)
  np.savez(path, train_jpeg=np.frombuffer(b"".join(jpegs), np.uint8),
           train_offsets=off, train_labels=labels)


def _options(ds, threads: int):
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_fusion = True
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  return ds.with_options(options)


def transcription(jpegs: list[bytes], size: int, batch: int, threads: int):
  """The paper's recipe written plainly (see the module docstring)."""
  blobs = tf.constant(jpegs)
  bbox = tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4])

  def view(data, seed):
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.io.extract_jpeg_shape(data), bbox, seed=seed,
        min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], extent[0], extent[1]])
    image = tf.image.decode_and_crop_jpeg(data, window, channels=3)
    image = tf.image.resize(image, [size, size], method="bicubic")
    return tf.clip_by_value(image / 255.0, 0.0, 1.0)

  def element(i):
    data = tf.gather(blobs, i % len(jpegs))
    return dict(view1=view(data, tf.stack([i, 1])),
                view2=view(data, tf.stack([i, 2])))
  ds = tf.data.Dataset.range(1 << 62).map(
      element, num_parallel_calls=threads, deterministic=True)
  return _options(ds.batch(batch, drop_remainder=True).prefetch(2), threads)


def _config(npz: str, size: int, batch: int, threads: int, canvas: int = 0):
  c = config_lib.base_config()
  c.batch_size, c.seed = batch, 0
  c.data.update(dict(source="npz", path=npz, train_split="train",
                     image_size=size, canvas_size=canvas,
                     num_parallel_calls=threads))
  return c


def ours(npz: str, size: int, batch: int, threads: int, canvas: int = 0,
         device_resize: bool = True):
  return host.train_dataset(_config(npz, size, batch, threads, canvas),
                            "pretrain", process_index=0, process_count=1,
                            device_resize=device_resize)[0]


def rates(ds, batch: int, steps: int) -> tuple[float, float]:
  """(two-view samples per CPU-second, per wall second) over `steps`."""
  it = iter(ds)
  for _ in range(2):
    next(it)
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(steps):
    next(it)
  n = steps * batch
  return n / max(time.process_time() - cpu, 1e-9), n / (
      time.perf_counter() - start)


def _device_rate(fn, batch: int, steps: int = 4) -> float:
  jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(steps):
    jax.block_until_ready(fn())
  return steps * batch / (time.perf_counter() - start)


def bench_device(npz: str, size: int, batch: int, canvas: int
                 ) -> dict[str, float]:
  """Two-view samples per second of the device-side stages."""
  mesh = sharding.make_mesh()
  c = _config(npz, size, batch, 1, canvas)
  local = next(ours(npz, size, batch, 1, canvas).as_numpy_iterator())
  local = {k: v for k, v in local.items() if k != "label"}
  finish = host.finish_fn(mesh, "pretrain", size)
  glob = sharding.global_batch(local, mesh)
  out = dict(host_finish=_device_rate(lambda: finish(glob), batch))
  cost = finish.lower(glob).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out["host_finish_gflop_per_sample"] = cost["flops"] / batch / 1e9
  cfg = c.augment
  views = {k: v for k, v in finish(glob).items() if k in ("view1", "view2")}
  aug = jax.jit(lambda r, b: augment.augment_views(r, b, cfg))
  key = jax.random.PRNGKey(0)
  out["augment_views"] = _device_rate(lambda: aug(key, views), batch)
  canvas = store.load_canvas(c.data, "train")
  dev = device.build(c, mesh, "pretrain", "train", batch, 0, canvas=canvas)
  step = iter(range(10**9))
  out["device_crops"] = _device_rate(lambda: dev.batch(next(step)), batch)
  out["share_resampled_on_device"] = float(np.mean(
      [np.any(local[k] != size, axis=1) for k in ("hw1", "hw2")]))
  return out


def _git_commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--npz", default=os.path.normpath(DEFAULT_NPZ))
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--threads", default="",
                 help="comma-separated thread counts (default: 1 and all "
                      "cores)")
  p.add_argument("--steps", type=int, default=10, help="batches per trial")
  p.add_argument("--trials", type=int, default=3)
  p.add_argument("--note", default="")
  p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
  args = p.parse_args()

  cores = os.cpu_count() or 1
  threads = ([int(t) for t in args.threads.split(",")] if args.threads
             else sorted({1, cores}))
  jpegs, labels = load_jpegs(args.npz)
  tmp = tempfile.mkdtemp(prefix="byol_input_bench_")
  # Canvas C = S (the default) for images about S; 2 S for larger images.
  sets = {"imagenette_224": (jpegs, args.size),
          "imagenette_500x375": (reencode(jpegs, 500, 375), 2 * args.size)}
  load_before = os.getloadavg()
  rows = []
  for name, (data, canvas) in sets.items():
    npz = os.path.join(tmp, f"{name}.npz")
    write_npz(npz, data, labels)
    for n in threads:
      variants = dict(
          transcription=lambda: transcription(data, args.size, args.batch, n),
          ours=lambda: ours(npz, args.size, args.batch, n, canvas),
          ours_host_resizes_all=lambda: ours(npz, args.size, args.batch, n,
                                             device_resize=False))
      if canvas != args.size:  # Both canvases side by side: C = 2 S and S.
        variants["ours_canvas_s"] = lambda: ours(npz, args.size, args.batch,
                                                 n, args.size)
      got = {k: [] for k in variants}
      for _ in range(args.trials):           # Interleaved: same conditions.
        for k, make in variants.items():
          got[k].append(rates(make(), args.batch, args.steps))
      row = dict(jpegs=name, mean_jpeg_bytes=int(np.mean([len(b)
                                                          for b in data])),
                 canvas_size=canvas, threads=n)
      for k, v in got.items():
        row[f"{k}_per_cpu_s"] = round(statistics.median(r[0] for r in v), 1)
        row[f"{k}_per_s"] = round(statistics.median(r[1] for r in v), 1)
      t = row["transcription_per_cpu_s"]
      row["ratio"] = round(row["ours_per_cpu_s"] / t, 2)
      row["ratio_host_resizes_all"] = round(
          row["ours_host_resizes_all_per_cpu_s"] / t, 2)
      if "ours_canvas_s_per_cpu_s" in row:
        row["ratio_canvas_s"] = round(row["ours_canvas_s_per_cpu_s"] / t, 2)
      rows.append(row)
      print(f"{name} {n} thread(s): ours {row['ratio']:.2f}x the "
            "transcription per CPU-second", flush=True)
  dev_rates = {name: bench_device(os.path.join(tmp, f"{name}.npz"),
                                  args.size, args.batch, canvas)
               for name, (_, canvas) in sets.items()}
  load_after = os.getloadavg()

  dev = jax.devices()
  kind = dev[0].device_kind
  result = dict(
      benchmark="input_pipeline", image_size=args.size, batch=args.batch,
      steps_per_trial=args.steps, trials=args.trials,
      tf_data_options=dict(deterministic=True, private_threadpool_size="N",
                           num_parallel_calls="N",
                           max_intra_op_parallelism=1),
      device_kind=kind, device_platform=dev[0].platform,
      device_count=len(dev), jax_version=jax.__version__,
      tf_version=tf.__version__, numpy_version=np.__version__,
      pillow_version=PIL.__version__, python=platform.python_version(),
      git_commit=_git_commit(), cpu_cores=cores,
      load_average_before=[round(x, 2) for x in load_before],
      load_average_after=[round(x, 2) for x in load_after],
      host=rows, target_ratio=TARGET_RATIO,
      meets_target=bool(min(r["ratio"] for r in rows) >= TARGET_RATIO),
      device_two_view_samples_per_s={
          k: {kk: round(vv, 3) for kk, vv in v.items()}
          for k, v in dev_rates.items()},
      note=args.note, time=time.strftime("%Y-%m-%dT%H:%M:%S"))

  print(f"\nTwo-view samples per CPU-second at {args.size} px, batch "
        f"{args.batch}; {cores} CPU cores, load average {load_before[0]:.1f}"
        f" -> {load_after[0]:.1f}")
  print(f"{'JPEGs':<20} {'C':>4} {'thr':>3} {'transcr.':>9} {'ours':>8} "
        f"{'ratio':>6} {'host-all':>9} {'ratio':>6} {'ours C=S':>9} "
        f"{'ratio':>6}")
  for r in rows:
    at_s = (f"{r['ours_canvas_s_per_cpu_s']:>9.1f} "
            f"{r['ratio_canvas_s']:>5.2f}x" if "ratio_canvas_s" in r
            else f"{'(C = S)':>9} {'':>6}")
    print(f"{r['jpegs']:<20} {r['canvas_size']:>4} {r['threads']:>3} "
          f"{r['transcription_per_cpu_s']:>9.1f} {r['ours_per_cpu_s']:>8.1f} "
          f"{r['ratio']:>5.2f}x {r['ours_host_resizes_all_per_cpu_s']:>9.1f} "
          f"{r['ratio_host_resizes_all']:>5.2f}x {at_s}")
  print(f"target: ours >= {TARGET_RATIO}x the transcription: "
        f"{'met' if result['meets_target'] else 'NOT met'}")
  print(f"\nDevice side ({len(dev)} x {kind}), two-view samples per second:")
  for name, v in dev_rates.items():
    print(f"  {name}: resampling left by the host {v['host_finish']:.1f} "
          f"({100 * v['share_resampled_on_device']:.0f}% of views, "
          f"{v['host_finish_gflop_per_sample']:.2f} GFLOP per sample), "
          f"augment_views {v['augment_views']:.1f}, on-device crops "
          f"{v['device_crops']:.1f}")

  os.makedirs(args.out, exist_ok=True)
  tag = "".join(ch if ch.isalnum() else "_" for ch in kind.lower()).strip("_")
  path = os.path.join(args.out, f"input_pipeline_{tag}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
