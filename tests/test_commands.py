"""What every command shares (byol_jax/trainer/cli.py): --help exits 0 quietly, and
a bad multi-host command line is one `error:` line before anything starts.

The cases run in one Python process that imports the commands' libraries
once and forks one child per command line (each child is the command, as
`python -m`, with its own flags), instead of a fresh interpreter each.

The quiet console of a normal run and the first-line `error:` of a failing
one are checked per command beside its own runs: train in test_train.py,
linear_eval in test_evaluation.py, convert in test_convert.py and prepare in
test_prepare.py (helpers in testlib: noisy_lines, assert_error_first).
"""
import json
import subprocess
import sys

import pytest

from byol_jax.trainer import cli
from testlib import REPO, noisy_lines, train_env

# Runs each argv of a JSON list in a forked child with stdout and stderr
# in files; prints [[exit code, stdout, stderr], ...] as JSON.
_FORKED = r"""
import json, os, runpy, sys, tempfile
import byol_jax.trainer.cli  # First (TensorFlow's notices), then the heavy parts:
import byol_jax.trainer.checkpoint, byol_jax.data, byol_jax.evaluation.linear
import byol_jax.evaluation.monitor, byol_jax.core.methods, byol_jax.interop.pretrained
out = []
for argv in json.loads(sys.argv[1]):
  files = [tempfile.TemporaryFile(mode="w+") for _ in range(2)]
  sys.stdout.flush(); sys.stderr.flush()
  pid = os.fork()
  if pid == 0:
    os.dup2(files[0].fileno(), 1); os.dup2(files[1].fileno(), 2)
    code = 0
    try:
      sys.argv = argv
      runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else 1
    except BaseException:
      import traceback; traceback.print_exc(); code = 99
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(code)
  _, status = os.waitpid(pid, 0)
  texts = []
  for f in files:
    f.seek(0); texts.append(f.read())
  out.append([os.waitstatus_to_exitcode(status)] + texts)
print("RESULTS " + json.dumps(out))
"""

_HELP = {"train": "--workdir", "linear_eval": "--preset",
         "convert": "--out", "prepare": "--dataset"}
_ERRORS = [
    # JAX's own check would be a 19-line traceback.
    (["byol_jax.train", "--config=configs/tiny.py", "--workdir=/nonexistent",
      "--num_processes=2", "--process_id=5"],
     "error: --process_id=5 with --num_processes=2: the ids run from 0 to 1"),
    # JAX would silently run one process.
    (["byol_jax.linear_eval", "--workdir=/nonexistent", "--multihost=no",
      "--num_processes=2", "--process_id=1"],
     "error: --multihost=no runs one process, but --num_processes=2 "
     "--process_id=1 describe a job of several"),
]

# Usage mistakes: one line and exit code 2 from the shared cli.run.
_USAGE = [
    (["byol_jax.train", "stray", "--workdir=/nonexistent"],
     "error: unexpected arguments ['stray']; give flags only."),
    (["byol_jax.linear_eval", "--workdir=/nonexistent", "stray"],
     "error: unexpected arguments ['stray']; give flags only."),
    (["byol_jax.prepare", "--dataset=cifar10", "stray"],
     "error: unexpected arguments ['stray']; give flags only."),
    (["byol_jax.convert", "to-tourch", "--workdir=/nonexistent"],
     "error: give one command, from-official or to-torch; got ['to-tourch']"),
    (["byol_jax.convert", "from-official", "--checkpoint=x.pkl",
      "--workdir=/nonexistent", "--config=configs/no_such_config.py"],
     "error: [Errno 2] No such file or directory: "
     "'configs/no_such_config.py'"),
]

# A bad --profile_steps: one line and exit 2, as any bad flag.
_PROFILE = [(["byol_jax.train", "--config=configs/tiny.py",
              "--workdir=/nonexistent", f"--profile_steps={v}"],
             f"error: flag --profile_steps={v}: give A:B with 0 <= A < B, "
             "e.g. 10:15.") for v in ("5:3", "2-4")]


@pytest.fixture(scope="module")
def results():
  cases = ([[f"byol_jax.{c}", "-h"] for c in _HELP] +
           [a for a, _ in _ERRORS + _USAGE + _PROFILE])
  proc = subprocess.run(
      [sys.executable, "-c", _FORKED, json.dumps(cases)], cwd=REPO,
      env=train_env(1), capture_output=True, text=True, timeout=300)
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")]
  assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(line[-1].split(" ", 1)[1])


@pytest.mark.parametrize("i,command", list(enumerate(_HELP)))
def test_help_exits_0_with_the_usage(results, i, command):
  code, out, err = results[i]
  assert code == 0, err[-3000:]
  assert f"byol_jax.{command}" in out and _HELP[command] in out
  assert not noisy_lines(out + err), err[-3000:]


@pytest.mark.parametrize("i", range(len(_ERRORS)))
def test_multihost_flags_are_one_line_before_anything_starts(results, i):
  code, out, err = results[len(_HELP) + i]
  assert code == 1 and not out.strip(), (code, out, err)
  assert err.strip().splitlines() == [err.strip()], err
  assert err.startswith(_ERRORS[i][1]), err


@pytest.mark.parametrize("i", range(len(_USAGE)))
def test_usage_mistakes_are_one_line_in_every_command(results, i):
  code, out, err = results[len(_HELP) + len(_ERRORS) + i]
  assert code == 2 and not out.strip(), (code, out, err)
  assert err.strip().splitlines() == [err.strip()], err
  assert err.startswith(_USAGE[i][1]), err


@pytest.mark.parametrize("i", range(len(_PROFILE)))
def test_bad_profile_steps_is_one_line_before_anything_starts(results, i):
  code, out, err = results[len(_HELP) + len(_ERRORS) + len(_USAGE) + i]
  assert code == 2 and not out.strip(), (code, out, err)
  assert err.strip() == _PROFILE[i][1], err


def test_flag_errors_are_one_plain_line():
  """ml_collections' wrapped KeyError of an override typo, unwrapped."""
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  c = config_dict.ConfigDict(dict(optimizer=dict(base_lr=0.3)))
  with pytest.raises(AttributeError) as e:
    c.optimizer.get_type("base_lrr")
  line = cli.flag_error(e.value)
  assert line == ("unknown config field 'base_lrr' in a --config.FIELD=VALUE "
                  "override: did you mean 'base_lr'? (the fields are in the "
                  "config file and byol_jax/trainer/config_lib.py).")
