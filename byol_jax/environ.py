"""Environment variables read once at import by TensorFlow and etils.epath.

The package imports this module first, so they are set before anything loads
those libraries; a variable the user set is left as it is.
"""
import os

# No TensorFlow C++ start-up notices on the console; TensorFlow only decodes,
# crops and writes datasets here, so its oneDNN matrix kernels are not needed.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# epath reaches gs:// through gcsfs, not TensorFlow (see storage.py); it
# caches its choice at the first gs:// path.
os.environ.setdefault("EPATH_USE_TF", "false")
