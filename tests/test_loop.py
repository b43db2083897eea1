"""The training loop at scale: no implicit transfers, no per-step host reads,
evaluators compiled once, only the collectives each method needs (issue 12)."""
import re

import jax
import numpy as np
import pytest

from byol_jax import data
from byol_jax.core import sharding
from byol_jax.core import step as step_lib
from byol_jax import train
from byol_jax.evaluation import linear
from byol_jax.evaluation import monitor as monitor_lib
from byol_jax.core.methods import network
from byol_jax.errors import ConfigError
from testlib import build_step, count_compiles


# The schedules of a 6-step run of 312-step epochs (5,000 images, batch 16),
# as the trainer builds them in the 6-step runs of test_run_safety.py: the
# same compiled step, found in the persistent compilation cache.
STEPS, STEPS_PER_EPOCH = 6, 312


def _build(config, mesh):
  state, fn = build_step(config, mesh, STEPS, STEPS_PER_EPOCH)
  return state, step_lib.jit_train_step(fn, mesh)


def test_device_data_path_makes_no_implicit_transfer(tiny_config):
  config = tiny_config()
  assert config.data.on_device
  mesh = sharding.make_mesh()
  state, step = _build(config, mesh)
  pipeline = data.build_pretrain(config, mesh, start_step=0)
  with jax.transfer_guard("disallow"):
    for s in range(3):
      state, metrics = step(state, pipeline.batch(s))
  assert int(jax.device_get(state.step)) == 3
  # The guard is real: an implicit transfer inside it fails.
  with pytest.raises(Exception, match="Disallowed host-to-device"):
    with jax.transfer_guard("disallow"):
      step(state, {k: np.asarray(v) for k, v in
                   jax.device_get(pipeline.batch(3)).items()})
  del metrics


def test_loop_reads_from_devices_only_when_it_logs_or_saves(
    tmp_path, tiny_config, monkeypatch):
  reads = []
  fetch = train._fetch  # pylint: disable=protected-access

  def counted(tree):
    reads.append(1)
    return fetch(tree)

  monkeypatch.setattr(train, "_fetch", counted)
  config = tiny_config(total_steps=STEPS, log_every_steps=3,
                       checkpoint_every_steps=2, knn__enabled=False)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  # Log steps 3 and 6 (6 is also the final check); saves at 2 and 4; none at
  # 1 and 5.
  assert len(reads) == 4, reads


def test_profile_steps_past_the_run_is_one_line_before_compiling(
    tmp_path, tiny_config):
  config = tiny_config(total_steps=STEPS)
  with count_compiles() as n:
    with pytest.raises(ConfigError) as e:
      train.train_and_evaluate(config, str(tmp_path / "run"),
                               profile_steps=(2, STEPS + 1))
  assert str(e.value) == "--profile_steps=2:7 ends past the run's 6 steps."
  assert n[0] == 0 and not (tmp_path / "run" / "checkpoints").exists()


def test_three_evaluations_compile_once(tiny_config):
  config = data.resolve(tiny_config(knn__enabled=True))
  mesh = sharding.make_mesh()
  state, _ = _build(config, mesh)
  variables = {"params": state.params["encoder"],
               "batch_stats": state.batch_stats["encoder"]}
  monitor = monitor_lib.Monitor(config, mesh)
  counts = []
  for _ in range(3):
    with count_compiles() as n:
      results = monitor(variables, state.params["classifier"])
    counts.append(n[0])
  assert set(results) == {"eval/online_top1", "eval/online_top5",
                          "eval/knn_top1", "eval/knn_top5"}
  assert counts[1] == counts[2] == 0, counts
  assert counts[0] >= 1
  # Another encoder without a classifier (BYOL's target): kNN only, and the
  # same compiled programs.
  target = {"params": state.target["params"]["encoder"],
            "batch_stats": state.target["batch_stats"]["encoder"]}
  with count_compiles() as n:
    results = monitor(target, None, prefix="eval/target_")
  assert set(results) == {"eval/target_knn_top1", "eval/target_knn_top5"}
  assert n[0] == 0


def test_linear_evaluator_compiles_once_and_reads_at_log_steps(
    tiny_config, monkeypatch):
  config = data.resolve(tiny_config())
  mesh = sharding.make_mesh()
  encoder = network.make_encoder(config)
  state, _ = _build(config, mesh)
  variables = {"params": state.params["encoder"],
               "batch_stats": state.batch_stats["encoder"]}
  evaluate = linear.LinearEvaluator(config, encoder, mesh, steps=3,
                                    batch_size=64, eval_batch_size=200,
                                    log_every=2)
  first = evaluate(variables)
  fetched = []
  fetch = linear._fetch  # pylint: disable=protected-access

  def counted(tree):
    fetched.append(jax.tree.map(np.asarray, fetch(tree)))
    return fetched[-1]

  monkeypatch.setattr(linear, "_fetch", counted)
  with count_compiles() as n:
    second = evaluate(variables)
  assert n[0] == 0
  assert first["top1"] == second["top1"]  # Same seed, same result.
  # Log steps 2 and 3 (the last): one read each, of the window's sums.
  assert len(fetched) == 2, len(fetched)
  assert second["train_loss"] == pytest.approx(float(fetched[-1]["loss"]))
  # The windows' sums of the cosine lr over 3 steps: (1 + 0.75) and 0.25
  # of the peak.
  assert float(fetched[0]["lr"]) == pytest.approx(7 * float(fetched[1]["lr"]))


_COLLECTIVE = re.compile(
    r"=\s*(\S+)\s+(all-to-all|all-gather|all-reduce|reduce-scatter|"
    r"collective-permute)(?:-start)?\(")


def _collectives(hlo: str) -> list[tuple[str, int]]:
  """(kind, element count of the result) of every collective in the HLO."""
  out = []
  for m in _COLLECTIVE.finditer(hlo):
    shape, kind = m.group(1), m.group(2)
    dims = re.findall(r"\[([\d,]*)\]", shape)
    size = max((int(np.prod([int(d) for d in ds.split(",") if d]))
                for ds in dims), default=1)
    out.append((kind, size))
  return out


@pytest.mark.parametrize("method", ["byol", "simsiam", "simclr"])
def test_compiled_step_has_only_the_collectives_it_needs(tiny_config, method):
  config = tiny_config(method)
  mesh = sharding.make_mesh()
  state, step = _build(config, mesh)
  batch = data.build_pretrain(config, mesh).batch(0)
  hlo = step.lower(state, batch).compile().as_text()
  found = _collectives(hlo)
  kinds = {k for k, _ in found}
  assert "all-reduce" in kinds  # Gradients and batch-norm statistics.
  assert "all-to-all" not in kinds, found
  image = int(np.prod(batch["view1"].shape))  # Elements of one view.
  gathers = [size for kind, size in found if kind == "all-gather"]
  assert all(size < image // 4 for size in gathers), (gathers, image)
  if method == "simclr":  # NT-Xent needs every projection.
    assert gathers, found
