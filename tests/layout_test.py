"""advdef's layout: the import graph read from the source (ast), without importing anything.

- No import cycles between advdef's modules.
- Layers: a module imports only modules of its own layer or below, so the pure parts
  (defenses, attacks) never depend on models, training or the experiment, and evaluators
  never on the experiment that runs them. A new module gets a layer here.
- No function-level `from advdef import ...` except the documented start-up deferrals.
- No module over 600 lines.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'advdef'

# Lowest first. A module may import modules of its own layer or any layer below.
LAYERS = (
    ('advdef.validate', 'advdef.files', 'advdef.rng', 'advdef.random_words', 'advdef.version', 'advdef.compilation',
     'advdef.layers', 'advdef.workdir_lock', 'advdef.progress'),
    ('advdef.config_utils',),
    ('advdef.defenses', 'advdef.attacks'),
    ('advdef.data', 'advdef.models', 'advdef.parallel', 'advdef.retrofit', 'advdef.pruning',
     'advdef.pruned_export', 'advdef.evaluation', 'advdef.checkpointing', 'advdef.reporting',
     'advdef.plots', 'advdef.metric_writers'),
    ('advdef.recipes', 'advdef.training'),
    ('advdef.runs',),
    ('advdef.evaluators',),
    ('advdef.rl',),
    ('advdef.experiment', 'advdef.sweep', 'advdef.sweep_summary', 'advdef.main',
     'advdef.reproduce', 'advdef'),
)

# Function-level imports of advdef that are allowed, each for a reason.
DEFERRED_IMPORTS = {
    # CLIs: flag errors and --help print before JAX and the library load (seconds).
    'advdef.main',
    'advdef.sweep',
    # `advdef.load_run` for notebooks, while `import advdef` itself stays cheap.
    'advdef',
}

MAX_LINES = 600


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts = parts[:-1]
  return '.'.join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def _resolve(name: str) -> str:
  """The advdef module an imported dotted name refers to (a module, or a name in one)."""
  while name not in MODULES and '.' in name:
    name = name.rsplit('.', 1)[0]
  return name


def _imports(path: pathlib.Path):
  """[(advdef module imported, is_module_level, line)] of one source file."""
  tree = ast.parse(path.read_text(), filename=str(path))
  out = []

  def visit(node, in_function):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      in_function = True
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name == 'advdef' or alias.name.startswith('advdef.'):
          out.append((_resolve(alias.name), not in_function, node.lineno))
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and (
        node.module == 'advdef' or node.module.startswith('advdef.')):
      for alias in node.names:
        out.append((_resolve(f'{node.module}.{alias.name}'), not in_function, node.lineno))
    for child in ast.iter_child_nodes(node):
      visit(child, in_function)

  visit(tree, False)
  return out


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _layer(module: str) -> int:
  for i, layer in enumerate(LAYERS):
    for prefix in layer:
      if module == prefix or (prefix != 'advdef' and module.startswith(prefix + '.')):
        return i
  raise AssertionError(f'{module} has no layer in tests/layout_test.py LAYERS; give it one')


def test_every_module_has_a_layer():
  for module in MODULES:
    _layer(module)


def test_no_import_cycles():
  edges = {m: sorted({t for t, _, _ in imports if t != m}) for m, imports in GRAPH.items()}
  state, stack, cycles = {}, [], []

  def dfs(m):
    state[m] = 'open'
    stack.append(m)
    for t in edges.get(m, []):
      if state.get(t) == 'open':
        cycles.append(stack[stack.index(t):] + [t])
      elif t not in state:
        dfs(t)
    stack.pop()
    state[m] = 'done'

  for m in sorted(edges):
    if m not in state:
      dfs(m)
  assert not cycles, 'import cycles: ' + '; '.join(' -> '.join(c) for c in cycles)


def test_modules_import_only_their_layer_or_below():
  bad = []
  for module, imports in GRAPH.items():
    for target, _, line in imports:
      if target != module and _layer(target) > _layer(module):
        bad.append(f'{MODULES[module].relative_to(ROOT)}:{line} {module} (layer '
                   f'{_layer(module)}) imports {target} (layer {_layer(target)})')
  assert not bad, '\n'.join(bad)


@pytest.mark.parametrize('low', ['advdef.defenses', 'advdef.attacks'])
def test_pure_parts_import_no_models_training_or_experiment(low):
  forbidden = ('advdef.models', 'advdef.training', 'advdef.recipes', 'advdef.experiment',
               'advdef.runs', 'advdef.evaluators', 'advdef.retrofit', 'advdef.data')
  imported = {t for m, imports in GRAPH.items() if m == low or m.startswith(low + '.')
              for t, _, _ in imports}
  assert not [t for t in imported if t.startswith(forbidden)], imported


def test_function_level_advdef_imports_only_where_documented():
  bad = [f'{MODULES[m].relative_to(ROOT)}:{line} imports {t} inside a function'
         for m, imports in GRAPH.items() if m not in DEFERRED_IMPORTS
         for t, module_level, line in imports if not module_level]
  assert not bad, '\n'.join(bad)


def test_no_module_over_the_line_limit():
  long = {str(p.relative_to(ROOT)): n for p in MODULES.values()
          if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert not long, long


def test_the_graph_is_read_from_the_source():
  # The checks above would pass vacuously on an empty graph.
  assert len(MODULES) > 20
  experiment = {t for t, _, _ in GRAPH['advdef.experiment']}
  assert {'advdef.training', 'advdef.evaluators', 'advdef.runs'} <= experiment
  assert _layer('advdef.attacks.gradient') == _layer('advdef.attacks')
