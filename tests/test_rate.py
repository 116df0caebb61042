"""`iopo rate`: the pairs and who sees them, ratings that survive the server, the human tables and agreement, each
judge against the humans, the exports, the HTTP guard rails; and the page itself driven in headless Chromium."""

from __future__ import annotations

import csv
import json
import shutil
import sqlite3
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from iopo.cli import main as iopo_main
from iopo.rate.book import RatingBook, RatingError
from iopo.rate.tables import book_summary, write_outputs

from tiny import save_tiny, train_rm_args, write_pairs

MARKUP = ' <b>bold</b><script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
MARKUP_ANSWER = (
    '<script>window.__pwned = 3</script><img src=x onerror="window.__pwned = 4"><a href="javascript:1">link</a> '
    "=HYPERLINK(1)"
)
TINY = ["data.max_length=64", "data.max_prompt_length=48", "data.test_size=6"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    """A real eval folder: a second tiny model vs the tiny base on 6 prompts x 2 answers, judged by a reward model
    and a local pairwise judge. Every prompt carries markup, and one answer of the model is markup too (written
    into its answers file, then the eval is run again so the judges saw that answer)."""
    root = tmp_path_factory.mktemp("rate")
    data = write_pairs(root / "pairs.jsonl", n=30)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "prompt": r["prompt"] + MARKUP}) + "\n" for r in rows))
    other = save_tiny(root / "other", seed=1)
    assert iopo_main(train_rm_args(tiny_model_dir, data, root / "rm", *TINY)) == 0
    ev = root / "ev"
    args = [
        "eval",
        f"{other}",
        f"baseline={tiny_model_dir}",
        f"data={data}",
        *TINY,
        f"output_dir={ev}",
        "generation.max_new_tokens=8",
        "generation.n=2",
        "progress_bar=false",
        "bootstrap=100",
        "judges.rm.type=reward_model",
        f"judges.rm.model={root / 'rm' / 'final'}",
        "judges.rm.tie_margin=0.01",
        "judges.loc.type=local",
        f"judges.loc.model={tiny_model_dir}",
    ]
    assert iopo_main(args) == 0
    answers = ev / "generations" / "other.jsonl"
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    records[0]["answer"] = MARKUP_ANSWER
    answers.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert iopo_main(args) == 0
    return {"eval": ev, "args": args, "root": root}


@pytest.fixture
def ev(built, tmp_path):
    """A private copy of the eval folder for one test."""
    return Path(shutil.copytree(built["eval"], tmp_path / "ev"))


def _rate_all(book: RatingBook, raters: list[str], choose) -> list[dict]:
    """Raters take turns until nothing is left for any; `choose(rater, view)` gives (score_a, score_b, pref)."""
    shown = []
    active = list(raters)
    while active:
        for rater in list(active):
            view = book.next_pair(rater)
            if view is None:
                active.remove(rater)
                continue
            shown.append({"rater": rater, **view})
            book.rate(rater, view["item"], *choose(rater, view))
    return shown


# ---------------------------------------------------------------- who sees what


def test_pairs_are_blind_and_each_goes_to_one_rater_but_the_overlap_to_all(ev):
    book = RatingBook(ev, overlap=0.3, seed=1)
    assert len(book.order) == 12 and 0 < len(book.shared) < 12  # 6 prompts x 2 answers
    shown = _rate_all(book, ["alice", "bob"], lambda r, v: (2, 1, "a"))
    for view in shown:
        assert set(view) - {"rater"} == {
            "item",
            "prompt",
            "a",
            "b",
            "cut_a",
            "cut_b",
        }  # no model names, no side
        pair = book.by_item[view["item"]]
        assert sorted([(view["a"], view["cut_a"]), (view["b"], view["cut_b"])]) == sorted(
            [(pair.model_answer, pair.cut[0]), (pair.baseline_answer, pair.cut[1])]
        )
    assert any(v["cut_a"] or v["cut_b"] for v in shown)  # 8 new tokens: some answers hit the limit
    by_item = {}
    for view in shown:
        by_item.setdefault(view["item"], []).append(view["rater"])
    assert set(by_item) == set(book.order)
    for item, raters in by_item.items():
        assert len(raters) == len(set(raters)) == (2 if item in book.shared else 1)
    # Each rater got some of the unshared pairs; left/right is drawn per rater and pair.
    assert {r for item, rs in by_item.items() if item not in book.shared for r in rs} == {"alice", "bob"}
    lefts = [r["left"] for r in book.ratings()]
    assert "model" in lefts and "baseline" in lefts
    # The stored ratings map A/B back to the models: A (left) got 2, B 1, and A was preferred.
    for r in book.ratings():
        assert (r["score_model"], r["score_baseline"]) == ((2, 1) if r["left"] == "model" else (1, 2))
        assert r["preference"] == r["left"]
    assert book.progress("alice")["left"] == 0 and book.progress("alice")["pairs_rated"] == 12
    book.close()


def test_a_shown_pair_is_held_for_its_rater_until_the_claim_expires(ev):
    book = RatingBook(ev, overlap=0.0, seed=0)
    first = book.next_pair("alice")
    assert book.next_pair("alice")["item"] == first["item"]  # a reload shows the same pair
    assert book.next_pair("bob")["item"] != first["item"]
    book.close()
    quick = RatingBook(ev, overlap=0.0, seed=0, claim_minutes=1e-9)
    quick.next_pair("alice")
    assert quick.next_pair("carol")["item"] == first["item"]  # alice's hold has run out
    quick.close()


def test_ratings_survive_a_new_server_and_back_revises_and_skip_passes_on(ev):
    book = RatingBook(ev, overlap=0.0, seed=0)
    items = []
    for _ in range(3):
        view = book.next_pair("alice")
        items.append(view["item"])
        book.rate("alice", view["item"], 3, 0, "a", seconds=4.5)
    book.close()  # the server is gone; nothing was kept in memory only

    book = RatingBook(ev, overlap=0.0, seed=0)
    assert book.progress("alice")["rated"] == 3
    view = book.next_pair("alice")
    assert view["item"] not in items
    # Back: the newest rating first, in the layout the rater saw, with their answer filled in.
    back = book.previous("alice", None)
    assert back["item"] == items[-1] and (back["score_a"], back["score_b"], back["preference"]) == (3, 0, "a")
    older = book.previous("alice", back["rating_id"])
    assert older["item"] == items[-2]
    book.rate("alice", older["item"], 1, 1, "tie")
    revised = [r for r in book.ratings() if r["item"] == older["item"]]
    assert len(revised) == 1 and (revised[0]["score_model"], revised[0]["preference"]) == (1, "tie")
    assert len(book.ratings()) == 3
    # A skip is not shown to its rater again but goes to another.
    book.skip("alice", view["item"])
    assert book.next_pair("alice")["item"] != view["item"]
    assert book.progress("alice")["skipped"] == 1
    assert book.next_pair("bob")["item"] == view["item"]
    book.close()


@pytest.mark.parametrize(
    "call",
    [
        lambda b, item: b.rate("", item, 1, 1, "tie"),
        lambda b, item: b.rate(" alice", item, 1, 1, "tie"),
        lambda b, item: b.rate("<script>", item, 1, 1, "tie"),
        lambda b, item: b.rate("x" * 41, item, 1, 1, "tie"),
        lambda b, item: b.rate("alice", item, 4, 1, "tie"),
        lambda b, item: b.rate("alice", item, True, 1, "tie"),
        lambda b, item: b.rate("alice", item, 1.5, 1, "tie"),
        lambda b, item: b.rate("alice", item, 1, 1, "model"),
        lambda b, item: b.rate("alice", "nope", 1, 1, "tie"),
        lambda b, item: b.rate("alice", item, 1, 1, "tie", seconds=float("nan")),
        lambda b, item: b.skip("alice", "nope"),
        lambda b, item: b.next_pair(None),
    ],
)
def test_bad_ratings_are_refused_and_nothing_is_stored(ev, call):
    book = RatingBook(ev)
    item = book.order[0]
    with pytest.raises(RatingError):
        call(book, item)
    assert book.ratings() == []
    book.close()


def test_unicode_names_are_fine(ev):
    book = RatingBook(ev)
    view = book.next_pair("José Ñúñez-2")
    book.rate("José Ñúñez-2", view["item"], 2, 2, "tie")
    assert book.ratings()[0]["rater"] == "José Ñúñez-2"
    book.close()


# ---------------------------------------------------------------- tables


def _judge_scores(ev: Path, judge: str) -> dict[str, float]:
    """The reward model's score of each answer text, read from the store by text (not by key)."""
    with sqlite3.connect(ev / "store.sqlite") as db:
        rows = db.execute(
            "SELECT answer_a, result FROM judgments WHERE judge = ? AND kind = 'score'", (judge,)
        )
        return {answer: json.loads(result)["score"] for answer, result in rows}


def test_human_tables_by_hand_and_a_judge_the_humans_agree_with(ev):
    rewards = _judge_scores(ev, "rm")
    margin = 0.01
    book = RatingBook(ev, overlap=0.5, seed=3)

    def rm_verdict(view):  # what the reward model says, from the raters' side: "a", "b" or "tie"
        gap = rewards[view["a"]] - rewards[view["b"]]
        return "a" if gap > margin else "b" if gap < -margin else "tie"

    def choose(rater, view):
        verdict = rm_verdict(view)
        if rater == "alice":  # agrees with the reward model; scores 3 for the preferred, 1 for the other
            return {"a": (3, 1, "a"), "b": (1, 3, "b"), "tie": (2, 2, "tie")}[verdict]
        return (0, 0, "tie")  # bob: both answers bad, always a tie

    _rate_all(book, ["alice", "bob"], choose)
    ratings = book.ratings()
    summary = write_outputs(book, n_boot=200)
    label = "other"
    h = summary["models"][label]
    assert (
        h["pairs"] == 12 and h["pairs_rated"] == 12 and h["ratings"] == len(ratings) == 12 + len(book.shared)
    )

    # Per pair: mean scores, majority preference (alice vs bob on a shared pair: a draw unless alice said tie).
    expected_t2, expected_pref, model_means = [], [], []
    for item in book.order:
        rows = [r for r in ratings if r["item"] == item]
        mean_m = sum(r["score_model"] for r in rows) / len(rows)
        mean_b = sum(r["score_baseline"] for r in rows) / len(rows)
        model_means.append(mean_m)
        expected_t2.append(
            "bad"
            if mean_m == mean_b == 0
            else "win"
            if mean_m > mean_b
            else "lose"
            if mean_m < mean_b
            else "tie"
        )
        prefs = [r["preference"] for r in rows]
        pref = prefs[0] if len(set(prefs)) == 1 else "tie"
        expected_pref.append({"model": "win", "baseline": "lose", "tie": "tie"}[pref])
    for outcome in ("win", "tie", "lose", "bad"):
        assert h["table2"][outcome] == pytest.approx(expected_t2.count(outcome) / 12)
    for outcome in ("win", "tie", "lose"):
        assert h["preference"][outcome] == pytest.approx(expected_pref.count(outcome) / 12)
    assert h["mean_score"]["model"] == pytest.approx(sum(model_means) / 12)
    low, high = h["table2"]["ci"]["win"]
    assert low <= h["table2"]["win"] <= high

    # Agreement on the shared pairs: alice and bob agree only where alice said tie.
    ag = summary["agreement"]
    assert ag["pairs_rated_by_several"] == len(book.shared)
    pair = ag["rater_pairs"][0]
    assert pair["raters"] == ["alice", "bob"] and pair["n"] == len(book.shared)
    shared_alice = [r["preference"] for r in ratings if r["rater"] == "alice" and r["item"] in book.shared]
    assert pair["same_preference"] == pytest.approx(shared_alice.count("tie") / len(book.shared))

    # The reward model against the humans: on the unshared pairs the human verdict is alice's = the RM's.
    rm = summary["judges"]["rm"]["models"][label]["table1"]
    unshared = len(book.order) - len(book.shared)
    assert rm["n"] == 12
    agree = unshared + sum(
        expected_pref[i] == "tie" for i, item in enumerate(book.order) if item in book.shared
    )
    assert rm["same"] == pytest.approx(agree / 12)
    # The local pairwise judge is compared on the same pairs (both orders looked up in the store).
    assert (
        summary["judges"]["loc"]["models"][label]["table1"]["n"]
        + summary["judges"]["loc"]["models"][label]["table1"]["judge_invalid"]
        == 12
    )
    book.close()


def test_exports_eval_json_report_and_a_repeated_eval_keep_the_human_tables(ev, built):
    book = RatingBook(ev, overlap=0.0)
    _rate_all(book, ["alice"], lambda r, v: (2, 1, "a"))
    summary = write_outputs(book, n_boot=100)
    ratings = book.ratings()
    book.close()
    with open(ev / "human" / "ratings.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    lines = (ev / "human" / "ratings.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(rows) == len(lines) == 12
    exact = [json.loads(line) for line in lines]
    assert [r["model_answer"] for r in exact] == [r["model_answer"] for r in ratings]
    markup = next(r for r in exact if r["model_answer"] == MARKUP_ANSWER)
    assert (
        markup["prompt"][-1]["content"].endswith(MARKUP)
        if isinstance(markup["prompt"], list)
        else MARKUP in markup["prompt"]
    )
    # In the CSV, a cell a spreadsheet would run as a formula starts with an apostrophe.
    csv_row = next(r for r in rows if r["item"] == markup["item"])
    assert csv_row["model_answer"] == MARKUP_ANSWER  # starts with "<": kept as is
    assert {r["rater"] for r in rows} == {"alice"}
    assert all(
        (r["score_model"], r["score_baseline"]) == (("2", "1") if r["left"] == "model" else ("1", "2"))
        for r in rows
    )
    model_left = sum(r["left"] == "model" for r in rows) / 12  # A (left) always got 2: the model wins there
    from iopo.rate.tables import csv_cell

    assert (
        csv_cell("=HYPERLINK(1)") == "'=HYPERLINK(1)" and csv_cell("-1") == "'-1" and csv_cell("ok") == "ok"
    )

    result = json.loads((ev / "eval.json").read_text())
    table2 = result["human"]["models"]["other"]["table2"]
    assert table2["win"] == pytest.approx(model_left) and table2["lose"] == pytest.approx(1 - model_left)
    assert table2 == summary["models"]["other"]["table2"]
    assert iopo_main(["report", str(ev), f"output={ev / 'report.md'}"]) == 0
    report = (ev / "report.md").read_text()
    assert "humans (1 rater, blind)" in report and "Human ratings: agreement" in report
    assert "| rm (reward_model) | other | preference (Table 1) | 12 |" in report

    # `iopo eval` again on the folder: the human tables are recomputed, not lost.
    args = [a if not a.startswith("output_dir=") else f"output_dir={ev}" for a in built["args"]]
    assert iopo_main(args) == 0
    again = json.loads((ev / "eval.json").read_text())
    assert again["human"]["models"]["other"]["table2"] == result["human"]["models"]["other"]["table2"]
    assert again["ledger"]["this_run"] == {}


def test_rate_command_errors_are_one_line(ev, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for args, words in [
        (["rate"], "name the eval folder"),
        (["rate", str(tmp_path / "nope")], "no such eval folder"),
        (["rate", str(tmp_path / "empty")], "no eval.json"),
        (["rate", str(ev), str(ev)], "one eval folder at a time"),
        (["rate", str(ev), "models=[nope]"], "not in this eval"),
        (["rate", str(ev), "overlap=2"], "overlap"),
    ]:
        assert iopo_main(args) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err and "Traceback" not in err


def test_a_busy_port_is_one_line(ev, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert iopo_main(["rate", str(ev), f"port={port}"]) == 2
    assert "in use" in capsys.readouterr().err


# ---------------------------------------------------------------- HTTP


@pytest.fixture
def served(ev):
    from iopo.rate.server import RatingServer

    book = RatingBook(ev, overlap=0.0)
    server = RatingServer(book, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    book.close()


def _request(server, path, body=None, headers=None, method=None):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(server.url.rstrip("/") + path, data=data, method=method)
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_http_serves_the_page_and_its_api_only_with_the_token(served):
    status, headers, page = _request(served, "/")
    assert status == 200 and b"blind rating" in page
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'nonce-" in csp and "unsafe-inline" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
    nonce = csp.split("'nonce-")[1].split("'")[0]
    assert page.count(f'nonce="{nonce}"'.encode()) == 2  # the one script and the one style
    token = served.token
    assert f'content="{token}"'.encode() in page
    ok = {"Content-Type": "application/json", "X-IOPO-Token": token}

    status, _, body = _request(served, "/api/next", {"rater": "alice"}, ok)
    view = json.loads(body)["pair"]
    assert status == 200 and set(view) == {"item", "prompt", "a", "b", "cut_a", "cut_b"}
    status, _, body = _request(
        served,
        "/api/rate",
        {"rater": "alice", "item": view["item"], "score_a": 2, "score_b": 0, "preference": "a"},
        ok,
    )
    assert status == 200 and json.loads(body)["progress"]["rated"] == 1

    for path, body, headers, code in [
        ("/api/next", {"rater": "alice"}, {"Content-Type": "application/json"}, 403),  # no token
        ("/api/next", {"rater": "alice"}, {**ok, "X-IOPO-Token": "guess"}, 403),
        (
            "/api/next",
            {"rater": "alice"},
            {**ok, "Content-Type": "text/plain"},
            415,
        ),  # a cross-site form post
        ("/api/next", {"rater": "alice"}, {**ok, "Host": "evil.example:80"}, 421),  # DNS rebinding
        ("/api/next", b"x" * 70000, ok, 413),
        ("/api/next", b"[1, 2]", ok, 400),
        ("/api/next", b"\xff\xfe", ok, 400),
        ("/api/next", {"rater": "<b>x</b>"}, ok, 400),
        (
            "/api/rate",
            {"rater": "alice", "item": view["item"], "score_a": 9, "score_b": 0, "preference": "a"},
            ok,
            400,
        ),
        ("/api/previous", {"rater": "alice", "before": "1"}, ok, 400),
        ("/api/nope", {"rater": "alice"}, ok, 404),
        ("/store.sqlite", None, {}, 404),
        ("/../eval.json", None, {}, 404),
        ("/eval.json", None, {}, 404),
    ]:
        status, _, reply = _request(served, path, body, headers)
        assert status == code, (path, status, reply)
        assert "error" in json.loads(reply)
    assert _request(served, "/", headers={"Host": "evil.example"})[0] == 421
    assert _request(served, "/api/next", {"rater": "alice"}, {**ok, "X-IOPO-Token": "tökén"})[0] == 403
    assert _request(served, "/", b"{}", ok, method="PUT")[0] == 405
    assert len(served.book.ratings()) == 1  # none of the refused requests stored anything


# ---------------------------------------------------------------- the page in a browser


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _need_browser():
    """The page test needs Playwright and a Chromium; CI installs both, elsewhere it is skipped with the reason."""
    import os

    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install -e '.[dev]')")
    if not _chromium():
        missing.append("a chromium binary (apt-get install chromium)")
    if missing:
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser test; missing " + " and ".join(missing))
        pytest.skip("needs " + " and ".join(missing))


@pytest.fixture
def started():
    """Every `iopo rate` process a test starts; any still running at the end is killed."""
    processes = []
    yield processes
    for process in processes:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait(timeout=30)
        process.out.close()


class RateProcess:
    """`iopo rate` as a user starts it: a subprocess; its URL read from what it prints."""

    def __init__(self, ev: Path, started: list, *extra: str):
        import re
        import subprocess
        import sys
        import time

        self.log = ev.parent / f"rate-{time.time_ns()}.log"
        self.out = open(self.log, "w")
        started.append(self)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "iopo", "rate", str(ev), "port=0", *extra],  # a later port=N wins
            stdout=self.out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            found = re.search(r"open (http://\S+) in a browser", self.log.read_text())
            if found:
                self.url = found.group(1)
                return
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.1)
        raise AssertionError("iopo rate printed no URL: " + self.log.read_text())

    def stop(self, sig=None) -> str:
        import signal

        self.proc.send_signal(sig or signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.out.flush()
        return self.log.read_text()


def test_two_raters_in_a_browser_with_keys_a_reload_a_restart_and_inert_markup(ev, tmp_path, started):
    _need_browser()
    import signal

    from playwright.sync_api import sync_playwright

    shots = Path(__import__("os").environ.get("IOPO_SCREENSHOTS", tmp_path / "shots"))
    shots.mkdir(parents=True, exist_ok=True)
    server = RateProcess(ev, started, "overlap=0.34", "seed=2")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        try:
            desk = browser.new_context(viewport={"width": 1366, "height": 900})
            phone = browser.new_context(
                viewport={"width": 390, "height": 844}, device_scale_factor=2, has_touch=True
            )
            alice, bob = desk.new_page(), phone.new_page()
            errors = []
            for page in (alice, bob):
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on("dialog", lambda d: errors.append("dialog: " + d.message))

            def login(page, name):
                page.goto(server.url)
                page.fill("#name", name)
                page.keyboard.press("Enter")
                page.wait_for_selector("#rate:not([hidden])")

            seen = {"markup": False}  # the pairs come in an order keyed by the store's secret: look at each

            def look(page):
                if MARKUP_ANSWER in (page.inner_text("#text-a"), page.inner_text("#text-b")):
                    if not seen["markup"]:
                        page.screenshot(path=str(shots / "markup.png"), full_page=True)
                    seen["markup"] = True
                assert "<script>" in page.inner_text("#turns")

            def rate_by_keys(page, a, b, pref):
                page.wait_for_selector("main[aria-busy='false']")  # the pair on screen is the current one
                look(page)
                before = page.inner_text("#counts")
                item_text = page.inner_text("#text-a")
                page.keyboard.press(str(a))  # A is outlined first; scoring it outlines B
                page.keyboard.press(str(b))
                page.keyboard.press(pref)
                page.keyboard.press("Enter")
                page.wait_for_function(
                    "([before, text]) => document.querySelector('#counts').textContent !== before || "
                    "!document.querySelector('#done').hidden",
                    arg=[before, item_text],
                )

            login(alice, "alice")
            login(bob, "bob")
            alice.screenshot(path=str(shots / "desktop.png"), full_page=True)
            bob.screenshot(path=str(shots / "phone.png"))
            rate_by_keys(alice, 3, 1, "a")
            rate_by_keys(alice, 0, 2, "b")
            rate_by_keys(bob, 2, 2, "t")
            # The buttons work as well as the keys.
            bob.wait_for_selector("main[aria-busy='false']")
            look(bob)
            bob.click("#card-a .scores button[data-score='1']")
            bob.click("#card-b .scores button[data-score='3']")
            assert bob.get_attribute(".prefs button[data-pref='b']", "aria-pressed") == "true"  # suggested
            bob.click("#submit")
            bob.wait_for_function("() => document.querySelector('#counts').textContent.startsWith('2 rated')")

            # A reload keeps the rater and their place; back shows the last rating, in its layout.
            shown = alice.inner_text("#text-a")
            alice.reload()
            alice.wait_for_selector("#rate:not([hidden])")
            assert alice.inner_text("#rater-name") == "alice" and alice.inner_text("#text-a") == shown
            assert alice.inner_text("#counts").startswith("2 rated")
            alice.wait_for_selector("main[aria-busy='false']")
            alice.keyboard.press("p")
            alice.wait_for_function(
                "() => document.querySelector('#note').textContent.includes('earlier rating')"
            )
            assert alice.get_attribute("#card-a .scores button[data-score='0']", "aria-pressed") == "true"
            assert alice.get_attribute(".prefs button[data-pref='b']", "aria-pressed") == "true"
            alice.wait_for_selector("main[aria-busy='false']")
            alice.keyboard.press("2")  # revise A's score from 0 to 2
            alice.keyboard.press("Enter")
            alice.wait_for_function("() => document.querySelector('#note').textContent === 'Saved.'")

            # The server is killed and started again (same address): the pages carry on where they were.
            port = server.url.rstrip("/").rsplit(":", 1)[1]
            server.stop(signal.SIGKILL)
            server = RateProcess(ev, started, "overlap=0.34", "seed=2", f"port={port}")
            for page in (alice, bob):
                page.goto(server.url)
                page.wait_for_selector("#rate:not([hidden])")
            assert alice.inner_text("#counts").startswith("2 rated")

            # Everyone rates the rest; the markup answer and prompts are shown as text and run nothing.
            for _ in range(40):
                progressed = False
                for page in (alice, bob):
                    if not page.is_hidden("#done"):
                        continue
                    rate_by_keys(page, 1, 1, "t")
                    progressed = True
                if not progressed:
                    break
            assert not alice.is_hidden("#done") and not bob.is_hidden("#done")
            assert seen["markup"]
            for page in (alice, bob):
                assert page.evaluate("() => window.__pwned") is None
                assert (
                    page.locator(
                        "#turns script, #turns img, #answers script, #answers img, #answers a"
                    ).count()
                    == 0
                )
            assert errors == []
            alice.screenshot(path=str(shots / "done.png"))
        finally:
            browser.close()
    printed = server.stop(signal.SIGINT)  # Ctrl-C
    assert "Human ratings:" in printed and "alice" in printed

    # What the store and the tables say.
    book = RatingBook(ev, overlap=0.34, seed=2)
    ratings = book.ratings()
    per_rater = {r: [x for x in ratings if x["rater"] == r] for r in ("alice", "bob")}
    assert len(ratings) == 12 + len(book.shared)
    assert {x["item"] for x in ratings} == set(book.order)
    first_two = sorted(per_rater["alice"], key=lambda x: x["id"])
    revised = [x for x in first_two if x["preference"] != "tie"]
    assert len(revised) == 2
    a_then_b = [
        (x["score_model"], x["score_baseline"])
        if x["left"] == "model"
        else (x["score_baseline"], x["score_model"])
        for x in revised
    ]
    assert sorted(a_then_b) == [(2, 2), (3, 1)]  # the second one revised from (0, 2) to (2, 2)
    book.close()
    result = json.loads((ev / "eval.json").read_text())
    assert result["human"]["raters"] == ["alice", "bob"]
    assert result["human"]["agreement"]["pairs_rated_by_several"] == len(
        [i for i in book.shared if sum(x["item"] == i for x in ratings) == 2]
    )


def test_skip_after_back_keeps_the_rating_and_others_pairs_are_refused(ev):
    book = RatingBook(ev, overlap=0.0, seed=0, max_pairs=10)
    view = book.next_pair("alice")
    book.rate("alice", view["item"], 3, 1, "a")
    back = book.previous("alice", None)
    assert back["item"] == view["item"]
    assert book.skip("alice", back["item"]) is None  # "Next" on a revisited pair: the rating stays
    assert len(book.ratings()) == 1 and book.progress("alice")["skipped"] == 0
    assert book.next_pair("bob")["item"] != view["item"]  # and the pair is not released to another rater
    with pytest.raises(RatingError, match="another rater"):
        book.rate("bob", view["item"], 0, 0, "tie")
    outside = next(p.item for p in book.pairs if p.item not in book.order_set)  # beyond max_pairs
    with pytest.raises(RatingError, match="not offered"):
        book.rate("alice", outside, 1, 1, "tie")
    book.close()


def test_rating_one_model_keeps_the_others_ratings(built, tmp_path):
    # An eval of two models: rate one of them (models=[...]); ratings of the other are still counted, not stale.
    ev = Path(shutil.copytree(built["eval"], tmp_path / "ev2"))
    other = str(built["root"] / "other")
    args = [a for a in built["args"] if not a.startswith("output_dir=") and a != other]
    models = json.dumps([other, f"again={other}"])  # a second label for the same model: its own answers
    assert iopo_main([*args, f"models={models}", f"output_dir={ev}"]) == 0
    book = RatingBook(ev, overlap=0.0)
    assert {p.model for p in book.pairs} == {"other", "again"}
    _rate_all(book, ["alice"], lambda r, v: (2, 2, "tie"))
    book.close()
    only = RatingBook(ev, overlap=0.0, models=["again"])
    assert {only.by_item[i].model for i in only.order} == {"again"}
    summary = book_summary(only, n_boot=50)
    assert only.stale_ratings() == 0 and set(summary["models"]) == {"other", "again"}
    assert summary["models"]["other"]["pairs_rated"] == summary["models"]["other"]["pairs"] == 12
    only.close()


# ---------------------------------------------------------------- promises kept (trust, item 6)


def test_a_rater_cannot_predict_the_side_from_anything_the_page_sends(ev):
    """Sides come from the store's random secret: the seed (public, default 0), the rater's name and the pair id
    the page sends predicted them before (8 of 8). Now rules made of those inputs guess at chance over 240 draws,
    and two stores of the same answers lay their sides out differently. (What the answers say is another matter:
    a rater who knows the model writes longer answers can guess from reading them, blind or not.)"""
    import hashlib

    from iopo.io.store import text_key

    book = RatingBook(ev, overlap=1.0, seed=0)
    guesses = {
        "old rule (seed, name, id)": lambda r, v: (
            int(text_key(0, "left", r, v["item"])[:13], 16) / 16**13 < 0.5
        ),
        "hash of the id": lambda r, v: int(hashlib.sha256(v["item"].encode()).hexdigest(), 16) % 2 == 0,
        "parity of the name and the id": lambda r, v: (len(r) + int(v["item"], 16)) % 2 == 0,
    }
    right = {name: 0 for name in guesses}
    n = 0
    for rater in [f"rater{i}" for i in range(20)]:
        while (view := book.next_pair(rater)) is not None:
            model_left = book.left_side(rater, view["item"]) == "model"
            for name, guess in guesses.items():
                right[name] += guess(rater, view) == model_left
            n += 1
            book.skip(rater, view["item"])
    assert n == 20 * len(book.order) and n >= 200
    for name, hits in right.items():  # chance is n/2; 4 standard deviations either way
        assert abs(hits - n / 2) <= 4 * (n / 4) ** 0.5, (name, hits, n)
    layout = {(r, i): book.left_side(r, i) for r in ("a", "b") for i in book.order}
    book.close()
    other = ev.parent / "other-ev"
    shutil.copytree(ev, other, ignore=shutil.ignore_patterns("store.sqlite*"))
    copy = RatingBook(other, overlap=1.0, seed=0)
    assert copy.order != book.order or {(r, i): copy.left_side(r, i) for r, i in layout} != layout
    copy.close()


@pytest.mark.parametrize(
    ("overlap", "shared"), [(0.2, 3), (0.25, 3), (0.5, 6), (0.01, 1), (0.0, 0), (1.0, 12)]
)
def test_the_overlap_is_exactly_the_share_asked_rounded_up(ev, overlap, shared):
    book = RatingBook(ev, overlap=overlap, seed=5)
    assert len(book.order) == 12 and len(book.shared) == shared
    book.close()


def test_agreement_from_few_pairs_is_printed_with_its_count_and_a_warning(ev):
    from iopo.rate.tables import format_human

    book = RatingBook(ev, overlap=0.2, seed=1)  # 3 pairs to everyone
    _rate_all(book, ["alice", "bob"], lambda r, v: (2, 1, "a"))
    summary = write_outputs(book, n_boot=20)
    text = format_human(summary, "base")
    assert summary["agreement"]["pairs_rated_by_several"] == 3 and summary["agreement"]["too_few_to_read"]
    assert "agreement on 3 pairs rated by several" in text and "fewer than 10" in text
    book.close()


def test_a_pair_held_for_another_rater_is_refused_and_nothing_is_stored(ev):
    book = RatingBook(ev, overlap=0.0, seed=2)
    view = book.next_pair("alice")  # held for alice
    with pytest.raises(RatingError, match="held for another rater"):
        book.rate("bob", view["item"], 1, 2, "b")
    with pytest.raises(RatingError, match="held for another rater"):
        book.skip("bob", view["item"])
    assert book.ratings() == [] and book.progress("bob")["skipped"] == 0
    book.rate("alice", view["item"], 1, 2, "b")  # the holder's rating is taken
    assert len(book.ratings()) == 1
    book.close()


def test_hostile_requests_get_a_4xx_and_store_nothing(served):
    """A 32,000-deep JSON body, a 401-digit `seconds`: a 400 each, nothing stored, no traceback."""
    token = served.token
    headers = {"X-IOPO-Token": token, "Content-Type": "application/json"}
    deep = ("[" * 32000 + "]" * 32000).encode()
    status, _, _ = _request(served, "/api/next", deep, headers)
    assert status == 400
    view = json.loads(_request(served, "/api/next", {"rater": "alice"}, headers)[2])["pair"]
    body = {
        "rater": "alice",
        "item": view["item"],
        "score_a": 1,
        "score_b": 2,
        "preference": "a",
        "seconds": 10**400,
    }
    status, _, reply = _request(served, "/api/rate", json.dumps(body).encode(), headers)
    assert status == 400 and b"seconds" in reply
    assert served.book.ratings() == []


def test_a_client_trickling_a_request_is_cut_at_the_deadline_with_a_408(served):
    import socket
    import time

    served.request_deadline = 1.5
    sock = socket.create_connection(("127.0.0.1", served.port), timeout=10)
    head = (
        f"POST /api/next HTTP/1.1\r\nHost: 127.0.0.1:{served.port}\r\nX-IOPO-Token: {served.token}\r\n"
        "Content-Type: application/json\r\nContent-Length: 40\r\n\r\n"
    )
    sock.sendall(head.encode())
    started, reply = time.monotonic(), b""
    try:
        for char in '{"rater": "alice"':  # one byte every 0.5 s: each within the per-read timeout
            sock.sendall(char.encode())
            time.sleep(0.5)
    except OSError:  # the server cut the connection
        pass
    while chunk := sock.recv(4096):
        reply += chunk
    sock.close()
    assert reply.startswith(b"HTTP/1.0 408") and time.monotonic() - started < 6
    assert served.book.progress("alice")["left"] == len(served.book.order)  # nothing was claimed


def test_the_page_reads_right_to_left_answers_and_says_when_the_server_is_gone(served):
    status, _, page = _request(served, "/")
    text = page.decode()
    assert status == 200 and text.count('dir="auto"') >= 2 and 'text.dir = "auto"' in text
    assert "does not answer" in text and "still running" in text
