"""Every config file loads exactly as the --config flag loads it, in each variant, and
validates; its docstring starts with the command that runs it; the smoke variant of every
training recipe of the recipe configs runs end to end."""

import importlib.util
import json
import pathlib

import pytest

from advdef import experiment
from advdef import recipes

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs'
VARIANTS = {
    'quickstart.py': [None, 'smoke', 'clean', 'smoke,clean'],
    'mnist_lenet.py': [None, 'source=npz', 'source=npz,cpu', 'smoke', 'source=npz,smoke',
                       'recipe=robust', 'recipe=pgd_at', 'source=npz,cpu,recipe=robust'],
    'cifar10_resnet20.py': [None, 'arch=postact', 'source=npz,cpu', 'smoke',
                            'arch=postact,smoke', 'recipe=adv', 'arch=postact,recipe=robust',
                            'recipe=pgd_at', 'recipe=trades', 'source=npz,cpu,recipe=adv'],
    'cifar10_vgg16.py': [None, 'plain', 'source=npz,cpu', 'smoke'],
    'cifar10_wrn.py': [None, 'depth=28,widen=10', 'source=npz,cpu', 'smoke'],
    'mnist_anp.py': [None, 'recipe=at', 'recipe=trades', 'source=npz,cpu', 'smoke',
                     'recipe=bp,smoke', 'recipe=anp,smoke', 'recipe=anp_vs,smoke',
                     'recipe=anp_vs,cpu,smoke'],
    # The eval-only experiments need base=<workdir>: tests/reproduce_test.py validates them.
    'repro_sap.py': [None, 'dense,smoke', 'dense,cpu', 'dense,full', 'adv,full'],
    'repro_rse.py': [None, 'plain,smoke', 'plain,cpu', 'rse,cpu', 'pgd_at,cpu', 'pgd_at,full'],
    'repro_jumprelu.py': [None, 'lenet,smoke', 'lenet,cpu', 'resnet_robust,cpu',
                          'resnet,full'],
    'repro_anp.py': [None, 'mnist_standard,smoke', 'mnist_standard,cpu', 'mnist_at,cpu',
                     'cifar_standard,full', 'cifar_at,full'],
}
# The smoke variant of every training recipe of the recipe configs, run end to end in CI.
SMOKE_RUNS = [
    ('cifar10_resnet20.py', 'smoke', 'standard'),
    ('cifar10_resnet20.py', 'recipe=adv,smoke', 'fgsm_mix'),
    ('cifar10_resnet20.py', 'arch=postact,recipe=robust,smoke', 'fgsm_mix'),
    ('cifar10_resnet20.py', 'recipe=pgd_at,smoke', 'pgd_at'),
    ('cifar10_resnet20.py', 'recipe=trades,smoke', 'trades'),
    ('mnist_lenet.py', 'smoke', 'standard'),
    ('mnist_lenet.py', 'recipe=robust,smoke', 'fgsm_mix'),
    ('mnist_lenet.py', 'recipe=pgd_at,smoke', 'pgd_at'),
    ('cifar10_vgg16.py', 'smoke', 'standard'),
    ('mnist_anp.py', 'recipe=standard,smoke', 'standard'),
    ('mnist_anp.py', 'recipe=at,smoke', 'pgd_at'),
    ('mnist_anp.py', 'recipe=trades,smoke', 'trades'),
    ('mnist_anp.py', 'recipe=bp,smoke', 'bp'),
    ('mnist_anp.py', 'recipe=anp,smoke', 'anp'),
    ('mnist_anp.py', 'recipe=anp_vs,smoke', 'anp'),
    ('mnist_anp.py', 'recipe=anp_vs,cpu,smoke', 'anp'),  # eps warm-up, open masks
]


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# Reinforcement-learning configs: validated by advdef.rl (tests/rl_test.py), not by the
# classifier experiment.
RL_CONFIGS = ('minatar_dqn.py',)


def test_every_config_file_is_covered():
  assert sorted(p.name for p in CONFIG_DIR.glob('*.py')) == sorted((*VARIANTS, *RL_CONFIGS))


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_docstring_starts_with_its_command(name):
  doc = _load(CONFIG_DIR / name).__doc__
  assert doc.startswith(f'python -m advdef.main --config=configs/{name}')


@pytest.mark.parametrize('name,arg', [(n, a) for n, args in VARIANTS.items() for a in args])
def test_config_variant_validates(name, arg, monkeypatch):
  config = _load(CONFIG_DIR / name).get_config(arg)
  if config.data.source == 'npz':
    # Configs name the dev machine's ../shared path; validation checks the file exists.
    shared = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'
    if not shared.exists():
      pytest.skip('../shared/data is absent')
    monkeypatch.chdir(CONFIG_DIR.parent)
  experiment.validate_config(config)
  if arg and 'smoke' in arg:
    assert config.train.num_epochs <= 2


def test_unknown_config_argument_is_an_error():
  with pytest.raises(ValueError, match="'smok' is unknown"):
    _load(CONFIG_DIR / 'quickstart.py').get_config('smok')


def _recipe_argument(arg):
  values = dict(part.partition('=')[::2] for part in arg.split(','))
  return values.get('recipe', 'standard')


def test_every_recipe_of_a_recipe_config_has_a_smoke_run():
  for name in ('cifar10_resnet20.py', 'mnist_lenet.py', 'mnist_anp.py'):
    covered = {_recipe_argument(arg) for n, arg, _ in SMOKE_RUNS if n == name}
    assert covered == set(_load(CONFIG_DIR / name).RECIPES), name


@pytest.mark.parametrize('name,arg', [(n, a) for n in ('cifar10_resnet20.py', 'mnist_lenet.py')
                                      for a in _load(CONFIG_DIR / n).RECIPES])
def test_smoke_shrinks_the_recipes_attack(name, arg):
  full = recipes.parse_recipe(_load(CONFIG_DIR / name).get_config(f'recipe={arg}').train.recipe)
  smoke = recipes.parse_recipe(
      _load(CONFIG_DIR / name).get_config(f'recipe={arg},smoke').train.recipe)
  assert smoke.name == full.name
  assert {k: v for k, v in smoke.hparams.items() if k not in ('steps', 'step_size')} == \
      {k: v for k, v in full.hparams.items() if k not in ('steps', 'step_size')}
  if 'steps' in full.hparams:
    assert smoke.hparams['steps'] == 2 < full.hparams['steps']


@pytest.mark.slow
@pytest.mark.parametrize('name,arg,recipe', SMOKE_RUNS,
                         ids=[f'{n[:-3]}:{a}' for n, a, _ in SMOKE_RUNS])
def test_recipe_smoke_runs_end_to_end(name, arg, recipe, tmp_path):
  """Training with the recipe, evaluation and the report, as main runs them. The smoke
  variant cut to one step, one device and one defense, with `clean` (no attacks) and no
  checks: the evaluation suites have their own tests, and CI has 2 cores."""
  config = _load(CONFIG_DIR / name).get_config(arg + ',clean')
  assert config.data.source == 'fake' and config.train.num_epochs <= 2
  assert recipes.parse_recipe(config.train.recipe).name == recipe
  config.train.num_epochs = 1
  config.data.update(fake_num_train=config.train.batch_size, fake_num_test=16)
  config.eval.update(defenses=config.eval.defenses[:1], checks=False, batch_size=16)
  config.report.tensorboard = False
  config.parallel.num_devices = 1  # compiles faster; tests/parallel_test.py covers sharding
  report = experiment.run(config, str(tmp_path), progress=False)
  assert json.loads((tmp_path / 'report.json').read_text())['config']['train']['recipe'] == \
      config.train.recipe
  assert report['training']['final_test']['accuracy'] >= 0
  summary = report['model_summary']
  if recipe in ('anp', 'bp'):
    assert 0 <= summary['sparsity_percent'] <= 100
    assert summary['flops_speedup'] >= 1 and 0 < summary['memory_percent'] <= 100
    assert summary['vulnerability']['white_box_vulnerability'] >= 0
    assert (tmp_path / 'pruned_model.npz').exists()
  else:
    assert summary['sparsity_percent'] == 0.0


def test_anp_vs_without_base_is_an_error():
  with pytest.raises(ValueError, match='base'):
    _load(CONFIG_DIR / 'mnist_anp.py').get_config('recipe=anp_vs')
