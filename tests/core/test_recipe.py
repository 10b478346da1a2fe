"""Tests for edgeloop.core.recipe: Greengrass recipes as written in the wild, good and bad."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeloop.core.errors import RecipeError
from edgeloop.core.recipe import (
    STEP_TIMEOUT_DEFAULTS,
    Artifact,
    Lifecycle,
    Manifest,
    Recipe,
    SkipIf,
    Step,
    StepName,
    current_platform,
    load_recipe,
    load_recipe_dir,
    parse_recipe,
)
from edgeloop.core.resolver import Candidate, DependencySpec
from edgeloop.core.semver import Range, Version

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "recipes"
GOOD = FIXTURES / "good"
BAD = FIXTURES / "bad"

MINIMAL: dict[str, Any] = {
    "RecipeFormatVersion": "2020-01-25",
    "ComponentName": "com.example.Minimal",
    "ComponentVersion": "1.0.0",
    "Manifests": [{"Lifecycle": {"Run": "echo hi"}}],
}


def minimal(**changes: Any) -> dict[str, Any]:
    return {**MINIMAL, **changes}


def parse(doc: dict[str, Any]) -> Recipe:
    return parse_recipe(doc, source="test.yaml")


# --- bad recipes: one file each, the error names file, field and reason ------------------

# (file, field path, a fragment of the reason)
BAD_CASES: list[tuple[str, str | None, str]] = [
    ("json_syntax.json", None, "invalid JSON at line 4, column 3"),
    ("yaml_syntax.yaml", None, "invalid YAML at line 9, column 1"),
    ("top_level_list.yaml", None, "must be a mapping at the top level, not a list"),
    ("empty.yaml", None, "must be a mapping at the top level, not null"),
    ("not_utf8.yaml", None, "not UTF-8"),
    ("missing_format_version.yaml", "RecipeFormatVersion", "RecipeFormatVersion is required"),
    ("wrong_format_version.json", "RecipeFormatVersion", "unsupported recipe format '2021-01-25'"),
    ("missing_name.yaml", "ComponentName", "ComponentName is required"),
    ("bad_name.yaml", "ComponentName", "not a valid component name"),
    ("long_name.json", "ComponentName", "at most 128 characters"),
    ("missing_version.yaml", "ComponentVersion", "ComponentVersion is required"),
    ("version_not_semver.yaml", "ComponentVersion", "not a semantic version"),
    ("version_is_number.yaml", "ComponentVersion", "quote it in YAML"),
    ("version_part_too_big.json", "ComponentVersion", "at most 999999"),
    ("unknown_type.yaml", "ComponentType", "unknown component type 'aws.greengrass.docker'"),
    ("description_list.yaml", "ComponentDescription", "must be a string, not a list"),
    ("dependencies_list.yaml", "ComponentDependencies", "must be a mapping of component name"),
    (
        "dependency_no_requirement.yaml",
        'ComponentDependencies["com.example.Other"].VersionRequirement',
        "VersionRequirement is required",
    ),
    (
        "dependency_bad_range.json",
        'ComponentDependencies["com.example.Other"].VersionRequirement',
        "not an npm-style version range",
    ),
    (
        "dependency_bad_type.yaml",
        'ComponentDependencies["com.example.Other"].DependencyType',
        "must be HARD or SOFT, not 'OPTIONAL'",
    ),
    ("dependency_bad_name.yaml", 'ComponentDependencies["bad name!"]', "not a valid component"),
    (
        "default_config_string.yaml",
        "ComponentConfiguration.DefaultConfiguration",
        "must be a mapping (a JSON object), not a string",
    ),
    ("missing_manifests.yaml", "Manifests", "Manifests is required"),
    ("manifests_mapping.json", "Manifests", "must be a list of manifests, not a mapping"),
    ("manifests_empty.json", "Manifests", "at least one manifest"),
    ("manifest_null.yaml", "Manifests[1]", "must not be empty (null)"),
    ("manifest_name_mapping.yaml", "Manifests[0].Name", "must be a string, not a mapping"),
    ("platform_list.yaml", "Manifests[0].Platform", "must be a mapping, not a list"),
    ("platform_bad_regex.json", "Manifests[0].Platform.os", "invalid regular expression"),
    ("platform_number.yaml", "Manifests[0].Platform.architecture", "not a number"),
    ("selections_string.yaml", "Manifests[0].Selections", "must be a list of selection keys"),
    ("global_lifecycle_list.yaml", "Lifecycle", "must be a mapping, not a list"),
    ("global_lifecycle_bad_timeout.yaml", "Lifecycle.key1.Install.Timeout", "positive number"),
    ("lifecycle_string.yaml", "Manifests[0].Lifecycle", "must be a mapping, not a string"),
    ("step_list.yaml", "Manifests[0].Lifecycle.Run", "must be a script (a string) or a mapping"),
    ("step_no_script.json", "Manifests[0].Lifecycle.Install.Script", "Script is required"),
    ("script_mapping.yaml", "Manifests[0].Lifecycle.Run.Script", "must be a string"),
    ("timeout_negative.yaml", "Manifests[0].Lifecycle.Run.Timeout", "positive number"),
    ("timeout_text.json", "Manifests[0].Lifecycle.Install.Timeout", "number of seconds"),
    ("timeout_zero_lowercase.yaml", "manifests[0].lifecycle.shutdown.timeout", "positive number"),
    (
        "privilege_bad.yaml",
        "Manifests[0].Lifecycle.Install.RequiresPrivilege",
        "must be true or false, not 'sometimes'",
    ),
    ("setenv_string.yaml", "Manifests[0].Lifecycle.Setenv", "must be a mapping of variable name"),
    ("setenv_nested.json", "Manifests[0].Lifecycle.Run.Setenv.A", "must be a string"),
    ("setenv_bad_name.yaml", 'Manifests[0].Lifecycle.Setenv["A=B"]', "environment variable"),
    ("skipif_bad.yaml", "Manifests[0].Lifecycle.Install.Skipif", "is not a skip check"),
    ("duplicate_case_keys.json", "Manifests[0].Lifecycle.Run", "given more than once"),
    ("artifacts_mapping.yaml", "Manifests[0].Artifacts", "must be a list of artifacts"),
    ("artifact_no_uri.yaml", "Manifests[0].Artifacts[0].URI", "URI is required"),
    ("artifact_no_scheme.json", "Manifests[0].Artifacts[0].URI", "has no scheme"),
    ("artifact_no_file.yaml", "Manifests[0].Artifacts[0].URI", "names no file"),
    ("artifact_bad_unarchive.yaml", "Manifests[0].Artifacts[0].Unarchive", "NONE or ZIP"),
    (
        "artifact_bad_permission.yaml",
        "Manifests[0].Artifacts[0].Permission.Read",
        "must be NONE, OWNER or ALL, not 'EVERYONE'",
    ),
    ("artifact_digest_not_base64.yaml", "Manifests[0].Artifacts[0].Digest", "must be base64"),
    ("artifact_digest_hex.json", "Manifests[0].Artifacts[0].Digest", "is 32 bytes"),
    (
        "artifact_bad_algorithm.yaml",
        "Manifests[0].Artifacts[0].Algorithm",
        "unsupported digest algorithm 'CRC32'",
    ),
    (
        "artifact_duplicate_name.yaml",
        "Manifests[0].Artifacts[1].URI",
        "'model.onnx' is already used by Manifests[0].Artifacts[0]",
    ),
]


def test_bad_cases_are_many_distinct_and_all_covered() -> None:
    files = [case[0] for case in BAD_CASES]
    assert len(set(files)) == len(files) >= 25
    assert len({(field, reason) for _, field, reason in BAD_CASES}) == len(BAD_CASES)
    assert sorted(p.name for p in BAD.iterdir()) == sorted(files)


@pytest.mark.parametrize(("name", "field", "reason"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_recipe_error_names_file_field_and_reason(
    name: str, field: str | None, reason: str
) -> None:
    path = BAD / name
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    err = caught.value
    assert err.source == str(path)
    assert err.field == field
    assert reason in err.reason
    message = str(err)
    assert str(path) in message and reason in message
    if field is not None:
        assert field in message


def test_syntax_errors_keep_the_parser_error_as_cause() -> None:
    with pytest.raises(RecipeError) as caught:
        load_recipe(BAD / "json_syntax.json")
    assert isinstance(caught.value.__cause__, json.JSONDecodeError)


def test_yaml_syntax_error_reports_where_the_construct_began() -> None:
    with pytest.raises(RecipeError, match=r"scanning a quoted scalar at line 8, column 12"):
        load_recipe(BAD / "yaml_syntax.yaml")


# --- good recipes ---------------------------------------------------------------------


def test_every_good_fixture_loads() -> None:
    recipes = load_recipe_dir(GOOD)
    assert [Path(r.source).name for r in recipes] == sorted(p.name for p in GOOD.iterdir())
    assert all(r.manifests for r in recipes)


def test_hello_world_json_and_yaml_agree() -> None:
    from_json = load_recipe(GOOD / "hello_world.json")
    from_yaml = load_recipe(GOOD / "hello_world.yaml")
    assert from_json.name == from_yaml.name == "com.example.HelloWorld"
    assert from_json.version == Version.parse("1.0.0")
    assert from_yaml.version == Version.parse("1.0.1")
    assert (
        from_json.default_configuration == from_yaml.default_configuration == {"Message": "world"}
    )
    assert [m.platform for m in from_json.manifests] == [m.platform for m in from_yaml.manifests]
    linux = from_yaml.select_manifest("linux", "amd64")
    assert linux is not None
    run = linux.lifecycle.steps[StepName.RUN]
    assert (
        run.script.strip()
        == 'python3 -u {artifacts:path}/hello_world.py "{configuration:/Message}"'
    )
    assert run.timeout is None and run.requires_privilege is False and run.skipif is None
    assert from_json.type == "aws.greengrass.generic"
    assert from_json.publisher == "Amazon"
    assert from_json.raw["ComponentPublisher"] == "Amazon"


def test_all_fields() -> None:
    recipe = load_recipe(GOOD / "all_fields.yaml")
    assert recipe.version == Version.parse("2.3.4-rc.1+build.7")
    assert recipe.description.startswith("Complete recipe")
    config = recipe.default_configuration
    assert config["camelCaseKey"] == "keeps its case"
    assert config["Port"] == 8080
    assert config["Nested"] == {"List": [1, "two", True, None]}
    assert "com.example.FooService:pubsub:1" in config["accessControl"]["aws.greengrass.ipc.pubsub"]

    deps = recipe.dependencies
    assert set(deps) == {
        "aws.greengrass.TokenExchangeService",
        "com.example.BarService",
        "com.example.BazService",
    }
    assert deps["aws.greengrass.TokenExchangeService"].hard is True
    assert deps["com.example.BarService"].hard is False
    assert deps["com.example.BazService"].hard is True  # HARD is the default
    assert deps["com.example.BarService"].requirement.allows(Version.parse("1.5.0"))
    assert not deps["com.example.BarService"].requirement.allows(Version.parse("2.0.0"))

    first, generic = recipe.manifests
    assert first.name == "Linux x86-64"
    assert first.platform == {"os": "linux", "architecture": "amd64"}
    life = first.lifecycle
    assert life.setenv == {"GLOBAL_VAR": "global", "PORT": "8080", "DEBUG": "false"}
    steps = life.steps
    assert set(steps) == {
        StepName.BOOTSTRAP,
        StepName.INSTALL,
        StepName.STARTUP,
        StepName.SHUTDOWN,
        StepName.RECOVER,
    }
    assert steps[StepName.BOOTSTRAP] == Step(
        script="./reboot-if-needed.sh", timeout=300.0, requires_privilege=True
    )
    assert steps[StepName.INSTALL].skipif == SkipIf("onpath", "git")
    assert steps[StepName.INSTALL].requires_privilege is True  # written as the string "true"
    assert steps[StepName.INSTALL].timeout == 600.0
    assert steps[StepName.STARTUP].timeout == 120.0
    assert steps[StepName.STARTUP].setenv == {"STEP_VAR": "step"}
    assert steps[StepName.SHUTDOWN].timeout == 30.5
    assert steps[StepName.RECOVER].timeout == 60.0
    assert steps[StepName.RECOVER].skipif == SkipIf("exists", "/var/run/foo.pid", negate=True)

    zipped, script, model = first.artifacts
    assert zipped == Artifact(
        uri="s3://DOC-EXAMPLE-BUCKET/hello_world.zip",
        digest="47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
        algorithm="SHA-256",
        unarchive="ZIP",
        read="ALL",
        execute="OWNER",
    )
    assert zipped.file_name == "hello_world.zip" and zipped.hash_name == "sha256"
    assert (script.read, script.execute, script.unarchive) == ("OWNER", "NONE", "NONE")
    assert script.digest is None and script.algorithm == "SHA-256"
    assert script.file_name == "hello-world2.py"
    assert model.file_name == "model.onnx"

    assert generic.platform == {"os": "*"}
    assert generic.lifecycle.steps[StepName.RUN].timeout == 10.0
    assert recipe.select_manifest("linux", "aarch64") is generic
    assert recipe.select_manifest("linux", "amd64") is first


def test_keys_in_any_case() -> None:
    recipe = load_recipe(GOOD / "lowercase_keys.yaml")
    assert recipe.format_version == "2020-01-25"  # unquoted in the file, still a string
    assert recipe.name == "com.example.lowercase"
    assert recipe.default_configuration == {"MixedCase": {"InnerKey": "Value"}}
    assert recipe.dependencies["com.example.HelloWorld"].hard is False
    (manifest,) = recipe.manifests
    assert manifest.lifecycle.setenv == {"A": "1"}
    install = manifest.lifecycle.steps[StepName.INSTALL]
    assert install.setenv == {"B": "2"}
    assert install.timeout == 900.0
    assert install.skipif == SkipIf("exists", "/opt/done")
    run = manifest.lifecycle.steps[StepName.RUN]
    assert run.setenv == {"C": "3"}
    assert run.script == "python3 -u {artifacts:path}/main.py"
    requirements, main = manifest.artifacts
    assert (requirements.read, requirements.execute) == ("ALL", "NONE")
    assert main.uri == "s3://bucket/lower/main.py"


@pytest.mark.parametrize("key", ["Setenv", "setenv", "setEnv", "SetEnv", "SETENV"])
def test_setenv_spellings(key: str) -> None:
    recipe = parse(
        minimal(Manifests=[{"Lifecycle": {key: {"X": "1"}, "run": {"script": "a", key: {"Y": 2}}}}])
    )
    lifecycle = recipe.manifests[0].lifecycle
    assert lifecycle.setenv == {"X": "1"}
    assert lifecycle.steps[StepName.RUN].setenv == {"Y": "2"}


def test_global_lifecycle_with_selections() -> None:
    recipe = load_recipe(GOOD / "global_lifecycle.yaml")
    arm, key2, darwin, windows = recipe.manifests
    assert arm.selections == ("arm", "all")
    assert arm.lifecycle.setenv == {"SHARED": "shared"}
    assert arm.lifecycle.steps[StepName.INSTALL].script == "echo install-all"
    assert arm.lifecycle.steps[StepName.RUN].script == "echo run-arm"  # bottom-level selection

    assert key2.lifecycle.steps == {
        StepName.INSTALL: Step(script="echo install-key2", timeout=45.0)
    }
    assert darwin.selections == ()
    assert darwin.lifecycle.steps[StepName.RUN].script == "echo run-all"
    assert windows.lifecycle.steps == {StepName.RUN: Step(script="echo windows-own-lifecycle")}

    assert recipe.select_manifest("linux", "aarch64") is arm
    assert recipe.select_manifest("linux", "amd64") is key2
    assert recipe.select_manifest("darwin", "aarch64") is darwin
    assert recipe.select_manifest("windows", "amd64") is windows


def test_selection_level_drops_non_selector_keys_like_the_nucleus() -> None:
    recipe = parse(
        minimal(
            Manifests=[{"Selections": ["a"]}, {}],
            Lifecycle={"a": {"Run": "echo a"}, "Install": "ignored beside selectors"},
        )
    )
    selected, unselected = recipe.manifests
    assert selected.lifecycle.steps == {StepName.RUN: Step(script="echo a")}
    assert unselected.lifecycle == Lifecycle()  # no "all" section to fall back on


def test_empty_manifest_lifecycle_falls_back_to_the_recipe_lifecycle() -> None:
    recipe = parse(minimal(Manifests=[{"Lifecycle": {}}], Lifecycle={"Install": "echo global"}))
    assert recipe.manifests[0].lifecycle.steps[StepName.INSTALL].script == "echo global"


def test_manifest_lifecycle_wins_over_the_recipe_lifecycle() -> None:
    recipe = parse(minimal(Lifecycle={"Install": "echo global"}))
    assert set(recipe.manifests[0].lifecycle.steps) == {StepName.RUN}


@pytest.mark.parametrize("step", list(StepName))
def test_string_step_gets_greengrass_default_timeout(step: StepName) -> None:
    recipe = parse(minimal(Manifests=[{"Lifecycle": {step.value.title(): "echo x"}}]))
    parsed = recipe.manifests[0].lifecycle.steps[step]
    assert parsed == Step(script="echo x", timeout=STEP_TIMEOUT_DEFAULTS[step])


def test_step_timeout_defaults_are_greengrass_values() -> None:
    assert dict(STEP_TIMEOUT_DEFAULTS) == {
        StepName.BOOTSTRAP: 120,
        StepName.INSTALL: 120,
        StepName.STARTUP: 120,
        StepName.RUN: None,
        StepName.SHUTDOWN: 15,
        StepName.RECOVER: 60,
    }


def test_tolerated_shapes() -> None:
    recipe = parse(
        minimal(
            Tags={"unknown": "ignored"},
            ComponentSource="arn:aws:lambda:::function:x",
            Manifests=[
                {
                    "Lifecycle": {
                        "Start": {"Script": "an unknown step, as in the Greengrass docs"},
                        "Install": None,
                        "Startup": "echo both startup",
                        "Run": {"Script": "echo and run", "Timeout": "30", "Extra": 1},
                    },
                    "Unknown": True,
                }
            ],
        )
    )
    steps = recipe.manifests[0].lifecycle.steps
    assert set(steps) == {StepName.STARTUP, StepName.RUN}
    assert steps[StepName.RUN].timeout == 30.0


def test_skipif_forms() -> None:
    def skipif(text: str) -> SkipIf | None:
        doc = minimal(Manifests=[{"Lifecycle": {"Install": {"Script": "x", "Skipif": text}}}])
        return parse(doc).manifests[0].lifecycle.steps[StepName.INSTALL].skipif

    assert skipif("onpath git") == SkipIf("onpath", "git")
    assert skipif("  exists   /tmp/a b  ") == SkipIf("exists", "/tmp/a b")
    assert skipif("!onpath python3") == SkipIf("onpath", "python3", negate=True)
    for bad in ("onpath", "Onpath git", "which git", ""):
        with pytest.raises(RecipeError, match="not a skip check"):
            skipif(bad)


@pytest.mark.parametrize(
    ("uri", "name"),
    [
        ("s3://bucket/key/x.py", "x.py"),
        ("s3://bucket/x.py", "x.py"),
        ("greengrass:model.onnx", "model.onnx"),
        ("file:///opt/models/labels.txt", "labels.txt"),
        ("https://example.com/a/b.tar.gz?version=3#frag", "b.tar.gz"),
        ("docker:repo/image:latest", "image:latest"),
    ],
)
def test_artifact_file_name(uri: str, name: str) -> None:
    assert Artifact(uri=uri).file_name == name


def test_artifacts_only_component() -> None:
    recipe = load_recipe(GOOD / "artifacts_only.yaml")
    (manifest,) = recipe.manifests
    assert manifest.platform == {}
    assert manifest.lifecycle == Lifecycle()
    assert [a.file_name for a in manifest.artifacts][:1] == ["model.tar.gz"]
    assert recipe.select_manifest("anything", "at-all") is manifest


def test_platform_matching() -> None:
    recipe = load_recipe(GOOD / "regex_platform.json")
    regex, listed, radio = recipe.manifests
    assert listed.platform["os"] == "/linux|windows/"  # a list of alternatives, folded
    assert recipe.select_manifest("linux", "aarch64") is regex
    assert recipe.select_manifest("darwin", "armv7l") is regex
    assert recipe.select_manifest("linux", "amd64") is listed
    assert recipe.select_manifest("windows", "x86") is listed
    assert recipe.select_manifest("darwin", "amd64") is None
    found = recipe.select_manifest("darwin", "amd64", attributes={"com.example.RadioModule": "v2"})
    assert found is radio


@pytest.mark.parametrize(
    ("platform", "target", "expected"),
    [
        ({}, {"os": "linux"}, True),
        ({"os": "linux"}, {"os": "linux"}, True),
        ({"os": "linux"}, {"os": "Linux"}, False),  # values are case-sensitive
        ({"OS": "linux"}, {"os": "linux"}, True),  # attribute names are not
        ({"os": "all"}, {"os": "qnx"}, True),
        ({"architecture": "any"}, {"architecture": "riscv"}, True),
        ({"custom": "all"}, {"custom": "x"}, False),  # all/any only for os and architecture
        ({"custom": "*"}, {}, True),  # "*" matches even an absent attribute
        ({"custom": "//"}, {}, False),  # "//" needs a value
        ({"custom": "//"}, {"custom": "x"}, True),
        ({"custom": "x"}, {}, False),
        ({"os": "/lin.*/"}, {"os": "linux"}, True),
        ({"os": "/lin/"}, {"os": "linux"}, False),  # a whole-value match
        ({"os": "-linux"}, {"os": "-linux"}, False),  # labels must start with a letter/digit
    ],
)
def test_platform_value_rules(
    platform: dict[str, str], target: dict[str, str], expected: bool
) -> None:
    assert Manifest(platform=platform).matches(target) is expected


def test_first_matching_manifest_wins() -> None:
    recipe = parse(
        minimal(
            Manifests=[
                {"Platform": {"os": "linux"}, "Name": "first"},
                {"Name": "second"},
            ]
        )
    )
    first = recipe.select_manifest("linux", "amd64")
    second = recipe.select_manifest("windows", "amd64")
    assert first is not None and first.name == "first"
    assert second is not None and second.name == "second"


def test_parse_from_text_guesses_the_format() -> None:
    as_json = json.dumps(MINIMAL)
    assert parse_recipe(as_json, source="x").name == "com.example.Minimal"
    as_yaml = (
        "RecipeFormatVersion: 2020-01-25\nComponentName: a\nComponentVersion: 1.0.0\n"
        "Manifests:\n  - Lifecycle:\n      Run: echo\n"
    )
    assert parse_recipe(as_yaml, source="x").name == "a"
    assert parse_recipe(("\ufeff" + as_yaml).encode(), source="x").name == "a"
    with pytest.raises(RecipeError, match="invalid JSON"):
        parse_recipe(as_yaml, source="x", fmt="json")


def test_mapping_input_is_not_mutated() -> None:
    doc = minimal(ComponentConfiguration={"DefaultConfiguration": {"a": {"b": 1}}})
    before = json.dumps(doc, sort_keys=True)
    recipe = parse(doc)
    assert json.dumps(doc, sort_keys=True) == before
    assert recipe.default_configuration == {"a": {"b": 1}}
    assert recipe.source == "test.yaml"


def test_to_candidate() -> None:
    recipe = load_recipe(GOOD / "all_fields.yaml")
    candidate = recipe.to_candidate()
    assert isinstance(candidate, Candidate)
    assert candidate.name == "com.example.FooService"
    assert candidate.version == recipe.version
    assert candidate.dependencies["com.example.BarService"] == DependencySpec(
        requirement=Range.parse(">=1.1.0 <2.0.0"), hard=False
    )
    assert len(candidate.dependencies) == 3


def test_load_recipe_rejects_other_extensions_and_missing_files(tmp_path: Path) -> None:
    other = tmp_path / "recipe.txt"
    other.write_text("{}")
    with pytest.raises(RecipeError, match=r"unsupported recipe file type '\.txt'") as caught:
        load_recipe(other)
    assert caught.value.source == str(other)
    with pytest.raises(RecipeError, match="cannot read the recipe"):
        load_recipe(tmp_path / "absent.yaml")


def test_load_recipe_dir_reports_duplicates_with_both_files(tmp_path: Path) -> None:
    shutil.copy(GOOD / "hello_world.json", tmp_path / "a.json")
    shutil.copy(GOOD / "hello_world.json", tmp_path / "b.JSON")
    (tmp_path / "notes.md").write_text("not a recipe")
    (tmp_path / ".hidden.yaml").write_text("- not even a mapping")
    with pytest.raises(RecipeError) as caught:
        load_recipe_dir(tmp_path)
    err = caught.value
    assert err.source == str(tmp_path / "b.JSON")
    assert str(tmp_path / "a.json") in err.reason
    assert "com.example.HelloWorld@1.0.0" in err.reason


def test_load_recipe_dir_needs_a_folder(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not a folder"):
        load_recipe_dir(tmp_path / "absent")


@pytest.mark.parametrize(
    ("system", "machine", "expected"),
    [
        ("Linux", "x86_64", ("linux", "amd64")),
        ("Linux", "aarch64", ("linux", "aarch64")),
        ("Linux", "armv7l", ("linux", "arm")),
        ("Linux", "armv6l", ("linux", "arm")),
        ("Linux", "i686", ("linux", "x86")),
        ("Darwin", "arm64", ("darwin", "aarch64")),
        ("Windows", "AMD64", ("windows", "amd64")),
        ("Linux", "riscv64", ("linux", "unknown")),
    ],
)
def test_current_platform_uses_greengrass_names(
    system: str, machine: str, expected: tuple[str, str]
) -> None:
    assert current_platform(system=system, machine=machine) == expected


def test_current_platform_on_this_machine() -> None:
    os_name, arch = current_platform()
    assert os_name in {"linux", "darwin", "windows", "unknown"}
    assert arch in {"amd64", "aarch64", "arm", "x86", "unknown"}


# --- robustness: nothing but RecipeError, whatever the document -----------------------

_KEYS = st.sampled_from(
    [
        "RecipeFormatVersion",
        "ComponentName",
        "ComponentVersion",
        "Manifests",
        "Lifecycle",
        "Run",
        "run",
        "Script",
        "Timeout",
        "Setenv",
        "Skipif",
        "Platform",
        "os",
        "Artifacts",
        "URI",
        "Selections",
        "all",
        "ComponentDependencies",
        "VersionRequirement",
        "Permission",
        "Read",
        "Digest",
    ]
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(_KEYS | st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    manifests=_JSON,
    extra=st.dictionaries(_KEYS, _JSON, max_size=3),
)
def test_any_document_parses_or_raises_recipe_error(manifests: Any, extra: dict[str, Any]) -> None:
    doc = {**MINIMAL, **extra, "Manifests": manifests}
    try:
        recipe = parse(doc)
    except RecipeError as err:
        assert err.source == "test.yaml"
    else:
        assert recipe.manifests
