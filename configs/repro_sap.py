"""python -m advdef.main --config=configs/repro_sap.py:dense,cpu --workdir=/tmp/repro/sap/dense

The experiments of the SAP reproduction (Dhillon et al., ICLR 2018), one config per experiment.
`python scripts/reproduce.py --paper=sap --scale=cpu --root=DIR` runs them in order, each in
DIR/sap/<experiment>, and writes the SAP section of RESULTS.md (advdef.reproduce.sap). Each
runs alone as well:

  python -m advdef.main --config=configs/repro_sap.py:<experiment>,<scale>[,base=<workdir>] \
      --workdir=DIR/sap/<experiment>

base: the workdir of the trained run the experiment evaluates (its `needs`, `dense` or
`adv`); SAP is applied at inference to that checkpoint, with no fine-tuning, as the paper does.

Experiments (`experiments(scale)` lists them with what each needs):
  dense             train the dense ResNet-20 (pre-activation, input BatchNorm: the network of
                    configs/cifar10_resnet20.py), clean accuracy on the whole test split
  fgsm_<model>      the paper's protocol: FGSM at lambda in {1, 2, 4, 8, 16, 32, 64}/255 on
                    the mean of `grad_samples` sampled input gradients (EOT; the authors used
                    100), predictions = mean softmax of `draws` draws (the authors: 100); the
                    suite adds FGSM transferred from the dense model; clean accuracy and
                    calibration (ECE, reliability bins) on the same examples
  adaptive_<model>  the adaptive suite at 8/255: APGD-DLR, EOT-PGD (margin loss, restarts),
                    AutoAttack-rand (full scale), transfer from the dense model (added by the
                    suite); the sanity checks where affordable (cpu: dense only; full: all
                    but BPDA). cpu: SAP-10/20/50 get EOT-PGD only
  bpda_<model>      BPDA through SAP: the same forward pass, the identity as SAP's backward
                    pass (`sap(..., gradient=identity)`), attacked with EOT-PGD (margin; also
                    APGD-DLR at full scale)
  adv, fgsm_adv*, adaptive_adv*   the paper's ADV model (80% clean + 20% FGSM at lambda = 2
                    from the previous epoch's model) and ADV+SAP-100 (full scale only)
  eval              smoke only: dense, SAP-100 and its BPDA variant under the paper's FGSM
                    and EOT-PGD at every lambda, in one run
<model>: dense, sap10, sap20, sap50, sap100 (SAP-k: k% of each layer's units drawn,
sap(frac=k/100), after every ReLU).

Scales:
  smoke  small_cnn on fake 8x8 data, 1 epoch, 8 examples, 2 draws: the plumbing, for CI
  cpu    ../shared/data/cifar10_partial.npz (4,660 train / 846 test real images), ResNet-20
         for 10 epochs (batch 128, lr 0.1, x0.1 at 2/3 and 13/15 of the run, the paper's
         schedule shape); 100 test images attacked, 8 gradient samples, 8 prediction draws,
         10-step EOT-PGD with 8 draws; estimated 47 minutes on 2 quiet CPU cores, 79 on
         one effective core (`scripts/reproduce.py --paper=sap --scale=cpu --list`); the
         suite's own BPDA row for SAP (added after the runs in RESULTS.md) is about 8 of them
  full   the paper's setting: TFDS cifar10 (50,000 / 10,000), 150 epochs, batch 512, lr 0.5
         (x0.1 at 100 and 130); FGSM on the whole test set with 100 gradient samples and
         100 prediction draws; the adaptive suite on 1,000 images (100 steps, 20 draws;
         PGD with 2 restarts on SAP, 5 on the deterministic models, which also get Square
         with 5,000 queries); for a GPU, estimated ~15 h (per-pass costs assumed)
"""

from __future__ import annotations

import importlib.util
import os

from advdef import config_utils
from advdef import validate

SCALES = ('smoke', 'cpu', 'full')
LAMBDAS = (1, 2, 4, 8, 16, 32, 64)  # FGSM budgets of the paper, in 0-255 pixel units
ADAPTIVE_LAMBDA = 8                 # the adaptive suite's budget (Athalye et al.'s 8/255)
SAP_PERCENTS = (10, 20, 50, 100)
BPDA = 'gradient=identity'

# Per scale: examples attacked (FGSM / adaptive), Monte-Carlo draws of the prediction,
# gradient samples of the paper's FGSM, the adaptive suite's draws, steps and restarts.
SETTINGS = {
    'smoke': dict(fgsm_examples=8, adaptive_examples=8, draws=2, grad_samples=2, eot=2,
                  steps=2, restarts=1, dense_steps=2, dense_restarts=1, batch_size=8,
                  autoattack=False, checks=False),
    'cpu': dict(fgsm_examples=100, adaptive_examples=100, draws=8, grad_samples=8, eot=8,
                steps=10, restarts=1, dense_steps=20, dense_restarts=2, batch_size=25,
                autoattack=False, checks=False),
    'full': dict(fgsm_examples=0, adaptive_examples=1000, draws=100, grad_samples=100, eot=20,
                 steps=100, restarts=2, dense_steps=100, dense_restarts=5, batch_size=100,
                 autoattack=True, checks=True),
}
CPU_EPOCHS = 10


def sap_spec(percent: int, *extra: str) -> str:
  args = ', '.join((f'frac={percent / 100}',) + extra)
  return f'sap({args})'


def _model_defense(model: str) -> str:
  """'dense' / 'adv' -> 'none'; 'sap10' / 'adv_sap100' -> 'sap(frac=0.1)' / 'sap(frac=1.0)'."""
  tail = model.split('_')[-1]
  return sap_spec(int(tail[3:])) if tail.startswith('sap') else 'none'


def _adaptive_attacks(s, *, stochastic: bool, strongest: bool) -> tuple[str, ...]:
  """The adaptive suite's attack specs (EOT is added by the suite for stochastic defenses)."""
  steps, restarts = ((s['steps'], s['restarts']) if stochastic
                     else (s['dense_steps'], s['dense_restarts']))
  pgd = f'pgd(steps={steps}, loss=margin' + (f', restarts={restarts})' if restarts > 1 else ')')
  attacks = [pgd]
  if strongest or not stochastic or s['autoattack']:
    # First: the checks' convergence test reruns the first iterative attack with steps and
    # draws doubled (and restarts, which APGD does not take).
    attacks.insert(0, f'apgd(loss=dlr, steps={steps})')
  if s['autoattack']:  # AutoAttack-rand brings its own EOT (20 draws)
    # Deterministic models: Square, AutoAttack-standard's score-based part (its targeted
    # APGD cannot be listed: eval.attacks validation traces it on a 3-class toy model).
    attacks.append(f'autoattack_rand(steps={steps})' if stochastic else 'square(queries=5000)')
  return tuple(attacks)


def experiments(scale: str) -> list[dict]:
  """The experiments of `scale`, in run order.

  Each: name; kind ('train', 'fgsm', 'adaptive', 'eval'); model (the trained network evaluated,
  'dense' or 'adv'); needs (the experiment whose workdir is `base`, '' for training);
  defenses and attacks (spec strings); what (one line).
  """
  validate.check_choice('scale', scale, SCALES)
  s = SETTINGS[scale]
  out = [dict(name='dense', kind='train', model='dense', needs='', defenses=('none',),
              attacks=(), what='train the dense ResNet-20; clean accuracy')]
  models = ['dense'] + [f'sap{k}' for k in SAP_PERCENTS]

  def add(name, kind, defenses, attacks, what, base='dense'):
    out.append(dict(name=name, kind=kind, model=base, needs=base, defenses=tuple(defenses),
                    attacks=tuple(attacks), what=what))

  fgsm_what = "the paper's FGSM, lambda = 1..64"
  if scale == 'smoke':  # the plumbing in one evaluation run: each SAP program compiles ~5 s
    add('eval', 'eval', ['none', sap_spec(100), sap_spec(100, BPDA)],
        ('fgsm',) + _adaptive_attacks(s, stochastic=True, strongest=False),
        "dense, SAP-100 and BPDA: the paper's FGSM and EOT-PGD at every lambda")
    return out
  for m in models:
    add(f'fgsm_{m}', 'fgsm', [_model_defense(m)], ('fgsm',), f'{fgsm_what}: {m}')
  for m in models:
    stochastic = m != 'dense'
    add(f'adaptive_{m}', 'adaptive', [_model_defense(m)],
        _adaptive_attacks(s, stochastic=stochastic, strongest=m == 'sap100'),
        f'the adaptive suite at 8/255: {m}')
  bpda_models = ['sap100'] if scale == 'cpu' else [f'sap{k}' for k in SAP_PERCENTS]
  for m in bpda_models:
    add(f'bpda_{m}', 'adaptive', [sap_spec(int(m[3:]), BPDA)],
        _adaptive_attacks(s, stochastic=True, strongest=False)[-1:] if scale == 'cpu' else
        _adaptive_attacks(s, stochastic=True, strongest=True)[:2],
        f'BPDA (identity backward pass through SAP): {m}')
  if scale == 'full':
    out.append(dict(name='adv', kind='train', model='adv', needs='', defenses=('none',),
                    attacks=(), what='train the ADV model (80% clean, 20% FGSM at lambda=2)'))
    for m in ('adv', 'adv_sap100'):
      add(f'fgsm_{m}', 'fgsm', [_model_defense(m)], ('fgsm',), f'{fgsm_what}: {m}', base='adv')
      add(f'adaptive_{m}', 'adaptive', [_model_defense(m)],
          _adaptive_attacks(s, stochastic=m != 'adv', strongest=True),
          f'the adaptive suite at 8/255: {m}', base='adv')
  return out


def _base_network(scale: str, recipe: str):
  """configs/cifar10_resnet20.py's pre-activation ResNet-20 (the SAP paper's network)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cifar10_resnet20.py')
  spec = importlib.util.spec_from_file_location('cifar10_resnet20', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  variant = 'source=npz,cpu' if scale == 'cpu' else 'source=tfds'
  return module.get_config(f'arch=preact,recipe={recipe},{variant},clean')


def get_config(arg=None):
  name, scale, base = config_utils.experiment_arg(arg, SCALES, 'dense', 'repro_sap')
  by_name = {e['name']: e for e in experiments(scale)}
  if name not in by_name:
    raise ValueError(f'repro_sap: unknown experiment {name!r} at scale {scale}; valid: '
                     f'{", ".join(by_name)}')
  exp, s = by_name[name], SETTINGS[scale]
  c = _base_network(scale, 'adv' if exp['model'] == 'adv' and exp['kind'] == 'train'
                    else 'standard')
  if scale == 'cpu':
    c.train.update(num_epochs=CPU_EPOCHS, boundaries=(CPU_EPOCHS * 100 / 150,
                                                     CPU_EPOCHS * 130 / 150))
  elif scale == 'smoke':
    c.data.update(source='fake', name='digits_shaped', fake_shape=(8, 8, 1),
                  fake_num_train=64, fake_num_test=16)
    c.model.update(name='small_cnn', normalize='dataset')
    c.train.update(num_epochs=1, batch_size=32, learning_rate=0.05, boundaries=(),
                   schedule='cosine', log_every_steps=1, augment=dict(crop_padding=0, flip=False))
  c.train.checkpoint_every_epochs = 1
  c.eval.update(batch_size=s['batch_size'], num_draws=s['draws'], norm='linf',
                defenses=exp['defenses'], attacks=exp['attacks'], checks=False, adaptive=True)
  if exp['kind'] == 'train':
    c.eval.update(evaluators=('clean',), num_examples=0, epsilons=())
    return c
  if not base:
    raise ValueError(f'repro_sap:{name} evaluates a trained model: give base=<workdir of the '
                     f'{exp["needs"]} run>')
  c.train.checkpoint = base
  if exp['kind'] in ('fgsm', 'eval'):
    n = s['fgsm_examples']
    c.eval.update(evaluators=('clean', 'attack_suite'), num_examples=n, num_attack_examples=n,
                  epsilons=tuple(lam / 255 for lam in LAMBDAS), eot_samples=s['grad_samples'])
  else:
    n = s['adaptive_examples']
    c.eval.update(evaluators=('attack_suite',), num_examples=n, num_attack_examples=n,
                  epsilons=(ADAPTIVE_LAMBDA / 255,), eot_samples=s['eot'],
                  checks=(s['checks'] and not name.startswith('bpda'))
                  or exp['defenses'] == ('none',))
  return c
