"""Grad-CAM: the heatmap peaks on a planted finding; the CLI draws the best checkpoints of a sweep."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from analysis import gradcam
from common.cli import run_cli
from trainer.models import CXRNet, create_model
try:  # tests/ as a plain folder (pytest's default rootdir import) or as a package
    from test_aggregate import fabricate_sweep
except ImportError:
    from tests.test_aggregate import fabricate_sweep


class BrightDarkBody(nn.Module):
    """Feature map of 2 channels at 1/4 resolution: channel 0 fires on bright pixels, channel 1 on
    dark ones (a stand-in for a body that learned 'bright blob = finding')."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]).view(2, 3, 1, 1) / 3)
            self.conv.bias.zero_()
        self.pool = nn.AvgPool2d(4)
        self.num_features = 2

    def forward(self, x):
        return self.pool(torch.relu(self.conv(x)))


def planted_model() -> CXRNet:
    """A real CXRNet (the protocol head) whose logit rises with bright evidence and falls with dark."""
    model = CXRNet(BrightDarkBody(), num_features=2, outputs=1)
    lin1, lin2 = model.head.classifier[3], model.head.classifier[7]
    with torch.no_grad():
        lin1.weight.zero_()
        lin1.weight[0] = torch.tensor([1.0, -0.5, 1.0, -0.2])   # [avg0, avg1, max0, max1]
        lin2.weight.zero_()
        lin2.weight[0, 0] = 1.0
    return model.eval()


def image_file(tmp_path, name, bright=None, dark=None, size=256) -> str:
    """A mid-grey noisy image with a bright square (the finding) and a dark square (a distractor)."""
    rng = np.random.default_rng(0)
    arr = np.clip(100 + rng.normal(0, 5, (size, size)), 0, 255).astype(np.uint8)
    if bright:
        r, c, s = bright
        arr[r:r + s, c:c + s] = 250
    if dark:
        r, c, s = dark
        arr[r:r + s, c:c + s] = 0
    path = tmp_path / name
    Image.fromarray(arr, mode="L").convert("RGB").save(path)   # RGB file: the grayscale path is used
    return str(path)


@pytest.mark.parametrize("bright,dark", [((32, 144, 48), (160, 32, 48)), ((176, 40, 40), (24, 24, 64))])
def test_heatmap_peaks_on_the_planted_finding(tmp_path, bright, dark):
    path = image_file(tmp_path, "planted.png", bright=bright, dark=dark)
    res = 64
    pixels = gradcam.preprocess(gradcam.read_image(path), res)
    assert pixels.shape == (res, res) and pixels.dtype == np.uint8
    model = planted_model()
    x = gradcam.model_input([pixels])
    cam = gradcam.gradcam(model, x, output=0)
    assert cam.feature_map == (16, 16)
    assert cam.heatmaps.shape == (1, res, res)
    assert cam.heatmaps.max() == pytest.approx(1.0)
    assert cam.probabilities[0] == pytest.approx(torch.sigmoid(model(x))[0, 0].item(), abs=1e-6)
    r, c = np.unravel_index(np.argmax(cam.heatmaps[0]), (res, res))
    scale = res / 256
    (br, bc, bs), (dr, dc, ds) = bright, dark
    assert br * scale <= r < (br + bs) * scale and bc * scale <= c < (bc + bs) * scale, (r, c)
    # Nothing lights up on the distractor (its channel lowers the logit).
    hm = cam.heatmaps[0]
    assert hm[int(dr * scale):int((dr + ds) * scale), int(dc * scale):int((dc + ds) * scale)].max() < 0.05
    assert model.training is False


def test_gradcam_leaves_the_model_mode_and_hooks_as_they_were():
    model = planted_model().train()
    before = len(model.body._forward_hooks)
    gradcam.gradcam(model, torch.zeros(2, 3, 32, 32), output=0)
    assert model.training and len(model.body._forward_hooks) == before


def test_read_boxes_nih_format(tmp_path):
    csv = tmp_path / "BBox_List_2017.csv"
    csv.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                   "00000013_005.png,Effusion,225.08,547.02,86.75,79.65\n"
                   "00000013_005.png,Nodule,10,10,5,5\n"
                   "dir/00000032_037.png,Cardiomegaly,1,2,3,4\n")
    boxes = gradcam.read_boxes(str(csv))
    assert [(b.image, b.task_key) for b in boxes] == [("00000013_005.png", "pleural_effusion"),
                                                       ("00000013_005.png", None),
                                                       ("00000032_037.png", "cardiomegaly")]
    assert (boxes[0].x, boxes[0].h) == (225.08, 79.65)
    bad = tmp_path / "bad.csv"
    bad.write_text("Image Index,Finding Label,x,y,w,h\na.png,Atelectasis,1,2,zero,4\n")
    with pytest.raises(gradcam.UserError, match="line 2"):
        gradcam.read_boxes(str(bad))


def test_cli_draws_best_checkpoints_per_task_and_resolution(tmp_path, capsys):
    models: dict = {}

    def state(trial, key, epoch):
        if key not in ("atelectasis", "cardiomegaly"):
            return None          # no checkpoint for the other tasks: their panels must say so
        if trial.trial_id not in models:
            torch.manual_seed(trial.params.seed)
            models[trial.trial_id] = create_model("resnet18", trial.params.resolution, 5,
                                                  weights="none").state_dict()
        return models[trial.trial_id]

    fake = fabricate_sweep(tmp_path, resolutions=(64, 96), models=("resnet18",), seeds=(0,),
                           epochs=1, checkpoints=state)
    a = image_file(tmp_path, "a.png", bright=(32, 144, 48))
    b = image_file(tmp_path, "b.jpg", dark=(32, 32, 32), size=200)
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                     "a.png,Atelectasis,144,32,48,48\na.png,Nodule,1,1,4,4\n")
    out = tmp_path / "cam.png"
    code = run_cli(gradcam.main, ["--sweep", fake.location, "--images", a, b, "--boxes", str(boxes),
                                  "--tasks", "Atelectasis,Cardiomegaly", "--out", str(out),
                                  "--device", "cpu", "--quiet"], prog="analysis.gradcam")
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "2 image(s) x 2 resolution(s) x 2 task(s)" in printed and "Nodule: not a task" in printed
    img = Image.open(out)
    # rows = 2 images x 2 resolutions, columns = 2 tasks (2.7 x 2.95 inches per panel at 100 dpi)
    assert img.size == (540, 1180)

    # A task whose checkpoint is missing: the figure is still written, the panel says so, exit 1.
    code = run_cli(gradcam.main, ["--sweep", fake.location, "--images", a, "--tasks",
                                  "Atelectasis,Edema", "--resolutions", "64", "--out",
                                  str(tmp_path / "partial.png"), "--device", "cpu", "--quiet"])
    assert code == 1 and (tmp_path / "partial.png").exists()
    assert "checkpoint not usable" in capsys.readouterr().err

    runs = gradcam.best_checkpoints(fake.location, ["Atelectasis"], [96])
    assert len(runs) == 1 and runs[0].outputs[0] == "atelectasis" and len(runs[0].outputs) == 5
    assert runs[0].auroc == fake.known[(runs[0].trial_id, "atelectasis")][1]


def test_cli_rejects_bad_input_with_one_line(tmp_path, capsys):
    fake = fabricate_sweep(tmp_path, resolutions=(64,), models=("resnet18",), seeds=(0,), epochs=1)
    assert run_cli(gradcam.main, ["--sweep", fake.location, "--images", str(tmp_path / "no.png")],
                   prog="analysis.gradcam") == 2
    err = capsys.readouterr().err.strip()
    assert "no.png does not exist" in err and "\n" not in err
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    assert run_cli(gradcam.main, ["--sweep", fake.location, "--images", str(junk)]) == 2
    assert run_cli(gradcam.main, ["--sweep", fake.location, "--images", str(junk), "--tasks",
                                  "Nodule"]) == 2
    assert "--tasks: 'Nodule'" in capsys.readouterr().err


def test_images_with_the_same_file_name_get_distinct_labels(tmp_path):
    paths = []
    for patient in ("patient00001", "patient00002"):
        (tmp_path / patient / "study1").mkdir(parents=True)
        paths.append(image_file(tmp_path / patient / "study1", "view1_frontal.jpg", size=64))
    images = [gradcam.read_image(p) for p in paths]
    gradcam.unique_names(images)
    assert [im.name for im in images] == ["patient00001/study1/view1_frontal.jpg",
                                          "patient00002/study1/view1_frontal.jpg"]
    assert {im.file_name for im in images} == {"view1_frontal.jpg"}


def reference_gradcam(model, x, output):
    """Grad-CAM by its definition (Selvaraju et al. 2017) with plain autograd: channel weights =
    the spatial mean of d logit / d A, map = ReLU(sum_c w_c A_c), bilinear to the input, scaled to
    [0, 1] by its min and max."""
    import torch.nn.functional as F
    model.eval()
    acts = model.body(x)
    acts.retain_grad()
    model.head(acts)[:, output].sum().backward()
    weights = acts.grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * acts).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    lo = cam.flatten(1).min(dim=1).values.view(-1, 1, 1)
    hi = cam.flatten(1).max(dim=1).values.view(-1, 1, 1)
    return ((cam - lo) / (hi - lo + 1e-7)).numpy()


def test_gradcam_equals_its_definition(tmp_path):
    path = image_file(tmp_path, "planted.png", bright=(32, 144, 48), dark=(160, 32, 48))
    pixels = gradcam.preprocess(gradcam.read_image(path), 64)
    x = gradcam.model_input([pixels, np.ascontiguousarray(pixels[::-1])])
    model = planted_model()
    cam = gradcam.gradcam(model, x, output=0)
    np.testing.assert_allclose(cam.heatmaps, reference_gradcam(model, x, 0), atol=1e-4)


@pytest.mark.parametrize("method", sorted(gradcam.CAM_METHODS))
def test_every_method_gives_maps_in_range(tmp_path, method):
    path = image_file(tmp_path, "planted.png", bright=(32, 144, 48), dark=(160, 32, 48))
    pixels = gradcam.preprocess(gradcam.read_image(path), 64)
    model = planted_model()
    cam = gradcam.gradcam(model, gradcam.model_input([pixels]), output=0, method=method)
    assert cam.heatmaps.shape == (1, 64, 64) and cam.feature_map == (16, 16)
    assert cam.heatmaps.min() >= 0 and cam.heatmaps.max() == pytest.approx(1.0, abs=1e-5)
    if method != "eigencam":   # EigenCAM is not class-specific: it shows the main component
        r, c = np.unravel_index(np.argmax(cam.heatmaps[0]), (64, 64))
        assert 8 <= r < 20 and 36 <= c < 48, (method, r, c)


def test_gradcam_on_a_timm_body():
    """The target layer is the body, whatever it is: here a timm feature extractor."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    body = timm.create_model("resnet10t", pretrained=False, num_classes=0, global_pool="")
    model = CXRNet(body, num_features=body.num_features, outputs=3)
    with torch.no_grad():   # a head with evidence either way (its last layer starts near zero)
        model.head.classifier[7].weight.normal_()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    cam = gradcam.gradcam(model, x, output=2)
    assert cam.heatmaps.shape == (2, 96, 96) and cam.feature_map == (3, 3)
    assert cam.heatmaps.max() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(cam.heatmaps, reference_gradcam(model, x, 2), atol=1e-4)
    with torch.no_grad():
        expected = torch.sigmoid(model.eval()(x)[:, 2]).numpy()
    np.testing.assert_allclose(cam.probabilities, expected, rtol=1e-6)


@pytest.mark.parametrize("options", [
    {"head_bn_bias": 0.0, "pool_order": "avg,max", "densenet_final_relu": True},
    {"head_bn_bias": 1e-3, "pool_order": "max,avg", "densenet_final_relu": False},
])
def test_best_checkpoint_is_loaded_into_the_architecture_it_was_trained_with(tmp_path, options):
    """The pooling order and DenseNet's final ReLU change the network, so Grad-CAM must rebuild a
    trial's model with that trial's options (literal and fastai recipes differ here)."""
    torch.manual_seed(0)
    trained = create_model("densenet121", 64, outputs=2, weights="none", **options).eval()
    path = tmp_path / "best-x.pt"
    torch.save({"model": trained.state_dict(), "epoch": 1, "task": "a"}, path)   # the trainer's format
    config = dict(options)
    run = gradcam.BestRun(task_key="cardiomegaly", resolution=64, model="densenet121", auroc=0.9,
                          epoch=1, trial_id="t", checkpoint=str(path), outputs=["a", "b"],
                          model_options=gradcam._model_options_of(config))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(gradcam.load_model(run)(x), trained(x))


def test_trial_configs_without_architecture_options_were_literal():
    assert gradcam._model_options_of({}) == {"head_bn_bias": 0.0, "pool_order": "avg,max",
                                             "densenet_final_relu": True}
