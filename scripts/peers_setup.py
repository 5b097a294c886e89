"""Installs and starts scripts/benchmark.py's peers: python scripts/peers_setup.py [--no-foolbox]

Run alone, it prepares the peer environments (once; later runs reuse them), starts each peer,
prints their status as JSON and exits 1 if one is unavailable. benchmark.py imports it.

Peers are installed here, never into advdef's environment (nor requirements.txt):
  <bench home>/torch-venv      a clean venv: torch==2.13.0, torchattacks==3.5.1 (--no-deps:
                               its torchvision requirement is never imported and would pin
                               another torch), numpy, scipy, tqdm, requests.
  <bench home>/foolbox-site    foolbox==3.3.4, eagerpy==0.30.0, GitPython (--no-deps, via
                               pip --target), appended to sys.path of a worker process that
                               runs benchmark.py with `--foolbox-worker`, so foolbox drives the
                               very jax/flax/advdef of this environment.
<bench home> is $ADVDEF_BENCH_HOME or ~/.cache/advdef-bench. A peer that cannot be installed
gets a status saying why. On a machine without a GPU the installer refuses a CUDA build of
torch (pip's dry-run report is checked first).

Each peer is a subprocess answering JSON commands line by line: scripts/peer_reference.py
--serve in the torch venv, and benchmark.py --foolbox-worker.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import jax

TORCH_VERSION = '2.13.0'
TORCHATTACKS_VERSION = '3.5.1'
FOOLBOX_PINS = ('foolbox==3.3.4', 'eagerpy==0.30.0', 'GitPython==3.1.45', 'gitdb==4.0.12',
                'smmap==5.0.2')
PEER_TIMEOUT_S = 1800.0

SCRIPTS = Path(__file__).resolve().parent
PEER_REFERENCE = SCRIPTS / 'peer_reference.py'
# The foolbox worker is the benchmark itself, so it builds the very models advdef times.
FOOLBOX_WORKER = SCRIPTS / 'benchmark.py'


def num_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def bench_home(args) -> Path:
  return Path(args.bench_home or os.environ.get('ADVDEF_BENCH_HOME') or
              '~/.cache/advdef-bench').expanduser()


def _run(cmd, timeout=1200, env=None) -> tuple[int, str]:
  try:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return p.returncode, (p.stdout + p.stderr)[-3000:]
  except subprocess.TimeoutExpired:
    return 124, f'timed out after {timeout} s: {" ".join(map(str, cmd))}'
  except OSError as e:
    return 1, f'{type(e).__name__}: {e}'


def _last_line(text: str) -> str:
  lines = [l for l in text.strip().splitlines() if l.strip()]
  return lines[-1][:300] if lines else ''


def ensure_torch_env(home: Path, on_gpu: bool) -> tuple[str | None, dict[str, Any]]:
  """Creates (once) the clean torch venv. Returns (python path or None, status)."""
  venv = home / 'torch-venv'
  py = venv / 'bin' / 'python'
  marker = venv / 'advdef-bench.json'
  status: dict[str, Any] = {'env': str(venv)}
  if marker.exists() and py.exists():
    state = json.loads(marker.read_text())
    if (state.get('torch_pin') == TORCH_VERSION and
        state.get('torchattacks') == TORCHATTACKS_VERSION):
      status.update(state, installed_now=False)
      return str(py), status
  t0 = time.time()
  if not (marker.exists() and py.exists()):
    shutil.rmtree(venv, ignore_errors=True)
    home.mkdir(parents=True, exist_ok=True)
    rc, out = _run([sys.executable, '-m', 'venv', str(venv)], timeout=300)
    if rc:
      return None, dict(status, reason=f'python -m venv failed: {_last_line(out)}')
    pip = [str(py), '-m', 'pip', 'install', '--disable-pip-version-check']
    # Resolve first: without a GPU, refuse a CUDA build of torch (GBs of nvidia wheels).
    report = venv / 'torch-dry-run.json'
    rc, out = _run(pip + ['--dry-run', '--quiet', '--report', str(report),
                          f'torch=={TORCH_VERSION}'], timeout=600)
    if rc:
      return None, dict(status, reason=f'pip cannot resolve torch=={TORCH_VERSION}: '
                                       f'{_last_line(out)}')
    items = json.loads(report.read_text()).get('install', [])
    names = [i['metadata']['name'].lower() for i in items]
    torch_item = [i for i in items if i['metadata']['name'].lower() == 'torch']
    torch_v = torch_item[0]['metadata']['version'] if torch_item else '?'
    cuda = any(n.startswith('nvidia') for n in names) or ('+cpu' not in torch_v and
                                                          sys.platform == 'linux')
    if cuda and not on_gpu:
      return None, dict(status, reason=(
          f'pip resolves torch=={TORCH_VERSION} to a CUDA build ({torch_v}, '
          f'{sum(n.startswith("nvidia") for n in names)} nvidia wheels) on a machine without a '
          'GPU; refused. Put the CPU wheel (torch-2.13.0+cpu) in pip\'s find-links and rerun.'))
    rc, out = _run(pip + [f'torch=={TORCH_VERSION}', 'numpy'], timeout=1800)
    if rc:
      return None, dict(status, reason=f'pip install torch=={TORCH_VERSION} failed: '
                                       f'{_last_line(out)}')
    rc, out = _run([str(py), '-c', 'import torch; print(torch.__version__)'], timeout=300)
    if rc:
      return None, dict(status, reason=f'import torch failed: {_last_line(out)}')
    marker.write_text(json.dumps({'torch_pin': TORCH_VERSION, 'torch': out.strip()}))
  state = json.loads(marker.read_text())
  pip = [str(py), '-m', 'pip', 'install', '--disable-pip-version-check']
  rc, out = _run(pip + ['--no-deps', f'torchattacks=={TORCHATTACKS_VERSION}'], timeout=600)
  if rc == 0:
    rc, out = _run(pip + ['scipy', 'tqdm', 'requests'], timeout=900)
  if rc == 0:
    rc, out = _run([str(py), '-c', 'import torchattacks; print(torchattacks.__version__)'])
  if rc == 0:
    state['torchattacks'] = TORCHATTACKS_VERSION
    state.pop('torchattacks_error', None)
  else:
    state['torchattacks_error'] = _last_line(out)
  marker.write_text(json.dumps(state))
  status.update(state, installed_now=True, install_seconds=time.time() - t0)
  return str(py), status


def ensure_foolbox_site(home: Path) -> tuple[str | None, dict[str, Any]]:
  """pip --target install of foolbox + eagerpy (no deps) for the foolbox worker."""
  site = home / 'foolbox-site'
  marker = site / 'advdef-bench.json'
  status: dict[str, Any] = {'site': str(site)}
  if marker.exists() and json.loads(marker.read_text()).get('pins') == list(FOOLBOX_PINS):
    return str(site), dict(status, installed_now=False)
  shutil.rmtree(site, ignore_errors=True)
  t0 = time.time()
  rc, out = _run([sys.executable, '-m', 'pip', 'install', '--disable-pip-version-check',
                  '--no-deps', '--target', str(site), *FOOLBOX_PINS], timeout=900)
  if rc:
    return None, dict(status, reason=f'pip install {" ".join(FOOLBOX_PINS)} failed: '
                                     f'{_last_line(out)}')
  marker.write_text(json.dumps({'pins': list(FOOLBOX_PINS)}))
  return str(site), dict(status, installed_now=True, install_seconds=time.time() - t0)


class PeerError(RuntimeError):
  pass


class Peer:
  """A JSON-lines subprocess (peer_reference.py --serve, or the benchmark's foolbox worker)."""

  def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None):
    self.name = name
    self.stderr = tempfile.TemporaryFile(mode='w+')
    self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self.stderr, text=True, bufsize=1, env=env)
    self.lines: queue.Queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.put(line)
    self.lines.put(None)

  def stderr_tail(self) -> str:
    self.stderr.seek(0)
    return self.stderr.read()[-2000:]

  def ask(self, timeout=PEER_TIMEOUT_S, **cmd) -> dict[str, Any]:
    if self.proc.poll() is not None:
      raise PeerError(f'{self.name} exited ({self.proc.returncode}): {self.stderr_tail()}')
    self.proc.stdin.write(json.dumps(cmd) + '\n')
    self.proc.stdin.flush()
    while True:
      try:
        line = self.lines.get(timeout=timeout)
      except queue.Empty:
        raise PeerError(f'{self.name}: no answer to {cmd["op"]} within {timeout} s') from None
      if line is None:
        raise PeerError(f'{self.name} exited: {self.stderr_tail()}')
      line = line.strip()
      if line.startswith('{'):
        out = json.loads(line)
        break
    if not out.get('ok'):
      raise PeerError(f'{self.name}: {out.get("error")}')
    return out

  def close(self):
    try:
      if self.proc.poll() is None:
        self.ask(op='quit', timeout=30)
        self.proc.wait(timeout=30)
    except Exception:
      self.proc.kill()


class Peers:
  """The torch server and the foolbox worker, with a status line for each peer."""

  def __init__(self, args, on_gpu: bool):
    self.torch: Peer | None = None
    self.foolbox: Peer | None = None
    self.status: dict[str, dict[str, Any]] = {}
    if args.skip_peers:
      for name in ('torch', 'torchattacks', 'foolbox'):
        self.status[name] = {'status': 'skipped', 'reason': '--skip-peers'}
      return
    home = bench_home(args)
    threads = num_cores()
    py, st = ensure_torch_env(home, on_gpu)
    if py is None:
      self.status['torch'] = dict(st, status='unavailable')
      self.status['torchattacks'] = {'status': 'unavailable', 'reason': 'no torch environment'}
    else:
      env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
      if args.torch_omp_wait_policy != 'default':
        env['OMP_WAIT_POLICY'] = args.torch_omp_wait_policy.upper()
      env.pop('PYTHONPATH', None)
      self.torch = Peer('torch', [py, str(PEER_REFERENCE), '--serve', '--threads', str(threads),
                                  '--device', 'cuda' if on_gpu else 'cpu'], env=env)
      try:
        info = self.torch.ask(op='info', timeout=600)
        self.status['torch'] = dict(st, status='ok', omp_wait_policy=args.torch_omp_wait_policy,
                                    **{k: v for k, v in info.items() if k != 'ok'})
        if 'torchattacks' in info:
          self.status['torchattacks'] = {'status': 'ok', 'version': info['torchattacks']}
        else:
          self.status['torchattacks'] = {
              'status': 'unavailable',
              'reason': info.get('torchattacks_error') or st.get('torchattacks_error')}
      except PeerError as e:
        self.status['torch'] = dict(st, status='unavailable', reason=str(e))
        self.status['torchattacks'] = {'status': 'unavailable', 'reason': 'torch failed'}
        self.torch = None
    if args.no_foolbox:
      self.status['foolbox'] = {'status': 'skipped', 'reason': '--no-foolbox'}
      return
    site, st = ensure_foolbox_site(home)
    if site is None:
      self.status['foolbox'] = dict(st, status='unavailable')
      return
    env = dict(os.environ, ADVDEF_BENCH_FOOLBOX_SITE=site)
    self.foolbox = Peer('foolbox', [sys.executable, str(FOOLBOX_WORKER), '--foolbox-worker'],
                        env=env)
    try:
      info = self.foolbox.ask(op='info', timeout=600)
      self.status['foolbox'] = dict(st, status='ok', **{k: v for k, v in info.items()
                                                          if k != 'ok'})
    except PeerError as e:
      self.status['foolbox'] = dict(st, status='unavailable', reason=str(e))
      self.foolbox = None

  def usable(self, name: str) -> bool:
    return self.status.get(name, {}).get('status') == 'ok'

  def why_not(self, name: str) -> str:
    st = self.status.get(name, {})
    return f'{st.get("status", "unavailable")}: {st.get("reason", "")}'.strip(': ')

  def close(self):
    for p in (self.torch, self.foolbox):
      if p is not None:
        p.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The peer options, shared by this script and benchmark.py."""
  parser.add_argument('--no-foolbox', action='store_true', help='skip the foolbox peer only')
  parser.add_argument('--bench-home', default=None,
                      help='where peer environments live ($ADVDEF_BENCH_HOME, '
                           '~/.cache/advdef-bench)')
  parser.add_argument('--torch-omp-wait-policy', default='passive',
                      choices=('passive', 'active', 'default'),
                      help='OMP_WAIT_POLICY of the PyTorch process. PASSIVE (default): its '
                           'OpenMP threads sleep instead of spinning at barriers; with the '
                           'spinning default PyTorch runs 10-100x slower on a machine shared '
                           'with other processes (measured). Use active on a dedicated one.')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  add_arguments(parser)
  args = parser.parse_args(argv)
  args.skip_peers = False
  peers = Peers(args, on_gpu=jax.default_backend() == 'gpu')
  peers.close()
  print(json.dumps(peers.status, indent=1, default=str), flush=True)
  return 0 if all(s['status'] in ('ok', 'skipped') for s in peers.status.values()) else 1


if __name__ == '__main__':
  sys.exit(main())
