"""Tests for advdef.plots: the structure of the figures (panels, colours, worst case, legend
placement), not their pixels, plus the PNGs that advdef.reporting writes."""

import matplotlib.colors
import pytest

from advdef import plots
from advdef.reporting import new_report, write_report

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
DEFENSES = ('none', 'sap(frac=1.0)', 'jump(kappa=0.5)')
ATTACKS = ('pgd(steps=10)', 'apgd(loss=ce, steps=20)', 'square(queries=200)', 'transfer')
EPSILONS = (0.05, 0.1, 0.3)
CLEAN = {'none': 0.98, 'sap(frac=1.0)': 0.95, 'jump(kappa=0.5)': 0.93}


def _clean_row(defense):
  return {'defense': defense, 'attack': 'none', 'norm': None, 'epsilon': None,
          'accuracy': CLEAN[defense], 'ci95': None, 'n': 100}


def _accuracy(d, a, e):
  # Distinct per (defense, attack, epsilon), falling with epsilon, and a different attack
  # is the strongest at different epsilons, so the worst case is not one attack's line.
  return round(0.9 - 1.5 * e - 0.05 * d - 0.1 * ((a + int(e * 20)) % len(ATTACKS)), 4)


def _attack_row(d, a, e, norm='linf'):
  acc = max(0.0, _accuracy(d, a, e))
  return {'defense': DEFENSES[d], 'attack': ATTACKS[a], 'norm': norm, 'epsilon': e,
          'accuracy': acc, 'ci95': [max(0.0, acc - 0.05), min(1.0, acc + 0.05)], 'n': 100}


def _rows(with_worst=False):
  """3 defenses x 4 attacks x 3 epsilons; worst-case rows 0.01 below the minimum if asked."""
  clean = [_clean_row(d) for d in DEFENSES]
  attacked = [_attack_row(d, a, e) for d in range(len(DEFENSES)) for a in range(len(ATTACKS))
              for e in EPSILONS]
  if with_worst:
    for d, defense in enumerate(DEFENSES):
      for e in EPSILONS:
        acc = max(0.0, _expected_min(d, e) - 0.01)  # Per-example: below the min over attacks.
        attacked.append({'defense': defense, 'attack': 'worst_case', 'norm': 'linf',
                         'epsilon': e, 'accuracy': acc, 'ci95': [acc, min(1.0, acc + 0.05)],
                         'n': 100, 'worst_case': True, 'attacks': list(ATTACKS)})
  return clean, attacked


def _expected_min(d, e):
  return min(max(0.0, _accuracy(d, a, e)) for a in range(len(ATTACKS)))


def _worst_lines(ax):
  return [l for l in ax.lines if l.get_label().startswith(plots.WORST_CASE_LABEL)]


def _assert_one_legend_outside_the_panels(fig):
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  assert len(fig.legends) == 1
  assert all(ax.get_legend() is None for ax in fig.axes)
  legend = fig.legends[0].get_window_extent(renderer)
  for ax in fig.axes:
    # The tight box holds the tick labels and title too: the legend covers none of them.
    assert not legend.overlaps(ax.get_tightbbox(renderer)), ax.get_title()
  # Inside the figure, so nothing is clipped even without bbox_inches='tight'.
  assert fig.bbox.x0 <= legend.x0 and legend.x1 <= fig.bbox.x1
  assert fig.bbox.y0 <= legend.y0 and legend.y1 <= fig.bbox.y1


def test_one_panel_per_defense_titled_by_defense():
  fig = plots.accuracy_vs_epsilon_figure(*_rows())
  panels = [ax for ax in fig.axes if ax.lines]
  assert len(panels) == len(DEFENSES) == len(fig.axes)
  assert [ax.get_title() for ax in panels] == list(DEFENSES)  # The report's order.
  # Shared axes: the same limits everywhere, so panels compare at a glance.
  assert len({ax.get_ylim() for ax in panels}) == 1
  assert len({ax.get_xlim() for ax in panels}) == 1
  assert 'ε' in fig.get_supxlabel() and r'\ell_\infty' in fig.get_supxlabel()


def test_attack_colours_are_the_same_in_every_panel():
  clean, attacked = _rows()
  # Defenses get different attacks (EOT for the stochastic ones, BPDA for JumpReLU), so a
  # colour per panel position would shift between panels.
  attacked = [r for r in attacked if not (r['defense'] == 'sap(frac=1.0)'
                                          and r['attack'] == ATTACKS[1])]
  fig = plots.accuracy_vs_epsilon_figure(clean, attacked)
  colours: dict[str, set] = {}
  for ax in fig.axes:
    attack_lines = [l for l in ax.lines if l.get_label() in ATTACKS]
    assert len(attack_lines) == len(ATTACKS) - (ax.get_title() == 'sap(frac=1.0)')
    for line in attack_lines:
      colours.setdefault(line.get_label(), set()).add(matplotlib.colors.to_rgba(line.get_color()))
  assert all(len(c) == 1 for c in colours.values()), colours
  assert len({c for cs in colours.values() for c in cs}) == len(ATTACKS)  # Distinct attacks.


@pytest.mark.parametrize('with_worst', [False, True])
def test_one_bold_worst_case_line_per_panel(with_worst):
  fig = plots.accuracy_vs_epsilon_figure(*_rows(with_worst))
  for d, ax in enumerate(fig.axes):
    worst = _worst_lines(ax)
    assert len(worst) == 1, [l.get_label() for l in ax.lines]
    (line,) = worst
    assert line.get_linewidth() > max(l.get_linewidth() for l in ax.lines if l is not line)
    assert matplotlib.colors.to_rgba(line.get_color())[:3] == (0.0, 0.0, 0.0)
    # The curve starts at the clean accuracy at epsilon 0.
    assert list(line.get_xdata()) == [0.0, *EPSILONS]
    expected = [max(0.0, _expected_min(d, e) - (0.01 if with_worst else 0.0)) for e in EPSILONS]
    assert list(line.get_ydata()) == pytest.approx([CLEAN[DEFENSES[d]], *expected])
    # The label says which worst case it is: the report's per-example rows, or the minimum
    # over attacks (an upper bound on it) when the report has none.
    detail = 'per-example' if with_worst else 'min over attacks'
    assert line.get_label() == f'{plots.WORST_CASE_LABEL} ({detail})'


def test_legend_is_shared_and_outside_every_panel():
  fig = plots.accuracy_vs_epsilon_figure(*_rows(with_worst=True))
  _assert_one_legend_outside_the_panels(fig)
  labels = [t.get_text() for t in fig.legends[0].get_texts()]
  # Each attack once (not once per panel), the worst case first.
  assert sorted(set(labels) & set(ATTACKS)) == sorted(ATTACKS)
  assert len(labels) == len(set(labels))
  assert labels[0] == f'{plots.WORST_CASE_LABEL} (per-example)'


def test_single_defense_single_attack():
  clean = [_clean_row('none')]
  attacked = [_attack_row(0, 0, e) for e in EPSILONS]
  fig = plots.accuracy_vs_epsilon_figure(clean, attacked)
  (ax,) = fig.axes
  assert ax.get_title() == 'none'
  (worst,) = _worst_lines(ax)
  assert worst.get_label() == f'{plots.WORST_CASE_LABEL} (single attack)'
  (attack,) = [l for l in ax.lines if l is not worst]
  assert attack.get_label() == ATTACKS[0]
  assert list(worst.get_ydata()) == list(attack.get_ydata()) == pytest.approx(
      [CLEAN['none']] + [r['accuracy'] for r in attacked])
  _assert_one_legend_outside_the_panels(fig)
  assert plots.accuracy_vs_epsilon(clean, attacked)[:8] == PNG_MAGIC


def test_attack_missing_at_some_epsilons():
  clean, attacked = _rows()
  # 'transfer' only at the largest epsilon, and without clean rows for 'none'.
  attacked = [r for r in attacked if r['attack'] != 'transfer' or r['epsilon'] == EPSILONS[-1]]
  clean = [r for r in clean if r['defense'] != 'none']
  fig = plots.accuracy_vs_epsilon_figure(clean, attacked)
  panels = {ax.get_title(): ax for ax in fig.axes}
  ax = panels['none']  # No clean row, so its curves start at the first epsilon.
  (transfer,) = [l for l in ax.lines if l.get_label() == 'transfer']
  assert list(transfer.get_xdata()) == [EPSILONS[-1]]
  (worst,) = _worst_lines(ax)
  assert list(worst.get_xdata()) == list(EPSILONS)
  expected = [min(max(0.0, _accuracy(0, a, e)) for a in range(len(ATTACKS))
                  if ATTACKS[a] != 'transfer' or e == EPSILONS[-1]) for e in EPSILONS]
  assert list(worst.get_ydata()) == pytest.approx(expected)
  (transfer1,) = [l for l in panels['sap(frac=1.0)'].lines if l.get_label() == 'transfer']
  assert list(transfer1.get_xdata()) == [0.0, EPSILONS[-1]]  # sap has its clean row.


def test_norms_get_their_own_panels_and_x_axes():
  clean, attacked = _rows()
  attacked += [_attack_row(0, a, e, norm='l2') for a in range(2) for e in (0.5, 1.5)]
  fig = plots.accuracy_vs_epsilon_figure(clean, attacked)
  titles = [ax.get_title() for ax in fig.axes]
  assert titles == [f'{d} ($\\ell_\\infty$)' for d in DEFENSES] + ['none ($\\ell_2$)']
  l2 = fig.axes[-1]
  assert r'\ell_2' in l2.get_xlabel()
  assert l2.get_xlim() != fig.axes[0].get_xlim()  # An l2 epsilon is not an l-inf one.
  assert l2.get_ylim() == fig.axes[0].get_ylim()


def test_nothing_to_draw_gives_none():
  clean = [_clean_row('none')]
  assert plots.accuracy_vs_epsilon_figure(clean, []) is None
  min_norm = {**_attack_row(0, 0, 0.1), 'norm': None, 'epsilon': None}  # e.g. C&W.
  assert plots.accuracy_vs_epsilon(clean, [min_norm]) is None


def test_report_writes_nonempty_png(tmp_path):
  clean, attacked = _rows(with_worst=True)
  report = new_report(config={'seed': 0}, dataset='digits', model='small_cnn')
  report['rows'] = clean + attacked
  paths = write_report(tmp_path, report)  # The caller, unchanged.
  png = tmp_path / 'accuracy_vs_epsilon.png'
  assert png in paths
  data = png.read_bytes()
  assert data[:8] == PNG_MAGIC and len(data) > 10_000


def _bins():
  conf = [0.05 + 0.1 * i for i in range(10)]
  return {'confidence': conf, 'accuracy': conf, 'count': [0, 1, 2, 3, 4, 5, 6, 7, 8, 300]}


def test_reliability_panels_share_one_outside_legend():
  clean = [{**_clean_row(d), 'ece': 0.01, 'calibration_bins': _bins()} for d in DEFENSES]
  fig = plots.reliability_figure(clean)
  assert [ax.get_title().split('\n')[0] for ax in fig.axes] == list(DEFENSES)
  _assert_one_legend_outside_the_panels(fig)
  bar_colours = {matplotlib.colors.to_rgba(p.get_facecolor()) for ax in fig.axes
                 for p in ax.patches}
  assert len(bar_colours) == 1


def test_sweep_legend_outside_and_labelled_axes():
  entry = {'defense': 'jump', 'param': 'kappa', 'values': [0.0, 0.5, 1.0, 1.5],
           'clean_accuracy': [0.98, 0.97, 0.9, 0.4], 'robust_accuracy': [0.0, 0.1, None, 0.2],
           'attack': 'pgd(steps=10)', 'epsilon': 0.1}
  fig = plots.sweep_figure(entry)
  (ax,) = fig.axes
  assert ax.get_xlabel() == 'kappa' and ax.get_ylabel() == 'accuracy'
  clean, robust = ax.lines
  assert clean.get_label() == 'clean' and 'pgd(steps=10)' in robust.get_label()
  assert clean.get_color() != robust.get_color()
  _assert_one_legend_outside_the_panels(fig)
  assert plots.sweep(entry)[:8] == PNG_MAGIC
