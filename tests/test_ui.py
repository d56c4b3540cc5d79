"""The web UI's parts without a browser: the workspace guard, upload names, the generated form,
the job runner (a crash becomes a message), and the training loop's graceful stop."""

import os
import time
from pathlib import Path

import pytest

from dreambooth.config import TrainConfig, build_config, dotted_to_nested, iter_fields
from dreambooth.errors import DreamBoothError
from dreambooth.tiny import write_photos
from dreambooth.ui.form import AUTO, MAIN_FORM, NOT_OFFERED, advanced_fields, overrides, sections
from dreambooth.ui.jobs import STOP_FILE, JobRunner, outcome
from dreambooth.ui.workspace import Workspace, check_photos, sanitize_filename, save_uploads


# ---- workspace guard and uploads -------------------------------------------------------------

@pytest.mark.parametrize("name, safe", [
    ("../../etc/passwd", "passwd"), ("..\\..\\windows\\win.ini", "win.ini"), ("C:\\photos\\my dog.JPG", "my_dog.JPG"),
    ("..", "upload"), (".bashrc", "bashrc"), ("a/b/../c.png", "c.png"), ("ok-name_1.png", "ok-name_1.png"),
    ("pho\u0301to 1.png", "ph_to_1.png"), ("\x00evil.png", "evil.png"), ("", "upload"),
])
def test_sanitize_filename(name, safe):
    assert sanitize_filename(name) == safe


def test_workspace_keeps_paths_inside(tmp_path):
    root = tmp_path / "ws"
    (root / "data").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    os.symlink(tmp_path / "secret", root / "link")
    ws = Workspace(root)
    assert ws.resolve("data") == root / "data"
    assert ws.resolve(str(root / "data" / "new")) == root / "data" / "new"  # absolute, but inside
    for bad in ["../secret", "data/../../secret", str(tmp_path / "secret"), "/etc/passwd", "link", "link/x", "~"]:
        with pytest.raises(DreamBoothError, match="outside the workspace"):
            ws.resolve(bad)
    with pytest.raises(DreamBoothError, match="empty"):
        ws.resolve("  ")


def test_model_choices_refuse_pickles_and_outside(tmp_path, tiny_sd_dir):
    import shutil

    root = tmp_path / "ws"
    shutil.copytree(tiny_sd_dir, root / "models" / "tiny")
    (root / "models" / "old.ckpt").write_bytes(b"pickle")
    (root / "models" / "single.safetensors").write_bytes(b"x")
    ws = Workspace(root)
    assert ws.find_models() == ["models/single.safetensors", "models/tiny"]
    assert ws.model_path("models/tiny") == str(root / "models" / "tiny")
    with pytest.raises(DreamBoothError, match="pickle"):
        ws.model_path("models/old.ckpt")
    with pytest.raises(DreamBoothError, match="outside"):
        ws.model_path(str(tiny_sd_dir))


def test_uploads_are_renamed_filtered_and_never_overwrite(tmp_path):
    src = tmp_path / "src"
    good = write_photos(src, 2)
    (src / "passwd").write_text("root:x:0:0")
    folder = tmp_path / "ws" / "photos"
    report = save_uploads([("../../etc/passwd", src / "passwd"), ("../../up.png", good[0]), ("up.png", good[1])], folder)
    assert sorted(p.name for p in folder.iterdir()) == ["up-1.png", "up.png"]
    assert len(report.refused) == 1 and "passwd" in report.refused[0] and "not an image file" in report.refused[0]
    assert "refused '../../etc/passwd'" in report.message()
    assert not (tmp_path / "etc").exists() and not (tmp_path / "up.png").exists()


def test_check_photos_lists_every_problem(tmp_path):
    folder = tmp_path / "photos"
    write_photos(folder, 3)
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "also-broken.jpg").write_bytes(b"")
    check = check_photos(folder, min_size=16)
    assert len(check.good) == 3 and not check.ok
    assert len(check.problems) == 2 and any("broken.png" in p for p in check.problems)
    assert sum("smaller than the minimum" in p for p in check_photos(folder, min_size=100).problems) == 3
    assert not check_photos(tmp_path / "missing", 16).ok


def test_only_loopback_goes_without_a_token(monkeypatch):
    from dreambooth.ui.app import access

    monkeypatch.delenv("DREAMBOOTH_UI_TOKEN", raising=False)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert access(host, None) == (None, None)
    check, token = access("0.0.0.0", None)
    assert len(token) >= 16 and check("anyone", token) and not check("anyone", "guess")
    check, token = access("192.168.1.5", "s3cret")
    assert token == "s3cret" and check("u", "s3cret") and not check("u", "")
    monkeypatch.setenv("DREAMBOOTH_UI_TOKEN", "from-env")
    assert access("0.0.0.0", None)[1] == "from-env"


# ---- the form generated from the dataclasses ---------------------------------------------------

def test_form_has_every_config_field_with_type_default_and_help():
    specs = advanced_fields()
    offered = {s.key for s in specs}
    every = {key for key, *_ in iter_fields(TrainConfig)}
    assert offered == every - set(MAIN_FORM) - set(NOT_OFFERED)
    assert all(s.help and s.type_name for s in specs)
    by_key = {s.key: s for s in specs}
    assert by_key["optim.lr"].kind == "text" and by_key["optim.lr"].display_default() == "5e-06"
    assert by_key["train.method"].kind == "choice" and by_key["train.method"].choices == ("full", "lora")
    assert by_key["prior.enabled"].kind == "bool"
    assert by_key["memory.cache_latents"].kind == "optional_bool" and by_key["memory.cache_latents"].display_default() == AUTO
    assert by_key["validation.prompts"].kind == "list"
    assert list(sections(specs))[:3] == ["model", "concept", "data"]  # config.py's order


def test_form_values_become_settings_only_where_changed():
    specs = advanced_fields()
    values = [s.display_default() for s in specs]
    assert overrides(specs, values) == {}
    changed = {"optim.lr": "1e-4", "train.method": "lora", "prior.enabled": True, "memory.cache_latents": "false",
               "validation.prompts": "a sks dog\n\n a sks dog in snow ", "optim.max_grad_norm": "null",
               "data.min_size": "16"}
    index = {s.key: i for i, s in enumerate(specs)}
    for key, value in changed.items():
        values[index[key]] = value
    got = overrides(specs, values)
    assert got == {"optim.lr": "1e-4", "train.method": "lora", "prior.enabled": True, "memory.cache_latents": False,
                   "validation.prompts": ["a sks dog", "a sks dog in snow"], "optim.max_grad_norm": None,
                   "data.min_size": "16"}
    cfg = build_config(dotted_to_nested(got))  # the config's own conversion and checks apply
    assert cfg.optim.lr == 1e-4 and cfg.data.min_size == 16 and cfg.optim.max_grad_norm is None
    # a preset's value stays in force for a field left at its default
    assert build_config(dotted_to_nested({"preset": "face", **got})).optim.lr == 1e-4
    assert build_config(dotted_to_nested({"preset": "face"})).train.max_steps == 1000


# ---- jobs -------------------------------------------------------------------------------------

def test_outcome_reads_how_a_job_ended():
    assert outcome("training...\ntrained 4 steps (10 trainable parameters) in 1 s; model written to x\n", 0) == \
        ("finished", "trained 4 steps (10 trainable parameters) in 1 s; model written to x")
    assert outcome("stopped on request after step 3; checkpoint written\n", 0)[0] == "stopped"
    assert outcome("error: 1 of 4 images cannot be used; fix them:\n  - a.png: not an image\n", 2) == \
        ("failed", "1 of 4 images cannot be used; fix them:\n  - a.png: not an image")
    tb = "Traceback (most recent call last):\n  File \"x\", line 1\nRuntimeError: CUDA out of memory\n"
    assert outcome(tb, 1) == ("failed", "RuntimeError: CUDA out of memory")
    assert outcome("step 3\r", -9) == ("failed", "the job was killed by signal 9 (SIGKILL)")


def test_a_crashing_job_becomes_a_message_and_one_job_runs_at_a_time(tmp_path):
    runner = JobRunner(tmp_path / "state", cwd=tmp_path)
    out = tmp_path / "run"
    # a real `dreambooth train` that fails on its input (after the imports, so it runs for a few seconds)
    args = ["train", "--model.path", str(tmp_path / "no-model"), "--concept.instance_dir", str(tmp_path),
            "--concept.instance_prompt", "a photo of sks dog", "--train.output_dir", str(out)]
    job = runner.start("train", args, out, 10)
    with pytest.raises(DreamBoothError, match="still running"):
        runner.start("train", args, out, 10)
    deadline = time.time() + 60
    while runner.status().active and time.time() < deadline:
        time.sleep(0.2)
    status = runner.status()
    assert status.id == job and status.state == "failed" and "no-model" in status.message
    # a new UI process (a restart) finds the same job and outcome from its files
    again = JobRunner(tmp_path / "state", cwd=tmp_path).status()
    assert (again.id, again.state, again.message) == (job, "failed", status.message)
    with pytest.raises(DreamBoothError, match="no checkpoint"):
        runner.resume()


def test_a_killed_job_is_reported(tmp_path):
    runner = JobRunner(tmp_path / "state", cwd=tmp_path)
    runner.start("train", ["train", "--help"], tmp_path / "run", 1)  # any command: killed below
    proc = next(iter(runner._procs.values()))
    proc.kill()
    proc.wait()
    status = runner.status()
    assert status.state == "failed" and "signal 9" in status.message


def test_demo_button_runs_the_demo_command_and_stop_ends_it(tmp_path):
    import json

    from dreambooth.ui.app import start_demo

    ws = Workspace(tmp_path)
    runner = JobRunner(tmp_path / ".dreambooth-ui", cwd=tmp_path)
    assert "30 steps" in start_demo(ws, runner, 30)
    job = json.loads((runner.jobs_dir / runner.latest() / "job.json").read_text())
    out = job["output_dir"]
    assert job["args"] == ["demo", "--output-dir", out, "--steps", "30", "--n", "8"] and job["max_steps"] == 30
    assert Path(out).parent == tmp_path / "runs"
    assert runner.stop() == "demo stopped"
    runner._procs[runner.latest()].wait(timeout=30)
    assert (runner.status().state, runner.status().message) == ("stopped", "stopped on request")


# ---- the training loop's graceful stop (what the Stop button asks for) ------------------------

def test_stop_file_checkpoints_and_resume_finishes(tiny_sd_dir, photos, tmp_path):
    from dreambooth.train import STOP_FILE as TRAIN_STOP_FILE
    from dreambooth.train import train

    assert STOP_FILE == TRAIN_STOP_FILE
    out = tmp_path / "out"
    settings = {"model.path": str(tiny_sd_dir), "concept.instance_dir": str(photos),
                "concept.instance_prompt": "a photo of sks dog", "data.resolution": 32, "data.min_size": 16,
                "train.max_steps": 4, "train.output_dir": str(out)}
    out.mkdir()
    (out / TRAIN_STOP_FILE).touch()  # asked to stop before the first step ends
    result = train(build_config(dotted_to_nested(settings)))
    assert result.stopped and result.steps == 1
    assert not (out / TRAIN_STOP_FILE).exists() and (out / "checkpoints" / "step-000001").is_dir()
    assert not (out / "model_index.json").exists()  # not exported: the run is unfinished
    result = train(build_config(dotted_to_nested({**settings, "train.resume": True})))
    assert not result.stopped and result.steps == 4 and (out / "model_index.json").is_file()


def test_log_tail_shows_a_progress_bar_once(tmp_path):
    runner = JobRunner(tmp_path, cwd=tmp_path)
    (runner.jobs_dir / "j").mkdir()
    (runner.jobs_dir / "j" / "log.txt").write_bytes(b"loading\n\rtraining 1/3\rtraining 2/3\r     \n")
    assert runner.log_tail("j") == "loading\ntraining 2/3"


def test_sample_tab_renders_a_lora_run_and_refuses_a_base_outside(tiny_sd_dir, photos, tmp_path):
    import shutil

    import yaml

    from dreambooth.train import train
    from dreambooth.ui.app import sample

    root = tmp_path / "ws"
    shutil.copytree(tiny_sd_dir, root / "models" / "tiny")
    out = root / "runs" / "lora"
    train(build_config(dotted_to_nested({
        "model.path": str(root / "models" / "tiny"), "concept.instance_dir": str(photos),
        "concept.instance_prompt": "a photo of sks dog", "data.resolution": 32, "data.min_size": 16,
        "train.max_steps": 1, "train.method": "lora", "train.output_dir": str(out)})))
    ws = Workspace(root)
    assert ws.find_runs() == ["runs/lora"]
    images = sample(ws, "runs/lora", "a photo of sks dog", "", 0, "euler", 2, 7.5, 2)
    assert len(images) == 2 and images[0].size == (32, 32)
    assert len(list((out / "generated").glob("ui-euler-2-seed0-grid.png"))) == 1
    with pytest.raises(DreamBoothError, match="not a run"):
        sample(ws, "../ws/runs/lora", "x", "", 0, "euler", 2, 7.5, 1)
    config = yaml.safe_load((out / "config.yaml").read_text())
    config["model"]["path"] = str(tiny_sd_dir)  # a LoRA whose base lies outside the workspace
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(DreamBoothError, match="outside the workspace"):
        sample(ws, "runs/lora", "x", "", 0, "euler", 2, 7.5, 1)
