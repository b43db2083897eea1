r"""Images per second of the jitted train step on a device-resident batch.

  python benchmarks/step_throughput.py --depth=50 --image_size=224 \
      --per_device_batch=128,256 --dtype=bfloat16

For each case it times the full BYOL step (device-side augmentations of both
views, online and target forward passes, backward, LARS, EMA) and, in the same
run as a baseline, a supervised step (one view, forward + backward of the
encoder and a linear classifier, SGD). It prints a table and writes JSON with
the device, versions, commit and figures.

Model FLOP utilisation counts 8 forward passes per image (2 views x
(forward + backward ~ 3 forwards) + 2 target forwards), with the forward cost
from XLA's cost analysis of the encoder (ResNet-50 at 224 px: ~4.1 GMACs).
"""
import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from byol_jax import config_lib  # pylint: disable=g-import-not-at-top
from byol_jax import methods
from byol_jax import optim
from byol_jax import sharding
from byol_jax import step as step_lib
from byol_jax import train_state
from byol_jax.methods import network

# Dense bf16 peak FLOP/s per device, for MFU (None: unknown, MFU omitted).
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12, "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12, "TPU v3": 61.5e12, "TPU v4": 137.5e12,
    "TPU v5 lite": 197e12, "TPU v5": 229.5e12,
}


def _commit() -> str:
  try:
    return subprocess.check_output(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=os.path.dirname(os.path.abspath(__file__)),
        stderr=subprocess.DEVNULL).decode().strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def make_config(args, global_batch: int):
  c = config_lib.base_config()
  c.method = args.method
  c.batch_size = global_batch
  c.total_steps = 1000
  c.model.depth = args.depth
  c.model.width = args.width
  c.model.num_filters = args.num_filters
  c.model.stem = args.stem
  c.model.dtype = args.dtype
  c.data.image_size = args.image_size
  c.data.num_classes = 1000 if args.stem == "imagenet" else 10
  if args.image_size < 64:
    c.augment.view1.blur = 0.0
    c.augment.view2.blur = 0.0
  return c


def _time(fn, state, batch, steps: int, warmup: int):
  """Seconds per step of `state = fn(state, batch)[0]`, after warm-up."""
  for _ in range(warmup):
    state, metrics = fn(state, batch)
  jax.block_until_ready((state, metrics))
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = fn(state, batch)
  jax.block_until_ready((state, metrics))
  return (time.perf_counter() - start) / steps, state


def forward_flops(config, model, state) -> float | None:
  """XLA's FLOP count of one encoder forward pass per image."""
  x = jnp.zeros((1, config.data.image_size, config.data.image_size, 3))
  variables = {"params": state.params["encoder"],
               "batch_stats": state.batch_stats["encoder"]}
  encoder = network.make_encoder(config)
  compiled = jax.jit(lambda v, x: encoder.apply(v, x, train=False)).lower(
      variables, x).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = (cost or {}).get("flops")
  return float(flops) if flops else None


def bench_case(args, per_device_batch: int) -> dict:
  mesh = sharding.make_mesh()
  n = jax.device_count()
  global_batch = per_device_batch * n
  config = make_config(args, global_batch)
  method = methods.get(config.method)
  model = method.make_network(config)
  tx, lr_fn = optim.build_optimizer(config, config.total_steps, 100)
  tau_fn = optim.tau_schedule(config.tau_base, config.total_steps)
  state = train_state.create(config, model, tx, mesh, method.HAS_TARGET)
  s = config.data.image_size
  rng = np.random.default_rng(0)
  batch = sharding.global_batch(dict(
      view1=rng.integers(0, 256, (global_batch, s, s, 3), dtype=np.uint8),
      view2=rng.integers(0, 256, (global_batch, s, s, 3), dtype=np.uint8),
      label=rng.integers(0, config.data.num_classes, (global_batch,),
                         dtype=np.int32)), mesh)
  fwd = forward_flops(config, model, state)

  step = step_lib.jit_train_step(
      step_lib.make_train_step(config, model, tx, lr_fn, tau_fn), mesh)
  ssl_time, state = _time(step, state, batch, args.steps, args.warmup)
  del state

  # Baseline: a supervised step of the same encoder on one view.
  encoder = network.make_encoder(config)
  sup_model = network.Network(encoder=encoder, projector=_Identity(),
                              predictor=None,
                              num_classes=config.data.num_classes)
  sup_tx = optax.sgd(0.1, momentum=0.9)
  sup_state = _supervised_state(config, sup_model, sup_tx, mesh)
  sup_step = jax.jit(_supervised_step(sup_model, sup_tx),
                     in_shardings=(sharding.replicated(mesh),
                                   sharding.batch_sharding(mesh)),
                     out_shardings=(sharding.replicated(mesh),) * 2,
                     donate_argnums=(0,))
  sup_time, _ = _time(sup_step, sup_state, batch, args.steps, args.warmup)

  ssl_ips = global_batch / ssl_time
  sup_ips = global_batch / sup_time
  kind = jax.devices()[0].device_kind
  peak = PEAK_FLOPS.get(kind)
  mfu = (ssl_ips * 8 * fwd / (peak * n)) if (peak and fwd) else None
  return dict(method=config.method, depth=args.depth, width=args.width,
              num_filters=args.num_filters, image_size=s, dtype=args.dtype,
              per_device_batch=per_device_batch, global_batch=global_batch,
              step_seconds=ssl_time, images_per_sec=ssl_ips,
              images_per_sec_per_device=ssl_ips / n,
              supervised_images_per_sec=sup_ips,
              ratio_to_supervised=ssl_ips / sup_ips,
              forward_gflops_per_image=fwd / 1e9 if fwd else None,
              mfu=mfu)


class _Identity(network.nn.Module):
  @network.nn.compact
  def __call__(self, x, train=True):
    del train
    return x


def _supervised_state(config, model, tx, mesh):
  s = config.data.image_size

  def init():
    v = model.init(jax.random.PRNGKey(0), jnp.zeros((2, s, s, 3)), train=True)
    return dict(params=v["params"], batch_stats=v["batch_stats"],
                opt_state=tx.init(v["params"]))
  return jax.jit(init, out_shardings=sharding.replicated(mesh))()


def _supervised_step(model, tx):
  def loss_fn(params, batch_stats, x, y):
    # Unlike the SSL network, the classifier here trains the encoder too.
    out, new = model.apply({"params": params, "batch_stats": batch_stats}, x,
                           train=True, mutable=["batch_stats"],
                           method=lambda m, x, train: m.encoder(x, train=train))
    logits = jnp.dot(out.astype(jnp.float32),
                     params["classifier"]["kernel"]) + params["classifier"]["bias"]
    loss = optax.losses.softmax_cross_entropy_with_integer_labels(
        logits, y).mean()
    return loss, new["batch_stats"]

  def step(state, batch):
    x = batch["view1"].astype(jnp.float32) / 255.0
    (loss, bs), g = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["batch_stats"], x, batch["label"])
    updates, opt_state = tx.update(g, state["opt_state"], state["params"])
    return dict(params=optax.apply_updates(state["params"], updates),
                batch_stats=bs, opt_state=opt_state), loss
  return step


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--method", default="byol")
  p.add_argument("--depth", type=int, default=50)
  p.add_argument("--width", type=int, default=1)
  p.add_argument("--num_filters", type=int, default=64)
  p.add_argument("--stem", default="imagenet")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--per_device_batch", default="128,256")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--output", default="")
  args = p.parse_args()

  rows = [bench_case(args, int(b)) for b in args.per_device_batch.split(",")]
  dev = jax.devices()[0]
  report = dict(
      benchmark="step_throughput",
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
      commit=_commit(), device_kind=dev.device_kind, platform=dev.platform,
      device_count=jax.device_count(), process_count=jax.process_count(),
      host=platform.node(), cpu_count=os.cpu_count(),
      versions={name: importlib.metadata.version(name)
                for name in ("jax", "jaxlib", "flax", "optax")}
      | dict(python=platform.python_version()),
      flops_convention="8 encoder forward passes per image (BYOL step)",
      results=rows)
  header = (f"{'method':7} {'depth':>5} {'px':>4} {'dtype':9} {'b/dev':>6} "
            f"{'img/s':>10} {'sup img/s':>10} {'ratio':>6} {'MFU':>6}")
  print(f"device: {dev.device_kind} x{jax.device_count()}  commit {report['commit']}")
  print(header)
  for r in rows:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    print(f"{r['method']:7} {r['depth']:>5} {r['image_size']:>4} "
          f"{r['dtype']:9} {r['per_device_batch']:>6} "
          f"{r['images_per_sec']:>10.1f} {r['supervised_images_per_sec']:>10.1f} "
          f"{r['ratio_to_supervised']:>6.3f} {mfu:>6}")
  out = args.output or os.path.join(
      os.path.dirname(__file__), "results",
      f"step_throughput_{dev.platform}_r{args.depth}_{args.image_size}px.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(report, f, indent=2)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
