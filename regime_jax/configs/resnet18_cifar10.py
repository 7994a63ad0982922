r"""ResNet-18 (CIFAR stem, BatchNorm) on CIFAR-10 through tfds, SGD+momentum, cosine.

``cnn_cifar10``'s data with a ResNet-18: basic blocks (2, 2, 2, 2) at widths 64-128-256-512,
a 3x3 stride-1 stem without max pool, BatchNorm (trained in train mode on batch statistics,
probed and evaluated in eval mode on the running statistics). Every ReLU is recorded at every
spatial position (17 layers: ``stem_bn``, and per block ``.../bn1`` and the block's output).
No augmentation and no weight decay (the built-in optimizers have neither): expect the low
end of ResNet-18's CIFAR-10 range. The probe forward of 512 images costs about a training
step, so patterns are recorded every 10 steps.

COMMAND:
  python -m regime_jax.main --config resnet18_cifar10 --workdir runs/resnet18_cifar10
  Needs the dataset prepared as array_record (network once): `tfds build cifar10
  --file_format=array_record`, or `--config.dataset.data_dir=<dir>` pointing at it. Without
  it the run stops with an error saying so; it never substitutes other data. bfloat16
  compute: `--config.model.compute_dtype=bfloat16`.
  Smoke test, offline: --config resnet18_cifar10:quick (a 2-stage, width-4 ResNet on the
  embedded 8x8 digits, 20 steps).

EXPECTED: the full run is not measured on this machine (offline); an accelerator is
  recommended. :quick: about 10-20 s on 2 shared CPU cores (mostly compilation).
"""

import ml_collections

from regime_jax.configs import cnn_cifar10
from regime_jax.configs.base import smoke, variant


def get_config(arg: str | None = None):
    arg = variant(arg)
    c = cnn_cifar10.get_config()
    c.model = ml_collections.ConfigDict(
        dict(
            name="resnet",
            stage_sizes=(2, 2, 2, 2),
            width=64,
            activation="relu",
            compute_dtype="float32",  # float32 | bfloat16 (bf16 compute, f32 params)
        )
    )
    c.optimizer.name, c.optimizer.learning_rate, c.optimizer.momentum = "sgd", 0.1, 0.9
    c.optimizer.schedule, c.optimizer.warmup_steps = "cosine", 500
    c.batch_size, c.num_steps = 128, 20000
    c.record.every_steps, c.record.snapshot_every_steps = 10, 1000
    c.log_every_steps = c.eval_every_steps = 500
    if arg == "quick":  # offline: the embedded digits, a tiny ResNet
        c.dataset.name, c.dataset.seed = "digits", 0
        smoke(c, num_steps=20, probe_size=32, batch_size=16)
        c.record.every_steps = 1
        c.optimizer.learning_rate, c.optimizer.warmup_steps = 0.05, 5
        c.model.stage_sizes, c.model.width = (1, 1), 4
    return c
