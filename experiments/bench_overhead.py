r"""Benchmark (not a test): what does monitoring cost per step?

COMMAND:
  python experiments/bench_overhead.py        # MLP 784-512-512-10, batch 128, probe 1024
  python experiments/bench_overhead.py --hidden 1024,1024 --probe 4096 --chunks 20

Times per step, median over chunks of steps after compilation, in one process, interleaved.
Built-in step (regime_jax's linen MLP and train step):
  plain      the train step alone (loss, grads, optax update);
  +probe     the train step plus a bare forward pass of the probe set (logits reduced so XLA
             cannot drop it);
  monitored  regime_jax's recording step (update, probe pre-activations, packed masks, flip
             rates against the previous masks, dead/always-on, step sizes).
User loop (an unmodified linen MLP with nn.relu, a plain optax step written as a user would):
  user       the user's step alone;
  user+probe the user's step plus a bare probe forward;
  user+mon   the user's step plus ``monitor.update`` of ``rj.pattern_monitor(rj.capture_relus(
             model.apply), probe_x)``.
Prints the ratio monitored / (+probe) (of the medians, and the median of the ratios within
each interleaved round, which cancels the VM's drift), the bytes stored per pattern, and
each variant's XLA-counted FLOPs per step over its time next to a same-process matmul
FLOP/s figure.
Inputs are random normal arrays of the requested shape: this measures time, not learning.

EXPECTED (2 CPU cores): ratio <= 1.05; the figures measured are in README.md.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import regime_jax as rj
from regime_jax import bitmask, models, step
from regime_jax.models.adapt import as_net


def _plain_step(state, batch, probe, *, model, tx, forward_probe):
    net = as_net(model)
    (loss, _), grads = jax.value_and_grad(step._loss_fn, has_aux=True)(state.params, batch, net)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    out = {"train/loss": loss}
    if forward_probe:
        out["probe"] = jnp.sum(net.apply(params, probe["x"]))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), out, None


class UserMLP(nn.Module):
    """The user's own model: nn.relu, nothing from regime_jax."""

    hidden: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(10)(x)


def _user_step(state, batch, probe, *, apply_fn, tx, monitor, mode):
    """A user's optax step; ``mode``: "plain", "probe" (+ bare forward) or "monitor"."""
    params, opt_state, mstate = state

    def loss_fn(p):
        logits = apply_fn(p, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    out = {"train/loss": loss}
    if mode == "probe":
        out["probe"] = jnp.sum(apply_fn(params, probe["x"]))
    if mode == "monitor":
        metrics, mstate = monitor.update(mstate, params, updates, probe_x=probe["x"])
        out.update(metrics)
    return (params, opt_state, mstate), out, None


def _time_chunk(fn, state, batch, probe, steps):
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics, _ = fn(state, batch, probe)
    jax.block_until_ready((state, metrics))
    return state, (time.perf_counter() - start) / steps


def _flops(fn, *args) -> float:
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan")))


def _matmul_flops_per_s(n: int = 1024, reps: int = 20) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n))
    mm = jax.jit(lambda a: a @ a)
    mm(a).block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        mm(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", type=int, default=784)
    p.add_argument("--hidden", default="512,512")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--probe", type=int, default=1024)
    p.add_argument("--chunks", type=int, default=80)
    p.add_argument("--chunk-steps", type=int, default=10)
    args = p.parse_args()
    hidden = tuple(int(h) for h in args.hidden.split(","))
    model = models.create_model({"name": "mlp", "hidden": hidden}, 10)
    tx = optax.sgd(0.01, momentum=0.9)
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    batch = {
        "x": jax.random.normal(kx, (args.batch, args.input)),
        "y": jax.random.randint(ky, (args.batch,), 0, 10),
    }
    probe = {"x": jax.random.normal(kp, (args.probe, args.input))}

    user = UserMLP(hidden)
    user_apply = user.apply
    monitor = rj.pattern_monitor(rj.capture_relus(user_apply), probe["x"])

    def fresh_user_state():
        params = user.init(jax.random.key(1), probe["x"][:1])
        return params, tx.init(params), monitor.init(params)

    def fresh_state():
        return step.create_train_state(model, tx, jax.random.key(1), probe["x"])

    def user_variant(mode):
        step = functools.partial(_user_step, apply_fn=user_apply, tx=tx, monitor=monitor, mode=mode)
        return jax.jit(step, donate_argnames="state")

    fresh = {name: fresh_state for name in ("plain", "+probe", "monitored")}
    fresh |= {name: fresh_user_state for name in ("user", "user+probe", "user+mon")}
    variants = {
        "plain": jax.jit(
            functools.partial(_plain_step, model=model, tx=tx, forward_probe=False),
            donate_argnames="state",
        ),
        "+probe": jax.jit(
            functools.partial(_plain_step, model=model, tx=tx, forward_probe=True),
            donate_argnames="state",
        ),
        "monitored": step.make_step_fns(model, tx)[True],
        "user": user_variant("plain"),
        "user+probe": user_variant("probe"),
        "user+mon": user_variant("monitor"),
    }
    flops = {name: _flops(fn, fresh[name](), batch, probe) for name, fn in variants.items()}
    states = {name: fresh[name]() for name in variants}
    for name, fn in variants.items():  # compile + warm up
        states[name], _ = _time_chunk(fn, states[name], batch, probe, 3)
    times = {name: [] for name in variants}
    for _ in range(args.chunks):  # interleaved so drift hits every variant alike
        for name, fn in variants.items():
            states[name], t = _time_chunk(fn, states[name], batch, probe, args.chunk_steps)
            times[name].append(t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    peak = _matmul_flops_per_s()

    print(
        f"MLP {args.input}-{'-'.join(map(str, hidden))}-10, batch {args.batch}, "
        f"probe {args.probe}, backend {jax.default_backend()}, {jax.device_count()} device(s)"
    )
    for name in variants:
        rate = flops[name] / med[name]
        print(
            f"  {name:<11} {med[name] * 1e3:8.3f} ms/step   {flops[name] / 1e9:7.3f} GFLOP/step"
            f"   {rate / 1e9:7.2f} GFLOP/s"
        )
    for label, mon, base in (
        ("built-in", "monitored", "+probe"),
        ("user loop", "user+mon", "user+probe"),
    ):
        ratio = med[mon] / med[base]
        paired = statistics.median(m / p for m, p in zip(times[mon], times[base], strict=True))
        print(
            f"  {label}: ratio {mon} / {base} = {ratio:.3f} (medians), "
            f"{paired:.3f} (median of per-round ratios)  (bar: <= 1.05)"
        )
    print(f"  monitoring cost over plain: {med['monitored'] / med['plain']:.2f}x")
    per_example = sum(bitmask.num_bytes(u) for u in hidden)
    print(
        f"  pattern bytes: {per_example} per probe example ({sum(hidden)} units, 1 bit each), "
        f"{per_example * args.probe / 1024:.1f} KiB per record step; float32 pre-activations "
        f"would be {4 * sum(hidden) * args.probe / 1024:.1f} KiB"
    )
    print(f"  matmul 1024^3 in this process: {peak / 1e9:.2f} GFLOP/s")


if __name__ == "__main__":
    main()
