"""python -m advdef.main --config=configs/cifar10_wrn.py --workdir=/tmp/c10_wrn34_4

Wide ResNet on CIFAR-10: depth=34,widen=4 (default; the JumpReLU paper's WRN, SGD 0.1,
wd 5e-4, batch 128, lr x0.1 at 30/60/90 of 120 epochs, JumpReLU kappa in {0.01..0.09}),
or depth=28,widen=10 (the naturally trained WRN-28-10 that Athalye et al. attacked under
SAP), or depth=34,widen=10.

Arguments: depth, widen; source=tfds (default) | npz; `cpu` (10 epochs); `smoke` (fake data,
WRN-10-1, a few steps); `clean` (no attacks).
"""

from advdef import config_utils


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, depth=34, widen=4, source='tfds', cpu=False, smoke=False,
                               clean=False)
  c = config_utils.base_config()
  config_utils.cifar10_data(c, arg.source)
  c.model.name = 'wide_resnet'
  c.model.kwargs = dict(depth=arg.depth, widen=arg.widen, dropout=0.0)
  c.train.update(num_epochs=120, batch_size=128, optimizer='sgd', learning_rate=0.1,
                 momentum=0.9, weight_decay=5e-4, schedule='piecewise', boundaries=(30, 60, 90),
                 decay_factor=0.1, augment=dict(crop_padding=4, flip=True))
  if arg.cpu:
    c.train.update(num_epochs=10, boundaries=(5, 8))
  c.eval.update(batch_size=256,
                defenses=('none', 'jump(kappa=0.03)', 'jump(kappa=0.06)', 'sap(frac=1.0)'),
                num_draws=100,
                attacks=() if arg.clean else ('pgd(steps=20)', 'apgd(loss=ce, steps=100)',
                                              'square(queries=1000)'),
                norm='linf', epsilons=(2 / 255, 4 / 255, 8 / 255), eot_samples=10,
                num_attack_examples=500)
  if arg.smoke:
    config_utils.cifar10_smoke(c, num_train=32, num_test=16, batch_size=16)
    c.model.kwargs = dict(depth=10, widen=1, dropout=0.0)
    c.eval.defenses = ('none', 'jump(kappa=0.03)')
  return c
