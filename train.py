"""Trains Madry et al.'s CIFAR-10 ResNet: naturally, on PGD adversarial examples, or fast (FGSM).

  python train.py --model_dir=runs/quick --dataset=synthetic --steps=60 --checkpoint_every=20

The same command as the installed ``manifold-tf-train`` (``python train.py --help`` lists the
flags); run from a checkout, it defaults $MANIFOLD_TF_CIFAR10_DIR to the CIFAR-10 sample beside it
(``../shared/data/cifar10-sample``) when that folder exists.
"""

import os

from manifold_tf import data
from manifold_tf.cli import train

_SAMPLE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "cifar10-sample"
)

if __name__ == "__main__":
    if os.path.isdir(_SAMPLE):
        os.environ.setdefault(data.DATA_DIR_ENV, os.path.normpath(_SAMPLE))
    train.run()
