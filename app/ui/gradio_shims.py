"""Two workarounds for gradio's launch path, each a context manager that leaves gradio as it was when its layout
differs from the one it was written for: skip the server apps gradio builds before ``launch()`` (start-up time),
and let gradio's probe of our own local server wait for a busy machine."""

from __future__ import annotations

import contextlib

import gradio as gr


@contextlib.contextmanager
def server_app_deferred():
    """Skip the FastAPI apps gradio builds before `launch()`.

    gradio builds a whole server app when a Blocks is created, when its `with` block ends and in `queue()`, and
    then again in `launch()`. Only the last one is served. Each of the earlier ones costs about 0.4 s on a 2-core
    machine (route signatures, pydantic models, the page config), which is a fifth of the app's own start-up.
    """
    routes = getattr(gr, "routes", None)
    real = getattr(routes, "App", None) and routes.App.__dict__.get("create_app")
    if not isinstance(real, staticmethod):  # another gradio layout: leave it alone
        yield
        return
    routes.App.create_app = staticmethod(lambda *args, **kwargs: None)
    try:
        yield
    finally:
        routes.App.create_app = real


#: How long launch() lets our own just-started server take to answer gradio's "is localhost reachable" probe.
LOCAL_PROBE_S = 120.0


@contextlib.contextmanager
def patient_local_probe():
    """gradio's launch() probes the server it has just started (HEAD, 3 s timeout, 5 tries) and, when a busy
    machine answers late (a training run on the same cores), refuses to start: "When localhost is not accessible,
    a shareable link must be created". Our server is local by design, so the probe waits up to LOCAL_PROBE_S."""
    networking = getattr(gr, "networking", None)
    real = getattr(networking, "url_ok", None)
    if real is None:  # another gradio layout: leave it alone
        yield
        return
    import time

    def patient(url: str) -> bool:
        end = time.monotonic() + LOCAL_PROBE_S
        while True:
            if real(url):
                return True
            if time.monotonic() > end:
                return False
    networking.url_ok = patient
    try:
        yield
    finally:
        networking.url_ok = real
