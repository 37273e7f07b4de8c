import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

# Two logical CPU devices for the tf.distribute tests (tests/trainers/test_distribute.py).
# They must be configured before TensorFlow initializes its devices, so here, once for the
# session; tests without a strategy run on the first one, as before.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

keras.config.disable_interactive_logging()


@pytest.fixture(autouse=True)
def _fresh_state():
    """Each test starts from the same seeds and a fresh Keras name space."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
