"""Spec strings, argument strings and field checks."""

import pytest

from advdef import config_utils
from advdef import validate


def test_parse_spec_stack_literals_and_bare_words():
  parsed = config_utils.parse_spec(
      'rse(sigma_init=0.2, sigma_inner=0.1) + jump(kappa=0.5, surrogate=relu) + none')
  assert parsed == [('rse', {'sigma_init': 0.2, 'sigma_inner': 0.1}),
                    ('jump', {'kappa': 0.5, 'surrogate': 'relu'}), ('none', {})]
  assert config_utils.parse_spec('pgd(steps=40, eps=(1, 2))') == [
      ('pgd', {'steps': 40, 'eps': (1, 2)})]
  assert config_utils.parse_spec('sap(sites=stage1*/act1)') == [('sap', {'sites': 'stage1*/act1'})]


@pytest.mark.parametrize('bad', ['', 'sap(', 'sap(frac)', '1sap', 'sap(frac=1 2)'])
def test_parse_spec_errors_name_the_field(bad):
  with pytest.raises(ValueError, match='eval.defenses'):
    config_utils.parse_spec(bad, field='eval.defenses')


def test_parse_arg():
  arg = config_utils.parse_arg('smoke,epochs=3,source=npz', smoke=False, epochs=10,
                               source='tfds')
  assert (arg.smoke, arg.epochs, arg.source) == (True, 3, 'npz')
  assert config_utils.parse_arg(None, smoke=False).smoke is False
  with pytest.raises(ValueError, match="'smok' is unknown; valid: smoke"):
    config_utils.parse_arg('smok', smoke=False)


def test_checks():
  validate.check_positive('train.batch_size', 3, integer=True)
  for value in (0, -1, 2.5, float('nan'), True):
    with pytest.raises(ValueError, match='train.batch_size'):
      validate.check_positive('train.batch_size', value, integer=True)
  with pytest.raises(ValueError, match="train.optimizer='sdg'.*sgd, adam"):
    validate.check_choice('train.optimizer', 'sdg', ('sgd', 'adam'))
  validate.check_positive('eval.epsilon', 0.0, allow_zero=True)
  with pytest.raises(ValueError, match='finite'):
    validate.check_positive('eval.epsilon', float('inf'))
