"""The worker API's encoding and the chat's validation, without processes."""

from __future__ import annotations

import pytest

from businessworker import api, chat
from businessworker.app import App, Request


def test_data_is_encoded_once_as_compact_ascii_json() -> None:
    assert api.encode("as is") == "as is"
    assert api.encode(b"\x00") == b"\x00"
    assert api.encode({"name": "猪猪", "n": [1]}) == '{"name":"\\u732a\\u732a","n":[1]}'


def test_group_and_uid_keys() -> None:
    assert api._key(5) == "5" and api._key("g") == "g"
    with pytest.raises(TypeError):
        api._key(True)
    with pytest.raises(TypeError):
        api._key(1.5)  # type: ignore[arg-type]


def test_the_api_refuses_to_run_outside_a_worker() -> None:
    with pytest.raises(RuntimeError):
        api.send_to_all("x")


@pytest.mark.parametrize(
    ("raw", "code"),
    [("{", "bad_json"), ("[]", "not_object"), ("3", "not_object"), (b"{}", "bad_json")],
)
def test_chat_parse_errors(raw: str | bytes, code: str) -> None:
    with pytest.raises(chat.ChatError) as info:
        chat.parse(raw)
    assert info.value.code == code


@pytest.mark.parametrize("value", [True, 1.5, None, "12x", "", "9" * 17, [1]])
def test_chat_uid_must_be_a_number(value: object) -> None:
    with pytest.raises(chat.ChatError):
        chat._uid(value)


def test_chat_uid_accepts_numbers_and_decimal_strings() -> None:
    assert chat._uid(42) == 42 and chat._uid("42") == 42


def test_an_app_needs_at_least_one_callback() -> None:
    app = App.load("businessworker.chat")
    assert app.name == "businessworker.chat"
    assert app.on_connect(1, {}) is None  # undefined callbacks do nothing
    with pytest.raises(ValueError):
        App.load("json")


def test_request_helpers() -> None:
    request = Request("/p", "a=1&a=2&b=x", [("X-Token", "t")], "127.0.0.1:5")
    assert request.header("x-token") == "t" and request.header("nope") is None
    assert request.params == {"a": ["1", "2"], "b": ["x"]}


def test_callers_sharing_an_answer_of_sessions_get_their_own_copies() -> None:
    from businessworker.links import GatewayLinks
    from gateway import protocol as p

    links = GatewayLinks(None, "w", dict, None)  # type: ignore[arg-type]  # no link is made
    answer = [[2, p.pack_session({"name": "b"})], [1, p.pack_session({"name": "a"})]]
    first = links.sessions([answer, None])
    second = links.sessions([answer, None])  # the same answer object: decoded once
    assert list(first) == [1, 2] and first == second
    first[1]["name"] = "changed by the app"
    assert second[1] == {"name": "a"} and links.sessions([answer, None])[1] == {"name": "a"}
    fresh = [[3, p.pack_session({"name": "c"})]]  # another answer: decoded afresh
    assert links.sessions([fresh]) == {3: {"name": "c"}}
    assert links.sessions([[[3, p.EMPTY_SESSION]]]) == {3: {}}
