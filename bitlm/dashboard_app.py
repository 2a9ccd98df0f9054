"""The guide's ``bit_transformer.dashboard_app.run_dashboard`` import path.

The dashboard is an application (an HTTP server), not library code: it lives in
``serve/dashboard.py`` of a bitlm checkout, and this name forwards to it."""


def run_dashboard(host: str = "127.0.0.1", port: int = 5000, **kwargs):
    """Serve the dashboard until interrupted (run from a checkout: serve/dashboard.py)."""
    from serve.dashboard import run_dashboard as run  # the application, outside the library

    return run(host, port, **kwargs)
