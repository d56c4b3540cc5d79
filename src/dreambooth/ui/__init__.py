"""`dreambooth ui`: a local web app over the same library (gradio).

    workspace.py  the workspace root: every path the UI touches is checked to stay inside it;
                  upload names are sanitised; photo checks, model and run discovery
    form.py       the "advanced" settings form, generated from the TrainConfig dataclasses
    jobs.py       one training (or demo) job at a time, in a separate process, watched via files
    app.py        the gradio layout: Train, Runs and Sample tabs; `launch()`

Only app.py imports gradio, so the rest is tested without it.
"""
