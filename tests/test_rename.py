"""Answers name the model as the client asked, also when the worker's chunks cut the `model` field in
two: every split point of an SSE stream and of a plain streamed body is tried."""

from __future__ import annotations

from appliance.api.inference.rename import RenameStream, rename

SERVED = "/srv/models/demo"
EVENTS = b"".join(
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"/srv/models/demo@main","choices":[{"delta":{"content":"%d"}}]}\n\n' % i
    for i in range(3)
) + b"data: [DONE]\n\n"
PLAIN = b'{"id":"c1","object":"chat.completion","model": "/srv/models/demo@main","choices":[{"message":{"content":"' + b"x" * 600 + b'"}}]}'


def _through(stream: RenameStream, pieces: list[bytes]) -> tuple[bytes, list[bytes]]:
    out = [stream.feed(p) for p in pieces]
    return b"".join(out) + stream.flush(), out


def test_sse_split_anywhere_is_renamed_and_whole_events_are_never_held() -> None:
    expected = EVENTS.replace(b'"/srv/models/demo@main"', b'"demo"')
    for cut in range(1, len(EVENTS)):
        whole, _ = _through(RenameStream(rename(SERVED, "demo"), sse=True), [EVENTS[:cut], EVENTS[cut:]])
        assert whole == expected, f"split at {cut}"
    # chunks that end at an event's end go out whole, at once
    events = [e + b"\n\n" for e in EVENTS.split(b"\n\n") if e]
    _, out = _through(RenameStream(rename(SERVED, "demo"), sse=True), events)
    assert [o.count(b"\n\n") for o in out] == [1] * len(events)


def test_plain_body_split_anywhere_is_renamed() -> None:
    expected = PLAIN.replace(b'"/srv/models/demo@main"', b'"demo"')
    for cut in range(1, len(PLAIN)):
        whole, _ = _through(RenameStream(rename(SERVED, "demo"), sse=False), [PLAIN[:cut], PLAIN[cut:]])
        assert whole == expected, f"split at {cut}"
    # byte by byte
    whole, _ = _through(RenameStream(rename(SERVED, "demo"), sse=False), [PLAIN[i : i + 1] for i in range(len(PLAIN))])
    assert whole == expected


def test_a_plain_body_without_the_key_passes_with_little_held() -> None:
    body = b'{"data":[' + b'"item",' * 2000 + b'"end"]}'
    stream = RenameStream(rename(SERVED, "demo"), sse=False)
    first = stream.feed(body[:8000])
    assert len(first) == 8000 - len(stream.held) and len(stream.held) < 8  # only a possible start of "model"
    assert first + stream.feed(body[8000:]) + stream.flush() == body
