"""trainer.models: the registry, the protocol's parameter counts, the head, freezing, the
EfficientNet resolution rule. Large networks are only counted, on the meta device (no memory, no
arithmetic); forward passes use small networks at 32-64 px."""
from __future__ import annotations

import doctest
import functools

import pytest
import torch
import torch.nn as nn

import trainer.models as models
from common.cli import UserError
from trainer.models import (CXRNet, UnknownModelError, create_model, feature_map_size, list_models,
                            register_model, resolve_model_name)

#: the thesis protocol "Models": body parameters without the ImageNet classifier.
PROTOCOL_BODY_PARAMS = {
    "resnet50": 23_508_032, "resnet152": 58_143_808,
    "densenet121": 6_953_856, "densenet161": 26_472_000,
    "efficientnet-b0": 4_007_548, "efficientnet-b1": 6_513_184, "efficientnet-b3": 10_696_232,
    "efficientnet-b4": 17_548_616, "efficientnet-b5": 28_340_784,
}
#: the thesis protocol: the head with one output, by feature width F.
PROTOCOL_HEAD_PARAMS = {2048: 2_106_880, 1024: 1_054_208, 1280: 1_317_376}

#: Cheap enough to build and run on 2 shared cores; the rest are only counted on "meta".
SMALL = ("resnet18", "densenet121", "efficientnet-b0", "efficientnet")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def n_params(params) -> int:
    return sum(p.numel() for p in params)


def meta_model(name: str, resolution: int = 320, outputs: int = 1) -> CXRNet:
    with torch.device("meta"):
        return create_model(name, resolution, outputs, weights="none")


@functools.lru_cache(maxsize=None)
def shared_meta_model(name: str) -> CXRNet:
    """One meta-device model per name at 320 px with one output, for tests that only read it."""
    return meta_model(name)


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_with_separate_body_and_head(name):
    model = shared_meta_model(name)
    # shapes on the meta device: every registered model, without memory or arithmetic
    h, w = feature_map_size(name, 320)  # a meta forward of the body
    assert (h, w) == (10, 10)
    with torch.device("meta"):
        assert model.head(torch.zeros(2, model.num_features, h, w)).shape == (2, 1)
    body, head = model.body_parameters(), model.head_parameters()
    assert {id(p) for p in body} | {id(p) for p in head} == {id(p) for p in model.parameters()}
    assert not {id(p) for p in body} & {id(p) for p in head}
    assert model.name in list_models() and model.name != "efficientnet"
    # the body drops the ImageNet classifier entirely
    assert not any(k.startswith(("fc.", "classifier.", "_fc.")) for k in model.body.state_dict())


@pytest.mark.parametrize("name", SMALL)
def test_forward_gives_logits_per_output(name):
    torch.manual_seed(0)
    model = create_model(name, 32, outputs=5, weights="none")
    model.train()  # BatchNorm1d in the head needs a batch of 2+ in train mode
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 5) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    fmap = model.body(x)
    assert fmap.shape[:2] == (2, model.num_features)
    assert tuple(fmap.shape[2:]) == feature_map_size(name, 32)
    out.sum().backward()  # gradients reach the body
    assert model.body_parameters()[0].grad is not None


@pytest.mark.parametrize("name", sorted(PROTOCOL_BODY_PARAMS))
def test_parameter_counts_match_protocol(name):
    model = shared_meta_model(name)
    assert n_params(model.body_parameters()) == PROTOCOL_BODY_PARAMS[name]
    head = n_params(model.head_parameters())
    if model.num_features in PROTOCOL_HEAD_PARAMS:
        assert head == PROTOCOL_HEAD_PARAMS[model.num_features]
    # every head follows the same formula: BN(2F) + Linear(2F,512) + BN(512) + Linear(512,1)
    f = model.num_features
    assert head == 2 * 2 * f + 2 * f * 512 + 2 * 512 + 512


def test_head_counts_cover_all_protocol_widths():
    # each F that the thesis protocol gives a head count for is met by a registered body
    widths = {shared_meta_model(n).num_features for n in ("resnet50", "densenet121", "efficientnet-b0")}
    assert widths == set(PROTOCOL_HEAD_PARAMS)


def test_head_layout_is_the_protocols():
    model = meta_model("resnet50", outputs=3)
    layers = list(model.head.classifier)
    kinds = [type(m) for m in layers]
    assert kinds == [nn.Flatten, nn.BatchNorm1d, nn.Dropout, nn.Linear, nn.ReLU, nn.BatchNorm1d,
                     nn.Dropout, nn.Linear]
    assert layers[1].num_features == 4096 and layers[5].num_features == 512
    assert (layers[2].p, layers[6].p) == (0.3, 0.6)
    assert layers[3].bias is None and layers[7].bias is None
    assert (layers[3].in_features, layers[3].out_features) == (4096, 512)
    assert (layers[7].in_features, layers[7].out_features) == (512, 3)


@pytest.mark.parametrize("order, expected", [("max,avg", [3.0, 0.0, 2.0, -1.0]),
                                              ("avg,max", [2.0, -1.0, 3.0, 0.0])])
def test_head_pools_max_and_average_in_the_given_order(order, expected):
    torch.manual_seed(0)
    head = models.CXRHead(num_features=2, outputs=1, pool_order=order).eval()
    fmap = torch.tensor([[[[1.0, 3.0]], [[-2.0, 0.0]]]])  # 1 x 2 x 1 x 2
    seen = {}
    head.classifier[1].register_forward_hook(lambda m, i, o: seen.setdefault("in", i[0]))
    head(fmap)
    assert torch.equal(seen["in"], torch.tensor([expected]))


def test_default_head_is_fastais_and_the_literal_one_is_an_argument_away():
    torch.manual_seed(0)
    fastai_like = create_model("resnet18", 32, 2, weights="none")
    literal = create_model("resnet18", 32, 2, weights="none", pool_order="avg,max", head_bn_bias=0.0)
    assert fastai_like.head.pool_order == "max,avg" and literal.head.pool_order == "avg,max"
    for model, bias in ((fastai_like, 1e-3), (literal, 0.0)):
        norms = [m for m in model.head.classifier if isinstance(m, nn.BatchNorm1d)]
        assert len(norms) == 2
        assert all(torch.equal(m.bias, torch.full_like(m.bias, bias)) for m in norms)
        assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    with pytest.raises(UserError, match="pool_order"):
        create_model("resnet18", 32, 2, weights="none", pool_order="max")


def test_head_init_is_kaiming_and_seeded():
    torch.manual_seed(3)
    a = create_model("resnet18", 32, outputs=2, weights="none")
    torch.manual_seed(3)
    b = create_model("resnet18", 32, outputs=2, weights="none")
    torch.manual_seed(4)
    c = create_model("resnet18", 32, outputs=2, weights="none")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.head.classifier[3].weight, c.head.classifier[3].weight)
    w = a.head.classifier[3].weight  # 512 x 1024, He normal: std = sqrt(2 / fan_in)
    assert abs(w.std().item() - (2 / 1024) ** 0.5) < 0.002
    assert abs(w.mean().item()) < 0.002


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "efficientnet-b0"])
def test_freeze_keeps_batchnorm_trainable(name):
    model = meta_model(name)
    model.freeze_body()
    bn_params, other = [], []
    for module in model.body.modules():
        target = bn_params if isinstance(module, nn.modules.batchnorm._BatchNorm) else other
        target.extend(module.parameters(recurse=False))
    assert bn_params and other
    assert all(p.requires_grad for p in bn_params)
    assert not any(p.requires_grad for p in other)
    assert all(p.requires_grad for p in model.head_parameters())
    model.unfreeze_body()
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_body_gets_no_gradient_except_batchnorm():
    torch.manual_seed(0)
    model = create_model("resnet18", 32, outputs=1, weights="none").train()
    model.freeze_body()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.body.conv1.weight.grad is None
    assert model.body.bn1.weight.grad is not None
    assert model.head.classifier[3].weight.grad is not None


@pytest.mark.parametrize("resolution, expected", [
    (160, "efficientnet-b0"), (240, "efficientnet-b1"), (320, "efficientnet-b3"),
    (400, "efficientnet-b4"), (480, "efficientnet-b5"),
    (32, "efficientnet-b0"), (199, "efficientnet-b0"), (200, "efficientnet-b1"),
    (201, "efficientnet-b1"), (280, "efficientnet-b3"), (360, "efficientnet-b4"),
    (440, "efficientnet-b5"), (1024, "efficientnet-b5"),
])
def test_efficientnet_follows_resolution(resolution, expected):
    assert resolve_model_name("efficientnet", resolution) == expected
    assert resolve_model_name("EfficientNet", resolution) == expected


def test_resolve_keeps_concrete_names():
    assert resolve_model_name("efficientnet-b7", 160) == "efficientnet-b7"
    assert resolve_model_name("efficientnet_b2", 160) == "efficientnet-b2"
    assert resolve_model_name("ResNet50", 160) == "resnet50"


def test_unknown_model_lists_known_ones():
    with pytest.raises(UnknownModelError) as err:
        create_model("vgg16", 64, 1, weights="none")
    assert isinstance(err.value, UserError)
    for name in list_models():
        assert name in str(err.value)
    with pytest.raises(UnknownModelError):
        feature_map_size("vit", 64)


@pytest.mark.parametrize("bad", [0, 16, 31, -320, 64.5, "x"])
def test_bad_resolution_is_user_error(bad):
    with pytest.raises(UserError, match="resolution"):
        create_model("resnet18", bad, 1, weights="none")


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_bad_outputs_is_user_error(bad):
    with pytest.raises(UserError, match="outputs"):
        create_model("resnet18", 32, bad, weights="none")


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet50")(lambda resolution: None)
    with pytest.raises(ValueError, match="already registered"):
        register_model("efficientnet")(lambda resolution: None)


def test_list_models_has_the_protocol_models_and_the_alias():
    names = list_models()
    assert len(names) == len(set(names))
    for name in ("resnet18", "resnet34", "resnet50", "resnet152", "densenet121", "densenet161",
                 "densenet169", *[f"efficientnet-b{i}" for i in range(8)], "efficientnet"):
        assert name in names


@pytest.mark.parametrize("name, resolution, expected", [
    ("resnet50", 320, (10, 10)), ("densenet121", 320, (10, 10)), ("efficientnet", 480, (15, 15)),
    # off the multiples of 32 the families round differently: ResNet and EfficientNet ("same"
    # padding) round up at each stride, DenseNet's average-pool transitions round down
    ("resnet50", 300, (10, 10)), ("densenet121", 300, (9, 9)), ("efficientnet-b3", 300, (10, 10)),
])
def test_feature_map_size(name, resolution, expected):
    assert feature_map_size(name, resolution) == expected


def test_feature_map_size_matches_a_real_forward():
    torch.manual_seed(0)
    for name, res in (("resnet18", 72), ("densenet121", 72), ("efficientnet-b0", 72)):
        model = create_model(name, res, 1, weights="none").eval()
        with torch.no_grad():
            fmap = model.body(torch.zeros(1, 3, res, res))
        assert tuple(fmap.shape[2:]) == feature_map_size(name, res), name


def test_docstring_examples_run():
    from trainer.models import cost, network, registry
    attempted = 0
    for module in (network, registry, cost):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__
        attempted += result.attempted
    assert attempted >= 16


def test_smallcnn_has_no_imagenet_weights_and_a_stride_32_body():
    from trainer.weights import WeightsError
    with pytest.raises(WeightsError, match="no ImageNet weights"):
        create_model("smallcnn", 64, 1, weights="imagenet")
    torch.manual_seed(0)
    model = create_model("smallcnn", 64, 5, weights="none")
    assert model.body(torch.zeros(2, 3, 64, 64)).shape == (2, 128, 2, 2)
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 5)


# --- metadata registered with the model -------------------------------------------------------
def test_every_registered_model_has_its_metadata():
    from trainer.models import model_info
    for name in list_models():
        if name == "efficientnet":
            continue
        info = model_info(name)
        assert info.name == name and info.family and info.source
        if name in models.NO_IMAGENET_WEIGHTS:
            assert not info.has_imagenet_weights and info.weights_url is None
        else:
            assert info.weights_url.startswith("https://")
            assert info.weights_file == f"{name}-imagenet.pth"
            assert info.published_gmacs_224 > 0 and info.cost_source
            # the classifier the body drops is the one the original network has
            with torch.device("meta"):
                net = models.registry.builder(name)(64)
            assert any(k.startswith(info.classifier_prefix) for k in net.state_dict())
    assert model_info("efficientnet").compound_scaled
    assert [model_info(n).variant for n in ("resnet152", "densenet121", "efficientnet-b3",
                                            "smallcnn")] == ["152", "121", "b3", ""]
    assert model_info("efficientnet", 480).name == "efficientnet-b5"
    assert {model_info(n).family for n in ("resnet18", "densenet161", "efficientnet-b7",
                                          "smallcnn")} == {"resnet", "densenet", "efficientnet",
                                                           "smallcnn"}


@pytest.mark.parametrize("family", ["resnet", "densenet", "efficientnet"])
def test_size_order_follows_the_parameter_count(family):
    from trainer.models import model_info
    members = [n for n in list_models() if n != "efficientnet" and model_info(n).family == family]
    assert len(members) >= 3
    by_order = sorted(members, key=lambda n: model_info(n).size_order)
    by_params = sorted(members, key=lambda n: n_params(shared_meta_model(n).body_parameters()))
    assert by_order == by_params


# --- fastai's layer groups and head --------------------------------------------------------
def ids(params) -> list[int]:
    return [id(p) for p in params]


@pytest.mark.parametrize("name, groups", [("resnet50", 3), ("densenet121", 3),
                                          ("efficientnet-b0", 2), ("smallcnn", 2)])
def test_layer_groups_cover_every_parameter_once(name, groups):
    model = shared_meta_model(name)
    split = model.layer_groups()
    assert len(split) == groups and all(split)
    flat = [i for g in split for i in ids(g)]
    assert len(flat) == len(set(flat)) and set(flat) == set(ids(model.parameters()))
    assert ids(split[-1]) == ids(model.head_parameters())


def test_resnet_and_densenet_groups_are_cut_where_fastai_cuts():
    model = shared_meta_model("resnet50")
    first, second, _ = model.layer_groups()
    body = model.body
    assert set(ids(first)) == set(ids(p for m in (body.conv1, body.bn1, body.layer1, body.layer2)
                                      for p in m.parameters()))
    assert set(ids(second)) == set(ids(p for m in (body.layer3, body.layer4) for p in m.parameters()))
    model = shared_meta_model("densenet121")
    first, second, _ = model.layer_groups()
    assert ids(first)[-1] == id(list(model.body.features.denseblock2.parameters())[-1])
    assert ids(second)[0] == id(next(model.body.features.transition2.parameters()))


@pytest.fixture(scope="module")
def fastai_learner():
    return pytest.importorskip("fastai.vision.learner")


@pytest.mark.parametrize("arch, groups", [("resnet18", 3), ("densenet121", 3),
                                          ("efficientnet-b0", 2)])
def test_layer_groups_match_fastais_splitters(fastai_learner, arch, groups):
    # fastai cuts the original network into its body (create_body, sharing the modules) and
    # splits body + head with the arch's splitter; ours must give the same parameters per group
    import torchvision.models as tvm
    from fastai.vision.learner import create_body, default_split, model_meta

    torch.manual_seed(0)
    net = models.registry.builder(arch)(64)
    ours = CXRNet(models.builtin.body_of(net), models.builtin.body_of(net).num_features, 1)
    if arch == "efficientnet-b0":  # not in fastai's model_meta: default_split on (body, head)
        fastai_model = nn.Sequential(ours.body, ours.head)
        split = default_split
    else:
        meta = model_meta[getattr(tvm, arch)]
        fastai_model = nn.Sequential(create_body(net, cut=meta["cut"]), ours.head)
        split = meta["split"]
    theirs = [ids(g) for g in split(fastai_model)]
    assert len(theirs) == groups
    assert [ids(g) for g in ours.layer_groups()] == theirs


def test_head_is_fastais_create_head(fastai_learner):
    from fastai.layers import AdaptiveConcatPool2d
    from fastai.torch_core import apply_init
    from fastai.vision.learner import create_head

    for f, outputs in ((64, 5), (2048, 1)):
        torch.manual_seed(11)
        theirs = create_head(f, outputs, lin_ftrs=[512], ps=0.6)  # ps 0.6: dropouts 0.3, 0.6
        apply_init(theirs, nn.init.kaiming_normal_)               # as create_vision_model does
        torch.manual_seed(11)
        ours = models.CXRHead(f, outputs)
        assert isinstance(theirs[0], AdaptiveConcatPool2d)
        layers = list(theirs)[2:]
        assert [type(m) for m in layers] == [type(m) for m in list(ours.classifier)[1:]]
        for a, b in zip(layers, list(ours.classifier)[1:]):
            if isinstance(a, nn.Dropout):
                assert a.p == b.p
            for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
                assert ka == kb and torch.equal(va, vb), (type(a).__name__, ka)
        fmap = torch.randn(3, f, 4, 4)
        assert torch.equal(theirs[1](theirs[0](fmap)), ours.classifier[0](
            torch.cat([ours.max_pool(fmap), ours.avg_pool(fmap)], 1)))
        theirs.eval(), ours.eval()
        assert torch.equal(theirs(fmap), ours(fmap))


def test_densenet_body_ends_at_norm5_like_fastais(fastai_learner):
    import torchvision.models as tvm
    from fastai.vision.learner import create_body, model_meta

    torch.manual_seed(0)
    net = tvm.densenet121(weights=None).eval()
    fastai_body = create_body(net, cut=model_meta[tvm.densenet121]["cut"])
    ours = models.builtin.body_of(net).eval()
    literal = models.builtin.body_of(net, densenet_final_relu=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference, out, relu = fastai_body(x), ours(x), literal(x)
    assert torch.equal(out, reference) and (out < 0).any()
    assert torch.equal(relu, torch.relu(reference))
    model = create_model("densenet121", 32, 1, weights="none", densenet_final_relu=True)
    assert model.body.final_relu and not create_model("densenet121", 32, 1, weights="none").body.final_relu


# --- cost -----------------------------------------------------------------------------------
def test_model_flops_counts_without_running():
    from trainer.models import COUNTED, forward_cost, model_flops
    # body and head, one output, 2 FLOPs per multiply-accumulate: torchvision publishes 4.09
    # GMACs for ResNet-50 at 224 px; convolution cost scales with pixels
    assert model_flops("resnet50", 224) == pytest.approx(2 * 4.09e9, rel=0.01)
    assert model_flops("resnet50", 448) == pytest.approx(4 * model_flops("resnet50", 224), rel=0.01)
    assert model_flops("efficientnet", 320) == model_flops("efficientnet-b3", 320)
    cost = forward_cost("densenet121", 448)
    assert cost.flops == pytest.approx(2e9 * 2.87 * 4) and cost.source.startswith("published: ")
    cost = forward_cost("smallcnn", 480)
    assert cost.source == COUNTED and cost.flops == model_flops("smallcnn", 480)
    assert 0.55e9 < cost.flops < 0.65e9  # SmallCNN's docstring: 0.6 GFLOPs forward at 480 px
