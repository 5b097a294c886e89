"""RSE's two metrics in the evaluation code, against hand-computed values: the accuracy of the
mean of the first n Monte-Carlo draws (evaluation.score_predictions, `ensemble_sizes`) and
robust accuracy within a distortion tolerance of minimum-perturbation attacks
(attack_suite._perturbation_fields, eval.tolerances); their config validation
(parse_eval_config), their Markdown sections (reporting.render_markdown), and the tolerance
curve of a real C&W row of the suite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advdef import config_utils
from advdef import data as data_lib
from advdef import evaluation
from advdef import evaluators
from advdef import models
from advdef import reporting
from advdef.evaluators import attack_suite

# 95% Wilson intervals, from the textbook formula by hand (k / n -> [lo, hi], 4 decimals).
WILSON = {(2, 5): (0.1176, 0.7693), (3, 5): (0.2307, 0.8824), (4, 5): (0.3755, 0.9638),
          (5, 6): (0.4365, 0.9699), (4, 6): (0.3000, 0.9032), (3, 6): (0.1876, 0.8124),
          (2, 6): (0.0968, 0.7000)}


PIXELS = (np.zeros(1, np.float32), np.ones(1, np.float32), '[0, 1] pixels')


def _assert_wilson(ci, k, n):
  np.testing.assert_allclose(ci, WILSON[(k, n)], atol=1e-4)


# ----------------------------------------------------------------------------------------
# Ensemble sizes: the mean softmax of the first n draws.

# Per example (label, per-draw probabilities [D=3, K=3]); what the first n draws' mean
# predicts, worked out by hand:        n=1  n=2  n=3
DRAWS = [
    (0, [[.9, .1, 0], [.9, .1, 0], [.9, .1, 0]]),     # ok   ok   ok
    (1, [[.6, .4, 0], [0, 1, 0], [0, 1, 0]]),         # no   ok   ok   (n=2: .3 .7 0)
    (2, [[.6, 0, .4], [0, 0, 1], [0, 0, 1]]),         # no   ok   ok   (n=2: .3 0 .7)
    (0, [[.1, .9, 0], [.6, .4, 0], [1, 0, 0]]),       # no   no   ok   (.35 .65; 1.7 1.3 0)
    (1, [[0, .6, .4], [0, 0, 1], [0, 0, 1]]),         # ok   no   no   (0 .3 .7; 0 .2 .8)
]
# Correct: n=1 {0, 4} 2/5; n=2 {0, 1, 2} 3/5; n=3 {0, 1, 2, 3} 4/5. Per draw: draw 0 {0, 4},
# draw 1 {0, 1, 2, 3}, draw 2 {0, 1, 2, 3}: mean 10/15. The last example is the one the last
# batch (5 examples, batch 2) pads with: counted twice it would change every number.


def _fake_predict():
  """predict(x, key) looking each example's draws up by its index, stored as its pixel."""
  table = jnp.asarray(np.array([d for _, d in DRAWS], np.float32).transpose(1, 0, 2))  # D,N,K

  def predict(x, key):
    del key
    index = jnp.round(jnp.asarray(x)[:, 0, 0, 0] * 255).astype(jnp.int32)
    draws = table[:, index]
    return jnp.mean(draws, axis=0), draws
  return predict


def _indexed_images():
  n = len(DRAWS)
  images = np.zeros((n, 2, 2, 1), np.uint8)
  images[:, 0, 0, 0] = np.arange(n)
  return images, np.array([label for label, _ in DRAWS], np.int32)


def test_ensemble_accuracies_of_the_first_n_draws_with_padding_masked():
  images, labels = _indexed_images()
  row = evaluation.score_predictions(_fake_predict(), images, labels, 2, jax.random.key(0),
                                     stochastic=True, ensemble_sizes=(1, 2, 3),
                                     return_correct=True)
  assert row['n'] == 5
  assert [p['draws'] for p in row['ensemble']] == [1, 2, 3]
  for point, k in zip(row['ensemble'], (2, 3, 4)):
    assert point['accuracy'] == pytest.approx(k / 5), point
    _assert_wilson(point['ci95'], k, 5)
  # The row's own prediction is the mean of all draws: the n = 3 ensemble.
  assert row['accuracy'] == pytest.approx(0.8)
  _assert_wilson(row['ci95'], 4, 5)
  assert row['_correct'].tolist() == [True, True, True, True, False]
  assert row['per_draw_accuracy'] == pytest.approx(10 / 15) and row['num_draws'] == 3


def test_ensemble_sizes_are_independent_of_the_order_asked_and_deterministic_rows_have_none():
  images, labels = _indexed_images()
  row = evaluation.score_predictions(_fake_predict(), images, labels, 2, jax.random.key(0),
                                     stochastic=True, ensemble_sizes=(3, 1))
  assert [(p['draws'], p['accuracy']) for p in row['ensemble']] == [(3, pytest.approx(0.8)),
                                                                     (1, pytest.approx(0.4))]
  for stochastic, sizes in ((False, (1, 2, 3)), (True, ())):
    row = evaluation.score_predictions(_fake_predict(), images, labels, 2, jax.random.key(0),
                                       stochastic=stochastic, ensemble_sizes=sizes)
    assert 'ensemble' not in row, (stochastic, sizes)
    assert row['accuracy'] == pytest.approx(0.8)
    assert ('per_draw_accuracy' in row) == stochastic


# ----------------------------------------------------------------------------------------
# The tolerance curve of a minimum-perturbation row.

TOLERANCES = (0.0, 0.2, 0.25, 0.5, 0.625, 1.0)


def _perturbation_case():
  """Six 2x2x1 uint8 images and, per example, (pixel changes, correct on fresh draws, the
  attack's own success). Changes move pixels that are 0 or 255 by dyadic amounts, so the L2
  norms are exact in float32: 0.25, 0.625 (0.375 and 0.5), 0.125, 0.5, 0, 0.0625."""
  images = np.array([[[255, 0], [0, 17]],
                     [[255, 255], [0, 0]],
                     [[255, 0], [90, 0]],
                     [[255, 0], [0, 0]],
                     [[255, 3], [0, 0]],
                     [[255, 0], [0, 200]]], np.uint8)[..., None]
  case = [
      ({(0, 1): 0.25}, False, True),                   # broken at 0.25
      ({(1, 0): 0.375, (1, 1): 0.5}, False, True),     # broken at 0.625 (||x|| = sqrt 2)
      ({(0, 1): 0.125}, True, True),                   # the attack claims it; fresh draws not
      ({(0, 0): -0.5}, False, False),                  # broken at 0.5; the attack said failed
      ({}, False, True),                               # clean misclassified: x returned
      ({(1, 0): 0.0625}, True, True),                  # claimed, but robust on fresh draws
  ]
  x = data_lib.to_float(images)
  x_adv = x.copy()
  for i, (changes, _, _) in enumerate(case):
    for (r, c), d in changes.items():
      x_adv[i, r, c, 0] += np.float32(d)
  correct = np.array([c for _, c, _ in case])
  success = np.array([s for _, _, s in case])
  return images, x_adv, correct, success


def test_perturbation_fields_judge_on_fresh_draws_with_an_inclusive_tolerance():
  images, x_adv, correct, success = _perturbation_case()
  # The attack's batches of 4, the last padded with junk beyond n = 6.
  junk = np.full((2,) + x_adv.shape[1:], 0.77, np.float32)
  adv = [x_adv[:4], np.concatenate([x_adv[4:], junk])]
  fields, norms = attack_suite._perturbation_fields(adv, success, correct, images, 'l2', 6,
                                                    TOLERANCES, PIXELS)
  assert norms.dtype == np.float32
  assert norms.tolist() == [0.25, 0.625, 0.125, 0.5, 0.0, 0.0625]
  assert fields['success_rate'] == pytest.approx(4 / 6)          # ~correct: 0, 1, 3, 4
  assert fields['attack_success_rate'] == pytest.approx(5 / 6)   # the attack's claim
  # Broken examples only: 0.25, 0.625, 0.5, 0 -> 0.375 (over all six it would be 0.1875).
  assert fields['median_perturbation'] == pytest.approx(0.375)
  # Relative to ||x||: 0.25 / sqrt(1 + (17/255)^2), 0.625 / sqrt 2, 0.5, 0 -> the middle two.
  rel0 = 0.25 / (1 + (17 / 255)**2)**0.5
  assert fields['median_relative_perturbation'] == pytest.approx((rel0 + 0.625 / 2**0.5) / 2)
  curve = fields['tolerance_curve']
  assert [p['tolerance'] for p in curve] == list(TOLERANCES)
  # Robust at t unless broken with norm <= t: t=0 and 0.2 only the clean-misclassified one;
  # 0.25 adds example 0 (on the boundary), 0.5 example 3, 0.625 example 1.
  robust = [5, 5, 4, 3, 2, 2]
  for point, k in zip(curve, robust):
    assert point['accuracy'] == pytest.approx(k / 6), point
    _assert_wilson(point['ci95'], k, 6)


def test_perturbation_fields_without_tolerances_or_success_or_any_broken_example():
  images, x_adv, correct, _ = _perturbation_case()
  fields, norms = attack_suite._perturbation_fields([x_adv], None, correct, images, 'l2', 6, (),
                                                    PIXELS)
  assert 'tolerance_curve' not in fields and 'attack_success_rate' not in fields
  assert fields['success_rate'] == pytest.approx(4 / 6)
  fields, _ = attack_suite._perturbation_fields([x_adv], None, np.ones(6, bool), images, 'l2',
                                                6, (0.0, 1.0), PIXELS)
  assert fields['success_rate'] == 0.0 and fields['median_perturbation'] is None
  assert [p['accuracy'] for p in fields['tolerance_curve']] == [1.0, 1.0]
  # L-inf: the largest single change.
  _, norms = attack_suite._perturbation_fields([x_adv], None, correct, images, 'linf', 6, (),
                                               PIXELS)
  assert norms.tolist() == [0.25, 0.5, 0.125, 0.5, 0.0, 0.0625]


def test_paper_noise_is_the_mean_over_all_examples_in_the_normalised_space():
  # Two 1x2x1 images; the second unchanged (the attack failed, or it was already wrong).
  x = np.array([[[[0.5], [1.0]]], [[[0.2], [0.4]]]], np.float32)
  x_adv = x.copy()
  x_adv[0, 0, 0, 0] += 0.1
  x_adv[0, 0, 1, 0] -= 0.2
  mean, std = np.array([0.25], np.float32), np.array([0.5], np.float32)
  fields = attack_suite.paper_noise(x, x_adv, 'linf', (mean, std, 'normalised'))
  # Normalised: x0 = (0.5, 1.5), delta0 = (0.2, -0.4): max|delta| / max|x| = 0.4 / 1.5; the
  # second example counts as 0 in the mean over both.
  assert fields['paper_relative_noise'] == pytest.approx(0.4 / 1.5 / 2)
  assert fields['paper_absolute_noise'] == pytest.approx(0.4 / 2)
  fields = attack_suite.paper_noise(x, x_adv, 'l2', (mean, std, 'normalised'))
  rel = (0.2**2 + 0.4**2)**0.5 / (0.5**2 + 1.5**2)**0.5
  assert fields['paper_relative_noise'] == pytest.approx(rel / 2)
  assert fields['paper_noise_space'] == 'normalised'
  # In pixels the same perturbation is relatively smaller (no centring by the mean).
  pixels = attack_suite.paper_noise(x, x_adv, 'linf', PIXELS)
  assert pixels['paper_relative_noise'] == pytest.approx(0.2 / 1.0 / 2)


def test_the_paper_noise_space_follows_the_models_normalisation():
  lenet = models.create_model('lenet_like', num_classes=10, mean=(0.13,), std=(0.31,))
  mean, std, text = attack_suite._paper_noise_space(lenet)
  assert mean.tolist() == pytest.approx([0.13]) and std.tolist() == pytest.approx([0.31])
  assert 'mean/std' in text
  raw = models.create_model('lenet5_caffe', num_classes=10, normalize='none')
  assert attack_suite._paper_noise_space(raw)[2] == '[0, 1] pixels'


# ----------------------------------------------------------------------------------------
# Config validation.


def _eval_config(**overrides):
  c = config_utils.base_config()
  c.eval.update(**overrides)
  return c.eval


def test_parse_eval_config_accepts_valid_ensemble_sizes_and_tolerances():
  evaluators.parse_eval_config(_eval_config(num_draws=2, ensemble_sizes=(1, 2),
                                            tolerances=(0.0, 0.5)))


@pytest.mark.parametrize('overrides,message', [
    (dict(num_draws=2, ensemble_sizes=(5,)),
     r'eval\.ensemble_sizes\[0\]=5 exceeds eval\.num_draws=2'),
    (dict(num_draws=2, ensemble_sizes=(1, 3)),
     r'eval\.ensemble_sizes\[1\]=3 exceeds eval\.num_draws=2'),
    (dict(num_draws=4, ensemble_sizes=(0,)), r'eval\.ensemble_sizes\[0\]=0 must be finite and > 0'),
    (dict(num_draws=4, ensemble_sizes=(1.5,)),
     r'eval\.ensemble_sizes\[0\]=1\.5 must be an integer'),
    (dict(tolerances=(-0.1,)), r'eval\.tolerances\[0\]=-0\.1 must be finite and >= 0'),
    (dict(tolerances=(0.1, float('inf'))), r'eval\.tolerances\[1\]=inf must be finite'),
])
def test_parse_eval_config_names_the_bad_field(overrides, message):
  with pytest.raises(ValueError, match=message):
    evaluators.parse_eval_config(_eval_config(**overrides))


# ----------------------------------------------------------------------------------------
# Markdown.


def test_render_markdown_shows_the_tolerance_curve_and_the_ensemble_sizes():
  report = reporting.new_report(config={'seed': 0}, dataset='fake', model='small_cnn')
  rse = 'rse(sigma_init=0.2,sigma_inner=0.1)'
  report['rows'] = [
      {'defense': rse, 'attack': 'none', 'norm': None, 'epsilon': None, 'accuracy': 0.8,
       'ci95': [0.3755, 0.9638], 'n': 5, 'stochastic': True,
       'ensemble': [{'draws': 1, 'accuracy': 0.4, 'ci95': [0.1176, 0.7693]},
                    {'draws': 10, 'accuracy': 0.8, 'ci95': [0.3755, 0.9638]}]},
      {'defense': 'none', 'attack': 'cw_l2(steps=5)', 'norm': 'l2', 'epsilon': None,
       'accuracy': 1 / 3, 'ci95': [0.0968, 0.7], 'n': 6, 'success_rate': 2 / 3,
       'attack_success_rate': 5 / 6, 'median_perturbation': 0.375,
       'tolerance_curve': [{'tolerance': 0.0, 'accuracy': 5 / 6, 'ci95': [0.4365, 0.9699]},
                           {'tolerance': 0.25, 'accuracy': 4 / 6, 'ci95': [0.3, 0.9032]},
                           {'tolerance': 1, 'accuracy': 2 / 6, 'ci95': [0.0968, 0.7]}]},
      {'defense': rse, 'attack': 'pgd+eot4', 'norm': 'l2', 'epsilon': 0.5, 'accuracy': 0.6,
       'ci95': [0.2307, 0.8824], 'n': 5, 'stochastic': True,
       'ensemble': [{'draws': 2, 'accuracy': 0.6, 'ci95': [0.2307, 0.8824]}]},
  ]
  reporting.validate_report(report)
  md = reporting.render_markdown(report)
  assert md.index('## Robustness') < md.index('## Accuracy within a distortion tolerance') \
      < md.index('## Ensemble size')
  tolerance = md[md.index('## Accuracy within'):md.index('## Ensemble size')]
  assert '| defense | attack | norm | tolerance | accuracy | 95% CI |' in tolerance
  assert '| none | cw_l2(steps=5) | l2 | 0 | 83.33% | [43.65, 96.99] |' in tolerance
  assert '| none | cw_l2(steps=5) | l2 | 0.25 | 66.67% | [30.00, 90.32] |' in tolerance
  assert '| none | cw_l2(steps=5) | l2 | 1 | 33.33% | [9.68, 70.00] |' in tolerance
  # Only the row with a curve: its three points.
  assert sum(line.startswith('| none | cw_l2') for line in tolerance.splitlines()) == 3
  assert rse not in tolerance
  ensemble = md[md.index('## Ensemble size'):]
  assert '| defense | attack | ε | draws | accuracy | 95% CI |' in ensemble
  assert f'| {rse} | none | — | 1 | 40.00% | [11.76, 76.93] |' in ensemble
  assert f'| {rse} | none | — | 10 | 80.00% | [37.55, 96.38] |' in ensemble
  assert f'| {rse} | pgd+eot4 | 0.5 | 2 | 60.00% | [23.07, 88.24] |' in ensemble
  lines = [line for line in ensemble.splitlines() if line.startswith('| ')]
  assert len(lines) == 1 + 3 and all(line.startswith(f"| {rse} |") for line in lines[1:])

  for row in report['rows']:
    row.pop('ensemble', None)
    row.pop('tolerance_curve', None)
  md = reporting.render_markdown(report)
  assert 'distortion tolerance' not in md and '## Ensemble size' not in md


# ----------------------------------------------------------------------------------------
# End to end: a C&W row of the real suite.


@pytest.fixture(scope='module')
def cw_rows():
  """The clean and C&W rows of an untrained small_cnn on 12 random 8x8 images whose labels are
  the model's own predictions for the first 8 (clean accuracy exactly 8/12)."""
  model = models.create_model('small_cnn', num_classes=10)
  variables = models.init_variables(model, jax.random.key(0), (1, 8, 8, 1))
  images = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)
  pred = np.argmax(np.asarray(model.apply(variables, data_lib.to_float(images))), -1)
  labels = np.where(np.arange(12) < 8, pred, (pred + 1) % 10)
  c = config_utils.base_config()
  c.parallel.num_devices = 1
  c.eval.update(evaluators=('clean', 'attack_suite'), batch_size=8, defenses=('none',),
                attacks=('cw_l2(steps=5, search_steps=2, learning_rate=0.1, initial_const=10.0)',),
                norm='l2', epsilons=(), tolerances=(0.0, 1e-3, 10.0), checks=False)
  rows = evaluators.run_evaluators(evaluators.make_context(c, model, variables, images,
                                                           labels))['rows']
  clean, cw = rows
  assert clean['attack'] == 'none' and cw['attack'].startswith('cw_l2')
  return clean, cw


def test_cw_row_tolerance_curve_ends_at_the_row_accuracy(cw_rows):
  clean, cw = cw_rows
  assert clean['accuracy'] == pytest.approx(8 / 12) and cw['n'] == 12
  assert cw['accuracy'] < clean['accuracy']  # C&W broke correctly classified examples
  assert cw['success_rate'] == pytest.approx(1 - cw['accuracy'])
  curve = {p['tolerance']: p['accuracy'] for p in cw['tolerance_curve']}
  assert list(curve) == [0.0, 1e-3, 10.0]
  # Every L2 distortion of an 8x8x1 image in [0, 1] is <= 8: at 10 all broken ones count.
  assert curve[10.0] == cw['accuracy']
  # Within 1e-3 only the clean-misclassified examples are broken (breaking a correctly
  # classified one takes a real perturbation): the clean accuracy.
  assert curve[1e-3] == pytest.approx(8 / 12)


def test_cw_row_at_tolerance_zero_is_the_clean_accuracy(cw_rows):
  clean, cw = cw_rows
  assert cw['tolerance_curve'][0]['accuracy'] == pytest.approx(clean['accuracy'])
