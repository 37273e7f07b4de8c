"""The per-tensor norms of the overhead-bound MLP's gradients (256 -> 8 x 256 -> 10, 18
tensors), jitted on JAX two ways, timed side by side in interleaved rounds: as the step
takes them (`maths.ListOps.norms`: the tensors of at most `maths.SMALL_TENSOR` entries in
one reduction over a zero-padded matrix) and one reduction per tensor (before).

    KERAS_BACKEND=jax taskset -c 0 python benchmarks/small_norms.py [--rounds 15]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from keras_sam import maths  # noqa: E402

CALLS = 200


def shapes():
    """The overhead MLP's weight shapes (benchmarks/regimes.py's `overhead`)."""
    return [s for _ in range(8) for s in ((256, 256), (256,))] + [(256, 10), (10,)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    tensors = [jnp.asarray(rng.random(s, dtype="float32")) for s in shapes()]
    ways = {
        "grouped (maths.ListOps.norms)": jax.jit(lambda xs: maths.ListOps().norms(xs)),
        "one reduction per tensor": jax.jit(
            lambda xs: jnp.stack([jnp.sqrt(jnp.sum(jnp.square(x))) for x in xs])
        ),
    }
    samples = {name: [] for name in ways}
    for fn in ways.values():
        fn(tensors).block_until_ready()
    for _ in range(args.rounds):
        for name, fn in ways.items():
            start = time.perf_counter()
            for _ in range(CALLS):
                out = fn(tensors)
            out.block_until_ready()
            samples[name].append((time.perf_counter() - start) / CALLS * 1e6)
    for name, values in samples.items():
        print(f"{name}: median {statistics.median(values):.1f} us a call, min {min(values):.1f}")
    grouped, single = (np.asarray(fn(tensors)) for fn in ways.values())
    print(f"largest relative difference: {np.max(np.abs(grouped - single) / single):.1e}")


if __name__ == "__main__":
    main()
