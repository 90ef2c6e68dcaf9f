"""Serving the studio: loopback unless a login is required, the demo's guards at its edge (upload limits, logins
throttled, nothing before login), and only the workspace's own files served."""

from __future__ import annotations

from pathlib import Path

from lookalike.demo import keep_temporary_files_in, serve_options
from lookalike.demo_guard import is_loopback
from lookalike.errors import LookalikeError
from lookalike.studio.app import Studio, build_studio
from lookalike.studio.study import StudioStudy


def serve(path: Path, host: str = "127.0.0.1", port: int = 7860, credentials: tuple[str, str] | None = None,
          block: bool = True):
    """Start the studio on the study of `path` (a config file or a workspace folder); returns (app, studio) with
    block=False, once it serves."""
    if credentials is None and not is_loopback(host):
        raise LookalikeError(f"--host {host}: the studio trains, uploads and exports; serving it beyond this machine "
                             "needs a login: give --auth-file FILE (a line user:password)")
    study = StudioStudy.open(path)
    keep_temporary_files_in(study.folder / ".gradio")
    studio = Studio(study)
    app = build_studio(studio)
    studio.start()
    app.queue(default_concurrency_limit=4)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=not block,
               allowed_paths=[str(study.workspace.root)], **serve_options(credentials))
    if block:
        studio.close()
    return app, studio
