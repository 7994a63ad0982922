r"""ReLU MLP 40-256-256-10 on MNIST-1D (embedded, offline), SGD + momentum, flips every step.

The main job; every other config derives from it (see ``regime_jax.configs``).

COMMAND:
  python -m regime_jax.main --config mlp_mnist1d --workdir runs/mlp_mnist1d
  (smoke test: --config mlp_mnist1d:quick, a few seconds)

EXPECTED (2 CPU cores, 2026-12-08): 7.8 s wall (3000 steps, every step recorded, probe 512); final
  eval/acc 0.675 (train loss ~0.002: it overfits 4000 examples); flip/all falls from ~5e-3
  per step over the first 300 steps to ~6e-5 at the end, step/abs/all from ~0.12 to ~2e-3.
"""

from regime_jax.configs.base import base_config, smoke, variant


def get_config(arg: str | None = None):
    arg = variant(arg)
    c = base_config()
    # The defaults are this experiment; stated here because its figures above depend on them.
    c.dataset.name = "mnist1d"
    c.model.hidden = (256, 256)
    c.num_steps = 3000
    if arg == "quick":
        smoke(c, num_steps=40, probe_size=64)
    return c
