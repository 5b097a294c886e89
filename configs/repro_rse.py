"""python -m advdef.main --config=configs/repro_rse.py:plain,cpu --workdir=/tmp/repro/rse/plain

The experiments of the RSE reproduction (Liu et al., "Towards Robust Neural Networks via Random
Self-ensemble", ECCV 2018), one config per experiment. `python scripts/reproduce.py
--paper=rse --scale=cpu --root=DIR` runs them in order, each in DIR/rse/<experiment>, and
writes the RSE section of RESULTS.md (advdef.reproduce.rse). Each runs alone as well:

  python -m advdef.main --config=configs/repro_rse.py:<experiment>,<scale>[,base=<workdir>] \
      --workdir=DIR/rse/<experiment>

base: the workdir of the trained run the experiment evaluates (its `needs`).

Models (VGG-16 as in the authors' BayesianDefense vgg_rse.py: 13 conv blocks, global average
pool, one linear layer; inputs in [0, 1] with no normalisation):
  plain    trained without noise; evaluated undefended and with the noise layers at inference
           only (the paper's "random noise at inference" baseline: rse(...) retrofitted)
  rse      noisy training (sigma_init = 0.2 on the input, sigma_inner = 0.1 before every other
           convolution, the authors' values) and the self-ensemble at inference
  pgd_at   PGD adversarial training at 8/255 (Madry et al.), the paper's strongest baseline

Experiments (`experiments(scale)` lists them with what each needs):
  plain, rse, pgd_at   train; clean accuracy on the whole test split, for RSE at every
                       ensemble size n in {1, 5, 10, 20, 50} (the first n of 50 draws)
  l2_<model>           C&W L2 (minimum perturbation; on the noisy models with one draw per
                       step, the authors' attack, and with EOT; and crafted on the noiseless
                       network) with robust accuracy at every distortion tolerance in
                       TOLERANCES, judged on fresh draws of the defense's own 50-draw
                       ensemble; PGD-L2 at eps = 0.5 (EOT, and transfer from the noiseless
                       network)
  linf_<model>         the adaptive suite at L-inf 8/255: EOT-PGD (margin loss) beside the
                       authors' one-draw-per-step PGD, APGD-DLR, transfer from the noiseless
                       network, AutoAttack-rand (full scale); attacked accuracy at every
                       ensemble size
  eval                 smoke only: the plain model undefended and with noise at inference,
                       C&W and PGD-L2, in one run (smoke trains only the plain model)
<model>: plain (evaluated as 'none' and as noise at inference), rse, pgd_at.

Scales:
  smoke  small_cnn on fake 8x8 data, 1 epoch, 8 examples, 2 draws: the plumbing, for CI
  cpu    ../shared/data/cifar10_partial.npz (4,660 train / 846 test real images); VGG-16 at a
         quarter of the width (16..128 channels, `model.kwargs.width_divisor=4`); 15 epochs
         of SGD (momentum 0.9, wd 5e-4, batch 128) at lr 0.05 (the authors: 0.01 for 200
         epochs; a larger rate for the short schedule) divided by 10 at 40%, 70% and 90% of
         the run (the authors' stage shape, 80/60/40/20 epochs); PGD-AT with 2 steps of
         2.5 * eps / 2 (Madry: 7 steps) for 8 epochs; 100 test images attacked; C&W with
         4 binary-search rounds of 30 Adam steps, 4 EOT draws; PGD 10 steps, 8 EOT draws;
         estimated ~55 minutes on 2 quiet CPU cores (`scripts/reproduce.py --paper=rse
         --scale=cpu --list`; training rate calibrated on the runs in RESULTS.md, which took
         2.8 h of runs, 1.7 h of wall time with two runners in parallel, on 2 cores shared
         with other jobs). No hyperparameter is tuned: every value above is fixed in
         advance, so no validation split is needed and the test images choose nothing.
  full   the paper's setting: TFDS cifar10 (50,000 / 10,000), VGG-16 at full width, 200
         epochs, lr 0.01 (x0.1 after 80, 140, 180 epochs), PGD-AT 7 steps; 1,000 images
         attacked; C&W 9 rounds of 1,000 steps with 10 EOT draws; PGD 100 steps, 20 EOT
         draws; AutoAttack-rand; for a GPU, estimated by `--list` (per-pass costs assumed)
"""

from __future__ import annotations

import importlib.util
import os

from advdef import config_utils
from advdef import validate

SCALES = ('smoke', 'cpu', 'full')
RSE = 'rse(sigma_init=0.2, sigma_inner=0.1)'
LINF_EPS = 8 / 255
L2_EPS = 0.5
# C&W distortion tolerances (L2, [0, 1] pixels of a 32x32x3 image): from below a typical
# undefended minimum (~0.1-0.2) to beyond a typical robust one.
TOLERANCES = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
ENSEMBLE_SIZES = (1, 5, 10, 20, 50)
MODELS = ('plain', 'rse', 'pgd_at')

SETTINGS = {
    'smoke': dict(examples=8, draws=2, ensemble=(1, 2), eot_linf=2, eot_l2=2, steps=2,
                  cw_steps=3, cw_rounds=2, batch_size=8, epochs=1, at_epochs=1, at_steps=1,
                  autoattack=False),
    'cpu': dict(examples=100, draws=50, ensemble=ENSEMBLE_SIZES, eot_linf=8, eot_l2=4,
                steps=10, cw_steps=30, cw_rounds=4, batch_size=50, epochs=15, at_epochs=8,
                at_steps=2, autoattack=False),
    'full': dict(examples=1000, draws=50, ensemble=ENSEMBLE_SIZES, eot_linf=20, eot_l2=10,
                 steps=100, cw_steps=1000, cw_rounds=9, batch_size=100, epochs=200,
                 at_epochs=200, at_steps=7, autoattack=True),
}


def _defenses(model: str) -> tuple[str, ...]:
  """What each trained model is evaluated as."""
  return {'plain': ('none', RSE), 'rse': (RSE,), 'pgd_at': ('none',)}[model]


def _attacks(s, norm: str) -> tuple[str, ...]:
  steps = s['steps']
  if norm == 'l2':
    return (f'cw_l2(steps={s["cw_steps"]}, search_steps={s["cw_rounds"]}, learning_rate=0.01)',
            f'pgd(steps={steps}, loss=margin)')
  attacks = [f'pgd(steps={steps}, loss=margin)', f'apgd(loss=dlr, steps={steps})']
  if s['autoattack']:
    attacks.append(f'autoattack_rand(steps={steps})')
  return tuple(attacks)


def experiments(scale: str) -> list[dict]:
  """The experiments of `scale`, in run order (see configs/repro_sap.py for the fields)."""
  validate.check_choice('scale', scale, SCALES)
  s = SETTINGS[scale]
  # Smoke: one training and one evaluation (undefended and noise at inference) cover the
  # plumbing; noisy and adversarial training are the same code with another config field.
  out = [dict(name=m, kind='train', model=m, needs='', defenses=_defenses(m) if m == 'rse'
              else ('none',), attacks=(), what=f'train the {m} VGG-16; clean accuracy')
         for m in (MODELS[:1] if scale == 'smoke' else MODELS)]
  if scale == 'smoke':
    out.append(dict(name='eval', kind='l2', model='plain', needs='plain',
                    defenses=('none', RSE), attacks=_attacks(s, 'l2'),
                    what='the plumbing: C&W tolerance curve and PGD-L2, plain and noise'))
    return out
  for norm, what in (('l2', 'C&W L2 tolerance curve and PGD-L2 at 0.5'),
                     ('linf', 'the adaptive suite at L-inf 8/255')):
    for m in MODELS:
      out.append(dict(name=f'{norm}_{m}', kind=norm, model=m, needs=m,
                      defenses=_defenses(m), attacks=_attacks(s, norm), what=f'{what}: {m}'))
  return out


def _base_network(scale: str, plain: bool):
  """configs/cifar10_vgg16.py's RSE VGG-16."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cifar10_vgg16.py')
  spec = importlib.util.spec_from_file_location('cifar10_vgg16', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  variant = 'source=npz' if scale == 'cpu' else 'source=tfds'
  return module.get_config(f'{variant},clean' + (',plain' if plain else ''))


def get_config(arg=None):
  name, scale, base = config_utils.experiment_arg(arg, SCALES, 'rse', 'repro_rse')
  by_name = {e['name']: e for e in experiments(scale)}
  if name not in by_name:
    raise ValueError(f'repro_rse: unknown experiment {name!r} at scale {scale}; valid: '
                     f'{", ".join(by_name)}')
  exp, s = by_name[name], SETTINGS[scale]
  trained = exp['model']
  c = _base_network(scale, plain=trained != 'rse')
  epochs = s['at_epochs'] if trained == 'pgd_at' else s['epochs']
  if scale == 'cpu':
    c.model.kwargs.width_divisor = 4
    c.train.update(num_epochs=epochs, learning_rate=0.05,
                   boundaries=tuple(round(f * epochs, 2) for f in (0.4, 0.7, 0.9)))
  elif scale == 'full':
    c.train.update(num_epochs=epochs)
  else:
    c.data.update(source='fake', name='digits_shaped', fake_shape=(8, 8, 1),
                  fake_num_train=64, fake_num_test=16)
    c.model.update(name='small_cnn', normalize='none', kwargs={})
    c.train.update(num_epochs=1, batch_size=32, learning_rate=0.05, boundaries=(),
                   schedule='cosine', log_every_steps=1, augment=dict(crop_padding=0, flip=False))
  if trained == 'pgd_at':
    c.train.recipe = (f'pgd_at(eps={LINF_EPS}, steps={s["at_steps"]}, '
                      f'step_size={2.5 * LINF_EPS / s["at_steps"]})')
  c.train.checkpoint_every_epochs = 1
  c.eval.update(batch_size=s['batch_size'], num_draws=s['draws'], ensemble_sizes=s['ensemble'],
                defenses=exp['defenses'], attacks=exp['attacks'], checks=False, adaptive=True,
                single_draw_baseline=True)
  if exp['kind'] == 'train':
    c.eval.update(evaluators=('clean',), num_examples=0, epsilons=())
    return c
  if not base:
    raise ValueError(f'repro_rse:{name} evaluates a trained model: give base=<workdir of the '
                     f'{exp["needs"]} run>')
  c.train.checkpoint = base
  n = s['examples']
  c.eval.update(evaluators=('clean', 'attack_suite'), num_examples=n, num_attack_examples=n)
  if exp['kind'] == 'l2' or exp['kind'] == 'eval':
    c.eval.update(norm='l2', epsilons=(L2_EPS,), eot_samples=s['eot_l2'], tolerances=TOLERANCES)
  else:
    c.eval.update(norm='linf', epsilons=(LINF_EPS,), eot_samples=s['eot_linf'])
  return c
