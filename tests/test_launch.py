"""launch/: shell syntax, shellcheck, dry runs, and that the guide's configs exist."""
import importlib.util
import os
import pathlib
import re
import shlex
import shutil
import stat
import subprocess

import pytest

from byol_jax.trainer import config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
GUIDES = [LAUNCH / "README.md", REPO / "README.md"]
SCRIPT_IDS = [p.name for p in SCRIPTS]


def _run(args, env=None, **kwargs):
  full_env = {k: v for k, v in os.environ.items()
              if not k.startswith(("SLURM_", "CUDA_VISIBLE", "JAX_LOCAL"))
              and k not in ("QUEUED_RESOURCE", "WORKDIR", "DATA_DIR")}
  full_env.update(env or {})
  return subprocess.run(args, capture_output=True, text=True, env=full_env,
                        timeout=60, check=False, **kwargs)


def test_the_expected_scripts_exist():
  names = {p.name for p in SCRIPTS}
  assert {"tpu_vm.sh", "slurm_gpu.sh", "slurm_gpu.sbatch"} <= names, names
  assert (LAUNCH / "README.md").is_file()
  assert (LAUNCH / "colab_tpu.ipynb").is_file()


@pytest.mark.parametrize("script", SCRIPTS, ids=SCRIPT_IDS)
def test_bash_syntax(script):
  result = _run(["bash", "-n", str(script)])
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=SCRIPT_IDS)
def test_shellcheck(script):
  if shutil.which("shellcheck") is None:
    pytest.skip("the shellcheck binary is not installed "
                "(apt-get install -y shellcheck)")
  result = _run(["shellcheck", "--shell=bash", str(script)])
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=SCRIPT_IDS)
def test_strict_mode_and_executable(script):
  text = script.read_text()
  assert text.startswith("#!/usr/bin/env bash\n")
  assert "\nset -euo pipefail\n" in text
  assert script.stat().st_mode & stat.S_IXUSR, f"chmod +x {script}"


@pytest.mark.parametrize("script", ["tpu_vm.sh", "slurm_gpu.sh"])
def test_usage(script):
  path = str(LAUNCH / script)
  helped = _run([path, "help"])
  assert helped.returncode == 0 and helped.stdout.startswith("Usage:"), helped
  bare = _run([path])
  assert bare.returncode == 2 and "Usage:" in bare.stderr
  wrong = _run([path, "no-such-command"])
  assert wrong.returncode != 0 and "unknown command" in wrong.stderr


# ---------------------------------------------------------------- TPU VM ----
def _tpu(*args, **env):
  defaults = {"DRY_RUN": "1", "PROJECT": "", "BUCKET": "", "ZONE": "",
              "RUNTIME_VERSION": "", "ACCELERATOR_TYPE": "v3-8",
              "TPU_NAME": "byol-jax", "SPOT": "0", "QUEUED": "0",
              "AUTOCHECKPOINT": "0", "SERVICE_ACCOUNT": "", "SOURCE": "git",
              "QUEUED_RESOURCE": "", "WORKDIR": "", "DATA_DIR": ""}
  # Empty means "the script's default" for the names it derives.
  env = {**defaults, **env}
  for name in ("QUEUED_RESOURCE", "WORKDIR", "DATA_DIR"):
    if not env[name]:
      del env[name]
  return _run([str(LAUNCH / "tpu_vm.sh"), *args], env=env)


# Per generation: (accelerator type, zone, runtime, JAX devices, hosts), as
# Google's TPU docs list them (regions-zones, runtimes, v2 ... v6e pages).
_SLICES = [
    ("v2-8", "europe-west4-a", "tpu-ubuntu2204-base", 8, 1),
    ("v3-512", "europe-west4-a", "tpu-ubuntu2204-base", 512, 64),
    ("v4-64", "us-central2-b", "tpu-ubuntu2204-base", 32, 8),
    ("v5litepod-8", "us-central1-a", "v2-alpha-tpuv5-lite", 8, 1),
    ("v5litepod-16", "us-central1-a", "v2-alpha-tpuv5-lite", 16, 4),
    ("v5p-32", "us-east5-a", "v2-alpha-tpuv5", 16, 4),
    ("v6e-8", "us-east5-b", "v2-alpha-tpuv6e", 8, 1),
    ("v6e-64", "us-east5-b", "v2-alpha-tpuv6e", 64, 16),
]


@pytest.mark.parametrize("accelerator,zone,runtime,devices,hosts", _SLICES,
                         ids=[s[0] for s in _SLICES])
def test_tpu_create_derives_zone_and_runtime(accelerator, zone, runtime,
                                             devices, hosts):
  out = _tpu("create", PROJECT="p", ACCELERATOR_TYPE=accelerator,
             TPU_NAME="t", ZONE="", RUNTIME_VERSION="")
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == (
      f"+ gcloud compute tpus tpu-vm create t --version={runtime} "
      f"--accelerator-type={accelerator} --zone={zone} --project=p")
  assert (f"{accelerator}: {devices} JAX devices on {hosts} host(s); zone "
          f"{zone}, runtime {runtime}") in out.stderr


def test_tpu_zone_and_runtime_can_be_overridden():
  out = _tpu("create", ACCELERATOR_TYPE="v5p-8", ZONE="europe-west4-b",
             RUNTIME_VERSION="v2-alpha-tpuv5-custom", TPU_NAME="t")
  assert out.returncode == 0, out.stderr
  assert "--version=v2-alpha-tpuv5-custom" in out.stdout
  assert "--zone=europe-west4-b" in out.stdout
  out = _tpu("create", ACCELERATOR_TYPE="v5e-8")  # not a TPU API name
  assert out.returncode == 1 and "v5litepod-8" in out.stderr
  out = _tpu("create", ACCELERATOR_TYPE="v9x-8")
  assert out.returncode == 1 and "ZONE and RUNTIME_VERSION" in out.stderr
  out = _tpu("create", ACCELERATOR_TYPE="v9x-8", ZONE="z", RUNTIME_VERSION="r")
  assert out.returncode == 0 and "--zone=z" in out.stdout


def test_tpu_queued_spot_autocheckpoint_and_delete():
  out = _tpu("create", ACCELERATOR_TYPE="v5litepod-16", TPU_NAME="t",
             QUEUED="1", SPOT="1", AUTOCHECKPOINT="1",
             SERVICE_ACCOUNT="sa@p.iam.gserviceaccount.com")
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines() == [
      "+ gcloud alpha compute tpus queued-resources create t-qr --node-id=t "
      "--runtime-version=v2-alpha-tpuv5-lite --accelerator-type=v5litepod-16 "
      "--spot --service-account=sa@p.iam.gserviceaccount.com "
      "--autocheckpoint-enabled --zone=us-central1-a",
      "+ gcloud compute tpus queued-resources describe t-qr "
      "'--format=value(state.state)' --zone=us-central1-a"]
  out = _tpu("create", ACCELERATOR_TYPE="v4-8", TPU_NAME="t", SPOT="1",
             AUTOCHECKPOINT="1")
  assert out.stdout.strip() == (
      "+ gcloud alpha compute tpus tpu-vm create t "
      "--version=tpu-ubuntu2204-base --accelerator-type=v4-8 --spot "
      "--autocheckpoint-enabled --zone=us-central2-b")
  out = _tpu("delete", TPU_NAME="t", QUEUED="1", ACCELERATOR_TYPE="v6e-8")
  assert out.stdout.strip() == (
      "+ gcloud compute tpus queued-resources delete t-qr --force --quiet "
      "--zone=us-east5-b")
  out = _tpu("delete", TPU_NAME="t")
  assert "tpu-vm delete t --quiet" in out.stdout


def test_tpu_recover_deletes_creates_sets_up_and_resumes():
  out = _tpu("recover", "--config.seed=4", ACCELERATOR_TYPE="v6e-16",
             TPU_NAME="t", QUEUED="1", SPOT="1", BUCKET="b",
             REPO_URL="https://example.invalid/byol_jax.git")
  assert out.returncode == 0, out.stderr
  verbs = [" ".join(line.split()[:7]) for line in out.stdout.splitlines()]
  assert verbs == [
      "+ gcloud compute tpus queued-resources delete t-qr",
      "+ gcloud compute tpus queued-resources create t-qr",
      "+ gcloud compute tpus queued-resources describe t-qr",
      "+ gcloud compute tpus tpu-vm ssh t",   # setup on every worker
      "+ gcloud compute tpus tpu-vm ssh t"]   # train: resumes from WORKDIR
  setup, train = out.stdout.splitlines()[3:]
  assert "remote_setup git" in setup and "--worker=all" in setup
  assert "byol_jax.train" in train and "--config.seed=4" in train
  assert "--workdir=gs://b/byol_jax/byol_r50_300ep" in train


def test_tpu_linear_eval_forces_no_batch_size():
  """v3-512: 512 devices; linear_eval picks a batch that divides them."""
  out = _tpu("linear-eval", ACCELERATOR_TYPE="v3-512", BUCKET="b")
  assert out.returncode == 0, out.stderr
  assert "byol_jax.linear_eval --workdir=gs://b/byol_jax/" in out.stdout
  assert "--multihost" in out.stdout
  assert "--batch_size" not in out.stdout


def _git(repo, *args):
  subprocess.run(["git", "-C", str(repo), "-c", "user.name=t",
                  "-c", "user.email=t@t", *args], check=True,
                 capture_output=True)


def test_tpu_setup_copy_packs_the_checkout_as_it_is(tmp_path):
  """SOURCE=copy: uncommitted changes and untracked files, not ignored ones."""
  import tarfile  # pylint: disable=g-import-not-at-top
  repo = tmp_path / "repo"
  (repo / "launch").mkdir(parents=True)
  shutil.copy(LAUNCH / "tpu_vm.sh", repo / "launch" / "tpu_vm.sh")
  (repo / ".gitignore").write_text("ignored.txt\n")
  for name in ["changed.txt", "deleted.txt"]:
    (repo / name).write_text("committed\n")
  _git(repo, "init", "-q")
  _git(repo, "add", "-A")
  _git(repo, "commit", "-q", "-m", "init")
  (repo / "changed.txt").write_text("uncommitted\n")
  (repo / "deleted.txt").unlink()
  (repo / "new file.txt").write_text("untracked\n")
  (repo / "ignored.txt").write_text("ignored\n")
  out = _run([str(repo / "launch" / "tpu_vm.sh"), "setup"],
             env={"DRY_RUN": "1", "SOURCE": "copy", "PROJECT": ""})
  assert out.returncode == 0, out.stderr
  scp = [l for l in out.stdout.splitlines() if " tpu-vm scp " in l]
  assert len(scp) == 1 and "--worker=all" in scp[0]
  tarball = shlex.split(scp[0][2:])[5]
  with tarfile.open(tarball) as tar:
    names = sorted(tar.getnames())
    assert names == [".gitignore", "changed.txt", "launch/tpu_vm.sh",
                     "new file.txt"]
    assert tar.extractfile("changed.txt").read() == b"uncommitted\n"
  assert "remote_setup copy" in out.stdout


def test_tpu_train_runs_the_trainer_on_every_worker():
  out = _tpu("train", "--config.optimizer.base_lr=0.2", BUCKET="gs://b/",
             BATCH_SIZE="1024", EXTRA_FLAGS="--config.seed=3")
  assert out.returncode == 0, out.stderr
  line = out.stdout.strip()
  assert "tpu-vm ssh byol-jax --worker=all" in line
  for flag in ["byol_jax.train", "--config=configs/byol_r50.py:epochs=300",
               "--workdir=gs://b/byol_jax/", "--multihost=yes",
               "--config.data.data_dir=gs://b/tensorflow_datasets",
               "--config.batch_size=1024", "--config.seed=3",
               "--config.optimizer.base_lr=0.2"]:
    assert flag in line, (flag, line)


def test_tpu_train_needs_a_bucket():
  out = _tpu("train")
  assert out.returncode == 1 and "BUCKET" in out.stderr


def test_tpu_setup_needs_a_repository_url():
  out = _tpu("setup", SOURCE="git")
  assert out.returncode == 1 and "REPO_URL" in out.stderr


def _remote_command(stdout: str) -> str:
  """The --command=... argument of the (single) gcloud ssh line printed."""
  assert stdout.startswith("+ gcloud ") and stdout.count("\n+ ") == 0, stdout
  (arg,) = [a for a in shlex.split(stdout[2:]) if a.startswith("--command=")]
  return arg[len("--command="):]


def test_tpu_remote_command_runs_the_trainer_with_the_flags(tmp_path):
  """Runs what the workers would run, with a fake venv python, here."""
  home = tmp_path / "home"
  (home / "byol_jax").mkdir(parents=True)
  python = home / "byol_jax_venv" / "bin" / "python"
  python.parent.mkdir(parents=True)
  python.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$PWD" "$@"\n')
  python.chmod(0o755)
  out = _tpu("train", "--config.data.path=a dir/it's.npz", DRY_RUN="full",
             DETACH="0", BUCKET="b", CONFIG="configs/byol_cifar10.py:batch=512")
  assert out.returncode == 0, out.stderr
  command = _remote_command(out.stdout)
  assert command.startswith("remote_run ()")  # The function travels along.
  ran = _run(["bash", "-c", command], env={"HOME": str(home)})
  assert ran.returncode == 0, ran.stderr
  lines = ran.stdout.splitlines()
  assert lines == [
      str(home / "byol_jax"), "-m", "byol_jax.train",
      "--config=configs/byol_cifar10.py:batch=512",
      "--workdir=gs://b/byol_jax/byol_r50_300ep", "--multihost=yes",
      "--config.data.data_dir=gs://b/tensorflow_datasets",
      "--config.data.path=a dir/it's.npz"]
  assert (home / "byol_jax_train.log").read_text() == ran.stdout


# ----------------------------------------------------------------- SLURM ----
def _fake_python(tmp_path):
  python = tmp_path / "python"
  python.write_text('#!/usr/bin/env bash\n'
                    'echo "ids=${JAX_LOCAL_DEVICE_IDS:-unset} pwd=$PWD"\n'
                    'printf "%s\\n" "$@"\n')
  python.chmod(0o755)
  return str(python)


@pytest.mark.parametrize("ntasks,nodes,visible,ids", [
    ("16", "2", "0,1,2,3,4,5,6,7", "unset"),   # one task per GPU: SLURM_LOCALID
    ("2", "2", "0,1,2,3,4,5,6,7", "0,1,2,3,4,5,6,7"),  # one task per node
    ("16", "2", "5", "0"),                     # SLURM bound one GPU per task
    ("1", "1", "0,1,2,3", "unset"),            # one process: no jax.distributed
])
def test_slurm_task_sets_local_devices(tmp_path, ntasks, nodes, visible, ids):
  env = {"SLURM_PROCID": "0", "SLURM_NTASKS": ntasks,
         "SLURM_JOB_NUM_NODES": nodes, "CUDA_VISIBLE_DEVICES": visible,
         "SLURM_JOB_NAME": "j", "PYTHON": _fake_python(tmp_path),
         "CONFIG": "configs/byol_cifar10.py", "DATA_DIR": "/data/tfds",
         "WORKDIR": "", "BATCH_SIZE": "", "EXTRA_FLAGS": "", "VENV": ""}
  out = _run([str(LAUNCH / "slurm_gpu.sh"), "task", "--config.seed=1"],
             env=env)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  start = lines.index(f"ids={ids} pwd={REPO}")
  assert lines[start + 1:] == [
      "-m", "byol_jax.train", "--config=configs/byol_cifar10.py",
      f"--workdir={REPO}/runs/byol_jax-j",
      "--config.data.data_dir=/data/tfds", "--config.seed=1"]


def test_slurm_task_outside_srun_fails():
  out = _run([str(LAUNCH / "slurm_gpu.sh"), "task"])
  assert out.returncode != 0 and "srun" in out.stderr


@pytest.mark.parametrize("tasks,per_node,cpus", [("gpu", 8, 8),
                                                 ("node", 1, 64)])
def test_slurm_submit(tasks, per_node, cpus):
  out = _run([str(LAUNCH / "slurm_gpu.sh"), "submit", "--config.seed=2"],
             env={"DRY_RUN": "1", "TASKS": tasks, "NODES": "4",
                  "GPUS_PER_NODE": "8", "CPUS_PER_GPU": "8",
                  "PARTITION": "gpu"})
  assert out.returncode == 0, out.stderr
  for part in ["sbatch", "--nodes=4", "--gpus-per-node=8",
               f"--ntasks-per-node={per_node}", f"--cpus-per-task={cpus}",
               "--partition=gpu", "launch/slurm_gpu.sbatch --config.seed=2"]:
    assert part in out.stdout, (part, out.stdout)


def test_sbatch_runs_the_task_wrapper_under_srun(tmp_path):
  """srun gets --cpus-per-task explicitly (SLURM 22.05-23.02 drop it)."""
  text = (LAUNCH / "slurm_gpu.sbatch").read_text()
  assert re.search(r"^#SBATCH --ntasks-per-node=\d+$", text, re.M)
  assert re.search(r"^#SBATCH --gpus-per-node=\d+$", text, re.M)
  assert re.search(r"^#SBATCH --cpus-per-task=\d+$", text, re.M)
  srun = tmp_path / "srun"
  srun.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
  srun.chmod(0o755)
  env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
         "SLURM_CPUS_PER_TASK": "12", "SLURM_JOB_ID": "7",
         "REPO_DIR": str(REPO)}
  out = _run(["bash", str(LAUNCH / "slurm_gpu.sbatch"), "--config.seed=5"],
             env=env)
  assert out.returncode == 0, out.stderr
  args = out.stdout.splitlines()[1:]  # after the job's summary line
  assert args == ["--kill-on-bad-exit=1", "--label", "--cpus-per-task=12",
                  "bash", str(LAUNCH / "slurm_gpu.sh"), "task",
                  "--config.seed=5"]


# ------------------------------------------------------ guide vs. configs ----
_CONFIG_RE = re.compile(r"configs/([A-Za-z0-9_]+)\.py(?::([A-Za-z0-9_=,./|-]+))?")
_FLAG_RE = re.compile(r"--config\.([a-z_][a-z0-9_.]*)=")


def _launch_texts():
  texts = {p.name: p.read_text() for p in [LAUNCH / "README.md", *SCRIPTS]}
  texts["colab_tpu.ipynb"] = (LAUNCH / "colab_tpu.ipynb").read_text()
  return texts


def _load_config_module(name):
  spec = importlib.util.spec_from_file_location(
      f"launch_test_config_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_guide_names_real_configs_with_valid_args():
  seen = set()
  for source, text in _launch_texts().items():
    for name, arg in _CONFIG_RE.findall(text):
      path = REPO / "configs" / f"{name}.py"
      assert path.is_file(), f"{source} names configs/{name}.py: no such file"
      arg = arg.rstrip(".,")
      if arg and "|" not in arg and not arg.endswith("="):
        config = _load_config_module(name).get_config(arg)
        assert config.batch_size > 0, (source, name, arg)
      seen.add(name)
  assert {"byol_r50", "byol_cifar10"} <= seen, seen


def test_guide_config_flags_are_real_fields():
  base = config_lib.base_config()
  for source, text in _launch_texts().items():
    for dotted in _FLAG_RE.findall(text):
      node = base
      for part in dotted.rstrip(".").split("."):
        assert part in node, f"{source}: --config.{dotted} is not a field"
        node = node[part]


def test_guide_documents_the_r50_slice_arithmetic():
  text = (LAUNCH / "README.md").read_text()
  config = _load_config_module("byol_r50").get_config("epochs=300")
  assert config.batch_size == 4096
  assert "4096" in text and "512" in text
  assert re.search(r"v3-512[^\n]*512 \(64 x 8\)[^\n]*\| 8 \|", text)
  assert "base_lr * batch_size / 256" in text
  assert "BATCH_SIZE=1024" in text
  for flag in ["--worker=all", "--config.data.data_dir=gs://",
               "tpu-vm create", "tpu-vm delete", "jax.distributed.initialize",
               "SLURM_NTASKS"]:
    assert flag in text, flag


def test_guide_commands_name_existing_launch_files():
  for guide in GUIDES:
    for rel in set(re.findall(r"launch/[A-Za-z0-9_./-]+\.(?:sh|sbatch|ipynb|md)",
                              guide.read_text())):
      assert (REPO / rel).is_file(), f"{guide.name} names {rel}: missing"


def test_guide_zone_and_runtime_table_matches_the_script():
  text = (LAUNCH / "README.md").read_text()
  for accelerator, zone, runtime, _, _ in _SLICES:
    gen = accelerator.split("-")[0]
    rows = [line for line in text.splitlines()
            if line.startswith(f"| `{gen}-N`") or f"`{gen}-N` |" in line
            or f", `{gen}-N`" in line]
    assert rows, f"launch/README.md: no zone row for {gen}"
    assert f"| {zone} | {runtime} |" in rows[0], (gen, rows[0])


def test_guides_prepare_data_without_tfds_build():
  for guide in GUIDES:
    text = guide.read_text()
    assert "python -m byol_jax.prepare --dataset=imagenet2012" in text, guide
    commands = [line.strip() for line in text.splitlines()
                if line.strip().startswith("tfds build")]
    assert not commands, f"{guide.name} still runs {commands}"
