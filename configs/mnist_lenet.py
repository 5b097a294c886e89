"""python -m advdef.main --config=configs/mnist_lenet.py:source=npz --workdir=/tmp/mnist_lenet

The JumpReLU paper's LeNetLike on MNIST (SGD 0.02, momentum 0.9, wd 5e-4, batch 128, lr x0.2
at epochs 30/60/80 of 90), evaluated undefended and with JumpReLU at the paper's kappa grid
{0.5, 1.0, 1.5} (activation units of the mean/std-normalized network), with SAP and RSE for
comparison, under L-inf attacks up to eps = 0.3 (pixels in [0, 1]; the paper's eps = 0.3 in
normalized units is 0.3 * 0.3081 = 0.092 pixels).

Arguments: source=tfds (default; TFDS mnist, 60k/10k) | npz (../shared/data/mnist10k.npz:
8,000/2,000 stratified; override --config.data.path elsewhere); `cpu` (30 epochs, the
schedule scaled); `smoke` (a few steps, for tests and CI); `clean` (no attacks).
"""

from advdef import config_utils


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, source='tfds', cpu=False, smoke=False, clean=False)
  c = config_utils.base_config()
  config_utils.check_choice('source', arg.source, ('tfds', 'npz'))
  if arg.source == 'npz':
    c.data.update(source='npz', name='mnist10k', path='../shared/data/mnist10k.npz',
                  test_fraction=0.2, split_seed=0)
  else:
    c.data.update(source='tfds', name='mnist')
  c.model.name = 'lenet_like'
  epochs = 30 if arg.cpu else 90
  c.train.update(num_epochs=epochs, batch_size=128, optimizer='sgd', learning_rate=0.02,
                 momentum=0.9, weight_decay=5e-4, schedule='piecewise', decay_factor=0.2,
                 boundaries=tuple(e * epochs / 90 for e in (30, 60, 80)), log_every_steps=100,
                 checkpoint_every_epochs=5)
  c.eval.update(
      batch_size=512,
      defenses=('none', 'jump(kappa=0.5)', 'jump(kappa=1.0)', 'jump(kappa=1.5)',
                'sap(frac=1.0)', 'rse(sigma_init=0.2, sigma_inner=0.1)'),
      num_draws=50,
      attacks=() if arg.clean else ('fgsm', 'pgd(steps=40)', 'apgd(loss=ce, steps=100)',
                                    'square(queries=1000)'),
      norm='linf', epsilons=(0.05, 0.1, 0.2, 0.3), eot_samples=10, num_attack_examples=500)
  if arg.smoke:
    c.train.update(num_epochs=2, batch_size=32, learning_rate=0.05, log_every_steps=10)
    c.data.num_train = 512
    c.data.num_test = 128
    c.eval.update(defenses=('none', 'jump(kappa=0.5)', 'sap(frac=1.0)'), num_draws=4,
                  eot_samples=2, num_attack_examples=32, epsilons=(0.3,))
    if not arg.clean:
      c.eval.attacks = ('pgd(steps=3)',)
  return c
