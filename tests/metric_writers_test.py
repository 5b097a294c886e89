"""Tests for advdef.metric_writers: metrics.jsonl, TensorBoard files, config.json, progress bar."""

import json

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from advdef import metric_writers
from advdef.metric_writers import MetricWriter, ProgressBar, read_metrics, truncate_metrics_after


def _strip_time(rows):
  return [{k: v for k, v in r.items() if k != 'time'} for r in rows]


def test_jsonl_roundtrip(tmp_path):
  with MetricWriter(tmp_path, tensorboard=False) as writer:
    writer.write_scalars(1, {'train/loss': jnp.float32(2.5), 'train/accuracy': np.float64(0.25),
                             'lr': 0.1, 'examples': np.int64(128)})
    writer.write_scalars(jnp.asarray(2), {'train/loss': float('nan'), 'grad_norm': float('inf')})
  rows = read_metrics(tmp_path)
  assert _strip_time(rows) == [
      {'step': 1, 'train/loss': 2.5, 'train/accuracy': 0.25, 'lr': 0.1, 'examples': 128},
      # Non-finite values are written as null so every line is strict JSON.
      {'step': 2, 'train/loss': None, 'grad_norm': None},
  ]
  assert all(isinstance(r['time'], float) for r in rows)
  assert isinstance(rows[0]['examples'], int)
  for line in (tmp_path / 'metrics.jsonl').read_text().splitlines():
    json.loads(line, parse_constant=lambda c: pytest.fail(f'non-standard JSON constant {c}'))


def test_reserved_and_non_scalar_names_are_rejected(tmp_path):
  with MetricWriter(tmp_path, tensorboard=False) as writer:
    with pytest.raises(ValueError, match='reserved'):
      writer.write_scalars(1, {'step': 3})
    with pytest.raises(TypeError, match="'acc'.*scalar"):
      writer.write_scalars(1, {'acc': np.ones(3)})


def test_truncated_last_line_is_skipped_and_repaired(tmp_path):
  with MetricWriter(tmp_path, tensorboard=False) as writer:
    writer.write_scalars(1, {'loss': 1.0})
    writer.write_scalars(2, {'loss': 0.5})
  path = tmp_path / 'metrics.jsonl'
  with open(path, 'a') as f:
    f.write('{"step": 3, "time": 17.0, "lo')  # A kill in the middle of a write.
  assert [r['step'] for r in read_metrics(tmp_path)] == [1, 2]
  # A resumed writer cuts the fragment, so its first line is not glued onto it.
  with MetricWriter(tmp_path, tensorboard=False) as writer:
    writer.write_scalars(3, {'loss': 0.25})
  assert _strip_time(read_metrics(tmp_path)) == [
      {'step': 1, 'loss': 1.0}, {'step': 2, 'loss': 0.5}, {'step': 3, 'loss': 0.25}]


def test_corruption_in_the_middle_raises(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match=r'metrics.jsonl:2'):
    read_metrics(tmp_path)


def test_read_metrics_without_file(tmp_path):
  assert read_metrics(tmp_path) == []


def test_truncate_after_matches_uninterrupted_run(tmp_path):
  uninterrupted, resumed = tmp_path / 'a', tmp_path / 'b'
  with MetricWriter(uninterrupted, tensorboard=False) as writer:
    for step in range(1, 11):
      writer.write_scalars(step, {'loss': 1.0 / step})
  # Interrupted after step 7; the last checkpoint was at step 5.
  with MetricWriter(resumed, tensorboard=False) as writer:
    for step in range(1, 8):
      writer.write_scalars(step, {'loss': 1.0 / step})
  with MetricWriter(resumed, tensorboard=False) as writer:
    writer.truncate_after(5)
    for step in range(6, 11):
      writer.write_scalars(step, {'loss': 1.0 / step})
  assert _strip_time(read_metrics(resumed)) == _strip_time(read_metrics(uninterrupted))
  assert [r['step'] for r in read_metrics(resumed)] == list(range(1, 11))
  # The module-level function reports what it dropped and leaves no temporary files behind.
  assert truncate_metrics_after(resumed, 8) == 2
  assert sorted(p.name for p in resumed.iterdir()) == ['metrics.jsonl']


def test_tensorboard_event_file_created(tmp_path):
  with MetricWriter(tmp_path) as writer:
    writer.write_scalars(1, {'train/loss': 1.0})
    writer.truncate_after(0)  # Starts a new event file carrying the purge marker.
    writer.write_scalars(1, {'train/loss': 0.9})
  events = sorted((tmp_path / 'tensorboard').glob('events.out.tfevents*'))
  assert events and all(p.stat().st_size > 0 for p in events)


def test_config_json_keeps_the_nested_config_dict(tmp_path):
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict({'name': 'lenet_like', 'widths': (32, 64)})
  config.data = ml_collections.ConfigDict({'name': 'mnist', 'aug': {'flip': False}})
  config.seed = 0
  config.lr = 1e-3
  with MetricWriter(tmp_path, tensorboard=False) as writer:
    path = writer.write_hparams(config)
  assert path == tmp_path / 'config.json'
  assert json.loads(path.read_text()) == {
      'model': {'name': 'lenet_like', 'widths': [32, 64]},
      'data': {'name': 'mnist', 'aug': {'flip': False}}, 'seed': 0, 'lr': 0.001}
  assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json', 'metrics.jsonl']


def test_disabled_writer_writes_nothing(tmp_path):
  writer = MetricWriter(tmp_path / 'run', enabled=False)
  writer.write_scalars(1, {'loss': 1.0})
  assert writer.write_hparams({'a': 1}) is None
  writer.truncate_after(0)
  writer.close()
  assert not (tmp_path / 'run').exists()


def test_closed_writer_raises(tmp_path):
  writer = MetricWriter(tmp_path, tensorboard=False)
  writer.close()
  writer.close()  # Idempotent.
  with pytest.raises(RuntimeError, match='closed'):
    writer.write_scalars(1, {'loss': 1.0})


def test_progress_bar_disabled_is_a_no_op(capsys):
  with ProgressBar(100, initial=10, batch_size=64, enabled=False) as bar:
    for _ in range(5):
      bar.update(1, loss=0.5)
  assert capsys.readouterr().err == ''


def test_progress_bar_enabled_shows_throughput(monkeypatch, capsys):
  monkeypatch.setattr(metric_writers.sys.stderr, 'isatty', lambda: True, raising=False)
  bar = ProgressBar(20, initial=5, batch_size=128, desc='train')
  assert bar.enabled
  for _ in range(3):
    bar.update(1, loss=0.5)
  bar._bar.refresh()  # tqdm redraws at most every 0.1 s; force it for the assertion.
  bar.close()
  err = capsys.readouterr().err
  assert 'train' in err and '8/20' in err and 'loss=0.5' in err
