"""python -m advdef.main --config=configs/cifar10_resnet20.py --workdir=/tmp/c10_resnet20

ResNet-20 on CIFAR-10. arch=preact (default) is the SAP paper's network (input BatchNorm,
pre-activation units; SGD momentum 0.9, batch 512, wd 1e-4, lr 0.5 / 0.05 / 0.005 for
100 / 30 / 20 epochs) evaluated with SAP-100 and SAP-50; arch=postact is the JumpReLU paper's
(SGD 0.1, wd 5e-4, batch 128, lr x0.1 at 30/60/90 of 120) with kappa in {0.01..0.09}.
Epsilons are in [0, 1] pixels: the SAP paper's lambda in 0-255 units is lambda/255 here.
Inputs are 32x32 with crop (pad 4) and flip; the SAP notebook trained on 28x28 crops with
HSL jitter, which advdef does not reproduce.

recipe (train.recipe, advdef/recipes.py; the arch's schedule is kept):
  standard  clean training (default)
  adv       the SAP paper's ADV model (use with arch=preact): 80% clean, 20% FGSM at
            lambda = 2 (2/255), crafted on the previous epoch's model
  robust    the JumpReLU paper's robust model (use with arch=postact): the first 60% of
            every batch replaced by FGSM at eps = 0.031 normalised units ~ 0.00623 pixels
  pgd_at    Madry et al.'s PGD adversarial training: PGD-7, eps 8/255, step 2/255
  trades    TRADES: beta 6, PGD-10 on the KL, eps 8/255, step 2/255
e.g. --config=configs/cifar10_resnet20.py:arch=postact,recipe=robust

Arguments: arch=preact|postact; recipe=...; source=tfds (default) | npz (../shared/data/
cifar10_partial.npz, 4,660/846 real images: CPU-scale trends only); `cpu` (20 epochs);
`smoke` (fake CIFAR-shaped data, a few steps; attacks in the recipe shrunk to 2 steps);
`clean` (no attacks in evaluation).
"""

from advdef import config_utils
from advdef import validate

# The JumpReLU code normalises CIFAR inputs by the per-channel std (0.2023, 0.1994, 0.2010),
# so its eps = 0.031 is 0.031 * 0.2009 (the mean std) = 0.0062279 in [0, 1] pixels.
JUMPRELU_EPS = 0.031 * 0.2009
RECIPES = {
    'standard': 'standard',
    'adv': 'fgsm_mix(eps=0.00784313725490196, fraction=0.2, source=previous_epoch)',  # 2/255
    'robust': f'fgsm_mix(eps={JUMPRELU_EPS:.5g}, fraction=0.6)',
    # eps 8/255, step 2/255.
    'pgd_at': 'pgd_at(eps=0.03137254901960784, step_size=0.00784313725490196, steps={steps})',
    'trades': 'trades(eps=0.03137254901960784, step_size=0.00784313725490196, steps={steps}, '
              'beta=6.0)',
}
STEPS = {'pgd_at': 7, 'trades': 10}


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, arch='preact', recipe='standard', source='tfds', cpu=False,
                               smoke=False, clean=False)
  validate.check_choice('arch', arg.arch, ('preact', 'postact'))
  validate.check_choice('recipe', arg.recipe, tuple(RECIPES))
  c = config_utils.base_config()
  config_utils.cifar10_data(c, arg.source)
  c.train.augment.update(crop_padding=4, flip=True)
  if arg.arch == 'preact':
    c.model.name = 'resnet20'
    c.model.normalize = 'none'  # The network's input BatchNorm normalizes (SAP paper).
    c.train.update(num_epochs=150, batch_size=512, optimizer='sgd', learning_rate=0.5,
                   momentum=0.9, weight_decay=1e-4, schedule='piecewise',
                   boundaries=(100, 130), decay_factor=0.1)
    defenses = ('none', 'sap(frac=1.0)', 'sap(frac=0.5)')
  else:
    c.model.name = 'resnet20_postact'
    c.train.update(num_epochs=120, batch_size=128, optimizer='sgd', learning_rate=0.1,
                   momentum=0.9, weight_decay=5e-4, schedule='piecewise',
                   boundaries=(30, 60, 90), decay_factor=0.1)
    defenses = ('none', 'jump(kappa=0.03)', 'jump(kappa=0.06)', 'jump(kappa=0.09)')
  steps = 2 if arg.smoke else STEPS.get(arg.recipe, 0)
  c.train.recipe = RECIPES[arg.recipe].format(steps=steps)
  if arg.cpu:
    c.train.num_epochs = 20
    c.train.boundaries = tuple(b * 20 / (150 if arg.arch == 'preact' else 120)
                               for b in c.train.boundaries)
    c.train.batch_size = 128
    c.train.learning_rate = min(c.train.learning_rate, 0.1)
  c.eval.update(batch_size=256, defenses=defenses, num_draws=100,
                attacks=() if arg.clean else ('fgsm', 'pgd(steps=20)', 'apgd(loss=ce, steps=100)',
                                              'square(queries=1000)'),
                norm='linf', epsilons=(1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255),
                eot_samples=10, num_attack_examples=500)
  if arg.smoke:
    config_utils.cifar10_smoke(c)
    c.eval.defenses = defenses[:2]
  return c
