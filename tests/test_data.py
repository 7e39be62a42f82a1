"""Study grouping, batch layout and worker-independent loading of the store."""
import numpy as np
import pytest
import torch

from common.schema import label_column
from preprocessing.store import open_store
from trainer.augment import AugmentSettings, identity_params
from trainer.data import StudyBatches, load_split, make_loader

TASKS = ("Cardiomegaly", "Edema")


@pytest.fixture(scope="module")
def store(tiny_phantom_store):
    return open_store(tiny_phantom_store)


def test_studies_are_grouped_with_their_labels(store):
    data = load_split(store, 32, "train", TASKS)
    table = store.read(32, "train").to_pandas()
    labelled = table[[label_column(t) for t in TASKS]].notna().any(axis=1)
    expected = table[labelled].groupby("study_id")
    assert data.study_ids == sorted(expected.groups)          # sorted by study id
    assert data.num_images == int(labelled.sum())
    sizes = np.diff(data.study_offsets)
    assert sizes.min() >= 1 and sizes.max() <= 3 and (sizes > 1).any()  # multi-view studies exist
    first = expected.first()
    for s, sid in enumerate(data.study_ids[:20]):
        for j, t in enumerate(TASKS):
            want = first.loc[sid, label_column(t)]
            got = data.labels[s, j]
            assert (np.isnan(got) and np.isnan(want)) or got == want
    # the image bytes are those of the store row of that image
    row = table.set_index("image_id").loc[data.image_ids[3]]
    assert bytes(data.blob(3)) == row["image"]


def test_single_task_drops_excluded_studies_and_max_studies(store):
    data = load_split(store, 32, "train", ("Cardiomegaly",), require_all_tasks=True)
    assert not np.isnan(data.labels).any()
    multi = load_split(store, 32, "train", TASKS)
    assert data.num_studies < multi.num_studies
    few = load_split(store, 32, "train", TASKS, max_studies=5)
    assert few.study_ids == multi.study_ids[:5]


def test_batch_layout(store):
    data = load_split(store, 32, "valid", TASKS)
    batches = StudyBatches(data, 4, seed=0, augment=None)
    assert len(batches) == -(-data.num_studies // 4)
    b = batches[(1, 0)]
    n = int(data.study_offsets[4])
    assert b["images"].dtype == torch.uint8 and b["images"].shape == (n, 1, 32, 32)
    assert b["study_index"].tolist() == np.repeat(np.arange(4), np.diff(data.study_offsets[:5])).tolist()
    torch.testing.assert_close(b["labels"], torch.from_numpy(data.labels[:4]), rtol=0, atol=0,
                               equal_nan=True)
    assert b["studies"].tolist() == [0, 1, 2, 3]
    assert np.array_equal(b["aug"].numpy(), identity_params(n))  # validation: no augmentation
    last = batches[(1, len(batches) - 1)]
    assert last["labels"].shape[0] == data.num_studies - 4 * (len(batches) - 1)


def _all_batches(loader, epoch):
    loader.sampler.epoch = epoch
    return list(loader)


def test_loader_independent_of_workers(store):
    data = load_split(store, 32, "train", TASKS, max_studies=30)
    batches = StudyBatches(data, 8, seed=3, augment=AugmentSettings())
    serial = _all_batches(make_loader(batches, 0), epoch=2)
    parallel = _all_batches(make_loader(batches, 2), epoch=2)
    assert len(serial) == len(parallel) == 4
    for a, b in zip(serial, parallel):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=k)
    other_epoch = _all_batches(make_loader(batches, 0), epoch=3)
    assert not torch.equal(serial[0]["aug"], other_epoch[0]["aug"])   # fresh draws each epoch
    assert torch.equal(serial[0]["images"], other_epoch[0]["images"])  # same studies (no shuffle)


def test_shuffle_is_keyed(store):
    data = load_split(store, 32, "train", TASKS, max_studies=30)
    a = StudyBatches(data, 8, seed=1, augment=None, shuffle=True)
    assert np.array_equal(a.study_order(1), StudyBatches(data, 8, seed=1, augment=None,
                                                         shuffle=True).study_order(1))
    assert not np.array_equal(a.study_order(1), a.study_order(2))
    assert sorted(a.study_order(1)) == list(range(30))
