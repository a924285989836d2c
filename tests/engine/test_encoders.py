import pytest
import torch
from mlflow.tracking import MlflowClient
from torchvision import models

from stx.engine import encoders
from stx.errors import ConfigError, WeightsError


def reference_activations(model, image):
    """Run torchvision's full, untruncated feature stack and keep a copy of every output."""
    x = (image - torch.tensor(encoders.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(encoders.IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    for module in model.features:
        x = module(x.clone())
        out.append(x.clone())
    return dict(zip(encoders.vgg_layer_names(model.features), out))


def test_vgg19_layer_names_match_pystiche():
    names = encoders.vgg_layer_names(models.vgg19().features)
    assert names[:5] == ["conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1"]
    assert "relu4_2" in names and "relu5_4" in names and names[-1] == "pool5"
    assert len(names) == 37
    assert "relu5_4" not in encoders.vgg_layer_names(models.vgg16().features)


def test_truncated_encoder_matches_full_network(vgg19_random, rng):
    image = torch.rand(1, 3, 48, 40, generator=rng)
    model = models.vgg19(weights=None)
    model.features.load_state_dict(encoders._random_features("vgg19", seed=0).state_dict())
    reference = reference_activations(model, image)
    out = vgg19_random(image)
    assert set(out) == vgg19_random.layers
    for layer, activation in out.items():
        torch.testing.assert_close(activation, reference[layer], rtol=1e-5, atol=1e-5)
    # cut after the deepest requested layer (relu5_1 is module 29 of 37)
    assert len(vgg19_random.features) == vgg19_random.available.index("relu5_1") + 1


def test_conv_output_is_not_overwritten_by_inplace_relu(vgg19_random, rng):
    out = vgg19_random(torch.rand(1, 3, 32, 32, generator=rng), ["conv1_1", "relu1_1"])
    assert (out["conv1_1"] < 0).any()
    torch.testing.assert_close(out["relu1_1"], out["conv1_1"].clamp_min(0))


def test_unknown_layer_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown encoder layer\(s\) 'relu9_9'.*valid layers are: conv1_1, relu1_1"):
        encoders.vgg19(["relu4_2", "relu9_9"], weights="random", pooling="max", seed=0)


def test_weights_from_local_file(tmp_path, rng):
    model = models.vgg16(weights=None)  # a whole-model state dict, as torchvision saves it
    model.features.load_state_dict(encoders._random_features("vgg16", seed=3).state_dict())
    torch.save(model.state_dict(), tmp_path / "vgg16.pth")
    from_file = encoders.vgg16(["relu3_3"], weights=str(tmp_path / "vgg16.pth"), pooling="max", seed=0)
    seeded = encoders.vgg16(["relu3_3"], weights="random", seed=3, pooling="max")
    other = encoders.vgg16(["relu3_3"], weights="random", seed=4, pooling="max")
    image = torch.rand(1, 3, 32, 32, generator=rng)
    assert torch.equal(from_file(image)["relu3_3"], seeded(image)["relu3_3"])
    assert not torch.equal(other(image)["relu3_3"], seeded(image)["relu3_3"])


def test_bad_weights_file_errors(tmp_path):
    with pytest.raises(WeightsError, match=r"is neither a named source nor a file: use one of auto, imagenet, caffe, "
                                           r"random for encoder=vgg19"):
        encoders.vgg19(["relu1_1"], weights=str(tmp_path / "missing.pth"), pooling="max", seed=0)
    with pytest.raises(WeightsError, match=r"use one of auto, imagenet, hed, hed_caffe, random for encoder=vgg16"):
        encoders.vgg16(["relu1_1"], weights="heed", pooling="max", seed=0)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="could not be loaded"):
        encoders.vgg19(["relu1_1"], weights=str(tmp_path / "junk.pth"), pooling="max", seed=0)


@pytest.mark.parametrize("arch,layer,file", [("vgg19", "relu1_1", "vgg19-dcbb9e9d.pth"),
                                              ("resnet50", "layer1_0", "resnet50-0676ba61.pth"),
                                              ("efficientnet_b0", "stem", "efficientnet_b0_rwightman-7f5810bc.pth")])
def test_offline_imagenet_says_where_to_put_the_file(monkeypatch, tmp_path, arch, layer, file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(encoders, "_LOADED", {})  # nothing read earlier in this process
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(models._api, "load_state_dict_from_url", offline)  # torchvision's own reference
    cached = tmp_path / "hub" / "checkpoints" / file
    with pytest.raises(WeightsError, match=rf"network is unreachable.*looks for them at {cached}.*"
                                           rf"encoder\.weights=/path/to/{file}, .*or use encoder\.weights=random"):
        getattr(encoders, arch)([layer], weights="imagenet", pooling="max", seed=0)


def test_imagenet_weights_are_read_once_from_the_hub_cache(monkeypatch, tmp_path, rng):
    """torchvision's hub-cache file (a whole-model state dict) is read into the trunk, its head
    ignored; a second encoder (the judge's) copies the weights read then instead of reading again."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(encoders, "_LOADED", {})
    features = encoders._random_features("vgg19", seed=5)
    state = {f"features.{key}": value for key, value in features.state_dict().items()}
    cached = tmp_path / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    cached.parent.mkdir(parents=True)
    torch.save({**state, "classifier.0.weight": torch.zeros(3, 2)}, cached)
    image = torch.rand(1, 3, 40, 48, generator=rng)
    expected = encoders.MultiLayerEncoder(features, encoders.vgg_layer_names(features), ["relu3_1"])(image)
    first = encoders.vgg19(["relu3_1"], weights="imagenet", pooling="max", seed=0)
    cached.unlink()
    second = encoders.vgg19(["relu2_1", "relu3_1"], weights="imagenet", pooling="avg", seed=1)
    torch.testing.assert_close(first(image)["relu3_1"], expected["relu3_1"], rtol=0, atol=0)
    assert torch.equal(second.features[0].weight, first.features[0].weight)
    assert second.features[0].weight.data_ptr() != first.features[0].weight.data_ptr()  # a copy


def test_random_weights_drawn_again_equal_the_first_draw():
    first = encoders.vgg19(["relu2_1"], weights="random", pooling="max", seed=7)
    again = encoders.vgg19(["relu2_1"], weights="random", pooling="max", seed=7)
    drawn = encoders._random_features("vgg19", seed=7)
    for module in (first.features[0], again.features[0]):
        assert torch.equal(module.weight, drawn[0].weight)


def test_avg_pooling_swap():
    encoder = encoders.vgg19(["relu2_1"], weights="random", pooling="avg", seed=0)
    assert any(isinstance(m, torch.nn.AvgPool2d) for m in encoder.features)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in encoder.features)
    with pytest.raises(ConfigError, match="pooling='min'"):
        encoders.vgg19(["relu2_1"], weights="random", pooling="min", seed=0)


# --- AlexNet, ResNet-50, EfficientNet-B0 and the softmax transform --------------------------------

def torchvision_modules(arch, model):
    """Our layer names → the module of the whole torchvision model whose output they are."""
    if arch == "alexnet":
        return dict(zip(["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "conv3", "relu3", "conv4", "relu4",
                         "conv5", "relu5", "pool5"], model.features))
    if arch == "resnet50":
        blocks = {f"layer{s}_{b}": block for s in range(1, 5) for b, block in enumerate(getattr(model, f"layer{s}"))}
        return {"conv1": model.conv1, "bn1": model.bn1, "relu1": model.relu, "pool1": model.maxpool, **blocks}
    if arch == "mobilenet_v2":  # torchvision's features[1:18] are the blocks, not grouped by stage
        counts = encoders.MOBILENET_V2_STAGES
        names = [f"stage{s}_{b}" for s, count in enumerate(counts, 1) for b in range(count)]
        return {"stem": model.features[0], **dict(zip(names, model.features[1:18])), "head_conv": model.features[18]}
    stages = {f"stage{s}_{b}": block for s in range(1, 8) for b, block in enumerate(model.features[s])}
    return {"stem": model.features[0], **stages, "head_conv": model.features[8]}


def untruncated(arch, seed):
    """torchvision's whole model (head included) holding the encoder's random weights for ``seed``."""
    model = models.get_model(arch, weights=None).eval()
    trunk = encoders._random_features(arch, seed)
    if arch == "resnet50":
        assert set(model.load_state_dict(trunk.state_dict(), strict=False).missing_keys) == {"fc.weight", "fc.bias"}
    else:
        model.features.load_state_dict(trunk.state_dict())
    return model


NEW_ENCODERS = {  # layers read, chosen so that an in-place op would clobber a read one if allowed to
    "alexnet": ["conv1", "relu1", "conv4", "relu5"],
    "resnet50": ["bn1", "relu1", "layer1_0", "layer2_3", "layer3_1"],
    "efficientnet_b0": ["stem", "stage1_0", "stage3_1", "stage4_2"],
    "mobilenet_v2": ["stem", "stage1_0", "stage2_0", "stage2_1", "stage4_3"],
}


def test_new_encoder_layer_names():
    names = {arch: [name for name, _ in encoders.ARCHITECTURES[arch].stages(encoders._skeleton(arch))]
             for arch in NEW_ENCODERS}
    assert names["alexnet"] == ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "conv3", "relu3", "conv4",
                                "relu4", "conv5", "relu5", "pool5"]
    resnet_blocks = [f"layer{s}_{b}" for s, count in enumerate((3, 4, 6, 3), 1) for b in range(count)]
    assert names["resnet50"] == ["conv1", "bn1", "relu1", "pool1", *resnet_blocks]
    mbconv_blocks = [f"stage{s}_{b}" for s, count in enumerate((1, 2, 2, 3, 3, 4, 1), 1) for b in range(count)]
    assert names["efficientnet_b0"] == ["stem", *mbconv_blocks, "head_conv"]
    inverted_residuals = [f"stage{s}_{b}" for s, count in enumerate((1, 2, 3, 4, 3, 3, 1), 1) for b in range(count)]
    assert names["mobilenet_v2"] == ["stem", *inverted_residuals, "head_conv"]


@pytest.mark.parametrize("arch", NEW_ENCODERS)
def test_new_encoder_matches_the_untruncated_torchvision_model(arch, rng):
    layers = NEW_ENCODERS[arch]
    encoder = getattr(encoders, arch)(layers, weights="random", pooling="max", seed=0)
    assert encoder.names[-1] == layers[-1] and len(encoder.features) == encoder.available.index(layers[-1]) + 1
    model = untruncated(arch, seed=0)
    modules = torchvision_modules(arch, model)
    reference = {}
    for layer in layers:  # a hook copies each output before any later in-place op can touch it
        modules[layer].register_forward_hook(lambda _, __, out, layer=layer: reference.__setitem__(layer, out.clone()))
    image = torch.rand(1, 3, 72, 64, generator=rng)  # AlexNet's whole model needs 63 px
    with torch.no_grad():
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (encoders.IMAGENET_MEAN, encoders.IMAGENET_STD))
        model((image - mean) / std)
        out = encoder(image)
    assert set(out) == set(layers)
    for layer in layers:
        torch.testing.assert_close(out[layer], reference[layer], rtol=1e-5, atol=1e-5)
    assert any((out[layer] < 0).any() for layer in layers)  # a pre-activation was read intact


@pytest.mark.parametrize("arch", NEW_ENCODERS)
def test_new_encoder_unknown_layer_is_refused_before_any_weights(arch):
    with pytest.raises(ConfigError, match=rf"unknown encoder layer\(s\) 'relu4_2'.*valid layers are: .*"
                                          rf"encoder\.layers in conf/encoder/{arch}\.yaml"):
        getattr(encoders, arch)(["relu4_2"], weights="imagenet", pooling="max", seed=0)  # no download tried


@pytest.mark.parametrize("arch,layer", [("alexnet", "relu2"), ("resnet50", "layer1_0"),
                                        ("efficientnet_b0", "stage1_0")])
def test_gradients_reach_the_image(arch, layer, rng):
    """Analytic against finite-difference gradients (float64, random projections), softmax on."""
    encoder = getattr(encoders, arch)([layer], weights="random", pooling="max", seed=0, softmax=2.0).double()
    image = torch.rand(1, 3, 40, 40, generator=rng, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: encoder(x)[layer], (image,), fast_mode=True)


def test_softmax_transform_by_hand():
    features = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]], [[[5.0, 5.0], [5.0, 5.0]]]])  # B=2, C=1, 2×2
    out = encoders.softmax_transform(features, temperature=1.0)
    e = torch.exp(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    torch.testing.assert_close(out[0].flatten(), 4 * e / e.sum())
    torch.testing.assert_close(out[1], torch.ones(1, 2, 2))  # per image: a flat map is all ones
    hot = encoders.softmax_transform(features, temperature=0.5)
    torch.testing.assert_close(hot[0].flatten(), 4 * e**2 / (e**2).sum())


def test_softmax_option_transforms_returned_layers(rng):
    image = torch.rand(2, 3, 40, 40, generator=rng)
    plain = encoders.resnet50(["relu1", "layer1_1"], weights="random", pooling="max", seed=1)(image)
    soft = encoders.resnet50(["relu1", "layer1_1"], weights="random", pooling="max", seed=1, softmax=3.0)(image)
    for layer in plain:
        torch.testing.assert_close(soft[layer], encoders.softmax_transform(plain[layer], 3.0))
        torch.testing.assert_close(soft[layer].flatten(1).mean(1), torch.ones(2), rtol=1e-4, atol=1e-4)
    for bad in (0, -1.0, float("inf"), True, "hot"):
        with pytest.raises(ConfigError, match=r"encoder\.softmax=.* is not valid"):
            encoders.alexnet(["relu1"], weights="random", pooling="max", seed=0, softmax=bad)


def test_new_encoder_weights_from_whole_model_file(tmp_path, rng):
    torch.save(untruncated("resnet50", seed=3).state_dict(), tmp_path / "resnet50.pth")  # fc included
    from_file = encoders.resnet50(["layer2_0"], weights=str(tmp_path / "resnet50.pth"), pooling="max", seed=0)
    seeded = encoders.resnet50(["layer2_0"], weights="random", pooling="max", seed=3)
    image = torch.rand(1, 3, 32, 32, generator=rng)
    assert torch.equal(from_file(image)["layer2_0"], seeded(image)["layer2_0"])
    torch.save(encoders._random_features("alexnet", 0).state_dict(), tmp_path / "alexnet.pth")
    with pytest.raises(WeightsError, match=r"could not be loaded as a efficientnet_b0 state dict \(358 of its 358 "
                                           r"tensors missing, e.g. '0.0.weight'; 8 unknown tensors, e.g. '0.weight'\); "
                                           r"give a torchvision efficientnet_b0 .pth file \(whole model or its 'features' part\)"):
        encoders.efficientnet_b0(["stem"], weights=str(tmp_path / "alexnet.pth"), pooling="max", seed=0)


def test_avg_pooling_on_new_encoders():
    resnet = encoders.resnet50(["layer1_0"], weights="random", pooling="avg", seed=0)
    pool = resnet.features[resnet.names.index("pool1")]
    assert isinstance(pool, torch.nn.AvgPool2d) and (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    with pytest.raises(ConfigError, match="pooling='avg' does not apply to efficientnet_b0"):
        encoders.efficientnet_b0(["stem"], weights="random", pooling="avg", seed=0)


@pytest.mark.parametrize("height, width", [(72, 40), (37, 50)])
def test_shapes_and_activation_count_match_a_real_pass(rng, height, width):
    """The trace behind the memory estimate and the size checks (formulas for convolutions and
    poolings, the meta device for the rest), against a real pass."""
    chosen = {**{(arch, "max"): layers for arch, layers in NEW_ENCODERS.items()},
              ("vgg19", "max"): ["relu1_1", "relu4_2", "relu5_1"], ("vgg16", "avg"): ["relu2_2", "relu5_3"]}
    for (arch, pooling), layers in chosen.items():
        encoder = getattr(encoders, arch)(layers, weights="random", pooling=pooling, seed=0, softmax=1.0)
        traced, elements = encoder.layer_shapes(height, width), encoder.activation_elements(height, width)
        sizes, shapes = [], {}
        for module in encoder.features.modules():
            if next(module.children(), None) is None:
                module.register_forward_hook(lambda _, __, out: sizes.append(out.numel()))
        for name, stage in zip(encoder.names, encoder.features):
            stage.register_forward_hook(lambda _, __, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:])))
        with torch.no_grad():
            out = encoder(torch.rand(1, 3, height, width, generator=rng))
        assert traced == shapes
        assert elements == sum(sizes) + sum(o.numel() for o in out.values())


def test_smallest_image_for_a_layer():
    alexnet = encoders.alexnet(["relu5"], weights="random", pooling="max", seed=0)
    # conv1 (11×11, stride 4, pad 2) → pool1 (3×3, stride 2) → pool2: relu5 needs 3 px before pool2,
    # 3 after pool1, 7 after conv1, so (h - 7) // 4 + 1 >= 7: h >= 31
    assert alexnet.min_edge("relu5") == 31
    assert alexnet.fits("relu5", 1, 31, 200) and not alexnet.fits("relu5", 1, 30, 200)
    assert alexnet.downsamplings("relu5") == "2 poolings and 1 strided convolution"
    from stx.engine.losses import ContentLoss, PerceptualObjective
    from stx.engine.inputs import check_encodable

    objective = PerceptualObjective(alexnet, {"content": ContentLoss({"relu5": 1.0})})
    check_encodable(objective, "the content", 31, 31)
    with pytest.raises(ConfigError, match=r"the content is only 30×64 px, too small for the loss set: layer relu5 "
                                          r"comes after 2 poolings and 1 strided convolution .* at least 31 px in the image"):
        check_encodable(objective, "the content", 64, 30)
    resnet = encoders.resnet50(["layer4_2"], weights="random", pooling="max", seed=0)
    assert resnet.min_edge("layer4_2") == 1 and resnet.min_edge("layer4_2", 3) == 65  # padded: ceil(h / 32) >= 3


@pytest.mark.parametrize("arch", ["resnet50", "mobilenet_v2"])
def test_job_with_new_encoder_runs_and_is_logged(arch, monkeypatch, tmp_path, fresh_store):
    from stx import api

    monkeypatch.setenv("STX_RUNS_DIR", str(tmp_path / "runs"))
    fresh_store(tmp_path)
    result = api.run(["encoder.weights=random", "judge.weights=random", "schedule.size=32", "schedule.steps=4",
                      f"encoder={arch}", "encoder.softmax=1.0"])
    params = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}").get_run(result.run_id).data.params
    assert params["encoder._target_"] == f"stx.engine.encoders.{arch}" and params["encoder.softmax"] == "1.0"
    history = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}").get_metric_history(result.run_id, "total")
    assert [m.step for m in history] == [1, 2, 3, 4] and history[-1].value < history[0].value


@pytest.mark.parametrize("arch", ["vgg16", "vgg19"])
def test_vgg_built_without_torchvision_equals_torchvision_module_for_module(arch):
    """stx builds VGG's stack from its layer list; torchvision's, drawn under the same seed, is
    the same modules with the same weights (so random-weight runs are unchanged)."""
    torch.manual_seed(3)
    ours = encoders.vgg_features(arch)
    torch.manual_seed(3)
    theirs = models.vgg.make_layers(models.vgg.cfgs[{"vgg16": "D", "vgg19": "E"}[arch]])
    encoders.init_weights(theirs)
    assert [repr(m) for m in ours] == [repr(m) for m in theirs]
    for (key, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("arch", sorted(encoders.IMAGENET_FILES))
def test_imagenet_urls_are_torchvisions(arch):
    assert encoders.IMAGENET_URL + encoders.IMAGENET_FILES[arch] == models.get_model_weights(arch).IMAGENET1K_V1.url
