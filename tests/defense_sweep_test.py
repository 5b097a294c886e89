"""The in-graph defense sweep (advdef.evaluators.defense_sweep) equals a loop of separate
evaluations and traces once; quickstart `smoke,sweep` writes the sweep table and plot."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advdef import config_utils
from advdef import data as data_lib
from advdef import evaluation
from advdef import experiment
from advdef import models
from advdef import retrofit
from advdef import sweep
from advdef.evaluators import defense_sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _quickstart(arg):
  module, _ = sweep.load_config_module(str(ROOT / 'configs' / 'quickstart.py'))
  return module, module.get_config(arg)


def _eval_config(**sweep):
  e = config_utils.base_config().eval
  e.update(num_draws=2, eot_samples=2)
  e.sweep.update(sweep)
  return e


@pytest.fixture(scope='module')
def setup():
  """An initialised small_cnn (no training: equality does not need a good model) and 40
  digits test images, i.e. two batches of 32, the second padded."""
  splits = data_lib.load_dataset(config_utils.base_config().data)
  info = splits.info
  model = models.create_model('small_cnn', num_classes=info.num_classes, mean=info.mean,
                              std=info.std)
  variables = model.init({'params': jax.random.key(0)},
                         jnp.zeros((1, *info.image_shape)), train=False)
  return model, variables, splits.test_images[:40], splits.test_labels[:40].astype(np.int32)


# ------------------------------------------------------------------------------------------
# In-graph sweep.


def test_jump_grid_equals_a_loop_of_separate_runs_and_traces_once(setup):
  model, variables, images, labels = setup
  # Four values: sharded over the four test devices (conftest), one value per device.
  spec = defense_sweep.parse_sweep_config(_eval_config(
      defense='jump', param='kappa', values=(0.0, 0.3, 0.6, 1.2), attack='pgd(steps=2)',
      epsilon=0.1))
  assert not spec.stochastic
  key = jax.random.key(7)
  evaluator = defense_sweep.SweepEvaluator(model, variables, spec)
  assert evaluator.mesh is not None and evaluator.mesh.axis_names == ('grid',)
  clean, robust = evaluator.accuracies(images, labels, key, batch_size=32)
  # Two batches (the second padded), four values: one trace.
  assert evaluator.trace_count == 1
  loop_clean, loop_robust = defense_sweep.separate_accuracies(
      model, variables, spec, images, labels, key, batch_size=32)
  np.testing.assert_array_equal(clean, loop_clean)
  np.testing.assert_array_equal(robust, loop_robust)
  assert np.all(robust <= clean + 1e-9) and len(set(clean.tolist())) > 1
  # Clean accuracy also agrees with the report's own clean evaluation of the spec.
  hook = retrofit.build_hook('jump(kappa=0.6)')
  predict = evaluation.make_predict_fn(retrofit.make_logits_fn(model, variables, hook),
                                       stochastic=False, num_draws=1)
  row = evaluation.score_predictions(predict, images, labels, 32, key, stochastic=False)
  assert row['accuracy'] == pytest.approx(clean[2], abs=1e-12)


@pytest.mark.parametrize('defense,param,values,fixed,num_devices', [
    # SAP at the dense layer's 128 units only (the sampler's cost grows with the units);
    # two values on four devices: not sharded, plain vmap.
    ('sap', 'frac', (1.0, 0.5), 'sites=act3', 4),
    # Two values on two devices: sharded, one value per device.
    ('rse', 'sigma_inner', (0.0, 0.1), 'sigma_init=0.05', 2),
])
def test_stochastic_grid_equals_a_loop_of_separate_runs(setup, defense, param, values, fixed,
                                                        num_devices):
  model, variables, images, labels = setup
  images, labels = images[:24], labels[:24]
  spec = defense_sweep.parse_sweep_config(_eval_config(
      defense=defense, param=param, values=values, fixed=fixed, attack='fgsm', epsilon=0.1))
  assert spec.stochastic and spec.attack_label == 'fgsm+eot2'
  key = jax.random.key(11)
  evaluator = defense_sweep.SweepEvaluator(model, variables, spec,
                                           devices=jax.devices()[:num_devices])
  assert (evaluator.mesh is not None) == (num_devices == 2)
  clean, robust = evaluator.accuracies(images, labels, key, batch_size=16)
  assert evaluator.trace_count == 1
  loop_clean, loop_robust = defense_sweep.separate_accuracies(
      model, variables, spec, images, labels, key, batch_size=16)
  # Same keys, same draws: equal up to float reassociation between the batched and the
  # single-value graphs (at most one example of 24 may flip on a near tie).
  np.testing.assert_allclose(clean, loop_clean, atol=1 / 24 + 1e-9)
  np.testing.assert_allclose(robust, loop_robust, atol=1 / 24 + 1e-9)


def test_sweep_row_follows_the_report_schema():
  from advdef import reporting
  spec = defense_sweep.parse_sweep_config(_eval_config(
      defense='jump', param='kappa', values=(0.0, 0.5), fixed='surrogate=relu',
      attack='pgd(steps=3)', epsilon=0.1))
  row = defense_sweep.sweep_row(spec, [0.9, 0.8], [0.5, 0.6])
  assert row['defense'] == 'jump(surrogate=relu)' and row['attack'] == 'pgd(steps=3)'
  report = reporting.new_report(config={}, dataset='d', model='m')
  report['sweeps'] = [row]
  reporting.validate_report(report)


J = dict(defense='jump', param='kappa', values=(0.1,))  # A valid sweep to spoil.


@pytest.mark.parametrize('sweep,match', [
    (dict(J, defense='jumpp'), r"eval\.sweep\.defense='jumpp'.*jump, sap, rse, noise"),
    (dict(J, defense='none'), r'eval\.sweep\.defense'),
    (dict(J, param='frac'), r"eval\.sweep\.param='frac'.*valid choices: kappa"),
    (dict(J, defense='rse', param='sigma'), r'sigma_init, sigma_inner'),
    (dict(J, values=()), r'eval\.sweep\.values.*non-empty'),
    (dict(J, values=(0.1, float('nan'))), r'eval\.sweep\.values.*finite'),
    (dict(J, values=(-0.5,)), r'eval\.sweep\.values.*>= 0'),
    (dict(J, defense='sap', param='frac', values=(0.0, 0.5)), r'eval\.sweep\.values.*> 0'),
    (dict(J, values=(0.1, 0.1)), r'duplicates'),
    (dict(J, fixed='kappa=0.2'), r'eval\.sweep\.fixed.*swept'),
    (dict(J, fixed='surrogate=tanh'), r'jump\.surrogate'),
    (dict(J, fixed='colour=1'), r'eval\.sweep\.fixed.*bad arguments'),
    (dict(J, defense='sap', param='frac', fixed='max_frac=1.0'), r'max_frac'),
    (dict(J, attack='pgdd'), r'eval\.sweep\.attack.*unknown attack'),
    (dict(J, attack='cw_l2'), r'minimum-perturbation'),
    (dict(J, attack='pgd(steps=0)'), r'eval\.sweep\.attack'),
    (dict(J, attack='pgd(eps=0.1)'), r'eval\.sweep\.attack'),
    (dict(J, epsilon=1.5), r'eval\.sweep\.epsilon'),
    (dict(J, epsilon=-0.1), r'eval\.sweep\.epsilon'),
])
def test_bad_sweep_config_fails_in_validate_config(sweep, match):
  _, config = _quickstart('smoke,clean')
  config.eval.sweep.update(sweep)
  with pytest.raises(ValueError, match=match):
    experiment.validate_config(config)


def test_sites_glob_matching_nothing_fails_in_prepare():
  _, config = _quickstart('smoke,clean,sweep')
  config.eval.sweep.fixed = 'sites=nowhere*'
  with pytest.raises(ValueError, match=r'eval\.sweep.*matches no act site'):
    experiment.prepare(config)


def test_disabled_sweep_is_a_no_op():
  _, config = _quickstart('smoke')
  assert config.eval.sweep.defense == ''
  assert defense_sweep.parse_sweep_config(config.eval) is None


def test_quickstart_smoke_sweep_end_to_end(tmp_path):
  _, config = _quickstart('smoke,sweep')
  assert config.eval.sweep.defense == 'jump' and len(config.eval.sweep['values']) == 10
  # The rest of the suite is covered by experiment_test; keep this run to the sweep.
  config.eval.update(defenses=('none',), attacks=(), checks=False)
  report = experiment.run(config, str(tmp_path), progress=False)
  (row,) = report['sweeps']
  assert row['defense'] == 'jump' and row['param'] == 'kappa'
  assert row['values'] == list(config.eval.sweep['values'])
  assert row['attack'] == 'pgd(steps=3)' and row['epsilon'] == 0.1
  assert all(0 <= a <= 1 for a in row['clean_accuracy'] + row['robust_accuracy'])
  assert json.loads((tmp_path / 'report.json').read_text())['sweeps'] == [row]
  assert '## Sweeps' in (tmp_path / 'report.md').read_text()
  assert (tmp_path / 'sweep_jump_kappa.png').stat().st_size > 1000
