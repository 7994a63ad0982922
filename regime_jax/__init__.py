"""regime_jax: measure how ReLU networks train, on any JAX model, in any training loop.

The public API, in the style of optax: pure functions that return functions.

>>> import jax, jax.numpy as jnp, optax
>>> import regime_jax as rj
>>> def apply_fn(params, x):                       # any model: linen, NNX, plain JAX
...     return jnp.maximum(x @ params["w"], 0.0) @ params["v"]
>>> params = {"w": jnp.ones((3, 8)) / 3, "v": jnp.ones((8, 2))}
>>> probe_x = jax.random.normal(jax.random.key(0), (16, 3))
>>> preacts_fn = rj.capture_relus(apply_fn)      # finds every ReLU; no edit to the model
>>> monitor = rj.pattern_monitor(preacts_fn, probe_x)
>>> mstate = monitor.init(params)
>>> updates = jax.tree.map(lambda p: -0.01 * p, params)   # in your step: optax's updates
>>> metrics, mstate = monitor.update(mstate, optax.apply_updates(params, updates), updates)
>>> sorted(k for k in metrics if k.startswith("flip/"))
['flip/all', 'flip/relu_0']
"""

from regime_jax import bitmask, stability, timescales
from regime_jax.analyzer import MonitorState, PatternMonitor, pattern_monitor
from regime_jax.capture import CaptureError, capture_relus
from regime_jax.models.adapt import Net, nnx_apply
from regime_jax.records import load_run

__version__ = "0.2.0"

__all__ = [
    "CaptureError",
    "MonitorState",
    "Net",
    "PatternMonitor",
    "__version__",
    "bitmask",
    "capture_relus",
    "load_run",
    "nnx_apply",
    "pattern_monitor",
    "stability",
    "timescales",
]
