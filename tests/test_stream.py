"""The streaming loaders on real tar shards, real DataLoader worker processes and a real moto S3."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from shardutil import make_shards

from move_scale.data.errors import DataError
from move_scale.data.read import plan
from move_scale.data.read.shardlist import Shard
from move_scale.data.read.stream import build_eval_loader, build_train_loader
from move_scale.data.read.tario import SkipTally


def train_loader(source, **overrides):
    args = dict(batch_size=4, image_size=32, crop_scale=(0.9, 1.0), crop_ratio=(3 / 4, 4 / 3),
                hflip=True, workers=2, shuffle_buffer=6, seed=0, rank=0, world_size=1,
                return_keys=True)
    args.update(overrides)
    return build_train_loader(source, **args)


def epoch_keys(loader) -> list[list[str]]:
    return [batch["key"] for batch in loader]


# ----------------------------------------------------------------------------- planning


def test_quotas_add_up_and_trim_only_the_fullest_workers():
    assert plan.worker_quotas([40, 13, 9], total=48) == [26, 13, 9]
    assert plan.worker_quotas([10, 3, 10], total=20) == [9, 3, 8]
    assert plan.worker_quotas([6, 6], total=12) == [6, 6]  # all delivered
    assert plan.worker_quotas([0, 0], total=8) == [4, 4]  # resampled: nothing held, even split


def _delivered(quotas, batch, resume):
    """Samples (worker, index) in the order a rotated DataLoader delivers them after `resume`."""
    workers = len(quotas)
    pieces = [[(w, i) for i in range(resume.skip[w], quotas[w])] for w in range(workers)]
    cuts = [plan.chunk_sizes(resume.skip[w], quotas[w], batch) for w in range(workers)]
    physical = [(p + resume.rotation) % workers for p in range(workers)]
    stream, depth = [], 0
    while any(depth < len(cuts[w]) for w in physical):
        for w in physical:
            if depth < len(cuts[w]):
                size = cuts[w][depth]
                stream += pieces[w][:size]
                pieces[w] = pieces[w][size:]
        depth += 1
    return stream


def test_resume_plan_continues_the_delivered_stream_at_batch_k():
    quotas, batch = [10, 6, 3], 4
    full = _delivered(quotas, batch, plan.resume_plan(quotas, batch, 0))
    assert sorted(full) == [(w, i) for w in range(3) for i in range(quotas[w])]
    for k in range(len(full) // batch + 1):
        tail = _delivered(quotas, batch, plan.resume_plan(quotas, batch, k))
        assert tail == full[k * batch:]


def test_ranks_hold_equal_disjoint_runs_in_every_epoch_while_shards_move():
    counts = [100, 100, 100, 100, 100, 37, 100, 90]  # 727 samples: 242 per rank, 1 left out
    shards = [Shard(f"s{i}.tar", c) for i, c in enumerate(counts)]
    assignments = set()
    for epoch in range(6):
        runs = plan.rank_pieces(shards, 3, seed=0, epoch=epoch)
        assert [sum(p.count for p in run) for run in runs] == [242, 242, 242]
        read = Counter((p.shard, i) for run in runs for p in run for i in range(p.start, p.stop))
        assert max(read.values()) == 1 and len(read) == 726
        assert all(0 <= p.start < p.stop <= counts[p.shard] for run in runs for p in run)
        # two cuts between three runs, and the last shard short of the sample left out
        assert sum(1 for run in runs for p in run if p.count < counts[p.shard]) <= 2 * 2 + 1
        assignments.add(tuple(tuple(p.shard for p in run) for run in runs))
    assert len(assignments) > 1


def test_few_uneven_shards_leave_out_little():
    # the README's 2-process example: the demo's 500 training + 100 validation samples
    shards = [Shard("train.tar", 500), Shard("val.tar", 100)]
    assert plan.batches_per_epoch(shards, 2, 4, resampled=False) == 75
    assert plan.left_out(shards, 2, 4, resampled=False) == 0
    one = [Shard("train.tar", 500)]  # one shard for two ranks: cut in the middle
    assert plan.rank_pieces(one, 2, seed=0, epoch=0) == [[plan.Piece(0, 0, 250)],
                                                         [plan.Piece(0, 250, 500)]]
    assert plan.left_out(one, 2, 4, resampled=False) == 4  # 0.8 %


def test_skip_warnings_are_rate_limited_and_counts_handed_over(caplog):
    tally = SkipTally("rank 0 worker 0", interval_s=60)
    for i in range(50):
        tally.skip("undecodable image", f"key {i}")
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1
    assert tally.take() == {"undecodable image": 50} and tally.take() == {}
    assert tally.total == {"undecodable image": 50}


# ----------------------------------------------------------------------------- non-resampled


# equal runs per rank: [12,8,8,4,6,6] -> 22, 22; [6,6,6,6] -> 12, 12 (workers 6 + 6: remainders
# of 2 join into one batch); [10,10,7,9,5] -> 20, 20 (one sample left out); [7] -> 3, 3 (a shard
# cut in two)
@pytest.mark.parametrize("counts,batch,per_rank_batches", [([12, 8, 8, 4, 6, 6], 2, 11),
                                                          ([6, 6, 6, 6], 4, 3),
                                                          ([10, 10, 7, 9, 5], 4, 5),
                                                          ([7], 1, 3)])
def test_two_ranks_two_workers_read_each_sample_once_with_equal_counts(
        tmp_path, counts, batch, per_rank_batches):
    manifest, images = make_shards(tmp_path, counts)
    per_rank = []
    for rank in range(2):
        loader = train_loader(str(manifest), batch_size=batch, rank=rank, world_size=2)
        batches = epoch_keys(loader)
        assert len(batches) == len(loader) == per_rank_batches
        assert all(len(b) == batch for b in batches)
        per_rank.append([k for b in batches for k in b])
    seen = Counter(per_rank[0] + per_rank[1])
    assert max(seen.values()) == 1
    assert set(seen) <= set(images)
    if sum(counts) == 2 * batch * per_rank_batches:  # balanced and divisible: all read, once
        assert set(seen) == set(images)


def test_same_seed_epoch_rank_give_the_same_batches_and_others_differ(tmp_path):
    manifest, _ = make_shards(tmp_path, [9, 9, 9, 9])
    def run(**kw):
        return [(b["key"], b["image"]) for b in train_loader(str(manifest), world_size=2, **kw)]
    first, again = run(), run()
    assert [k for k, _ in first] == [k for k, _ in again]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, again))
    for other in (dict(epoch=1), dict(seed=1), dict(rank=1)):
        assert [k for k, _ in run(**other)] != [k for k, _ in first]


def test_iterating_again_moves_to_the_next_epoch(tmp_path):
    manifest, _ = make_shards(tmp_path, [9, 9])
    loader = train_loader(str(manifest), workers=0)
    epoch0, epoch1 = epoch_keys(loader), epoch_keys(loader)
    assert epoch1 == epoch_keys(train_loader(str(manifest), workers=0, epoch=1))
    assert epoch0 != epoch1


@pytest.mark.parametrize("skip", [1, 4, 5])
def test_skip_batches_reproduces_the_tail_of_the_epoch(tmp_path, skip):
    # 3 workers hold 13, 7, 6 samples -> quotas 11, 7, 6 -> pieces 4 4 3 | 4 3 | 4 2: batch 5 is
    # joined from two remainders and resuming at 5 cuts into a piece
    manifest, _ = make_shards(tmp_path, [13, 7, 6])
    full = [(b["key"], b["image"]) for b in train_loader(str(manifest), epoch=2, workers=3)]
    assert len(full) == 6
    resumed_loader = train_loader(str(manifest), epoch=2, workers=3, skip_batches=skip)
    assert len(resumed_loader) == len(full)
    resumed = [(b["key"], b["image"]) for b in resumed_loader]
    assert [k for k, _ in resumed] == [k for k, _ in full[skip:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed, full[skip:]))


def test_corrupt_sample_is_skipped_counted_and_batch_counts_stay_equal(tmp_path):
    bad = "s01-0003"
    manifest, images = make_shards(tmp_path, [8, 8, 8, 8], corrupt={bad})
    totals, skipped = [], Counter()
    for rank in range(2):
        loader = train_loader(str(manifest), rank=rank, world_size=2, max_lost_share=0.1)
        keys = [k for b in epoch_keys(loader) for k in b]
        assert len(keys) == len(loader) * 4 == 16
        assert bad not in keys
        totals.append(len(keys))
        skipped.update(loader.skipped)
    assert totals[0] == totals[1]
    assert skipped == {"undecodable image": 1}
    with pytest.raises(DataError, match="1 of its 16 samples lost .* data.max_lost_share=0.05"):
        for rank in range(2):
            epoch_keys(train_loader(str(manifest), rank=rank, world_size=2, max_lost_share=0.05))


def test_a_missing_shard_is_counted_and_the_others_pad(tmp_path):
    manifest, images = make_shards(tmp_path, [8, 8, 8])
    (tmp_path / "s-000001.tar").unlink()
    loader = train_loader(str(manifest), workers=0, max_lost_share=0.5)
    keys = [k for b in epoch_keys(loader) for k in b]
    assert len(keys) == len(loader) * 4 == 24
    assert not any(k.startswith("s01-") for k in keys)
    assert loader.skipped == {"missing shard": 8}  # counted once, not again by the padding pass


# ----------------------------------------------------------------------------- resampled


def test_resampled_epoch_length_comes_from_the_manifest(tmp_path):
    manifest, images = make_shards(tmp_path, [10, 10, 7])
    lengths = []
    for rank in range(2):
        loader = train_loader(str(manifest), rank=rank, world_size=2, resampled=True)
        batches = epoch_keys(loader)
        assert len(batches) == len(loader) == 27 // (2 * 4)
        assert {k for b in batches for k in b} <= set(images)
        lengths.append(len(batches))
    assert lengths[0] == lengths[1]
    again = epoch_keys(train_loader(str(manifest), rank=1, world_size=2, resampled=True))
    assert again == batches


# ----------------------------------------------------------------------------- sources, errors


def test_brace_pattern_and_list_sources(tmp_path, caplog):
    manifest, images = make_shards(tmp_path, [5, 6])
    pattern = str(tmp_path / "s-{000000..000001}.tar")
    assert len(train_loader(pattern, batch_size=2, workers=0)) == 5
    manifest.unlink()  # no manifest beside: shards are counted by reading them, with a warning
    listed = [str(tmp_path / "s-000000.tar"), str(tmp_path / "s-000001.tar")]
    loader = train_loader(listed, batch_size=2, workers=0)
    assert len(loader) == 5 and "reading them once to count" in caplog.text


def test_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no manifest at .*nowhere"):
        train_loader(str(tmp_path / "nowhere" / "manifest.json"))
    with pytest.raises(DataError, match="empty shard list"):
        train_loader([])
    manifest, _ = make_shards(tmp_path, [5, 6])
    with pytest.raises(ValueError, match="larger than the data per rank"):
        train_loader(str(manifest), batch_size=6, world_size=2)
    assert len(train_loader(str(manifest), batch_size=1, world_size=3, rank=2)) == 3  # 11 // 3
    with pytest.raises(ValueError, match="skip_batches=99"):
        train_loader(str(manifest), skip_batches=99)


# ----------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("counts,workers", [([4, 5, 3], 2), ([7], 0)])
def test_eval_yields_each_sample_once_across_ranks_with_masks_and_boxes(tmp_path, counts, workers):
    manifest, images = make_shards(tmp_path, counts, masks=True, boxes=True)
    keys = []
    for rank in range(2):
        loader = build_eval_loader(str(manifest), rank=rank, world_size=2, workers=workers)
        samples = list(loader)
        assert len(samples) == loader.num_samples
        for s in samples:
            assert s["image"].dtype == np.uint8 and s["image"].shape == (48, 64, 3)
            assert np.abs(s["image"].astype(int) - images[s["key"]]).mean() < 4  # JPEG q95
            assert s["mask"].dtype == bool and s["mask"].shape == (48, 64)
            assert s["mask"][:24, :21].all() and not s["mask"][24:].any()
            np.testing.assert_array_equal(s["boxes"], [[1, 2, 10, 20], [0, 0, 5, 5]])
        keys += [s["key"] for s in samples]
    assert sorted(keys) == sorted(images)


# ----------------------------------------------------------------------------- S3


def test_streams_from_s3_shards_written_by_the_writer(make_images, s3_bucket, s3_endpoint):
    """conftest's real moto_server; the shards are written there by `write_shards` (move-shard)."""
    from move_scale.data.write.write import write_shards

    images = make_images(n=16, masks=True)
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    out = f"{s3_bucket}/ds"
    write_shards([str(images.root)], out, max_count=4, masks=str(images.mask_root),
                 storage_options=options)
    keys = []
    for rank in range(2):
        loader = train_loader(f"{out}/manifest.json", rank=rank, world_size=2,
                              storage_options=options, extra_keys=("mask",))
        batches = list(loader)
        assert len(batches) == len(loader) == 2  # 4 shards of 4: 8 samples per rank
        assert batches[0]["mask"].shape == (4, 1, 32, 32) and batches[0]["mask"].sum() > 0
        keys += [k for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys)) == 16
    evaluated = list(build_eval_loader(out, rank=0, world_size=1, storage_options=options))
    assert sorted(s["key"] for s in evaluated) == sorted(keys)
    for sample in evaluated:
        assert sample["mask"].shape == sample["image"].shape[:2] and sample["mask"].any()


# ----------------------------------------------------------------------------- waiting for data


class _Slow(torch.utils.data.IterableDataset):
    """Worker w yields (w, i) for i < 4, each after `delay` seconds, counting its reads."""

    def __init__(self, delay: float, board):
        self.delay, self.board = delay, board

    def __iter__(self):
        import time

        worker = torch.utils.data.get_worker_info().id
        for i in range(4):
            time.sleep(self.delay)
            self.board.read_one(worker)
            yield worker, i


def test_waits_in_slices_lose_nothing_and_a_silent_loader_is_a_stall(tmp_path):
    """The DataLoader raises "timed out" at every slice of a wait and keeps its place: asked
    again, it delivers the same items in the same order."""
    from move_scale.data.read.watch import InFlight, LoaderWatch, next_item

    def drain(delay, stall_timeout_s):
        board = InFlight(2)
        loader = iter(torch.utils.data.DataLoader(_Slow(delay, board), batch_size=None,
                                                  num_workers=2, timeout=0.05))
        items = []
        while True:
            try:
                items.append(tuple(next_item(loader, LoaderWatch(), stall_timeout_s, board,
                                             lambda s: f"stalled {s:.1f}")))
            except StopIteration:
                return items

    assert drain(0.3, 5.0) == [(w, i) for i in range(4) for w in range(2)]
    with pytest.raises(DataError, match="stalled"):
        drain(1.5, 0.4)
