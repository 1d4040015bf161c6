"""What template.yaml gives an operator beyond the gateway itself: the group every stage
requires, the alarms, and the optional custom domain and AWS WAF behind their parameters.

moto creates no CloudWatch alarm, API Gateway domain name or WAF web ACL from a template, so
these are checked on the template and on SAM's translation of it, with the template's own
Conditions and Rules evaluated for the parameters an operator would pass.
"""

from __future__ import annotations

import copy
import re
import tomllib
from typing import Any

import pytest

from infra.deploy_tool import parameter_overrides
from tests.infra.conftest import PROJECT_ROOT, STACK_PARAMETERS, translate

UUID = "5b0f3a1c-2d4e-4f60-8a7b-9c0d1e2f3a4b"
CERTIFICATE = "arn:aws:acm:us-east-1:123456789012:certificate/0e1c2a5b-8a3d-4c51-9b6e-2f7d4c3b1a00"
WEB_ACL = "arn:aws:wafv2:us-east-1:123456789012:regional/webacl/shared/0e1c2a5b"


def _parameters(template: dict[str, Any], given: dict[str, str]) -> dict[str, Any]:
    defaults = {k: str(p.get("Default", "")) for k, p in template["Parameters"].items()}
    values: dict[str, Any] = {**defaults, **given}
    for name, parameter in template["Parameters"].items():
        if parameter["Type"] == "CommaDelimitedList":
            values[name] = values[name].split(",")
    return values


def _evaluate(expression: Any, parameters: dict[str, Any], conditions: dict[str, Any]) -> Any:
    """CloudFormation's condition functions, enough for this template's Conditions and Rules."""
    if not isinstance(expression, dict):
        return expression
    [(name, value)] = expression.items()
    if name == "Ref":
        return parameters[value]
    if name == "Condition":
        return _evaluate(conditions[value], parameters, conditions)
    arguments = [_evaluate(item, parameters, conditions) for item in value]
    if name == "Fn::Join":
        return str(arguments[0]).join(arguments[1])
    if name == "Fn::Equals":
        return arguments[0] == arguments[1]
    if name == "Fn::Not":
        return not arguments[0]
    if name == "Fn::And":
        return all(arguments)
    if name == "Fn::Or":
        return any(arguments)
    raise AssertionError(f"not evaluated here: {name}")


def _conditions(template: dict[str, Any], given: dict[str, str]) -> dict[str, bool]:
    parameters = _parameters(template, given)
    conditions = template["Conditions"]
    return {name: bool(_evaluate(c, parameters, conditions)) for name, c in conditions.items()}


def _created(template: dict[str, Any], given: dict[str, str]) -> set[str]:
    """The logical ids CloudFormation would create for these parameters."""
    truth = _conditions(template, given)
    return {k for k, r in template["Resources"].items() if truth.get(r.get("Condition"), True)}


def _rules_pass(template: dict[str, Any], given: dict[str, str]) -> bool:
    parameters = _parameters(template, given)
    for rule in template.get("Rules", {}).values():
        if _evaluate(rule.get("RuleCondition", True), parameters, template["Conditions"]):
            for assertion in rule["Assertions"]:
                if not _evaluate(assertion["Assert"], parameters, template["Conditions"]):
                    return False
    return True


# ------------------------------------------------------------------ who gets in


def test_every_stage_requires_a_group(template: dict[str, Any]) -> None:
    """No stage may let in any user of an allowed identity provider with no group."""
    parameter = template["Parameters"]["AllowedGroups"]
    assert "Default" not in parameter  # sam deploy fails without it
    pattern = re.compile(parameter["AllowedPattern"])
    # CloudFormation checks each item of a CommaDelimitedList: "" is one empty item.
    assert not pattern.match("") and not pattern.match("FIRST users")
    assert pattern.match(UUID)
    variables = template["Globals"]["Function"]["Environment"]["Variables"]
    # Always the list of groups: no branch where it is "[]" (which admits everyone).
    assert variables["FIRST_ALLOWED_GROUPS"] == {
        "Fn::Sub": ['["${Items}"]', {"Items": {"Fn::Join": ['","', {"Ref": "AllowedGroups"}]}}]
    }
    config = tomllib.loads((PROJECT_ROOT / "infra" / "samconfig.toml").read_text())
    for stage in ("dev", "prod"):
        assert stage in config
        items = dict(i.split("=", 1) for i in parameter_overrides(stage))
        groups = items["AllowedGroups"].split(",")
        assert groups and all(pattern.match(g) for g in groups), (stage, groups)


# ------------------------------------------------------------------ alarms


def _alarms(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        k: r["Properties"]
        for k, r in template["Resources"].items()
        if r["Type"] == "AWS::CloudWatch::Alarm"
    }


def test_every_function_has_an_errors_alarm(template: dict[str, Any]) -> None:
    functions = [
        k for k, r in template["Resources"].items() if r["Type"] == "AWS::Serverless::Function"
    ]
    watched = {
        a["Dimensions"][0]["Value"]["Ref"]
        for a in _alarms(template).values()
        if a["Namespace"] == "AWS/Lambda" and a["MetricName"] == "Errors"
    }
    assert watched == set(functions)
    throttled = {
        a["Dimensions"][0]["Value"]["Ref"]
        for a in _alarms(template).values()
        if a["MetricName"] == "Throttles"
    }
    assert throttled == {"ProxyFunction", "ControlPlaneFunction"}


def test_the_queue_and_the_api_have_alarms(template: dict[str, Any]) -> None:
    alarms = {a["MetricName"]: a for a in _alarms(template).values()}
    age = alarms["ApproximateAgeOfOldestMessage"]
    assert age["Dimensions"][0]["Value"] == {"Fn::GetAtt": ["SubmitQueue", "QueueName"]}
    dead = alarms["ApproximateNumberOfMessagesVisible"]
    assert dead["Dimensions"][0]["Value"] == {"Fn::GetAtt": ["SubmitDeadLetterQueue", "QueueName"]}
    api = alarms["5XXError"]
    api_name = template["Resources"]["GatewayApi"]["Properties"]["Name"]
    assert {d["Name"]: d["Value"] for d in api["Dimensions"]} == {
        "ApiName": api_name,
        "Stage": {"Ref": "Stage"},
    }


def test_alarms_are_named_per_stage_and_notify_the_topic_if_given(
    template: dict[str, Any],
) -> None:
    alarms = _alarms(template)
    names = [a["AlarmName"]["Fn::Sub"] for a in alarms.values()]
    assert len(set(names)) == len(names) >= 11
    assert all(n.startswith("first-${Stage}-") for n in names)
    notify = {"Fn::If": ["HasAlarmTopic", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]}
    for logical_id, alarm in alarms.items():
        assert alarm["AlarmActions"] == alarm["OKActions"] == notify, logical_id
        assert alarm["TreatMissingData"] == "notBreaching", logical_id
        assert alarm["AlarmDescription"], logical_id
    assert not _conditions(template, {})["HasAlarmTopic"]
    topic = {"AlarmTopicArn": "arn:aws:sns:us-east-1:123456789012:first-alarms"}
    assert _conditions(template, topic)["HasAlarmTopic"]
    assert re.match(
        template["Parameters"]["AlarmTopicArn"]["AllowedPattern"], topic["AlarmTopicArn"]
    )


# ------------------------------------------------------------------ custom domain and WAF

OPTIONAL = {
    "CustomDomain",
    "CustomDomainMapping",
    "CustomDomainRecord",
    "GatewayWebAcl",
    "GatewayWebAclAssociation",
}


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, set()),
        (
            {"DomainName": "first.example.org", "CertificateArn": CERTIFICATE},
            {"CustomDomain", "CustomDomainMapping"},
        ),
        (
            {
                "DomainName": "first.example.org",
                "CertificateArn": CERTIFICATE,
                "HostedZoneId": "Z1",
            },
            {"CustomDomain", "CustomDomainMapping", "CustomDomainRecord"},
        ),
        ({"WebAclArn": WEB_ACL}, {"GatewayWebAclAssociation"}),
        ({"CreateWebAcl": "true"}, {"GatewayWebAcl", "GatewayWebAclAssociation"}),
        # A web ACL of your own wins over creating one.
        ({"WebAclArn": WEB_ACL, "CreateWebAcl": "true"}, {"GatewayWebAclAssociation"}),
    ],
)
def test_domain_and_waf_only_when_asked_for(
    template: dict[str, Any], given: dict[str, str], expected: set[str]
) -> None:
    assert _created(template, given) & OPTIONAL == expected
    assert _rules_pass(template, given)


def test_a_domain_without_a_certificate_is_refused_before_anything_changes(
    template: dict[str, Any],
) -> None:
    assert not _rules_pass(template, {"DomainName": "first.example.org"})


def test_domain_and_waf_attach_to_the_api_stage_sam_creates(template: dict[str, Any]) -> None:
    sam = copy.deepcopy(template)
    for name, resource in sam["Resources"].items():
        if resource["Type"] == "AWS::Serverless::Function":
            resource["Properties"]["CodeUri"] = f"s3://first-code/{name}.zip"
        if resource["Type"] == "AWS::Serverless::LayerVersion":
            resource["Properties"]["ContentUri"] = f"s3://first-code/{name}.zip"
    given = {
        **STACK_PARAMETERS,
        "DomainName": "first.example.org",
        "CertificateArn": CERTIFICATE,
        "HostedZoneId": "Z1",
        "CreateWebAcl": "true",
    }
    resources = translate(sam, given)["Resources"]
    [stage] = [k for k, r in resources.items() if r["Type"] == "AWS::ApiGateway::Stage"]
    mapping = resources["CustomDomainMapping"]["Properties"]
    assert mapping == {
        "DomainName": {"Ref": "CustomDomain"},
        "RestApiId": {"Ref": "GatewayApi"},
        "Stage": {"Ref": stage},
    }
    domain = resources["CustomDomain"]["Properties"]
    assert domain["EndpointConfiguration"] == {"Types": ["REGIONAL"]}
    assert domain["SecurityPolicy"] == "TLS_1_2"
    record = resources["CustomDomainRecord"]["Properties"]
    assert record["AliasTarget"]["DNSName"] == {
        "Fn::GetAtt": ["CustomDomain", "RegionalDomainName"]
    }
    association = resources["GatewayWebAclAssociation"]["Properties"]
    assert association["ResourceArn"]["Fn::Sub"].endswith(
        "/restapis/${GatewayApi}/stages/${" + stage + "}"
    )
    [rule] = resources["GatewayWebAcl"]["Properties"]["Rules"]
    assert rule["Action"] == {"Block": {}}
    assert rule["Statement"]["RateBasedStatement"] == {
        "Limit": {"Ref": "WafRateLimit"},
        "AggregateKeyType": "IP",
    }
    assert resources["GatewayWebAcl"]["Properties"]["Scope"] == "REGIONAL"
