"""The tiny config's programs compiled for real TPU slices (no TPU needed).

libtpu's compiler (installed by .ci/run, extra `tpu-aot`) compiles for
topologies described by jax.experimental.topologies; XLA's own memory and
cost analyses of the compiled programs are checked.
"""
import json
import sys

import jax
import pytest

from testlib import REPO

pytest.importorskip("libtpu")
sys.path.insert(0, str(REPO / "benchmarks"))
import tpu_aot  # noqa: E402  (benchmarks/tpu_aot.py)

# Bank rows per device: near the fewest (> 5,120 rows of 32 floats) whose
# share is 20x what moves (8192 elements); the vote's compile time grows
# with the rows per device.
ROWS_PER_DEVICE, QUERIES = 6_250, 500


@pytest.fixture(autouse=True)
def no_persistent_cache():
  """TPU executables compiled without a TPU client cannot be read back from
  JAX's persistent cache: writing them would only cost time."""
  before = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  yield
  jax.config.update("jax_enable_compilation_cache", before)


@pytest.mark.parametrize("slice_name", ["v5e-4", "v3-8"])
def test_tiny_train_step_and_knn_compile_for_tpu(tiny_config, slice_name):
  s = tpu_aot.SLICES[slice_name]
  mesh = tpu_aot.slice_mesh(s)
  n = mesh.devices.size
  assert n == {"v5e-4": 4, "v3-8": 8}[slice_name]
  config = tiny_config(batch=n)  # One image per device: the cheapest.
  config.data.num_classes = 10   # As the trainer resolves it from CIFAR.
  step, state, _ = tpu_aot.compile_train_step(config, mesh)
  hbm = s.hbm_gib * tpu_aot.GIB
  assert 0 < step["peak_bytes"] < hbm
  assert step["flops"] > 0
  kinds = step["collectives"]
  assert "all-reduce" in kinds, kinds  # Gradients and batch statistics.
  assert "all-to-all" not in kinds, kinds
  view = config.batch_size * config.data.image_size ** 2 * 3  # One view.
  assert kinds.get("all-gather", {}).get("largest_elements", 0) < view // 4

  # The kNN vote: every device holds 1/n of the bank, and only query
  # features ([chunk, D]) and candidate lists ([chunk, k]) move, never the
  # bank.
  bank = ROWS_PER_DEVICE * n
  every = tpu_aot.compile_knn_vote(config, mesh, bank, QUERIES, 8 * n)
  assert 0 < every["peak_bytes"] < hbm
  dim = 8 * config.model.num_filters  # ResNet-10's representation.
  moved = [v["largest_elements"] for k, v in every["collectives"].items()
           if k in ("all-gather", "all-to-all")]
  assert moved and max(moved) <= 256 * max(dim, config.knn.k), (
      every["collectives"])
  assert max(moved) < bank // n * dim / 20
  if n == 8:
    # The same bank on one device: a device's memory shrinks with the
    # devices (arguments 1/8, peak well under half).
    one = tpu_aot.compile_knn_vote(config, tpu_aot.slice_mesh(s, 1), bank,
                                   QUERIES, 8 * n)
    assert one["peak_bytes"] < hbm
    assert every["argument_bytes"] * n <= one["argument_bytes"] * 1.05
    assert every["peak_bytes"] * 4 < one["peak_bytes"], (every, one)


def test_a_row_that_does_not_fit_fails_the_run_unless_a_probe(tmp_path,
                                                              monkeypatch):
  """Rows already in the JSON are not compiled again, and the exit status
  is 1 while any row does not fit, except rows compiled as probes."""
  def compile_again(*args):
    raise AssertionError(f"compiled a row the JSON has: {args}")
  monkeypatch.setattr(tpu_aot, "run_one", compile_again)
  out = tmp_path / "aot.json"
  refused = tpu_aot.misfit_row(
      "byol_r50", "v3-8", "train_step", 512,
      "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm.", 60.0)
  argv = ["--presets=byol_r50", "--slices=v3-8", "--programs=train_step",
          "--batch=512", f"--out={out}"]
  out.write_text(json.dumps({"rows": [refused]}))
  assert tpu_aot.main(argv) == 1
  out.write_text(json.dumps({"rows": [dict(refused, expected_misfit=True)]}))
  assert tpu_aot.main(argv) == 0
  fits = tpu_aot.fits_summary([dict(refused, expected_misfit=True)])
  assert fits[0]["refused_batch_per_chip"] == 1024  # 2 cores per v3 chip.
  assert fits[0]["fits_batch_per_chip"] is None
