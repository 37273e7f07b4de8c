"""The benchmark CNN and its SAM step in bare PyTorch: the reference for keras-sam on torch.

`TorchCNN` is `cnn.cnn()` written with `torch.nn` (same layers and shapes, 225,034
parameters in both; torch's own initialization, channels-first input). `SAM` is the
davda54/sam optimizer (github.com/davda54/sam, also `pytorch_optimizer.SAM`): the first
pass's `loss.backward()`, `e = rho * g / ||g||` added to the weights in place under
`no_grad`, the second forward-backward, `e` subtracted, the base optimizer's step. The
davda54 code today restores a saved copy of the weights instead of subtracting `e`: the
same one element-wise operation per weight.

Used by benchmarks/backends.py (`--backend torch`) to time keras-sam's SAM against this
loop on the same data, in the same rounds (the bare SAM inside Keras's `fit`, for every
backend, is `bare_sam.BareSAM`: the same algorithm as a Keras `train_step`);
`python benchmarks/torch_reference.py` profiles a few steps of each (torch.profiler and
cProfile), to attribute the difference.
"""

import time

import torch
from torch import nn


class TorchCNN(nn.Sequential):
    """`cnn.cnn()` in `torch.nn`: conv 32, pool, conv 64, pool, dense 128, dense 10."""

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        super().__init__(
            nn.Conv2d(1, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 5 * 5, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


class SAM(torch.optim.Optimizer):
    """davda54's SAM (non-adaptive), with `e` subtracted after the second pass."""

    def __init__(self, params, base_optimizer, rho=0.05, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e_w = p.grad * scale.to(p)
                p.add_(e_w)  # climb to the local maximum "w + e(w)"
                self.state[p]["e_w"] = e_w
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.sub_(self.state[p]["e_w"])  # back to "w" from "w + e(w)"
        self.base_optimizer.step()  # the actual "sharpness-aware" update
        if zero_grad:
            self.zero_grad()

    def _grad_norm(self):
        return torch.norm(
            torch.stack(
                [
                    p.grad.norm(p=2)
                    for group in self.param_groups
                    for p in group["params"]
                    if p.grad is not None
                ]
            ),
            p=2,
        )


def steps(x, y, sam):
    """One training step of `TorchCNN` on the batch `(x, y)` (NHWC numpy arrays), plain
    (forward, `loss.backward()`, SGD) or davda54's SAM; returns a callable -> the loss."""
    model = TorchCNN()
    model.train()
    xb = torch.as_tensor(x).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW, once
    yb = torch.as_tensor(y).long()
    criterion = nn.CrossEntropyLoss()
    if sam:
        optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9)

        def one():
            loss = criterion(model(xb), yb)
            loss.backward()
            optimizer.first_step(zero_grad=True)
            criterion(model(xb), yb).backward()
            optimizer.second_step(zero_grad=True)
            return loss.detach()

    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def one():
            loss = criterion(model(xb), yb)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            return loss.detach()

    return model, one


# ---------------------------------------------------------------------- the profile
def keras_loop_step(model, optimizer, loss_fn, xb, yb, sam):
    """One step of a Keras model's custom loop on PyTorch: keras-sam's closure loop when
    `sam`, else `loss.backward()` and the optimizer's `apply`. Returns a callable."""
    trainable = model.trainable_variables

    def one():
        if sam:

            def closure():
                pred = model(xb, training=True)
                return pred, loss_fn(yb, pred)

            return optimizer.optimize(closure, trainable)[1]
        pred = model(xb, training=True)
        loss = loss_fn(yb, pred)
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            optimizer.apply([v.value.grad for v in trainable], trainable)
        return loss

    return one


def profile(count=10, top=12):
    """Profiles `count` steps of each: bare torch and keras-sam, plain and SAM (custom
    loop, the closure form). Prints the self CPU time of the torch operators
    (torch.profiler), the Python functions with the most own time and, cumulatively,
    the keras-sam and Keras functions (cProfile)."""
    import cProfile
    import os
    import pstats

    os.environ["KERAS_BACKEND"] = "torch"
    import keras
    import numpy as np
    from cnn import cnn
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    import keras_sam

    rng = np.random.default_rng(0)
    x = rng.random((128, 28, 28, 1), dtype="float32")
    y = rng.integers(0, 10, 128)
    xb, yb = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def keras_step(sam):
        model = cnn()
        print(f"parameters: Keras {model.count_params()}, torch {parameter_count(TorchCNN())}")
        optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
        if sam:
            optimizer = keras_sam.SAM(optimizer, rho=0.05)
        optimizer.build(model.trainable_variables)
        return keras_loop_step(model, optimizer, loss_fn, xb, yb, sam)

    runs = {
        "bare torch, plain": steps(x, y, sam=False)[1],
        "bare torch, davda54 SAM": steps(x, y, sam=True)[1],
        "keras-sam loop, plain": keras_step(sam=False),
        "keras-sam loop, SAM": keras_step(sam=True),
    }
    for name, one in runs.items():
        for _ in range(3):
            one()
        start = time.perf_counter()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(count):
                one()
        wall = (time.perf_counter() - start) / count
        print(f"\n=== {name}: {wall * 1e3:.1f} ms/step under the profiler ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(count):
            one()
        profiler.disable()
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(top)
        # Where keras-sam's step spends it: the passes, the finite checks, the snapshot.
        stats.sort_stats("cumulative").print_stats("keras_sam|keras/src/(layers|ops)", top * 2)


if __name__ == "__main__":
    profile()
