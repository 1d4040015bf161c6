"""`routing.choose` over registry snapshots built in memory (no tables needed)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from first_core.auth import Caller
from first_core.errors import NotFoundError, PermissionDeniedError, ServiceUnavailableError
from first_core.registry import CLUSTER_KEY, Cluster, Endpoint, FunctionIds, Limits, Registry
from first_core.registry.routing import choose, may_use, refusal
from first_core.tables import RegistryEntry
from tests.support.identities import ALICE, BOB, GROUP_A, GROUP_B

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
OTHER_MODEL = "Salesforce/SFR-Embedding-Mistral"


def cluster(
    name: str,
    status: str = "online",
    frameworks: tuple[str, ...] = ("vllm",),
    allowed_groups: tuple[str, ...] = (),
    allowed_domains: tuple[str, ...] = (),
) -> Cluster:
    return Cluster(
        name=name,
        frameworks=list(frameworks),
        allowed_groups=list(allowed_groups),
        allowed_domains=list(allowed_domains),
        status=status,
    )


def endpoint(
    cluster_name: str,
    status: str = "online",
    model: str = MODEL,
    framework: str = "vllm",
    allowed_groups: tuple[str, ...] = (),
    allowed_domains: tuple[str, ...] = (),
) -> Endpoint:
    return Endpoint(
        cluster=cluster_name,
        framework=framework,
        model=model,
        endpoint_id=f"{cluster_name}-{framework}",
        functions=FunctionIds(inference="local:inference"),
        limits=Limits(),
        allowed_groups=list(allowed_groups),
        allowed_domains=list(allowed_domains),
        status=status,
    )


def registry(clusters: list[Cluster], endpoints: list[Endpoint]) -> Registry:
    return Registry({c.name: c for c in clusters}, endpoints)


def two_clusters(
    sophia: str = "online",
    polaris: str = "online",
    sophia_cluster: str = "online",
    polaris_cluster: str = "online",
) -> Registry:
    """The same model on sophia and polaris, with the given endpoint and cluster states."""
    return registry(
        [cluster("sophia", sophia_cluster), cluster("polaris", polaris_cluster)],
        [endpoint("polaris", polaris), endpoint("sophia", sophia)],
    )


# -- preference among states ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sophia", "polaris", "chosen"),
    [
        ("running", "online", "sophia"),
        ("online", "running", "polaris"),
        ("running", "starting", "sophia"),
        ("starting", "running", "polaris"),
        ("queued", "running", "polaris"),
        ("running", "queued", "sophia"),
        # A starting endpoint (online, no workers yet) takes nothing while another can serve.
        ("starting", "online", "polaris"),
        ("starting", "stopped", "polaris"),
        ("queued", "starting", "sophia"),
        ("stopped", "running", "polaris"),
        ("stopped", "queued", "polaris"),
        ("offline", "stopped", "polaris"),
        ("online", "queued", "polaris"),
        ("online", "offline", "sophia"),
        ("offline", "online", "polaris"),
        ("maintenance", "online", "polaris"),
        ("online", "maintenance", "sophia"),
        ("offline", "running", "polaris"),
        ("running", "maintenance", "sophia"),
    ],
)
def test_endpoint_state_preference(sophia: str, polaris: str, chosen: str) -> None:
    route = choose(two_clusters(sophia=sophia, polaris=polaris), ALICE, MODEL)

    assert route.endpoint.cluster == chosen
    assert route.endpoint.model == MODEL
    assert route.reason.startswith(f"{chosen}: model ")


@pytest.mark.parametrize("down", ["offline", "maintenance"])
def test_cluster_that_is_down_is_skipped_even_if_its_endpoint_is_running(down: str) -> None:
    reg = two_clusters(sophia="running", polaris="online", sophia_cluster=down)

    route = choose(reg, ALICE, MODEL)

    assert route.endpoint.cluster == "polaris"
    assert "1 of 2" in route.reason


def test_reason_names_the_cluster_its_state_and_the_count() -> None:
    route = choose(two_clusters(sophia="running", polaris="offline"), ALICE, MODEL)

    assert route.reason == "sophia: model running; 1 of 2 clusters available"


def test_reason_for_a_named_cluster() -> None:
    route = choose(two_clusters(sophia="queued"), ALICE, MODEL, cluster="sophia", framework="vllm")

    assert route.endpoint.cluster == "sophia"
    assert route.reason == "named cluster sophia (queued)"


def test_named_cluster_is_used_even_when_another_is_better() -> None:
    reg = two_clusters(sophia="running", polaris="online")

    route = choose(reg, ALICE, MODEL, cluster="polaris")

    assert route.endpoint.cluster == "polaris"


@pytest.mark.parametrize(
    ("sophia", "polaris", "sophia_cluster", "polaris_cluster"),
    [
        ("offline", "offline", "online", "online"),
        ("maintenance", "offline", "online", "online"),
        ("running", "running", "maintenance", "offline"),
        ("running", "offline", "maintenance", "online"),
    ],
)
def test_nothing_available_is_503_with_retry_after(
    sophia: str, polaris: str, sophia_cluster: str, polaris_cluster: str
) -> None:
    reg = two_clusters(sophia, polaris, sophia_cluster, polaris_cluster)

    with pytest.raises(ServiceUnavailableError) as unavailable:
        choose(reg, ALICE, MODEL)

    assert unavailable.value.status == 503
    assert unavailable.value.headers.get("Retry-After", "").isdigit()
    assert "sophia" in unavailable.value.message
    assert "polaris" in unavailable.value.message
    # No retry within the SDK's back-off can fix maintenance or offline clusters.
    assert unavailable.value.headers["x-should-retry"] == "false"


def test_named_cluster_down_is_503_even_if_another_cluster_could_serve() -> None:
    reg = two_clusters(sophia="running", polaris="online", sophia_cluster="maintenance")

    with pytest.raises(ServiceUnavailableError) as unavailable:
        choose(reg, ALICE, MODEL, cluster="sophia")

    assert "sophia: maintenance" in unavailable.value.message
    assert "Retry-After" in unavailable.value.headers


# -- what does not exist ----------------------------------------------------------------------
def test_unknown_model_is_404_on_param_model() -> None:
    with pytest.raises(NotFoundError) as missing:
        choose(two_clusters(), ALICE, "no-such/model")

    assert missing.value.status == 404
    assert missing.value.param == "model"
    assert "no-such/model" in missing.value.message


def test_unknown_cluster_is_404_on_param_cluster_listing_known_clusters() -> None:
    with pytest.raises(NotFoundError) as missing:
        choose(two_clusters(), ALICE, MODEL, cluster="aurora")

    assert missing.value.param == "cluster"
    assert "aurora" in missing.value.message
    assert "polaris, sophia" in missing.value.message


def test_framework_not_served_on_the_cluster_is_404_on_param_framework() -> None:
    with pytest.raises(NotFoundError) as missing:
        choose(two_clusters(), ALICE, MODEL, cluster="sophia", framework="sglang")

    assert missing.value.param == "framework"
    assert "sglang" in missing.value.message
    assert "vllm" in missing.value.message


def test_model_not_on_the_named_cluster_is_404_naming_the_cluster() -> None:
    reg = registry(
        [cluster("sophia"), cluster("polaris")],
        [endpoint("sophia", model=OTHER_MODEL), endpoint("polaris")],
    )

    with pytest.raises(NotFoundError) as missing:
        choose(reg, ALICE, OTHER_MODEL, cluster="polaris")

    assert missing.value.param == "model"
    assert "polaris" in missing.value.message
    assert choose(reg, ALICE, OTHER_MODEL).endpoint.cluster == "sophia"


def test_framework_filter_picks_only_that_frameworks_endpoint() -> None:
    reg = registry(
        [cluster("sophia", frameworks=("vllm", "sglang"))],
        [
            endpoint("sophia", status="running", framework="vllm"),
            endpoint("sophia", status="online", framework="sglang"),
        ],
    )

    route = choose(reg, ALICE, MODEL, cluster="sophia", framework="sglang")

    assert route.endpoint.framework == "sglang"


# -- who may use what -------------------------------------------------------------------------
EXCLUSIONS = {
    "cluster-groups": {"cluster": {"allowed_groups": (GROUP_B,)}},
    "endpoint-groups": {"endpoint": {"allowed_groups": (GROUP_B,)}},
    "cluster-domains": {"cluster": {"allowed_domains": ("uchicago.edu",)}},
    "endpoint-domains": {"endpoint": {"allowed_domains": ("uchicago.edu",)}},
}


def excluding(names: tuple[str, ...], how: str) -> Registry:
    """sophia and polaris both online (sophia running); the named ones exclude ALICE."""
    rule = EXCLUSIONS[how]
    clusters, endpoints = [], []
    for name, status in (("sophia", "running"), ("polaris", "online")):
        excluded = name in names
        clusters.append(cluster(name, **(rule.get("cluster", {}) if excluded else {})))
        endpoints.append(
            endpoint(name, status=status, **(rule.get("endpoint", {}) if excluded else {}))
        )
    return registry(clusters, endpoints)


@pytest.mark.parametrize("how", sorted(EXCLUSIONS))
def test_caller_excluded_everywhere_is_403(how: str) -> None:
    with pytest.raises(PermissionDeniedError) as forbidden:
        choose(excluding(("sophia", "polaris"), how), ALICE, MODEL)

    assert forbidden.value.status == 403
    assert MODEL in forbidden.value.message


@pytest.mark.parametrize("how", sorted(EXCLUSIONS))
def test_caller_excluded_on_one_cluster_is_routed_to_the_other(how: str) -> None:
    # sophia would win (running beats online) but excludes the caller.
    route = choose(excluding(("sophia",), how), ALICE, MODEL)

    assert route.endpoint.cluster == "polaris"
    assert route.reason.startswith("polaris:")


@pytest.mark.parametrize("how", sorted(EXCLUSIONS))
def test_caller_excluded_on_the_named_cluster_is_403_naming_it(how: str) -> None:
    with pytest.raises(PermissionDeniedError) as forbidden:
        choose(excluding(("sophia",), how), ALICE, MODEL, cluster="sophia")

    assert "sophia" in forbidden.value.message


@pytest.mark.parametrize("how", sorted(EXCLUSIONS))
def test_member_of_the_allowed_group_or_domain_is_let_in(how: str) -> None:
    insider = replace(BOB, groups=frozenset({GROUP_B}))

    route = choose(excluding(("sophia", "polaris"), how), insider, MODEL)

    assert route.endpoint.cluster == "sophia"


def test_allowed_domains_match_case_insensitively() -> None:
    reg = registry([cluster("sophia", allowed_domains=("ANL.gov",))], [endpoint("sophia")])

    assert choose(reg, ALICE, MODEL).endpoint.cluster == "sophia"


def test_forbidden_clusters_do_not_turn_a_503_into_a_choice() -> None:
    # polaris is up but excludes the caller; sophia admits the caller but is offline.
    reg = registry(
        [cluster("sophia"), cluster("polaris", allowed_groups=(GROUP_B,))],
        [endpoint("sophia", status="offline"), endpoint("polaris", status="running")],
    )

    with pytest.raises(ServiceUnavailableError) as unavailable:
        choose(reg, ALICE, MODEL)

    assert "polaris" not in unavailable.value.message


# -- snapshots read from table rows -----------------------------------------------------------
def test_choose_on_a_snapshot_built_from_registry_rows() -> None:
    functions = {"inference": "local:inference"}
    rows = [
        RegistryEntry("sophia", CLUSTER_KEY, config={"frameworks": ["vllm"]}, status="online"),
        RegistryEntry(
            "polaris", CLUSTER_KEY, config={"frameworks": ["vllm"]}, status="maintenance"
        ),
        RegistryEntry(
            "sophia",
            f"vllm#{MODEL}",
            config={"endpoint_id": "ep-s", "functions": functions},
            status="queued",
        ),
        RegistryEntry(
            "polaris",
            f"vllm#{MODEL}",
            config={"endpoint_id": "ep-p", "functions": functions},
            status="running",
        ),
    ]

    route = choose(Registry.from_rows(rows), ALICE, MODEL)

    assert route.endpoint.cluster == "sophia"
    assert route.endpoint.endpoint_id == "ep-s"
    assert route.reason == "sophia: model queued; 1 of 2 clusters available"


# -- per-model domains, service accounts, refusal messages --------------------------------------
SERVICE = Caller(
    user_id="5e7v1ce0-0000-4000-8000-000000000001",
    username="5e7v1ce0-0000-4000-8000-000000000001@clients.auth.globus.org",
    name="pipeline",
    email="",
    idp_domain="clients.auth.globus.org",
    idp_name="Globus Auth (client identity)",
    groups=frozenset({GROUP_A}),
    is_service_account=True,
)


def test_model_allowed_domains_refuse_other_providers_naming_them() -> None:
    reg = registry([cluster("sophia")], [endpoint("sophia", allowed_domains=("uchicago.edu",))])

    assert not may_use(ALICE, reg, reg.endpoints[0])
    with pytest.raises(PermissionDeniedError) as forbidden:
        choose(reg, ALICE, MODEL)

    message = forbidden.value.message
    assert forbidden.value.status == 403
    assert "anl.gov" in message and "uchicago.edu" in message
    assert "the model accepts only" in message
    assert "sophia" in message and MODEL in message


def test_model_allowed_domains_apply_to_that_model_only() -> None:
    reg = registry(
        [cluster("sophia")],
        [
            endpoint("sophia", allowed_domains=("uchicago.edu",)),
            endpoint("sophia", model=OTHER_MODEL),
        ],
    )

    assert choose(reg, ALICE, OTHER_MODEL).endpoint.model == OTHER_MODEL
    with pytest.raises(PermissionDeniedError):
        choose(reg, ALICE, MODEL)


def test_model_allowed_domains_match_case_insensitively() -> None:
    reg = registry([cluster("sophia")], [endpoint("sophia", allowed_domains=("ANL.GOV",))])

    assert choose(reg, ALICE, MODEL).endpoint.cluster == "sophia"


@pytest.mark.parametrize("where", ["cluster", "endpoint"])
def test_service_account_skips_domain_checks(where: str) -> None:
    domains = ("anl.gov",)
    reg = registry(
        [cluster("sophia", allowed_domains=domains if where == "cluster" else ())],
        [endpoint("sophia", allowed_domains=domains if where == "endpoint" else ())],
    )
    not_a_service = Caller(**{**SERVICE.__dict__, "is_service_account": False})

    assert may_use(SERVICE, reg, reg.endpoints[0])
    assert not may_use(not_a_service, reg, reg.endpoints[0])


@pytest.mark.parametrize("where", ["cluster", "endpoint"])
def test_service_account_still_needs_the_allowed_groups(where: str) -> None:
    reg = registry(
        [cluster("sophia", allowed_groups=(GROUP_B,) if where == "cluster" else ())],
        [endpoint("sophia", allowed_groups=(GROUP_B,) if where == "endpoint" else ())],
    )

    with pytest.raises(PermissionDeniedError) as forbidden:
        choose(reg, SERVICE, MODEL)

    assert GROUP_B in forbidden.value.message


def test_refusal_says_why_for_each_cluster() -> None:
    reg = registry(
        [cluster("sophia", allowed_groups=(GROUP_B,)), cluster("polaris")],
        [endpoint("sophia"), endpoint("polaris", allowed_domains=("uchicago.edu",))],
    )

    assert "group-b" in str(refusal(ALICE, reg, reg.endpoints[0]))
    assert "uchicago.edu" in str(refusal(ALICE, reg, reg.endpoints[1]))
    with pytest.raises(PermissionDeniedError) as forbidden:
        choose(reg, ALICE, MODEL)

    message = forbidden.value.message
    assert "cluster 'sophia': the cluster is open only to members of the Globus groups group-b" in (
        message
    )
    assert "cluster 'polaris': you signed in through anl.gov" in message


def test_model_allowed_domains_survive_the_registry_table() -> None:
    rows = [
        RegistryEntry("sophia", CLUSTER_KEY, config={"frameworks": ["vllm"]}, status="online"),
        RegistryEntry(
            "sophia",
            f"vllm#{MODEL}",
            config={
                "endpoint_id": "sophia-vllm",
                "functions": {"inference": "local:inference"},
                "allowed_domains": ["uchicago.edu"],
            },
            status="online",
        ),
    ]

    reg = Registry.from_rows(rows)

    assert reg.endpoints[0].allowed_domains == ["uchicago.edu"]
    with pytest.raises(PermissionDeniedError):
        choose(reg, ALICE, MODEL)


def test_registry_file_accepts_model_allowed_domains() -> None:
    from first_core.registry import EndpointConfig

    config = EndpointConfig(
        framework="vllm",
        models=[MODEL],
        endpoint_id="0c0ffee0-0000-4000-8000-0000000000a1",
        functions=FunctionIds(inference="f0000000-0000-4000-8000-000000000001"),
        allowed_domains=["anl.gov"],
    )

    assert config.model_dump()["allowed_domains"] == ["anl.gov"]


# -- live states from the health poller -------------------------------------------------------
@pytest.mark.parametrize("down", ["offline", "maintenance"])
def test_only_starting_left_is_503_starting_retry_with_retry_after(down: str) -> None:
    reg = two_clusters(sophia="starting", polaris="running", polaris_cluster=down)

    with pytest.raises(ServiceUnavailableError) as unavailable:
        choose(reg, ALICE, MODEL)

    assert "starting, retry" in unavailable.value.message
    assert "sophia" in unavailable.value.message
    assert unavailable.value.code == "model_starting"
    assert unavailable.value.headers["Retry-After"].isdigit()
    assert "x-should-retry" not in unavailable.value.headers  # starting: retrying soon helps


def test_named_starting_cluster_is_503_starting_even_if_another_could_serve() -> None:
    reg = two_clusters(sophia="starting", polaris="running")

    with pytest.raises(ServiceUnavailableError) as unavailable:
        choose(reg, ALICE, MODEL, cluster="sophia")

    assert "starting, retry" in unavailable.value.message
    assert "Retry-After" in unavailable.value.headers


def _with_free_nodes(sophia: int | None, polaris: int | None) -> Registry:
    return registry(
        [
            cluster("sophia").model_copy(update={"free_nodes": sophia}),
            cluster("polaris").model_copy(update={"free_nodes": polaris}),
        ],
        [endpoint("polaris", "stopped"), endpoint("sophia", "stopped")],
    )


@pytest.mark.parametrize(
    ("sophia", "polaris", "chosen"),
    [(4, 0, "sophia"), (0, 4, "polaris"), (1, 8, "polaris"), (None, 2, "polaris")],
)
def test_stopped_everywhere_prefers_the_cluster_with_free_nodes(
    sophia: int | None, polaris: int | None, chosen: str
) -> None:
    route = choose(_with_free_nodes(sophia, polaris), ALICE, MODEL)

    assert route.endpoint.cluster == chosen
    assert "stopped" in route.reason and "free nodes" in route.reason


def test_online_without_a_known_model_state_beats_stopped_with_no_free_nodes() -> None:
    reg = registry(
        [cluster("sophia").model_copy(update={"free_nodes": 0}), cluster("polaris")],
        [endpoint("polaris", "online"), endpoint("sophia", "stopped")],
    )

    assert choose(reg, ALICE, MODEL).endpoint.cluster == "polaris"


@pytest.mark.parametrize("state", ["running", "queued", "online", "stopped"])
def test_reason_names_the_state(state: str) -> None:
    route = choose(two_clusters(sophia=state, polaris="offline"), ALICE, MODEL)

    assert route.reason.startswith(f"sophia: model {state}")


def test_excluded_endpoint_is_skipped_and_the_reason_says_so() -> None:
    reg = two_clusters(sophia="online", polaris="running")

    route = choose(reg, ALICE, MODEL, exclude=frozenset({"polaris-vllm"}))

    assert route.endpoint.cluster == "sophia"
    assert "after polaris refused the submit" in route.reason


def test_every_endpoint_excluded_is_503_naming_the_refusals() -> None:
    reg = two_clusters(sophia="running", polaris="running")

    with pytest.raises(ServiceUnavailableError) as unavailable:
        choose(reg, ALICE, MODEL, exclude=frozenset({"polaris-vllm", "sophia-vllm"}))

    assert "submit refused" in unavailable.value.message
