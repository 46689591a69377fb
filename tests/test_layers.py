"""The layering of the top-level files: each may import only files below it in LAYERS, so there is one direction
through the code and no import circle. Lazy imports inside functions count too: they hide a circle from Python,
not from a reader."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
# Lowest first. A file imports only files listed before it.
LAYERS = [
    "plan",                                   # 0: the plan vocabulary, parser, formatter, Steps (no torch)
    "data",                                   # 0: images, dataset folders, a step's batch
    "phrasings",                              # 0: the built-in requests: templates, the train/test splits
    "editor", "registry",                     # the CPU editor; the lazy registry of agents (CPU loaders)
    "distributed",                            # the ranks of a torchrun run (torch.distributed only)
    "rollout", "planner", "llama", "vlm", "memory",  # 1: sampling and log-probs; loading planners; memory plan
    "config",                                 # 1: a run's settings, presets and command line
    "engine",                                 # 1: the rollout engine (a merged copy of the policy for sampling)
    "regions", "grounding", "diffusion",      # 2: region and editing agents
    "agents",                                 # 2: the team: gpu24 loaders, sequencing, running a plan
    "reward",                                 # 3: every reward
    "checkpoint",                             # 3: run folders: atomic saves, resume and its checks
    "coldstart",                              # 3: the supervised cold start before GRPO
    "train", "edit", "eval", "bench", "gpu_check", "app",  # 4: entry points, never importing each other ...
]
ENTRY = {"train", "edit", "eval", "bench", "gpu_check", "app"}
# ... but the GPU check runs them in-process, as a test, `bench.py coldstart` runs train's cold start alone, and the
# editing page runs edit.py's code
DRIVES = {("gpu_check", "train"), ("gpu_check", "edit"), ("gpu_check", "app"), ("bench", "train"), ("app", "edit")}


def project_imports(path, known):
    """(line, imported file) of every import of a project file in `path`, at module top or inside a function."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        else:
            continue
        yield from ((node.lineno, n) for n in names if n in known and n != path.stem)


def violations(root, layers=LAYERS):
    known = {p.stem for p in root.glob("*.py")}
    found = []
    for path in sorted(root.glob("*.py")):
        for line, name in project_imports(path, known):
            me, it = path.stem, name
            if me not in layers or it not in layers:
                found.append(f"{me}.py:{line} imports {it}: a file not in LAYERS (add it where it belongs)")
            elif (me in ENTRY and it in ENTRY and (me, it) not in DRIVES) or \
                    (layers.index(it) >= layers.index(me) and not (me in ENTRY and it in ENTRY)):
                found.append(f"{me}.py:{line} imports {it}, which is not below it in LAYERS")
    return found


def test_imports_only_go_down():
    assert violations(ROOT) == []


def test_an_upward_import_is_caught(tmp_path):
    for f in ROOT.glob("*.py"):
        (tmp_path / f.name).write_text(f.read_text())
    assert violations(tmp_path) == []
    (tmp_path / "plan.py").write_text((ROOT / "plan.py").read_text() + "\n\ndef late():\n    import reward\n")
    (tmp_path / "train.py").write_text((ROOT / "train.py").read_text() + "\nimport eval\n")
    (tmp_path / "new.py").write_text("import data\n")
    found = violations(tmp_path)
    assert any(v.startswith("plan.py:") and "imports reward" in v for v in found)
    assert any(v.startswith("train.py:") and "imports eval" in v for v in found)
    assert any(v.startswith("new.py:") and "not in LAYERS" in v for v in found)


@pytest.mark.parametrize("name", LAYERS)
def test_every_layer_is_a_file(name):
    assert (ROOT / f"{name}.py").exists()
