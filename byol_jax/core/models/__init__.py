"""Encoders (ResNet v1) and MLP heads."""
from byol_jax.core.models.heads import MLP
from byol_jax.core.models.resnet import depth_of
from byol_jax.core.models.resnet import DEPTHS
from byol_jax.core.models.resnet import PADDINGS
from byol_jax.core.models.resnet import representation_dim
from byol_jax.core.models.resnet import resnet
from byol_jax.core.models.resnet import ResNet
from byol_jax.core.models.resnet import ResNet18
from byol_jax.core.models.resnet import ResNet34

__all__ = ["MLP", "DEPTHS", "PADDINGS", "ResNet", "ResNet18", "ResNet34",
           "depth_of", "representation_dim", "resnet"]
