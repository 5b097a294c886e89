"""python -m advdef.main --config=configs/quickstart.py --workdir=/tmp/advdef_quickstart

Offline quick start on scikit-learn's bundled 8x8 digits (1,437 train / 360 test): trains
a small CNN (about 97% test accuracy in well under a minute on 2 CPU cores), then
evaluates it undefended and retrofitted with SAP, JumpReLU and RSE, clean and under the
adaptive attack suite (PGD, APGD, Square, EOT for the stochastic defenses, BPDA and
transfer for JumpReLU), and writes report.json, report.md and plots to the workdir.

Arguments (configs/quickstart.py:ARG): `smoke` (a few steps, for tests and CI),
`clean` (no attacks), `sweep` (also the JumpReLU kappa trade-off: clean and PGD accuracy at
ten kappas in one compiled call, a table in report.md and sweep_jump_kappa.png).

Config sweep (`get_sweep`, run by `python -m advdef.sweep --config=configs/quickstart.py
--workdir=/tmp/advdef_qs_sweep`): learning rate x seed, six runs; with `smoke`, two seeds.
"""

from advdef import config_utils


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, smoke=False, clean=False, sweep=False)
  c = config_utils.base_config()
  c.data.source = 'digits'
  c.data.name = 'digits'
  c.model.name = 'small_cnn'
  c.train.update(num_epochs=30, batch_size=64, optimizer='sgd', learning_rate=0.05,
                 momentum=0.9, weight_decay=5e-4, schedule='cosine', log_every_steps=50,
                 checkpoint_every_epochs=5)
  c.eval.update(
      batch_size=200,
      defenses=('none', 'sap(frac=1.0)', 'jump(kappa=0.5)',
                'rse(sigma_init=0.2, sigma_inner=0.1)'),
      num_draws=16,
      attacks=() if arg.clean else ('pgd(steps=10)', 'apgd(loss=ce, steps=20)',
                                    'square(queries=200)'),
      norm='linf', epsilons=(0.1, 0.3),
      eot_samples=4, num_attack_examples=100)
  if arg.smoke:
    c.train.update(num_epochs=2, log_every_steps=5)
    c.eval.update(num_examples=64, num_attack_examples=32, num_draws=4, eot_samples=2,
                  epsilons=(0.1, 0.3), batch_size=64)
    if not arg.clean:
      c.eval.attacks = ('pgd(steps=3)', 'square(queries=20)')
  if arg.sweep:
    # The trained small_cnn's positive activations have median ~0.5-1.6 (quartiles up to
    # ~3): clean accuracy holds to kappa ~1 and collapses by ~1.8, so 0.0..1.8 spans the
    # whole trade-off (0.0..0.9 would show an almost flat line).
    c.eval.sweep.update(defense='jump', param='kappa',
                        values=tuple(round(0.2 * i, 1) for i in range(10)),
                        attack='pgd(steps=3)' if arg.smoke else 'pgd(steps=10)', epsilon=0.1)
  return c


def get_sweep(arg=None):
  """The grid of `python -m advdef.sweep` (see advdef.sweep): one run per point."""
  arg = config_utils.parse_arg(arg, smoke=False, clean=False, sweep=False)
  if arg.smoke:
    return 'product(seed=(0, 1))'
  return 'product(train.learning_rate=(0.02, 0.05, 0.1), seed=(0, 1))'
