"""The demo's protections at its edge: who may log in (and how often they may fail), how much one upload request
may carry, and whether the address it serves on reaches beyond this machine.

Kept apart from the app itself (demo.py): these act on raw HTTP requests and login attempts, before any of the
app's own code runs.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
import threading
import time
from pathlib import Path

from lookalike.errors import LookalikeError

AUTH_ENVIRONMENT = "LOOKALIKE_DEMO_AUTH"
FAILURES_BEFORE_LOCKOUT = 5
LOCKOUT_S = 60.0
FAILURE_DELAY_S = 1.0  # every failed login waits this long: guessing costs time even before a lockout
FILE_PART = b"; filename="  # in the header of each file of a multipart upload


def credentials(auth: str | None, auth_file: Path | None) -> tuple[str, str] | None:
    """user:password from a file (--auth-file: its first line), else from --auth, else from the environment
    (LOOKALIKE_DEMO_AUTH); the file and the environment keep the password out of the process list."""
    sources = [(f"--auth-file {auth_file}", _first_line(auth_file)) if auth_file is not None else None,
               ("--auth", auth) if auth is not None else None,
               (AUTH_ENVIRONMENT, os.environ[AUTH_ENVIRONMENT]) if os.environ.get(AUTH_ENVIRONMENT) else None]
    given = [source for source in sources if source is not None]
    if not given:
        return None
    where, text = given[0]
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise LookalikeError(f"{where}: expected user:password")
    return user, password


def _first_line(path: Path) -> str:
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise LookalikeError(f"--auth-file: cannot read {path} ({error.__class__.__name__})") from None
    return lines[0] if lines else ""  # as written: a password may end in a space


class LoginThrottle:
    """Gradio's login check: the one user and password, compared in constant time; each failure waits
    FAILURE_DELAY_S, and FAILURES_BEFORE_LOCKOUT failures within LOCKOUT_S refuse every login for LOCKOUT_S."""

    def __init__(self, user: str, password: str, clock=time.monotonic, sleep=time.sleep):
        self.user, self.password = user.encode(), password.encode()
        self.clock, self.sleep = clock, sleep
        self.failures: list[float] = []
        self.lock = threading.Lock()

    def __call__(self, user: str, password: str) -> bool:
        with self.lock:
            now = self.clock()
            self.failures = [t for t in self.failures if now - t < LOCKOUT_S]
            locked = len(self.failures) >= FAILURES_BEFORE_LOCKOUT
            right = hmac.compare_digest(user.encode(), self.user) & hmac.compare_digest(password.encode(),
                                                                                         self.password)
            if right and not locked:
                return True
            if not locked:
                self.failures.append(now)
        self.sleep(FAILURE_DELAY_S)
        return False


class UploadLimit:
    """ASGI middleware on gradio's upload route (which checks each file's size, but not how many files or bytes
    one request carries): a request over `max_bytes` is refused before it is read, and one that turns out to
    carry more than `max_files` files is cut off as it streams in."""

    def __init__(self, app, max_files: int, max_bytes: int):
        self.app, self.max_files, self.max_bytes = app, max_files, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/upload"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is None or not length.isdigit() or int(length) > self.max_bytes:
            return await _refuse(send, 413, f"an upload may carry at most {self.max_bytes // 2**20} MB "
                                            f"({self.max_files} photos) at a time")
        files, tail = 0, b""

        async def counted():
            nonlocal files, tail
            message = await receive()
            if message["type"] == "http.request":
                # Each file's part header names it; a name split between two chunks is seen whole in tail + body,
                # and tail, shorter than the marker, never holds one already counted.
                data = tail + message.get("body", b"")
                files += data.count(FILE_PART)
                tail = data[-(len(FILE_PART) - 1):]
                if files > self.max_files:
                    return {"type": "http.disconnect"}  # the upload stops here, its files unused
            return message

        return await self.app(scope, counted, send)


class LoginFirst:
    """ASGI middleware for an app with a login: gradio (6.31, routes.py `main`) embeds the app's API description in
    the page it serves, before login too, and that description holds every endpoint's defaults: run names, the
    trigger word, the default prompt, reference photo names. For a visitor who is not logged in, every HTML page
    has it blanked, so what reaches them is the login form alone."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or _logged_in(scope):
            return await self.app(scope, receive, send)
        if scope["path"].endswith("/manifest.json"):  # it names the app by its title, the study's name
            return await _refuse(send, 401, "log in first")
        start, chunks = None, []

        async def blanked(message):
            nonlocal start
            if message["type"] == "http.response.start":
                kind = dict(message["headers"]).get(b"content-type", b"")
                if not kind.startswith(b"text/html"):
                    return await send(message)
                start = message
                return
            if start is None:
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = API_INFO.sub(b"window.gradio_api_info = null;</script>", b"".join(chunks))
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            await send({**start, "headers": headers + [(b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        return await self.app(scope, receive, blanked)


API_INFO = re.compile(rb"window\.gradio_api_info = .*?;</script>", re.S)


def _logged_in(scope) -> bool:
    """Whether the request carries the cookie of a login gradio granted (its get_current_user's own test)."""
    from starlette.requests import Request

    app = scope.get("app")
    cookies = Request(scope).cookies
    cookie_id = getattr(app, "cookie_id", None)
    token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
    return token is not None and token in getattr(app, "tokens", {})


async def _refuse(send, status: int, text: str) -> None:
    body = text.encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
