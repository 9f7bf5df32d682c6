"""Data-parallel calibration: the chunk plan, bit-exact statistics for 2 and 3 simulated processes, and
two real gloo processes under torchrun giving the single-process masks (in memory and --sequential)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from antidote.data import load_examples, tokenize_examples
from antidote.realignment.calibrate import (
    MAX_CHUNKS,
    StatisticsCollector,
    chunk_of_positions,
    collect_statistics,
    make_batches,
    padded_batch,
    plan_batches,
)
from antidote.realignment.config import RealignConfig
from antidote.realignment.engine import compute_masks, run_realign
from antidote.realignment.save import MASK_FILE
from antidote.realignment.targets import find_targets
from conftest import HARMFUL, make_model, make_tokenizer, write_jsonl


def test_chunks_are_contiguous_nonempty_and_balanced() -> None:
    assert chunk_of_positions(5) == [0, 1, 2, 3, 4]  # fewer samples than MAX_CHUNKS: one each
    chunks = chunk_of_positions(100)
    sizes = [chunks.count(c) for c in range(MAX_CHUNKS)]
    assert chunks == sorted(chunks) and min(sizes) >= 100 // MAX_CHUNKS and max(sizes) - min(sizes) <= 1


def test_each_rank_gets_its_chunks_and_together_they_cover_the_single_process_batches() -> None:
    seqs = [[1] * n for n in (3, 9, 1, 7, 5, 2)]
    assert [b.samples for b in plan_batches(seqs, 2)] == make_batches(seqs, 2)  # world 1 unchanged
    # Length order 1, 3, 4, 0, 5, 2 (lengths 9, 7, 5, 3, 2, 1); chunk j = position j; rank = j % 2.
    rank0 = plan_batches(seqs, 2, rank=0, world=2)
    rank1 = plan_batches(seqs, 2, rank=1, world=2)
    assert [(b.samples, b.chunks) for b in rank0] == [([1, 4], [0, 2]), ([5], [4])]
    assert [(b.samples, b.chunks) for b in rank1] == [([3, 0], [1, 3]), ([2], [5])]


class ThreadGroup:
    """`world` simulated processes in threads: all_reduce_sum adds every thread's tensor (in rank order)."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world)
        self.tensors: dict[int, torch.Tensor] = {}

    def member(self, rank: int):
        group = self

        class Member:
            def __init__(self) -> None:
                self.rank, self.world = rank, group.world

            def all_reduce_sum(self, tensor: torch.Tensor) -> None:
                group.tensors[rank] = tensor.clone()
                group.barrier.wait()
                total = sum(group.tensors[r] for r in range(group.world))
                group.barrier.wait()
                tensor.copy_(total)

        return Member()


@pytest.mark.parametrize("world", [2, 3])
def test_simulated_processes_give_bit_identical_statistics_and_masks(world: int) -> None:
    seqs = tokenize_examples(load_examples(HARMFUL), make_tokenizer(), "alpaca", 64) * 2  # 20 samples
    single_model = make_model()
    targets = find_targets(single_model)
    # Batch size 1 everywhere: each sample's forward then has the same shapes in every process, so its
    # activations are bit for bit the same whatever the split. (At larger batch sizes the processes form
    # other batches than the single process, and some CPU BLAS kernels, e.g. without AVX2, give other
    # last bits for other shapes: that is the forward pass, not the exchange this test is about.)
    single = collect_statistics(single_model, targets, seqs, batch_size=1, compute_dtype=None)
    group = ThreadGroup(world)
    results: dict[int, object] = {}
    seen: dict[int, int] = {}

    models = [make_model() for _ in range(world)]  # one copy per process (hooks are per module)

    def worker(rank: int) -> None:
        model = models[rank]
        calls = []
        model.model.embed_tokens.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
        results[rank] = collect_statistics(
            model, find_targets(model), seqs, batch_size=1, compute_dtype=None, parallel=group.member(rank)
        )
        seen[rank] = sum(calls)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(seen.values()) == len(seqs) and all(0 < n < len(seqs) for n in seen.values())  # split
    for rank in range(world):
        stats = results[rank]
        assert stats.samples == single.samples and stats.tokens == single.tokens
        assert all(torch.equal(stats.sq_sums[n], single.sq_sums[n]) for n in targets)
    a = compute_masks(targets, single, 0.1)
    b = compute_masks(targets, results[0], 0.1)
    assert all(torch.equal(a[n], b[n]) for n in targets)


def run_collector(model, seqs: list[list[int]], parallel=None) -> StatisticsCollector:
    """A hand-written calibration loop over this process's batches; returns the finished collector
    (its `totals` are the float64 sums)."""
    rank, world = (parallel.rank, parallel.world) if parallel is not None else (0, 1)
    collector = StatisticsCollector(find_targets(model), len(seqs), parallel=parallel)
    with torch.no_grad(), collector.hooked():
        for batch in plan_batches(seqs, 1, rank=rank, world=world):
            ids, mask = padded_batch(seqs, batch, pad_id=3)
            with collector.batch(seqs, batch):
                model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    collector.finish()
    return collector


def test_float64_sums_are_exact_where_adding_each_processs_total_is_not() -> None:
    seqs = tokenize_examples(load_examples(HARMFUL), make_tokenizer(), "alpaca", 64) * 3  # 30 samples
    single = run_collector(make_model(), seqs)
    group = ThreadGroup(2)
    models = [make_model(), make_model()]
    results: dict[int, StatisticsCollector] = {}
    threads = [
        threading.Thread(
            target=lambda r=r: results.update({r: run_collector(models[r], seqs, group.member(r))})
        )
        for r in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    names = list(single.totals)
    for rank in range(2):
        assert all(torch.equal(results[rank].totals[n], single.totals[n]) for n in names)
    # The naive exchange (each process folds its own chunks, then the two totals are added) differs
    # in the last bits on this very data: the reason for the fixed chunk tree.
    naive = torch.zeros(group.tensors[0].shape[1] - 1, dtype=torch.float64)
    for rank in range(2):
        own = torch.zeros_like(naive)
        for row in group.tensors[rank][:, :-1]:
            own += row
        naive += own
    exact = torch.cat([single.totals[n] for n in names])
    assert not torch.equal(naive, exact)
    torch.testing.assert_close(naive, exact, rtol=1e-12, atol=0)


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.run(
        [*command, "-m", "antidote", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "sequential"])
def test_two_gloo_processes_write_the_single_process_masks(tmp_path: Path, streamed: bool) -> None:
    make_model(layers=3).save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    data = write_jsonl(tmp_path / "h.jsonl", HARMFUL)
    options = {
        "compute_dtype": "float32",
        "batch_size": 2,
        "mask_ratios": (0.05, 0.2),
        "sequential": streamed,
    }
    single = RealignConfig(
        model=str(tmp_path / "model"), data=str(data), output=str(tmp_path / "one"), **options
    )
    run_realign(single)
    work = tmp_path / "work"
    work.mkdir()
    flags = ["--compute-dtype", "float32", "--batch-size", "2", "--mask-ratio", "0.05,0.2"]
    flags += ["--sequential"] if streamed else []
    done = torchrun(
        ["realign", str(tmp_path / "model"), "--data", str(data), "--output", str(tmp_path / "two"), *flags],
        cwd=work,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("alpha 0.05: pruned") == 1  # rank 0 alone reports
    for sub in ("alpha-0.05", "alpha-0.2"):
        a, b = load_file(tmp_path / "one" / sub / MASK_FILE), load_file(tmp_path / "two" / sub / MASK_FILE)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        wa = load_file(tmp_path / "one" / sub / "model.safetensors")
        wb = load_file(tmp_path / "two" / sub / "model.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert list(work.iterdir()) == []  # the other rank wrote nothing, here or beside the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.jsonl", "model", "one", "two", "work"]


# ---- issue 16 item 5: stray launch variables, ranks that disagree ------------------------------------------


def test_a_stray_world_size_runs_as_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """WORLD_SIZE left in the shell, without RANK/MASTER_ADDR/MASTER_PORT: not a launch. The run is the
    single-process one, with a warning, instead of a traceback from init_process_group."""
    from antidote.cli import main

    make_model().save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    data = write_jsonl(tmp_path / "h.jsonl", HARMFUL)
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for extra in ([], ["--sequential"]):
        out = tmp_path / f"out{len(extra)}"
        assert (
            main(["realign", str(tmp_path / "model"), "--data", str(data), "--output", str(out), *extra]) == 0
        )
        assert (out / MASK_FILE).is_file()
    assert "WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT not" in caplog.text
    monkeypatch.delenv("WORLD_SIZE")
    single = tmp_path / "single"
    assert main(["realign", str(tmp_path / "model"), "--data", str(data), "--output", str(single)]) == 0
    a, b = load_file(single / MASK_FILE), load_file(tmp_path / "out0" / MASK_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_launch_whose_other_ranks_never_come_times_out_with_a_message(tmp_path: Path) -> None:
    """Rank 0 of WORLD_SIZE=2 with MASTER_ADDR set, and no rank 1: a one-line error after the timeout
    (3 s here), not a silent wait."""
    import socket

    make_model().save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    data = write_jsonl(tmp_path / "h.jsonl", HARMFUL)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "WORLD_SIZE": "2",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "ANTIDOTE_DIST_TIMEOUT": "3",
        "OMP_NUM_THREADS": "1",
    }
    args = ["realign", str(tmp_path / "model"), "--data", str(data), "--output", str(tmp_path / "out")]
    done = subprocess.run(
        [sys.executable, "-m", "antidote", *args], env=env, capture_output=True, text=True, timeout=300
    )
    lines = [line for line in done.stderr.splitlines() if line.startswith("antidote: error:")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and "the other processes did not join at 127.0.0.1" in lines[0], done.stderr[
        -2000:
    ]
    assert "within 3 s" in lines[0] and "torchrun --nproc-per-node 2" in lines[0]
    assert not (tmp_path / "out").exists()


RANK_SCRIPT = """
import os, sys
from antidote.cli import main
rank = os.environ["RANK"]
model, data, out, extra = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
sys.exit(main(["realign", model.replace("RANK", rank), "--data", data.replace("RANK", rank),
               "--output", out, "--batch-size", "2", *extra]))
"""


@pytest.mark.parametrize("differ", ["data", "model"])
def test_ranks_with_different_data_or_models_refuse_to_mix_them(tmp_path: Path, differ: str) -> None:
    """Two processes of one launch, rank 1 reading other data (in memory) or another model of the same
    shape (--sequential): both stop before pruning, naming what differs; nothing is written."""
    for rank in ("0", "1"):
        seed = int(rank) if differ == "model" else 0
        make_model(seed=seed, layers=3).save_pretrained(tmp_path / f"model{rank}")
        make_tokenizer().save_pretrained(tmp_path / f"model{rank}")
        rows = HARMFUL if differ == "model" or rank == "0" else HARMFUL[::-1][:-1]
        write_jsonl(tmp_path / f"h{rank}.jsonl", rows)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    extra = ["--sequential"] if differ == "model" else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ANTIDOTE_DIST_TIMEOUT": "120"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args = [str(tmp_path / "modelRANK"), str(tmp_path / "hRANK.jsonl"), str(tmp_path / "out"), *extra]
    done = subprocess.run(
        [*command, str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode != 0
    what = "settings or data" if differ == "data" else "weights in block 0"
    assert f"rank 1 of the launch has other {what} than rank 0" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
