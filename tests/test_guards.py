"""The hostile test's web findings, replayed as an attacker would: raw HTTP against a launched app.

Two apps per module: a local one without a password (DNS rebinding, cross-site
requests, uploads) and a "shared" one (the tunnel faked, so requests carry the share
link's Host and the relay's X-Forwarded-For) with a password (logins, session routes,
the login page, upload expiry).  Each test fails without the guard it names.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, free_port, seed_home

MiB = 1024**2
SHARE_HOST = "abcd1234ef.gradio.live"
USER, PASSWORD = "alice", "correct-horse-battery"


@pytest.fixture(scope="module", autouse=True)
def upload_dir(tmp_path_factory):
    """Gradio's upload folder for this module's apps only (others' tests share /tmp/gradio)."""
    folder = tmp_path_factory.mktemp("gradio-uploads")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(folder))
        yield folder


def _launch(settings, **kwargs):
    from masuka.studio import build_studio
    from masuka.web.server import launch

    settings = replace(settings, port=free_port())
    studio = build_studio(settings)
    demo, url, share_url = launch(settings, block=False, studio=studio, quiet=True, **kwargs)
    return demo, url, share_url, studio


@pytest.fixture(scope="module")
def local_app(tmp_path_factory, tiny_model_dir, upload_dir):
    """No password, 127.0.0.1 (the hostile test's setup); small upload caps."""
    from masuka.settings import Settings

    home = seed_home(tmp_path_factory.mktemp("local") / "home", tiny_model_dir)
    settings = Settings(
        home=home, lora_max_bytes=4 * MiB, upload_other_max_bytes=1 * MiB, upload_quota_bytes=10 * MiB
    )
    demo, url, _share, studio = _launch(settings)
    yield url, studio
    demo.close()
    studio.close()


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def shared_app(tmp_path_factory, tiny_model_dir, upload_dir):
    """A password, a share link (tunnel faked), a login guard on a clock the tests move, uploads expiring in 3 s."""
    import gradio.networking

    from masuka.settings import Settings
    from masuka.web.guards import LoginGuard, LoginPolicy

    home = seed_home(tmp_path_factory.mktemp("shared") / "home", tiny_model_dir)
    settings = Settings(home=home, share=True, auth=(USER, PASSWORD), upload_expiry_s=3)
    clock = Clock()
    policy = LoginPolicy(
        free_failures=3, lockout_failures=8, window_s=600, lockout_s=600, first_delay_s=0.3, max_delay_s=0.6
    )
    guard = LoginGuard(policy, clock=clock)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gradio.networking, "setup_tunnel", lambda *a, **k: f"http://{SHARE_HOST}")
        demo, url, share_url, studio = _launch(settings, login_guard=guard)
    assert share_url == f"https://{SHARE_HOST}"
    yield url, studio, clock, policy
    demo.close()
    studio.close()


def through_relay(url: str, address: str | None = None, **kwargs) -> httpx.Client:
    """A client as the share relay delivers it: the public Host, the visitor's address appended."""
    headers = {"Host": SHARE_HOST}
    if address:
        headers["X-Forwarded-For"] = address
    return httpx.Client(base_url=url, headers=headers, timeout=60, **kwargs)


def logged_in(url: str) -> httpx.Client:
    client = through_relay(url)
    r = client.post("login", data={"username": USER, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return client


# --------------------------------------------------------------------------- 1. Host and Origin


def test_a_rebound_name_gets_nothing_and_runs_nothing(local_app):
    """DNS rebinding: evil.example now resolves to 127.0.0.1; the browser sends its own name."""
    url, studio = local_app
    port = httpx.URL(url).port
    evil = httpx.Client(
        base_url=url, timeout=30, headers={"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
    )
    attempts = {
        "config": evil.get("config"),
        "page": evil.get("/"),
        "history": evil.post("gradio_api/call/history", json={"data": [50, "", ""]}),
        "queue join": evil.post(
            "gradio_api/queue/join",
            json={"data": ["rebound", "", 1.0, 1, 1, 0.0, 256, 256, 1], "fn_index": 0, "session_hash": "evil"},
        ),
    }
    for what, r in attempts.items():
        assert r.status_code == 421, f"{what} answered {r.status_code} to a foreign Host"
        assert "evil.example" in r.text and "allowed-hosts" in r.text
    time.sleep(1)
    assert studio.jobs.list() == [], "a job ran for a rebound page"
    # Without the Origin (a rebound page's plain navigation) the name is refused all the same.
    assert httpx.get(f"{url}config", headers={"Host": "127.0.0.1.nip.io"}, timeout=30).status_code == 421


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "masuka.localhost", "127.0.0.2"])
def test_loopback_names_are_served(local_app, host):
    url, _studio = local_app
    port = httpx.URL(url).port
    r = httpx.get(f"{url}config", headers={"Host": f"{host}:{port}"}, timeout=30)
    assert r.status_code == 200 and "components" in r.json()


def test_a_foreign_origin_is_refused_even_with_a_good_host(local_app):
    """A page elsewhere posting to (or reading) the app by its real address: refused by Origin."""
    url, studio = local_app
    port = httpx.URL(url).port
    for origin in ("http://evil.example", "null", f"http://evil.example:{port}"):
        r = httpx.post(
            f"{url}gradio_api/call/history", json={"data": [5, "", ""]}, headers={"Origin": origin}, timeout=30
        )
        assert r.status_code == 403, f"Origin {origin} answered {r.status_code}"
        assert httpx.get(f"{url}config", headers={"Origin": origin}, timeout=30).status_code == 403
    ours = httpx.post(
        f"{url}gradio_api/call/history",
        json={"data": [5, "", ""]},
        headers={"Origin": f"http://localhost:{port}"},
        timeout=30,
    )
    assert ours.status_code == 200 and "event_id" in ours.json()


def test_listening_everywhere_serves_addresses_not_names():
    from masuka.web.guards import HostPolicy, host_name

    everywhere = HostPolicy.build("0.0.0.0", ["studio.lan", "*.example.org"])
    for host in ("192.168.1.20:7860", "[fe80::1]:7860", "localhost", "studio.lan:80", "a.example.org"):
        assert everywhere.allows(host_name(host)), host
    for host in ("evil.example", "example.org", "studio.lan.evil.example", "192.168.1.20.nip.io", "", "a b", "x:y"):
        assert not everywhere.allows(host_name(host)), host
    one = HostPolicy.build("10.0.0.5")
    assert one.allows(host_name("10.0.0.5:7860")) and one.allows(host_name("127.0.0.1"))
    assert not one.allows(host_name("10.0.0.6:7860"))
    assert HostPolicy.build("127.0.0.1", ["*"]).allows(host_name("anything.example"))


def test_allowed_hosts_setting():
    from masuka.settings import parse_settings

    s = parse_settings(["--allowed-hosts", "Studio.LAN, *.example.org"], env={})
    assert s.allowed_hosts == ("studio.lan", "*.example.org")
    assert parse_settings([], env={"MASUKA_ALLOWED_HOSTS": "a.example"}).allowed_hosts == ("a.example",)
    with pytest.raises(ValueError, match="http://evil"):
        parse_settings(["--allowed-hosts", "http://evil.example/"], env={})


# --------------------------------------------------------------------------- 3. uploads


def _upload(url: str, files: list[tuple[str, bytes]], client: httpx.Client | None = None) -> httpx.Response:
    client = client or httpx.Client(base_url=url, timeout=60)
    return client.post("gradio_api/upload", files=[("files", item) for item in files])


def _upload_files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def test_one_request_carries_at_most_four_files(local_app, upload_dir):
    url, _studio = local_app
    before = _upload_files(upload_dir)
    r = _upload(url, [(f"p{i}.png", b"x" * 100) for i in range(5)])
    assert r.status_code == 413 and "at most 4" in r.text, r.text
    assert _upload_files(upload_dir) == before, "a refused upload left files behind"
    assert _upload(url, [(f"q{i}.png", b"y" * 100) for i in range(4)]).status_code == 200


def test_only_lora_files_may_be_large(local_app, upload_dir):
    url, _studio = local_app
    before = _upload_files(upload_dir)
    r = _upload(url, [("holiday.png", os.urandom(3 * MiB))])
    assert r.status_code == 413 and "holiday.png" in r.text and ".safetensors" in r.text, r.text
    assert _upload_files(upload_dir) == before, "a refused upload left files behind"
    ok = _upload(url, [("style.safetensors", os.urandom(3 * MiB))])
    assert ok.status_code == 200, ok.text


def test_the_upload_folder_has_a_quota(local_app, upload_dir):
    """Run last for this app: it fills the folder (10 MiB here)."""
    url, _studio = local_app
    statuses = []
    for i in range(6):
        r = _upload(url, [(f"filler{i}.safetensors", os.urandom(3 * MiB))])
        statuses.append(r.status_code)
        if r.status_code != 200:
            break
    assert statuses[-1] == 413 and "full" in r.text, (statuses, r.text)
    held = sum(p.stat().st_size for p in _upload_files(upload_dir) if p.suffix in (".safetensors", ".png"))
    assert held <= 10 * MiB, f"the upload folder holds {held / MiB:.1f} MiB, over its 10 MiB quota"


# --------------------------------------------------------------------------- the shared app: logins


def test_the_share_link_host_is_served_and_only_it(shared_app):
    url, _studio, _clock, _policy = shared_app
    assert through_relay(url).get("gradio_api/login_check").status_code == 401  # served: asks for a login
    other = httpx.get(f"{url}gradio_api/login_check", headers={"Host": "someone-else.gradio.live"}, timeout=30)
    assert other.status_code == 421


@pytest.fixture
def fresh_logins(shared_app):
    """After a lockout test, the guard's clock moves past every window and lockout."""
    yield
    _url, _studio, clock, policy = shared_app
    clock.now += policy.window_s + policy.lockout_s + 1


def _guess(client: httpx.Client, user: str, password: str) -> tuple[int, float]:
    started = time.perf_counter()
    r = client.post("login", data={"username": user, "password": password})
    return r.status_code, time.perf_counter() - started


def test_password_guessing_slows_down_then_locks_the_login(shared_app, fresh_logins, caplog):
    """Guesses at the shared login from ever new addresses: each try waits longer, then the
    login name is locked for everyone who is not yet logged in, right password included."""
    url, _studio, clock, policy = shared_app
    session = logged_in(url)  # a friend, logged in before the attack
    assert _guess(through_relay(url, "198.51.100.50"), USER, PASSWORD)[0] == 200  # another, from home
    caplog.set_level(logging.WARNING, logger="masuka")
    results = []
    for i in range(policy.lockout_failures):
        results.append(_guess(through_relay(url, f"203.0.113.{i + 1}"), USER, f"guess-{i}"))
    assert [code for code, _ in results] == [400] * policy.lockout_failures
    slowed = [took for _code, took in results[policy.free_failures :]]
    assert min(slowed) >= policy.first_delay_s, f"guesses after the free ones took {slowed}"
    locked, _ = _guess(through_relay(url, "198.51.100.9"), USER, PASSWORD)
    assert locked == 429, "the right password went through a locked login"
    assert any("login lockout" in r.getMessage() and "alice" in r.getMessage() for r in caplog.records)
    assert session.get("config").status_code == 200, "the lockout ended a session already logged in"
    assert _guess(through_relay(url, "198.51.100.50"), USER, PASSWORD)[0] == 200, "a friend's address was kept out"
    assert _guess(through_relay(url, "198.51.100.50"), USER, "typo")[0] == 400
    clock.now += policy.window_s + policy.lockout_s + 1
    assert _guess(through_relay(url, "198.51.100.9"), USER, PASSWORD)[0] == 200


def test_one_address_guessing_many_names_is_locked(shared_app, fresh_logins):
    """The relay appends the visitor's address; entries the visitor wrote before it change nothing."""
    url, _studio, _clock, policy = shared_app
    for i in range(policy.lockout_failures):
        attacker = through_relay(url, f"10.{i}.0.1, 192.0.2.66")  # spoofed first entry, the relay's last
        assert _guess(attacker, f"user{i}", "guess")[0] == 400
    assert _guess(through_relay(url, "192.0.2.66"), USER, PASSWORD)[0] == 429
    assert _guess(through_relay(url, "192.0.2.67"), USER, PASSWORD)[0] == 200  # another visitor


def test_rest_basic_auth_guesses_count_with_the_page_logins(shared_app, fresh_logins):
    """The REST API checks the same password: its wrong guesses slow down and lock like the page's."""
    url, _studio, _clock, policy = shared_app
    friend = through_relay(url, "192.0.2.78")
    assert friend.get("api/v1/loras", auth=(USER, PASSWORD)).status_code == 200  # before the attack
    rest = through_relay(url, "192.0.2.77")
    codes = [rest.get("api/v1/loras", auth=(USER, f"guess-{i}")).status_code for i in range(policy.lockout_failures)]
    assert codes == [401] * policy.lockout_failures
    locked = rest.get("api/v1/loras", auth=(USER, PASSWORD))
    assert locked.status_code == 429 and int(locked.headers["Retry-After"]) > 0
    assert _guess(through_relay(url, "192.0.2.77"), USER, PASSWORD)[0] == 429  # the page's login too
    assert friend.get("api/v1/loras", auth=(USER, PASSWORD)).status_code == 200  # known addresses keep working


def test_parallel_guesses_cannot_outrun_the_lockout(shared_app, fresh_logins):
    import concurrent.futures

    url, _studio, _clock, policy = shared_app

    def guess(i):
        return _guess(through_relay(url, "192.0.2.99"), "bob", f"parallel-{i}")[0]

    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        codes = list(pool.map(guess, range(3 * policy.lockout_failures)))
    assert set(codes) == {400, 429} and codes.count(400) <= policy.lockout_failures, codes


def test_forwarded_for_is_ignored_unless_shared():
    from masuka.web.guards import client_address

    scope = {"client": ("127.0.0.1", 5000), "headers": [(b"x-forwarded-for", b"1.2.3.4, 5.6.7.8")]}
    assert client_address(scope, trust_forwarded=False) == "127.0.0.1"
    assert client_address(scope, trust_forwarded=True) == "5.6.7.8"
    remote = {**scope, "client": ("192.0.2.1", 5000)}  # not the relay: its header is not believed
    assert client_address(remote, trust_forwarded=True) == "192.0.2.1"


# --------------------------------------------------------------------------- the shared app: session routes


def test_cancel_and_heartbeat_need_a_login(shared_app):
    url, _studio, _clock, _policy = shared_app
    stranger = through_relay(url)
    cancel = {"session_hash": "victim-session", "fn_index": 0, "event_id": "0123456789abcdef"}
    assert stranger.post("gradio_api/cancel", json=cancel).status_code == 401
    assert stranger.get("gradio_api/heartbeat/victim-session").status_code == 401
    assert stranger.post("gradio_api/stream/0123456789abcdef/close").status_code == 401
    assert logged_in(url).post("gradio_api/cancel", json=cancel).status_code == 200


def test_logout_ends_only_the_callers_session(shared_app):
    url, _studio, _clock, _policy = shared_app
    ann, ben = logged_in(url), logged_in(url)
    ann_cookies = httpx.Cookies(ann.cookies)
    assert ann.get("logout").status_code in (200, 302)
    replayed = through_relay(url, cookies=ann_cookies)  # the old cookie, kept by someone
    assert replayed.get("config").status_code == 401, "logout left the caller's own session alive"
    assert ben.get("config").status_code == 200, "one friend's logout ended everyone's session"


def test_the_login_page_carries_no_api_schema(shared_app):
    url, _studio, _clock, _policy = shared_app
    page = through_relay(url).get("/")
    assert page.status_code == 200 and "window.gradio_api_info" in page.text
    assert "lora_scale" not in page.text and "/generate" not in page.text, "the login page lists the API"
    assert "lora_scale" in logged_in(url).get("/").text  # logged in, the page has it (the check above can fail)


def test_uploads_expire(shared_app, upload_dir):
    url, _studio, _clock, _policy = shared_app
    r = _upload(url, [("old.png", b"o" * 1000)], client=logged_in(url))
    assert r.status_code == 200, r.text
    stored = Path(r.json()[0])
    assert stored.is_file()
    deadline = time.monotonic() + 30
    while stored.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not stored.exists(), "an upload outlived its expiry (3 s here)"


# --------------------------------------------------------------------------- share policy and defaults


@pytest.mark.parametrize(
    "auth, words",
    [("u:a", ["12", "has 1"]), ("friends:short-pw", ["12", "has 8"]), ("LongUserName1:longusername1", ["user name"])],
)
def test_a_guessable_share_password_refuses_to_start(monkeypatch, tmp_path, caplog, auth, words):
    import gradio.networking

    import app
    import masuka.web.server

    reached = []
    monkeypatch.setattr(gradio.networking, "setup_tunnel", lambda *a, **k: reached.append("tunnel"))
    monkeypatch.setattr(masuka.web.server, "build_studio", lambda *a, **k: reached.append("studio"))
    for name in ("GRADIO_SHARE", "MASUKA_AUTH", "COLAB_RELEASE_TAG", "COLAB_GPU"):
        monkeypatch.delenv(name, raising=False)
    assert app.main(["--share", "--auth", auth, "--home", str(tmp_path / "home")]) == 2
    assert reached == []
    message = " ".join(r.getMessage() for r in caplog.records)
    for word in words:
        assert word in message, message
    password = auth.partition(":")[2]
    if len(password) > 4:
        assert password not in message, "the password was logged"


def test_the_notebooks_generated_password_qualifies():
    import secrets

    from masuka.settings import Settings
    from masuka.web.server import check_share_policy

    source = (ROOT / "colab" / "build_notebook.py").read_text(encoding="utf-8")
    nbytes = int(re.search(r"PASSWORD = secrets\.token_urlsafe\((\d+)\)", source).group(1))
    for _ in range(20):
        check_share_policy(Settings(share=True, auth=("masuka", secrets.token_urlsafe(nbytes))))


@pytest.mark.parametrize(
    "argv, env, expected",
    [
        ([], {}, 0),
        (["--share"], {}, 10),
        ([], {"GRADIO_SHARE": "1"}, 10),
        ([], {"COLAB_GPU": "1"}, 10),
        (["--share", "--rate-limit", "0"], {}, 0),
        (["--share"], {"MASUKA_RATE_LIMIT": "3"}, 3),
        (["--no-share"], {"COLAB_GPU": "1"}, 0),
    ],
)
def test_a_share_link_has_a_rate_limit_by_default(argv, env, expected):
    from masuka.settings import parse_settings

    assert parse_settings(argv, env=env).rate_limit_per_minute == expected


def test_login_guard_as_the_rest_api_uses_it():
    """Basic auth on every REST call: check, then succeeded/failed; a lockout says when to come back."""
    from masuka.web.guards import LoginGuard, LoginLocked, LoginPolicy

    clock = Clock()
    guard = LoginGuard(LoginPolicy(free_failures=2, lockout_failures=4, window_s=60, lockout_s=300), clock=clock)
    for _ in range(3):  # a script with the right password, many calls: never slowed
        assert guard.check("192.0.2.1", USER) == 0.0
        guard.succeeded("192.0.2.1", USER)
    delays = []
    for _ in range(4):
        delays.append(guard.check("192.0.2.2", USER))
        guard.failed("192.0.2.2", USER)
    assert delays[:2] == [0.0, 0.0] and 0 < delays[2] < delays[3]
    with pytest.raises(LoginLocked) as locked:
        guard.check("192.0.2.3", USER)  # the name is locked, from a new address too
    assert 299 <= locked.value.retry_after_s <= 300
    assert guard.check("192.0.2.1", USER) == 0.0  # an address that logged in before is let through
    guard.succeeded("192.0.2.1", USER)
    clock.now += 301
    assert guard.check("192.0.2.3", USER) == 0.0
    guard.succeeded("192.0.2.3", USER)
