"""One job at a time, in its own process, watched through files.

A job is a `dreambooth` command (train, or demo) started with `subprocess.Popen`; its output goes
to WORKSPACE/.dreambooth-ui/jobs/<id>/log.txt beside job.json (the command, the output folder, the
step count). The UI never shares memory with training: a crash ends the job, not the UI, and the
job's last error line becomes the message the UI shows. Progress comes from the files training
writes anyway (logs/metrics.jsonl, samples/step-*.png), so a reloaded page, or a restarted UI,
reattaches to a running job by reading job.json and checking that its process is alive.

Stop is graceful for training: it creates the output folder's stop file (train.STOP_FILE), which
the loop honours after the current step by writing a checkpoint; Resume reruns the same command
with --train.resume.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DreamBoothError
from ..files import atomic_write_text

STOP_FILE = "stop-requested"  # = train.STOP_FILE (not imported: that would load torch into the UI process)


@dataclass
class JobStatus:
    id: str
    kind: str  # train | demo
    state: str  # preparing | running | stopping | finished | stopped | failed
    output_dir: Path
    step: int = 0
    max_steps: int = 0
    eta_seconds: float | None = None
    message: str = ""
    metrics: list[dict] = field(default_factory=list)  # metrics.jsonl lines: step, loss, lr
    grids: list[Path] = field(default_factory=list)  # samples/step-*.png, oldest first

    @property
    def active(self) -> bool:
        return self.state in ("preparing", "running", "stopping")

    def progress_text(self) -> str:
        head = {"preparing": "preparing (loading the model, checking photos, class images)",
                "running": "training", "stopping": "stopping: writing a checkpoint after this step",
                "finished": "finished",
                "stopped": "stopped (checkpoint written; Resume continues it)" if self.kind == "train" else "stopped",
                "failed": "failed"}[self.state]
        parts = [f"{self.kind} job {self.id}: {head}"]
        if self.max_steps:
            parts.append(f"step {self.step}/{self.max_steps} ({100 * self.step / self.max_steps:.0f}%)")
        if self.eta_seconds is not None and self.state == "running":
            parts.append(f"ETA {_duration(self.eta_seconds)}")
        if self.metrics:
            parts.append(f"loss {self.metrics[-1].get('loss', float('nan')):.4f}")
        return " | ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class JobRunner:
    """Starts, watches, stops and resumes jobs; at most one runs at a time."""

    def __init__(self, state_dir: Path, cwd: Path):
        self.jobs_dir = Path(state_dir) / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.cwd = Path(cwd)
        self._lock = threading.Lock()
        self._procs: dict[str, subprocess.Popen] = {}
        self._progress: dict[str, list[tuple[float, int]]] = {}  # job -> (time, step) as first seen, for the ETA

    # ---- starting ----------------------------------------------------------------------
    def start(self, kind: str, args: list[str], output_dir: Path, max_steps: int, config_yaml: str | None = None) -> str:
        """Run `python -m dreambooth.cli ARGS` as a new job; refuse while another job runs.

        `config_yaml`: settings for `--config`, kept as the job folder's config.yaml."""
        with self._lock:
            current = self.latest()
            if current is not None and self.status(current).active:
                raise DreamBoothError(f"job {current} is still running: stop it (or wait) before starting another")
            job_id = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid() % 1000:03d}{len(os.listdir(self.jobs_dir)):03d}"
            folder = self.jobs_dir / job_id
            folder.mkdir()
            if config_yaml is not None:
                (folder / "config.yaml").write_text(config_yaml)
                args = [*args, "--config", str(folder / "config.yaml")]
            (Path(output_dir) / STOP_FILE).unlink(missing_ok=True)  # a request left over from an earlier job
            argv = [sys.executable, "-m", "dreambooth.cli", *args]
            with open(folder / "log.txt", "wb") as log:
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        cwd=self.cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                        start_new_session=True)  # a Ctrl-C in the UI's terminal leaves the job alone
            self._procs[job_id] = proc
            atomic_write_text(folder / "job.json", json.dumps({
                "kind": kind, "args": args, "output_dir": str(output_dir), "max_steps": max_steps,
                "pid": proc.pid, "started": time.time()}, indent=2))
            return job_id

    def resume(self) -> str:
        """Continue the latest training job from its checkpoint (same command, plus --train.resume)."""
        job_id = self.latest()
        if job_id is None:
            raise DreamBoothError("there is no job to resume")
        job, status = self._job(job_id), self.status(job_id)
        if job["kind"] != "train" or status.state not in ("stopped", "failed"):
            raise DreamBoothError(f"job {job_id} ({job['kind']}, {status.state}) cannot be resumed; only a stopped or "
                                  "failed training job with a checkpoint can")
        if not (Path(job["output_dir"]) / "checkpoints" / "latest.json").is_file():
            raise DreamBoothError(f"{job['output_dir']} has no checkpoint to resume from; start the run again")
        args = [a for a in job["args"] if a != "--train.resume"] + ["--train.resume"]
        return self.start("train", args, Path(job["output_dir"]), job["max_steps"])

    # ---- stopping ----------------------------------------------------------------------
    def stop(self) -> str:
        job_id = self.latest()
        if job_id is None or not self.status(job_id).active:
            return "no job is running"
        job = self._job(job_id)
        if job["kind"] == "train":
            Path(job["output_dir"]).mkdir(parents=True, exist_ok=True)
            (Path(job["output_dir"]) / STOP_FILE).touch()
            return "stop requested: training writes a checkpoint after the current step, then stops"
        (self.jobs_dir / job_id / "stop-requested").touch()
        os.killpg(job["pid"], signal.SIGTERM)  # the demo is disposable: no checkpoint to keep
        return "demo stopped"

    # ---- watching ----------------------------------------------------------------------
    def latest(self) -> str | None:
        jobs = sorted(p.name for p in self.jobs_dir.iterdir() if (p / "job.json").is_file())
        return jobs[-1] if jobs else None

    def _job(self, job_id: str) -> dict:
        return json.loads((self.jobs_dir / job_id / "job.json").read_text())

    def _alive(self, job_id: str, pid: int) -> tuple[bool, int | None]:
        """(running, exit code if known). A job started by an earlier UI process is checked by its pid."""
        proc = self._procs.get(job_id)
        if proc is not None:
            code = proc.poll()
            return code is None, code
        try:
            os.kill(pid, 0)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if Path(f"/proc/{pid}").exists() else b"dreambooth"
            return b"dreambooth" in cmdline, None
        except (ProcessLookupError, PermissionError):
            return False, None

    def status(self, job_id: str | None = None) -> JobStatus | None:
        job_id = job_id or self.latest()
        if job_id is None:
            return None
        job = self._job(job_id)
        out = Path(job["output_dir"])
        train_out = out / "model" if job["kind"] == "demo" else out  # the demo trains into OUTPUT/model
        status = JobStatus(job_id, job["kind"], "running", out, max_steps=job["max_steps"])
        status.metrics = read_metrics(train_out / "logs" / "metrics.jsonl")
        status.grids = sorted((train_out / "samples").glob("step-*.png"))
        status.step = status.metrics[-1]["step"] if status.metrics else 0
        alive, code = self._alive(job_id, job["pid"])
        log = (self.jobs_dir / job_id / "log.txt").read_bytes().decode(errors="replace")  # keeps \r
        if alive:
            status.state = "stopping" if (train_out / STOP_FILE).exists() else "running" if status.metrics else "preparing"
            status.eta_seconds = self._eta(job_id, status.step, status.max_steps)
        else:
            status.state, status.message = outcome(log, code)
            if status.state == "failed" and (self.jobs_dir / job_id / "stop-requested").exists():
                status.state, status.message = "stopped", "stopped on request"
        return status

    def _eta(self, job_id: str, step: int, max_steps: int) -> float | None:
        seen = self._progress.setdefault(job_id, [])
        if not seen or seen[-1][1] != step:
            seen.append((time.time(), step))
        if len(seen) < 2 or seen[-1][1] <= seen[0][1]:
            return None
        (t0, s0), (t1, s1) = seen[0], seen[-1]
        return (max_steps - step) * (t1 - t0) / (s1 - s0)

    def log_tail(self, job_id: str | None = None, lines: int = 30) -> str:
        job_id = job_id or self.latest()
        if job_id is None:
            return ""
        text = (self.jobs_dir / job_id / "log.txt").read_bytes().decode(errors="replace")  # keeps \r
        # a progress bar redraws its line with carriage returns: keep what each line shows last
        shown = [[part for part in line.split("\r") if part.strip()] for line in text.split("\n")[-lines - 1:]]
        return "\n".join(parts[-1] for parts in shown if parts)


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl as a list (a line being written right now is skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def outcome(log: str, code: int | None) -> tuple[str, str]:
    """(state, message) of an ended job, from its output and exit code.

    The CLI ends a successful run with its summary ('trained N steps ...', 'stopped on request ...'),
    and a failure with 'error: ...' (a DreamBoothError) or a traceback whose last line names the
    exception; a process killed by a signal leaves neither.
    """
    lines = [line.rstrip() for line in log.replace("\r", "\n").splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    if code not in (None, 0) or errors:
        if errors:  # a DreamBoothError may span lines (one per bad photo): keep them all
            return "failed", "\n".join(lines[errors[-1]:])[len("error: "):]
        if "Traceback (most recent call last):" in lines:
            return "failed", lines[-1]
        if code is not None and code < 0:
            return "failed", f"the job was killed by signal {-code} ({signal.Signals(-code).name})"
        return "failed", f"the job ended with exit code {code}" + (f": {lines[-1]}" if lines else "")
    lines = [line.strip() for line in lines]
    stopped = [line for line in lines if line.startswith("stopped on request")]
    if stopped:
        return "stopped", stopped[-1]
    done = [line for line in lines if line.startswith("trained ")]
    if done:
        return "finished", done[-1]
    return ("finished", "") if code == 0 else ("failed", "the job ended without a result (see its log)")
