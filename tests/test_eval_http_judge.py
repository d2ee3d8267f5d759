"""The OpenAI-compatible judge against a stub chat-completions server on 127.0.0.1 (real HTTP)."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dora_engine.errors import UserValueError
from dora_engine.eval.comparison import Comparison
from dora_engine.eval.http_judge import ChatJudge, ChatOptions, JudgeEndpointError, parse_answer, redact
from dora_engine.eval.judges import make_judge


class StubServer:
    """Answers like a judge that prefers the response containing GOOD; fails the first ``fail_first`` calls."""

    def __init__(self, fail_first: int = 0, status: int = 500):
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.fail_first = fail_first
        self.status = status
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                stub.headers.append(dict(self.headers))
                if self.path != "/v1/chat/completions":
                    return self._reply(404, {"error": "not found"})
                if len(stub.requests) <= stub.fail_first:
                    return self._reply(stub.status, {"error": "try again"})
                return self._reply(200, {"choices": [{"message": {"role": "assistant",
                                                                  "content": stub.answer(body)}}]})

            def _reply(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @staticmethod
    def answer(body: dict) -> str:
        user = body["messages"][-1]["content"]
        if "MALFORMED" in user:
            return "I would say the first one"
        first, second = re.search(r"\[Response A\]\n(.*)\n\n\[Response B\]\n(.*)\n\n", user, re.S).groups()
        if "GOOD" in first and "GOOD" not in second:
            return "A"
        if "GOOD" in second and "GOOD" not in first:
            return " b. "
        return "(C)"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _comparisons() -> list[Comparison]:
    items = []
    for i in range(12):
        kind = i % 4
        policy, golden = {0: ("GOOD p", "meh g"), 1: ("meh p", "GOOD g"), 2: ("same", "same too"),
                          3: ("GOOD p", "meh g")}[kind]
        prompt = "MALFORMED prompt" if kind == 3 else f"prompt {i}"
        items.append(Comparison(f"id{i}", prompt, f"{policy} {i}", f"{golden} {i}"))
    return items


EXPECTED = ["win", "lose", "tie", "error"] * 3


def test_parse_answer_accepts_single_letters_only():
    assert [parse_answer(t) for t in ("A", " b. ", "(C)", "'a'", "**B**")] == ["A", "B", "C", "A", "B"]
    assert [parse_answer(t) for t in ("", "AB", "Answer: A", "D", "A because", None)] == [None] * 6


def test_verdicts_follow_the_judge_whatever_the_order(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "unused")
    with StubServer() as stub:
        judge = ChatJudge(
            "stub-model", ChatOptions(base_url=stub.url, api_key="sk-test", cache_dir=tmp_path, seed=5, workers=3)
        )
        comparisons = _comparisons()
        assert judge.judge(comparisons) == EXPECTED
    swaps = {judge.swapped(c) for c in comparisons}
    assert swaps == {True, False}  # both orders were shown
    assert len(stub.requests) == len(comparisons)
    assert all(h["Authorization"] == "Bearer sk-test" for h in stub.headers)
    assert {r["model"] for r in stub.requests} == {"stub-model"}


def test_environment_configures_the_endpoint_and_retries_after_server_errors(tmp_path, monkeypatch):
    with StubServer(fail_first=2) as stub:
        monkeypatch.setenv("OPENAI_BASE_URL", stub.url)
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        judge = make_judge("openai:stub-model", chat=ChatOptions(cache_dir=tmp_path, backoff_s=0.001, workers=1))
        assert judge.judge(_comparisons()[:1]) == ["win"]
    assert judge.requests_made == 3 and len(stub.requests) == 3
    assert "Authorization" not in stub.headers[0]


def test_gives_up_after_max_retries_and_stops_on_client_errors(tmp_path):
    with StubServer(fail_first=100) as stub:
        judge = ChatJudge("m", ChatOptions(base_url=stub.url, cache_dir=tmp_path, max_retries=2, backoff_s=0.001))
        with pytest.raises(RuntimeError, match="gave up after 3 attempts"):
            judge.judge(_comparisons()[:1])
        assert len(stub.requests) == 3
    with StubServer(fail_first=100, status=401) as stub:
        judge = ChatJudge("m", ChatOptions(base_url=stub.url, cache_dir=tmp_path, max_retries=5, backoff_s=0.001))
        with pytest.raises(RuntimeError, match="HTTP 401"):
            judge.judge(_comparisons()[:1])
        assert len(stub.requests) == 1


def test_cache_makes_a_rerun_free(tmp_path):
    comparisons = _comparisons()
    with StubServer() as stub:
        cached = ChatOptions(base_url=stub.url, cache_dir=tmp_path / "cache", seed=1)
        first = ChatJudge("m", cached).judge(comparisons)
        assert len(stub.requests) == len(comparisons)
        again = ChatJudge("m", ChatOptions(base_url=stub.url, cache_dir=tmp_path / "cache", seed=1))
        assert again.judge(comparisons) == first == EXPECTED
        assert again.requests_made == 0 and len(stub.requests) == len(comparisons)
        other_model = ChatJudge("m2", ChatOptions(base_url=stub.url, cache_dir=tmp_path / "cache", seed=1))
        other_model.judge(comparisons[:2])
        assert other_model.requests_made == 2
    assert not list((tmp_path / "cache").glob(".*.tmp"))


def test_bad_configuration_is_reported():
    with pytest.raises(ValueError, match="unknown judge template"):
        ChatJudge("m", ChatOptions(base_url="http://127.0.0.1:9", template="witty"))
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        ChatJudge("m", ChatOptions(base_url="https://api.openai.com/v1", api_key=""))
    with pytest.raises(ValueError, match="unknown judge"):
        make_judge("gpt4")


# ----------------------------------------------------------------------- errors: one line, no credentials


class EchoServer:
    """A proxy that answers every request with ``status`` and a body echoing the request's headers."""

    def __init__(self, status: int):
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                self.rfile.read(int(self.headers["Content-Length"]))
                echo = {"error": "denied", "authorization": self.headers["Authorization"],
                        "headers": dict(self.headers)}
                body = json.dumps(echo).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


KEY = "sk-live-0123456789abcdef"


@pytest.mark.parametrize("status", [401, 503])
def test_judge_http_errors_are_one_line_with_status_and_no_header_value(tmp_path, status):
    server = EchoServer(status)
    try:
        options = ChatOptions(base_url=server.url, api_key=KEY, cache_dir=tmp_path, max_retries=1, backoff_s=0.001)
        judge = ChatJudge("m", options)
        with pytest.raises(JudgeEndpointError) as err:
            judge.judge([Comparison("a", "prompt", "x", "y")])
    finally:
        server.close()
    message = str(err.value)
    assert "\n" not in message and f"HTTP {status}" in message and "denied" in message
    assert KEY not in message and "Bearer" not in message.replace("Bearer [redacted]", "")
    assert "[redacted]" in message


def test_judge_connection_failures_are_one_line():
    judge = ChatJudge("m", ChatOptions(base_url="http://127.0.0.1:9/v1", api_key=KEY, max_retries=1, backoff_s=0.001))
    with pytest.raises(JudgeEndpointError, match=r"gave up after 2 attempts \(.*refused") as err:
        judge.judge([Comparison("a", "prompt", "x", "y")])
    assert "\n" not in str(err.value) and KEY not in str(err.value)
    with pytest.raises(UserValueError, match="must be an http:// or https:// URL"):
        ChatJudge("m", ChatOptions(base_url="127.0.0.1:9/v1"))


def test_redact_removes_credentials_and_keeps_the_rest():
    echoed = ('Authorization: Bearer abc.def-123\nX-Api-Key: k1\n'
              '{"message": "Incorrect API key provided: sk-proj-zzzzzzzz9"}')
    text = redact(echoed, ["k1-not-there"])
    assert "abc.def-123" not in text and "k1" not in text and "sk-proj" not in text
    assert "Incorrect API key provided" in text and "\n" not in text
    assert len(redact("x" * 1000)) == 200
