"""Installs byol_jax: BYOL, SimSiam and SimCLR in JAX/Flax."""
import setuptools

setuptools.setup(
    name="byol_jax",
    version="0.1.0",
    description="BYOL, SimSiam and SimCLR self-supervised learning in JAX/Flax",
    packages=setuptools.find_packages(include=["byol_jax", "byol_jax.*"]),
    python_requires=">=3.11",  # jax >= 0.7 needs 3.11
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml_collections>=1.0",
        "absl-py",
        "numpy",
        "pillow",
        "tensorboardX",  # TensorBoard event files, without TensorFlow
        "etils[epath]",  # epath: every file byol_jax reads or writes
        "fsspec",  # epath's gs:// backend (byol_jax/storage.py)
    ],
    extras_require={
        # tf.data host pipeline, TFDS sources and TensorBoard event files.
        # TFDS 4.9.10 imports importlib_resources when it prepares a dataset
        # but declares it for Python < 3.9 only (tensorflow/datasets#11212).
        # requests: byol_jax.prepare catches TFDS's download errors.
        "tf": ["tensorflow-cpu>=2.16", "tensorflow-datasets>=4.9", "tensorboard",
               "importlib_resources", "requests"],
        # gs:// workdirs and data_dirs (byol_jax/storage.py): gcsfs for every
        # file byol_jax and Orbax write through etils.epath (tensorstore,
        # Orbax's array writer, is a dependency already), and
        # google-cloud-storage for tensorboardX's event files.
        "gcs": ["gcsfs", "google-cloud-storage"],
        # dm-haiku: the official-checkpoint tests build BYOL's Haiku network.
        # tensorboard: the tests read event files back with its own reader.
        # pytest-xdist: the suite runs its test files on two workers.
        # gcp-storage-emulator (+ the gcs extra): a local GCS for the gs://
        # tests; safetensors: `convert to-torch` without torch.
        # dill: the official Checkpointer's own writer (dill protocol 2).
        # chex: the tests' tree assertions (the library does not use it).
        # tensorboard-plugin-profile: its own code lists --profile_steps'
        # traces.
        "test": ["chex>=0.1.88", "pytest", "pytest-xdist", "nbclient",
                 "nbformat", "ipykernel", "dm-haiku", "tensorboard",
                 "gcp-storage-emulator", "gcsfs", "google-cloud-storage",
                 "safetensors", "dill", "tensorboard-plugin-profile"],
        # `python -m byol_jax.convert to-torch`: .pt needs torch, .safetensors
        # only safetensors; torchvision for loading the export (large: CI
        # does not install this extra, and the torch tests skip without it).
        "torch": ["torch", "torchvision", "safetensors"],
        # benchmarks/tpu_aot.py and tests/test_tpu_aot.py: XLA's TPU
        # compiler (libtpu, about 140 MB), at the version jax[tpu] pins for
        # the installed jax; nothing runs on a TPU.
        "tpu-aot": ["jax[tpu]"],
    },
)
