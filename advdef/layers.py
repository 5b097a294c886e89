"""Convolution and pooling primitives for advdef's models, with VJPs that run fast on XLA:CPU.

  canonical_conv   lax.conv_general_dilated with a VJP whose transposed convolution keeps
                   canonical dimension labels inside loops; on CPU, one-channel forward
                   passes on a 2x2 space-to-depth view and narrow input gradients as a matrix
                   product and an overlap-add. Passed to `nn.Conv(conv_general_dilated=...)`.
  max_pool         2x2 max pooling, stride 2, VALID, as a reshape with its own VJP.

Every choice here is measured (the figures are beside each one and in the README's
Performance section); values equal JAX's own operations up to float32 summation order
(tests/models_test.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Input channels below which a stride-1 convolution's input gradient is a matrix product and
# an overlap-add on XLA:CPU (`_overlap_add_input_gradient`): the images' own channels, 1 or 3.
# Eigen turns a transposed convolution into a matrix product with as many columns as input
# channels, which is slow when there are so few. Measured on 2 cores (2026-11-29), forward and
# input gradient of the whole model: lenet_like at batch 64 18.3 -> 10.8 ms, ResNet-20 at
# batch 32 91.7 -> 79.9 ms, small_cnn at batch 100 8.2 -> 6.3 ms. With 10 channels (lenet_like's
# conv2) it was slower in the model (17.3 -> 17.6 ms) though faster alone (3.0 -> 1.8 ms), and
# with 16 (ResNet-20's inner convolutions) 3x slower alone. A one-channel forward pass as a
# sum of kernel taps was 2.6x faster alone and 1.3x slower in the model (the space-to-depth
# view below is what the forward pass uses).
NARROW_INPUT_CHANNELS = 4

# Input channels for which a stride-1 convolution's forward pass runs on a 2x2 space-to-depth
# view on XLA:CPU (`_space_to_depth_conv`): Eigen's kernel for one input channel is slow
# (lenet_like's conv1 at batch 64: 3.2 ms alone, 1.5 ms through space-to-depth, with 1.44x
# the multiply-adds). Measured 2026-11-29 on 2 cores, a jitted PGD step (forward and input
# gradient) of the whole model, both variants in one process, timed alternately: lenet_like
# at batch 64 11.9 -> 9.4 ms, lenet5_caffe at batch 64 26.0 -> 22.8 ms, small_cnn at batch
# 100 9.4 -> 8.6 ms. With 3 channels (ResNet-20's first convolution) it was no faster
# (76.9 -> 76.7 ms), so it stays with one channel.
SPACE_TO_DEPTH_INPUT_CHANNELS = 1


def canonical_conv(lhs, rhs, window_strides, padding, **kwargs):
  """lax.conv_general_dilated with an input gradient that XLA:CPU runs fast inside loops.

  The input gradient of a convolution is a convolution whose kernel has its input and
  output feature axes swapped (`01oi`). XLA:CPU's convolution canonicalization, which turns
  that into the layout its fast (Eigen) kernels take, only rewrites convolutions of the
  entry computation: inside a `while` loop (a rolled attack loop) the swapped kernel falls
  to a generic kernel, measured 4x slower on a small CNN and about 6x on ResNet-20 (XLA in
  jax 0.10.2). This VJP hands the transposed convolution a kernel transposed in memory, so
  its dimension labels are canonical wherever it is compiled; the values are those of
  JAX's own VJP. Forward-mode differentiation (jvp) is not defined through it.

  On CPU (`lax.platform_dependent`; GPU and TPU keep the convolution), for NHWC stride-1
  convolutions without dilation or groups: one with SPACE_TO_DEPTH_INPUT_CHANNELS input
  channel runs its forward pass on a 2x2 space-to-depth view of the input; a 5x5 or larger
  one takes its input gradient on that view too (`_space_to_depth_input_gradient` says
  which); other ones with fewer than NARROW_INPUT_CHANNELS input channels take it as a matrix
  product and an overlap-add. Values equal the convolution's up to float32 summation order.
  """
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, kwargs.pop('dimension_numbers', None))
  out_axis, in_axis = dn.rhs_spec[0], dn.rhs_spec[1]
  dn_swapped = lax.ConvDimensionNumbers(dn.lhs_spec, (in_axis, out_axis) + tuple(dn.rhs_spec[2:]),
                                        dn.out_spec)
  conv = lambda l, r, numbers: lax.conv_general_dilated(l, r, window_strides, padding,
                                                         dimension_numbers=numbers, **kwargs)
  pads = _stride_one_pads(lhs.shape, rhs.shape, dn, window_strides, padding, kwargs)
  # The CPU-only routes (None: the plain convolution everywhere), chosen at trace time.
  cpu_forward = cpu_input_gradient = None
  if pads is not None:
    if rhs.shape[in_axis] == SPACE_TO_DEPTH_INPUT_CHANNELS:
      cpu_forward = lambda l, r: _space_to_depth_conv(l, r, pads)
    # The transposed convolution pads by kernel - 1 - pad, which must not be negative.
    if (_space_to_depth_input_gradient(rhs.shape) and max(pads[0]) < rhs.shape[0]
        and max(pads[1]) < rhs.shape[1]):
      cpu_input_gradient = lambda g, r: _space_to_depth_transposed_conv(g, r, pads)
    elif rhs.shape[in_axis] < NARROW_INPUT_CHANNELS:
      cpu_input_gradient = lambda g, r: _overlap_add_input_gradient(g, r, lhs.shape, pads)

  def on_cpu(cpu, default, *args):
    return default(*args) if cpu is None else lax.platform_dependent(*args, cpu=cpu,
                                                                      default=default)

  def input_gradient(g, r, l):
    r_swapped = jnp.swapaxes(r, out_axis, in_axis)  # the kernel, O and I swapped in memory
    return jax.vjp(lambda l: conv(l, r_swapped, dn_swapped), l)[1](g)[0]

  forward_conv = lambda l, r: on_cpu(cpu_forward, lambda l, r: conv(l, r, dn), l, r)

  @jax.custom_vjp
  def convolve(l, r):
    return forward_conv(l, r)

  def forward(l, r):  # l, r: CustomVJPPrimal (symbolic_zeros), r.perturbed False in attacks
    return forward_conv(l.value, r.value), (l.value, r.value, l.perturbed, r.perturbed)

  def backward(residuals, g):
    l, r, lhs_perturbed, rhs_perturbed = residuals
    if isinstance(g, jax.custom_derivatives.SymbolicZero):  # the output did not matter
      return None, None
    # Only the cotangents asked for: an attack's kernel is a constant, and the kernel
    # gradient (a grouped convolution) has no batching rule under a sharded vmap.
    dl = (on_cpu(cpu_input_gradient, lambda g, r: input_gradient(g, r, l), g, r)
          if lhs_perturbed else None)
    dr = jax.vjp(lambda r: conv(l, r, dn), r)[1](g)[0] if rhs_perturbed else None
    return dl, dr

  convolve.defvjp(forward, backward, symbolic_zeros=True)
  return convolve(lhs, rhs)


def _stride_one_pads(lhs_shape, rhs_shape, dn, window_strides, padding, kwargs):
  """((top, bottom), (left, right)), nonnegative, for a convolution the CPU-only routes take
  (NHWC input and output, an HWIO kernel, stride 1, no dilation or groups); else None."""
  nhwc, hwio = (0, 3, 1, 2), (3, 2, 0, 1)
  if (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) != (nhwc, hwio, nhwc):
    return None
  if len(lhs_shape) != 4 or any(s != 1 for s in window_strides):
    return None
  for name in ('lhs_dilation', 'rhs_dilation'):
    if kwargs.get(name) is not None and any(d != 1 for d in kwargs[name]):
      return None
  if kwargs.get('feature_group_count', 1) != 1 or kwargs.get('batch_group_count', 1) != 1:
    return None
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs_shape[1:3], rhs_shape[0:2], window_strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if any(lo < 0 or hi < 0 for lo, hi in pads):
    return None
  return pads


def _space_to_depth_conv(x, w, pads):
  """A stride-1 NHWC/HWIO convolution computed on a 2x2 space-to-depth view of its input.

  Output pixel (2p + a, 2q + c) reads input rows 2p + a + i = 2P + s, so with the input's
  2x2 blocks as channels (s, t, I) and the output's as channels (a, c, O), the convolution is
  one of ceil((kh + 1) / 2) x ceil((kw + 1) / 2) taps from 4I to 4O channels, whose kernel
  holds w's taps (and zeros) at fixed places. Same values as the direct convolution up to
  float32 summation order.

  x: [B, H, W, I]; w: [kh, kw, I, O]; pads: ((top, bottom), (left, right)), nonnegative.
  Returns [B, Ho, Wo, O] with Ho = H + top + bottom - kh + 1 (and Wo likewise).
  """
  b, h, wd, ci = x.shape
  kh, kw, _, co = w.shape
  (top, bottom), (left, right) = pads
  ho, wo = h + top + bottom - kh + 1, wd + left + right - kw + 1
  ho2, wo2 = -(-ho // 2), -(-wo // 2)            # output blocks (an odd edge is cropped)
  dh, dw = kh // 2 + 1, kw // 2 + 1              # taps of the blocked kernel
  hp, wp = 2 * (ho2 + dh - 1), 2 * (wo2 + dw - 1)  # padded input the blocks read
  x = jnp.pad(x, ((0, 0), (top, hp - h - top), (left, wp - wd - left), (0, 0)))
  blocks = x.reshape(b, hp // 2, 2, wp // 2, 2, ci).transpose(0, 1, 3, 2, 4, 5)
  blocks = blocks.reshape(b, hp // 2, wp // 2, 4 * ci)
  # where[dp, dq, s, t, a, c]: the tap of w that blocked tap (dp, dq) applies from input
  # phase (s, t) to output phase (a, c); kh * kw (a zero row) where there is none.
  where = np.full((dh, dw, 2, 2, 2, 2), kh * kw, np.int32)
  for a in range(2):
    for c in range(2):
      for i in range(kh):
        for j in range(kw):
          (dp, s), (dq, t) = divmod(a + i, 2), divmod(c + j, 2)
          where[dp, dq, s, t, a, c] = i * kw + j
  taps = jnp.concatenate([w.reshape(kh * kw, ci, co), jnp.zeros((1, ci, co), w.dtype)])
  kernel = taps[where].transpose(0, 1, 2, 3, 6, 4, 5, 7).reshape(dh, dw, 4 * ci, 4 * co)
  y = lax.conv_general_dilated(blocks, kernel, (1, 1), 'VALID',
                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  y = y.reshape(b, ho2, wo2, 2, 2, co).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(b, 2 * ho2, 2 * wo2, co)[:, :ho, :wo]


def _space_to_depth_input_gradient(kernel_shape) -> bool:
  """Whether a stride-1 convolution with an HWIO kernel of this shape takes its input
  gradient on the space-to-depth view on CPU.

  Measured 2026-11-29 on 2 cores, a jitted PGD step of the whole model, variants compiled in
  one process and timed alternately (medians of 60-100 steps): lenet_like at batch 64 9.65 ms
  with the overlap-add and Eigen input gradients, 8.40 with conv1's (5x5, 1 -> 10) on the
  view, 8.10 with conv2's (5x5, 10 -> 20), 7.22 with both; lenet5_caffe 19.5 ms, 18.2 with
  conv2's (5x5, 20 -> 50), but 23.0 with conv1's (5x5, 1 -> 20); small_cnn's 3x3 kernels
  were slower on the view (9.2 -> 9.8 ms for conv1, 14.3 for conv2: a 3x3 kernel becomes 2x2
  blocked taps, 1.78x the multiply-adds, against 1.44x for 5x5).
  """
  kh, kw, in_channels, out_channels = kernel_shape
  return min(kh, kw) >= 5 and (in_channels > 1 or out_channels <= 16)


def _space_to_depth_transposed_conv(g, w, pads):
  """The input gradient of a stride-1 NHWC/HWIO convolution with `pads`, computed as the
  full convolution of the output cotangent g [B, Ho, Wo, O] with the flipped, transposed
  kernel on the space-to-depth view (`_space_to_depth_conv`). Returns [B, H, W, I]."""
  kh, kw = w.shape[0], w.shape[1]
  (top, bottom), (left, right) = pads
  flipped = jnp.flip(w, (0, 1)).swapaxes(2, 3)  # [kh, kw, O, I]
  return _space_to_depth_conv(
      g, flipped, ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right)))


def _overlap_add_input_gradient(g, r, l_shape, pads):
  """Input gradient of a stride-1 NHWC/HWIO convolution: per-tap matrix product, then overlap-add.

  g: [B, Ho, Wo, O] output cotangent; r: [kh, kw, I, O]; returns [B, H, W, I] = l_shape.
  """
  kh, kw = r.shape[0], r.shape[1]
  taps = jnp.einsum('bhwo,xyio->bhwxyi', g, r)            # each output's share of each input
  out = None
  for i in range(kh):
    for j in range(kw):
      term = jnp.pad(taps[:, :, :, i, j, :], ((0, 0), (i, kh - 1 - i), (j, kw - 1 - j), (0, 0)))
      out = term if out is None else out + term
  (top, _), (left, _) = pads  # `out` covers the padded input; crop the padding away
  # Materialized once: fused into its consumers, the 9-25 term sum was recomputed by each of
  # them (ResNet-20 at batch 32: 89 ms without the barrier, 80 ms with it).
  return lax.optimization_barrier(out[:, top:top + l_shape[1], left:left + l_shape[2], :])


def max_pool(x):
  """2x2 max pooling, stride 2, VALID (an odd last row or column is dropped): [..., H, W, C].

  Any leading batch dimensions are allowed, as with `nn.max_pool`.

  Values and gradients equal `nn.max_pool(x, (2, 2), strides=(2, 2))`, ties included (the
  gradient goes to the first maximum of each window in row-major order, as XLA's
  select-and-scatter routes it). Written as a reshape because XLA:CPU's select-and-scatter,
  the gradient of `nn.max_pool`, is slow: 4.7 ms against 0.7 ms for this VJP on a
  64x24x24x10 map (lenet_like's first pool; 2-core CPU), a sixth of a PGD step there.
  """
  *batch, h, w, c = x.shape
  x = x.reshape((-1, h, w, c))[:, :h - h % 2, :w - w % 2]
  out = _pool_2x2(x)
  return out.reshape((*batch, *out.shape[1:]))


@jax.custom_vjp
def _pool_2x2(x):
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _pool_2x2_forward(x):
  b, h, w, c = x.shape
  windows = x.reshape(b, h // 2, 2, w // 2, 2, c)
  out = windows.max(axis=(2, 4))
  # Which element of each window takes the gradient: the first maximum in row-major order
  # (0-3), or 4 where none equals the maximum (a NaN window), as select-and-scatter routes it.
  first = jnp.full(out.shape, 4, jnp.int8)
  for k, (i, j) in reversed(tuple(enumerate(((0, 0), (0, 1), (1, 0), (1, 1))))):
    first = jnp.where(windows[:, :, i, :, j, :] == out, jnp.int8(k), first)
  return out, first


def _pool_2x2_backward(first, g):
  # One elementwise pass over the input's shape (a stack of four masked parts ran 1.5 ms on
  # lenet_like's first pool at batch 64; this made the PGD step 0.4 ms faster).
  b, h2, w2, c = g.shape
  shape = (1, 1, 2, 1, 2, 1)
  position = (2 * lax.broadcasted_iota(jnp.int8, shape, 2)
              + lax.broadcasted_iota(jnp.int8, shape, 4))
  gx = jnp.where(first[:, :, None, :, None, :] == position, g[:, :, None, :, None, :],
                 jnp.zeros((), g.dtype))
  return (gx.reshape(b, 2 * h2, 2 * w2, c),)


_pool_2x2.defvjp(_pool_2x2_forward, _pool_2x2_backward)
