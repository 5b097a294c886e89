"""python -m advdef.main --config=configs/mnist_anp.py:recipe=anp_vs,source=npz,base=/tmp/base \
    --workdir=/tmp/anp_vs

ANP-VS and its baselines on MNIST with the authors' LeNet-5-Caffe (Madaan et al. 2020), as
their code trains them: Adam, batch 64, 200 epochs, lr x0.1 at 50% and 70% of training,
1e-4 L2 (as coupled weight decay), pixels in [0, 1] without normalisation, PGD-20 (eps 0.3,
step 0.01) on the eval-mode network for training and PGD-40 for evaluation.

recipe:
  standard  the clean base model (Adam 1e-3) that ANP-VS and BP fine-tune
  at        adversarial training, (CE_clean + 2 CE_adv) / 3 (the paper's AT, from scratch)
  trades    TRADES (beta 6) with the same attack, an optional baseline
  bp        Beta-Bernoulli pruning masks with clean training (beta 4), from `base`
  anp       ANP without vulnerability suppression (lam 0), from `base`
  anp_vs    ANP-VS: beta 4, lam 0.001, masks lr 10x the weights', from `base`
base: the workdir of a trained `standard` run (needed by bp, anp, anp_vs).
source=npz (../shared/data/mnist10k.npz, 8,000 / 2,000) | tfds (60k / 10k).
cpu: the CPU-sized schedule (configs/repro_anp.py's cpu scale), for the 8,000 training images of
  source=npz: 8 epochs (20 for the base), lr x0.1 at 70% and 90%, PGD-10 at step 0.04 in
  training, and for the masks (bp, anp, anp_vs) four changes that make 1,000 steps enough,
  each measured with ANP-VS from the same base (README, "Training recipes"):
  - ANP's attack eps ramps from 0 to 0.3 over the first 70% of the run (eps_warmup=0.7):
    at full strength from step 0 the adversarial loss, the masks' only signal, is lowest
    with every unit pruned, and the masks pruned everything within 250 steps (11% clean);
  - masks start open, a_uc = 2.0 (E[pi] = 0.68, the authors' VGG conv init) instead of the
    LeNet -1.0 (E[pi] = 0.24): with 76% of the units dropped at every step, ANP's train
    accuracy was 28% after 250 steps (84% with the open init);
  - masks at 300x the weights' lr (the authors: 10x for 200 epochs), so that they settle
    before the lr drops: at 30x, 38% sparsity;
  - the KL as beta KL / 16,000 (the authors divide by the training-set size, 8,000 here):
    at 1/8,000 ANP-VS reached 85% sparsity but 94.9% clean accuracy.
smoke: a few steps on fake data (tests and CI).
"""

from advdef import config_utils
from advdef import validate

RECIPES = {
    'standard': 'standard',
    'at': 'pgd_at(eps=0.3, step_size={step}, steps={steps}, clean_weight=1.0, adv_weight=2.0)',
    'trades': 'trades(eps=0.3, step_size={step}, steps={steps}, beta=6.0)',
    'bp': 'bp(beta=4.0, mask_lr_scale={mask_lr_scale}, kl_examples={kl_examples}{mask_init})',
    'anp': 'anp(beta=4.0, lam=0.0, eps=0.3, step_size={step}, steps={steps}, '
           'mask_lr_scale={mask_lr_scale}, kl_examples={kl_examples}{warmup}{mask_init})',
    'anp_vs': 'anp(beta=4.0, lam=0.001, eps=0.3, step_size={step}, steps={steps}, '
              'mask_lr_scale={mask_lr_scale}, kl_examples={kl_examples}{warmup}{mask_init})',
}
NEEDS_BASE = ('bp', 'anp', 'anp_vs')


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, recipe='standard', source='tfds', base='', cpu=False,
                               smoke=False, epochs=0, clean=False)
  validate.check_choice('recipe', arg.recipe, tuple(RECIPES))
  validate.check_choice('source', arg.source, ('tfds', 'npz'))
  c = config_utils.base_config()
  if arg.source == 'npz':
    c.data.update(source='npz', name='mnist10k', path='../shared/data/mnist10k.npz',
                  test_fraction=0.2, split_seed=0)
  else:
    c.data.update(source='tfds', name='mnist')
  c.model.update(name='lenet5_caffe', normalize='none')  # the authors feed x / 255

  # Full schedule: the authors' PGD-20 at step 0.01, masks at 10x the weights' lr, KL / N.
  # CPU schedule (see the docstring): PGD-10 at 0.04 (3x cheaper, covering the same ball),
  # open masks at 300x, KL / 16,000 and ANP's eps warm-up.
  steps, step = (10, 0.04) if arg.cpu else (20, 0.01)
  mask_lr_scale = 300.0 if arg.cpu else 10.0
  kl_examples = 16000 if arg.cpu else 0  # 0: N = the training-set size
  warmup = ', eps_warmup=0.7' if arg.cpu else ''
  mask_init = ', a_uc_init_conv=2.0, a_uc_init_dense=2.0' if arg.cpu else ''
  epochs = arg.epochs or (200 if not arg.cpu else (20 if arg.recipe == 'standard' else 8))
  boundaries = (0.7, 0.9) if arg.cpu else (0.5, 0.7)
  c.train.update(
      num_epochs=epochs, batch_size=64, optimizer='adam', learning_rate=1e-3,
      weight_decay=1e-4, schedule='piecewise', decay_factor=0.1,
      boundaries=tuple(b * epochs for b in boundaries), log_every_steps=50,
      checkpoint_every_epochs=1, init_from=arg.base,
      recipe=RECIPES[arg.recipe].format(step=step, steps=steps, mask_lr_scale=mask_lr_scale,
                                        kl_examples=kl_examples, warmup=warmup,
                                        mask_init=mask_init))
  if arg.recipe in NEEDS_BASE and not arg.base and not arg.smoke:
    raise ValueError(f'recipe={arg.recipe} fine-tunes a clean model: give base=<workdir of a '
                     'recipe=standard run>')
  c.eval.update(
      batch_size=500, defenses=('none',), num_attack_examples=1000,
      attacks=() if arg.clean else ('pgd(steps=40, step_size=0.01, unroll=True)',),
      norm='linf', epsilons=(0.3,), checks=False,
      vulnerability=dict(attack='pgd(steps=40, step_size=0.01, unroll=True)', epsilon=0.3,
                         source='', num_examples=1000))
  if arg.smoke:
    c.data.update(source='fake', name='mnist_shaped', fake_shape=(28, 28, 1),
                  fake_num_train=128, fake_num_test=64)
    c.train.update(num_epochs=1, batch_size=32, log_every_steps=2,
                   recipe=RECIPES[arg.recipe].format(step=0.1, steps=2, mask_lr_scale=10.0,
                                                     kl_examples=0, warmup=warmup,
                                                     mask_init=mask_init))
    c.eval.update(batch_size=32, num_attack_examples=32,
                  attacks=() if arg.clean else ('pgd(steps=2)',),
                  vulnerability=dict(attack='pgd(steps=2)', epsilon=0.3, source='',
                                     num_examples=32))
  return c
