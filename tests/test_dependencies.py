"""setup.py declares exactly what byol_jax imports (issue 26, item 3)."""
import ast
import re
import sys

from testlib import REPO

# Import name -> the distribution that provides it, where they differ.
_DISTRIBUTION = {"absl": "absl-py", "PIL": "pillow",
                 "orbax": "orbax-checkpoint", "tensorflow": "tensorflow-cpu",
                 "tensorflow_datasets": "tensorflow-datasets"}


def _library_imports() -> set[str]:
  """The distributions of every third-party module byol_jax imports."""
  names = set()
  for path in (REPO / "byol_jax").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names |= {a.name.split(".")[0] for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        names.add(node.module.split(".")[0])
  names -= set(sys.stdlib_module_names) | {"byol_jax"}
  return {_DISTRIBUTION.get(n, n).lower() for n in names}


def _declared() -> tuple[set[str], dict[str, set[str]]]:
  """setup.py's install_requires and extras_require, as lower-case names."""
  tree = ast.parse((REPO / "setup.py").read_text())
  call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and
              getattr(n.func, "attr", "") == "setup")
  kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords
        if k.arg in ("install_requires", "extras_require")}
  name = lambda r: re.split(r"[<>=\[ ]", r)[0].lower()
  return ({name(r) for r in kw["install_requires"]},
          {k: {name(r) for r in v} for k, v in kw["extras_require"].items()})


def test_setup_declares_exactly_the_library_imports():
  used = _library_imports()
  required, extras = _declared()
  optional = set().union(*(v for k, v in extras.items() if k != "test"))
  assert used <= required | optional, used - required - optional
  assert required <= used, required - used  # Nothing required goes unused.
  assert {"etils", "fsspec"} <= required
  assert "chex" not in used and "chex" not in required | optional
  assert "chex" in extras["test"]
