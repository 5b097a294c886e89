"""Resumable evaluation (advdef.evaluators.results): a rerun after lost or unfinished entries
computes only those and writes the rows and checks of an uninterrupted run; a changed eval
config, other weights or other PRNG keys reuse nothing."""

import json
import pathlib
import shutil
import textwrap

import jax
import numpy as np
import pytest

from advdef import evaluation
from advdef import experiment
from advdef import sweep
from advdef import training
from advdef.evaluators import attack_suite
from advdef.evaluators import checks as checks_lib
from advdef.evaluators import results

ROOT = pathlib.Path(__file__).resolve().parents[1]
RSE = 'rse(sigma_init=0.2, sigma_inner=0.1)'


def _config():
  """The quick start's smoke config, cut to two defenses (one stochastic, whose keys matter)
  and two attacks (one minimum-perturbation) so that the test stays near a minute."""
  module, _ = sweep.load_config_module(str(ROOT / 'configs' / 'quickstart.py'))
  config = module.get_config('smoke')
  config.train.num_epochs = 1
  config.report.tensorboard = False
  config.eval.defenses = ('none', RSE)
  config.eval.attacks = ('pgd(steps=3)', 'ifgsm_min(steps=3)')
  config.parallel.num_devices = 1  # as on the 2-core machine the quick start targets
  return config


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """An uninterrupted run: (config, workdir, report)."""
  config = _config()
  workdir = tmp_path_factory.mktemp('uninterrupted')
  report = experiment.run(config, str(workdir), progress=False)
  return config, workdir, report


@pytest.fixture(scope='module')
def trained(finished):
  """(prepared, variables) of the finished run, for evaluations without the training loop."""
  config, workdir, _ = finished
  prepared = experiment.prepare(config)
  variables = training.load_variables(
      str(workdir), prepared.model, prepared.splits.info,
      expected_fingerprint=training.fingerprint(config, prepared.splits.info))
  return prepared, variables


def _copy(workdir, to):
  shutil.copytree(workdir, to)
  (to / 'report.json').unlink()
  return to


def _entries(workdir, pattern='*.json'):
  return sorted(p.name for p in (workdir / results.RESULTS_DIR).glob(pattern))


def _without_seconds(rows):
  return [{k: v for k, v in r.items() if k != 'seconds'} for r in rows]


class Computed:
  """Counts what evaluators compute: clean rows, attack rows (defense, attack, eps), checks."""

  def __init__(self, monkeypatch, interrupt_after_clean_rows=None):
    self.clean, self.attack_rows, self.checks = [], [], []
    score, attack_row, run_checks = (evaluation.score_predictions, attack_suite._attack_row,
                                     checks_lib.run_checks)

    def counting_score(*args, **kwargs):
      if not kwargs.get('return_correct'):  # The Scorer's calls return correctness.
        if len(self.clean) == interrupt_after_clean_rows:
          raise KeyboardInterrupt
        self.clean.append(True)
      return score(*args, **kwargs)

    def counting_attack_row(e, defense, plan, eps, *args):
      self.attack_rows.append((defense.label, plan.label, eps))
      return attack_row(e, defense, plan, eps, *args)

    def counting_checks(e, defense, *args, **kwargs):
      self.checks.append(defense.label)
      return run_checks(e, defense, *args, **kwargs)

    monkeypatch.setattr(evaluation, 'score_predictions', counting_score)
    monkeypatch.setattr(attack_suite, '_attack_row', counting_attack_row)
    monkeypatch.setattr(checks_lib, 'run_checks', counting_checks)


def test_the_uninterrupted_run_stores_one_entry_per_row_and_per_checks(finished):
  config, workdir, report = finished
  attack_rows = [r for r in report['rows'] if r['attack'] not in ('none', 'worst_case')]
  assert len(_entries(workdir, 'clean-*')) == 2
  # none: PGD at 2 epsilons, IFGSM-min; RSE: EOT-PGD and its transfer from none at each
  # epsilon, EOT-IFGSM-min and its transfer.
  assert len(_entries(workdir, 'attack_suite-*')) == len(attack_rows) == 9
  assert len(_entries(workdir, 'checks-*')) == 2
  assert len(_entries(workdir, 'model_summary-*')) == 1
  assert not list((workdir / results.RESULTS_DIR).glob('.*'))  # no temporary files left
  entry = json.loads(next((workdir / results.RESULTS_DIR).glob('attack_suite-1-0-0-*')).read_text())
  assert entry['key']['attack'] == 'pgd(steps=3)+eot2' and entry['key']['epsilon'] == 0.1
  assert entry['arrays']['correct']['shape'] == [32]
  assert len(entry['prng']['attack']) == 2 and len(entry['prng']['score']) == 2


def test_rerun_computes_only_the_missing_entries_and_equals_the_uninterrupted_run(
    finished, tmp_path, monkeypatch):
  config, workdir, reference = finished
  resumed = _copy(workdir, tmp_path / 'resumed')
  # Lost, as after a kill: a clean row; the stochastic defense's second attack row, scored
  # with the scorer's second key (the reused first row must advance the counter); the
  # undefended model's checks, computed from reused rows. (Lost entries of the stochastic
  # defense's checks would cost ~15 s more of compiling; their keys come the same way.)
  lost = ('clean-0-*', 'attack_suite-1-0-1-*', 'checks-0-*')
  for pattern in lost:
    name, = _entries(resumed, pattern)
    (resumed / results.RESULTS_DIR / name).unlink()
  computed = Computed(monkeypatch)
  report = experiment.run(config, str(resumed), progress=False)
  rse = 'rse(sigma_init=0.2,sigma_inner=0.1)'
  assert len(computed.clean) == 1
  assert computed.attack_rows == [(rse, 'pgd(steps=3)+eot2', 0.3)]
  assert computed.checks == ['none']
  assert _without_seconds(report['rows']) == _without_seconds(reference['rows'])
  assert report['checks'] == reference['checks']
  assert report['model_summary'] == reference['model_summary']
  recomputed = {('none', 'none', None), (rse, 'pgd(steps=3)+eot2', 0.3)}
  for got, want in zip(report['rows'], reference['rows']):
    if (got['defense'], got['attack'], got['epsilon']) not in recomputed:
      assert got.get('seconds') == want.get('seconds')  # reused rows keep their time
  # The recomputed entries are those of the uninterrupted run: same PRNG keys, same values.
  assert _entries(resumed) == _entries(workdir)
  for pattern in lost:
    (name,) = _entries(workdir, pattern)
    want = json.loads((workdir / results.RESULTS_DIR / name).read_text())
    got = json.loads((resumed / results.RESULTS_DIR / name).read_text())
    assert got['prng'] == want['prng']
    for entry in (got, want):
      entry['value'].pop('seconds', None)
    assert got == want
  on_disk = json.loads((resumed / 'report.json').read_text())
  want = json.loads((workdir / 'report.json').read_text())
  assert _without_seconds(on_disk['rows']) == _without_seconds(want['rows'])
  assert on_disk['checks'] == want['checks']


def test_interrupted_then_rerun_and_changed_config_or_weights(finished, trained, tmp_path,
                                                             monkeypatch):
  config, workdir, reference = finished
  prepared, variables = trained
  rerun = str(_copy(workdir, tmp_path / 'rerun'))
  clean_only = _config()
  clean_only.eval.evaluators = ('clean',)  # eval.evaluators is not part of the fingerprint
  computed = Computed(monkeypatch)
  report = experiment.evaluate_run(clean_only, prepared, variables, workdir=rerun)
  assert computed.clean == []
  assert report['rows'] == [r for r in reference['rows'] if r['attack'] == 'none']

  clean_only.eval.num_draws = 5  # another eval config: nothing is reused
  with monkeypatch.context() as m:
    first = Computed(m, interrupt_after_clean_rows=1)
    with pytest.raises(KeyboardInterrupt):  # stopped after one row, as by a pre-emption
      experiment.evaluate_run(clean_only, prepared, variables, workdir=rerun)
  assert len(first.clean) == 1
  computed = Computed(monkeypatch)
  report = experiment.evaluate_run(clean_only, prepared, variables, workdir=rerun)
  assert len(computed.clean) == 1  # only the row the interruption lost
  assert [r['num_draws'] for r in report['rows'] if r['stochastic']] == [5]
  assert len(_entries(pathlib.Path(rerun), 'clean-*')) == 4  # the old config's stay

  nudged = jax.tree_util.tree_map(lambda v: v * (1 + 1e-6), variables)
  computed = Computed(monkeypatch)
  experiment.evaluate_run(clean_only, prepared, nudged, workdir=rerun)
  assert len(computed.clean) == 2  # other weights: nothing is reused


def test_store_checks_prng_keys_and_skips_unreadable_entries(tmp_path, capsys):
  store = results.Store(str(tmp_path), 'fp', active=True)
  key = {'defense': 'none', 'epsilon': 0.1}
  prng = {'attack': jax.random.key(3)}
  correct = np.array([True, False, True])
  row = {'accuracy': np.float32(0.5), 'ci95': (0.25, 0.75), 'n': np.int64(3)}
  entry = store.put('attack_suite', (0, 1, 2), key, prng, row, {'correct': correct})
  assert entry.value == {'accuracy': 0.5, 'ci95': [0.25, 0.75], 'n': 3}  # as read back
  got = store.get('attack_suite', (0, 1, 2), key, prng)
  assert got.value == entry.value
  np.testing.assert_array_equal(got.arrays['correct'], correct)
  assert got.arrays['correct'].dtype == bool
  assert store.get('attack_suite', (0, 1, 2), key, {'attack': jax.random.key(4)}) is None
  assert 'other PRNG keys' in capsys.readouterr().err
  assert store.get('attack_suite', (0, 1, 2), dict(key, epsilon=0.2), prng) is None
  assert results.Store(str(tmp_path), 'other', active=True).get(
      'attack_suite', (0, 1, 2), key, prng) is None
  pathlib.Path(store.path('attack_suite', (0, 1, 2), key)).write_text('{"format": 1, "val')
  assert store.get('attack_suite', (0, 1, 2), key, prng) is None
  assert 'unreadable' in capsys.readouterr().err


def test_inactive_store_changes_nothing(tmp_path):
  store = results.Store(None, None, active=False)
  row, correct = {'accuracy': np.float32(0.5)}, np.array([True])
  entry = store.put('clean', (0,), {}, {'score': jax.random.key(0)}, row, {'correct': correct})
  assert entry.value is row and entry.arrays['correct'] is correct
  assert store.get('clean', (0,), {}, {'score': jax.random.key(0)}) is None
  assert list(tmp_path.iterdir()) == []


_WORKER = textwrap.dedent('''
    import os, sys, types
    process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    from advdef import config_utils, parallel
    config = config_utils.base_config()
    config.parallel.update(distributed=True, coordinator_address=f'127.0.0.1:{port}',
                           num_processes=2, process_id=process_id)
    assert parallel.initialize_distributed(config)
    import jax
    import numpy as np
    from advdef.evaluators import results

    def context(main_workdir):
      # What open_store reads of an evaluators.base.Context; a workdir on process 0 only.
      return types.SimpleNamespace(
          config=config, memo={}, workdir=main_workdir if jax.process_index() == 0 else None,
          images=np.zeros((4, 8, 8, 1), np.uint8), labels=np.arange(4),
          variables={'w': np.ones(3, np.float32)})

    key, prng = {'defense': 'none'}, {'score': jax.random.key(1)}
    store = results.open_store(context(workdir))
    assert store.active
    assert store.get('clean', (0,), key, prng) is None
    store.put('clean', (0,), key, prng, {'accuracy': 0.5}, {'correct': np.array([True, False])})
    entry = results.open_store(context(workdir)).get('clean', (0,), key, prng)
    assert entry.value == {'accuracy': 0.5}, entry
    assert entry.arrays['correct'].tolist() == [True, False]
    assert not results.open_store(context(None)).active
    print('ok', jax.process_index(), flush=True)
    jax.distributed.shutdown()
''')


def test_every_process_reuses_what_process_0_stored(tmp_path, run_processes):
  # Processes that skipped different work would wait forever in each other's collectives.
  workdir = tmp_path / 'workdir'
  results_of = run_processes(_WORKER, lambda i, port: [i, port, workdir])
  for i, (returncode, log) in enumerate(results_of):
    assert returncode == 0 and f'ok {i}' in log, f'process {i}:\n{log[-3000:]}'
  assert len(list((workdir / results.RESULTS_DIR).glob('*.json'))) == 1  # by process 0 alone
