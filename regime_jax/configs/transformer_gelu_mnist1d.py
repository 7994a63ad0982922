r"""``transformer_mnist1d`` with a GELU FFN: sign patterns beyond ReLU (opt-in).

The FFN applies ``flax.linen.gelu`` (the tanh form); ``record.activations=("gelu",)`` opts
in, so each FFN unit's bit is the sign of its pre-activation ``z > 0`` (as for ReLU; for GELU
``gelu(z) > 0 <=> z > 0``), keyed ``block<i>/ffn/fc1:gelu``. Flips, dead / always-on, decay
times and the lag ratio are measured as for ReLU; with ``decouple.freeze_step`` the frozen
gates give ``z_values * Phi(z_gates)`` (docs/guide/capture.md).

COMMAND:
  python -m regime_jax.main --config transformer_gelu_mnist1d --workdir runs/transformer_gelu
  (smoke test: --config transformer_gelu_mnist1d:quick)

EXPECTED: as transformer_mnist1d (same data, model size and optimizer; 2000 steps, ~4 min on
  2 CPU cores); flip/block<i>/ffn/fc1:gelu rows instead of flip/block<i>/ffn/fc1.
"""

from regime_jax.configs import transformer_mnist1d
from regime_jax.configs.base import smoke, variant


def get_config(arg: str | None = None):
    arg = variant(arg)
    c = transformer_mnist1d.get_config()
    c.model.activation = "gelu"  # the FFN's activation (flax's nn.gelu, tanh form)
    c.record.activations = ("gelu",)  # opt in: record the sign of GELU pre-activations
    if arg == "quick":
        smoke(c, num_steps=40, probe_size=64)
        transformer_mnist1d.shrink(c)
    return c
