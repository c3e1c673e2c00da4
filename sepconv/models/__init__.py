"""Reference models built from sepconv layers, faithful to their papers and to Keras' implementations.

Each architecture takes ``num_classes``, ``in_channels`` where it has one, and ``separable``: ``False``
builds its twin, in which every separable convolution is a standard one of the same kernel, stride,
padding and widths (MobileNet's Table 4 "Conv MobileNet"). Models return logits. BN moving statistics
are buffers, so ``sum(p.numel() for p in model.parameters())`` is Keras' trainable parameter count, and
adding the ``running_mean``/``running_var`` buffers gives Keras' total.

* ``mobilenet_v1`` (and ``mobilenet_v1_100/075/050/025``, alpha fixed): :class:`MobileNetV1`, as
  ``keras.applications.MobileNet``;
* ``mobilenet_v2``: :class:`MobileNetV2`, as ``keras.applications.MobileNetV2``;
* ``xception``: :class:`Xception`, as ``keras.applications.Xception``;
* ``eegnet``: :class:`EEGNet`, as the reference ``EEGNet`` of the arl-eegmodels project;
* ``vgg_cifar``: :class:`VGGCifar`, the 6-convolution VGG-block network for 32x32 images;
* ``convnext_k7``: :class:`ConvNeXtK7`, a small ConvNeXt-style stack of depthwise 7x7 blocks (BatchNorm);
* ``replknet_k31``: :class:`RepLKNetK31`, a small RepLKNet-style network of depthwise 31x31 blocks;
* ``digits_cnn``: :class:`DigitsCNN`, a small CNN for scikit-learn's 8x8 digits (the default of ``sepconv compare``);
* ``x3d_xs`` and ``x3d_s``: :class:`X3D`, the video network (channel-wise 3x3x3 convolutions) as SlowFast builds
  it, for 4 or 13 frames of 160x160.

>>> from sepconv.models import create_model, list_models
>>> list_models("mobilenet*")
['mobilenet_v1', 'mobilenet_v1_025', 'mobilenet_v1_050', 'mobilenet_v1_075', 'mobilenet_v1_100', 'mobilenet_v2']
>>> model = create_model("eegnet", num_classes=2, channels=64, samples=128)
>>> sum(p.numel() for p in model.parameters())
2258

:func:`load_keras_weights` ports the weights of the Keras model into its sepconv counterpart.
"""

from ._registry import create_model, list_models, register_model, unregister_model
from .convnext_k7 import ConvNeXtK7
from .digits_cnn import DigitsCNN
from .eegnet import EEGNet
from .keras_weights import load_keras_weights
from .mobilenet_v1 import MobileNetV1
from .mobilenet_v2 import MobileNetV2
from .replknet_k31 import RepLKNetK31
from .vgg_cifar import VGGCifar
from .x3d import X3D
from .xception import Xception

__all__ = ["create_model", "list_models", "register_model", "unregister_model", "load_keras_weights",
           "MobileNetV1", "MobileNetV2", "Xception", "EEGNet", "VGGCifar", "DigitsCNN",
           "ConvNeXtK7", "RepLKNetK31", "X3D"]
