"""Evaluates a classifier: accuracy, the (p, q, delta)-separation test, or a model shell's defence.

  python evaluate.py --shell=mcn --delta=8                     # defence evaluation (Table 2)
  python evaluate.py --mode=separation --delta=8 --p=0.9       # separation test (Table 1)
  python evaluate.py --mode=accuracy --checkpoint=PATH         # clean and PGD-20 accuracy

The same command as the installed ``manifold-tf-evaluate`` (``python evaluate.py --help`` lists the
flags); run from a checkout, it defaults $MANIFOLD_TF_CIFAR10_DIR to the CIFAR-10 sample beside it
(``../shared/data/cifar10-sample``) when that folder exists.
"""

import os

from manifold_tf import data
from manifold_tf.cli import evaluate

_SAMPLE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "cifar10-sample"
)

if __name__ == "__main__":
    if os.path.isdir(_SAMPLE):
        os.environ.setdefault(data.DATA_DIR_ENV, os.path.normpath(_SAMPLE))
    evaluate.run()
