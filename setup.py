"""Installs byol_jax: BYOL, SimSiam and SimCLR in JAX/Flax."""
import setuptools

setuptools.setup(
    name="byol_jax",
    version="0.1.0",
    description="BYOL, SimSiam and SimCLR self-supervised learning in JAX/Flax",
    packages=setuptools.find_packages(include=["byol_jax", "byol_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2.4",
        "chex>=0.1.88",
        "orbax-checkpoint>=0.11",
        "ml_collections>=1.0",
        "absl-py",
        "numpy",
        "pillow",
    ],
    extras_require={
        # tf.data host pipeline, TFDS sources and TensorBoard event files.
        "tf": ["tensorflow-cpu>=2.16", "tensorflow-datasets>=4.9", "tensorboard"],
        # dm-haiku: the official-checkpoint tests build BYOL's Haiku network.
        "test": ["pytest", "nbclient", "nbformat", "ipykernel", "dm-haiku"],
        # `python -m byol_jax.convert to-torch`: .pt needs torch, .safetensors
        # only safetensors; torchvision for loading the export (large: CI
        # does not install this extra, and the torch tests skip without it).
        "torch": ["torch", "torchvision", "safetensors"],
    },
)
