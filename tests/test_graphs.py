"""trainer/graphs.py: when graphs are used, one graph per batch shape, the cap, and BatchNorm
statistics untouched by the capture's warm-up passes.

There is no GPU here, so ``torch.cuda.make_graphed_callables`` is replaced by a stand-in that does
what the real one does to the model: it runs the warm-up forward+backward passes in training mode,
which move BatchNorm's running statistics. It then returns the module, which runs eagerly. The
real capture is exercised by bench/gpu_check.py's ``:graphs`` configs on a GPU (docs/benchmarks.md).
"""
from __future__ import annotations

import torch

from trainer import graphs as G
from trainer.config import ConfigError, TrainConfig


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def _fake_capture(monkeypatch):
    calls = []

    def make_graphed_callables(call, sample_args, num_warmup_iters, pool=None, capture_error_mode=None):
        calls.append(tuple(sample_args[0].shape))
        for _ in range(num_warmup_iters):
            call(*sample_args).sum().backward()
        return call

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", make_graphed_callables)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    return calls


def test_want_graphs():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert G.want_graphs("auto", cuda, 160) and G.want_graphs("auto", cuda, G.AUTO_MAX_RESOLUTION)
    assert not G.want_graphs("auto", cuda, 400)
    assert G.want_graphs("on", cuda, 480) and not G.want_graphs("off", cuda, 160)
    assert not G.want_graphs("on", cpu, 160)   # never on CPU: the CPU results stay bitwise exact


def test_config_field_is_checked_and_not_part_of_the_trial_id():
    try:
        TrainConfig(cuda_graphs="yes")
    except ConfigError as exc:
        assert "cuda_graphs" in str(exc)
    else:
        raise AssertionError("cuda_graphs='yes' was accepted")
    assert TrainConfig(cuda_graphs="off").trial_id("m") == TrainConfig(cuda_graphs="on").trial_id("m")


def test_one_graph_per_shape_and_batchnorm_statistics_restored(monkeypatch):
    calls = _fake_capture(monkeypatch)
    torch.manual_seed(0)
    net, ref = _Net(), _Net()
    ref.load_state_dict(net.state_dict())
    graphs = G.GraphedTraining(net, bf16=False, stage="unfrozen", warmup_iters=3)
    net.train()
    ref.train()
    batches = [torch.randn(n, 3, 8, 8) for n in (5, 6, 5, 5, 6)]
    for x in batches:
        assert torch.equal(graphs(x), ref(x))   # same output as an eager step on the same state
    assert calls == [(5, 3, 8, 8), (6, 3, 8, 8)]
    # The warm-up passes ran (6 of them) but left no trace in the running statistics.
    assert torch.equal(net.bn.running_mean, ref.bn.running_mean)
    assert torch.equal(net.bn.running_var, ref.bn.running_var)
    assert int(net.bn.num_batches_tracked) == int(ref.bn.num_batches_tracked) == len(batches)
    assert graphs.stats() == {"graphs": 2, "graphed_steps": 5, "eager_steps": 0,
                              "capture_s": graphs.stats()["capture_s"]}


def test_cap_eval_mode_and_stage_change(monkeypatch):
    calls = _fake_capture(monkeypatch)
    net = _Net().train()
    graphs = G.GraphedTraining(net, bf16=False, max_graphs=1, warmup_iters=1)
    graphs(torch.randn(2, 3, 8, 8))
    graphs(torch.randn(3, 3, 8, 8))                # past the cap: eager, counted
    assert len(calls) == 1 and graphs.stats()["eager_steps"] == 1
    net.eval()
    graphs(torch.randn(4, 3, 8, 8))                # eval mode never uses (or captures) a graph
    assert len(calls) == 1
    net.train()
    net.conv.weight.requires_grad_(False)          # a stage change without a new GraphedTraining
    try:
        graphs(torch.randn(2, 3, 8, 8))
    except RuntimeError as exc:
        assert "new GraphedTraining" in str(exc)
    else:
        raise AssertionError("a changed trainable set was not caught")


class _Loader(list):
    """A list of batches with the ``sampler.epoch`` that train_one_epoch sets."""
    class sampler:
        epoch = 0


def _batches(resolution: int, sizes: list[int], tasks: int) -> _Loader:
    import numpy as np

    from trainer.augment import AugmentSettings, sample_params
    out = _Loader()
    for i, n in enumerate(sizes):
        g = torch.Generator().manual_seed(i)
        studies = n - 1                      # one study has two images
        index = torch.cat([torch.arange(studies), torch.tensor([0])])
        labels = torch.randint(0, 2, (studies, tasks), generator=g).float()
        out.append({"images": torch.randint(0, 256, (n, 1, resolution, resolution), generator=g,
                                            dtype=torch.uint8),
                    "study_index": index, "labels": labels,
                    "aug": torch.from_numpy(sample_params(AugmentSettings(), i, 1, np.arange(n)))})
    return out


def test_graphed_training_equals_eager_training(monkeypatch):
    """The trainer's epoch with GraphedTraining trains bit for bit like the eager epoch: same
    losses, weights, BatchNorm statistics and dropout draws (the head has two Dropouts)."""
    _fake_capture(monkeypatch)
    from trainer.models import create_model
    from trainer.train import build_optimizer, build_scheduler, train_one_epoch
    cfg = TrainConfig(model="smallcnn", resolution=32, weights="none")
    loader = _batches(32, [5, 4, 5, 5, 4], tasks=5)
    runs = []
    for graphed in (False, True):
        torch.manual_seed(0)
        model = create_model("smallcnn", 32, outputs=5, weights="none")
        opt = build_optimizer(model, cfg, "unfrozen")
        sched = build_scheduler(opt, cfg, "unfrozen", steps_per_epoch=len(loader))
        graphs = G.GraphedTraining(model, bf16=False, stage="unfrozen") if graphed else None
        loss, images, _ = train_one_epoch(model, loader, opt, sched, epoch=1,
                                          device=torch.device("cpu"), augment=True, bf16=False,
                                          channels_last=False, graphs=graphs)
        runs.append((loss, images, model.state_dict()))
        if graphed:
            assert graphs.stats()["graphs"] == 2 and graphs.stats()["graphed_steps"] == 5
    (loss_e, n_e, state_e), (loss_g, n_g, state_g) = runs
    assert loss_e == loss_g and n_e == n_g == 23
    for key in state_e:
        assert torch.equal(state_e[key], state_g[key]), key
