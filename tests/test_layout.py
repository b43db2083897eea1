"""The package layout as rules on the import graph, read from the source.

Nothing is imported: every `import` and `from ... import` of byol_jax's own
modules (at module level or inside functions) is read with `ast`, so a
violation is reported by file and line before anything runs.
"""
import ast
import collections
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "byol_jax"
ENTRY_POINTS = ("train", "linear_eval", "convert", "prepare")
# Packages nothing in the algorithm, data/ or evaluation/ may reach.
OUTSIDE = ("byol_jax.trainer", "byol_jax.interop",
           *(f"byol_jax.{e}" for e in ENTRY_POINTS))
MAX_LINES = 400


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _read_modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _read_modules()


def _imports(name: str) -> list[tuple[str, int]]:
  """(imported byol_jax module, line) for every import in module `name`."""
  path = MODULES[name]
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # Relative: resolved against this module's package.
        anchor = package.split(".")
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      # `from pkg import mod` imports the module pkg.mod when there is one.
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                 for a in node.names]
    else:
      continue
    for target in targets:
      # `import byol_jax.a.b` or a name from a module: the longest module.
      while target and target not in MODULES:
        target = target.rpartition(".")[0]
      if target.startswith("byol_jax") and target != name:
        found.append((target, node.lineno))
  return found


GRAPH = {name: _imports(name) for name in MODULES}


def _describe(chain: list[tuple[str, int]]) -> str:
  """'a -> b (a.py:12) -> c (b.py:3)' for a chain of (module, line)."""
  text = chain[0][0]
  for (prev, _), (mod, line) in zip(chain, chain[1:]):
    text += f" -> {mod} ({MODULES[prev].relative_to(ROOT)}:{line})"
  return text


def _within(name: str, prefixes) -> bool:
  return any(name == p or name.startswith(p + ".") for p in prefixes)


def _under(*prefixes) -> list[str]:
  """The modules of the packages `prefixes`, sorted."""
  return sorted(m for m in MODULES if _within(m, prefixes))


def _chains_into(sources, forbidden, graph=GRAPH) -> list[str]:
  """The shortest import chain from each of `sources` into `forbidden`."""
  problems = []
  for source in sources:
    seen = {source}
    queue = collections.deque([[(source, 0)]])
    while queue:
      chain = queue.popleft()
      for target, line in graph[chain[-1][0]]:
        if target in seen:
          continue
        seen.add(target)
        if _within(target, forbidden):
          problems.append(_describe(chain + [(target, line)]))
        else:
          queue.append(chain + [(target, line)])
  return problems


def _cycles(graph=GRAPH) -> list[str]:
  """One chain per import cycle between byol_jax modules (Tarjan's SCCs)."""
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w, _ in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = set()
      while not component or v not in component:
        component.add(stack.pop())
      on_stack.difference_update(component)
      if len(component) > 1:
        components.append(component)

  for v in sorted(MODULES):
    if v not in index:
      visit(v)
  # Name each cycle by a path that goes round it once, from its first module.
  problems = []
  for component in components:
    start = min(component)
    chain, seen = [(start, 0)], {start}
    while True:
      options = [(w, line) for w, line in graph[chain[-1][0]]
                 if w in component]
      closing = [o for o in options if o[0] == start]
      if closing:
        problems.append(_describe(chain + [closing[0]]))
        break
      w, line = next(o for o in options if o[0] not in seen)
      chain.append((w, line))
      seen.add(w)
  return problems


def test_the_graph_is_read():
  """The rules below see real edges (a parser bug would pass them all)."""
  assert "byol_jax.core.step" in MODULES and "byol_jax.train" in MODULES
  step = {m for m, _ in GRAPH["byol_jax.core.step"]}
  assert {"byol_jax.core.methods", "byol_jax.core.sharding",
          "byol_jax.core.train_state"} <= step
  train = {m for m, _ in GRAPH["byol_jax.train"]}
  assert any(m.startswith("byol_jax.trainer.") for m in train), train


def test_the_checks_find_planted_violations():
  """A cycle and a forbidden chain added to the graph are both named."""
  graph = {k: list(v) for k, v in GRAPH.items()}
  graph["byol_jax.core.sharding"].append(("byol_jax.core.train_state", 1))
  graph["byol_jax.core.optim"].append(("byol_jax.data.augment", 3))
  graph["byol_jax.data.augment"].append(("byol_jax.trainer.checkpoint", 7))
  cycles = _cycles(graph)
  assert len(cycles) == 1, cycles
  assert cycles[0].startswith(
      "byol_jax.core.sharding -> byol_jax.core.train_state "
      "(byol_jax/core/sharding.py:1) -> byol_jax.core.sharding "), cycles
  chains = _chains_into(_under("byol_jax.core"), OUTSIDE, graph)
  assert ("byol_jax.core.optim -> byol_jax.data.augment "
          "(byol_jax/core/optim.py:3) -> byol_jax.trainer.checkpoint "
          "(byol_jax/data/augment.py:7)") in chains, chains


def test_no_import_cycles():
  cycles = _cycles()
  assert not cycles, "Import cycles:\n  " + "\n  ".join(cycles)


def test_the_algorithm_imports_no_trainer_interop_or_entry_point():
  chains = _chains_into(_under("byol_jax.core"), OUTSIDE)
  assert not chains, ("byol_jax.core reaches the trainer, interop or an "
                      "entry point:\n  " + "\n  ".join(chains))


def test_data_and_evaluation_import_no_trainer_interop_or_entry_point():
  chains = _chains_into(_under("byol_jax.data", "byol_jax.evaluation"),
                        OUTSIDE)
  assert not chains, ("data/ or evaluation/ reaches the trainer, interop or "
                      "an entry point:\n  " + "\n  ".join(chains))


def test_the_root_package_imports_no_trainer_or_interop():
  """`import byol_jax.core.x` runs byol_jax/__init__.py first: whatever it
  imports at module level is loaded with the algorithm (what its lazy
  `__getattr__` imports is not)."""
  tree = ast.parse(MODULES["byol_jax"].read_text())
  top = {n.lineno for n in tree.body if isinstance(n, (ast.Import,
                                                       ast.ImportFrom))}
  graph = dict(GRAPH, byol_jax=[(m, line) for m, line in GRAPH["byol_jax"]
                                if line in top])
  chains = _chains_into(["byol_jax"], OUTSIDE, graph)
  assert not chains, ("byol_jax/__init__.py loads the trainer or interop "
                      "with every submodule:\n  " + "\n  ".join(chains))


@pytest.mark.parametrize(
    "path", sorted(str(p.relative_to(ROOT)) for p in MODULES.values()))
def test_no_library_file_over_400_lines(path):
  lines = len((ROOT / path).read_text().splitlines())
  assert lines <= MAX_LINES, f"{path} has {lines} lines (at most {MAX_LINES})"
