"""What XOA_URL becomes: the JSON-RPC WebSocket URL (shared/xo/transport.py api_url) and the REST base
(shared/xo/rest.py rest_url), side by side; both refuse other schemes with an error naming the fix."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from shared.xo.rest import rest_url
from shared.xo.transport import api_url


@pytest.mark.parametrize(("convert", "given", "expected"), [
    (api_url, "https://xo.example.org", "wss://xo.example.org/api/"),
    (api_url, "http://10.0.0.1:8080/", "ws://10.0.0.1:8080/api/"),
    (api_url, "ws://127.0.0.1:9000/api/", "ws://127.0.0.1:9000/api/"),
    (api_url, "xo.example.org", "wss://xo.example.org/api/"),
    (rest_url, "https://xo.example.org", "https://xo.example.org/rest/v0"),
    (rest_url, "xo.example.org", "https://xo.example.org/rest/v0"),
    (rest_url, "https://xo.example.org/", "https://xo.example.org/rest/v0"),
    (rest_url, "ws://127.0.0.1:8080/api/", "http://127.0.0.1:8080/rest/v0"),
    (rest_url, "wss://xo.example.org/xo/api", "https://xo.example.org/xo/rest/v0"),
    (rest_url, "http://10.0.0.1:80/rest/v0/", "http://10.0.0.1:80/rest/v0"),
])
def test_xoa_url_forms(convert: Callable[[str], str], given: str, expected: str) -> None:
    assert convert(given) == expected


@pytest.mark.parametrize(("convert", "message"), [
    (api_url, "XOA_URL"),
    (rest_url, "must look like https://xo.example.org"),
])
def test_other_schemes_are_refused(convert: Callable[[str], str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        convert("ftp://xo")
