r"""The decoupling experiment: freeze the activation patterns once they settle, keep training.

For every setting x optimizer x seed: full training (``never``), a freeze where the online
settle detector triggers (``auto``), and freezes at 0, 0.25, 0.5, 1 and 2 x T(flip), with
T(flip) the full run's flip decay time (main rule, settle). From the freeze step on every
ReLU's on/off comes from the parameters at that step (the gates) and the parameters keep
training through the gated network (README "Decoupling"). The report compares each with
full training of the same seed: final val accuracy and loss with the gap (mean, 95% CI), a
figure of accuracy against the freeze step, the frozen phase's wall-clock per step against
the ordinary phase's, and the online detector's T(flip) against the offline rule's.

COMMAND:
  python -m regime_jax.sweep --config decoupled --workdir runs/decoupled
  python -m regime_jax.report --workdir runs/decoupled   # rebuild the report
  (smoke test: --config decoupled:quick --workdir /tmp/decoupled_quick)

EXPECTED (2 CPU cores, 2026-11-24): the full sweep, 4 settings x 2 optimizers x 5 seeds x 7
  variants = 280 runs, took 53 min (the machine shared with a test run part of the time);
  :quick, 14 runs of 200 steps, about 1 min. At 1 x T(flip) the final val accuracy is within
  0.4 points of full training except MLP / MNIST-1D / Adam (-1.0); at 2 x T(flip) no gap;
  frozen at step 0, MLP / MNIST-1D loses 12 points (table and caveats: README "Decoupling").

The settings are the reproduction grid's base settings (``reproduce``: MLP / MNIST-1D,
MLP / digits, CNN / digits, a 1-block Transformer / MNIST-1D) with constant-rate SGD and Adam
(the Transformer keeps its own cosine schedule with warmup). ``never`` and ``auto`` record
flips at every step (T(flip) and the detector read the same series); the fixed freezes
record every 10 steps, which is all the report reads from them.
"""

import ml_collections

from regime_jax.configs import reproduce
from regime_jax.configs.base import variant


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = variant(arg)
    c = reproduce.get_config("quick" if arg == "quick" else None)
    c.optimizers = {k: v for k, v in c.optimizers.items() if k in ("sgd", "adam")}
    if arg != "quick":
        c.settings = [s for s in c.settings if not s["name"].endswith("_long")]
    c.freeze = dict(
        multiples=[0.0, 0.25, 0.5, 1.0, 2.0],
        auto=True,
        overrides={"record": {"every_steps": 10, "snapshot_every_steps": 100}},
    )
    if arg == "quick":
        c.settings = c.settings[:1]  # MLP / MNIST-1D, 200 steps
        c.optimizers = {"adam": c.optimizers["adam"]}
        c.overrides = dict(c.overrides) | {
            "decouple": {"check_every_steps": 10, "online": {"window": 5, "patience": 3}}
        }
        c.freeze.overrides = {"record": {"every_steps": 5, "snapshot_every_steps": 5}}
    return c
