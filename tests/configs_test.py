"""Every config file loads exactly as the --config flag loads it, in each variant, and
validates; its docstring starts with the command that runs it."""

import importlib.util
import pathlib

import pytest

from advdef import experiment

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs'
VARIANTS = {
    'quickstart.py': [None, 'smoke', 'clean', 'smoke,clean'],
    'mnist_lenet.py': [None, 'source=npz', 'source=npz,cpu', 'smoke', 'source=npz,smoke'],
    'cifar10_resnet20.py': [None, 'arch=postact', 'source=npz,cpu', 'smoke',
                            'arch=postact,smoke'],
    'cifar10_vgg16.py': [None, 'plain', 'source=npz,cpu', 'smoke'],
    'cifar10_wrn.py': [None, 'depth=28,widen=10', 'source=npz,cpu', 'smoke'],
}


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_config_file_is_covered():
  assert sorted(p.name for p in CONFIG_DIR.glob('*.py')) == sorted(VARIANTS)


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
