"""A store URL's problems never quote its password."""

from __future__ import annotations

import pytest

from router.config.store_url import parse_store_url


@pytest.mark.parametrize("url", [
    "redis://:canary?secret@host:6379/0",
    "redis+sentinel://:canary?secret@h1:26379,h2:26379/mymaster",
    "rediss+cluster://user:canary?secret@h1:7000",
])
def test_an_unencoded_question_mark_in_the_password_is_refused_without_quoting_it(url):
    with pytest.raises(ValueError) as info:
        parse_store_url(url)
    assert "canary" not in str(info.value) and "secret" not in str(info.value)
    assert "percent-encoded" in str(info.value)


def test_a_percent_encoded_password_parses():
    parsed = parse_store_url("redis+sentinel://:canary%3Fsecret@h1:26379/mymaster")
    assert parsed.password == "canary?secret"
