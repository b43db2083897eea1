"""What every command shares (byol_jax/cli.py): --help exits 0 quietly.

The quiet console of a normal run and the first-line `error:` of a failing
one are checked per command beside its own runs: train in test_train.py,
linear_eval in test_evaluation.py, convert in test_convert.py and prepare in
test_prepare.py (helpers in testlib: noisy_lines, assert_error_first).
"""
import subprocess
import sys

import pytest

from byol_jax import cli
from testlib import REPO, noisy_lines, train_env


@pytest.mark.parametrize("command,flag", [
    ("train", "--workdir"), ("linear_eval", "--preset"),
    ("convert", "--out"), ("prepare", "--dataset")])
def test_help_exits_0_with_the_usage(command, flag):
  proc = subprocess.run(
      [sys.executable, "-m", f"byol_jax.{command}", "-h"], cwd=REPO,
      env=train_env(1), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"byol_jax.{command}" in proc.stdout and flag in proc.stdout
  assert not noisy_lines(proc.stdout + proc.stderr), proc.stderr[-3000:]


def test_flag_errors_are_one_plain_line():
  """ml_collections' wrapped KeyError of an override typo, unwrapped."""
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  c = config_dict.ConfigDict(dict(optimizer=dict(base_lr=0.3)))
  with pytest.raises(AttributeError) as e:
    c.optimizer.get_type("base_lrr")
  line = cli.flag_error(e.value)
  assert line == ("unknown config field 'base_lrr' in a --config.FIELD=VALUE "
                  "override: did you mean 'base_lr'? (the fields are in the "
                  "config file and byol_jax/config_lib.py).")
