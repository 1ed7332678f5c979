"""Launching the web app: the share policy, the served folders, and Gradio's launch."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from masuka.settings import Settings
from masuka.studio import Studio, build_studio
from masuka.web.guards import Guards, HostPolicy, LoginGuard, UploadPolicy, cache_expiry, upload_bytes
from masuka.web.page import create_demo
from masuka.web.rest import rest_routes

log = logging.getLogger(__name__)


class ShareWithoutPassword(RuntimeError):
    pass


class WeakSharePassword(ShareWithoutPassword):
    """A share link's password that a stranger could guess."""


SHARE_HELP = (
    "A public share link would let anyone with the link use this GPU and read your images. "
    "Set a password first: python app.py --share --auth USER:PASS  (or MASUKA_AUTH=USER:PASS). "
    "To run without a share link, use --no-share (or GRADIO_SHARE=0)."
)


SHARE_PASSWORD_MIN = 12


def check_share_policy(settings: Settings) -> None:
    """Refuse, before any tunnel is opened, to share without a password, or with a weak one."""
    if not settings.share:
        return
    if settings.auth is None:
        raise ShareWithoutPassword(SHARE_HELP)
    user, password = settings.auth
    if len(password) < SHARE_PASSWORD_MIN or password.casefold() == user.casefold():
        raise WeakSharePassword(
            f"A public share link needs a password of at least {SHARE_PASSWORD_MIN} characters that is not "
            f"the user name (the one given has {len(password)}"
            + (" and equals the user name" if password.casefold() == user.casefold() else "")
            + "). Make one: python -c 'import secrets; print(secrets.token_urlsafe(18))' and pass "
            "--auth USER:PASS (or MASUKA_AUTH=USER:PASS); or run without a link: --no-share."
        )


def check_served_folder(settings: Settings) -> None:
    """Refuse an outputs folder that would serve more than images.

    Gradio serves everything under the outputs folder to whoever holds the link (and
    password); a folder that holds the home, the LoRAs or the database (say a Drive
    root) would hand those out too.
    """
    paths = settings.paths
    outputs = paths.outputs.resolve()
    private = [paths.home, paths.loras, paths.db, paths.models, Path.home()]
    if paths.db_backup is not None:
        private.append(paths.db_backup)
    for other in private:
        other = other.resolve()
        if other == outputs or outputs in other.parents:
            raise ValueError(
                f"the outputs folder {outputs} holds {other}; everything in the outputs folder is "
                "served to the link's users, so give it a folder of its own (e.g. <drive>/masuka-outputs)"
            )


def build_guards(settings: Settings, demo, login: LoginGuard | None = None) -> Guards:
    """The checks that run before Gradio sees a request (masuka/web/guards.py)."""
    return Guards(
        hosts=HostPolicy.build(
            settings.host, settings.allowed_hosts, share_url=(lambda: demo.share_url) if settings.share else None
        ),
        login=login or LoginGuard(),
        uploads=UploadPolicy(
            max_files=settings.upload_max_files,
            other_max_bytes=settings.upload_other_max_bytes,
            quota_bytes=settings.upload_quota,
            usage=lambda: upload_bytes(demo.upload_file_set),
        ),
        auth=settings.auth is not None,
        trust_forwarded=settings.share,
    )


def launch(
    settings: Settings,
    *,
    block: bool = True,
    studio: Studio | None = None,
    login_guard: LoginGuard | None = None,
    **launch_kwargs,
):
    """Launch the app; returns (demo, local_url, share_url).

    `login_guard` counts failed logins; pass the one other ways in (REST basic auth) use."""
    for key in ("share", "auth", "allowed_paths", "blocked_paths"):
        if key in launch_kwargs:  # the password and file checks only see Settings
            raise TypeError(f"launch() takes {key} from Settings, not as a keyword")
    check_share_policy(settings)
    check_served_folder(settings)
    if studio is None:
        studio = build_studio(settings)
    demo = create_demo(studio)
    if demo.delete_cache is None:  # uploads (and Gradio's copies of shown images) expire
        demo.delete_cache = cache_expiry(settings.upload_expiry_s)
    guards = build_guards(settings, demo, login_guard)
    extra_app_kwargs = launch_kwargs.pop("app_kwargs", None) or {}
    # Gradio passes these to the FastAPI constructor of its app: the guards run before any
    # Gradio route, and the REST routes (at /api/v1) come before Gradio's own.
    app_kwargs: dict[str, Any] = {
        **extra_app_kwargs,
        "middleware": [guards.middleware(), *extra_app_kwargs.get("middleware", [])],
        "routes": [
            *rest_routes(studio, settings.auth, login=guards.login, trust_forwarded=settings.share),
            *extra_app_kwargs.get("routes", []),
        ],
    }
    # The runner owns the one queue of generation jobs (and its cap, for every way in);
    # Gradio's queue only carries events, none of which waits on another.
    demo.queue(api_open=False, max_size=None, default_concurrency_limit=None)
    kwargs: dict[str, Any] = dict(
        server_name=settings.host,
        server_port=settings.port,
        # Always explicit: left as None, Gradio decides by itself (on Colab, or from
        # GRADIO_SHARE) and could open a tunnel our password check never saw.
        share=bool(settings.share),
        auth=settings.auth,
        allowed_paths=[str(settings.paths.outputs)],
        blocked_paths=[
            str(settings.paths.db),
            str(settings.paths.loras),
            str(settings.paths.models),
            *([str(settings.paths.db_backup)] if settings.paths.db_backup else []),
        ],
        max_file_size=settings.lora_max_bytes,
        prevent_thread_lock=not block,
        show_error=True,
        footer_links=["api"],
        app_kwargs=app_kwargs,
    )
    kwargs.update(launch_kwargs)
    _app, local_url, share_url = demo.launch(**kwargs)
    return demo, local_url, share_url
