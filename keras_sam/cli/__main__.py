"""`python -m keras_sam.cli`: the `keras-sam` command."""

import sys

from keras_sam.cli.commands import main

sys.exit(main())
