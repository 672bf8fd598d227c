"""README.md's receiver snippet is what an integrator pastes into their endpoint: it must
accept what the service signs (one secret, or two during a rotation's grace) and refuse a
changed body, another secret and an old timestamp."""

import re
import time
from collections.abc import Callable
from pathlib import Path

from sync.webhooks import sign

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_verify() -> Callable[..., bool]:
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (snippet,) = [b for b in blocks if "def verify(" in b]
    namespace: dict[str, object] = {}
    exec(snippet, namespace)  # README's own example, as a receiver runs it
    return namespace["verify"]  # type: ignore[return-value]


def test_the_readme_receiver_accepts_what_the_service_signs_and_nothing_else() -> None:
    verify = readme_verify()
    body, now = b'{"topic": "parcel.in_locker"}', int(time.time())
    header = sign("s3cret-of-the-subscription", now, body)
    assert verify("s3cret-of-the-subscription", header, body)
    assert not verify("s3cret-of-the-subscription", header, body + b" ")
    assert not verify("another-secret", header, body)
    old = sign("s3cret-of-the-subscription", now - 3600, body)
    assert not verify("s3cret-of-the-subscription", old, body)
    # During a rotation's grace both secrets sign: t=...,v1=<new>,v1=<old>.
    rotating = (
        f"{sign('new-secret', now, body)},v1={sign('old-secret', now, body).split('v1=')[1]}"
    )
    assert verify("new-secret", rotating, body) and verify("old-secret", rotating, body)
    assert not verify("s3cret-of-the-subscription", "t=abc,v1=00", body)
    # A stamp too long for a float, or for int() (4,300 digits), is refused, not raised:
    # a stranger's header made the receiver answer 500.
    for digits in (400, 5000):
        assert not verify("s3cret-of-the-subscription", f"t={'9' * digits},v1=00", body)
