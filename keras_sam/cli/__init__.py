"""The `keras-sam` command line and the experiment runner behind it.

The application, kept apart from the library: nothing in `keras_sam` outside this package
imports it.

- `commands`: the `keras-sam` command (`playground`, `train`, `compare`, `inspect`).
- `options`: every option of every command, one row each (flag, field, type and rule,
  default, help), from which the parsers, `RunConfig` and `InspectSettings` are made.
- `recipes`: the methods by name, each one's builder and default rho.
- `training`: training runs on real data (`RunConfig`, `prepare_data`, `train`), resumable.
- `report`: the comparison table and plots of finished runs.
- `inspection`: every diagnostic on one saved model, with pictures (`keras-sam inspect`).
- `playground`: the toy problems (a sharp and a flat minimum in 2-D, a small network).
"""

from keras_sam.cli.commands import main

__all__ = ["main"]
