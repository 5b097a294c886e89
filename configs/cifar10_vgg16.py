"""python -m advdef.main --config=configs/cifar10_vgg16.py --workdir=/tmp/c10_vgg16_rse

VGG-16 on CIFAR-10 as in Random Self-Ensemble (Liu et al. 2018, the BayesianDefense code):
Gaussian noise before every convolution (sigma_init = 0.2 on the input, sigma_inner = 0.1),
active in training and at inference, on [0, 1] inputs with no normalization; SGD lr 0.01,
momentum 0.9, wd 5e-4, batch 128, stages of 80/60/40/20 epochs with lr / 10 after each
(piecewise boundaries 80, 140, 180 of 200), random crop (pad 4) and flip. The authors start a
new SGD optimizer at each stage, resetting its momentum; advdef keeps one optimizer and its
momentum across the stages. Prediction averages the softmax over 10 to 50 noise draws
(eval.num_draws = 50, the authors' script). Pass `plain` to train without noise (a baseline
to retrofit).

Arguments: source=tfds (default) | npz (../shared/data/cifar10_partial.npz); `plain`; `cpu`
(20 epochs, the stages scaled); `smoke` (fake data, a few steps, noisy training kept);
`clean` (no attacks).
"""

from advdef import config_utils


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, source='tfds', plain=False, cpu=False, smoke=False,
                               clean=False)
  c = config_utils.base_config()
  config_utils.cifar10_data(c, arg.source)
  c.model.update(name='vgg16', normalize='none')
  rse = 'rse(sigma_init=0.2, sigma_inner=0.1)'
  c.train.update(num_epochs=200, batch_size=128, optimizer='sgd', learning_rate=0.01,
                 momentum=0.9, weight_decay=5e-4, schedule='piecewise',
                 boundaries=(80, 140, 180), decay_factor=0.1,
                 augment=dict(crop_padding=4, flip=True), defense='none' if arg.plain else rse)
  if arg.cpu:
    c.train.update(num_epochs=20, boundaries=(8, 14, 18))
  c.eval.update(batch_size=256, defenses=('none', rse), num_draws=50,
                attacks=() if arg.clean else ('pgd(steps=20)', 'apgd(loss=ce, steps=100)',
                                              'square(queries=1000)'),
                norm='linf', epsilons=(2 / 255, 4 / 255, 8 / 255), eot_samples=10,
                num_attack_examples=500)
  if arg.smoke:
    config_utils.cifar10_smoke(c)
  return c
