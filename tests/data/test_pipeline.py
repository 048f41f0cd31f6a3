import json

import numpy as np
import pytest

import jnn.data as jd


def _data(n=100):
    """Inputs whose value is the example's index, so batches reveal which examples they hold."""
    return {
        "inputs": np.arange(n, dtype=np.float32)[:, None],
        "labels": (np.arange(n) % 10).astype(np.int32),
    }


def _ids(batch):
    return batch["inputs"][:, 0].astype(int).tolist()


def _take(iterator, k):
    return [_ids(next(iterator)) for _ in range(k)]


def test_batches_are_dicts_of_arrays():
    batch = next(iter(jd.Pipeline(_data(), 16, shard_index=0, shard_count=1)))
    assert set(batch) == {"inputs", "labels"}
    assert batch["inputs"].shape == (16, 1) and batch["labels"].dtype == np.int32


def test_train_shuffles_each_epoch_drops_remainder_and_covers():
    pipe = jd.Pipeline(_data(), 16, seed=0, shard_index=0, shard_count=1)
    assert pipe.steps_per_epoch == 6 and pipe.num_steps is None
    batches = _take(iter(pipe), 12)
    epoch0, epoch1 = sum(batches[:6], []), sum(batches[6:], [])
    assert len(set(epoch0)) == 96 and len(set(epoch1)) == 96  # no repeats inside an epoch
    assert epoch0 != epoch1 and epoch0 != sorted(epoch0)  # reshuffled each epoch
    assert pipe.position(7) == (1, 1)


def test_same_seed_same_batches_other_seed_other_batches():
    a = _take(iter(jd.Pipeline(_data(), 16, seed=3, shard_index=0, shard_count=1)), 8)
    b = _take(iter(jd.Pipeline(_data(), 16, seed=3, shard_index=0, shard_count=1)), 8)
    c = _take(iter(jd.Pipeline(_data(), 16, seed=4, shard_index=0, shard_count=1)), 8)
    assert a == b and a != c


def test_eval_is_one_ordered_pass_keeping_the_partial_batch():
    pipe = jd.Pipeline(_data(), 32, train=False, shard_index=0, shard_count=1)
    batches = [_ids(b) for b in pipe]
    assert [len(b) for b in batches] == [32, 32, 32, 4]
    assert sum(batches, []) == list(range(100))
    assert [_ids(b) for b in pipe] == batches  # each iter() starts over


@pytest.mark.parametrize("make_iterator", ["grain", "numpy"])
def test_resume_from_state_sees_exactly_the_remaining_batches(make_iterator):
    images = {
        "inputs": np.random.default_rng(0).random((100, 4, 4, 1), np.float32),
        "labels": np.arange(100),
    }
    pipe = jd.Pipeline(images, 16, seed=1, augment=jd.RandomFlip(), shard_index=0, shard_count=1)
    new = (lambda: iter(pipe)) if make_iterator == "grain" else pipe.numpy_iterator
    full = new()
    uninterrupted = [next(full) for _ in range(15)]  # crosses two epoch boundaries
    first = new()
    for _ in range(7):
        next(first)
    state = json.loads(json.dumps(first.get_state()))  # JSON round trip, as a checkpoint would
    assert state == {"next_index": 7}
    resumed = new()
    resumed.set_state(state)
    for want in uninterrupted[7:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_grain_and_numpy_iterators_agree_and_share_state():
    pipe = jd.Pipeline(_data(), 16, seed=2, num_epochs=2, shard_index=0, shard_count=1)
    grain_ids = [_ids(b) for b in pipe]
    assert grain_ids == [_ids(b) for b in pipe.numpy_iterator()]
    assert len(grain_ids) == pipe.num_steps == 12
    it = pipe.numpy_iterator()
    it.set_state({"next_index": 10})
    assert [_ids(b) for b in it] == grain_ids[10:]


@pytest.mark.parametrize("train", [True, False])
def test_shards_are_disjoint_and_cover(train):
    n = 101
    per_shard = [
        sum(
            (
                _ids(b)
                for b in jd.Pipeline(
                    _data(n), 10, train=train, num_epochs=1, shard_index=i, shard_count=2
                )
            ),
            [],
        )
        for i in range(2)
    ]
    assert not set(per_shard[0]) & set(per_shard[1])
    covered = set(per_shard[0]) | set(per_shard[1])
    if train:  # 50 per shard, 5 full batches each; the one odd example and nothing else dropped
        assert len(per_shard[0]) == len(per_shard[1]) == 50 and len(covered) == 100
    else:
        assert covered == set(range(n))


def test_shards_draw_from_one_global_permutation_per_epoch():
    pipes = [jd.Pipeline(_data(), 10, seed=5, shard_index=i, shard_count=2) for i in range(2)]
    its = [iter(p) for p in pipes]
    for _ in range(3):  # three epochs of 5 steps per shard: each epoch the shards partition 0..99
        epoch = [sum(_take(it, 5), []) for it in its]
        assert sorted(epoch[0] + epoch[1]) == list(range(100))


def test_augment_is_deterministic_per_step_and_differs_across_shards():
    data = {
        "inputs": np.random.default_rng(0).random((64, 8, 8, 1), dtype=np.float32),
        "labels": np.zeros(64, np.int32),
    }
    aug = [jd.RandomCrop(padding=2), jd.RandomFlip()]
    a = jd.Pipeline(data, 16, augment=aug, shard_index=0, shard_count=1)
    b = jd.Pipeline(data, 16, augment=aug, shard_index=0, shard_count=1)
    np.testing.assert_array_equal(a.batch(5)["inputs"], b.batch(5)["inputs"])
    assert not np.array_equal(a.batch(5)["inputs"], a.batch(6)["inputs"])


def test_data_is_not_mutated_by_augment():
    data = _data(32)
    before = data["inputs"].copy()
    pipe = jd.Pipeline(
        {"inputs": np.ones((32, 4, 4, 1), np.float32), "labels": data["labels"]}, 8,
        augment=jd.Normalize((0.5,), (0.25,)), shard_index=0, shard_count=1,
    )  # fmt: skip
    np.testing.assert_allclose(next(iter(pipe))["inputs"], 2.0)
    np.testing.assert_array_equal(pipe.data["inputs"], 1.0)
    np.testing.assert_array_equal(data["inputs"], before)


def test_text_splits_batch_into_token_windows():
    splits = jd.load_text(seq_len=16, max_chars=5_000)
    batch = next(iter(jd.Pipeline(splits.train, 8, shard_index=0, shard_count=1)))
    assert batch["inputs"].shape == batch["labels"].shape == (8, 16)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["labels"][:, :-1])


def test_shard_defaults_come_from_jax():
    pipe = jd.Pipeline(_data(), 16)
    assert (pipe.shard_index, pipe.shard_count) == (0, 1)


def test_bad_arguments():
    with pytest.raises(jd.DataError, match="fewer than one batch of 128"):
        jd.Pipeline(_data(100), 128, shard_index=0, shard_count=1)
    with pytest.raises(jd.DataError, match="none for shard 0"):
        jd.Pipeline(_data(0), 8, train=False, shard_index=0, shard_count=1)
    with pytest.raises(jd.DataError, match="shard_index=2, shard_count=2"):
        jd.Pipeline(_data(), 8, shard_index=2, shard_count=2)
    with pytest.raises(jd.DataError, match="one shared first dimension"):
        jd.Pipeline(
            {"inputs": np.zeros((5, 2)), "labels": np.zeros(4)}, 2, shard_index=0, shard_count=1
        )
    with pytest.raises(jd.DataError, match="positive integer"):
        jd.Pipeline(_data(), 0, shard_index=0, shard_count=1)
    with pytest.raises(jd.DataError, match="non-negative"):
        jd.Pipeline(_data(), 8, seed=-1, shard_index=0, shard_count=1)


@pytest.mark.parametrize("make_iterator", ["grain", "numpy"])
def test_iterator_state_checkpoints_with_orbax_and_grain_handler(tmp_path, make_iterator):
    ocp = pytest.importorskip("orbax.checkpoint")
    import grain

    pipe = jd.Pipeline(_data(), 16, seed=0, shard_index=0, shard_count=1)
    new = (lambda: iter(pipe)) if make_iterator == "grain" else pipe.numpy_iterator
    uninterrupted = _take(new(), 10)
    it = new()
    _take(it, 4)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(4, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"w": np.ones(3)}),
            data=grain.checkpoint.CheckpointSave(it),
        ))  # fmt: skip
        manager.wait_until_finished()
    fresh = new()
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        restored = manager.restore(4, args=ocp.args.Composite(
            state=ocp.args.StandardRestore({"w": np.zeros(3)}),
            data=grain.checkpoint.CheckpointRestore(fresh),
        ))  # fmt: skip
    assert _take(restored.data, 6) == uninterrupted[4:]


@pytest.mark.slow
def test_multiprocessing_workers_give_the_same_batches_and_resume():
    pipe = jd.Pipeline(_data(), 16, seed=0, worker_count=1, shard_index=0, shard_count=1)
    it = iter(pipe)
    try:
        next(it)
        state = json.loads(json.dumps(it.get_state()))  # grain's multiprocessing state format
        assert _take(it, 3) == [_ids(pipe.batch(i)) for i in (1, 2, 3)]
        it.set_state(state)  # rewind the same iterator: its workers restart at step 1
        assert _ids(next(it)) == _ids(pipe.batch(1))
    finally:
        it.close()
