"""The package's shape, read from its source with ast (nothing imported): no import cycles, no import from a
lower layer into a higher one, and no module or function longer than a reader can hold."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "reft_jax"
# Lowest first; a module may import its own layer and the layers below (docs/ARCHITECTURE.md).
LAYERS = (
  ("core", ("config", "checkpoint", "metrics", "files", "sharding", "optim", "losses", "distributed", "train")),
  ("model/data", ("model", "data", "generate", "refusal", "eval", "stages")),
  ("defences", ("defences",)),
  ("pipelines", ("pipelines",)),
  ("cli", ("main", "__main__", "__init__", "hugepages")),
)
# Modules allowed past the size limits, with the reason.
DATA_TABLES = {"reft_jax.data.world_tables": "the safety world's domains, lexicons and templates: data, no logic"}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 2 else parts)
    out[name] = path
  return out


def _imports(path: pathlib.Path, modules: dict) -> set[str]:
  """Every reft_jax module `path` imports, at any depth (function-level imports count: they still tie)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    for name in names:
      if not name.startswith("reft_jax"):
        continue
      while name not in modules and "." in name:  # `from pkg import name`: a module, or a name in pkg
        name = name.rsplit(".", 1)[0]
      out.add(name)
  return out


def _layer(module: str) -> int:
  first = module.split(".")[1] if "." in module else "__init__"
  for i, (_, tops) in enumerate(LAYERS):
    if first in tops:
      return i
  raise AssertionError(f"{module}: in no layer of tests/test_layers.py:LAYERS")


GRAPH = {m: _imports(p, _modules()) - {m} for m, p in _modules().items()}


def test_no_module_imports_a_higher_layer():
  bad = [
    f"{m} ({LAYERS[_layer(m)][0]}) -> {d} ({LAYERS[_layer(d)][0]})"
    for m, deps in GRAPH.items()
    for d in deps
    if _layer(d) > _layer(m)
  ]
  assert not bad, "imports that run up the layers:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []

  def visit(m):  # Tarjan's strongly connected components
    index[m] = low[m] = len(index)
    stack.append(m)
    on_stack.add(m)
    for d in GRAPH.get(m, ()):
      if d not in index:
        visit(d)
        low[m] = min(low[m], low[d])
      elif d in on_stack:
        low[m] = min(low[m], index[d])
    if low[m] == index[m]:
      scc = []
      while True:
        x = stack.pop()
        on_stack.discard(x)
        scc.append(x)
        if x == m:
          break
      if len(scc) > 1:
        cycles.append(sorted(scc))

  for m in sorted(GRAPH):
    if m not in index:
      visit(m)
  assert not cycles, f"import cycles: {cycles}"


def test_the_graph_is_read():  # a parser that reads nothing would pass the two tests above
  assert "reft_jax.stages" in GRAPH["reft_jax.defences.registry"]
  assert "reft_jax.defences" in GRAPH["reft_jax.pipelines.suite"]
  assert _layer("reft_jax.defences.reft") > _layer("reft_jax.stages") > _layer("reft_jax.train")


@pytest.mark.parametrize("module", sorted(_modules()))
def test_modules_and_functions_stay_short(module):
  path = _modules()[module]
  if module in DATA_TABLES:
    return
  lines = path.read_text().count("\n")
  assert lines <= MAX_MODULE_LINES, f"{path}: {lines} lines (> {MAX_MODULE_LINES}); split it"
  long = [
    f"{n.name} ({n.end_lineno - n.lineno + 1} lines)"
    for n in ast.walk(ast.parse(path.read_text()))
    if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES
  ]
  assert not long, f"{path}: functions over {MAX_FUNCTION_LINES} lines: {long}"


@pytest.mark.parametrize("path", sorted((PACKAGE.parent / "configs").glob("*.py")), ids=lambda p: p.name)
def test_config_files_stay_short(path):
  """configs/: base.py's `defaults` is the table of every field's default (data); the rest is code."""
  assert path.read_text().count("\n") <= MAX_MODULE_LINES, f"{path}: split it"
  long = [
    n.name
    for n in ast.walk(ast.parse(path.read_text()))
    if isinstance(n, ast.FunctionDef)
    and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES
    and (path.name, n.name) != ("base.py", "defaults")
  ]
  assert not long, f"{path}: functions over {MAX_FUNCTION_LINES} lines: {long}"
