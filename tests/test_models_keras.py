"""Reference models against Keras 3 (torch backend): parameter counts and ported weights.

The oracles are ``keras.applications.MobileNet`` (each alpha), ``MobileNetV2`` and ``Xception``, built with
``weights=None`` (random initialisation, no download) and ``classifier_activation=None`` (logits, like the
sepconv models), and two models transcribed here with ``keras.layers``: the reference EEGNet of the
arl-eegmodels project (``EEGModels.EEGNet``) and the VGG-block CIFAR network.

Counts: ``parameters()`` equals Keras' trainable count and, with the BN ``running_mean``/``running_var``
buffers, ``count_params()`` (REFERENCE.md numbers are checked in ``test_models.py``).

Outputs: the Keras models get He-normal kernels, random biases and BN affine parameters, and BN moving
statistics calibrated on a random batch (with fresh Glorot kernels and identity BN statistics the outputs
of the deep models hardly depend on their input, and BN's port would not be tested); the weights are
ported with ``sepconv.models.load_keras_weights``, and both models run in inference mode on the same input
(NHWC for Keras, NCHW here), compared within ``rtol=1e-4`` and ``atol=1e-5`` times the largest output.
Sizes are chosen to exercise the padding rules: MobileNetV1 at 129 and 65 (odd sizes, where Keras'
``((0, 1), (0, 1))`` differs from 'same'), MobileNetV2 at 97, Xception at 71 (its minimum) and 74
(asymmetric 'same' max pooling). Each Keras model is built once per module.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import sepconv  # noqa: E402
from helpers import count_parameters  # noqa: E402
from sepconv.models import EEGNet, MobileNetV1, MobileNetV2, VGGCifar, Xception, load_keras_weights  # noqa: E402

BATCH = 2


# --- Keras models --------------------------------------------------------------------------------------

def keras_eegnet(nb_classes, Chans=64, Samples=128, dropoutRate=0.5, kernLength=64, F1=8, D=2, F2=16,
                 norm_rate=0.25):
    """arl-eegmodels ``EEGModels.EEGNet`` (dropoutType='Dropout'), transcribed with Keras 3 layers."""
    layers, max_norm = keras.layers, keras.constraints.MaxNorm
    input1 = keras.Input(shape=(Chans, Samples, 1))
    block1 = layers.Conv2D(F1, (1, kernLength), padding="same", use_bias=False)(input1)
    block1 = layers.BatchNormalization()(block1)
    block1 = layers.DepthwiseConv2D((Chans, 1), use_bias=False, depth_multiplier=D,
                                    depthwise_constraint=max_norm(1.0))(block1)
    block1 = layers.BatchNormalization()(block1)
    block1 = layers.Activation("elu")(block1)
    block1 = layers.AveragePooling2D((1, 4))(block1)
    block1 = layers.Dropout(dropoutRate)(block1)
    block2 = layers.SeparableConv2D(F2, (1, 16), use_bias=False, padding="same")(block1)
    block2 = layers.BatchNormalization()(block2)
    block2 = layers.Activation("elu")(block2)
    block2 = layers.AveragePooling2D((1, 8))(block2)
    block2 = layers.Dropout(dropoutRate)(block2)
    flatten = layers.Flatten(name="flatten")(block2)
    dense = layers.Dense(nb_classes, name="dense", kernel_constraint=max_norm(norm_rate))(flatten)
    softmax = layers.Activation("softmax", name="softmax")(dense)
    return keras.Model(inputs=input1, outputs=softmax)


def keras_vgg_cifar(separable: bool, num_classes: int = 10):
    conv = keras.layers.SeparableConv2D if separable else keras.layers.Conv2D
    model = keras.Sequential([keras.Input((32, 32, 3))])
    for filters in (64, 128, 256):
        model.add(conv(filters, 3, padding="same", activation="relu"))
        model.add(conv(filters, 3, padding="same", activation="relu"))
        model.add(keras.layers.MaxPooling2D(2))
    model.add(keras.layers.Flatten())
    model.add(keras.layers.Dense(num_classes))
    return model


def applications(builder, size, **kwargs):
    return builder(weights=None, input_shape=(size, size, 3), classifier_activation=None, **kwargs)


@pytest.fixture(scope="module")
def oracles():
    """Every Keras model the tests use, built once (about 0.1-0.3 s each)."""
    keras.utils.set_random_seed(0)
    apps = keras.applications
    return {
        "mobilenet_v1_100_128": applications(apps.MobileNet, 128, alpha=1.0),
        "mobilenet_v1_100_129": applications(apps.MobileNet, 129, alpha=1.0),
        "mobilenet_v1_075": applications(apps.MobileNet, 32, alpha=0.75),
        "mobilenet_v1_050": applications(apps.MobileNet, 32, alpha=0.5),
        "mobilenet_v1_025": applications(apps.MobileNet, 32, alpha=0.25),
        "mobilenet_v1_050_m2_65": applications(apps.MobileNet, 65, alpha=0.5, depth_multiplier=2),
        "mobilenet_v2_96": applications(apps.MobileNetV2, 96),
        "mobilenet_v2_035_64": applications(apps.MobileNetV2, 64, alpha=0.35),
        "mobilenet_v2_97": applications(apps.MobileNetV2, 97),
        "xception_71": applications(apps.Xception, 71),
        "xception_74": applications(apps.Xception, 74),
        "eegnet": keras_eegnet(2),
        "vgg_separable": keras_vgg_cifar(True),
        "vgg_standard": keras_vgg_cifar(False),
    }


def keras_counts(model) -> tuple[int, int]:
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights), model.count_params()


def he_normal(array: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    """A Keras kernel drawn with variance 2 / fan-in (a depthwise kernel's fan-in is its spatial size)."""
    fan_in = np.prod(array.shape[:-2] if name == "depthwise_kernel" else array.shape[:-1])
    return rng.normal(0, np.sqrt(2 / fan_in), array.shape)


def randomise_and_calibrate(keras_model, rng: np.random.Generator, input_shape) -> None:
    """He-normal kernels, random biases and BN affine parameters, and BN moving statistics set to those of a
    random batch (as after training). With Keras' fresh Glorot kernels and identity BN statistics the outputs
    of these models hardly depend on their input; this way every layer's output keeps its scale, so the
    comparison depends on every weight."""
    norms = []
    for layer in keras_model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape), mean, variance])
            norms.append(layer)
        elif layer.weights:
            layer.set_weights([rng.normal(0, 0.1, array.shape) if variable.name == "bias"
                               else he_normal(array, variable.name, rng)
                               for variable, array in zip(layer.weights, layer.get_weights())])
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0  # moving statistic = that of the next training batch
    keras_model(rng.standard_normal((8, *input_shape)).astype(np.float32).transpose(0, 2, 3, 1), training=True)
    for layer, momentum in zip(norms, momenta):
        layer.momentum = momentum


def keras_logits(keras_model, x_nchw: np.ndarray, layer_name: str | None = None) -> np.ndarray:
    if layer_name is not None:
        keras_model = keras.Model(keras_model.input, keras_model.get_layer(layer_name).output)
    return keras.ops.convert_to_numpy(keras_model(x_nchw.transpose(0, 2, 3, 1), training=False))


def assert_same_outputs(model, keras_model, input_shape, layer_name=None, seed=0):
    """Port, run both in inference mode, compare; returns the largest absolute difference and output."""
    rng = np.random.default_rng(seed)
    randomise_and_calibrate(keras_model, rng, input_shape)
    load_keras_weights(model, keras_model)
    model.eval()
    x = rng.standard_normal((BATCH, *input_shape)).astype(np.float32)
    expected = keras_logits(keras_model, x, layer_name)
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    scale = np.abs(expected).max()
    assert np.abs(expected[0] - expected[1]).max() > 0.1 * scale  # the outputs depend on the input
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * scale)
    return float(np.abs(got - expected).max()), float(scale)


# --- parameter counts ------------------------------------------------------------------------------------

COUNT_CASES = [
    ("mobilenet_v1_100_128", lambda: MobileNetV1(alpha=1.0)),
    ("mobilenet_v1_075", lambda: MobileNetV1(alpha=0.75)),
    ("mobilenet_v1_050", lambda: MobileNetV1(alpha=0.5)),
    ("mobilenet_v1_025", lambda: MobileNetV1(alpha=0.25)),
    ("mobilenet_v1_050_m2_65", lambda: MobileNetV1(alpha=0.5, depth_multiplier=2)),
    ("mobilenet_v2_96", lambda: MobileNetV2()),
    ("mobilenet_v2_035_64", lambda: MobileNetV2(alpha=0.35)),
    ("xception_71", lambda: Xception()),
    ("eegnet", lambda: EEGNet(num_classes=2, channels=64, samples=128)),
    ("vgg_separable", lambda: VGGCifar(separable=True)),
    ("vgg_standard", lambda: VGGCifar(separable=False)),
]


@pytest.mark.parametrize("oracle, build", COUNT_CASES, ids=[case[0] for case in COUNT_CASES])
def test_parameter_counts_equal_keras(oracles, oracle, build):
    with torch.device("meta"):
        model = build()
    assert count_parameters(model) == keras_counts(oracles[oracle])


def test_eegnet_reference_counts(oracles):
    """REFERENCE.md, EEGNet: the Keras reference build at C=64, T=128, N=2 has 2,338 parameters, 2,258 trainable."""
    assert keras_counts(oracles["eegnet"]) == (2_258, 2_338)


# --- ported weights give the same outputs --------------------------------------------------------------

PORT_CASES = [
    ("mobilenet_v1_100_128", lambda: MobileNetV1(), (3, 128, 128)),
    ("mobilenet_v1_100_129", lambda: MobileNetV1(), (3, 129, 129)),
    ("mobilenet_v1_050_m2_65", lambda: MobileNetV1(alpha=0.5, depth_multiplier=2), (3, 65, 65)),
    ("mobilenet_v2_96", lambda: MobileNetV2(), (3, 96, 96)),
    ("mobilenet_v2_97", lambda: MobileNetV2(), (3, 97, 97)),
    ("mobilenet_v2_035_64", lambda: MobileNetV2(alpha=0.35), (3, 64, 64)),
    ("xception_71", lambda: Xception(), (3, 71, 71)),
    ("xception_74", lambda: Xception(), (3, 74, 74)),
    ("vgg_separable", lambda: VGGCifar(separable=True), (3, 32, 32)),
    ("vgg_standard", lambda: VGGCifar(separable=False), (3, 32, 32)),
]


@pytest.mark.parametrize("oracle, build, input_shape", PORT_CASES, ids=[case[0] for case in PORT_CASES])
def test_ported_weights_give_keras_outputs(oracles, oracle, build, input_shape):
    assert_same_outputs(build(), oracles[oracle], input_shape)


def test_ported_eegnet_gives_keras_outputs(oracles):
    """Logits (the reference's ``dense`` layer) and, through a softmax, its output."""
    reference = oracles["eegnet"]
    model = EEGNet(num_classes=2, channels=64, samples=128)
    assert_same_outputs(model, reference, (1, 64, 128), layer_name="dense")
    x = np.random.default_rng(1).standard_normal((BATCH, 1, 64, 128)).astype(np.float32)
    with torch.no_grad():
        probabilities = model(torch.from_numpy(x)).softmax(dim=1).numpy()
    np.testing.assert_allclose(probabilities, keras_logits(reference, x), rtol=1e-4, atol=1e-6)


def test_eegnet_max_norms_equal_keras_constraints(oracles):
    """sepconv's projections equal the reference's ``MaxNorm(1.)`` (depthwise) and ``MaxNorm(0.25)`` (dense)."""
    reference = oracles["eegnet"]
    depthwise = next(layer for layer in reference.layers if isinstance(layer, keras.layers.DepthwiseConv2D))
    dense = reference.get_layer("dense")
    originals = [layer.get_weights() for layer in (depthwise, dense)]
    try:
        depthwise.set_weights([originals[0][0] * 10])
        dense.set_weights([originals[1][0] * 10, originals[1][1]])
        model = load_keras_weights(EEGNet(num_classes=2), reference)
        sepconv.apply_constraints(model)
        depthwise.set_weights([keras.ops.convert_to_numpy(depthwise.depthwise_constraint(depthwise.kernel))])
        dense.set_weights([keras.ops.convert_to_numpy(dense.kernel_constraint(dense.kernel)), originals[1][1]])
        expected = load_keras_weights(EEGNet(num_classes=2), reference)
    finally:
        depthwise.set_weights(originals[0])
        dense.set_weights(originals[1])
    for name in ("features.block1.spatial.conv.weight", "head.classifier.weight"):
        before = model.state_dict()[name]
        torch.testing.assert_close(before, expected.state_dict()[name], rtol=1e-6, atol=1e-7, msg=name)


# --- porting errors ----------------------------------------------------------------------------------------

def test_port_refuses_another_layout(oracles):
    with pytest.raises(ValueError, match=r"module 'features.1.conv' \(Conv2d\) needs a Keras Conv2D; the Keras "
                                         r"layer in its place, 'expanded_conv_depthwise', is a DepthwiseConv2D"):
        load_keras_weights(MobileNetV1(separable=False), oracles["mobilenet_v2_96"])
    with pytest.raises(ValueError, match=r"the Keras model has 55 layers with weights and the model 56 modules"):
        load_keras_weights(_with_extra_layer(MobileNetV1(alpha=0.25)), oracles["mobilenet_v1_025"])


def _with_extra_layer(model):
    model.head.add_module("extra", torch.nn.Linear(1000, 1000))
    return model


def test_port_failure_leaves_the_model_unchanged(oracles):
    model = MobileNetV1(alpha=0.25, num_classes=10)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"module 'head.classifier' cannot load Keras layer 'conv_preds': Keras "
                                         r"kernel has shape \(1, 1, 256, 1000\); this layer needs \(1, 1, 256, 10\)"):
        load_keras_weights(model, oracles["mobilenet_v1_025"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_port_checks_batch_norm_epsilon(oracles):
    model = MobileNetV1(alpha=0.25)
    model.features[0].norm.eps = 1e-5
    with pytest.raises(ValueError, match=r"module 'features.0.norm' cannot load Keras layer 'conv1_bn': "
                                         r"BatchNormalization has epsilon=0.001; the module has eps=1e-05"):
        load_keras_weights(model, oracles["mobilenet_v1_025"])
