r"""The local-stability test during training: the 2-D CNN of cnn_digits on 8x8 digits.

``cnn_digits`` (its ``:quick`` too) with the probe of ``stability_mlp_mnist1d`` (16 random
unit directions, 12 radii 1e-6 .. 1, at step 0, the last step and 12 log-spaced steps between)
on a CNN, whose patterns include every spatial position of every conv layer.

COMMAND:
  python -m regime_jax.main --config stability_cnn_digits --workdir runs/stability_cnn_digits
  python -m regime_jax.report --run runs/stability_cnn_digits   # figures in <run>/figures
  (smoke test: --config stability_cnn_digits:quick)

EXPECTED (2 CPU cores): 2 min 29 s wall (while another job shared the cores); final eval/acc
  0.989. At init only 0.4% of (direction, example) pairs keep their pattern even at eps=1e-6,
  and the median stability radius and first-order radius are 0: the digits' blank border
  pixels meet conv units whose biases are initialized to exactly 0, so z == 0 exactly, the
  theorem's measure-zero exception, hit by real data. After training (biases moved off 0)
  every pattern is kept up to eps=5e-4; kept 0.72 at 2e-2; median radius 0.015.
"""

from regime_jax.configs import cnn_digits, stability_mlp_mnist1d
from regime_jax.configs.base import variant


def get_config(arg: str | None = None):
    arg = variant(arg)
    return stability_mlp_mnist1d.with_probe(cnn_digits.get_config(arg), arg)
