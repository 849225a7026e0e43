"""Fault injection (issue 12): real ``kill -9`` at seeded random steps and at every point inside a checkpoint
write, one rank of two killed, a full disk during a save and an export, and bad inputs that must end in a message.

Every kill is a SIGKILL of the whole process tree (a lost node): nothing gets a chance to clean up. The runs are
the tiny BERT of ``tests/tiny.py`` with dropout on, so a resume that loses an RNG state shows in the weights; each
resumed run's exported weights must equal an uninterrupted run's bit for bit (CPU).

Kills inside a save run ``python -m tests.test_faults`` (the ``__main__`` block below): the real CLI, with a
wrapper that SIGKILLs the process at the named point of :func:`scaledkd.checkpoint.save`. A full disk is a real
small tmpfs (we run as root); where mounting is not allowed a writer that fails partway stands in.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tests.tiny import (
    REPO,
    free_port,
    make_sst2,
    make_tiny_bert,
    small_engine,
    tiny_recipe,
    write_recipe,
)

pytestmark = pytest.mark.faults
STEPS = 12
LOSSES = [{"name": "task", "weight": 0.5}, {"name": "logit_kd", "weight": 0.5}, {"name": "hidden_mse"}]
TIMEOUT = 480  # a hang guard: 3 ranks on 2 shared cores took 258 s to reach step 7 once


# ------------------------------------------------------------------------------------------ helpers


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                          "MASTER_ADDR", "LOCAL_WORLD_SIZE")}
    # DeepSpeed JIT-builds its CPU shared-memory op on every dist init; a cache of this venv's own keeps other
    # environments sharing ~/.cache/torch_extensions from forcing a rebuild (a minute) into every launch.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO), TORCH_EXTENSIONS_DIR=str(Path(sys.prefix) / "torch_extensions"))
    return env


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_assets")
    teacher = make_tiny_bert(root / "teacher")
    config = json.loads((teacher / "config.json").read_text())
    config["hidden_dropout_prob"] = 0.1  # the student copies it: training draws random numbers every step
    (teacher / "config.json").write_text(json.dumps(config))
    return teacher, make_sst2(root / "glue")


def _recipe(folder: Path, assets, student_ds: str = "ds_configs/zero0.json", batch: int = 8) -> Path:
    """STEPS steps, a checkpoint every 2 (keep 2), none by the clock."""
    teacher, data_dir = assets
    recipe = tiny_recipe(folder, teacher, data_dir, losses=LOSSES)
    recipe["output_dir"] = str(folder / "run")
    recipe["student"]["ds_config"] = student_ds
    recipe["train"].update(batch_size=batch, max_steps=STEPS, save_every=2, save_every_min=0, log_every=1)
    folder.mkdir(parents=True, exist_ok=True)
    return write_recipe(folder / "recipe.yaml", **recipe)


def _command(recipe: Path, nproc: int = 1, wrapper: list[str] | None = None) -> list[str]:
    args = ["distill", str(recipe), "train.resume=auto", "train.progress=false"]
    if nproc == 1:
        return [sys.executable, "-m", *(wrapper or ["scaledkd.cli"]), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), "-m", "scaledkd.cli", *args]


class _Job(subprocess.Popen):
    """A launch whose output goes to a file: a pipe nobody reads while the test polls the run's log would fill
    (64 KiB) and block the ranks on their next print."""

    output: Path

    def communicate(self, input=None, timeout=None):  # noqa: A002 (Popen's signature)
        self.wait(timeout=timeout)
        return self.output.read_text(errors="replace"), None


def _start(cmd: list[str]) -> subprocess.Popen:
    with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as out:
        proc = _Job(cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc.output = Path(out.name)
    return proc


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (torchrun starts its workers in sessions of their own)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    for pid in _tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate(timeout=60)


def _finish(cmd: list[str]) -> str:
    proc = _start(cmd)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        raise
    assert proc.returncode == 0, out[-6000:]
    return out


def _records(log: Path, offset: int = 0) -> list[dict]:
    """The complete JSON lines of ``log`` from byte ``offset`` (a line being written is skipped)."""
    if not log.is_file():
        return []
    with log.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


def _kill_at(cmd: list[str], run: Path, at_step: int) -> int:
    """Start ``cmd``, SIGKILL its whole tree once this launch has logged a step >= ``at_step`` (the first step it
    logs, if it resumed beyond it). Returns the step the kill landed after (as logged)."""
    log = run / "log.jsonl"
    offset = log.stat().st_size if log.is_file() else 0
    proc = _start(cmd)
    deadline = time.monotonic() + TIMEOUT
    try:
        while True:
            new = _records(log, offset)
            resumed = max((r["step"] for r in new if r.get("event") == "resumed"), default=0)
            steps = [r["step"] for r in new if "step" in r and "event" not in r]
            if steps and max(steps) >= max(at_step, resumed + 1):
                break
            if proc.poll() is not None:
                raise AssertionError(f"the run ended before step {at_step}: {proc.communicate()[0][-4000:]}")
            assert time.monotonic() < deadline, f"step {at_step} not reached"
            time.sleep(0.01)
    finally:
        _kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL
    return max(steps)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "student" / "model.safetensors")


def _assert_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    diff = {k: (got[k] - want[k]).abs().max().item() for k in got if not torch.equal(got[k], want[k])}
    assert not diff, f"weights differ from the uninterrupted run: {diff}"


def _resumed_steps(run: Path) -> list[int]:
    return [r["step"] for r in _records(run / "log.jsonl") if r.get("event") == "resumed"]


# ------------------------------------------------------------------------------------------ kill -9 at random steps

# Seeded: the same steps on every run of the suite, drawn from 2..STEPS-2.
KILL_STEPS = sorted(random.Random(12).sample(range(2, STEPS - 1), 3))


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The uninterrupted single-process run."""
    recipe = _recipe(tmp_path_factory.mktemp("reference"), assets)
    _finish(_command(recipe))
    return _weights(recipe.parent / "run")


def test_kill_9_at_seeded_random_steps_then_resume_auto_is_bit_identical(assets, tmp_path, reference):
    recipe = _recipe(tmp_path, assets)
    run = tmp_path / "run"
    landed = [_kill_at(_command(recipe), run, step) for step in KILL_STEPS]
    _finish(_command(recipe))
    assert len(_resumed_steps(run)) == len(KILL_STEPS), (landed, _resumed_steps(run))
    _assert_identical(_weights(run), reference)


@pytest.mark.multiproc
@pytest.mark.parametrize("stage", [2, 3])
def test_kill_9_of_a_two_rank_zero_job_then_resume_auto_is_bit_identical(assets, tmp_path, stage):
    """One kill per layout (each 2-rank launch costs several seconds of start-up on a CPU): the uninterrupted
    2-rank run against a 2-rank run killed at a seeded step and relaunched with the same command."""
    ds = f"ds_configs/zero{stage}.json"
    whole = _recipe(tmp_path / "whole", assets, ds, batch=4)
    _finish(_command(whole, nproc=2))
    recipe = _recipe(tmp_path / "killed", assets, ds, batch=4)
    run = tmp_path / "killed" / "run"
    _kill_at(_command(recipe, nproc=2), run, KILL_STEPS[stage - 2])
    _finish(_command(recipe, nproc=2))
    assert len(_resumed_steps(run)) == 1
    _assert_identical(_weights(run), _weights(tmp_path / "whole" / "run"))


# ------------------------------------------------------------------------------------------ kill -9 inside a save

SAVE_STEP = 6  # killed while writing step_6; step_4 and step_2 are complete


@pytest.mark.parametrize(
    ("point", "resumes_at"),
    [
        ("mid-shard", 4),  # half of DeepSpeed's optimiser shard written
        ("before-rng", 4),  # every shard written, no RNG file yet (the window of the old save order)
        ("before-manifest", 4),  # shards and RNG written, no manifest
        ("before-rename", 4),  # manifest written, still .step_6.partial
        ("before-latest", 4),  # step_6 complete and in place, `latest` still names step_4
        ("mid-retention", 6),  # step_6 and `latest` done, step_2 half deleted
    ],
)
def test_kill_9_inside_a_checkpoint_write_resumes_from_the_previous_complete_one(
        assets, tmp_path, reference, point, resumes_at):
    recipe = _recipe(tmp_path, assets)
    run = tmp_path / "run"
    proc = _start(_command(recipe, wrapper=["tests.test_faults", "die-in-save", point, str(SAVE_STEP)]))
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL, out[-4000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{resumes_at}"
    _finish(_command(recipe))
    assert _resumed_steps(run) == [resumes_at]
    _assert_identical(_weights(run), reference)
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert left == ["latest", "step_10", "step_12"], left  # nothing half-written or half-deleted stays


# ------------------------------------------------------------------------------------------ one rank of two killed


@pytest.mark.multiproc
def test_one_rank_killed_ends_the_job_within_60_s_naming_the_rank(assets, tmp_path):
    recipe = _recipe(tmp_path, assets, "ds_configs/zero2.json", batch=4)
    log = tmp_path / "run" / "log.jsonl"
    proc = _start(_command(recipe, nproc=2))
    try:
        deadline = time.monotonic() + TIMEOUT
        while not any("step" in r and "event" not in r for r in _records(log)):
            assert proc.poll() is None and time.monotonic() < deadline, "the job did not reach its first step"
            time.sleep(0.05)
        workers = [pid for pid in _tree(proc.pid)[1:]
                   if b"RANK=1\0" in Path(f"/proc/{pid}/environ").read_bytes().replace(b"LOCAL_RANK", b"")]
        assert workers, "rank 1 not found"
        os.kill(workers[0], signal.SIGKILL)
        killed = time.monotonic()
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    assert proc.returncode != 0
    assert took < 60
    assert "rank      : 1" in out or "rank 1" in out, out[-4000:]
    assert not [p for p in _tree(proc.pid)[1:] if Path(f"/proc/{p}").exists()]


# ------------------------------------------------------------------------------------------ a full disk


@contextmanager
def _small_fs(folder: Path, size: str):
    """A real tmpfs of ``size`` at ``folder`` (root only); None where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=False,
        capture_output=True).returncode == 0
    try:
        yield folder if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(folder: Path, leave: int) -> Path:
    """A file that leaves ``leave`` bytes free on ``folder``'s device."""
    filler = folder / "filler"
    free = shutil.disk_usage(folder).free
    with filler.open("wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def _fail_partway(real, errno_: int = errno.ENOSPC):
    """A stand-in writer for a full disk where no small file system can be mounted: half a file, then ENOSPC."""

    def write(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
        raise OSError(errno_, os.strerror(errno_), str(f))

    return write


@pytest.fixture(scope="module")
def engine():
    """A DeepSpeed engine (ZeRO-0, a 64x64 layer, one optimiser step taken) to save into any folder."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", _env()["TORCH_EXTENSIONS_DIR"])  # see _env
    return small_engine(64)


def test_disk_full_during_a_checkpoint_save_keeps_the_previous_one_and_says_so(engine, tmp_path, monkeypatch):
    from scaledkd import checkpoint

    state = {"step": 2, "micro": 2, "best": None, "history": []}
    with _small_fs(tmp_path / "disk", "1m") as disk:
        run = (disk or tmp_path / "disk") / "run"
        checkpoint.save(engine, run, 2, state, keep=2)
        before = {p: p.read_bytes() for p in (run / "checkpoints" / "step_2").rglob("*") if p.is_file()}
        if disk is not None:
            filler = _fill(disk, 20_000)  # less than one checkpoint (about 100 KB)
        else:
            monkeypatch.setattr(checkpoint.torch, "save", _fail_partway(torch.save))
        with pytest.raises(checkpoint.DiskFull) as err:
            checkpoint.save(engine, run, 4, {**state, "step": 4}, keep=2)
        root = run / "checkpoints"
        assert str(err.value).startswith(f"no space left on device while writing checkpoint step_4 in {root}")
        assert "step_2 is intact" in str(err.value)
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step_2"]  # no partial folder left
        assert (root / "latest").read_text().strip() == "step_2"
        assert checkpoint.problem(root / "step_2") is None
        assert {p: p.read_bytes() for p in (root / "step_2").rglob("*") if p.is_file()} == before
        # Once there is room again, the same save works.
        filler.unlink() if disk is not None else monkeypatch.undo()
        checkpoint.save(engine, run, 4, {**state, "step": 4}, keep=2)
        assert checkpoint.resolve(run, "latest") == (root, "step_4")


def test_disk_full_during_an_export_keeps_the_earlier_export_and_says_so(tmp_path, monkeypatch, capsys):
    from scaledkd import export
    from scaledkd.checkpoint import DiskFull
    from tests.conftest import tiny_model

    model = tiny_model("bert", layers=2)
    with _small_fs(tmp_path / "disk", "2m") as disk:
        out = (disk or tmp_path / "disk") / "out"
        export.save_student(model, model.state_dict(), out, None, {"run": "first"}, None)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        if disk is not None:
            _fill(disk, 50_000)  # the weights are about 400 KB
        else:
            import transformers.modeling_utils as hf

            monkeypatch.setattr(hf, "safe_save_file", _fail_partway(hf.safe_save_file))
        with pytest.raises(DiskFull) as err:
            export.save_student(model, model.state_dict(), out, None, {"run": "second"}, None, replace=True)
        assert str(err.value).startswith(f"no space left on device while writing the export {str(out)!r}")
        assert "the earlier export there is untouched" in str(err.value)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert sorted(p.name for p in out.parent.iterdir() if p.name != "filler") == ["out"]  # no staging left


# ------------------------------------------------------------------------------------------ messages, not tracebacks


def _cli(capsys, *argv: str) -> str:
    from scaledkd.cli import main

    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("scaledkd: error: ")]
    assert lines, err[-3000:]
    return lines[-1]


def _broken_teacher(assets, tmp_path: Path) -> Path:
    teacher = tmp_path / "teacher"
    shutil.copytree(assets[0], teacher)
    return teacher


def _plan_recipe(tmp_path: Path, assets, teacher: Path | None = None, data_dir: Path | None = None, **top) -> Path:
    recipe = tiny_recipe(tmp_path, teacher or assets[0], data_dir or assets[1], losses=LOSSES)
    recipe.update(top)
    return write_recipe(tmp_path / "recipe.yaml", **recipe)


def test_truncated_teacher_weights_are_a_message_naming_the_file(assets, tmp_path, capsys):
    teacher = _broken_teacher(assets, tmp_path)
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = _cli(capsys, "distill", str(_plan_recipe(tmp_path, assets, teacher)), "train.progress=false")
    assert str(weights) in line and "truncated or corrupt" in line


def test_invalid_config_json_is_a_message_naming_the_file(assets, tmp_path, capsys):
    teacher = _broken_teacher(assets, tmp_path)
    (teacher / "config.json").write_text('{"model_type": "bert", "hidden_size": 64,')
    line = _cli(capsys, "validate", str(_plan_recipe(tmp_path, assets, teacher)))
    assert str(teacher / "config.json") in line and "not valid JSON (line 1" in line


def test_eval_of_a_folder_that_is_not_a_model_says_so(assets, tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a model")
    line = _cli(capsys, "eval", str(folder), "--task", "sst2", "--data-dir", str(assets[1]))
    assert f"model folder {str(folder)!r} has no config.json: it is not a Hugging Face model folder" in line


def test_a_data_file_that_is_not_utf8_is_named_with_its_line(assets, tmp_path, capsys):
    data_dir = tmp_path / "glue"
    shutil.copytree(assets[1], data_dir)
    train = data_dir / "SST-2" / "train.tsv"
    lines = train.read_bytes().splitlines(keepends=True)
    lines[4] = b"caf\xe9 au lait \t1\n"  # Latin-1, not UTF-8
    train.write_bytes(b"".join(lines))
    line = _cli(capsys, "validate", str(_plan_recipe(tmp_path, assets, data_dir=data_dir)))
    assert f"GLUE file {str(train)!r} is not UTF-8 text: line 5" in line


def test_output_dir_on_a_read_only_file_system_is_a_message(assets, tmp_path, capsys):
    # chmod does not stop root, so a read-only mount it is.
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                                           check=False, capture_output=True).returncode != 0:
        pytest.skip("needs a read-only mount (root and mount(8)); chmod does not stop root from writing")
    try:
        line = _cli(capsys, "distill", str(_plan_recipe(tmp_path, assets, output_dir=str(folder / "run"))),
                    "train.progress=false")
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
    assert str(folder / "run") in line and "Read-only file system" in line


def _die_in_save(point: str, step: int) -> None:
    """Arrange a SIGKILL of this process at ``point`` of the save of ``step_<step>``."""
    from scaledkd import checkpoint

    partial = f".step_{step}.partial"

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        path = Path(f) if isinstance(f, (str, os.PathLike)) else None
        if path is not None and path.parent.name == partial:
            if point == "before-rng" and path.name.startswith("rng_rank"):
                die()
            if point == "mid-shard" and path.name.endswith(("optim_states.pt", "model_states.pt")):
                real_save(obj, f, *args, **kwargs)
                with open(path, "r+b") as fh:
                    fh.truncate(path.stat().st_size // 2)
                    fh.flush()
                    os.fsync(fh.fileno())
                die()
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
    real_write = checkpoint.write_text_atomic

    def write(path, text, *args, **kwargs):
        path = Path(path)
        if point == "before-manifest" and path.name == checkpoint.MANIFEST and path.parent.name == partial:
            die()
        if point == "before-latest" and path.name == checkpoint.LATEST and text.strip() == f"step_{step}":
            die()
        real_write(path, text, *args, **kwargs)

    checkpoint.write_text_atomic = write
    real_rename = Path.rename

    def rename(self, target):
        if point == "before-rename" and self.name == partial:
            die()
        return real_rename(self, target)

    Path.rename = rename
    real_remove = checkpoint._remove

    def remove(folder):
        if point == "mid-retention" and (folder.parent / checkpoint.LATEST).read_text().strip() == f"step_{step}":
            doomed = folder.with_name(f".{folder.name}.deleting")
            real_rename(folder, doomed)
            for i, file in enumerate(sorted(p for p in doomed.rglob("*") if p.is_file())):
                if i % 2 == 0:
                    file.unlink()
            die()
        return real_remove(folder)

    checkpoint._remove = remove


if __name__ == "__main__":  # python -m tests.test_faults die-in-save POINT STEP <scaledkd arguments>
    assert sys.argv[1] == "die-in-save", sys.argv
    _die_in_save(sys.argv[2], int(sys.argv[3]))
    from scaledkd.cli import main

    sys.exit(main(sys.argv[4:]))
