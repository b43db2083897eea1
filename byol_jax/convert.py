r"""Checkpoint conversion: official BYOL weights in, torchvision weights out.

  python -m byol_jax.convert from-official --checkpoint=pretrain_res50x1.pkl \
      --workdir=/tmp/byol_official_r50 [--which=online|target] \
      [--config=configs/byol_r50.py:epochs=1000]
  python -m byol_jax.convert to-torch --workdir=/tmp/run --out=r50.pt
  python -m byol_jax.convert to-torch --workdir=/tmp/run --out=r50.safetensors

from-official reads DeepMind's pickle (restricted unpickler) into a workdir;
to-torch writes the online encoder as a torchvision state_dict without `fc`.
"""
from absl import flags
from ml_collections import config_flags

from byol_jax.errors import ConfigError
from byol_jax.interop import convert_official
from byol_jax.interop import convert_torch
from byol_jax.trainer import cli

COMMANDS = ("from-official", "to-torch")


def define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  flags.DEFINE_string("checkpoint", None,
                      "from-official: the official BYOL .pkl checkpoint.")
  flags.DEFINE_string("workdir", None, "from-official: the workdir to write; "
                      "to-torch: the workdir (or checkpoints/ or step "
                      "directory) to read.")
  flags.DEFINE_enum("which", "online", list(convert_official.WHICH),
                    "from-official: the network that becomes the workdir's "
                    "online network.")
  config_flags.DEFINE_config_file(
      "config", None, "from-official: the BYOL config stored with the "
      "weights (default: config_lib.base_config()); its network fields are "
      "set from the checkpoint.", lock_config=False)
  flags.DEFINE_string("out", None,
                      "to-torch: the .pt, .pth or .safetensors file.")
  flags.DEFINE_integer("step", None,
                       "to-torch: checkpoint step (default: newest).")


def main(argv):
  f = flags.FLAGS
  if argv[1] == "from-official":
    if not f.checkpoint or not f.workdir:
      raise ConfigError("from-official needs --checkpoint=FILE.pkl and "
                        "--workdir=DIR.")
    s = convert_official.from_official(f.checkpoint, f.workdir,
                                       f.which, cli.config())
    line = (f"Converted the {s['which']} network of {f.checkpoint} "
            f"(ResNet-{s['depth']} x{s['width']}, step {s['step']}, LARS "
            f"momentum {'kept' if s['momentum'] else 'fresh'}) -> "
            f"{s['workdir']}")
  else:
    if not f.workdir or not f.out:
      raise ConfigError("to-torch needs --workdir=DIR and --out=FILE.")
    s = convert_torch.export(f.workdir, f.out, f.step)
    line = (f"Exported the encoder of step {s['step']} (ResNet-{s['depth']} "
            f"x{s['width']}, {s['tensors']} tensors) -> {s['out']}")
  print(line, flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main, commands=COMMANDS)
