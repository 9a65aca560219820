"""Crash-safety harness: a scripted session on a project, a model of what it must leave behind,
and a child process that is SIGKILLed at the N-th fault point (see `defect_studio.atomic.fault_point`).

The session prints `saved <i>` (flushed to a file) after operation i returns. After a kill the
project must open, hold exactly the state after `saved` operations or after one more (the one
whose commit had happened when the kill struck), with every mask file byte-identical to what the
model says and no temporary or staged file left visible.

Run as a script, `python -m tests.crash_harness session PROJECT LOG` plays the session in this
process (used by the tests that kill a real interpreter after a random delay).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from defect_studio.atomic import STAGED_SUFFIX, TEMP_SUFFIX, atomic_write_bytes, configure_faults
from defect_studio.imageio import encode_mask_png, read_mask
from defect_studio.project import DECIDED_STATES, LOCKED_STATES, Project

REPO = Path(__file__).resolve().parents[1]
IMAGE_SHAPE = (12, 16)  # height, width of every image of the harness project
IMAGE_COUNT = 5
SOAK = os.environ.get("DEFECT_STUDIO_SOAK") == "1"

Op = tuple  # ("tag", ids, tag) | ("round",) | ("propose"|"edit", image, round, seed) | ("review", image, round, state)
#            | ("revert", image, round) | ("setting", key, value) | ("checkpoint", name, seed)


def mask_for(seed: int, shape: tuple[int, int] = IMAGE_SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).random(shape) > 0.7


def checkpoint_bytes_for(seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(3000)  # stands for a state_dict; written the same way


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# The session every kill point interrupts: covers tags, rounds, fresh/carried proposals, a second
# edit over a saved edit (the case that loses work if a file is replaced before its row commits),
# review, revert, settings and a checkpoint with its training-run row.
SESSION: list[Op] = [
    ("tag", (1, 2), "defect"),
    ("round",),
    ("propose", 1, 0, 11),
    ("propose", 2, 0, 12),
    ("propose", 3, 0, 13),
    ("edit", 1, 0, 21),
    ("review", 2, 0, "accepted"),
    ("tag", (3, 4), "good"),
    ("edit", 1, 0, 22),
    ("review", 3, 0, "rejected"),
    ("setting", "threshold", 0.4),
    ("checkpoint", "classifier-1.pt", 5),
    ("round",),
    ("propose", 1, 1, 31),
    ("propose", 2, 1, 32),
    ("propose", 3, 1, 33),
    ("edit", 3, 1, 41),
    ("revert", 3, 1),
    ("edit", 2, 1, 42),
    ("tag", (1,), "untagged"),
    ("propose", 4, 1, 34),
    ("review", 4, 1, "accepted"),
    ("edit", 4, 1, 43),
    ("setting", "threshold", 0.6),
]


@dataclass
class Model:
    """What the store must hold after a sequence of operations (the specification of the store)."""

    tags: dict[int, str] = field(default_factory=lambda: {i: "untagged" for i in range(1, IMAGE_COUNT + 1)})
    rounds: int = 0
    masks: dict[tuple[int, int], tuple[str, bytes]] = field(default_factory=dict)  # (image, round) -> (state, png)
    proposals: dict[tuple[int, int], bytes] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[tuple[str, str]] = field(default_factory=list)  # (file name, sha256)

    def copy(self) -> "Model":
        return Model(dict(self.tags), self.rounds, dict(self.masks), dict(self.proposals), dict(self.settings),
                     list(self.checkpoints))

    def is_valid(self, op: Op) -> bool:
        """Whether the store must accept `op` (False: it must refuse it with a ProjectError)."""
        kind = op[0]
        if kind in ("propose", "edit"):
            return op[2] < self.rounds
        if kind == "review":
            return (op[1], op[2]) in self.masks
        if kind == "revert":
            return (op[1], op[2]) in self.masks and (op[1], op[2]) in self.proposals
        return True

    def apply(self, op: Op) -> None:
        kind = op[0]
        if not self.is_valid(op):
            return
        if kind == "tag":
            for image in op[1]:
                self.tags[image] = op[2]
        elif kind == "round":
            self.rounds += 1
        elif kind == "propose":
            _, image, round_index, seed = op
            existing = self.masks.get((image, round_index))
            if existing is not None and existing[0] in DECIDED_STATES:
                return
            earlier = [r for r in range(round_index) if self.masks.get((image, r), ("",))[0] in LOCKED_STATES]
            if earlier:
                self.masks[(image, round_index)] = self.masks[(image, max(earlier))]
            else:
                data = encode_mask_png(mask_for(seed))
                self.masks[(image, round_index)] = ("proposed", data)
                self.proposals[(image, round_index)] = data
        elif kind == "edit":
            _, image, round_index, seed = op
            self.masks[(image, round_index)] = ("edited", encode_mask_png(mask_for(seed)))
        elif kind == "review":
            _, image, round_index, state = op
            self.masks[(image, round_index)] = (state, self.masks[(image, round_index)][1])
        elif kind == "revert":
            _, image, round_index = op
            self.masks[(image, round_index)] = ("proposed", self.proposals[(image, round_index)])
        elif kind == "setting":
            self.settings[op[1]] = op[2]
        elif kind == "checkpoint":
            self.checkpoints.append((op[1], sha256(checkpoint_bytes_for(op[2]))))


def model_after(ops: Sequence[Op]) -> Model:
    model = Model()
    for op in ops:
        model.apply(op)
    return model


def apply_to_project(project: Project, op: Op) -> None:
    kind = op[0]
    if kind == "tag":
        project.set_tags(op[1], op[2])
    elif kind == "round":
        project.create_round({"method": "test"})
    elif kind == "propose":
        _, image, round_index, seed = op
        project.save_mask_proposal(image, round_index, mask_for(seed), "cam:test", {"seed": seed})
    elif kind == "edit":
        _, image, round_index, seed = op
        project.save_edited_mask(image, round_index, mask_for(seed))
    elif kind == "review":
        project.review_mask(op[1], op[2], op[3])
    elif kind == "revert":
        project.revert_to_proposal(op[1], op[2])
    elif kind == "setting":
        project.set_setting(op[1], op[2])
    elif kind == "checkpoint":
        path = project.models_dir / op[1]
        atomic_write_bytes(path, checkpoint_bytes_for(op[2]))
        project.record_training_run("classifier", {"harness": True}, 0, {"auroc": 1.0}, path, ["h"])
    else:
        raise ValueError(f"unknown operation {op!r}")


def make_base_project(project_dir: Path) -> Path:
    """A closed project of IMAGE_COUNT images (ids 1..IMAGE_COUNT) of IMAGE_SHAPE."""
    images = project_dir.parent / "images"
    images.mkdir(parents=True, exist_ok=True)
    with Project.create(project_dir, images) as project:
        project.add_images(
            {"rel_path": f"img{i}.png", "sha256": f"hash{i}", "width": IMAGE_SHAPE[1], "height": IMAGE_SHAPE[0],
             "channels": 1, "bit_depth": 8}
            for i in range(1, IMAGE_COUNT + 1)
        )
    return project_dir


def play_session(project_dir: Path, log_path: Path, ops: Sequence[Op] = SESSION, start: int = 0) -> None:
    """Open the project and apply ops[start:], appending `saved i` to the log after each returns."""
    with open(log_path, "a", buffering=1, encoding="utf-8") as log:
        with Project.open(project_dir) as project:
            for index in range(start, len(ops)):
                apply_to_project(project, ops[index])
                log.write(f"saved {index}\n")
                log.flush()  # in the kernel now: survives the SIGKILL of this process
        log.write("closed\n")  # a kill after this finds the project closed cleanly, lock released


def closed_cleanly(log_path: Path) -> bool:
    return log_path.is_file() and "closed" in log_path.read_text(encoding="utf-8").splitlines()


def saved_count(log_path: Path) -> int:
    if not log_path.is_file():
        return 0
    return sum(1 for line in log_path.read_text(encoding="utf-8").splitlines() if line.startswith("saved "))


# ----------------------------------------------------------------- observing a project
@dataclass
class Observed:
    tags: dict[int, str]
    rounds: int
    masks: dict[tuple[int, int], tuple[str, bytes]]
    settings: dict[str, Any]
    checkpoints: list[tuple[str, str]]


def observe(project: Project, setting_keys: Sequence[str] = ("threshold",)) -> Observed:
    """The project's state as the user would see it, checking on the way that every row's file is
    there, whole and hashed as recorded."""
    masks = {}
    for record in project.mask_records():
        data = record.path.read_bytes()
        assert sha256(data) == record.sha256, f"{record.path}: content does not match its recorded hash"
        read_mask(record.path, IMAGE_SHAPE)  # decodes: not half-written
        masks[(record.image_id, record.round_index)] = (record.state, data)
    checkpoints = []
    for run in project.training_runs():
        assert sha256(run.checkpoint_path.read_bytes()) == run.checkpoint_sha256, f"{run.checkpoint_path} changed"
        checkpoints.append((run.checkpoint_path.name, run.checkpoint_sha256))
    settings = {key: project.get_setting(key) for key in setting_keys if project.get_setting(key) is not None}
    return Observed({i.id: i.tag for i in project.images()}, len(project.rounds()), masks, settings, checkpoints)


def matches(observed: Observed, model: Model) -> bool:
    return (observed.tags, observed.rounds, observed.masks, observed.settings, observed.checkpoints) == (
        model.tags, model.rounds, model.masks, model.settings, model.checkpoints)


def leftovers(project_dir: Path) -> list[Path]:
    """Temporaries and staged files: a reader must never see one after the project is opened."""
    return [p for p in project_dir.rglob("*") if p.name.endswith((TEMP_SUFFIX, STAGED_SUFFIX))]


def mask_files_decode(project_dir: Path) -> list[str]:
    """Every PNG under masks/ (rows, proposals, orphans) decodes; returns the ones that do not."""
    bad = []
    for png in (project_dir / "masks").rglob("*.png"):
        try:
            read_mask(png)
        except Exception as error:  # noqa: BLE001 - any failure is a half-written file
            bad.append(f"{png}: {error}")
    return bad


# ----------------------------------------------------------------- killing a child
_CONTEXT: Any = None


def _context() -> Any:
    """A forkserver: children fork from a clean interpreter (no torch threads), so each kill point
    costs milliseconds instead of a fresh interpreter's import time, with real process semantics."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        # The CLI's parser imports every command module (one of which imports torch): load them once.
        _CONTEXT.set_forkserver_preload([
            "tests.crash_harness", "defect_studio.cli", "defect_studio.project.importer", "defect_studio.ml.models",
            "defect_studio.ml.classifier", "defect_studio.ml.cams.compute", "defect_studio.ml.cam_cache",
            "defect_studio.ml.pseudo",
        ])
    return _CONTEXT


def _naive_save_mask_files(self: Project, files, write_rows) -> None:  # type: ignore[no-untyped-def]
    """The classic mistake, to prove the harness sees it: replace the file, then commit the row."""
    for target, data in files:
        atomic_write_bytes(target, data)
    with self._transaction() as db:
        write_rows(db)


def _child(project_dir: str, log_path: str, fault_spec: str, ops: Sequence[Op], start: int, naive: bool) -> None:
    configure_faults(fault_spec)
    if naive:
        Project._save_mask_files = _naive_save_mask_files  # type: ignore[method-assign]
    play_session(Path(project_dir), Path(log_path), ops, start)


def run_child(project_dir: Path, log_path: Path, fault_spec: str, ops: Sequence[Op] = SESSION,
              start: int = 0, timeout: float = 60.0, naive: bool = False) -> int:
    """Play the session in a child process under `fault_spec`; returns its exit code (-9 if killed)."""
    process = _context().Process(target=_child, args=(str(project_dir), str(log_path), fault_spec, list(ops), start, naive))
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        raise AssertionError(f"the session under {fault_spec} hung")
    exit_code = int(process.exitcode)
    process.close()
    return exit_code


def _cli_child(argv: Sequence[str], fault_spec: str, stdout_path: str, stderr_path: str) -> None:
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    configure_faults(fault_spec)
    if "torch" in sys.modules:  # tiny test models: more threads only contend on a busy machine
        sys.modules["torch"].set_num_threads(1)
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())  # not its default multiprocessing lock: a killed child would leak it
    from defect_studio.cli import main as cli_main

    code = cli_main(list(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(argv: Sequence[str], fault_spec: str = "", work_dir: Path | None = None, timeout: float = 120.0) -> CliResult:
    """`defect-studio ARGV` in a child process (forked from the clean forkserver, which has the CLI's
    imports loaded once), under `fault_spec`; like subprocess.run but without the interpreter start."""
    import tempfile

    folder = Path(tempfile.mkdtemp(dir=work_dir))
    out, err = folder / "stdout", folder / "stderr"
    process = _context().Process(target=_cli_child, args=(list(argv), fault_spec, str(out), str(err)))
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        raise AssertionError(f"defect-studio {' '.join(argv)} under {fault_spec!r} hung")
    result = CliResult(int(process.exitcode), out.read_text(encoding="utf-8"), err.read_text(encoding="utf-8"))
    process.close()
    shutil.rmtree(folder)
    return result


def count_fault_points(project_dir: Path, work_dir: Path, ops: Sequence[Op] = SESSION) -> list[str]:
    """Play the whole session once on a copy, recording the fault points it passes."""
    copy = work_dir / "count-project"
    if not copy.exists():
        shutil.copytree(project_dir, copy)
        points_log = work_dir / "points.log"
        assert run_child(copy, work_dir / "count-saved.log", f"count:{points_log}", ops) == 0
    return (work_dir / "points.log").read_text(encoding="utf-8").splitlines()


@dataclass
class KillOutcome:
    killed: bool  # while the project was open
    saved: int
    state_index: int  # the model index the reopened project matched
    took_over_lock: bool
    recovered_files: int


def verify_reopened(project_dir: Path, saved: int, killed: bool, ops: Sequence[Op] = SESSION,
                    label: str = "") -> KillOutcome:
    """Reopen after a kill: it opens, matches the state after `saved` ops (or one more), every file
    whole and as recorded, nothing half-written visible, the dead session's lock taken over."""
    with Project.open(project_dir) as project:
        assert not leftovers(project_dir), f"{label}: visible leftovers {leftovers(project_dir)}"
        assert not mask_files_decode(project_dir), mask_files_decode(project_dir)
        integrity = project._query("PRAGMA integrity_check")[0][0]
        assert integrity == "ok", f"{label}: database integrity {integrity}"
        observed = observe(project)
        candidates = [saved, saved + 1] if saved < len(ops) else [saved]
        state_index = next((k for k in candidates if matches(observed, model_after(ops[:k]))), None)
        assert state_index is not None, (
            f"{label}: after {saved} reported saves the project matches neither the state after "
            f"{saved} nor after {saved + 1} operations:\n{observed}\nexpected {model_after(ops[:saved])}")
        took_over = bool(project.took_over_stale_lock)
        recovered = project.recovered_files
    if killed:
        assert took_over, f"{label}: the dead session's lock was not recognised as stale"
    return KillOutcome(killed, saved, state_index, took_over, recovered)


def kill_and_verify(base_project: Path, work_dir: Path, point: int, ops: Sequence[Op] = SESSION,
                    resume: bool = True, naive: bool = False) -> KillOutcome:
    """Copy the base project, kill a session at fault point `point`, reopen and check everything;
    with `resume`, then play the rest of the session and check the end state."""
    project_dir = work_dir / f"kill-{point}" / "project"
    shutil.rmtree(project_dir.parent, ignore_errors=True)
    shutil.copytree(base_project, project_dir)
    log_path = project_dir.parent / "saved.log"
    exit_code = run_child(project_dir, log_path, f"kill:{point}", ops, naive=naive)
    killed = exit_code == -signal.SIGKILL
    assert killed or exit_code == 0, f"kill point {point}: the session failed with exit code {exit_code}"
    outcome = verify_reopened(project_dir, saved_count(log_path), killed and not closed_cleanly(log_path), ops,
                              label=f"kill point {point}")
    if resume and outcome.state_index < len(ops):  # the project is usable: the rest of the session completes
        assert run_child(project_dir, log_path, "", ops, start=outcome.state_index) == 0
        with Project.open(project_dir) as project:
            assert matches(observe(project), model_after(ops)), f"kill point {point}: resumed session differs"
    shutil.rmtree(project_dir.parent)
    return outcome


def main(argv: Sequence[str]) -> int:
    if len(argv) == 3 and argv[0] == "session":
        play_session(Path(argv[1]), Path(argv[2]))
        return 0
    print("usage: python -m tests.crash_harness session PROJECT LOG", file=sys.stderr)
    return 2


if __name__ == "__main__":  # DEFECT_STUDIO_FAULT_INJECTION, if set, applies through defect_studio.atomic
    sys.exit(main(sys.argv[1:]))
