"""SIGKILL inside train.save_checkpoint, before each of its filesystem operations in turn and at random moments: the
next run always finds a complete checkpoint to resume from (state.pt, and adapter/ once tidied), loads it, and its
next save works. A kill needs a process to kill, and a fresh Python with torch takes seconds, so one subprocess
loads a tiny planner once and forks a child per trial (milliseconds); the child is killed, the parent checks.

    python tests/test_checkpoint_kill.py TINY_FOLDER WORK_FOLDER [RANDOM_TRIALS]   # what the test runs
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEFTOVERS = (".adapter.tmp", ".adapter.old", "state.pt.tmp")


def test_sigkill_inside_save_checkpoint_never_wedges_the_run(tiny_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    t = time.time()
    done = subprocess.run([sys.executable, __file__, str(tiny_dir), str(tmp_path), "16"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(report, f"{time.time() - t:.1f}s in all")
    assert report["trials"] >= 20 and report["points"] >= 10, report  # each filesystem operation was a kill point
    assert report["killed"] > report["points"], report  # and some random moments killed too


# ----------------------------------------------------------------------------------------------------------------
# The subprocess

def lora(policy):
    return {k: v.detach().clone() for k, v in policy.state_dict().items() if "lora_" in k}


def adapter_weights(folder):
    from safetensors.torch import load_file
    return load_file(folder / "adapter_model.safetensors")


def same(a, b):
    import torch
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fork_save(out, policy, opt, sched, step, kill_at=None, kill_after=None):
    """save_checkpoint in a forked child, killed before its `kill_at`-th filesystem operation or `kill_after`
    seconds in. Returns (killed, number of operations the child reached)."""
    import threading

    import torch

    import train
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: count, maybe die, never return into the parent's code
        try:
            os.close(r)
            count = [0]

            def counted(f):
                def g(*a, **k):
                    count[0] += 1
                    os.write(w, b".")  # the parent learns how far the child got, even from a killed child
                    if count[0] == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return f(*a, **k)
                return g
            for name in ("replace", "rename", "unlink", "rmdir", "mkdir"):  # shutil.rmtree goes through these
                setattr(os, name, counted(getattr(os, name)))
            torch.save = counted(torch.save)
            policy.save_pretrained = counted(policy.save_pretrained)
            if kill_after is not None:
                threading.Timer(kill_after, os.kill, (os.getpid(), signal.SIGKILL)).start()
            train.save_checkpoint(out, policy, opt, sched, step)
            os._exit(0)
        except BaseException:
            import traceback
            traceback.print_exc()
            os._exit(3)
    os.close(w)
    reached = 0
    while chunk := os.read(r, 1024):
        reached += len(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert killed or os.WEXITSTATUS(status) == 0, f"the save failed in the child (status {status}), see stderr"
    return killed, reached


def check_next_run(out, policy, opt, sched, weights):
    """What the next run does with a folder a kill left: tidy it, resume from state.pt, save again."""
    import torch

    import train
    state = torch.load(out / "state.pt", weights_only=True)  # complete and loadable, whatever the kill hit
    step = state["step"]
    assert step in weights and same(state["lora"], weights[step]["lora"]), step
    train.tidy_checkpoint(out)  # main does this on resume, and every save does it first
    assert not any((out / x).exists() for x in LEFTOVERS), sorted(os.listdir(out))
    on_disk = adapter_weights(out / "adapter")
    # adapter/ is swapped in before state.pt is replaced, so it is the checkpoint's or the one being saved
    assert any(same(on_disk, w["adapter"]) for s, w in weights.items() if s >= step), step
    with torch.no_grad():  # scramble the LoRA weights, so that resuming has to restore them
        for k, v in policy.named_parameters():
            if "lora_" in k:
                v.add_(1.0)
    assert train.load_checkpoint(out, policy, opt, sched) == step
    assert same(lora(policy), weights[step]["lora"])
    train.save_checkpoint(out, policy, opt, sched, step + 10)
    assert not any((out / x).exists() for x in LEFTOVERS), sorted(os.listdir(out))
    assert torch.load(out / "state.pt", weights_only=True)["step"] == step + 10
    assert same(adapter_weights(out / "adapter"), weights[step]["adapter"])
    return step


def trials(tiny_dir, work, n_random, seed=0):
    import random

    import torch
    torch.set_num_threads(1)  # no OpenMP pool in the parent: forked children stay safe
    sys.path.insert(0, str(ROOT))
    import train
    from planner import load_planner
    t0 = time.time()
    policy = load_planner("tiny", folder=tiny_dir, lora_r=4, lora_alpha=8).policy
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: train.lr_factor(s, 1, 10))

    def train_step():  # a real optimizer step: the optimizer state holds tensors, the weights move
        loss = sum((p ** 2).sum() for p in params) + sum(p.sum() for p in params)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()

    # step 1 saved (the checkpoint every kill starts from), then step 2 trained: what each child saves
    weights, pristine, out = {}, work / "pristine", work / "run"
    pristine.mkdir(parents=True)
    train_step()
    train.save_checkpoint(pristine, policy, opt, sched, 1)
    weights[1] = {"lora": lora(policy), "adapter": adapter_weights(pristine / "adapter")}
    train_step()
    ref = work / "ref"
    ref.mkdir()
    policy.save_pretrained(ref)
    weights[2] = {"lora": lora(policy), "adapter": adapter_weights(ref)}
    at_two = {k: v.clone() for k, v in lora(policy).items()}
    opt_two, sched_two = opt.state_dict(), sched.state_dict()

    def fresh():  # the folder as step 1 left it, and the process as it was about to save step 2
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(pristine, out)
        policy.load_state_dict(at_two, strict=False)
        opt.load_state_dict(opt_two)
        sched.load_state_dict(sched_two)

    results, k, t_save = [], 0, 0.0
    while True:  # before the 1st, 2nd, ... operation, until a save runs to its end
        k += 1
        fresh()
        t = time.time()
        killed, reached = fork_save(out, policy, opt, sched, 2, kill_at=k)
        if not killed:
            t_save = time.time() - t
            results.append(("complete", reached, check_next_run(out, policy, opt, sched, weights)))
            break
        results.append((f"op {k}", reached, check_next_run(out, policy, opt, sched, weights)))
    points = k - 1
    rng = random.Random(seed)
    for _ in range(n_random):  # at random moments: inside a write, between a write and its rename, ...
        fresh()
        killed, reached = fork_save(out, policy, opt, sched, 2, kill_after=rng.uniform(0, t_save))
        results.append(("random" if killed else "complete", reached, check_next_run(out, policy, opt, sched, weights)))
    killed = sum(r[0] != "complete" for r in results)
    steps = sorted({r[2] for r in results})
    assert steps == [1, 2], f"the kills should leave both the old and the new checkpoint: {results}"
    return {"trials": len(results), "points": points, "killed": killed, "resumed_steps": steps,
            "save_seconds": round(t_save, 3), "seconds": round(time.time() - t0, 1)}


if __name__ == "__main__":
    report = trials(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 16)
    print(json.dumps(report))
