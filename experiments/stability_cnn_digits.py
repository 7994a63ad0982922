r"""The local-stability probe during training: the 2-D CNN of cnn_digits.py on 8x8 digits.

Same probe as stability_mlp_mnist1d.py (16 random unit directions, 12 radii 1e-6 .. 1, at
step 0, the last step and 12 log-spaced steps between) on a CNN, whose patterns include every
spatial position of every conv layer.

COMMAND:
  python -m regime_jax.main --config experiments/stability_cnn_digits.py \
    --workdir runs/stability_cnn_digits
  python -m regime_jax.report --run runs/stability_cnn_digits   # figures in <run>/figures
  (smoke test: --config experiments/stability_cnn_digits.py:quick)

EXPECTED (2 CPU cores): 2 min 29 s wall (while another job shared the cores); final eval/acc
  0.989. At init only 0.4% of (direction, example) pairs keep their pattern even at eps=1e-6,
  and the median stability radius and first-order radius are 0: the digits' blank border
  pixels meet conv units whose biases are initialized to exactly 0, so z == 0 exactly, the
  theorem's measure-zero exception, hit by real data. After training (biases moved off 0)
  every pattern is kept up to eps=5e-4; kept 0.72 at 2e-2; median radius 0.015.
"""

import importlib.util
from pathlib import Path

from regime_jax.config import variant


def _cnn_digits(arg):
    path = Path(__file__).with_name("cnn_digits.py")
    spec = importlib.util.spec_from_file_location("cnn_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str | None = None):
    arg = variant(arg)
    c = _cnn_digits(arg)
    c.stability.num_points = 12
    c.stability.probe_size = min(256, c.probe.size)
    c.stability.refine = 2
    if arg == "quick":
        c.stability.probe_size, c.stability.num_points = 32, 3
        c.stability.num_directions, c.stability.num_radii, c.stability.refine = 4, 6, 0
    return c
