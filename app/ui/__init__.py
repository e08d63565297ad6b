"""The Gradio web app (the only place gradio is imported)."""
