r"""Benchmark (not a test): what does monitoring cost per step?

COMMAND:
  python experiments/bench_overhead.py        # MLP 784-512-512-10, batch 128, probe 1024
  python experiments/bench_overhead.py --hidden 1024,1024 --probe 4096 --chunks 20
  python experiments/bench_overhead.py --model cnn_cifar10   # CNN on CIFAR-10 shapes
  python experiments/bench_overhead.py --model vit_cifar10   # ViT on CIFAR-10 shapes
  (an accelerator run: the three commands above plus the MLP on MNIST shapes, the default)

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
With ``--model NAME`` the built-in variants use that packaged config's model on inputs of its
dataset's shape (CIFAR-10: 32x32x3); the user-loop variants exist for the MLP only. The
figure printed last is the memory of one set of packed masks (the monitor's state).
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
from regime_jax import configs, models
from regime_jax.models.adapt import as_net
from regime_jax.run import step


def _plain_step(state, batch, probe, *, model, tx, forward_probe):
    net = as_net(model)

    def loss_fn(params):  # the built-in step's loss, without its monitor
        return step.cross_entropy(net.apply(params, batch["x"]), batch["y"]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
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


SHAPES = {"cnn_cifar10": (32, 32, 3), "vit_cifar10": (32, 32, 3)}  # packaged config -> x shape
USER_MODES = {"user": "plain", "user+probe": "probe", "user+mon": "monitor"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mlp", choices=("mlp", *SHAPES))
    p.add_argument("--input", type=int, default=784)
    p.add_argument("--hidden", default="512,512")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--probe", type=int, default=1024)
    p.add_argument("--chunks", type=int, default=80)
    p.add_argument("--chunk-steps", type=int, default=10)
    args = p.parse_args()
    hidden = tuple(int(h) for h in args.hidden.split(","))
    if args.model == "mlp":
        model, x_shape = models.create_model({"name": "mlp", "hidden": hidden}, 10), (args.input,)
    else:
        model = models.create_model(configs.load(args.model).model, 10)
        x_shape = SHAPES[args.model]
    tx = optax.sgd(0.01, momentum=0.9)
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    batch = {
        "x": jax.random.normal(kx, (args.batch, *x_shape)),
        "y": jax.random.randint(ky, (args.batch,), 0, 10),
    }
    probe = {"x": jax.random.normal(kp, (args.probe, *x_shape))}

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
    if args.model == "mlp":
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
    }
    if args.model == "mlp":
        variants |= {m: user_variant(k) for m, k in USER_MODES.items()}
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

    shape = (
        f"MLP {args.input}-{'-'.join(map(str, hidden))}-10" if args.model == "mlp" else args.model
    )
    print(
        f"{shape}, batch {args.batch}, probe {args.probe}, "
        f"backend {jax.default_backend()}, {jax.device_count()} device(s)"
    )
    for name in variants:
        rate = flops[name] / med[name]
        print(
            f"  {name:<11} {med[name] * 1e3:8.3f} ms/step   {flops[name] / 1e9:7.3f} GFLOP/step"
            f"   {rate / 1e9:7.2f} GFLOP/s"
        )
    pairs = [("built-in", "monitored", "+probe"), ("user loop", "user+mon", "user+probe")]
    for label, mon, base in pairs[: 1 + (args.model == "mlp")]:
        ratio = med[mon] / med[base]
        paired = statistics.median(m / p for m, p in zip(times[mon], times[base], strict=True))
        print(
            f"  {label}: ratio {mon} / {base} = {ratio:.3f} (medians), "
            f"{paired:.3f} (median of per-round ratios)  (bar: <= 1.05)"
        )
    print(f"  monitoring cost over plain: {med['monitored'] / med['plain']:.2f}x")
    masks = states["monitored"].masks
    packed = sum(p.bits.nbytes for p in masks.values())
    units = sum(p.num_bits for p in masks.values())  # probe sites x units, 1 bit each
    print(
        f"  masks: {packed / 2**20:.3f} MiB per set of packed patterns ({units} bits over "
        f"{len(masks)} layers, {packed / args.probe:.0f} B per probe example); float32 "
        f"pre-activations would be {4 * units / 2**20:.3f} MiB"
    )
    print(f"  matmul 1024^3 in this process: {peak / 1e9:.2f} GFLOP/s")


if __name__ == "__main__":
    main()
