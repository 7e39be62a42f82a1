"""``timm:<name>`` models: any timm network as a body under the protocol head.

Parametrised over tiny timm models with random weights (nothing is downloaded): a ConvNeXt, a
ResNet, an EfficientNet and a ViT (tokens reshaped onto the patch grid). Weight files are made by
the tests themselves from randomly initialised timm networks."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from common.cli import UserError, run_cli
from trainer import weights
from trainer.models import (NORM_TYPES, UnknownModelError, create_model, feature_map_size,
                            forward_cost, model_flops, model_info, resolve_model_name)
from trainer.models.timm_body import build_timm_net
from trainer.models.weights_cache import MissingWeightsError

timm = pytest.importorskip("timm")

#: (timm name, resolution it runs at here, feature width F, feature map side, layer groups)
TINY = [("convnext_atto", 64, 320, 2, 3), ("resnet10t", 64, 512, 2, 3),
        ("efficientnet_b0", 64, 1280, 2, 2), ("vit_tiny_patch16_224", 64, 192, 4, 2)]
NAMES = [t[0] for t in TINY]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def no_default_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(weights.ENV_DIR, str(tmp_path / "default-cache"))


def ids(params) -> list[int]:
    return [id(p) for p in params]


@pytest.mark.parametrize("name, res, f, side, groups", TINY)
def test_forward_shapes_and_layer_groups(name, res, f, side, groups):
    torch.manual_seed(0)
    model = create_model(f"timm:{name}", res, outputs=5, weights="none").train()
    assert model.name == f"timm:{name}" and model.num_features == f
    x = torch.randn(2, 3, res, res)
    fmap = model.body(x)
    assert fmap.shape == (2, f, side, side)
    assert feature_map_size(f"timm:{name}", res) == (side, side)
    out = model(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.head_parameters())
    split = model.layer_groups()
    assert len(split) == groups and all(split)
    flat = [i for g in split for i in ids(g)]
    assert len(flat) == len(set(flat)) and set(flat) == set(ids(model.parameters()))
    assert ids(split[-1]) == ids(model.head_parameters())


def test_vit_tokens_become_the_patch_grid():
    # the class token is dropped and patch token k lands at (k // w, k % w)
    torch.manual_seed(0)
    model = create_model("timm:vit_tiny_patch16_224", 64, 1, weights="none").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        tokens = model.body.net(x)                  # 1 x (1 + 16) x 192
        fmap = model.body(x)                        # 1 x 192 x 4 x 4
    assert tokens.shape == (1, 17, 192)
    for k in range(16):
        assert torch.equal(fmap[0, :, k // 4, k % 4], tokens[0, 1 + k])
    # another resolution works with the same parameters (dynamic_img_size): 96 px -> 6 x 6
    assert model.body(torch.zeros(1, 3, 96, 96)).shape == (1, 192, 6, 6)


def test_three_groups_cut_the_stages_in_halves():
    model = create_model("timm:convnext_atto", 64, 1, weights="none")
    net = model.body.net
    first, second, _ = model.layer_groups()
    assert set(ids(first)) == set(ids(p for m in (net.stem, net.stages[0], net.stages[1])
                                      for p in m.parameters()))
    assert set(ids(net.stages[3].parameters())) <= set(ids(second))
    model = create_model("timm:resnet10t", 64, 1, weights="none")
    net = model.body.net
    first, second, _ = model.layer_groups()
    assert set(ids(second)) == set(ids(p for m in (net.layer3, net.layer4) for p in m.parameters()))


@pytest.mark.parametrize("name", ["convnext_atto", "efficientnet_b0"])
def test_freeze_keeps_norm_layers_trainable(name):
    model = create_model(f"timm:{name}", 64, 1, weights="none")
    model.freeze_body()
    norm, other = [], []
    for module in model.body.modules():
        (norm if isinstance(module, NORM_TYPES) else other).extend(module.parameters(recurse=False))
    assert norm and other
    assert all(p.requires_grad for p in norm) and not any(p.requires_grad for p in other)
    assert all(p.requires_grad for p in model.head_parameters())
    if name == "convnext_atto":  # its norms are LayerNorms, which fastai's freeze keeps training
        assert any(isinstance(m, nn.LayerNorm) and not isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for m in model.body.modules())
    model.unfreeze_body()
    assert all(p.requires_grad for p in model.parameters())


def random_timm_state(name: str, seed: int = 3) -> dict:
    torch.manual_seed(seed)
    return build_timm_net(name).state_dict()


@pytest.mark.parametrize("name", NAMES)
def test_cached_weights_load_into_the_body(tmp_path, name):
    state = random_timm_state(name)
    torch.save(state, tmp_path / f"timm-{name}-imagenet.pth")
    torch.manual_seed(0)
    model = create_model(f"timm:{name}", 64, 2, weights_dir=str(tmp_path))
    body = model.body.state_dict()
    assert list(body) == list(state)  # timm's own key names, no wrapper prefix
    for key, value in body.items():
        assert torch.equal(value, state[key]), key
    torch.manual_seed(0)
    fresh = create_model(f"timm:{name}", 64, 2, weights="none")
    assert any(not torch.equal(v, fresh.body.state_dict()[k]) for k, v in body.items())
    for key, value in model.head.state_dict().items():
        assert torch.equal(value, fresh.head.state_dict()[key]), key


def test_weights_file_round_trip(tmp_path):
    torch.manual_seed(5)
    trained = create_model("timm:convnext_atto", 64, 3, weights="none")
    torch.save({"model": trained.state_dict(), "epoch": 2}, tmp_path / "latest.pt")
    torch.save(trained.body.state_dict(), tmp_path / "body.pt")
    torch.manual_seed(0)
    model = create_model("timm:convnext_atto", 64, 3, weights=tmp_path / "latest.pt")
    for key, value in trained.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    fresh = create_model("timm:convnext_atto", 64, 3, weights="none")
    fresh.load_state_dict(trained.state_dict(), strict=True)  # how a resumed trial loads
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in trained.state_dict().items())
    model = create_model("timm:convnext_atto", 64, 3, weights=tmp_path / "body.pt")
    for key, value in trained.body.state_dict().items():
        assert torch.equal(value, model.body.state_dict()[key]), key
    with pytest.raises(weights.WeightsError, match="does not fit"):
        create_model("timm:resnet10t", 64, 3, weights=tmp_path / "latest.pt")


def test_missing_weights_name_the_download_command(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        create_model("timm:convnext_atto", 64, 1, weights_dir=str(tmp_path))
    text = str(err.value)
    assert "\n" not in text and str(tmp_path / "timm-convnext_atto-imagenet.pth") in text
    assert f"python -m trainer.weights download --models timm:convnext_atto --dir {tmp_path}" in text


def test_unknown_timm_name_suggests_close_names(capsys):
    with pytest.raises(UnknownModelError) as err:
        resolve_model_name("timm:convnext_atoo", 64)
    text = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in text
    assert "unknown timm model 'convnext_atoo'" in text and "timm:convnext_atto" in text
    rc = run_cli(weights.main, ["download", "--models", "timm:vit_tiny_patch16", "--dir", "x"],
                 prog="python -m trainer.weights")
    err_text = capsys.readouterr().err
    assert rc == 2 and err_text.count("\n") == 1 and "timm:vit_tiny_patch16_224" in err_text


def test_names_keep_timms_spelling():
    assert resolve_model_name("timm:ConvNeXt_Atto", 64) == "timm:convnext_atto"
    assert resolve_model_name("timm:convnext_atto.d2_in1k", 64) == "timm:convnext_atto.d2_in1k"
    assert weights.parse_models("timm:convnext_atto,resnet18") == ["timm:convnext_atto", "resnet18"]


def test_model_info_and_cost():
    info = model_info("timm:convnext_atto")
    assert info.family == "timm:convnext" and info.source.startswith("timm ")
    assert info.variant == "convnext_atto"
    assert info.weights_file == "timm-convnext_atto-imagenet.pth"
    assert info.weights_url and "convnext_atto" in info.weights_url
    larger = model_info("timm:convnext_femto")
    assert larger.family == info.family and larger.size_order > info.size_order
    assert info.size_order == sum(p.numel() for p in build_timm_net("convnext_atto").parameters())
    cost = forward_cost("timm:convnext_atto", 128)
    assert cost.source.startswith("counted") and cost.flops == model_flops("timm:convnext_atto", 128)
    assert model_flops("timm:convnext_atto", 128) == pytest.approx(
        4 * model_flops("timm:convnext_atto", 64), rel=0.05)


def test_a_model_that_cannot_be_a_body_here_is_one_line():
    # TNT needs its fixed 224 px input; CoaT's head must pool: both refused before any training
    with pytest.raises(UserError, match="timm:tnt_s_patch16_224 cannot run at 64 px: Input image"):
        create_model("timm:tnt_s_patch16_224", 64, 1, weights="none")
    with pytest.raises(UserError, match="timm:coat_lite_tiny cannot be built without its classi"):
        create_model("timm:coat_lite_tiny", 64, 1, weights="none")


def test_download_writes_a_verified_timm_file(tmp_path):
    published = random_timm_state("resnet10t", seed=9)
    calls = []

    def fake_fetch(model, cache_dir):
        calls.append(model)
        return dict(published)

    out = str(tmp_path / "cache")
    assert weights.download(["timm:resnet10t"], out, fetch=fake_fetch, log=lambda _: None) == [
        "timm:resnet10t"]
    assert (tmp_path / "cache" / "timm-resnet10t-imagenet.pth.sha256").exists()
    model = create_model("timm:resnet10t", 64, 1, weights_dir=out)
    assert torch.equal(model.body.net.layer1[0].conv1.weight, published["layer1.0.conv1.weight"])
    with pytest.raises(weights.WeightsError, match="does not fit"):
        weights.download(["timm:convnext_atto"], out, fetch=fake_fetch, log=lambda _: None)
    assert not (tmp_path / "cache" / "timm-convnext_atto-imagenet.pth").exists()


def test_a_timm_trial_trains_from_the_offline_cache(tiny_phantom_store, tmp_path):
    # the whole path a sweep takes: TrainConfig -> run_trial -> create_model from the weights cache
    # (a file this test writes, standing in for `download`), checkpoints with timm's key names
    from trainer.config import TrainConfig
    from trainer.train import run_trial

    cache = tmp_path / "weights"
    cache.mkdir()
    torch.save(random_timm_state("resnet10t"), cache / "timm-resnet10t-imagenet.pth")
    cfg = TrainConfig(store=tiny_phantom_store, model="timm:resnet10t", resolution=32,
                      weights="imagenet", weights_dir=str(cache), epochs_frozen=1,
                      epochs_unfrozen=1, batch_studies=8, max_train_studies=16,
                      max_valid_studies=16, workers=0)
    result = run_trial(cfg, str(tmp_path / "trial"))
    assert [r["epoch"] for r in result["history"]] == [1, 2]
    assert all(0.0 <= r["auroc_mean"] <= 1.0 for r in result["history"])
    latest = torch.load(tmp_path / "trial" / "checkpoints" / "latest.pt", weights_only=True)
    assert "body.layer1.0.conv1.weight" in latest["model"]
    with pytest.raises(MissingWeightsError, match="download --models timm:resnet10t"):
        run_trial(dataclasses.replace(cfg, weights_dir=str(tmp_path / "empty")),
                  str(tmp_path / "trial2"))


def test_download_goes_through_timms_own_pretrained_loader(tmp_path, monkeypatch):
    # the real fetch path with the network replaced by a local file: timm reads a published-format
    # file (classifier included) as its pretrained weights and drops the classifier itself
    torch.manual_seed(4)
    published = timm.create_model("resnet10t", pretrained=False).state_dict()
    assert "fc.weight" in published
    torch.save(published, tmp_path / "published.pth")
    real = timm.create_model

    def offline_create_model(name, pretrained=False, **kwargs):
        if pretrained:
            kwargs["pretrained_cfg_overlay"] = {"file": str(tmp_path / "published.pth")}
        return real(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create_model)
    out = str(tmp_path / "cache")
    assert weights.download(["timm:resnet10t"], out, log=lambda _: None) == ["timm:resnet10t"]
    model = create_model("timm:resnet10t", 64, 1, weights_dir=out)
    body = model.body.state_dict()
    assert set(body) == {k for k in published if not k.startswith("fc.")}
    for key, value in body.items():
        assert torch.equal(value, published[key]), key
