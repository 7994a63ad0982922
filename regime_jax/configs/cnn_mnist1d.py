r"""ReLU 1-D CNN (3 x conv32, max pool 2, dense 128) on MNIST-1D (embedded, offline), Adam.

``cnn_digits`` in 1-D, on MNIST-1D with ``mlp_mnist1d``'s batch size and length.

COMMAND:
  python -m regime_jax.main --config cnn_mnist1d --workdir runs/cnn_mnist1d
  (smoke test: --config cnn_mnist1d:quick)

EXPECTED (2 CPU cores): measured 35 s wall at load average ~2.5, 76 s at ~4 (the machine
  is shared; 3000 steps, every step recorded, probe 256); final eval/acc 0.916 (the MLP gets
  ~0.67; train acc reaches 1.0 by step ~1500). Flip rates decay: mean flip/all 2.9e-03 over
  the first 10% of steps vs 9.7e-05 over the last 10% (30x); step/abs/all falls
  5.0e-02 -> 2.2e-03 (23x) over the same windows.
"""

from regime_jax.configs import cnn_digits
from regime_jax.configs.base import smoke, variant


def get_config(arg: str | None = None):
    arg = variant(arg)
    c = cnn_digits.get_config()
    c.dataset.name, c.dataset.seed = "mnist1d", 42  # back to the generator seed of mlp_mnist1d
    c.batch_size, c.num_steps = 128, 3000
    c.model.dims, c.model.channels, c.model.kernel_size = 1, (32, 32, 32), 5
    c.model.dense = (128,)
    if arg == "quick":
        smoke(c, num_steps=40, probe_size=64)
        c.model.channels, c.model.dense = (8, 8), (16,)
    return c
