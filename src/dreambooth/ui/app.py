"""The gradio app: Train, Runs and Sample tabs over one workspace folder.

    dreambooth ui                       # http://127.0.0.1:7860, workspace = the current folder
    dreambooth ui --root ~/dreambooth --port 8000
    dreambooth ui --host 0.0.0.0        # reachable from the network: prints a token to log in with

Every handler takes what the browser sends as untrusted: paths go through `Workspace.resolve`,
run and model choices are checked against what the server itself lists, uploads are renamed by
`sanitize_filename`. Images are handed to gradio as decoded pictures, never as file paths, so the
browser cannot ask for a file by name.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import sys
import time
from pathlib import Path

from ..config import SAMPLERS, build_config, dotted_to_nested
from ..errors import DreamBoothError
from ..presets import TRAIN_PRESETS
from .form import PATH_FIELDS, FieldSpec, advanced_fields, overrides, sections
from .jobs import JobRunner, JobStatus, read_metrics
from .workspace import BUNDLED_MODELS, Workspace, check_photos, save_uploads

NO_PRESET = "(none)"
STATE_DIR = ".dreambooth-ui"


# ---- the logic behind the buttons (plain functions, no gradio) ------------------------------

def train_settings(ws: Workspace, model: str, preset: str, instance_prompt: str, identifier: str, class_prompt: str,
                   photos_dir: str, run_dir: str, advanced: dict) -> dict:
    """The user's settings as dotted keys, every path checked to stay inside the workspace."""
    settings = {
        "model.path": ws.model_path(model),
        "concept.instance_dir": str(ws.resolve(photos_dir, "photos folder")),
        "concept.instance_prompt": instance_prompt.strip(),
        "train.output_dir": str(ws.resolve(run_dir, "run folder")),
    }
    if preset and preset != NO_PRESET:
        settings["preset"] = preset
    if identifier.strip():
        settings["concept.identifier"] = identifier.strip()
    if class_prompt.strip():
        settings["concept.class_prompt"] = class_prompt.strip()
        settings["prior.enabled"] = True  # a class prompt is only used with prior preservation
    for key in PATH_FIELDS:
        if advanced.get(key):
            advanced[key] = str(ws.resolve(advanced[key], key))
    return {**settings, **advanced}


def start_training(ws: Workspace, runner: JobRunner, settings: dict) -> str:
    """Check the settings and every photo, then start the job; raise DreamBoothError with all problems."""
    from ..plan import preflight

    layer = dotted_to_nested(settings)
    cfg = build_config(layer)
    preflight(cfg)  # train's own checks (settings, packages, model folder, family, resolution) before the job starts
    out = Path(cfg.train.output_dir)
    if (out / "checkpoints" / "latest.json").is_file():
        raise DreamBoothError(f"{ws.relative(out)} already holds a run: choose another run folder, or press Resume "
                              "(after a stop) to continue it")
    check = check_photos(Path(cfg.concept.instance_dir), cfg.data.min_image_size)
    if not check.ok:
        problems = [p.replace(f"{cfg.concept.instance_dir}{os.sep}", "") for p in check.problems]
        raise DreamBoothError("the photos are not ready:\n" + "\n".join(f"- {p}" for p in problems or
                                                                          ["no photos yet: add some first"]))
    import yaml

    config = yaml.safe_dump(layer, sort_keys=False)
    runner.start("train", ["train"], out, cfg.train.max_steps, config_yaml=config)
    return f"started: {cfg.train.max_steps} steps into {ws.relative(out)}"


def start_demo(ws: Workspace, runner: JobRunner, steps: int) -> str:
    out = ws.resolve(time.strftime("runs/demo-%Y%m%d-%H%M%S"), "demo folder")
    runner.start("demo", ["demo", "--output-dir", str(out), "--steps", str(int(steps)), "--n", "8"], out, int(steps))
    return f"demo started: the bundled miniature model learns a new subject in {int(steps)} steps, into {ws.relative(out)}"


def checked_run(ws: Workspace, run: str) -> Path:
    """A run the server itself lists; anything else the browser sends is refused."""
    if run not in ws.find_runs():
        raise DreamBoothError(f"{run!r} is not a run in this workspace")
    return ws.resolve(run, "run")


def read_run(ws: Workspace, run: str) -> dict:
    folder = checked_run(ws, run)
    card = folder / "README.md"
    return {"config": (folder / "config.yaml").read_text(), "card": card_for_display(card.read_text()) if card.is_file() else "",
            "grids": sorted((folder / "samples").glob("step-*.png")),
            "metrics": read_metrics(folder / "logs" / "metrics.jsonl")}


def card_for_display(card: str) -> str:
    """A model card as the Hub shows it: the YAML front matter (`---` ... `---`) as a small table above the
    text, not as Markdown (which reads the closing `---` as a heading's underline)."""
    import yaml

    lines = card.splitlines()
    if not lines or lines[0].strip() != "---" or "---" not in (line.strip() for line in lines[1:]):
        return card
    end = next(i for i, line in enumerate(lines[1:], 1) if line.strip() == "---")
    body = "\n".join(lines[end + 1:]).lstrip("\n")
    try:
        meta = yaml.safe_load("\n".join(lines[1:end])) or {}
    except yaml.YAMLError:
        return body
    if not isinstance(meta, dict):
        return body
    rows = [f"| {key} | {', '.join(map(str, value)) if isinstance(value, list) else value} |" for key, value in meta.items()]
    return "\n".join(["| card | |", "|---|---|", *(row.replace("\n", " ") for row in rows), "", body])


def sample(ws: Workspace, run: str, prompt: str, negative: str, seed: int, scheduler: str, steps: int,
           guidance: float, count: int):
    """Render `count` images from a run (full or LoRA); saved under RUN/generated/ too."""
    import yaml

    from ..sampling import generate, image_grid, load_trained_pipeline

    folder = checked_run(ws, run)
    if scheduler not in SAMPLERS:
        raise DreamBoothError(f"unknown scheduler {scheduler!r}")
    config = yaml.safe_load((folder / "config.yaml").read_text())
    base = None
    if (folder / "pytorch_lora_weights.safetensors").is_file():  # its base must be a model the UI may read
        base = config["model"]["path"]
        from ..miniworld.evaluate import BASES

        if Path(base).resolve() not in {Path(p).resolve() for p in BASES.values()}:
            base = ws.model_path(base)
    device = _device()
    pipe = load_trained_pipeline(folder, base=base, scheduler=scheduler, device=device)
    resolution = config.get("data", {}).get("resolution")
    count, seed = max(1, int(count)), int(seed)
    images = generate(pipe, [prompt] * count, [seed + i for i in range(count)], num_inference_steps=int(steps),
                      guidance_scale=float(guidance), negative_prompt=negative or None, height=resolution,
                      width=resolution, batch_size=4)
    out = folder / "generated"
    out.mkdir(exist_ok=True)
    image_grid(images).save(out / f"ui-{scheduler}-{int(steps)}-seed{seed}-grid.png")
    return images


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _open(path: Path, min_height: int = 256):
    """A PNG as a picture for gradio; small ones (tiny models' grids) scaled up, pixels kept sharp."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
    if im.height < min_height:
        scale = -(-min_height // im.height)
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    return im


def metrics_frames(metrics: list[dict]):
    import pandas as pd

    frame = pd.DataFrame([{"step": m["step"], "loss": m.get("loss"), "lr": m.get("lr")} for m in metrics],
                         columns=["step", "loss", "lr"]).astype({"step": int, "loss": float, "lr": float})
    return frame[["step", "loss"]], frame[["step", "lr"]]


# ---- layout --------------------------------------------------------------------------------

def _field_input(gr, spec: FieldSpec):
    label = f"{spec.key}  ({spec.type_name})"
    info = f"{spec.help} Default: {spec.display_default() if spec.kind != 'optional_bool' else 'auto'}."
    elem_id = "cfg-" + spec.key.replace(".", "-").replace("_", "-")
    if spec.kind == "bool":
        return gr.Checkbox(value=spec.display_default(), label=label, info=info, elem_id=elem_id)
    if spec.kind in ("optional_bool", "choice"):
        return gr.Dropdown(choices=list(spec.choices), value=spec.display_default(), label=label, info=info,
                           elem_id=elem_id)
    return gr.Textbox(value=spec.display_default(), label=label, info=info, elem_id=elem_id,
                      lines=3 if spec.kind == "list" else 1, max_lines=20 if spec.kind == "list" else 1,
                      placeholder="one per line" if spec.kind == "list" else ("null" if spec.default is None else None))


def build_app(ws: Workspace, runner: JobRunner):
    import gradio as gr

    specs = advanced_fields()
    uploads = Path(os.environ.get("GRADIO_TEMP_DIR", ws.root / STATE_DIR / "uploads")).resolve()

    def fail(exc: Exception) -> str:
        return f"⚠ {exc}"

    def model_choices():
        return list(BUNDLED_MODELS) + ws.find_models()

    with gr.Blocks(title="DreamBooth", analytics_enabled=False) as app:
        gr.Markdown(f"## DreamBooth\nWorkspace: `{ws.root}` (every path below is relative to it)")
        with gr.Tab("Train"):
            with gr.Row():
                with gr.Column(scale=1):  # left: what to train
                    with gr.Row():
                        model = gr.Dropdown(choices=model_choices(), value=None, allow_custom_value=True,
                                            label="Base model", elem_id="model",
                                            info="A diffusers folder or a single .safetensors file in the workspace")
                        preset = gr.Dropdown(choices=[NO_PRESET, *TRAIN_PRESETS], value=NO_PRESET, label="Preset",
                                             info="Starting values; settings changed below override them",
                                             elem_id="preset")
                    instance_prompt = gr.Textbox(label="Instance prompt", value="a photo of sks dog",
                                                 info="The rare identifier and the class noun", elem_id="instance-prompt")
                    with gr.Row():
                        identifier = gr.Textbox(label="Identifier", placeholder="default: the word before the class noun",
                                                elem_id="identifier")
                        class_prompt = gr.Textbox(label="Class prompt (turns on prior preservation)",
                                                  placeholder="e.g. a photo of a dog", elem_id="class-prompt")
                    with gr.Row():
                        photos_dir = gr.Textbox(label="Photos folder", value="datasets/subject", elem_id="photos-dir",
                                                info="Dropped photos are copied here; or name a folder that holds them")
                        run_dir = gr.Textbox(label="Run folder", value=time.strftime("runs/run-%Y%m%d-%H%M%S"),
                                             elem_id="run-dir", info="Model, checkpoints, grids and logs go here")
                    upload = gr.File(label="Drop photos here", file_count="multiple", elem_id="upload", height=120)
                    upload_message = gr.Textbox(label="Upload", interactive=False, elem_id="upload-message", lines=1)
                    check_button = gr.Button("Check photos", elem_id="check", size="sm")
                    check_message = gr.Textbox(label="Dataset check", interactive=False, elem_id="check-message",
                                               lines=2)
                    photo_gallery = gr.Gallery(label="Photos", columns=8, height=110, elem_id="photos")
                    with gr.Accordion("Advanced settings: every setting of `dreambooth train`", open=False,
                                      elem_id="advanced"):
                        inputs = []
                        for section, group in sections(specs).items():
                            with gr.Accordion(section, open=False, elem_id=f"section-{section}"):
                                inputs += [_field_input(gr, spec) for spec in group]
                with gr.Column(scale=1):  # right: the job
                    with gr.Row():
                        start_button = gr.Button("Start", variant="primary", elem_id="start")
                        stop_button = gr.Button("Stop", elem_id="stop")
                        resume_button = gr.Button("Resume", elem_id="resume")
                    progress = gr.Textbox(label="Progress", interactive=False, elem_id="progress")
                    message = gr.Textbox(label="Message", interactive=False, lines=2, max_lines=12, elem_id="message")
                    with gr.Row():
                        loss_plot = gr.LinePlot(x="step", y="loss", title="loss", elem_id="loss-plot", height=200)
                        lr_plot = gr.LinePlot(x="step", y="lr", title="learning rate", elem_id="lr-plot", height=200,
                                              y_axis_format=".1e")
                    latest_grid = gr.Image(label="Latest validation grid", interactive=False, elem_id="latest-grid",
                                           height=220)
                    grids = gr.Gallery(label="Validation grids", columns=6, height=120, elem_id="grids")
                    log_box = gr.Textbox(label="Log (last lines)", interactive=False, lines=4, max_lines=4,
                                         elem_id="log")
                    with gr.Row():
                        demo_button = gr.Button("Demo: no model needed", elem_id="demo")
                        demo_steps = gr.Number(value=800, precision=0, label="Demo steps", elem_id="demo-steps")
            shown = gr.State({"job": None, "state": None, "grids": -1, "metrics": -1})  # what this page shows

        with gr.Tab("Runs", elem_id="runs-tab") as runs_tab:
            refresh_runs = gr.Button("Refresh", elem_id="refresh-runs")
            with gr.Row():
                panels = []
                for side in ("a", "b"):
                    with gr.Column():
                        run = gr.Dropdown(choices=ws.find_runs(), label=f"Run {side.upper()}", elem_id=f"run-{side}")
                        grid = gr.Image(label="Last grid", interactive=False, elem_id=f"run-{side}-grid", height=260)
                        gallery = gr.Gallery(label="All grids", columns=4, height=160)
                        plot = gr.LinePlot(x="step", y="loss", title="loss", height=180)
                        card = gr.Markdown(elem_id=f"run-{side}-card")
                        config = gr.Code(language="yaml", label="config.yaml", interactive=False)
                        panels.append((run, grid, gallery, plot, card, config))

        with gr.Tab("Sample", elem_id="sample-tab") as sample_tab:
            with gr.Row():
                sample_run = gr.Dropdown(choices=ws.find_runs(), label="Run", elem_id="sample-run")
                scheduler = gr.Dropdown(choices=list(SAMPLERS), value="dpm++", label="Scheduler", elem_id="scheduler")
            sample_prompt = gr.Textbox(label="Prompt", value="a photo of sks dog", elem_id="sample-prompt")
            negative = gr.Textbox(label="Negative prompt", elem_id="negative")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                steps = gr.Number(value=25, precision=0, label="Steps", elem_id="steps")
                guidance = gr.Number(value=7.5, label="Guidance", elem_id="guidance")
                count = gr.Number(value=4, precision=0, label="Images", elem_id="count")
            render_button = gr.Button("Render", variant="primary", elem_id="render")
            sample_message = gr.Textbox(label="Message", interactive=False, elem_id="sample-message")
            samples = gr.Gallery(label="Images", columns=4, elem_id="samples")

        # ---- Train tab events ----
        def on_upload(files, folder, *adv):
            if not files:
                return gr.update(), gr.update(), gr.update(), gr.update()
            try:
                target = ws.resolve(folder, "photos folder")
                if any(uploads not in Path(f).resolve().parents for f in files):  # only what was uploaded
                    raise DreamBoothError("only files uploaded through this page can be added")
                # the base name gradio kept (the browser's file name) is sanitised again before use
                report = save_uploads([(Path(f).name, Path(f)) for f in files], target)
                for f in map(Path, files):  # gradio's copy in the upload cache: the photos folder has ours
                    if uploads in f.resolve().parents:
                        f.unlink(missing_ok=True)
                        _remove_if_empty(f.parent)
                # the drop zone is emptied again: the files now live in the photos folder
                return (None, report.message(), *check_text(target, overrides(specs, list(adv))))
            except DreamBoothError as exc:
                return None, fail(exc), gr.update(), gr.update()

        def check_text(folder: Path, changed: dict):
            check = check_photos(folder, _min_size(changed))
            head = f"{len(check.good)} photo(s) ready in {ws.relative(folder)}" if folder.is_dir() else ""
            lines = [head] + [f"✗ {p}".replace(f"{folder}{os.sep}", "") for p in check.problems]
            return "\n".join(line for line in lines if line), [(_open(p, 0), p.name) for p in check.good]

        def on_check(folder, *adv):
            try:
                return check_text(ws.resolve(folder, "photos folder"), overrides(specs, list(adv)))
            except DreamBoothError as exc:
                return fail(exc), []

        def on_start(model_v, preset_v, prompt_v, ident_v, class_v, photos_v, run_v, *adv):
            try:
                settings = train_settings(ws, model_v or "", preset_v, prompt_v, ident_v, class_v, photos_v, run_v,
                                          overrides(specs, list(adv)))
                return start_training(ws, runner, settings)
            except DreamBoothError as exc:
                return fail(exc)

        def on_resume():
            try:
                runner.resume()
                return "resuming from the last checkpoint"
            except DreamBoothError as exc:
                return fail(exc)

        def on_demo(n):
            try:
                return start_demo(ws, runner, n or 800)
            except DreamBoothError as exc:
                return fail(exc)

        def refresh(state):
            status: JobStatus | None = runner.status()
            if status is None:
                return (state, "no job yet: start one, or press Demo", gr.update(), gr.update(), gr.update(),
                        gr.update(), gr.update(), "")
            new = dict(state)
            # the job's outcome goes to the message box once, when it ends (or on a new page)
            ended = not status.active and (state["job"], state.get("state")) != (status.id, status.state)
            out = [status.progress_text(), status.message if ended else gr.update()]
            if (state["job"], state["metrics"]) != (status.id, len(status.metrics)):
                loss, lr = metrics_frames(status.metrics)
                out += [loss, lr]
            else:
                out += [gr.update(), gr.update()]
            if (state["job"], state["grids"]) != (status.id, len(status.grids)):  # a new grid, or another job
                out += [_open(status.grids[-1]) if status.grids else None, [(_open(p), p.stem) for p in status.grids]]
            else:
                out += [gr.update(), gr.update()]
            new.update(job=status.id, state=status.state, grids=len(status.grids), metrics=len(status.metrics))
            return (new, *out, runner.log_tail(lines=8))

        refresh_outputs = [shown, progress, message, loss_plot, lr_plot, latest_grid, grids, log_box]
        upload.upload(on_upload, [upload, photos_dir, *inputs], [upload, upload_message, check_message, photo_gallery])
        check_button.click(on_check, [photos_dir, *inputs], [check_message, photo_gallery])
        start_button.click(on_start, [model, preset, instance_prompt, identifier, class_prompt, photos_dir, run_dir,
                                      *inputs], message)
        stop_button.click(lambda: runner.stop(), None, message)
        resume_button.click(on_resume, None, message)
        demo_button.click(on_demo, demo_steps, message)
        timer = gr.Timer(1.0)
        timer.tick(refresh, shown, refresh_outputs, show_progress="hidden")
        def on_load(state):  # one event, so the page is ready at once: a reloaded page reattaches to the job
            return (*refresh(state), gr.update(choices=model_choices()), time.strftime("runs/run-%Y%m%d-%H%M%S"))

        app.load(on_load, shown, [*refresh_outputs, model, run_dir])

        # ---- Runs tab ----
        def show_run(run):
            if not run:
                return gr.update(), [], None, "", ""
            try:
                info = read_run(ws, run)
            except DreamBoothError as exc:
                return None, [], None, fail(exc), ""
            loss, _ = metrics_frames(info["metrics"])
            last = _open(info["grids"][-1]) if info["grids"] else None
            return last, [(_open(p), p.stem) for p in info["grids"]], loss, info["card"], info["config"]

        for run, grid, gallery, plot, card, config in panels:
            run.change(show_run, run, [grid, gallery, plot, card, config])

        def list_runs():
            choices = ws.find_runs()
            return [gr.update(choices=choices) for _ in range(3)]

        refresh_runs.click(list_runs, None, [panels[0][0], panels[1][0], sample_run])
        for event in (app.load, runs_tab.select, sample_tab.select):  # runs finished since are listed too
            event(list_runs, None, [panels[0][0], panels[1][0], sample_run])

        # ---- Sample tab ----
        def on_render(run, prompt, neg, seed_v, sched, steps_v, guid, n):
            try:
                images = sample(ws, run or "", prompt, neg, seed_v or 0, sched, steps_v or 25, guid or 7.5, n or 1)
                return f"{len(images)} image(s) rendered from {run} ({sched}, {int(steps_v)} steps)", images
            except DreamBoothError as exc:
                return fail(exc), []

        render_button.click(on_render, [sample_run, sample_prompt, negative, seed, scheduler, steps, guidance, count],
                            [sample_message, samples])
    return app


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _min_size(changed: dict) -> int:
    """data.min_size as the check applies it (the advanced form's value, else resolution / 2)."""
    cfg = build_config(dotted_to_nested({k: v for k, v in changed.items() if k.startswith("data.")}))
    return cfg.data.min_image_size


# ---- start-up ------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def access(host: str, token: str | None):
    """(gradio auth check, token): none on a loopback address; elsewhere a token is required (one is made if
    neither --token nor $DREAMBOOTH_UI_TOKEN gives it)."""
    if is_loopback(host):
        return None, None
    token = token or os.environ.get("DREAMBOOTH_UI_TOKEN") or secrets.token_urlsafe(16)
    return (lambda _user, password: secrets.compare_digest(password.encode(), token.encode())), token


def launch(root: str | Path = ".", host: str = "127.0.0.1", port: int = 7860, token: str | None = None,
           block: bool = True):
    """Start the app; only a loopback address may go without a token. Returns (app, url)."""
    ws = Workspace(root)
    state = ws.root / STATE_DIR
    state.mkdir(exist_ok=True)
    # Before gradio is imported: no usage statistics, and its upload cache inside the workspace.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("GRADIO_TEMP_DIR", str(state / "uploads"))
    import gradio as gr

    auth, token = access(host, token)
    runner = JobRunner(state, cwd=ws.root)
    app = build_app(ws, runner)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    app.queue(default_concurrency_limit=4)
    _, url, _ = app.launch(server_name=host, server_port=port, share=False, auth=auth, prevent_thread_lock=True,
                           quiet=True, footer_links=[], theme=theme, inbrowser=False, show_error=True,
                           ssr_mode=False, mcp_server=False, pwa=False, enable_monitoring=False)
    print(f"dreambooth ui: {url} (workspace {ws.root})", flush=True)
    if auth is not None:
        print(f"listening on {host}: log in with any user name and the token {token}", flush=True)
    if block:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopped; a running job keeps running and the next `dreambooth ui` reattaches to it",
                  file=sys.stderr)
        finally:
            app.close()
    return app, url
