"""python -m advdef.main --config=configs/mnist_lenet.py:source=npz --workdir=/tmp/mnist_lenet

The JumpReLU paper's LeNetLike on MNIST (SGD 0.02, momentum 0.9, wd 5e-4, batch 128, lr x0.2
at epochs 30/60/80 of 90), evaluated undefended and with JumpReLU at the paper's kappa grid
{0.5, 1.0, 1.5} (activation units of the mean/std-normalized network), with SAP and RSE for
comparison, under L-inf attacks up to eps = 0.3 (pixels in [0, 1]; the paper's eps = 0.3 in
normalized units is 0.3 * 0.3081 = 0.092 pixels).

recipe (train.recipe, advdef/recipes.py; the same schedule for every recipe, as in the paper):
  standard  clean training (default)
  robust    the JumpReLU paper's robust LeNetLike: the first 30% of every batch replaced by
            FGSM at eps = 0.3 normalised units = 0.3 * 0.3081 = 0.0924 pixels
  pgd_at    Madry et al.'s MNIST PGD adversarial training: PGD-40, eps 0.3, step 0.01
e.g. --config=configs/mnist_lenet.py:source=npz,recipe=robust

Arguments: recipe=...; source=tfds (default) | npz (../shared/data/mnist10k.npz: 8,000/2,000
stratified; override --config.data.path elsewhere) | fake; `cpu` (30 epochs, the schedule
scaled); `smoke` (a few steps, for tests and CI: on fake MNIST-shaped data unless a source is
given, e.g. `source=npz,smoke` takes 512/128 real digits; attacks in the recipe shrunk to 2
steps); `clean` (no attacks in evaluation).
"""

from advdef import config_utils
from advdef import validate

RECIPES = {
    'standard': 'standard',
    'robust': 'fgsm_mix(eps=0.0924, fraction=0.3)',  # 0.3 * 0.3081 (MNIST std) pixels
    'pgd_at': 'pgd_at(eps=0.3, step_size={step}, steps={steps})',
}


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, recipe='standard', source='', cpu=False, smoke=False,
                               clean=False)
  validate.check_choice('recipe', arg.recipe, tuple(RECIPES))
  source = arg.source or ('fake' if arg.smoke else 'tfds')
  validate.check_choice('source', source, ('tfds', 'npz', 'fake'))
  c = config_utils.base_config()
  if source == 'npz':
    c.data.update(source='npz', name='mnist10k', path='../shared/data/mnist10k.npz',
                  test_fraction=0.2, split_seed=0)
  elif source == 'fake':
    c.data.update(source='fake', name='mnist_shaped', fake_shape=(28, 28, 1))
  else:
    c.data.update(source='tfds', name='mnist')
  c.model.name = 'lenet_like'
  epochs = 30 if arg.cpu else 90
  c.train.update(num_epochs=epochs, batch_size=128, optimizer='sgd', learning_rate=0.02,
                 momentum=0.9, weight_decay=5e-4, schedule='piecewise', decay_factor=0.2,
                 boundaries=tuple(e * epochs / 90 for e in (30, 60, 80)), log_every_steps=100,
                 checkpoint_every_epochs=5,
                 recipe=RECIPES[arg.recipe].format(step=0.15 if arg.smoke else 0.01,
                                                   steps=2 if arg.smoke else 40))
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
    if source == 'fake':
      c.data.update(fake_num_train=128, fake_num_test=64)
    else:
      c.data.update(num_train=512, num_test=128)
    c.eval.update(defenses=('none', 'jump(kappa=0.5)', 'sap(frac=1.0)'), num_draws=4,
                  eot_samples=2, num_attack_examples=32, epsilons=(0.3,))
    if not arg.clean:
      c.eval.attacks = ('pgd(steps=3)',)
  return c
