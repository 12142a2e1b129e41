"""Every operation of the API's OpenAPI document, sent what Python's json module accepts and JSON,
UTF-8 or our storage do not: bodies nested deep, huge strings and arrays, lone surrogates and NUL,
right-to-left and combining marks, overlong numbers, NaN and Infinity, duplicate keys; and the
same in query strings and path parameters.

schemathesis makes a request that fits each operation's schema; hypothesis then puts one hostile
value somewhere in it (a leaf of the body, a new field, the whole body, a query or path value) and
the request is sent raw. Every answer must be: no 5xx, no traceback text, strict JSON (no NaN),
and a 400 must say which field it is about (`field`; null: the body as a whole).
"""

from __future__ import annotations

import json
import socket
import urllib.parse

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner import strict_json

MARK = "\x00hostile\x00"  # stands in the serialized body where the raw hostile text goes
EXAMPLES_PER_OPERATION = 12

# raw JSON texts: each is a value Python's json module reads (or almost: the NUL byte, the cut surrogate pair)
HOSTILE_JSON = [
    "[" * 65 + "]" * 65, "[" * 1000 + "]" * 1000, '{"a":' * 3000 + "1" + "}" * 3000, "[" * 200_000 + "]" * 200_000,
    '"' + "a" * 900_000 + '"', "[" + "0," * 400_000 + "0]",
    '{"' + '": 1, "'.join(f"k{i}" for i in range(50_000)) + '": 1}',
    '"\\ud800"', '"a\\udfffb"', '"\\ud83d"', '"\\ude00\\ud83d"', '"a\\u0000b"', '"a\x00b"', '"\\u0000"',
    '"\\u202eevil\\u202c"', '"e\\u0301\\u0301\\u0301"', '"\\u200f\\u0627\\u0644"', '"\\ufeffbom"', '"\\u200d"',
    '"\\uffff\\ufffe"', '"\\U0001F600"', '"\\ud83d\\ude00"',
    "1" * 5000, "-" + "9" * 30, "1e99999", "-1e99999", "1e-99999", "0." + "0" * 5000 + "1", "18446744073709551616",
    "NaN", "Infinity", "-Infinity", "1.7976931348623157e309",
    "true", "null", "{}", "[]", '""',
]
# query and path values: text, URL-encoded when sent
HOSTILE_TEXT = ["\x00", "a\x00b", "\ud800", "\u202e\u0301", "e\u0301" * 100, "a" * 20_000, "%00", "%ED%A0%80",
                "../../etc/passwd", "1" * 400, "-1", "NaN", "Infinity", "1e400", "[]", "{}", "\ufeff"]


def _json_paths(value, path=()):
    """Every place in a JSON value a hostile value can go: each leaf, each container, a new key."""
    yield path
    if isinstance(value, dict):
        yield (*path, "\x01new")
        for key, item in value.items():
            yield from _json_paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _json_paths(item, (*path, index))


def _placed(value, path):
    """`value` with MARK at `path` (a copy)."""
    if not path:
        return MARK
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        key = "injected" if head == "\x01new" else head
        return {**value, key: _placed(value.get(key), rest)}
    copy = list(value)
    copy[head] = _placed(copy[head], rest)
    return copy


def _with_duplicate(text: str) -> str:
    """A serialized object with its first member repeated."""
    document = json.loads(text)
    if not isinstance(document, dict) or not document:
        return text
    key, item = next(iter(document.items()))
    return "{" + json.dumps(key) + ": " + json.dumps(item) + ", " + text[1:]


@st.composite
def hostile_body(draw, body):
    """The raw bytes of `body` with one hostile thing in it."""
    if not isinstance(body, (dict, list)) or draw(st.integers(0, 9)) == 0:
        body = {}
    if isinstance(body, dict) and body and draw(st.booleans()) and draw(st.booleans()):
        return _with_duplicate(json.dumps(body)).encode("utf-8")
    paths = list(_json_paths(body))
    path = draw(st.sampled_from(paths))
    hostile = draw(st.sampled_from(HOSTILE_JSON))
    text = json.dumps(_placed(body, path)).replace(json.dumps(MARK), hostile, 1)
    return text.encode("utf-8", "surrogatepass")


def _quoted(value, safe: str) -> str:
    """URL-encoded UTF-8 of any text, lone surrogates included (as their three bytes)."""
    return urllib.parse.quote(str(value).encode("utf-8", "surrogatepass"), safe=safe)


def check_answer(response: requests.Response, what: str) -> None:
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text[:500]}"
    assert "Traceback" not in response.text, f"{what}: {response.text[:2000]}"
    if "json" in response.headers.get("Content-Type", ""):
        body = strict_json.loads(response.content)  # no NaN, no duplicate keys, no lone surrogates
        if response.status_code >= 400:
            assert isinstance(body, dict) and isinstance(body.get("error"), str), f"{what}: {body}"
        if response.status_code == 400:
            assert "field" in body, f"{what}: a 400 must name its field (null: the body): {body}"


def _operations(schema):
    found = []
    for result in schema.get_all_operations():
        operation = result.ok()
        found.append(operation)
    return found


def test_no_hostile_body_query_or_path_value_gets_a_5xx(project):
    proc = project.up()
    base = f"http://127.0.0.1:{project.api_port}"
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json", wait_for_schema=30)
    session = requests.Session()
    operations = _operations(schema)
    assert len(operations) > 40
    sent = 0

    for operation in operations:
        method = operation.method.upper()
        reads_json = method in ("POST", "PUT", "PATCH") and (
            operation.definition.raw.get("requestBody") is None
            or "application/json" in operation.definition.raw["requestBody"].get("content", {}))

        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(), data=st.data())
        def attack(case, data):
            nonlocal sent
            path_parameters = dict(case.path_parameters or {})
            query = dict(case.query or {})
            where = data.draw(st.sampled_from(["body", "query", "path"] if reads_json else ["query", "path"]))  # noqa: B023 (called in this iteration)
            raw = None
            if reads_json:  # noqa: B023 (called in this iteration)
                body = case.body if isinstance(case.body, (dict, list)) else {}
                raw = data.draw(hostile_body(body)) if where == "body" else json.dumps(body).encode()
            if where == "query":
                name = data.draw(st.sampled_from([*query, "injected"] if query else ["injected", "limit"]))
                query[name] = data.draw(st.sampled_from(HOSTILE_TEXT))
            elif where == "path" and path_parameters:
                name = data.draw(st.sampled_from(sorted(path_parameters)))
                path_parameters[name] = data.draw(st.sampled_from(HOSTILE_TEXT))
            path = operation.path  # noqa: B023 (called in this iteration)
            for name, value in path_parameters.items():
                path = path.replace("{" + name + "}", _quoted(value, safe=""))
            url = base + path
            if query:
                url += "?" + "&".join(f"{_quoted(k, safe='')}={_quoted(v, safe='%')}" for k, v in query.items())
            headers = {"Content-Type": "application/json"} if raw is not None else {}
            response = session.request(method, url, data=raw, headers=headers, timeout=60)  # noqa: B023 (called in this iteration)
            sent += 1
            check_answer(response, f"{method} {path} ({where}: {(raw or b'')[:120]!r} query {str(query)[:120]})")  # noqa: B023 (called in this iteration)

        attack()

    assert sent > 40 * EXAMPLES_PER_OPERATION // 2, sent
    assert project.api.status("/health") == 200
    assert "Traceback" not in proc.output, proc.output[-5000:]


def raw_request(port: int, request: bytes) -> bytes:
    """The API's answer to these bytes, head and body (b"" when it closes without one). Read by its
    Content-Length: a server need not close a connection whose request it did not read to the end."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := connection.recv(65536)):
            answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), None)
        while length is not None and len(body) < length and (chunk := connection.recv(65536)):
            body += chunk
    return head + b"\r\n\r\n" + body if head else b""


BODY = b'{"name": "x"}'
HEADERS = [  # raw header lines
    ("200 headers", b"".join(b"X-Many-%d: x\r\n" % i for i in range(200))),
    ("a 60 KB header", b"X-Long: " + b"a" * 60_000 + b"\r\n"),
    ("NUL in a header", b"X-Nul: a\x00b\r\n"),
    ("UTF-8 and RTL in a header", "X-Text: \u202eevil e\u0301\r\n".encode()),
]


def _requests(port: int) -> list[tuple[str, bytes]]:
    head = b"Host: 127.0.0.1:%d\r\nContent-Type: application/json\r\nConnection: close\r\n" % port
    fixed = b"Content-Length: %d\r\n" % len(BODY)
    chunk = b"[" + b"1," * (1 << 20) + b"1]"
    made = [(name, b"POST /v1/datasets HTTP/1.1\r\n" + head + fixed + lines + b"\r\n" + BODY)
            for name, lines in HEADERS]
    made.append(("a 100 KB query string", b"POST /v1/datasets?" + b"&".join(b"k%d=v" % i for i in range(12_000))
                 + b" HTTP/1.1\r\n" + head + fixed + b"\r\n" + BODY))
    made.append(("a 2 MB chunked body (no length to refuse it by)", b"POST /v1/datasets HTTP/1.1\r\n" + head
                 + b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(chunk) + chunk + b"\r\n0\r\n\r\n"))
    return made


def test_hostile_headers_and_request_lines_are_a_4xx_or_served(project):
    project.up()
    for name, request in _requests(project.api_port):
        answer = raw_request(project.api_port, request)
        if answer:  # a server may also close a request it will not read; it must keep serving the others
            status = int(answer.split(b" ", 2)[1])
            assert status < 500 and b"Traceback" not in answer, (name, answer[:2000])
            if name.startswith("a 2 MB"):
                assert status == 413, (name, answer[:500])
        assert project.api.status("/health") == 200, name


def _form(parts: list[tuple[bytes, bytes]], boundary: bytes = b"b0undary") -> tuple[bytes, dict]:
    """A multipart body of (part headers, content) pairs."""
    body = b"".join(b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + content + b"\r\n"
                    for headers, content in parts)
    return body + b"--" + boundary + b"--\r\n", {"Content-Type": f"multipart/form-data; boundary={boundary.decode()}"}


FILE = b'Content-Disposition: form-data; name="file"; filename="a.txt"'
FORMS = [  # (id, parts): each a multipart upload a browser would never send
    ("20,000 fields", [(b'Content-Disposition: form-data; name="f%d"' % i, b"x") for i in range(20_000)]),
    ("a 2 MB field", [(b'Content-Disposition: form-data; name="chunk_size"', b"1" * (2 << 20)), (FILE, b"text")]),
    ("a 100 KB file name", [(b'Content-Disposition: form-data; name="file"; filename="' + b"a" * 100_000 + b'.txt"',
                            b"text")]),
    ("NUL and RTL in the file name", [(b'Content-Disposition: form-data; name="file"; filename="a\x00\xe2\x80\xae.txt"',
                                      b"text")]),
    ("2,000 headers in a part", [(FILE + b"".join(b"\r\nX-%d: y" % i for i in range(2000)), b"text")]),
    ("a file without an end", [(FILE, b"text")]),
]


def test_hostile_multipart_uploads_are_a_4xx(project):
    project.up()
    status, body = project.api.post("/v1/datasets", {"name": "forms"})
    assert status == 201, body
    for name, parts in FORMS:
        raw, headers = _form(parts)
        if name == "a file without an end":
            raw = raw[:-len(b"--b0undary--\r\n")]  # the closing boundary never comes
        for path in (f"/v1/datasets/{body['id']}/documents", "/v1/plugins"):
            response = requests.post(f"http://127.0.0.1:{project.api_port}{path}", data=raw, headers=headers,
                                     timeout=60)
            check_answer(response, f"{name}: {path}")
            assert response.status_code in (202, 400, 413, 415), (name, path, response.status_code, response.text[:300])
        assert project.api.status("/health") == 200, name
    before = project.api.get(f"/v1/datasets/{body['id']}/documents")[1]["documents"]
    raw, headers = _form([(FILE, b"a" * (17 << 20))])  # over UPLOAD_FILE_SIZE_LIMIT, and sent without a length
    for path in (f"/v1/datasets/{body['id']}/documents", "/v1/plugins"):
        response = requests.post(f"http://127.0.0.1:{project.api_port}{path}", data=iter([raw]), headers=headers,
                                 timeout=60)
        check_answer(response, f"chunked: {path}")
        assert response.status_code == 413, (path, response.status_code, response.text[:300])
    status, listed = project.api.get(f"/v1/datasets/{body['id']}/documents")
    assert status == 200 and listed["documents"] == before, [(d["name"], d["size"]) for d in listed["documents"]]
