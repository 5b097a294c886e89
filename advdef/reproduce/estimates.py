"""Run-time estimates of reproduction runs, from per-pass costs per network and platform.

  seconds = estimates.estimate_seconds(config, 'cpu2')   # a run's wall time, no compute

`frame.plan` attaches one to every run; `scripts/reproduce.py --list` shows them. The costs
are measured on this project's 2-core CPU machine (cpu2) or assumed (gpu); see COSTS.
"""

from __future__ import annotations

import inspect

from advdef import attacks as attacks_lib
from advdef import config_utils
from advdef import retrofit
from advdef.evaluators import attack_suite


# Seconds per image pass (forward; forward + backward) and per compilation, per platform.
# cpu2: measured on 2 AMD EPYC cores shared with another job, i.e. about one effective core
# (process CPU time = wall time): ResNet-20 training 58 img/s at batch 128; SAP after every
# ReLU 16-21 ms per image per forward and 19-23 ms per forward + backward at eval batches of
# 10-50 (the sampler dominates, so k matters little); SAP programs took 18-30 s to compile.
# `speedup`: a quiet 2-core machine is assumed 1.7x faster (not measured: XLA's scaling to
# the second core). gpu: assumed, not measured (no GPU was available): a datacenter GPU
# ~100x the one core on these passes. vgg16 (cpu2): the quarter-width CPU network
# (width_divisor=4), measured on 2 cores at batch 32 (1.2 / 3.2 ms plain, 1.5 / 4.2 ms with
# RSE noise) and scaled to one effective core; its training rate from the RSE CPU runs (46
# img/s with two runners and other jobs sharing the 2 cores, taken as about 2x slower than
# one effective core); its full-width GPU costs are assumed.
# lenet5_caffe (cpu2): measured with configs/mnist_anp.py's `cpu` schedule on mnist10k,
# batch 64, one process at ~100% of one core while other jobs shared the machine: standard
# 50 steps in 3.0 s (~1,070 img/s), pgd_at with PGD-10 125 steps in 95 s (84 img/s, 11
# passes), bp 25 steps in 3.0 s (2 passes), anp with PGD-10 46 img/s under heavier load
# (load 5.4 against 3.5 for pgd_at); anp's passes (steps + 6) are calibrated so that the
# round 1's CPU comparison (standard 20 epochs, AT, BP, ANP-VS 8 each; 18.9 min
# measured on 2 quiet cores) is estimated at ~20 min. Eval passes at batch 500: forward
# 0.13-0.29 ms, forward + backward 1.1 ms (pgd_at's PGD steps) to 2-3.7 ms (a rolled loop,
# contended); compilation 3-9 s. vgg16_anp (cpu2): the 1/8-width CPU network
# (width_divisor=8, per-image standardisation) at batch 100: forward 0.8-1.0 ms,
# forward + backward 2.1-3.0 ms per image; its training rate from a 2-epoch run of
# repro_anp's cifar_standard (batch 64) beside another job. GPU: assumed, not measured.
COSTS = {
    'cpu2': {
        'speedup': 1.7, 'startup': 10.0, 'train_compile': 30.0,
        'train_img_s': {'resnet20': 58.0, 'small_cnn': 4000.0, 'vgg16': 90.0,
                        'lenet5_caffe': 1000.0, 'vgg16_anp': 300.0, 'lenet_like': 1300.0,
                        'resnet20_postact': 123.0},
        'pass': {('resnet20', 'none'): (1.5e-3, 3.8e-3), ('resnet20', 'random'): (16e-3, 19e-3),
                 ('lenet5_caffe', 'none'): (2e-4, 1.5e-3), ('vgg16_anp', 'none'): (9e-4, 2.6e-3),
                 ('lenet_like', 'none'): (6e-5, 4.5e-4),
                 ('small_cnn', 'none'): (3e-5, 6e-5), ('small_cnn', 'random'): (1e-4, 2e-4),
                 ('vgg16', 'none'): (2.0e-3, 5.4e-3), ('vgg16', 'random'): (2.6e-3, 7.1e-3)},
        'compile': {('resnet20', 'none'): 4.0, ('resnet20', 'random'): 25.0,
                    ('small_cnn', 'none'): 0.7, ('small_cnn', 'random'): 1.2,
                    ('vgg16', 'none'): 8.0, ('vgg16', 'random'): 12.0,
                    ('lenet5_caffe', 'none'): 5.0, ('vgg16_anp', 'none'): 7.0,
                    ('lenet_like', 'none'): 5.0},
    },
    'gpu': {
        'speedup': 1.0, 'startup': 30.0, 'train_compile': 60.0,
        'train_img_s': {'resnet20': 15000.0, 'small_cnn': 100000.0, 'vgg16': 8000.0,
                        'lenet5_caffe': 60000.0, 'vgg16_anp': 8000.0, 'lenet_like': 60000.0},
        'pass': {('resnet20', 'none'): (2e-5, 5e-5), ('resnet20', 'random'): (1.5e-4, 2e-4),
                 ('lenet5_caffe', 'none'): (2e-6, 5e-6), ('vgg16_anp', 'none'): (4e-5, 1e-4),
                 ('lenet_like', 'none'): (2e-6, 5e-6), ('small_cnn', 'none'): (1e-6, 2e-6), ('small_cnn', 'random'): (4e-6, 8e-6),
                 ('vgg16', 'none'): (4e-5, 1e-4), ('vgg16', 'random'): (5e-5, 1.2e-4)},
        'compile': {('resnet20', 'none'): 20.0, ('resnet20', 'random'): 60.0,
                    ('small_cnn', 'none'): 2.0, ('small_cnn', 'random'): 4.0,
                    ('vgg16', 'none'): 30.0, ('vgg16', 'random'): 40.0,
                    ('lenet5_caffe', 'none'): 5.0, ('vgg16_anp', 'none'): 30.0,
                    ('lenet_like', 'none'): 5.0},
    },
}
# Networks costed as another of about the same size (except where an entry of their own
# exists). lenet_like (cpu2): its training rate from the JumpReLU runs (30 epochs of 7,200
# MNIST images in 186 s with other jobs on the machine); its passes calibrated on the
# JumpReLU eval_lenet run (50 rows of minimum-perturbation and PGD attacks on 200 images,
# 17.7 min with three other runs sharing the 2 cores, taken as ~2.5x a quiet machine).
# resnet20_postact: training from round 1's 7.4 min for 20 epochs of 4,660 images on 2 quiet
# cores (210 img/s, 123 per effective core); its passes taken as resnet20's.
COST_AS = {'resnet20_postact': 'resnet20'}
# Passes per training example of a recipe, relative to standard training (an attack's steps
# each cost about one forward + backward).
_RECIPE_PASSES = {'pgd_at': lambda kw: 1 + kw.get('steps', 10),
                  'trades': lambda kw: 1 + kw.get('steps', 10),
                  'fgsm_mix': lambda kw: 1.5,
                  # Measured on LeNet-5-Caffe (see lenet5_caffe above): masks sampled per
                  # example, the KL, two parameter groups; anp adds the eval-mode attack, a
                  # clean and an adversarial pass and the feature distances.
                  'bp': lambda kw: 2.0,
                  'anp': lambda kw: 6 + kw.get('steps', 20)}
DATA_SIZES = {'cifar10_partial': (4660, 846), 'cifar10': (50000, 10000),
              'mnist10k': (8000, 2000), 'mnist': (60000, 10000)}


def _default(name: str, arg: str):
  return inspect.signature(attacks_lib.ATTACKS[name]).parameters[arg].default


def gradient_passes(name: str, kwargs: dict) -> float:
  """Forward + backward passes per example of one attack run (an estimate; for the
  minimum-perturbation attacks an upper bound, as they stop once every example is fooled;
  a backward pass alone taken as 0.7 of a forward + backward)."""
  get = lambda k: kwargs.get(k, _default(name, k)) if k in inspect.signature(
      attacks_lib.ATTACKS[name]).parameters else 1
  eot, restarts = get('eot_samples'), get('restarts')
  if name == 'fgsm':
    return eot
  if name == 'autoattack_rand':
    return 2 * (get('steps') + 2) * eot * restarts
  if name == 'autoattack_standard':
    return get('steps') * (restarts + get('num_target_classes')) + get('queries') / 2
  if name == 'square':
    return get('queries') / 2
  if name == 'deepfool':  # per step a forward and one backward per candidate class
    return (get('steps') + 1) * eot * (1 + 0.7 * (get('num_classes_considered') - 1))
  if name == 'trust_region':  # the target chosen once as DeepFool chooses its class
    return (get('steps') + 1) * eot + 0.7 * (get('num_classes_considered') - 1)
  steps = get('steps') if 'steps' in inspect.signature(attacks_lib.ATTACKS[name]).parameters \
      else 20
  rounds = get('search_steps') if name == 'cw_l2' else 1  # C&W's binary search over c
  return (steps + 1) * restarts * eot * rounds


def cost_ratio(c, model: str) -> float:
  """Forward + backward cost with a random defense over without (noisy training)."""
  passes = c['pass']
  if (model, 'none') not in passes or (model, 'random') not in passes:
    return 1.0
  return passes[(model, 'random')][1] / passes[(model, 'none')][1]


def estimate_seconds(config, platform: str) -> float:
  """A run's wall time from the cost table: start-up, training, and per defense its clean
  scoring and every attack the suite plans (attack passes + scoring draws), compilations."""
  c = COSTS[platform]
  model = COST_AS.get(config.model.name, config.model.name)
  own = config.model.name
  seconds = c['startup']
  train_size, test_size = DATA_SIZES.get(
      config.data.name, (config.data.fake_num_train, config.data.fake_num_test))
  if not config.train.checkpoint and config.train.num_epochs:
    (recipe, kwargs), = config_utils.parse_spec(config.train.recipe)
    passes = _RECIPE_PASSES.get(recipe, lambda kw: 1.0)(kwargs)
    if retrofit.parse_defense(config.train.defense).stochastic:
      passes *= cost_ratio(c, model)
    rate = c['train_img_s'].get(own, c['train_img_s'].get(model, 100.0))
    seconds += c['train_compile'] + passes * config.train.num_epochs * train_size / rate
  e = config.eval
  n = min(e.num_examples or test_size, test_size)
  n_attack = min(e.num_attack_examples or n, n)
  specs = attack_suite.parse_attacks(e.attacks)
  cost = lambda kind: c['pass'].get((model, kind), (1e-3, 3e-3))
  compile_s = lambda kind: c['compile'].get((model, kind), 10.0)
  for text in e.defenses:
    defense = retrofit.parse_defense(text)
    kind = 'random' if defense.stochastic else 'none'
    draws = e.num_draws if defense.stochastic else 1
    fwd = cost(kind)[0]
    seconds += compile_s(kind)
    if 'clean' in e.evaluators:
      seconds += n * draws * fwd
    if 'attack_suite' not in e.evaluators:
      continue
    plans = attack_suite.plan_attacks(defense, specs, e)
    for p in plans:
      craft = 'random' if p.craft.stochastic else 'none'
      per_example = gradient_passes(p.name, p.kwargs) * cost(craft)[1] + draws * fwd
      seconds += len(e.epsilons) * n_attack * per_example + compile_s(craft)
    main = next((p for p in plans if p.name in ('pgd', 'apgd')), None)
    if e.checks and main is not None:  # large eps, convergence (x4), fixed randomness
      seconds += 6 * n_attack * gradient_passes(main.name, main.kwargs) * cost(kind)[1]
      seconds += 3 * compile_s(kind)
  return seconds / c['speedup']
