r"""The trainer's programs compiled ahead of time for real TPU generations.

No TPU is needed: with `libtpu` installed (`pip install -e ".[tpu-aot]"`),
`jax.experimental.topologies` describes a TPU slice whose devices
`jax.jit(...).lower(...).compile()` accepts, and XLA's TPU compiler reports
each program's per-device memory, FLOPs and collectives.

    python benchmarks/tpu_aot.py                      # every preset x slice
    python benchmarks/tpu_aot.py --presets=byol_r50 --slices=v3-8,v5e-4

For each pretraining preset and slice it compiles the programs a run
executes: the train step (at two per-device batches, so that the largest
batch that fits can be read off the line through them), the function that
finishes each batch on the devices, the kNN monitor at ImageNet size (its
forward pass and the sharded kNN vote over 1,281,167 bank rows) and linear
evaluation's train step. Rows are appended to the JSON as they finish
(a rerun skips the rows it has), and the table goes to a .md beside it.
Exit status 1 when a program does not fit its device's memory (XLA refuses
it with RESOURCE_EXHAUSTED: a row with 'error'), except rows compiled as
probes that must not fit:

    python benchmarks/tpu_aot.py --presets=byol_r50 --slices=v3-8 \
        --programs=train_step --batch=512 --expect-misfit

The libtpu that jax[tpu] pins for jax 0.10.2 (0.0.42.1) overflows a
thread's stack compiling any train step for v6e (SIGSEGV in
MigrateInstructionUsers' recursion, whatever `ulimit -s` or
--xla_internal_thread_stack_size_bytes); libtpu 0.0.52 compiles it, loaded
through TPU_LIBRARY_PATH (each row records the libtpu that compiled it):

    pip install --no-deps --target /tmp/libtpu52 libtpu==0.0.52
    TPU_LIBRARY_PATH=/tmp/libtpu52/libtpu/libtpu.so \
        python benchmarks/tpu_aot.py --slices=v6e-4 --programs=train_step

The kNN monitor goes the other way: 0.0.52 refuses jax 0.10.2's HLO of it
(a RET_CHECK on an async-update instruction's operands) and 0.0.42.1
compiles it for v6e.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # The TPUs are only described.
# No TPU is opened: several compiling processes (a benchmark beside the
# tests) may load libtpu at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
import run_info  # noqa: E402  (benchmarks/run_info.py)
from byol_jax.core import methods  # noqa: E402
from byol_jax.core import models  # noqa: E402
from byol_jax.core import optim  # noqa: E402
from byol_jax.core import sharding  # noqa: E402
from byol_jax.core import step as step_lib  # noqa: E402
from byol_jax.core import train_state  # noqa: E402
from byol_jax.evaluation import knn  # noqa: E402
from byol_jax.evaluation import linear  # noqa: E402
from byol_jax.evaluation import monitor  # noqa: E402

from tpu_aot_report import (  # noqa: E402  (benchmarks/tpu_aot_report.py)
    BATCHES, GIB, NOTE, PRESETS, PROGRAMS, SLICES, Slice, collectives,
    compiled, complete, fits_on, fits_summary, misfit_row, plan, row_key,
    summarize, table)

IMAGENET_TRAIN, IMAGENET_EVAL = 1_281_167, 50_000


def slice_mesh(s: Slice, devices: int | None = None):
  """The `data` mesh over the slice's devices (or its first `devices`)."""
  topo = topologies.get_topology_desc(
      platform="tpu", topology_name=s.topology, chip_config_name=s.chip_config,
      chips_per_host_bounds=(2, 2, 1), num_slices=1)
  found = list(topo.devices)
  return sharding.make_mesh(found[:devices] if devices else found)


def load_preset(name: str):
  """The preset's config (configs/FILE.py:ARG with its overrides)."""
  sys.path.insert(0, os.path.join(run_info.REPO, "tests"))
  from testlib import load_config  # pylint: disable=g-import-not-at-top
  file, arg, overrides = PRESETS[name]
  c = load_config(file, arg)
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def analyse(compiled, seconds: float) -> dict:
  """Per-device memory, FLOPs and collectives of a compiled program."""
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
          - mem.alias_size_in_bytes + mem.temp_size_in_bytes
          + mem.generated_code_size_in_bytes)
  return dict(peak_bytes=int(peak),
              argument_bytes=int(mem.argument_size_in_bytes),
              temp_bytes=int(mem.temp_size_in_bytes),
              flops=float(cost.get("flops", 0.0)),
              collectives=summarize(collectives(compiled.as_text())),
              compile_seconds=round(seconds, 1))


def compile_program(fn, *args) -> tuple[Any, float]:
  start = time.time()
  compiled = fn.lower(*args).compile()
  return compiled, time.time() - start


def _sds(shape, dtype, shard):
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=shard)


# --------------------------------------------------------------- programs --
def pretrain_parts(config, mesh):
  """(abstract state, jitted train step) as `train.train_and_evaluate`
  builds them, for config.batch_size and ImageNet's epoch."""
  method = methods.get(config.method)
  model = method.make_network(config)
  steps_per_epoch = max(IMAGENET_TRAIN // config.batch_size, 1)
  total = int(config.total_steps or round(config.num_epochs
                                          * steps_per_epoch))
  tx, lr_fn = optim.build_optimizer(config, total, steps_per_epoch)
  tau_fn = (optim.tau_schedule(config.tau_base, total)
            if method.HAS_TARGET else None)
  state = train_state.abstract(config, model, tx, mesh, method.HAS_TARGET)
  step = step_lib.jit_train_step(
      step_lib.make_train_step(config, model, tx, lr_fn, tau_fn), mesh)
  return state, step


def pretrain_batch(config, mesh) -> dict:
  """The finished global batch the step reads: uint8 views, int32 labels."""
  b, s = config.batch_size, config.data.image_size
  rows = sharding.batch_sharding(mesh)
  return dict(view1=_sds((b, s, s, 3), jnp.uint8, rows),
              view2=_sds((b, s, s, 3), jnp.uint8, rows),
              label=_sds((b,), jnp.int32, rows))


def state_bytes(state) -> int:
  """Bytes of the (replicated) state on each device."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))


def compile_train_step(config, mesh) -> tuple[dict, Any, Any]:
  """(analysis, abstract state, compiled) of the train step."""
  state, step = pretrain_parts(config, mesh)
  compiled, secs = compile_program(step, state, pretrain_batch(config, mesh))
  return analyse(compiled, secs), state, compiled


def compile_finish(config, mesh) -> dict:
  """The batch-finishing function (canvas crops resized to S x S)."""
  from byol_jax.data import host  # pylint: disable=g-import-not-at-top
  b, s = config.batch_size, config.data.image_size
  c = host.canvas_side(config)
  rows = sharding.batch_sharding(mesh)
  batch = dict(view1=_sds((b, c, c, 3), jnp.uint8, rows),
               hw1=_sds((b, 2), jnp.int32, rows),
               view2=_sds((b, c, c, 3), jnp.uint8, rows),
               hw2=_sds((b, 2), jnp.int32, rows),
               label=_sds((b,), jnp.int32, rows))
  compiled, secs = compile_program(host.finish_fn(mesh, "pretrain", s), batch)
  return analyse(compiled, secs)


def _stack(num: int, batch: int, dim: int, mesh) -> tuple:
  """Abstract (features, labels, mask) stack of `num` rows in batches."""
  nb, stacked = -(-num // batch), knn.rows_sharding(mesh)
  return (_sds((nb, batch, dim), jnp.float32, stacked),
          _sds((nb, batch), jnp.int32, stacked),
          _sds((nb, batch), jnp.bool_, stacked))


def compile_knn_vote(config, mesh, bank_size: int, query_size: int,
                     eval_batch: int) -> dict:
  """The sharded kNN vote over stacks of `bank_size` and `query_size`
  features (the monitor's program, as `Monitor` builds it)."""
  dim = models.representation_dim(config.model.depth, config.model.width,
                                  config.model.num_filters)
  batch = sharding.fit_batch_size(eval_batch, mesh)
  vote = knn.sharded_knn(mesh, int(config.data.num_classes),
                         int(min(config.knn.k, bank_size)),
                         float(config.knn.temperature), counts=True)
  compiled, secs = compile_program(
      vote, *_stack(bank_size, batch, dim, mesh),
      *_stack(query_size, batch, dim, mesh))
  return analyse(compiled, secs)


def compile_knn(config, mesh, state, bank_size: int = IMAGENET_TRAIN,
                query_size: int = IMAGENET_EVAL,
                eval_batch: int | None = None) -> dict:
  """The kNN monitor: its forward pass at the eval batch, and the sharded
  vote over stacks of `bank_size` and `query_size` features.

  'peak_bytes' is the monitor's per-device peak beside the train state:
  state + max(forward + both stacks, the vote program).
  """
  n = mesh.devices.size
  batch = sharding.fit_batch_size(eval_batch or config.batch_size, mesh)
  rep, rows = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  c = int(config.data.num_classes)
  dim = models.representation_dim(config.model.depth, config.model.width,
                                  config.model.num_filters)
  encoder_vars = {"params": state.params["encoder"],
                  "batch_stats": state.batch_stats["encoder"]}
  classifier = {"kernel": _sds((dim, c), jnp.float32, rep),
                "bias": _sds((c,), jnp.float32, rep)}
  s = config.data.image_size
  images = dict(image=_sds((batch, s, s, 3), jnp.float32, rows),
                label=_sds((batch,), jnp.int32, rows),
                mask=_sds((batch,), jnp.bool_, rows))
  fwd, fwd_secs = compile_program(monitor.forward_fn(config, mesh),
                                  encoder_vars, classifier, images)
  fwd_a = analyse(fwd, fwd_secs)
  vote_a = compile_knn_vote(config, mesh, bank_size, query_size, batch)
  stacks = sum(math.prod(x.shape) * x.dtype.itemsize
               for x in _stack(bank_size, batch, dim, mesh)
               + _stack(query_size, batch, dim, mesh)) // n
  resident = state_bytes(state)
  peak = resident + max(fwd_a["peak_bytes"] + stacks, vote_a["peak_bytes"])
  collect = dict(fwd_a["collectives"])
  for k, v in vote_a["collectives"].items():
    collect[k] = v if k not in collect else {
        "count": collect[k]["count"] + v["count"],
        "bytes": collect[k]["bytes"] + v["bytes"],
        "largest_elements": max(collect[k]["largest_elements"],
                                v["largest_elements"])}
  return dict(peak_bytes=int(peak), state_bytes=resident,
              stack_bytes=int(stacks), forward=fwd_a, vote=vote_a,
              flops=fwd_a["flops"] * (-(-bank_size // batch)
                                      + -(-query_size // batch))
              + vote_a["flops"],
              collectives=collect,
              compile_seconds=round(fwd_secs + vote_a["compile_seconds"], 1),
              bank_rows=bank_size, query_rows=query_size, eval_batch=batch)


def compile_linear(config, mesh, state, batch_size: int = 256) -> dict:
  """Linear evaluation's train step (frozen encoder, fresh head) at the
  protocol's batch (256, rounded up to the devices)."""
  batch = sharding.fit_batch_size(batch_size, mesh)
  encoder = monitor.network.make_encoder(config)
  c = int(config.data.num_classes)
  dim = models.representation_dim(config.model.depth, config.model.width,
                                  config.model.num_filters)
  head = linear.make_head(c)
  steps = 80 * (IMAGENET_TRAIN // batch)
  tx, schedule = linear.make_optimizer(0.2, batch, steps)
  rep, rows = sharding.replicated(mesh), sharding.batch_sharding(mesh)

  def init():
    params = {"head": head.init(jax.random.PRNGKey(0),
                                jnp.zeros((1, dim)))["params"]}
    return linear.LinearState(step=jnp.zeros((), jnp.int32), params=params,
                              batch_stats={}, opt_state=tx.init(params))
  lstate = jax.tree.map(lambda x: _sds(x.shape, x.dtype, rep),
                        jax.eval_shape(init))
  frozen = {"params": state.params["encoder"],
            "batch_stats": state.batch_stats["encoder"]}
  s = config.data.image_size
  images = dict(image=_sds((batch, s, s, 3), jnp.float32, rows),
                label=_sds((batch,), jnp.int32, rows))
  step = linear.jit_train_step(linear.make_train_step(
      encoder, head, tx, schedule, finetune=False,
      normalize=bool(config.augment.get("normalize", True))), mesh)
  compiled, secs = compile_program(step, lstate, frozen, images)
  out = analyse(compiled, secs)
  out["batch"] = batch
  return out


# ------------------------------------------------------------------ runs --
def run_one(preset: str, slice_name: str, program: str,
            per_device: int | None, log=print) -> list[dict]:
  """Compiles one program of one preset on one slice; its rows."""
  s = SLICES[slice_name]
  mesh = slice_mesh(s)
  n = mesh.devices.size
  config = load_preset(preset)
  base = dict(preset=preset, slice=slice_name, topology=s.topology,
              hosts=s.hosts, program=program)
  b = per_device or BATCHES[s.generation][0]
  config.batch_size = b * n
  if program == "train_step":
    a, _, _ = compile_train_step(config, mesh)
    rows = [dict(base, per_device_batch=b, global_batch=b * n, **a)]
  elif program == "finish":
    rows = [dict(base, per_device_batch=b, global_batch=b * n,
                 **compile_finish(config, mesh))]
  else:
    state, _ = pretrain_parts(config, mesh)
    fn = compile_knn if program == "knn_monitor" else compile_linear
    rows = [dict(base, per_device_batch=None, **fn(config, mesh, state))]
  out = [dict(complete(r, s, n), commit=run_info.commit()) for r in rows]
  for r in out:
    log(f"{r['preset']} {r['slice']} {r['program']} b={r['per_device_batch']}"
        f": {r['peak_gib']} GiB, {r['flops'] / 1e9:.1f} GFLOP, "
        f"{r['compile_seconds']} s compile")
  return out


def libtpu_version() -> str | None:
  """The libtpu that compiles: TPU_LIBRARY_PATH's wheel if set (e.g.
  .../site/libtpu/libtpu.so beside libtpu-X.dist-info), else the installed
  one."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  path = os.environ.get("TPU_LIBRARY_PATH")
  if path:
    site = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    found = [d[len("libtpu-"):-len(".dist-info")] for d in os.listdir(site)
             if d.startswith("libtpu-") and d.endswith(".dist-info")]
    return found[0] if found else path
  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return None


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--presets", default=",".join(PRESETS))
  p.add_argument("--slices", default=",".join(SLICES))
  p.add_argument("--programs", default=",".join(PROGRAMS))
  p.add_argument("--batches", default="0,1",
                 help="which train-step batches of BATCHES: 0, 1 or 0,1")
  p.add_argument("--batch", type=int, default=None,
                 help="compile the train step at this per-device batch")
  p.add_argument("--expect-misfit", action="store_true",
                 help="this run's rows are probes that must NOT fit: refused "
                 "ones are kept as 'expected_misfit' rows that later runs do "
                 "not fail on; one that fits is a plain row and this run "
                 "exits 1")
  p.add_argument("--out", default=os.path.join(
      run_info.REPO, "benchmarks", "results", "tpu_aot.json"))
  p.add_argument("--readme", action="store_true",
                 help="print README's Fits-on and compiled tables from --out "
                 "and stop")
  args = p.parse_args(argv)
  if args.readme:
    with open(args.out) as f:
      result = json.load(f)
    print(fits_on(result) + "\n" + compiled(result), end="")
    return 0
  result = {"rows": []}
  if os.path.exists(args.out):
    with open(args.out) as f:
      result = json.load(f)
  done = {row_key(r) for r in result["rows"]}
  jobs = plan(args.presets.split(","), args.slices.split(","),
              args.programs.split(","),
              tuple(int(i) for i in args.batches.split(",")), args.batch)
  failed = False
  compiler = libtpu_version()
  for preset, name, program, b in jobs:
    if (preset, name, program, b) in done:
      continue
    start = time.time()
    try:
      rows = run_one(preset, name, program, b)
    except Exception as e:  # pylint: disable=broad-except
      print(f"{preset} {name} {program} b={b}: {type(e).__name__}: "
            f"{str(e).splitlines()[0][:300]}", flush=True)
      if "RESOURCE_EXHAUSTED" not in str(e):
        failed = True
        continue  # Not a verdict on the program: no row.
      # XLA refuses a program that cannot fit: that is a row too.
      rows = [misfit_row(preset, name, program, b, str(e),
                         time.time() - start)]
    for r in rows:
      r["libtpu"] = compiler
      if args.expect_misfit and r["fits"]:  # A probe that fits: a plain row.
        print(f"{preset} {name} {program} b={b}: fits; expected not to",
              flush=True)
        failed = True
      elif args.expect_misfit:
        r["expected_misfit"] = True
    if os.path.exists(args.out):  # Rows another run wrote meanwhile too.
      with open(args.out) as f:
        result["rows"] = json.load(f)["rows"]
    result["rows"] = [r for r in result["rows"]
                      if row_key(r) not in {row_key(x) for x in rows}] + rows
    result.update(
        commit="per row ('commit')",
        versions=run_info.versions(),  # libtpu: per row.
        slices={k: dataclasses.asdict(v) for k, v in SLICES.items()},
        fits=fits_summary(result["rows"]), note=NOTE)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
      f.write(table(result["rows"], result["fits"]))
  print(table(result["rows"], result.get("fits", [])))
  misfits = [r for r in result["rows"]
             if not r["fits"] and not r.get("expected_misfit")]
  return 1 if failed or misfits else 0


if __name__ == "__main__":
  sys.exit(main())
