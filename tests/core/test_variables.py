"""Tests for edgeloop.core.variables: recipe variable interpolation as Greengrass does it."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from edgeloop.core.recipe import Lifecycle, SkipIf, Step, StepName
from edgeloop.core.variables import InterpolationContext, interpolate, interpolate_lifecycle

ME = "com.example.Me"
DEP = "com.example.Dep"
STRANGER = "com.example.Stranger"

CTX = InterpolationContext(
    component=ME,
    artifacts_path={
        ME: "/gg/packages/artifacts/com.example.Me/1.0.0",
        DEP: "/gg/packages/artifacts/com.example.Dep/2.0.0",
        STRANGER: "/gg/packages/artifacts/com.example.Stranger/1.0.0",
    },
    decompressed_path={
        ME: "/gg/packages/artifacts-unarchived/com.example.Me/1.0.0",
        DEP: "/gg/packages/artifacts-unarchived/com.example.Dep/2.0.0",
    },
    work_path="/gg/work/com.example.Me",
    kernel_root="/gg",
    thing_name="hub-0042",
    configuration={
        ME: {
            "Message": "hello world",
            "port": 8080,
            "ratio": 0.5,
            "enabled": True,
            "nothing": None,
            "server": {"port": 1883, "host": "localhost"},
            "list": [1, "two", {"b": 2, "a": 1}],
            "a/b": "slash",
            "m~n": "tilde",
            "": "empty key",
            "unicode": "héllo",
        },
        DEP: {"server": {"port": 9000}, "name": "dep"},
        STRANGER: {"secret": "nope"},
    },
    visible=frozenset({ME, DEP}),
    work_paths={DEP: "/gg/work/com.example.Dep"},
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{artifacts:path}/main.py", "/gg/packages/artifacts/com.example.Me/1.0.0/main.py"),
        (
            "{artifacts:decompressedPath}/m",
            "/gg/packages/artifacts-unarchived/com.example.Me/1.0.0/m",
        ),
        ("cd {work:path}", "cd /gg/work/com.example.Me"),
        ("{kernel:rootPath}/bin", "/gg/bin"),
        ("--thing {iot:thingName}", "--thing hub-0042"),
        ('"{configuration:/Message}"', '"hello world"'),
        ("{configuration:/port}", "8080"),
        ("{configuration:/ratio}", "0.5"),
        ("{configuration:/enabled}", "true"),
        ("{configuration:/nothing}", "null"),
        ("{configuration:/server}", '{"host":"localhost","port":1883}'),  # compact, keys sorted
        ("{configuration:/server/port}", "1883"),
        ("{configuration:/list}", '[1,"two",{"a":1,"b":2}]'),
        ("{configuration:/list/1}", "two"),
        ("{configuration:/list/2/b}", "2"),
        ("{configuration:/a~1b}", "slash"),
        ("{configuration:/m~0n}", "tilde"),
        ("{configuration:/}", "empty key"),
        ("{configuration:/unicode}", "héllo"),
        (
            "{com.example.Dep:artifacts:path}/lib",
            "/gg/packages/artifacts/com.example.Dep/2.0.0/lib",
        ),
        (
            "{com.example.Dep:artifacts:decompressedPath}",
            "/gg/packages/artifacts-unarchived/com.example.Dep/2.0.0",
        ),
        ("{com.example.Dep:configuration:/server/port}", "9000"),
        ("{com.example.Dep:work:path}", "/gg/work/com.example.Dep"),
        ("{com.example.Me:configuration:/Message}", "hello world"),
        ("{com.example.Dep:kernel:rootPath}", "/gg"),
        (
            "{artifacts:path} {artifacts:path} {configuration:/port}",
            "/gg/packages/artifacts/com.example.Me/1.0.0 "
            "/gg/packages/artifacts/com.example.Me/1.0.0 8080",
        ),
    ],
)
def test_resolves(text: str, expected: str) -> None:
    assert interpolate(text, CTX) == expected


@pytest.mark.parametrize(
    "text",
    [
        # shell and awk text that merely contains braces
        "awk '{print $1}' file",
        "echo ${HOME} ${VAR:-default} ${VAR:+alt}",
        "f() { echo hi; }",
        "python3 -c 'print({\"a\": 1})'",
        "{}",
        "{:}",
        "{configuration:}",
        # unresolvable, left verbatim as the nucleus leaves them
        "{configuration:/missing}",
        "{configuration:/server/port/deeper}",
        "{configuration:/list/9}",
        "{configuration:/list/01}",
        "{configuration:relative}",  # not a JSON pointer
        "{configuration:/bad~2escape}",
        "{Configuration:/Message}",  # namespaces are case-sensitive
        "{artifacts:Path}",
        "{artifacts:paths}",
        "{work:root}",
        "{kernel:path}",
        "{iot:thing}",
        "{unknown:thing}",
        "{com.example.Stranger:configuration:/secret}",  # not a direct dependency
        "{com.example.Stranger:artifacts:path}",
        "{com.example.Dep:configuration:/missing}",
        "{com.example.Dep:unknown:path}",
        "{a-b:configuration:/x}",  # '-' is outside the nucleus's name pattern
        "{com.example.Dep:configuration:/x:y}",
    ],
)
def test_leaves_verbatim(text: str) -> None:
    assert interpolate(text, CTX) == text


def test_unknown_paths_are_left_verbatim() -> None:
    ctx = InterpolationContext(
        component=ME,
        artifacts_path={},
        decompressed_path={},
        work_path="/w",
        kernel_root="/k",
        thing_name="t",
        configuration={},
        visible=frozenset({ME, DEP}),
    )
    for text in (
        "{artifacts:path}",
        "{artifacts:decompressedPath}",
        "{configuration:/Message}",
        "{com.example.Dep:work:path}",
        "{com.example.Dep:artifacts:path}",
    ):
        assert interpolate(text, ctx) == text


def test_mixed_text() -> None:
    script = (
        "python3 -u {artifacts:path}/main.py --port {configuration:/port} "
        "| awk '{print $1}' > ${OUT:-/dev/null} {configuration:/missing}"
    )
    assert interpolate(script, CTX) == (
        "python3 -u /gg/packages/artifacts/com.example.Me/1.0.0/main.py --port 8080 "
        "| awk '{print $1}' > ${OUT:-/dev/null} {configuration:/missing}"
    )


def test_own_variables_are_filled_before_other_components() -> None:
    # The nucleus's order: a value that itself names a dependency variable gets filled in too.
    ctx = InterpolationContext(
        component=ME,
        artifacts_path={DEP: "/dep"},
        decompressed_path={},
        work_path="/w",
        kernel_root="/k",
        thing_name="t",
        configuration={ME: {"where": "{com.example.Dep:artifacts:path}"}},
        visible=frozenset({ME, DEP}),
    )
    assert interpolate("{configuration:/where}", ctx) == "/dep"


def test_interpolate_lifecycle() -> None:
    lifecycle = Lifecycle(
        setenv={"ROOT": "{kernel:rootPath}", "KEEP": "${HOME}"},
        steps={
            StepName.INSTALL: Step(
                script="pip install -r {artifacts:path}/req.txt",
                timeout=120.0,
                skipif=SkipIf("exists", "{work:path}/done"),
            ),
            StepName.RUN: Step(
                script="python3 {artifacts:path}/main.py",
                setenv={"PORT": "{configuration:/port}"},
                requires_privilege=True,
            ),
        },
    )
    result = interpolate_lifecycle(lifecycle, CTX)
    assert result.setenv == {"ROOT": "/gg", "KEEP": "${HOME}"}
    install = result.steps[StepName.INSTALL]
    assert install.script == "pip install -r /gg/packages/artifacts/com.example.Me/1.0.0/req.txt"
    assert install.skipif == SkipIf("exists", "/gg/work/com.example.Me/done")
    assert install.timeout == 120.0
    run = result.steps[StepName.RUN]
    assert run.setenv == {"PORT": "8080"}
    assert run.requires_privilege is True
    assert lifecycle.steps[StepName.RUN].setenv == {"PORT": "{configuration:/port}"}  # untouched


_VARIABLE = re.compile(r"\{[.\w]+:[^}]*\}", re.ASCII)
_SHELLISH = st.text(alphabet=st.sampled_from(list("{}:$/.-_ abcAZ09'\"\n~")) | st.characters())


@given(_SHELLISH)
def test_text_without_variables_is_returned_unchanged(text: str) -> None:
    assume(not _VARIABLE.search(text))
    assert interpolate(text, CTX) == text


@given(
    namespace=st.from_regex(r"[a-zA-Z_][.\w]{0,10}", fullmatch=True).filter(
        lambda ns: ns not in {"configuration", "artifacts", "work", "kernel", "iot"}
    ),
    key=st.text(alphabet=st.characters(blacklist_characters=":}"), min_size=1, max_size=10),
    before=_SHELLISH,
)
def test_unknown_namespaces_are_returned_unchanged(namespace: str, key: str, before: str) -> None:
    assume(not _VARIABLE.search(before))
    text = f"{before}{{{namespace}:{key}}}"
    assert interpolate(text, CTX) == text
