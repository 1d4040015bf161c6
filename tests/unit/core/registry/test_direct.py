"""Direct backends in the registry: the minimal entry loads, mistakes are named by line, the
snapshot carries the upstream's name, key and timeout, and the health poller probes the URL."""

from __future__ import annotations

from pathlib import Path

import pytest

from first_core.auth import Caller
from first_core.registry import (
    Cluster,
    DirectBackend,
    Endpoint,
    FunctionIds,
    Limits,
    Registry,
    RegistryFileError,
    health,
    load_file,
    publish,
    routing,
)
from first_core.registry.config import DIRECT_FRAMEWORK
from first_core.tables import RegistryEntry
from first_local.mock_vllm import MockConfig, create_app
from tests.support.asgi import serve
from tests.support.compute import FakeBackend
from tests.support.identities import ALICE, BOB, GROUP_A
from tests.support.registry import LOCAL_REGISTRY, REGISTERED_FUNCTIONS

COMPUTE_ID = "f5ddf440-2b40-56af-bcff-c720b49fb2e4"
MINIMAL = """\
clusters:
  sophia:
    frameworks: [vllm]
    endpoints:
      - framework: vllm
        endpoint_id: f5ddf440-2b40-56af-bcff-c720b49fb2e4
        models: [m1]
        functions:
          inference: "00000000-0000-4000-8000-000000000001"
  cloud:
    endpoints:
      - backend: direct
        base_url: https://api.example.org/v1
        models: [gpt-x]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "registry.yaml"
    path.write_text(text)
    return path


def test_a_cluster_of_only_a_minimal_direct_endpoint_loads(tmp_path: Path) -> None:
    registry = load_file(write(tmp_path, MINIMAL))

    cloud = registry.clusters["cloud"]
    endpoint = cloud.endpoints[0]
    assert endpoint.backend == "direct"
    assert endpoint.base_url == "https://api.example.org/v1"
    assert endpoint.framework == DIRECT_FRAMEWORK
    assert cloud.frameworks == [DIRECT_FRAMEWORK]  # so the cluster path has a framework
    assert endpoint.endpoint_id is None and endpoint.functions is None
    assert endpoint.limits.tokens_per_minute_per_user is None  # the FIRST_DEFAULT_* limits


def test_appended_to_the_local_registry_it_loads_with_the_ids_put_on_the_others(
    tmp_path: Path,
) -> None:
    """What outside checks do: append such an entry and start the stack with --registry."""
    appended = LOCAL_REGISTRY.read_text() + "  cloud:\n" + MINIMAL.split("  cloud:\n", 1)[1]

    registry = load_file(write(tmp_path, appended), functions=REGISTERED_FUNCTIONS)

    assert registry.clusters["cloud"].endpoints[0].functions is None  # no Compute functions
    assert registry.clusters["sophia"].endpoints[0].functions is not None


@pytest.mark.parametrize(
    ("change", "line", "words"),
    [
        (("        models: [gpt-x]\n", "        models: [gpt-x]\n        base_urll: x\n"), 15,
         "base_urll: Extra inputs"),
        (("https://api.example.org/v1", "ftp://api.example.org"), 13, "not an http(s) URL"),
        (("        base_url: https://api.example.org/v1\n", ""), 12, "needs a base_url"),
        (
            ("        models: [gpt-x]\n",
             "        models: [gpt-x]\n        endpoint_id: " + COMPUTE_ID + "\n"),
            12,
            "takes no endpoint_id",
        ),
        (
            ("        models: [gpt-x]\n",
             "        models: [gpt-x]\n        upstream_names: {other: x}\n"),
            12,
            "upstream_names names models not served here: ['other']",
        ),
        (("        models: [gpt-x]\n", "        models: [gpt-x]\n        timeout: 0\n"), 15,
         "timeout: Input should be greater than 0"),
    ],
    ids=["unknown-key", "not-http", "no-base_url", "compute-field", "unknown-upstream-name",
         "zero-timeout"],
)
def test_direct_mistakes_are_named_with_their_line(
    tmp_path: Path, change: tuple[str, str], line: int, words: str
) -> None:
    path = write(tmp_path, MINIMAL.replace(*change))

    with pytest.raises(RegistryFileError) as bad:
        load_file(path)

    assert f"{path}:{line}: clusters.cloud.endpoints.0" in str(bad.value)
    assert words in str(bad.value)


def test_a_compute_endpoint_takes_no_direct_fields_and_still_needs_its_own(
    tmp_path: Path,
) -> None:
    text = MINIMAL.replace("        models: [m1]\n", "        models: [m1]\n        timeout: 3\n")
    text = text.replace("        endpoint_id: f5ddf440-2b40-56af-bcff-c720b49fb2e4\n", "")

    with pytest.raises(RegistryFileError) as bad:
        load_file(write(tmp_path, text))

    assert "clusters.sophia.endpoints.0.endpoint_id: Field required" in str(bad.value)


def test_base_url_takes_environment_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = MINIMAL.replace("https://api.example.org/v1", "${UPSTREAM}/v1")
    monkeypatch.delenv("UPSTREAM", raising=False)
    with pytest.raises(RegistryFileError, match="UPSTREAM"):
        load_file(write(tmp_path, text))

    monkeypatch.setenv("UPSTREAM", "http://127.0.0.1:9")
    registry = load_file(write(tmp_path, text))
    assert registry.clusters["cloud"].endpoints[0].base_url == "http://127.0.0.1:9/v1"
    defaulted = MINIMAL.replace("https://api.example.org/v1", "${NOT_SET_HERE:-http://h/v1}")
    assert load_file(write(tmp_path, defaulted)).clusters["cloud"].endpoints[0].base_url == (
        "http://h/v1"
    )


def test_the_snapshot_carries_the_upstream_name_key_and_timeout(
    aws: None, tmp_path: Path
) -> None:
    text = MINIMAL.replace(
        "        models: [gpt-x]\n",
        "        models: [gpt-x, gpt-y]\n        upstream_names: {gpt-x: provider/gpt-x-2025}\n"
        "        timeout: 7.5\n        api_key_secret: first/dev/direct/cloud\n",
    )
    publish(load_file(write(tmp_path, text)))

    endpoints = {e.model: e for e in Registry.current().endpoints if e.cluster == "cloud"}

    x, y = endpoints["gpt-x"], endpoints["gpt-y"]
    assert x.direct is not None and y.direct is not None
    assert x.direct.upstream_model == "provider/gpt-x-2025"
    assert y.direct.upstream_model == "gpt-y"
    assert x.direct.timeout == 7.5
    assert x.direct.api_key_secret == "first/dev/direct/cloud"
    assert x.endpoint_id == "direct:https://api.example.org/v1"
    assert x.framework == DIRECT_FRAMEWORK
    sophia = next(e for e in Registry.current().endpoints if e.cluster == "sophia")
    assert sophia.direct is None


def _publish_direct(tmp_path: Path, base_url: str, extra: str = "") -> None:
    text = MINIMAL.replace("https://api.example.org/v1", base_url)
    text = text.replace("        models: [gpt-x]\n", "        models: [gpt-x]\n" + extra)
    publish(load_file(write(tmp_path, text)))


def _direct_status() -> tuple[str, str]:
    rows = {(r.cluster, r.key): r.status for r in RegistryEntry.scan(consistent_read=True)}
    return rows[("cloud", "#cluster")], rows[("cloud", f"{DIRECT_FRAMEWORK}#gpt-x")]


def test_the_poller_probes_a_direct_backend_with_its_key(
    aws: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUD_KEY", "right")
    backend = FakeBackend(endpoints={"f5ddf440-2b40-56af-bcff-c720b49fb2e4": "online"})
    with serve(create_app(MockConfig(models=("gpt-x",), api_key="right"))) as url:
        _publish_direct(tmp_path, f"{url}/v1", "        api_key_env: CLOUD_KEY\n")
        report = health.poll(backend)
        assert _direct_status() == ("online", "online")
        assert report.clusters["cloud"] == "online"

        monkeypatch.setenv("CLOUD_KEY", "wrong")  # the upstream refuses it: 401
        report = health.poll(backend)
        assert _direct_status() == ("offline", "offline")
        entry = report.endpoints[f"direct:{url}/v1"]
        assert "401" in (entry.error or "") and "wrong" not in (entry.error or "")
    # Never sent to Globus Compute.
    assert not [c for c in backend.calls if str(c[1]).startswith("direct:")]


def test_the_poller_marks_an_unreachable_direct_backend_offline(
    aws: None, tmp_path: Path
) -> None:
    _publish_direct(tmp_path, "http://127.0.0.1:9/v1")  # nothing listens on port 9

    health.poll(FakeBackend(endpoints={"f5ddf440-2b40-56af-bcff-c720b49fb2e4": "online"}))

    assert _direct_status() == ("offline", "offline")


def test_maintenance_holds_for_a_direct_backend(aws: None, tmp_path: Path) -> None:
    with serve(create_app(MockConfig(models=("gpt-x",)))) as url:
        _publish_direct(tmp_path, f"{url}/v1")
        health.set_maintenance("cloud", True)
        health.poll(FakeBackend(endpoints={"f5ddf440-2b40-56af-bcff-c720b49fb2e4": "online"}))

    assert _direct_status()[0] == "maintenance"


# -- federation: a model on a cluster and on a direct backend ----------------------------------
def _federated(cluster_status: str, direct_status: str, groups: list[str]) -> Registry:
    """`m1` on cluster `sophia` (Globus Compute) and on `cloud` (direct, open to `groups`)."""

    def on(name: str, status: str, direct: DirectBackend | None) -> Endpoint:
        return Endpoint(
            cluster=name,
            framework="vllm",
            model="m1",
            endpoint_id=f"direct:{direct.base_url}" if direct else COMPUTE_ID,
            functions=FunctionIds(inference="" if direct else COMPUTE_ID),
            limits=Limits(),
            allowed_groups=groups if direct else [],
            status=status,
            direct=direct,
        )

    clusters = {
        name: Cluster(
            name=name, frameworks=["vllm"], allowed_groups=[], allowed_domains=[], status="online"
        )
        for name in ("sophia", "cloud")
    }
    backend = DirectBackend(base_url="https://api.example.org/v1", upstream_model="m1")
    return Registry(
        clusters, [on("sophia", cluster_status, None), on("cloud", direct_status, backend)]
    )


def _chosen(registry: Registry, who: Caller) -> str:
    return routing.choose(registry, who, "m1").endpoint.cluster


def test_federation_routes_a_model_on_a_cluster_and_a_direct_backend_by_the_same_rules() -> None:
    # A running model on a cluster comes before an online one (a direct backend says online).
    assert _chosen(_federated("running", "online", []), ALICE) == "sophia"
    # The cluster down: the direct backend serves.
    assert _chosen(_federated("offline", "online", []), ALICE) == "cloud"
    # Its own groups hold as any endpoint's: bob is not in them, so only the cluster serves him.
    assert _chosen(_federated("online", "running", [GROUP_A]), BOB) == "sophia"
    assert _chosen(_federated("stopped", "online", [GROUP_A]), ALICE) == "cloud"
