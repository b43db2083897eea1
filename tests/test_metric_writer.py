"""MetricWriter: metrics.jsonl and TensorBoard event files without TensorFlow."""
import json
import subprocess
import sys

import pytest

_WRITE = """
import sys
from byol_jax.trainer import metric_writer
w = metric_writer.MetricWriter(sys.argv[1])
w.write(1, {"loss": 2.5, "lr": 0.1})
w.write(7, {"loss": 0.25})
w.close()
assert "tensorflow" not in sys.modules, "the writer imported TensorFlow"
"""


def test_scalars_reach_jsonl_and_tensorboard(tmp_path):
  # A fresh process, so that no other test's TensorFlow import hides one.
  subprocess.run([sys.executable, "-c", _WRITE, str(tmp_path)], check=True,
                 timeout=120)
  rows = [json.loads(l) for l in
          (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows == [{"step": 1, "loss": 2.5, "lr": 0.1},
                  {"step": 7, "loss": 0.25}]

  # TensorBoard's own reader (it checks the record framing and CRCs).
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  files = list(tmp_path.glob("events.out.tfevents.*"))
  assert len(files) == 1
  acc = event_accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  assert sorted(acc.Tags()["scalars"]) == ["loss", "lr"]
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 2.5),
                                                              (7, 0.25)]
  assert [(e.step, e.value) for e in acc.Scalars("lr")] == [
      (1, pytest.approx(0.1))]


def test_full_disk_is_one_error_and_keeps_every_line(small_disk):
  """Writes fail on a full disk: one StorageError line; metrics.jsonl holds
  exactly the rows written before, whole, and a later writer appends."""
  from byol_jax.trainer import metric_writer  # pylint: disable=g-import-not-at-top
  from byol_jax.errors import StorageError  # pylint: disable=g-import-not-at-top
  disk, fill = small_disk
  run = disk / "run"
  filler = fill(free_kib=24)
  row = {f"metric_{i}": i / 7 for i in range(40)}     # ~1 KiB a line.
  written = 0
  w = metric_writer.MetricWriter(run)
  with pytest.raises(StorageError) as e:
    for step in range(1, 1000):
      w.write(step, row)
      written = step
  assert "\n" not in str(e.value) and "No space left" in str(e.value)
  assert 5 < written < 100
  with pytest.raises(StorageError):  # Closing finds the same full disk.
    w.close()
  rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text()
          .splitlines()]
  assert [r["step"] for r in rows] == list(range(1, written + 1))
  filler.unlink()
  with metric_writer.MetricWriter(run) as w:
    w.write(written + 1, {"loss": 1.0})
  rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text()
          .splitlines()]
  assert [r["step"] for r in rows] == list(range(1, written + 2))
