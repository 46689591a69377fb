"""train.py under several ranks on the CPU (gloo): two ranks end with the adapter one process makes, hold the same
weights after every step, and resume each other's runs; a killed rank stops the run with a message, and the run
resumes with another number of ranks. The ranks are real processes: spawned by torch.multiprocessing, or by torchrun as a user starts them."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--preset=tiny", "--device=cpu", "--dtype=float32", "--steps=3", "--eval_every=3", "--save_every=3"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank, world, port, argv, cache, dump):
    """One rank of a spawned run: torchrun's environment, one thread, and the LoRA weights saved after every step."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), XDG_CACHE_HOME=cache, HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    import gpu_check
    import train
    real = train.grpo_update

    def update_and_dump(policy, *a, **k):
        out = real(policy, *a, **k)
        lora = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
        torch.save(lora, Path(dump) / f"rank{rank}_update{len(list(Path(dump).glob(f'rank{rank}_*')))}.pt")
        return out

    train.grpo_update = update_and_dump
    train.main(train.parse_args(argv), gpu_check.lower_share)


def adapter(folder):
    from safetensors.torch import load_file
    return load_file(Path(folder) / "adapter" / "adapter_model.safetensors")


def test_two_gloo_ranks_make_the_adapter_of_one_process(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    import gpu_check
    import train
    cache = str(tmp_path / "cache")
    monkeypatch.setenv("XDG_CACHE_HOME", cache)
    one = train.main(train.parse_args([*TINY, f"--out_dir={tmp_path / 'one'}"]), gpu_check.lower_share)  # text reward
    (tmp_path / "dump").mkdir()
    mp.spawn(rank_main, args=(2, free_port(), [*TINY, f"--out_dir={tmp_path / 'two'}"], cache,
                              str(tmp_path / "dump")), nprocs=2)
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert max(v.abs().max().item() for k, v in b.items() if "lora_B" in k) > 1e-3  # it trained
    updates = sorted((tmp_path / "dump").glob("rank0_*"))
    assert len(updates) == 3
    for f in updates:  # after every step both ranks hold the same weights, to the bit
        w0, w1 = torch.load(f), torch.load(f.with_name(f.name.replace("rank0", "rank1")))
        assert all(torch.equal(w0[k], w1[k]) for k in w0)
    rows = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    grpo_one = [r for r in one if r["phase"] == "grpo"]
    grpo_two = [r for r in rows if r["phase"] == "grpo"]
    for key in ("reward", "kept_groups", "prompts", "tokens"):  # the step's numbers over both ranks
        assert [r[key] for r in grpo_two] == [r[key] for r in grpo_one], key
    assert [r["loss"] for r in grpo_two] == pytest.approx([r["loss"] for r in grpo_one], abs=1e-5)
    evals = [(r["phase"], r["f1"]) for r in rows if r["phase"].startswith("eval")]
    assert evals == [(r["phase"], r["f1"]) for r in one if r["phase"].startswith("eval")]  # split, then gathered
    assert len(list((tmp_path / "two").iterdir())) == len(list((tmp_path / "one").iterdir()))  # rank 0 wrote it
    # resume across rank counts: the one-process run goes on under 2 ranks (rank 0 reads the checkpoint and sends it),
    # the 2-rank run in one process; both to step 4, they still hold the same adapter
    more = [*TINY, "--steps=4", "--resume=True"]
    mp.spawn(rank_main, args=(2, free_port(), [*more, f"--out_dir={tmp_path / 'one'}"], cache,
                              str(tmp_path / "dump")), nprocs=2)
    train.main(train.parse_args([*more, f"--out_dir={tmp_path / 'two'}"]), gpu_check.lower_share)
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    for run in ("one", "two"):
        steps = [json.loads(x)["step"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                 if json.loads(x)["phase"] == "grpo"]
        assert steps == [1, 2, 3, 4], (run, steps)


def worker_pids(parent):
    """The pids of torchrun's workers, by their RANK."""
    pids = {}
    for child in subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = [e for e in env if e.startswith(b"RANK=")]
        if rank:
            pids[int(rank[0][5:])] = int(child)
    return pids


def test_torchrun_rank_killed_stops_the_run_and_it_resumes_with_one(tmp_path):
    """torchrun with 2 CPU ranks; rank 1 is killed after step 3: the run stops within a minute, saying which rank
    failed; `--resume=True` in one process continues from the step-2 checkpoint to the end."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    argv = ["--preset=tiny", "--device=cpu", "--steps=200", "--save_every=2", "--eval_every=1000",
            f"--out_dir={tmp_path / 'run'}"]
    run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            f"--master_port={free_port()}", "train.py", *argv], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, t = [], time.time()
    for line in run.stdout:
        lines.append(line)
        if line.startswith("step 3/200"):
            break
        assert time.time() - t < 300, "".join(lines[-30:])
    os.kill(worker_pids(run.pid)[1], signal.SIGKILL)
    t = time.time()
    try:
        rest, _ = run.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        run.kill()
        pytest.fail("the run hung after a rank was killed:\n" + "".join(lines[-30:]))
    out = "".join(lines) + rest
    assert run.returncode != 0 and time.time() - t < 120
    assert "rank 1" in out or "local_rank: 1" in out, out[-3000:]
    assert "step 200/200" not in out
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert state["step"] >= 2 and state["step"] % 2 == 0
    done = subprocess.run([sys.executable, "train.py", *argv[:2], "--steps=8", *argv[3:], "--resume=True"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"resumed from {tmp_path / 'run' / 'state.pt'} at step {state['step']}" in done.stdout
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["phase"] == "grpo"]
    assert steps == list(range(1, 9))


def test_dry_run_prints_the_memory_plan_of_a_rank(capsys):
    import train
    train.main(train.parse_args(["--preset=gpu24", "--dry_run=True"]))
    one = capsys.readouterr().out
    train.main(train.parse_args(["--preset=gpu24", "--dry_run=True", "--world_size=2"]))
    two = capsys.readouterr().out
    assert "B=8 G=8" in one and "per rank" not in one
    assert "memory plan per rank, 2 ranks: 4 of the step's 8 prompts each" in two and "B=4 G=8" in two
    peak = [float(x.split("peak: ")[1].split(" GB")[0]) for x in (one, two)]
    assert peak[1] <= peak[0]


def test_first_round_joins_reward_parts_that_only_some_ranks_have(monkeypatch):
    """A reward drops a part that is NaN for its whole batch: rank 0's share may lack one another rank has. The
    step's row gets every part, NaN where a rank had none, in the step's prompt order; batch counts are summed."""
    import distributed
    import train
    G, nan = 2, float("nan")
    mine = train.Groups(["a", "c"], [], None, None, torch.tensor([0.1, 0.2, 0.5, 0.6]),
                        {"f1": torch.tensor([1.0, 2.0, 5.0, 6.0]), "steps_run": torch.tensor(3.0)},
                        torch.zeros(2, G), [])
    other = [([0.3, 0.4], {"f1": [3.0, 4.0], "target": [0.7, nan]})]  # rank 1: prompt "b"

    def gather(rows, n):
        out = [None] * n
        out[0::2], out[1::2] = rows, other
        return out
    monkeypatch.setattr(distributed, "WORLD", 2)
    monkeypatch.setattr(distributed, "gather", gather)
    monkeypatch.setattr(distributed, "broadcast", lambda x: x)
    monkeypatch.setattr(distributed, "total", lambda x: x + 4.0)  # rank 1 ran 4 steps
    rewards, info = train.first_round(mine, 3, G)
    assert rewards.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert info["f1"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert torch.equal(info["target"].isnan(), torch.tensor([True, True, False, True, True, True]))
    assert info["steps_run"].item() == 7.0
