"""byol_jax encoders as torchvision ResNet state_dicts.

byol_jax's ResNet has torchvision's layout, so the export is a renaming
(stage<S>_block<B> -> layer<S>.<B-1>, `_LAYERS`, `_LEAVES`) plus a transpose
of the convolution kernels (HWIO -> OIHW). There is no `fc`: the export loads with `strict=True` into a torchvision
ResNet whose `fc` is `torch.nn.Identity()`. Only 'symmetric' padding
exports: torchvision cannot express TF/Haiku 'SAME' padding.
"""
import os
import re
from typing import Any

import ml_collections
import numpy as np
from flax import traverse_util

from byol_jax.errors import ConfigError
from byol_jax.interop import pretrained

FORMATS = (".pt", ".pth", ".safetensors")
_LAYERS = {"stem_conv": "conv1", "stem_bn": "bn1",
           "downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias",
           "mean": "running_mean", "var": "running_var"}
_BLOCK = re.compile(r"stage(\d+)_block(\d+)")


def _layer_name(path: list[str]) -> str:
  """['stage2_block1', 'conv1'] -> 'layer2.0.conv1' (torchvision's name)."""
  return ".".join(_LAYERS.get(k) or _BLOCK.sub(
      lambda m: f"layer{m[1]}.{int(m[2]) - 1}", k) for k in path)


def torchvision_state_dict(config: ml_collections.ConfigDict,
                           variables: dict[str, Any]) -> dict[str, np.ndarray]:
  """The torchvision state_dict of an encoder's {'params', 'batch_stats'}.

  NumPy float32 arrays (int64 num_batches_tracked), without `fc.*`;
  config.model.padding must be 'symmetric'.
  """
  if config.model.padding != "symmetric":
    raise ConfigError(
        f"This encoder uses model.padding={config.model.padding!r} (TF/Haiku "
        "'SAME'), which torchvision's symmetric padding cannot express: its "
        "features would differ in PyTorch. Only 'symmetric' encoders export.")
  out: dict[str, np.ndarray] = {}
  for tree in (variables["params"], variables["batch_stats"]):
    for path, value in traverse_util.flatten_dict(tree).items():
      *layer, leaf = path
      name, value = _layer_name(layer), np.asarray(value, np.float32)
      if leaf == "kernel":  # HWIO [kh, kw, in, out] -> OIHW.
        value = np.ascontiguousarray(value.transpose(3, 2, 0, 1))
      out[f"{name}.{_LEAVES[leaf]}"] = value
      if leaf == "mean":  # torchvision reads it only if BN momentum is None.
        out[f"{name}.num_batches_tracked"] = np.zeros((), np.int64)
  return out


def _check_suffix(out: str) -> str:
  suffix = os.path.splitext(out)[1]
  if suffix not in FORMATS:
    raise ConfigError(f"--out={out}: name a {' or '.join(FORMATS)} file.")
  return suffix


def save(state_dict: dict[str, np.ndarray], out: str,
         metadata: dict[str, str] | None = None) -> None:
  """Writes `state_dict` as .pt/.pth (torch.save) or .safetensors.

  Raises:
    ConfigError: for another suffix, or without the package the format
      needs (torch, safetensors; both optional).
  """
  suffix = _check_suffix(out)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  try:  # pylint: disable=g-import-not-at-top
    if suffix == ".safetensors":
      import safetensors.numpy
      safetensors.numpy.save_file(state_dict, out, metadata=metadata)
    else:
      import torch
      # Writable copies: torch warns about read-only NumPy arrays.
      torch.save({k: torch.from_numpy(np.array(v))
                  for k, v in state_dict.items()}, out)
  except ImportError as e:
    raise ConfigError(
        f"Writing {suffix} needs the {e.name} package: pip install {e.name}"
        " (--out=FILE.safetensors needs only safetensors).") from None
  # The permissions of a new file (the umask's): safetensors writes 0600.
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(out, 0o666 & ~umask)


def export(workdir: str, out: str, step: int | None = None) -> dict[str, Any]:
  """Exports the online encoder of `pretrained.load_run(workdir, step)`.

  Returns:
    A summary: depth, width, stem, step, tensors (count), out.
  """
  _check_suffix(out)
  config, state, step = pretrained.load_run(workdir, step)
  state_dict = torchvision_state_dict(
      config, pretrained.encoder_variables(state, "online", workdir))
  m = config.model
  save(state_dict, out, metadata={
      "format": "pt", "source": "byol_jax", "depth": str(m.depth),
      "width": str(m.width), "stem": m.stem, "step": str(step)})
  return dict(depth=m.depth, width=m.width, stem=m.stem, step=step,
              tensors=len(state_dict), out=out)
