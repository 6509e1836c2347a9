"""CPU-friendly formulations of convolution and pooling, with hand-written gradients.

XLA:CPU runs some convolution-network ops far slower than the arithmetic needs (measured
on a 2-core AMD EPYC, BENCHMARKS.md section 3): grouped (depthwise) convolutions, 1x1
convolutions and their gradients, select-and-scatter (the max-pool gradient), and the
zero-interleaved or transposed copies of large activations that strided gradients
make. Each function here computes the same values as the lax op it replaces, with a
custom VJP that keeps every gradient a dense elementwise pass or a GEMM:

* `depthwise_conv_shifted`: k*k shifted multiply-adds; a polyphase kernel gradient
  accumulated over cache-sized batch chunks, and for kernels above 3x3 an input
  gradient taken as a correlation of the once-padded output gradient.
* `pointwise_conv`: an unpadded 1x1 convolution as one matmul.
* `max_pool_shifted`: max of shifted slices, gradient by PyTorch's first-maximum rule.
* `conv_max_pool`: a dense convolution followed by a max pool (a stem), whose kernel
  gradient is taken per polyphase component of the pool, as GEMMs over im2col patches,
  without materialising the convolution's full-resolution gradient.
* `conv_same`: a stride-1 dense convolution whose gradients keep their speed inside a
  lax.scan (XLA:CPU's own slow down about 20x there).

`fgjax.models.layers` decides when to use the first four (CPU, `conv_impl`);
Coarse2Fine's up-sampler, which pre-trains in a lax.scan, calls `conv_same` itself.
They are plain JAX and run, and differentiate, on any backend.
"""

from fgjax.models.cpu_ops.dense import conv_max_pool, conv_same
from fgjax.models.cpu_ops.pooling import max_pool_shifted, pool_geometry
from fgjax.models.cpu_ops.separable import depthwise_conv_shifted, pointwise_conv

__all__ = ["conv_max_pool", "conv_same", "depthwise_conv_shifted", "max_pool_shifted",
           "pointwise_conv", "pool_geometry"]
