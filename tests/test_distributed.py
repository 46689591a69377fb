"""train.py under several ranks on the CPU (gloo): two ranks end with the adapter one process makes, hold the same
weights after every step, and a killed rank stops the run with a message; the run resumes with another number of
ranks. The ranks are real processes: spawned by torch.multiprocessing, or by torchrun as a user starts them."""
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
TINY = ["--preset=tiny", "--dtype=float32", "--steps=3", "--eval_every=3", "--save_every=3"]


def lower_share(texts, golds):
    """A reward with signal for a random tiny model (as test_train's): the share of lower-case letters."""
    r = torch.tensor([sum(c.islower() for c in t) / max(len(t), 1) for t in texts])
    return r, {"format": torch.zeros_like(r), "f1": r, "f1_action": r, "f1_subject": r, "f1_goal": r}


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
    import train
    real = train.grpo_update

    def update_and_dump(policy, *a, **k):
        out = real(policy, *a, **k)
        lora = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
        torch.save(lora, Path(dump) / f"rank{rank}_update{len(list(Path(dump).glob(f'rank{rank}_*')))}.pt")
        return out

    train.grpo_update = update_and_dump
    train.main(train.parse_args(argv), lambda cfg, planner: lower_share)


def adapter(folder):
    from safetensors.torch import load_file
    return load_file(Path(folder) / "adapter" / "adapter_model.safetensors")


def test_two_gloo_ranks_make_the_adapter_of_one_process(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    import train
    cache = str(tmp_path / "cache")
    monkeypatch.setenv("XDG_CACHE_HOME", cache)
    one = train.main(train.parse_args([*TINY, f"--out_dir={tmp_path / 'one'}"]), lambda cfg, planner: lower_share)
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
    argv = ["--preset=tiny", "--steps=200", "--save_every=2", "--eval_every=1000", f"--out_dir={tmp_path / 'run'}"]
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
    done = subprocess.run([sys.executable, "train.py", *argv[:1], "--steps=8", *argv[2:], "--resume=True"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"resumed from {tmp_path / 'run' / 'state.pt'} at step {state['step']}" in done.stdout
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["phase"] == "grpo"]
    assert steps == list(range(1, 9))
