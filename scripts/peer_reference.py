"""The PyTorch side of scripts/benchmark.py: the same models, timed in eager PyTorch.

Runs in the benchmark's isolated virtual environment (torch==2.13.0, torchattacks; never in
advdef's own environment) as a subprocess that answers JSON commands, one per line on stdin,
with one JSON line each on stdout (logs go to stderr). benchmark.py drives it so that the
repeats of advdef and of the peers are interleaved round by round: load from other processes
then hits every candidate alike.

  python scripts/peer_reference.py --serve --threads 2 [--device cpu|cuda]
  python scripts/peer_reference.py --selftest          # tiny end-to-end run, prints JSON

Commands ({"op": ...}):
  info                          versions, threads, device.
  setup   id, task, model, ...  builds a timed task and runs it once (the warm-up);
                                answers {"first_call_s", "params"}.
  time    id, [n]               runs the task n times; answers {"seconds": [...]}.
  check   model, weights, inputs, expected
                                loads advdef's weights (an .npz written by benchmark.py),
                                runs the eval-mode forward and answers the largest
                                difference from advdef's logits: the proof that both sides
                                time the same network.
  quit

Tasks (all float32, the model in eval mode for attacks and in train mode for training):
  pgd_plain          L-inf PGD written out in PyTorch: uniform random start, `steps` steps of
                     step_size * sign(grad of the summed cross-entropy), projection on the
                     eps ball and the [0, 1] box; the gradient is taken w.r.t. the input only.
  pgd_torchattacks   torchattacks.PGD with the same eps, step size and steps.
  eot_torchattacks   torchattacks.EOTPGD (eot_iter sequential gradient passes per step) on the
                     model with RSE noise before every convolution.
  train              one SGD step (momentum, coupled weight decay) with BatchNorm in train
                     mode: gather a batch of uint8 images by a permutation slice, scale to
                     [0, 1], forward, cross-entropy, backward, update.

Models mirror advdef.models exactly (the `check` command verifies the logits):
  resnet20    PreActResNet20: input BatchNorm without scale, conv3 16, 3 stages x 3
              pre-activation units (16/32/64), BN, ReLU, global average pool, fc. Stride-2
              convolutions pad like XLA's SAME (one row/column at the bottom/right).
  lenet_like  conv5 10, pool, ReLU, conv5 20, pool, ReLU, flatten, dropout 0.5, fc120, fc90,
              fc; inputs normalized by (x - mean) / std inside the model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------
# Models.


class Noise(nn.Module):
  """RSE's noise layer: x + sigma * N(0, I), active in every mode; identity when sigma is 0."""

  def __init__(self, sigma: float):
    super().__init__()
    self.sigma = float(sigma)

  def forward(self, x):
    return x + self.sigma * torch.randn_like(x) if self.sigma else x


class SameConv(nn.Module):
  """A bias-free k x k convolution with XLA's SAME padding (asymmetric when strided)."""

  def __init__(self, c_in, c_out, kernel, stride=1, noise=0.0):
    super().__init__()
    self.noise = Noise(noise)
    total = max(kernel - stride, 0) if stride > 1 else kernel - 1
    self.pad = (total // 2, total - total // 2)
    symmetric = self.pad[0] == self.pad[1]
    self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=self.pad[0] if symmetric else 0,
                          bias=False)
    self.explicit_pad = not symmetric

  def forward(self, x):
    x = self.noise(x)
    if self.explicit_pad:
      lo, hi = self.pad
      x = F.pad(x, (lo, hi, lo, hi))
    return self.conv(x)


def _bn(c):
  # Flax BatchNorm(momentum=0.9, epsilon=2e-5) as in advdef's PreActResNet20.
  return nn.BatchNorm2d(c, eps=2e-5, momentum=0.1)


class PreActUnit(nn.Module):

  def __init__(self, c_in, c_out, stride, project, noise):
    super().__init__()
    self.bn1 = _bn(c_in)
    self.conv1 = SameConv(c_in, c_out, 3, stride, noise)
    self.bn2 = _bn(c_out)
    self.conv2 = SameConv(c_out, c_out, 3, 1, noise)
    self.proj = SameConv(c_in, c_out, 1, stride, noise) if project else None

  def forward(self, x):
    a = F.relu(self.bn1(x))
    h = self.conv2(F.relu(self.bn2(self.conv1(a))))
    return h + (self.proj(a) if self.proj is not None else x)


class PreActResNet20(nn.Module):

  def __init__(self, num_classes=10, depth=20, sigma_init=0.0, sigma_inner=0.0):
    super().__init__()
    self.bn_data = nn.BatchNorm2d(3, eps=2e-5, momentum=0.1, affine=False)
    self.bn_data_bias = nn.Parameter(torch.zeros(3))  # Flax: use_scale=False, use_bias=True.
    self.conv0 = SameConv(3, 16, 3, 1, sigma_init)
    n = (depth - 2) // 6
    c_in = 16
    self.units = nn.ModuleDict()
    for stage, c_out in enumerate((16, 32, 64)):
      for unit in range(n):
        stride = 2 if (stage > 0 and unit == 0) else 1
        self.units[f'stage{stage + 1}_unit{unit + 1}'] = PreActUnit(c_in, c_out, stride,
                                                                    unit == 0, sigma_inner)
        c_in = c_out
    self.bn_final = _bn(64)
    self.fc = nn.Linear(64, num_classes)

  def forward(self, x):
    x = self.bn_data(x) + self.bn_data_bias.view(1, -1, 1, 1)
    x = self.conv0(x)
    for unit in self.units.values():
      x = unit(x)
    x = F.relu(self.bn_final(x))
    return self.fc(x.mean(dim=(2, 3)))


class LeNetLike(nn.Module):

  def __init__(self, num_classes=10, mean=(0.0,), std=(1.0,), in_channels=1):
    super().__init__()
    self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
    self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
    self.conv1 = nn.Conv2d(in_channels, 10, 5)
    self.conv2 = nn.Conv2d(10, 20, 5)
    self.dropout = nn.Dropout(0.5)
    self.fc1 = nn.LazyLinear(120)
    self.fc2 = nn.Linear(120, 90)
    self.fc3 = nn.Linear(90, num_classes)

  def forward(self, x):
    x = (x - self.mean) / self.std
    x = F.relu(F.max_pool2d(self.conv1(x), 2))
    x = F.relu(F.max_pool2d(self.conv2(x), 2))
    x = self.dropout(x.flatten(1))
    x = F.relu(self.fc1(x))
    x = F.relu(self.fc2(x))
    return self.fc3(x)


def build_model(spec: dict, device) -> nn.Module:
  name = spec['model']
  h, w, c = spec['shape']
  if name == 'resnet20':
    rse = spec.get('rse') or (0.0, 0.0)
    model = PreActResNet20(spec.get('num_classes', 10), spec.get('depth', 20), *rse)
  elif name == 'lenet_like':
    if spec.get('rse'):
      raise ValueError('rse is only wired for resnet20 here')
    model = LeNetLike(spec.get('num_classes', 10), spec.get('mean', (0.0,)),
                      spec.get('std', (1.0,)), c)
  else:
    raise ValueError(f'no PyTorch mirror of model {name!r}')
  model = model.to(device)
  with torch.no_grad():
    model(torch.zeros(1, c, h, w, device=device))  # Materialises the lazy layer.
  return model


def count_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------
# advdef weights -> PyTorch (for the equivalence check).


def load_advdef_weights(model: nn.Module, spec: dict, arrays: dict) -> None:
  """Copies advdef's variables ('params/<path>/kernel', 'batch_stats/<path>/mean', ...)."""
  name = spec['model']
  state = {}

  def conv(path, module_path, bias=False):
    kernel = arrays[f'params/{path}/kernel']                      # HWIO
    state[f'{module_path}.weight'] = np.transpose(kernel, (3, 2, 0, 1))
    if bias:
      state[f'{module_path}.bias'] = arrays[f'params/{path}/bias']

  def bn(path, module_path, scale=True):
    if scale:
      state[f'{module_path}.weight'] = arrays[f'params/{path}/scale']
    state[f'{module_path}.bias'] = arrays[f'params/{path}/bias']
    state[f'{module_path}.running_mean'] = arrays[f'batch_stats/{path}/mean']
    state[f'{module_path}.running_var'] = arrays[f'batch_stats/{path}/var']

  def dense(path, module_path, kernel=None):
    kernel = arrays[f'params/{path}/kernel'] if kernel is None else kernel
    state[f'{module_path}.weight'] = kernel.T
    state[f'{module_path}.bias'] = arrays[f'params/{path}/bias']

  if name == 'resnet20':
    state['bn_data.running_mean'] = arrays['batch_stats/bn_data/mean']
    state['bn_data.running_var'] = arrays['batch_stats/bn_data/var']
    state['bn_data_bias'] = arrays['params/bn_data/bias']
    conv('conv0', 'conv0.conv')
    for unit_name, unit in model.units.items():
      bn(f'{unit_name}/bn1', f'units.{unit_name}.bn1')
      bn(f'{unit_name}/bn2', f'units.{unit_name}.bn2')
      conv(f'{unit_name}/conv1', f'units.{unit_name}.conv1.conv')
      conv(f'{unit_name}/conv2', f'units.{unit_name}.conv2.conv')
      if unit.proj is not None:
        conv(f'{unit_name}/proj', f'units.{unit_name}.proj.conv')
    bn('bn_final', 'bn_final')
    dense('fc', 'fc')
  elif name == 'lenet_like':
    conv('conv1', 'conv1', bias=True)
    conv('conv2', 'conv2', bias=True)
    # advdef flattens NHWC (h, w, c); PyTorch flattens NCHW (c, h, w): reorder fc1's rows.
    k = arrays['params/fc1/kernel']
    c = model.conv2.out_channels
    hw = int(round(math.sqrt(k.shape[0] // c)))
    k = k.reshape(hw, hw, c, -1).transpose(2, 0, 1, 3).reshape(k.shape[0], -1)
    dense('fc1', 'fc1', kernel=k)
    dense('fc2', 'fc2')
    dense('fc3', 'fc3')
  else:
    raise ValueError(name)
  current = model.state_dict()
  missing = [k for k in current if k not in state and not k.endswith('num_batches_tracked')
             and k not in ('mean', 'std')]
  if missing:
    raise ValueError(f'no advdef weights for {missing}')
  for k, v in state.items():
    if tuple(current[k].shape) != tuple(v.shape):
      raise ValueError(f'{k}: PyTorch shape {tuple(current[k].shape)} vs advdef {v.shape}')
    current[k].copy_(torch.from_numpy(np.ascontiguousarray(v)))


# ------------------------------------------------------------------------------------------
# Timed tasks.


def _sync(device):
  if device.type == 'cuda':
    torch.cuda.synchronize()


def pgd_plain(model, x, y, eps, step_size, steps):
  """L-inf PGD with a random start; gradients w.r.t. the input only."""
  x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp_(0.0, 1.0)
  lower, upper = (x - eps).clamp(min=0.0), (x + eps).clamp(max=1.0)
  for _ in range(steps):
    x_adv.requires_grad_(True)
    loss = F.cross_entropy(model(x_adv), y, reduction='sum')
    grad, = torch.autograd.grad(loss, x_adv)
    with torch.no_grad():
      x_adv = torch.minimum(torch.maximum(x_adv + step_size * grad.sign(), lower), upper)
  return x_adv.detach()


class Task:
  """A callable run once per timing, built from a setup command."""

  def __init__(self, spec: dict, device):
    self.spec = spec
    self.device = device
    torch.manual_seed(spec.get('seed', 0))
    h, w, c = spec['shape']
    b = spec['batch']
    g = torch.Generator().manual_seed(spec.get('seed', 0))
    self.model = build_model(spec, device)
    self.params = count_params(self.model)
    task = spec['task']
    num_classes = spec.get('num_classes', 10)
    if task == 'train':
      n = spec.get('dataset_size', 4 * b)
      self.images = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8).to(device)
      self.labels = torch.randint(0, num_classes, (n,), generator=g).to(device)
      self.perm = torch.randperm(n, generator=g).to(device)
      self.steps_per_epoch = n // b
      self.step = 0
      self.model.train()
      self.opt = torch.optim.SGD(self.model.parameters(), lr=spec.get('lr', 0.1),
                                 momentum=spec.get('momentum', 0.9),
                                 weight_decay=spec.get('weight_decay', 5e-4))
      self.fn = self._train_step
    else:
      self.model.eval()
      self.x = torch.rand((b, c, h, w), generator=g).to(device)
      self.y = torch.randint(0, num_classes, (b,), generator=g).to(device)
      eps, alpha, steps = spec['eps'], spec['step_size'], spec['steps']
      if task == 'pgd_plain':
        self.fn = lambda: pgd_plain(self.model, self.x, self.y, eps, alpha, steps)
      elif task == 'pgd_torchattacks':
        import torchattacks
        atk = torchattacks.PGD(self.model, eps=eps, alpha=alpha, steps=steps, random_start=True)
        self.fn = lambda: atk(self.x, self.y)
      elif task == 'eot_torchattacks':
        import torchattacks
        atk = torchattacks.EOTPGD(self.model, eps=eps, alpha=alpha, steps=steps,
                                  eot_iter=spec['eot'], random_start=True)
        self.fn = lambda: atk(self.x, self.y)
      else:
        raise ValueError(f'unknown task {task!r}')

  def _train_step(self):
    b = self.spec['batch']
    s = self.step % self.steps_per_epoch
    idx = self.perm[s * b:(s + 1) * b]
    x = self.images[idx].float().mul_(1.0 / 255.0)
    y = self.labels[idx]
    logits = self.model(x)
    loss = F.cross_entropy(logits, y)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    self.step += 1
    return loss.detach(), (logits.detach().argmax(1) == y).float().mean()

  def run(self) -> float:
    _sync(self.device)
    t0 = time.perf_counter()
    self.fn()
    _sync(self.device)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------
# The server.


def info(device, threads) -> dict:
  out = {'torch': torch.__version__, 'threads': torch.get_num_threads(),
         'requested_threads': threads, 'device': str(device),
         'python': sys.version.split()[0], 'mkldnn': torch.backends.mkldnn.is_available()}
  try:
    import torchattacks
    out['torchattacks'] = torchattacks.__version__
  except Exception as e:  # Reported, not fatal: the plain loop still runs.
    out['torchattacks_error'] = f'{type(e).__name__}: {e}'
  if device.type == 'cuda':
    out['device_name'] = torch.cuda.get_device_name(device)
    out['tf32'] = {'matmul': torch.backends.cuda.matmul.allow_tf32,
                   'cudnn': torch.backends.cudnn.allow_tf32}
  return out


def check(cmd, device) -> dict:
  spec = dict(cmd, task='check')
  model = build_model(spec, device).eval()
  with np.load(cmd['weights']) as z:
    arrays = {k: z[k] for k in z.files}
  load_advdef_weights(model, spec, arrays)
  with np.load(cmd['inputs']) as z:
    x_nhwc, expected = z['x'], z['logits']
  x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))).to(device)
  with torch.no_grad():
    logits = model(x).cpu().numpy()
  return {'max_abs_diff': float(np.max(np.abs(logits - expected))),
          'max_abs_logit': float(np.max(np.abs(expected))), 'params': count_params(model)}


def serve(device, threads, stdin=sys.stdin, stdout=sys.stdout):
  tasks: dict[str, Task] = {}
  for line in stdin:
    line = line.strip()
    if not line:
      continue
    try:
      cmd = json.loads(line)
      op = cmd['op']
      if op == 'quit':
        print(json.dumps({'ok': True}), file=stdout, flush=True)
        return
      if op == 'info':
        out = info(device, threads)
      elif op == 'setup':
        t0 = time.perf_counter()
        task = Task(cmd, device)
        build = time.perf_counter() - t0
        first = task.run()
        tasks[cmd['id']] = task
        out = {'first_call_s': first, 'build_s': build, 'params': task.params}
      elif op == 'time':
        task = tasks[cmd['id']]
        out = {'seconds': [task.run() for _ in range(int(cmd.get('n', 1)))]}
      elif op == 'drop':
        tasks.pop(cmd['id'], None)
        out = {}
      elif op == 'check':
        out = check(cmd, device)
      else:
        raise ValueError(f'unknown op {op!r}')
      out['ok'] = True
    except Exception as e:  # Answer with the error; the benchmark prints it in its row.
      out = {'ok': False, 'error': f'{type(e).__name__}: {e}',
             'traceback': traceback.format_exc(limit=4)}
    print(json.dumps(out), file=stdout, flush=True)


def selftest(device, threads) -> dict:
  """Each task once at a tiny size (shape checks for this file's own tests and debugging)."""
  results = {'info': info(device, threads)}
  base = dict(shape=(32, 32, 3), batch=2, eps=8 / 255, step_size=2 / 255, steps=2)
  for model in ('resnet20', 'lenet_like'):
    shape = (32, 32, 3) if model == 'resnet20' else (28, 28, 1)
    for task in ('pgd_plain', 'pgd_torchattacks', 'train'):
      spec = dict(base, model=model, shape=shape, task=task)
      try:
        t = Task(spec, device)
        results[f'{model}/{task}'] = {'seconds': t.run(), 'params': t.params}
      except Exception as e:
        results[f'{model}/{task}'] = {'error': f'{type(e).__name__}: {e}'}
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--serve', action='store_true', help='answer JSON commands on stdin')
  parser.add_argument('--selftest', action='store_true', help='tiny run of every task')
  parser.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)))
  parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  device = torch.device(args.device)
  if device.type == 'cuda':
    # Same precision as advdef's float32 run: no TF32 in matmuls or convolutions.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
  if args.serve:
    serve(device, args.threads)
  else:
    print(json.dumps(selftest(device, args.threads), indent=1))


if __name__ == '__main__':
  main()
