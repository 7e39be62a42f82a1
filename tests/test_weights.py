"""trainer.weights: the ImageNet cache, weight files, and the download/list command line.

Every weight file here is made by the test itself (a randomly initialised network's state_dict
saved under the name the loader expects); nothing touches the network."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from efficientnet_pytorch import EfficientNet

from common.cli import UserError, run_cli
from trainer import weights
from trainer.models import create_model
from trainer.weights import MissingWeightsError, WeightsError

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def no_default_cache(monkeypatch, tmp_path):
    # Never read or write the user's real cache from a test.
    monkeypatch.setenv(weights.ENV_DIR, str(tmp_path / "default-cache"))


def original_network(name: str, seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name.startswith("efficientnet"):
        return EfficientNet.from_name(name, image_size=64)
    return getattr(tvm, name)(weights=None)


def save_state(state: dict, path) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "efficientnet-b0"])
def test_imagenet_weights_load_into_the_body(tmp_path, name):
    net = original_network(name, seed=1)
    saved = net.state_dict()
    save_state(saved, tmp_path / f"{name}-imagenet.pth")

    torch.manual_seed(0)
    model = create_model(name, 64, outputs=2, weights="imagenet", weights_dir=str(tmp_path))
    body = model.body.state_dict()
    classifier = weights.classifier_prefix(name)
    assert set(body) == {k for k in saved if not k.startswith(classifier)}
    for key, value in body.items():
        assert torch.equal(value, saved[key]), key

    torch.manual_seed(0)
    fresh = create_model(name, 64, outputs=2, weights="none")
    assert any(not torch.equal(v, fresh.body.state_dict()[k]) for k, v in body.items())
    # the head does not depend on where the body's weights came from
    for key, value in model.head.state_dict().items():
        assert torch.equal(value, fresh.head.state_dict()[key]), key


def test_default_cache_dir_comes_from_the_environment(tmp_path, monkeypatch):
    cache = tmp_path / "env-cache"
    save_state(original_network("resnet18").state_dict(), cache / "resnet18-imagenet.pth")
    monkeypatch.setenv(weights.ENV_DIR, str(cache))
    assert weights.default_weights_dir() == str(cache)
    model = create_model("resnet18", 32, 1)  # weights="imagenet", weights_dir=None
    assert torch.equal(model.body.conv1.weight, original_network("resnet18").conv1.weight)
    monkeypatch.delenv(weights.ENV_DIR)
    assert weights.default_weights_dir().endswith(os.path.join(".cache", "cxr-sweep", "weights"))


def test_cache_is_a_storage_location(tmp_path):
    # weights_dir goes through common.storage (the same call path serves s3://)
    save_state(original_network("resnet18").state_dict(), tmp_path / "resnet18-imagenet.pth")
    model = create_model("resnet18", 32, 1, weights_dir=f"file://{tmp_path}")
    assert torch.equal(model.body.conv1.weight, original_network("resnet18").conv1.weight)


def test_missing_weights_name_the_file_and_the_command(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        create_model("resnet18", 32, 1, weights="imagenet", weights_dir=str(tmp_path))
    text = str(err.value)
    assert isinstance(err.value, UserError)
    assert str(tmp_path / "resnet18-imagenet.pth") in text
    assert f"python -m trainer.weights download --models resnet18 --dir {tmp_path}" in text
    assert "\n" not in text


def test_alias_looks_for_the_resolved_variant(tmp_path):
    with pytest.raises(MissingWeightsError, match="efficientnet-b3-imagenet.pth"):
        create_model("efficientnet", 320, 1, weights_dir=str(tmp_path))


def test_weights_none_never_reads_the_cache(tmp_path):
    model = create_model("resnet18", 32, 1, weights="none", weights_dir=str(tmp_path / "absent"))
    assert model.name == "resnet18"


def test_file_without_classifier_loads(tmp_path):
    state = {k: v for k, v in original_network("resnet18").state_dict().items()
             if not k.startswith("fc.")}
    save_state(state, tmp_path / "resnet18-imagenet.pth")
    model = create_model("resnet18", 32, 1, weights_dir=str(tmp_path))
    assert torch.equal(model.body.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])


def test_old_files_without_batchnorm_counters_load(tmp_path):
    state = {k: v for k, v in original_network("resnet18").state_dict().items()
             if not k.endswith("num_batches_tracked")}
    save_state(state, tmp_path / "resnet18-imagenet.pth")
    model = create_model("resnet18", 32, 1, weights_dir=str(tmp_path))
    assert torch.equal(model.body.conv1.weight, state["conv1.weight"])


def test_wrong_architecture_is_refused(tmp_path):
    save_state(original_network("resnet34").state_dict(), tmp_path / "resnet18-imagenet.pth")
    with pytest.raises(WeightsError, match="does not fit.*unexpected keys"):
        create_model("resnet18", 32, 1, weights_dir=str(tmp_path))


def test_missing_body_key_is_refused(tmp_path):
    state = original_network("resnet18").state_dict()
    del state["layer2.0.conv1.weight"]
    save_state(state, tmp_path / "resnet18-imagenet.pth")
    with pytest.raises(WeightsError, match="missing keys.*layer2.0.conv1.weight"):
        create_model("resnet18", 32, 1, weights_dir=str(tmp_path))


def test_shape_mismatch_is_refused(tmp_path):
    state = original_network("resnet18").state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    save_state(state, tmp_path / "resnet18-imagenet.pth")
    with pytest.raises(WeightsError, match="size mismatch"):
        create_model("resnet18", 32, 1, weights_dir=str(tmp_path))


def test_sha256_next_to_the_file_is_checked(tmp_path):
    path = tmp_path / "resnet18-imagenet.pth"
    save_state(original_network("resnet18").state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "resnet18-imagenet.pth.sha256").write_text(f"{digest}  resnet18-imagenet.pth\n")
    create_model("resnet18", 32, 1, weights_dir=str(tmp_path))
    (tmp_path / "resnet18-imagenet.pth.sha256").write_text(f"{'0' * 64}  resnet18-imagenet.pth\n")
    with pytest.raises(WeightsError, match="sha256"):
        create_model("resnet18", 32, 1, weights_dir=str(tmp_path))


def test_unsafe_pickle_is_refused(tmp_path):
    # weights_only=True refuses arbitrary objects: a file cannot run code on load
    torch.save({"conv1.weight": torch.zeros(1), "x": Path("/")}, tmp_path / "resnet18-imagenet.pth")
    with pytest.raises(WeightsError, match="weights_only"):
        create_model("resnet18", 32, 1, weights_dir=str(tmp_path))


def test_weights_file_whole_model_and_checkpoint(tmp_path):
    torch.manual_seed(5)
    trained = create_model("resnet18", 32, 3, weights="none")
    whole, ckpt = tmp_path / "whole.pth", tmp_path / "latest.pt"
    torch.save(trained.state_dict(), whole)
    torch.save({"model": trained.state_dict(), "epoch": 4}, ckpt)
    for path in (whole, ckpt, str(whole)):
        torch.manual_seed(0)
        model = create_model("resnet18", 32, 3, weights=path)
        for key, value in model.state_dict().items():
            assert torch.equal(value, trained.state_dict()[key]), key
    with pytest.raises(WeightsError, match="size mismatch"):
        create_model("resnet18", 32, 2, weights=whole)  # head with another number of outputs
    with pytest.raises(WeightsError, match="missing keys"):
        create_model("resnet34", 32, 3, weights=whole)


def test_weights_file_body_only(tmp_path):
    torch.manual_seed(5)
    trained = create_model("resnet18", 32, 3, weights="none")
    for i, state in enumerate((trained.body.state_dict(),
                               {f"body.{k}": v for k, v in trained.body.state_dict().items()},
                               {f"module.{k}": v for k, v in trained.body.state_dict().items()})):
        path = tmp_path / f"body{i}.pth"
        torch.save(state, path)
        torch.manual_seed(0)
        model = create_model("resnet18", 32, 1, weights=path)
        for key, value in model.body.state_dict().items():
            assert torch.equal(value, trained.body.state_dict()[key]), key
        torch.manual_seed(0)
        fresh = create_model("resnet18", 32, 1, weights="none")
        assert torch.equal(model.head.classifier[3].weight, fresh.head.classifier[3].weight)


@pytest.mark.parametrize("bad", [None, "imagenet-v2", "/nonexistent/w.pth"])
def test_bad_weights_argument(bad):
    with pytest.raises(WeightsError, match="'imagenet', 'none' or a path"):
        create_model("resnet18", 32, 1, weights=bad)


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="not a state_dict"):
        create_model("resnet18", 32, 1, weights=tmp_path / "list.pth")


# --- download (the fetch is replaced: no network in tests) --------------------------------
def test_densenet_published_key_names_are_normalised():
    old = {"features.denseblock1.denselayer1.norm.1.weight": 1,
           "features.denseblock1.denselayer1.conv.2.weight": 2,
           "features.norm5.bias": 3, "classifier.weight": 4}
    assert weights.normalise_keys("densenet121", old) == {
        "features.denseblock1.denselayer1.norm1.weight": 1,
        "features.denseblock1.denselayer1.conv2.weight": 2,
        "features.norm5.bias": 3, "classifier.weight": 4}
    assert weights.normalise_keys("resnet50", old) == old


def test_download_writes_verified_files_once(tmp_path):
    published = original_network("resnet18", seed=7).state_dict()
    calls = []

    def fake_fetch(model, cache_dir):
        calls.append(model)
        assert os.path.isdir(cache_dir)
        return dict(published)

    out = str(tmp_path / "cache")
    assert weights.download(["resnet18"], out, fetch=fake_fetch, log=lambda _: None) == ["resnet18"]
    data = (tmp_path / "cache" / "resnet18-imagenet.pth").read_bytes()
    sidecar = (tmp_path / "cache" / "resnet18-imagenet.pth.sha256").read_text()
    assert sidecar == f"{hashlib.sha256(data).hexdigest()}  resnet18-imagenet.pth\n"
    model = create_model("resnet18", 32, 1, weights_dir=out)
    assert torch.equal(model.body.layer1[0].conv1.weight, published["layer1.0.conv1.weight"])

    assert weights.download(["resnet18"], out, fetch=fake_fetch, log=lambda _: None) == []
    assert calls == ["resnet18"]  # present: not fetched again
    weights.download(["resnet18"], out, force=True, fetch=fake_fetch, log=lambda _: None)
    assert calls == ["resnet18", "resnet18"]


def test_download_refuses_a_file_that_does_not_fit(tmp_path):
    def fake_fetch(model, cache_dir):
        return original_network("resnet34").state_dict()

    with pytest.raises(WeightsError, match="does not fit"):
        weights.download(["resnet18"], str(tmp_path), fetch=fake_fetch, log=lambda _: None)
    assert not (tmp_path / "resnet18-imagenet.pth").exists()


def test_fetch_offline_is_a_download_error(monkeypatch, tmp_path):
    seen = {}

    def offline(url, **kwargs):
        seen.update(kwargs, url=url)
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(weights.DownloadError, match="cannot fetch resnet50 from https://"):
        weights.fetch_state_dict("resnet50", str(tmp_path))
    assert seen["weights_only"] is True and seen["check_hash"] is True
    assert seen["url"] == tvm.ResNet50_Weights.IMAGENET1K_V1.url
    with pytest.raises(weights.DownloadError, match="efficientnet-b3-5fb5a3c3.pth"):
        weights.fetch_state_dict("efficientnet-b3", str(tmp_path))


def test_cli_download_offline_exits_1_with_one_line(monkeypatch, tmp_path, capsys):
    def offline(model, cache_dir):
        raise weights.DownloadError(f"cannot fetch {model} from https://example: offline")

    monkeypatch.setattr(weights, "fetch_state_dict", offline)
    rc = run_cli(weights.main, ["download", "--models", "resnet18", "--dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err.count("\n") == 0 and "cannot fetch resnet18" in err
    assert not (tmp_path / "resnet18-imagenet.pth").exists()


def test_cli_models_argument():
    assert weights.parse_models("resnet50, densenet121,resnet50") == ["resnet50", "densenet121"]
    assert weights.parse_models("efficientnet") == [
        "efficientnet-b0", "efficientnet-b1", "efficientnet-b3", "efficientnet-b4", "efficientnet-b5"]
    assert "resnet152" in weights.parse_models("protocol")
    assert len(weights.parse_models("all")) == 15
    with pytest.raises(UserError, match="unknown model 'vgg'.*resnet50"):
        weights.parse_models("resnet50,vgg")


def test_cli_unknown_model_exits_2(tmp_path, capsys):
    rc = run_cli(weights.main, ["download", "--models", "vgg16", "--dir", str(tmp_path)],
                 prog="python -m trainer.weights")
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("python -m trainer.weights: error: --models: unknown model")
    assert err.count("\n") == 1


def test_cli_list_present_missing_and_corrupt(tmp_path, capsys):
    save_state(original_network("resnet18").state_dict(), tmp_path / "resnet18-imagenet.pth")
    rc = run_cli(weights.main, ["list", "--models", "resnet18,resnet34", "--dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 1
    assert any(ln.startswith("resnet18") and "present" in ln for ln in out.splitlines())
    assert any(ln.startswith("resnet34") and "missing" in ln for ln in out.splitlines())
    assert f"download --models resnet34 --dir {tmp_path}" in err

    assert run_cli(weights.main, ["list", "--models", "resnet18", "--dir", str(tmp_path)]) == 0
    (tmp_path / "resnet18-imagenet.pth.sha256").write_text("0" * 64 + "  resnet18-imagenet.pth\n")
    capsys.readouterr()
    rc = run_cli(weights.main, ["list", "--models", "resnet18", "--dir", str(tmp_path), "--verify"])
    out, err = capsys.readouterr()
    assert rc == 1 and "CORRUPT" in out and "--force" in err


def test_cli_help_has_examples(capsys):
    for argv in (["--help"], ["download", "--help"], ["list", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            weights.main(argv)
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out and "python -m trainer.weights download --models" in out
        assert "CXR_WEIGHTS_DIR" in out and "exit codes" in out


def test_module_runs_as_a_command():
    proc = subprocess.run([sys.executable, "-m", "trainer.weights", "list", "--models", "resnet18",
                           "--dir", "/nonexistent-cxr-weights"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "missing" in proc.stdout


def test_models_never_import_the_download_cli():
    # the cache reader lives with the models; only `python -m trainer.weights` downloads, and
    # importing the models must not pull it (or timm) in: no models <-> weights cycle
    code = ("import sys, trainer.models; "
            "print(sorted(m for m in ('trainer.weights', 'timm') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_cli_models_know_timm_and_refuse_models_without_weights():
    assert weights.parse_models("timm:ConvNeXt_Atto") == ["timm:convnext_atto"]
    with pytest.raises(UserError, match="smallcnn has no ImageNet weights"):
        weights.parse_models("smallcnn")
    assert "timm:convnext_tiny" in weights._build_parser().format_help()
