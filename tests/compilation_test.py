"""advdef.compilation: the persistent compilation cache and the compile-time accounting."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from advdef import compilation
from advdef import reporting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
  monkeypatch.delenv('ADVDEF_COMPILATION_CACHE', raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  assert compilation.default_cache_dir() == os.path.join(str(tmp_path), 'advdef', 'jax')
  monkeypatch.delenv('XDG_CACHE_HOME')
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert compilation.default_cache_dir() == os.path.join(str(tmp_path / 'home'), '.cache',
                                                         'advdef', 'jax')
  monkeypatch.setenv('ADVDEF_COMPILATION_CACHE', str(tmp_path / 'mine'))
  assert compilation.default_cache_dir() == str(tmp_path / 'mine')
  for off in ('off', 'OFF', 'none', '0', ''):
    monkeypatch.setenv('ADVDEF_COMPILATION_CACHE', off)
    assert compilation.default_cache_dir() is None


def test_compile_timer_counts_compilations_only_while_active():
  outside = jax.jit(lambda x: jnp.sin(x) * 2.0)
  x5, x7, x3 = np.arange(5.0), np.arange(7.0), np.arange(3.0)  # Host arrays: no compiles.
  with compilation.CompileTimer() as timer:
    jax.block_until_ready(jax.jit(lambda x: jnp.cos(x) + 3.0)(x5))
    jax.block_until_ready(jax.jit(lambda x: jnp.tanh(x) - 1.0)(x7))
  jax.block_until_ready(outside(x3))
  summary = timer.summary()
  assert summary['compilations'] == 2
  assert summary['compile_seconds'] > 0 and summary['trace_seconds'] > 0
  assert summary['cache_hits'] == 0


_CHILD = r'''
import json, sys
import jax, jax.numpy as jnp, numpy as np
from advdef import compilation
used = compilation.enable_cache(sys.argv[1])
x = np.linspace(-1.0, 1.0, 64 * 64, dtype=np.float32).reshape(64, 64)
# Twenty matmuls, each followed by a reduction: about 40 kernels, which compile in well over
# the cache's 0.05 s threshold under the tests' fast-compile XLA settings too (a single QR took
# 0.04 s there).
def chain(x):
  for i in range(20):
    x = jnp.tanh(x @ x.T / 64.0 + 0.01 * i)
    x = x - 0.5 * x.mean(axis=i % 2, keepdims=True)
  return (x * x).sum()
with compilation.CompileTimer() as timer:
  value = float(jax.jit(chain)(x))
print(json.dumps(dict(timer.summary(), used=used, value=value)))
'''


def _child(cache):
  out = subprocess.run([sys.executable, '-c', _CHILD, cache], cwd=ROOT, capture_output=True,
                       text=True, check=True, env=dict(os.environ, PYTHONPATH=ROOT))
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_reads_the_program_from_the_cache(tmp_path):
  cache = str(tmp_path / 'cache')
  first = _child(cache)
  second = _child(cache)
  assert first['used'] == cache and first['cache_hits'] == 0
  assert os.listdir(cache)  # Something was written.
  assert second['cache_hits'] == 1 and second['compilations'] == 1
  assert second['value'] == first['value']  # The cache never changes results.
  off = _child('off')
  assert off['used'] is None and off['cache_hits'] == 0


def test_timing_line_reports_the_compile_share():
  line = reporting.timing_line({'wall_seconds': 100.0, 'train_seconds': 10.0,
                                'evaluate_seconds': 90.0, 'compile_seconds': 60.0,
                                'trace_seconds': 15.0, 'compilations': 40, 'cache_hits': 12})
  assert line == ('Wall time 100.0 s (training 10.0 s, evaluation 90.0 s), of which 75.0 s '
                  '(75%) tracing and compiling 40 programs, 12 of them read from the '
                  'persistent compilation cache.')


def test_jit_with_variables_matches_the_closure_and_shares_programs():
  from advdef import models
  from advdef import retrofit
  from advdef.evaluators import base
  model = models.create_model('small_cnn', num_classes=10)
  x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
  variables = models.init_variables(model, jax.random.key(1), (8, 8, 1))
  hook = retrofit.parse_defense('jump(kappa=0.1)').hook
  programs = {}
  fn = lambda logits_fn, x, k: logits_fn(x, k)
  a = base.jit_with_variables(model, variables, hook, fn, 'logits_on_jump', programs)
  b = base.jit_with_variables(model, variables, hook, fn, 'logits_on_jump', programs)
  assert list(programs) == ['logits_on_jump'] and a.func is b.func
  closure = retrofit.make_logits_fn(model, variables, hook)
  np.testing.assert_allclose(np.asarray(a(x, jax.random.key(2))),
                             np.asarray(closure(x, jax.random.key(2))), rtol=1e-6, atol=1e-6)


_EIGEN_SCRIPT = '''
import os, warnings
from advdef import compilation
if os.environ.get('INIT_FIRST'):
  import jax.numpy as jnp
  jnp.ones(2).block_until_ready()
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter('always')
  applied = compilation.prefer_eigen_convolutions()
print(applied, os.environ.get('XLA_FLAGS', ''), '|', len(caught))
'''


@pytest.mark.parametrize('env,applied,flags,warned', [
    ({}, 'True', '--xla_cpu_experimental_ynn_fusion_type=individual_dot', 0),
    ({'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=individual_convolution'}, 'False',
     '--xla_cpu_experimental_ynn_fusion_type=individual_convolution', 0),
    ({'ADVDEF_XLA_CPU_CONVOLUTIONS': 'ynnpack'}, 'False', '', 0),
    ({'INIT_FIRST': '1'}, 'False', '', 1),  # too late: the backend exists, so it says so
])
def test_prefer_eigen_convolutions_sets_the_flag_only_when_it_can_apply(env, applied, flags,
                                                                         warned):
  full = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'INIT_FIRST')}
  full.update(env, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  out = subprocess.run([sys.executable, '-c', _EIGEN_SCRIPT], env=full, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  got_applied, rest = out.stdout.strip().split(' ', 1)
  got_flags, got_warned = rest.rsplit('|', 1)
  assert (got_applied, got_flags.strip(), int(got_warned)) == (applied, flags, warned)


def test_prefer_eigen_convolutions_rejects_an_unknown_choice(monkeypatch):
  monkeypatch.setenv('ADVDEF_XLA_CPU_CONVOLUTIONS', 'mkl')
  with pytest.raises(ValueError, match="ADVDEF_XLA_CPU_CONVOLUTIONS='mkl'"):
    compilation.prefer_eigen_convolutions()
