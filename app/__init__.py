"""LoRA Studio front-ends: the `lorastudio` command line and the Gradio web app (the only place gradio is used)."""
