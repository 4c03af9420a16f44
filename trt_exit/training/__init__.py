"""Datasets, losses and training regimes.

The dataset registry (:func:`trt_exit.training.datasets.load_dataset`) is filled here, in one
place: each built-in dataset family's module registers its loaders when imported, and this
package imports them all (never the other way round), so importing any ``trt_exit.training``
module makes every built-in dataset name available. A new family: a module that calls
``register_dataset`` at its end, and one import line below.
"""

from trt_exit.training import datasets  # noqa: F401  the registry and digits
from trt_exit.training import digits_c  # noqa: F401  digits_c
from trt_exit.training import mnist  # noqa: F401  mnist, mnist_c
from trt_exit.training import audio_datasets  # noqa: F401  speech_commands, synthetic_audio
from trt_exit.training import crowd_datasets  # noqa: F401  synthetic_av_crowd, disco
from trt_exit.training import image_folder  # noqa: F401  imagefolder (users' images)
