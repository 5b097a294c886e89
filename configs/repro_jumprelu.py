"""python -m advdef.main --config=configs/repro_jumprelu.py:lenet,cpu --workdir=/tmp/repro/jumprelu/lenet

The experiments of the JumpReLU reproduction (Erichson, Yao, Mahoney, "JumpReLU: A Retrofit
Defense Strategy for Adversarial Attacks", ICPRAM 2020), one config per experiment.
`python scripts/reproduce.py --paper=jumprelu --scale=cpu --root=DIR` runs them in order, each
in DIR/jumprelu/<experiment>, and writes the JumpReLU section of RESULTS.md
(advdef.reproduce.jumprelu). Each runs alone as well:

  python -m advdef.main --config=configs/repro_jumprelu.py:<experiment>,<scale>[,base=<workdir>] \
      --workdir=DIR/jumprelu/<experiment>

base: the workdir of the trained run the experiment evaluates (its `needs`). JumpReLU is
retrofitted at inference (`jump(kappa=...)` after every ReLU) onto that checkpoint, trained
with plain ReLUs, as in the paper.

Models (the authors' networks and recipes, inputs normalised by the data set mean/std inside
the model, as their data pipeline did):
  lenet           LeNetLike on MNIST (configs/mnist_lenet.py), clean training
  lenet_robust    the same, the paper's "robust" model: the first 30% of every batch replaced
                  by FGSM at eps 0.3 normalised units (0.0924 pixels)
  resnet          ResNet-20 (post-activation, the authors' bearpaw network;
                  configs/cifar10_resnet20.py:arch=postact) on CIFAR-10, clean training
  resnet_robust   the same with FGSM for the first 60% of every batch at eps 0.031
                  normalised units (0.0062 pixels)

Experiments (`experiments(scale)` lists them with what each needs):
  <model>         train it on the training split minus a 10% validation split
                  (data.validation_fraction=0.1); clean accuracy ON THE VALIDATION SPLIT for
                  kappa = 0 and every kappa of the grid: the renderer chooses kappa* there
  eval_<model>    on the first test images: clean accuracy and the paper's attacks at every
                  kappa of the grid (kappa = 0 is `none`), white-box, BPDA through ReLU's
                  gradient, and gray-box (crafted once on kappa = 0; the suite's
                  `+transfer(kappa=0)` rows, eval.transfer_attacks='all'):
                    IFGSM      ifgsm_min: steps of 0.01 normalised units (0.01 * std pixels)
                               on still-correct examples, no ball; 40 iterations MNIST, 7 CIFAR
                    DeepFool   L-inf and L2, 9 competing classes, overshoot 0.02; 40 / 7 its.
                    TR         trust_region: first-order L2, target by the closest boundary,
                               radius 0.01 normalised units, overshoot 0.02, 40 iterations
                  each with its accuracy (not fooled within the budget), the paper's Rel.
                  Noise (mean over all examples of ||delta|| / ||x|| in the normalised space)
                  and advdef's median perturbation; and a fixed-budget PGD-20 (margin loss)
                  at L-inf PGD_EPS, the adaptive view that the minimum-perturbation protocol
                  lacks
Kappa grids (activation units): the authors' scripts' LeNetLike {0, 0.5, 1.0, 1.5}; ResNet-20
{0, 0.01, ..., 0.09}, of which {0, 0.03, 0.06, 0.09} at cpu scale.
kappa* (fixed rule, validation split only): the largest kappa whose validation clean
accuracy is at most KAPPA_ACCURACY_DROP below kappa = 0's (the README's "how much accuracy
on clean data he is willing to sacrifice").

Scales:
  smoke  small_cnn on fake 8x8 data, 1 epoch, 8 examples: the plumbing, for CI (one model)
  cpu    mnist10k (7,200 train / 800 validation / 2,000 test) and cifar10_partial (4,194 /
         466 / 846); LeNetLike for 30 epochs (the authors' 90, schedule scaled), ResNet-20
         for 20 (the authors' 120, schedule scaled); 200 MNIST and 100 CIFAR test images
         attacked (the authors: 10,000); estimated ~62 minutes on 2 quiet CPU cores
         (`scripts/reproduce.py --paper=jumprelu --scale=cpu --list`)
  full   the paper's setting: TFDS mnist / cifar10, the authors' schedules (90 and 120
         epochs), 10,000 test images for clean accuracy and 1,000 attacked, ResNet-20 at
         every kappa of {0, 0.01, ..., 0.09}; for a GPU, estimated by `--list`
"""

from __future__ import annotations

import importlib.util
import os

from advdef import config_utils
from advdef import validate

SCALES = ('smoke', 'cpu', 'full')
# Per-channel stds of the authors' normalisation: attack sizes given in normalised units are
# converted to [0, 1] pixels with them (CIFAR: the mean of the three channels' stds).
MNIST_STD = 0.3081
CIFAR_STD = 0.2009
VALIDATION_FRACTION = 0.1
KAPPA_ACCURACY_DROP = 0.02  # kappa*: at most 2 points of validation clean accuracy given up
PGD_EPS = {'mnist': 0.1, 'cifar': 2 / 255}
KAPPAS = {
    'mnist': {'smoke': (0.5,), 'cpu': (0.5, 1.0, 1.5), 'full': (0.5, 1.0, 1.5)},
    'cifar': {'smoke': (0.05,), 'cpu': (0.03, 0.06, 0.09),
              'full': tuple(round(0.01 * k, 2) for k in range(1, 10))},
}
MODELS = {
    'lenet': ('mnist', 'standard'), 'lenet_robust': ('mnist', 'robust'),
    'resnet': ('cifar', 'standard'), 'resnet_robust': ('cifar', 'robust'),
}
# Examples attacked and the evaluation batch; the epochs are the base configs' (`cpu`: 30
# LeNetLike, 20 ResNet-20, their schedules scaled; full: the authors' 90 and 120).
SETTINGS = {
    'smoke': dict(examples=8, batch_size=8),
    'cpu': dict(examples={'mnist': 200, 'cifar': 100}, batch_size=100),
    'full': dict(examples={'mnist': 1000, 'cifar': 1000}, batch_size=500),
}
# The authors' iteration budgets: IFGSM and DeepFool 40 on MNIST, 7 on CIFAR; TR 40.
ITERATIONS = {'mnist': 40, 'cifar': 7}
TR_ITERATIONS = 40


def defenses(dataset: str, scale: str) -> tuple[str, ...]:
  """'none' (kappa = 0) and JumpReLU at every kappa of the grid."""
  return ('none',) + tuple(f'jump(kappa={k})' for k in KAPPAS[dataset][scale])


def paper_attacks(dataset: str, scale: str) -> tuple[str, ...]:
  """The authors' four attacks, sizes converted from normalised units to [0, 1] pixels."""
  std = MNIST_STD if dataset == 'mnist' else CIFAR_STD
  its = 2 if scale == 'smoke' else ITERATIONS[dataset]
  tr_its = 2 if scale == 'smoke' else TR_ITERATIONS
  step = round(0.01 * std, 6)
  return (f'ifgsm_min(step_size={step}, steps={its})',
          f'deepfool(norm=linf, steps={its}, overshoot=0.02)',
          f'deepfool(norm=l2, steps={its}, overshoot=0.02)',
          f'trust_region(norm=l2, steps={tr_its}, radius={step}, overshoot=0.02)')


def experiments(scale: str) -> list[dict]:
  """The experiments of `scale`, in run order (see configs/repro_sap.py for the fields)."""
  validate.check_choice('scale', scale, SCALES)
  names = ('lenet',) if scale == 'smoke' else tuple(MODELS)
  out = []
  for m in names:
    dataset, recipe = MODELS[m]
    out.append(dict(name=m, kind='train', model=m, needs='', defenses=defenses(dataset, scale),
                    attacks=(), what=f'train {m} ({recipe}); validation clean accuracy per kappa'))
  for m in names:
    dataset, _ = MODELS[m]
    out.append(dict(name=f'eval_{m}', kind='eval', model=m, needs=m,
                    defenses=defenses(dataset, scale),
                    attacks=paper_attacks(dataset, scale) + ('pgd(steps=20, loss=margin)',),
                    what=f'{m}: IFGSM, DeepFool-inf/2, TR and PGD per kappa, white-box, BPDA '
                         'and gray-box'))
  return out


def _load(name: str):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f'{name}.py')
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _base_network(dataset: str, recipe: str, scale: str):
  if dataset == 'mnist':
    source = {'smoke': 'fake', 'cpu': 'npz', 'full': 'tfds'}[scale]
    c = _load('mnist_lenet').get_config(f'recipe={recipe},source={source},clean'
                                        + (',cpu' if scale == 'cpu' else ''))
  else:
    source = 'npz' if scale == 'cpu' else 'tfds'
    c = _load('cifar10_resnet20').get_config(f'arch=postact,recipe={recipe},source={source},'
                                             'clean' + (',cpu' if scale == 'cpu' else ''))
  return c


def get_config(arg=None):
  name, scale, base = config_utils.experiment_arg(arg, SCALES, 'lenet', 'repro_jumprelu')
  by_name = {e['name']: e for e in experiments(scale)}
  if name not in by_name:
    raise ValueError(f'repro_jumprelu: unknown experiment {name!r} at scale {scale}; valid: '
                     f'{", ".join(by_name)}')
  exp, s = by_name[name], SETTINGS[scale]
  dataset, recipe = MODELS[exp['model']]
  c = _base_network(dataset, recipe, scale)
  c.train.checkpoint_every_epochs = 1
  if scale == 'smoke':
    c.data.update(source='fake', name='digits_shaped', fake_shape=(8, 8, 1),
                  fake_num_train=64, fake_num_test=16)
    c.model.update(name='small_cnn', normalize='dataset', kwargs={})
    c.train.update(num_epochs=1, batch_size=32, learning_rate=0.05, boundaries=(),
                   schedule='cosine', log_every_steps=1)
  c.data.validation_fraction = VALIDATION_FRACTION
  examples = s['examples'] if scale == 'smoke' else s['examples'][dataset]
  c.eval.update(batch_size=s['batch_size'], defenses=exp['defenses'], attacks=exp['attacks'],
                checks=False, adaptive=True, transfer_attacks='all', norm='linf',
                num_draws=1, tolerances=())
  if exp['kind'] == 'train':
    # Clean accuracy per kappa on the validation split: kappa* is chosen there.
    c.data.eval_split = 'validation'
    c.eval.update(evaluators=('clean',), num_examples=0, epsilons=())
    return c
  if not base:
    raise ValueError(f'repro_jumprelu:{name} evaluates a trained model: give base=<workdir of '
                     f'the {exp["needs"]} run>')
  c.train.checkpoint = base
  c.eval.update(evaluators=('clean', 'attack_suite'), num_examples=0,
                num_attack_examples=examples, epsilons=(PGD_EPS[dataset],))
  return c
