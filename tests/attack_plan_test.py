"""The attack suite's plan per defense (attack_suite.plan_attacks): which adaptive variants
each defense gets. Planning only, no compute."""

from advdef import config_utils
from advdef import retrofit
from advdef.evaluators import attack_suite

SAP = 'sap(frac=1.0)'
RSE = 'rse(sigma_init=0.2, sigma_inner=0.1)'


def _plans(defense, attacks, **eval_fields):
  e = config_utils.base_config().eval
  e.update(norm='l2', epsilons=(0.5,), eot_samples=4, **eval_fields)
  e.attacks = tuple(attacks)
  specs = attack_suite.parse_attacks(e.attacks)
  return {p.label: p for p in attack_suite.plan_attacks(retrofit.parse_defense(defense),
                                                        specs, e)}


def test_minimum_perturbation_attack_first_keeps_the_fixed_budget_transfer_row():
  plans = _plans(RSE, ['cw_l2(steps=5)', 'pgd(steps=3)'], single_draw_baseline=True)
  assert set(plans) == {
      'cw_l2(steps=5)+1draw', 'cw_l2(steps=5)+eot4', 'cw_l2(steps=5)+transfer(none)',
      'pgd(steps=3)+eot4', 'pgd(steps=3)+transfer(none)'}
  # The gray-box C&W is crafted on the noiseless network, without EOT.
  transfer = plans['cw_l2(steps=5)+transfer(none)']
  assert transfer.craft.text == 'none' and 'eot_samples' not in transfer.kwargs
  assert transfer.threat == 'transfer from none'
  assert plans['cw_l2(steps=5)+1draw'].kwargs == {'steps': 5, 'norm': 'l2'}


def test_jump_relu_gets_gray_box_minimum_perturbation_attacks_from_kappa_zero():
  plans = _plans('jump(kappa=0.5)', ['deepfool', 'pgd(steps=3)'])
  assert plans['deepfool+transfer(kappa=0)'].craft.text == 'none'
  assert plans['pgd(steps=3)+transfer(kappa=0)'].craft.text == 'none'
  # BPDA for every gradient attack of a JumpReLU defense, through ReLU's gradient.
  assert plans['deepfool+bpda'].threat == 'BPDA (ReLU gradient)'
  assert plans['pgd(steps=3)+bpda'].craft.text == "jump(kappa=0.5, surrogate='relu')"


def test_sap_gets_bpda_with_eot_for_its_first_fixed_budget_attack_only():
  plans = _plans(SAP, ['pgd(steps=3)', 'apgd(steps=4)'])
  assert set(plans) == {'pgd(steps=3)+eot4', 'pgd(steps=3)+bpda', 'pgd(steps=3)+transfer(none)',
                        'apgd(steps=4)+eot4'}
  bpda = plans['pgd(steps=3)+bpda']
  assert bpda.craft.text == "sap(frac=1.0, gradient='identity')"
  assert bpda.kwargs['eot_samples'] == 4 and bpda.threat == 'BPDA (identity through the SAP mask)'


def test_an_explicit_bpda_spec_is_not_bpda_d_again_and_non_adaptive_plans_are_plain():
  plans = _plans("sap(frac=0.5, gradient='identity')", ['pgd(steps=3)'])
  assert not any(label.endswith('+bpda') for label in plans)
  plans = _plans(SAP, ['pgd(steps=3)'], adaptive=False)
  assert set(plans) == {'pgd(steps=3)'}


def test_sap_bpda_skips_single_step_fgsm_for_the_first_iterative_attack():
  plans = _plans(SAP, ['fgsm', 'pgd(steps=3)', 'apgd(steps=4)'])
  assert [label for label in plans if label.endswith('+bpda')] == ['pgd(steps=3)+bpda']
  # Transfer still goes with the first gradient attack, FGSM.
  assert 'fgsm+transfer(none)' in plans and 'pgd(steps=3)+transfer(none)' not in plans


def test_transfer_attacks_all_gives_every_gradient_attack_a_gray_box_row():
  attacks = ['ifgsm_min(steps=3)', 'deepfool(norm=linf)', 'deepfool(norm=l2)', 'pgd(steps=3)',
             'square(queries=10)']
  first = _plans('jump(kappa=0.5)', attacks)
  assert sorted(l for l in first if 'transfer' in l) == [
      'ifgsm_min(steps=3)+transfer(kappa=0)', 'pgd(steps=3)+transfer(kappa=0)']
  every = _plans('jump(kappa=0.5)', attacks, transfer_attacks='all')
  # Square is score based: a transfer row would be the undefended model's own Square.
  assert sorted(l for l in every if 'transfer' in l) == sorted(
      f'{a}+transfer(kappa=0)' for a in attacks[:4])
  assert every['deepfool(norm=l2)+transfer(kappa=0)'].kwargs['norm'] == 'l2'
  assert every['deepfool(norm=linf)+transfer(kappa=0)'].craft.text == 'none'


def test_transfer_attacks_is_validated_with_its_choices():
  import pytest
  from advdef import evaluators
  e = config_utils.base_config().eval
  e.transfer_attacks = 'every'
  with pytest.raises(ValueError, match="eval.transfer_attacks.*first_of_kind.*all"):
    evaluators.parse_eval_config(e)


def test_minimum_perturbation_attacks_may_name_their_own_norm_fixed_budget_ones_may_not():
  import pytest
  from advdef import evaluators
  e = config_utils.base_config().eval
  e.update(norm='linf', epsilons=(0.1,), attacks=('deepfool(norm=l2)', 'deepfool'))
  parsed = evaluators.parse_eval_config(e).attacks
  plans = attack_suite.plan_attacks(retrofit.parse_defense('none'), parsed, e)
  assert [p.kwargs['norm'] for p in plans] == ['l2', 'linf']
  e.attacks = ('ifgsm_min(norm=l2)',)
  with pytest.raises(ValueError, match=r"ifgsm_min\(norm=l2\).*norm.*linf"):
    evaluators.parse_eval_config(e)
  e.attacks = ('pgd(norm=l2)',)
  with pytest.raises(ValueError, match="'norm' comes from eval.epsilons"):
    evaluators.parse_eval_config(e)


def test_targeted_attacks_and_autoattack_standard_may_be_listed_in_eval_attacks():
  # The up-front check traces each attack on a ten-class toy model, so APGD-T's default
  # nine target classes fit.
  from advdef import evaluators
  e = config_utils.base_config().eval
  e.update(epsilons=(0.1,), attacks=('apgd_targeted(steps=5)', 'autoattack_standard(steps=5)'))
  assert [a.name for a in evaluators.parse_eval_config(e).attacks] == [
      'apgd_targeted', 'autoattack_standard']
