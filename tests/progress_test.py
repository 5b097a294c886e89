"""advdef.progress: one redrawn line on a terminal, throttled; silence elsewhere; the ETA."""

import io

import pytest

from advdef import progress


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


class FakeStream(io.StringIO):
  def __init__(self, tty):
    super().__init__()
    self.tty = tty

  def isatty(self):
    return self.tty


def _bar(tty, **kwargs):
  clock, stream = FakeClock(), FakeStream(tty)
  return progress.Progress('[eval] suite', stream=stream, clock=clock, width=200,
                           **kwargs), clock, stream


def test_eta_is_elapsed_per_unit_done_times_units_left():
  bar, clock, _ = _bar(False)
  assert bar.eta(0, 10) is None  # nothing done yet: no rate
  clock.now += 30.0
  assert bar.eta(3, 10) == pytest.approx(70.0)  # 10 s per unit, 7 left
  assert bar.eta(2.5, 10) == pytest.approx(90.0)  # a unit partly done counts by its share
  assert bar.eta(10, 10) == 0.0
  assert bar.summary(3, 10) == '3/10 rows, ~70 s left'
  assert bar.summary(10, 10) == '10/10 rows'


def test_skipped_units_stay_out_of_the_rate():
  bar, clock, _ = _bar(False)
  bar.skip(4)  # e.g. four rows reused from an earlier run, at no cost
  clock.now += 20.0
  assert bar.eta(4, 10) is None
  assert bar.summary(4, 10) == '4/10 rows'
  assert bar.eta(6, 10) == pytest.approx(40.0)  # 2 costly units in 20 s, 4 left


@pytest.mark.parametrize('seconds,text', [(0.4, '<1 s'), (1, '1 s'), (45, '45 s'), (89, '89 s'), (90, '2 min'),
                                          (12 * 60 + 20, '12 min'), (89 * 60, '89 min'),
                                          (3.5 * 3600, '3.5 h')])
def test_format_seconds(seconds, text):
  assert progress.format_seconds(seconds) == text


def test_off_a_terminal_only_written_lines_appear():
  bar, clock, stream = _bar(False)
  for i in range(5):
    clock.now += 1.0
    bar.update(i, 5, 'sap | pgd', f'batch {i}/5')
  assert stream.getvalue() == ''
  bar.write('[eval] row done')
  bar.close()
  assert stream.getvalue() == '[eval] row done\n'


def test_on_a_terminal_one_line_is_redrawn_at_most_twice_a_second():
  bar, clock, stream = _bar(True)
  bar.update(0, 4, 'none | pgd', 'attack batch 1/8')
  first = stream.getvalue()
  assert first == '\r[eval] suite 0/4 rows · none | pgd · attack batch 1/8'
  clock.now += 0.2
  bar.update(0.5, 4, 'none | pgd', 'attack batch 4/8')  # too soon: not drawn
  assert stream.getvalue() == first
  clock.now += 0.3
  bar.update(1, 5, 'none | square', '')  # 0.5 s after the first draw: 0.5 s a unit, 4 left
  redraw = stream.getvalue()[len(first):]
  assert redraw.rstrip(' ') == '\r[eval] suite 1/5 rows · none | square · ~2 s left'
  assert '\n' not in stream.getvalue()


def test_a_shorter_line_blanks_the_rest_of_the_longer_one():
  bar, clock, stream = _bar(True)
  bar.update(0, 2, 'a long label here')
  long = stream.getvalue()[1:]
  clock.now += 1.0
  stream.seek(0)
  stream.truncate()
  bar.update(1, 2, 'x')
  new = '[eval] suite 1/2 rows · x · ~1 s left'
  assert stream.getvalue() == '\r' + new + ' ' * (len(long) - len(new))  # spaces over the rest


def test_write_replaces_the_line_and_the_next_update_draws_at_once():
  bar, clock, stream = _bar(True)
  bar.update(0, 2, 'label')
  line = stream.getvalue()[1:]
  stream.seek(0)
  stream.truncate()
  bar.write('[eval] finished a row')
  blank = '\r' + ' ' * len(line) + '\r'
  assert stream.getvalue() == blank + '[eval] finished a row\n'
  bar.close()  # nothing left to clear
  assert stream.getvalue() == blank + '[eval] finished a row\n'
  clock.now += 0.1  # within the throttle interval, but the line is gone: drawn now
  bar.update(1, 2, 'next')
  assert stream.getvalue().endswith('\n\r[eval] suite 1/2 rows · next · ~<1 s left')
  stream.seek(0)
  stream.truncate()
  bar.close()
  assert stream.getvalue().startswith('\r ') and stream.getvalue().endswith(' \r')


def test_lines_are_cut_to_the_terminal_width():
  clock, stream = FakeClock(), FakeStream(True)
  bar = progress.Progress('[eval] suite', stream=stream, clock=clock, width=30)
  bar.update(0, 3, 'a label far longer than thirty characters')
  assert stream.getvalue() == '\r' + '[eval] suite 0/3 rows · a label far'[:29]


def test_stream_without_isatty_counts_as_not_a_terminal():
  stream = io.StringIO()
  del_isatty = type('NoTTY', (), {'write': stream.write, 'flush': stream.flush})()
  bar = progress.Progress('[eval] x', stream=del_isatty)
  bar.update(0, 1, 'label')
  assert not bar.tty and stream.getvalue() == ''
