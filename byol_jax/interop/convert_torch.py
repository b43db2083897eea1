"""byol_jax encoders as torchvision ResNet state_dicts.

byol_jax's ResNet has torchvision's layout, so the export is a renaming plus
a transpose of the convolution kernels (HWIO -> OIHW):

  stem_conv, stem_bn                       conv1, bn1
  stage<S>_block<B>/conv<K>, bn<K>         layer<S>.<B-1>.conv<K>, bn<K>
  stage<S>_block<B>/downsample_conv, _bn   layer<S>.<B-1>.downsample.0, .1
  batch norm scale, bias, mean, var        weight, bias, running_mean,
                                           running_var (+ num_batches_tracked)

The state_dict has no `fc` entries: the encoder has no classification layer,
so it loads with `strict=True` into a torchvision ResNet whose `fc` is
`torch.nn.Identity()`, which then returns byol_jax's representation.
Only 'symmetric' padding exports: torchvision pads symmetrically, so a
'same'-padded (TF/Haiku) encoder would compute other features there.
"""
import os
from typing import Any

import ml_collections
import numpy as np

from byol_jax.interop import pretrained
from byol_jax.errors import ConfigError

_BN_LEAVES = (("scale", "params", "weight"), ("bias", "params", "bias"),
              ("mean", "batch_stats", "running_mean"),
              ("var", "batch_stats", "running_var"))
FORMATS = (".pt", ".pth", ".safetensors")


def _conv(kernel: np.ndarray) -> np.ndarray:
  """HWIO [kh, kw, in, out] -> OIHW [out, in, kh, kw]."""
  return np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1)))


def _add_bn(out: dict, name: str, variables: dict, layer: tuple[str, ...]):
  for leaf, collection, torch_name in _BN_LEAVES:
    tree = variables[collection]
    for key in layer:
      tree = tree[key]
    out[f"{name}.{torch_name}"] = np.asarray(tree[leaf], np.float32)
  # byol_jax does not count batches; torchvision reads the count only when
  # its BN momentum is None (cumulative averages).
  out[f"{name}.num_batches_tracked"] = np.zeros((), np.int64)


def torchvision_state_dict(config: ml_collections.ConfigDict,
                           variables: dict[str, Any]) -> dict[str, np.ndarray]:
  """The encoder's torchvision state_dict, as NumPy arrays (no torch needed).

  Args:
    config: the run's config (model.padding must be 'symmetric').
    variables: the encoder's {'params', 'batch_stats'} (`load_encoder`).

  Returns:
    {torchvision name: float32 array (int64 for num_batches_tracked)}, in
    torchvision's order, without `fc.*`.

  Raises:
    ConfigError: for a 'same'-padded encoder.
  """
  if config.model.padding != "symmetric":
    raise ConfigError(
        f"This encoder uses model.padding={config.model.padding!r} (TF/Haiku "
        "'SAME'), which torchvision's symmetric padding cannot express: its "
        "features would differ in PyTorch. Only 'symmetric' encoders export.")
  params = variables["params"]
  out: dict[str, np.ndarray] = {}
  out["conv1.weight"] = _conv(np.asarray(params["stem_conv"]["kernel"]))
  _add_bn(out, "bn1", variables, ("stem_bn",))
  stage = 1
  while f"stage{stage}_block1" in params:
    block = 1
    while f"stage{stage}_block{block}" in params:
      src = f"stage{stage}_block{block}"
      dst = f"layer{stage}.{block - 1}"
      k = 1
      while f"conv{k}" in params[src]:
        out[f"{dst}.conv{k}.weight"] = _conv(
            np.asarray(params[src][f"conv{k}"]["kernel"]))
        _add_bn(out, f"{dst}.bn{k}", variables, (src, f"bn{k}"))
        k += 1
      if "downsample_conv" in params[src]:
        out[f"{dst}.downsample.0.weight"] = _conv(
            np.asarray(params[src]["downsample_conv"]["kernel"]))
        _add_bn(out, f"{dst}.downsample.1", variables,
                (src, "downsample_bn"))
      block += 1
    stage += 1
  return out


def save(state_dict: dict[str, np.ndarray], out: str,
         metadata: dict[str, str] | None = None) -> None:
  """Writes `state_dict` as .pt/.pth (torch.save) or .safetensors.

  Raises:
    ConfigError: for another suffix, or when the package the format needs
      (torch, safetensors) is not installed.
  """
  suffix = os.path.splitext(out)[1]
  if suffix not in FORMATS:
    raise ConfigError(f"--out={out}: name a {' or '.join(FORMATS)} file.")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  if suffix == ".safetensors":
    try:  # Optional dependency (the 'torch' extra, or pip install safetensors).
      import safetensors.numpy  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ConfigError("Writing .safetensors needs the safetensors package: "
                        "pip install safetensors.") from None
    safetensors.numpy.save_file(state_dict, out, metadata=metadata)
    _readable(out)
    return
  try:  # Optional dependency, several GB: only the .pt export needs it.
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError("Writing .pt needs PyTorch (pip install torch); "
                      "--out=FILE.safetensors needs only safetensors."
                      ) from None
  # Writable copies: torch warns about read-only NumPy arrays.
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
             out)
  _readable(out)


def _readable(path: str) -> None:
  """Gives the written file the permissions of a new file (the umask's)."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def export(workdir: str, out: str, step: int | None = None) -> dict[str, Any]:
  """Exports the online encoder of a byol_jax checkpoint for torchvision.

  Args:
    workdir: a workdir, its checkpoints/ directory or one step's directory.
    out: the .pt, .pth or .safetensors file to write.
    step: which checkpoint (default: the newest).

  Returns:
    A summary: depth, width, step, tensors (count), out.
  """
  if os.path.splitext(out)[1] not in FORMATS:
    raise ConfigError(f"--out={out}: name a {' or '.join(FORMATS)} file.")
  config, state, step = pretrained.load_run(workdir, step)
  variables = {"params": state["params"]["encoder"],
               "batch_stats": state["batch_stats"]["encoder"]}
  state_dict = torchvision_state_dict(config, variables)
  m = config.model
  save(state_dict, out, metadata={
      "format": "pt", "source": "byol_jax", "depth": str(m.depth),
      "width": str(m.width), "stem": m.stem, "step": str(step)})
  return dict(depth=m.depth, width=m.width, stem=m.stem, step=step,
              tensors=len(state_dict), out=out)
