r"""One process of the multi-host test (tests/test_multihost.py launches it).

  python tests/multihost_worker.py --workdir=DIR --npz=cifar10_small.npz \
      --out=DIR/p0.npz [--num_processes=2 --process_id=0 \
      --coordinator_address=localhost:PORT]

With --num_processes > 1 it joins the job through
`train.initialize_distributed` (CPU collectives: gloo), with short
initialization and heartbeat timeouts so that it exits by itself when
another process dies. It then runs `train.train_and_evaluate` on the tiny
config with the host (tf.data) pipeline, where every process reads only its
share of each global batch, while recording a host copy of each state it
saves. After training, still inside the job, it restores every checkpoint
(the newest through `checkpoint.Checkpointer.restore`) and asserts that it
equals the state that was saved. It writes the saved states to --out
({'<step>/<leaf path>': array}) for the test to compare across processes
and with a one-process run.

Any error ends the process at once (os._exit), non-zero, so that it never
waits on a job that cannot finish. (A job that loses a process is tested
through the trainer's command line: test_multihost.py.)
"""
import argparse
import importlib.util
import os
import pathlib
import sys
import time
import traceback

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EXIT_ERROR = 1
_START = time.monotonic()


def _log(msg: str) -> None:
  print(f"[{time.monotonic() - _START:6.1f}s] {msg}", flush=True)


def _parse(argv):
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--npz", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--checkpoint_every", type=int, default=1)
  p.add_argument("--coordinator_address", default=None)
  p.add_argument("--num_processes", type=int, default=1)
  p.add_argument("--process_id", type=int, default=0)
  p.add_argument("--heartbeat_timeout", type=int, default=10)
  p.add_argument("--init_timeout", type=int, default=60)
  p.add_argument("--shutdown_timeout", type=int, default=30)
  p.add_argument("--load_from", default=None,
                 help="Instead of training: load this job's checkpoints on "
                 "this process's devices and compare with --out's states.")
  return p.parse_args(argv)


def tiny_config(npz: str, steps: int, checkpoint_every: int):
  """configs/tiny.py, narrowed as in tests/test_train.py, host pipeline."""
  from byol_jax import data  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("tiny_config",
                                                REPO / "configs" / "tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(f"path={npz},batch=16,steps={steps}")
  c.model.num_filters = 4
  c.projector.hidden_dim = 32
  c.predictor.hidden_dim = 32
  c.knn.enabled = False
  c.data.on_device = False  # tf.data: each process reads its own share.
  c.log_every_steps = 1
  c.checkpoint_every_steps = checkpoint_every
  c.checkpoint_every_minutes = 0
  return data.resolve(c)  # Classes and eval split from the .npz, as train.


def _host_copy(tree):
  """Numpy copies of a replicated state (every process holds all of it)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda x: np.array(x.addressable_data(0))
                      if isinstance(x, jax.Array) else np.array(x), tree)


def _flat(tree) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def _assert_equal(saved: dict, restored: dict, what: str) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  assert saved.keys() == restored.keys(), (
      f"{what}: leaves differ: {sorted(saved.keys() ^ restored.keys())}")
  for k in saved:
    a, b = saved[k], restored[k]
    assert a.shape == b.shape and a.dtype == b.dtype, (
        f"{what} {k}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}")
    assert np.array_equal(a, b), (
        f"{what} {k}: max |diff| {np.max(np.abs(a - b))}")


def run(args) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from byol_jax.trainer import multihost  # pylint: disable=g-import-not-at-top
  from byol_jax import train  # pylint: disable=g-import-not-at-top

  _log("imported")
  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    multihost.initialize(
        "yes", args.coordinator_address, args.num_processes, args.process_id,
        initialization_timeout=args.init_timeout,
        heartbeat_timeout_seconds=args.heartbeat_timeout,
        shutdown_timeout_seconds=args.shutdown_timeout)
    assert jax.process_count() == args.num_processes
    assert jax.process_index() == args.process_id
  _log(f"worker {jax.process_index()}/{jax.process_count()}: "
       f"{jax.local_device_count()} local, {jax.device_count()} devices")

  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from byol_jax.trainer import checkpoint  # pylint: disable=g-import-not-at-top
  from byol_jax.core import methods  # pylint: disable=g-import-not-at-top
  from byol_jax.core import optim  # pylint: disable=g-import-not-at-top
  from byol_jax.core import sharding  # pylint: disable=g-import-not-at-top
  from byol_jax.core import train_state  # pylint: disable=g-import-not-at-top

  config = tiny_config(args.npz, args.steps, args.checkpoint_every)
  saved = {}

  class RecordingCheckpointer(checkpoint.Checkpointer):
    """Keeps a host copy of each state it saves (the trainer's own saves)."""

    def save(self, step, state):  # pylint: disable=arguments-differ
      saved[step] = _flat(_host_copy(state))
      super().save(step, state)
      _log(f"checkpoint of step {step} started")

  checkpoint.Checkpointer = RecordingCheckpointer  # train.py looks it up here.
  _log("training")
  try:
    final = train.train_and_evaluate(config, args.workdir)
  finally:
    checkpoint.Checkpointer = RecordingCheckpointer.__mro__[1]
  assert final["step"] == args.steps, final
  assert sorted(saved) == list(range(args.checkpoint_every, args.steps + 1,
                                     args.checkpoint_every)), sorted(saved)

  _log("trained; restoring")
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  np.savez(args.out, **{f"{step}/{k}": v for step, leaves in saved.items()
                        for k, v in leaves.items()})
  # Restore, still inside the job: every process reads its part.
  mesh = sharding.make_mesh()
  method = methods.get(config.method)
  model = method.make_network(config)
  tx, _ = optim.build_optimizer(config, args.steps, args.steps)
  abstract = train_state.abstract(config, model, tx, mesh, method.HAS_TARGET)
  ckpt = checkpoint.Checkpointer(args.workdir, config)
  assert max(ckpt.all_steps()) == args.steps, ckpt.all_steps()
  restored = ckpt.restore(abstract, args.steps)
  if jax.process_count() > 1:  # Global arrays, replicated like the saved.
    for leaf in jax.tree.leaves(restored):
      assert isinstance(leaf, jax.Array), type(leaf)
      assert leaf.sharding.is_equivalent_to(sharding.replicated(mesh),
                                            leaf.ndim), leaf.sharding
  _assert_equal(saved[args.steps], _flat(_host_copy(restored)),
                f"restored step {args.steps}")
  ckpt.close()
  # The earlier (mid-run) checkpoints, through Orbax directly.
  manager = ocp.CheckpointManager(checkpoint.as_path(args.workdir) /
                                  "checkpoints", item_names=checkpoint.ITEMS)
  kept = sorted(manager.all_steps())
  assert kept == sorted(saved)[-config.keep_checkpoints:], (kept, sorted(saved))
  for step in kept[:-1]:
    got = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    _assert_equal(saved[step], _flat(_host_copy(got.state)),
                  f"restored step {step}")
  manager.close()
  _log(f"worker {jax.process_index()}: restored steps {kept} equal the saved "
       "states")
  _check_save_decisions(config, args.workdir)

  _log(f"worker {jax.process_index()}: done")


def _check_save_decisions(config, workdir) -> None:
  """Orbax's save decisions (steps, minutes, preemption) touch no device.

  Every decision runs under a transfer guard that refuses even explicit
  transfers: a decision that needed a device value would have to fetch it.
  Process 0 decides the time-based ones; every process must agree.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from byol_jax.trainer import checkpoint  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.checkpoint_every_steps = 5
  config.checkpoint_every_minutes = 0.005  # 0.3 s, asked at log steps
  config.log_every_steps = 2
  ckpt = checkpoint.Checkpointer(workdir + "_decisions", config)
  decisions = []
  for step in range(101, 121):
    with jax.transfer_guard("disallow_explicit"):
      decisions.append(int(ckpt.should_save(step)))
    time.sleep(0.1)
  ckpt.close()
  _log(f"decisions {''.join(map(str, decisions))}")
  steps = range(101, 121)
  by_step = dict(zip(steps, decisions))
  assert all(by_step[s] for s in (105, 110, 115, 120))  # Every 5 steps.
  # Minutes are asked only at log steps (even), and they did pass.
  assert not any(by_step[s] for s in steps if s % 2 and s % 5)
  assert any(by_step[s] for s in steps if s % 2 == 0 and s % 5)


def load(args) -> None:
  """Loads a (multi-process) job's checkpoint on this layout and compares."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import byol_jax  # pylint: disable=g-import-not-at-top
  from byol_jax.trainer import checkpoint  # pylint: disable=g-import-not-at-top
  from byol_jax.core import methods  # pylint: disable=g-import-not-at-top
  from byol_jax.core import optim  # pylint: disable=g-import-not-at-top
  from byol_jax.interop import pretrained  # pylint: disable=g-import-not-at-top
  from byol_jax.trainer import resume  # pylint: disable=g-import-not-at-top
  from byol_jax.core import sharding  # pylint: disable=g-import-not-at-top
  from byol_jax.core import train_state  # pylint: disable=g-import-not-at-top

  with np.load(args.load_from) as f:
    saved = {k.split("/", 1)[1]: f[k] for k in f.files
             if k.startswith(f"{args.steps}/")}
  _log(f"{jax.device_count()} devices: loading step {args.steps}")
  # 1. load_encoder (what downstream code uses).
  encoder, variables = byol_jax.load_encoder(args.workdir)
  want = {"params": {}, "batch_stats": {}}
  got = _flat(variables)
  for col in want:
    prefix = f".{col}['encoder']"
    want[col] = {k[len(prefix):]: v for k, v in saved.items()
                 if k.startswith(prefix)}
  _assert_equal({f"['{c}']{k}": v for c, d in want.items()
                 for k, v in d.items()}, {k: np.asarray(v)
                                          for k, v in got.items()},
                "load_encoder")
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 32, 32, 3))
  features = encoder.apply(variables, x, train=False)
  assert features.shape[0] == 4 and np.isfinite(np.asarray(features)).all()
  # 2. The trainer's restore, on this process's mesh.
  config, _, step = pretrained.load_run(args.workdir)
  mesh = sharding.make_mesh()
  method = methods.get(config.method)
  model = method.make_network(config)
  tx, _ = optim.build_optimizer(config, args.steps, args.steps)
  abstract = train_state.abstract(config, model, tx, mesh, method.HAS_TARGET)
  with checkpoint.Checkpointer(args.workdir, config, read_only=True) as ckpt:
    state, step = resume.restore_or_init(ckpt, config, abstract, None)
  assert step == args.steps, step
  for leaf in jax.tree.leaves(state):
    assert len(leaf.sharding.device_set) == jax.device_count()
  _assert_equal(saved, _flat(_host_copy(state)), "trainer restore")
  _log(f"loaded on {jax.device_count()} devices: equal to the saved state")


def main(argv=None) -> None:
  args = _parse(sys.argv[1:] if argv is None else argv)
  try:
    load(args) if args.load_from else run(args)
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    # No atexit (jax.distributed.shutdown would wait for the others).
    os._exit(EXIT_ERROR)


if __name__ == "__main__":
  main()
