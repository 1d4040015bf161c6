"""Tables, bucket and queue from `template.yaml`, the one source of truth for storage.

The local stack (`LocalStack.provision`) and the unit tests create their DynamoDB tables, the
results bucket and the submit queue from the template's own resource properties, so what runs
here has exactly the keys, indexes, TTL attributes, bucket rules and queue settings that a
deploy creates on AWS.

Table names: the template names every table `!Sub "first-${Stage}-<name>"` and sets
`FIRST_TABLE_PREFIX: !Sub "first-${Stage}-"` on every function; pynamodb's name is
`{table_prefix}<name>`. Here the template's prefix expression is replaced by the given prefix.
"""

from __future__ import annotations

import contextlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[3]
TEMPLATE = PROJECT_ROOT / "template.yaml"


class TemplateError(ValueError):
    """The template does not have the shape this module (and the gateway) relies on."""


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short-form intrinsics (`!Ref X` becomes `{"Ref": "X"}`)."""


def _intrinsic(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    # `!Ref` and `!Condition` keep their names; every other short form is `Fn::<name>`.
    name = suffix if suffix in ("Ref", "Condition") else f"Fn::{suffix}"
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        if suffix == "GetAtt":
            value = str(value).split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {name: value}


_CfnLoader.add_multi_constructor("!", _intrinsic)


def load_template(path: str | Path = TEMPLATE) -> dict[str, Any]:
    """The template as plain data (a fresh copy: callers may change it)."""
    return dict(yaml.load(Path(path).read_text(), Loader=_CfnLoader))


@lru_cache(maxsize=8)
def _cached(path: str) -> dict[str, Any]:
    return load_template(path)


def table_prefix_expression(template: dict[str, Any]) -> str:
    """The `Fn::Sub` string of FIRST_TABLE_PREFIX that the template gives every function."""
    try:
        value = template["Globals"]["Function"]["Environment"]["Variables"]["FIRST_TABLE_PREFIX"]
        return str(value["Fn::Sub"])
    except (KeyError, TypeError):
        raise TemplateError(
            'template.yaml must set Globals.Function FIRST_TABLE_PREFIX: !Sub "..."'
        ) from None


def table_resources(template: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Each AWS::DynamoDB::Table: logical id -> (name after the prefix, properties)."""
    prefix = table_prefix_expression(template)
    tables: dict[str, tuple[str, dict[str, Any]]] = {}
    for logical_id, resource in template["Resources"].items():
        if resource.get("Type") != "AWS::DynamoDB::Table":
            continue
        properties = resource["Properties"]
        name = properties.get("TableName", {})
        expression = name.get("Fn::Sub") if isinstance(name, dict) else None
        if not isinstance(expression, str) or not expression.startswith(prefix):
            raise TemplateError(
                f"{logical_id}: TableName must be !Sub \"{prefix}<name>\" so that it lines up "
                f"with FIRST_TABLE_PREFIX; it is {name!r}"
            )
        tables[logical_id] = (expression.removeprefix(prefix), properties)
    return tables


def _parameter_value(value: Any, template: dict[str, Any]) -> Any:
    """A literal, or a `Ref` to a parameter, resolved to the parameter's default."""
    if isinstance(value, dict) and set(value) == {"Ref"}:
        parameter = template.get("Parameters", {}).get(value["Ref"], {})
        if "Default" not in parameter:
            raise TemplateError(f"{value['Ref']} has no default to provision with")
        return parameter["Default"]
    return value


def create_tables_from_template(
    dynamodb: Any, template_path: str | Path = TEMPLATE, prefix: str = "first-local-"
) -> list[str]:
    """Create every table of the template that does not exist yet, named `{prefix}<name>`.

    `dynamodb` is a boto3 DynamoDB client (moto in process, or a moto server). Keys, attribute
    definitions, global secondary indexes and billing mode come from the template's properties,
    and TTL from its TimeToLiveSpecification. Returns the names of the tables.
    """
    template = _cached(str(Path(template_path).resolve()))
    names = []
    for _logical_id, (suffix, properties) in table_resources(template).items():
        name = f"{prefix}{suffix}"
        names.append(name)
        request: dict[str, Any] = {
            "TableName": name,
            "AttributeDefinitions": properties["AttributeDefinitions"],
            "KeySchema": properties["KeySchema"],
            "BillingMode": properties.get("BillingMode", "PAY_PER_REQUEST"),
        }
        for indexes in ("GlobalSecondaryIndexes", "LocalSecondaryIndexes"):
            if properties.get(indexes):
                request[indexes] = properties[indexes]
        try:
            dynamodb.create_table(**request)
        except dynamodb.exceptions.ResourceInUseException:
            continue  # made by an earlier run against the same server
        if dynamodb.describe_table(TableName=name)["Table"]["TableStatus"] != "ACTIVE":
            dynamodb.get_waiter("table_exists").wait(TableName=name)
        ttl = properties.get("TimeToLiveSpecification")
        if ttl:
            dynamodb.update_time_to_live(
                TableName=name,
                TimeToLiveSpecification={
                    "AttributeName": ttl["AttributeName"],
                    "Enabled": bool(ttl.get("Enabled", True)),
                },
            )
    return names


def bucket_properties(template: dict[str, Any]) -> dict[str, Any]:
    buckets = [
        resource.get("Properties", {})
        for resource in template["Resources"].values()
        if resource.get("Type") == "AWS::S3::Bucket"
    ]
    if len(buckets) != 1:
        raise TemplateError(f"expected one AWS::S3::Bucket in the template, found {len(buckets)}")
    return dict(buckets[0])


def _lifecycle_rule(rule: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    """One rule from CloudFormation's shape to the S3 API's."""
    known = {"Id", "Status", "Prefix", "ExpirationInDays", "AbortIncompleteMultipartUpload"}
    if set(rule) - known:
        raise TemplateError(f"lifecycle rule fields not provisioned locally: {set(rule) - known}")
    api: dict[str, Any] = {
        "ID": rule["Id"],
        "Status": rule["Status"],
        "Filter": {"Prefix": rule.get("Prefix", "")},
    }
    if "ExpirationInDays" in rule:
        api["Expiration"] = {"Days": int(_parameter_value(rule["ExpirationInDays"], template))}
    if "AbortIncompleteMultipartUpload" in rule:
        days = rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"]
        api["AbortIncompleteMultipartUpload"] = {
            "DaysAfterInitiation": int(_parameter_value(days, template))
        }
    return api


def create_bucket(s3: Any, template_path: str | Path = TEMPLATE, name: str = "") -> str:
    """Create the results bucket `name` with the template's access block, encryption, lifecycle.

    `s3` is a boto3 S3 client. An existing bucket of that name is reconfigured, not replaced.
    """
    if not name:
        raise ValueError("the bucket needs a name (FIRST_RESULTS_BUCKET)")
    template = _cached(str(Path(template_path).resolve()))
    properties = bucket_properties(template)
    region = s3.meta.region_name
    create: dict[str, Any] = {"Bucket": name}
    if region and region != "us-east-1":
        create["CreateBucketConfiguration"] = {"LocationConstraint": region}
    exists = (s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists)
    with contextlib.suppress(*exists):
        s3.create_bucket(**create)
    if "PublicAccessBlockConfiguration" in properties:
        s3.put_public_access_block(
            Bucket=name,
            PublicAccessBlockConfiguration=properties["PublicAccessBlockConfiguration"],
        )
    if "BucketEncryption" in properties:
        rules = [
            {"ApplyServerSideEncryptionByDefault": rule["ServerSideEncryptionByDefault"]}
            for rule in properties["BucketEncryption"]["ServerSideEncryptionConfiguration"]
        ]
        s3.put_bucket_encryption(Bucket=name, ServerSideEncryptionConfiguration={"Rules": rules})
    lifecycle = properties.get("LifecycleConfiguration", {}).get("Rules")
    if lifecycle:
        s3.put_bucket_lifecycle_configuration(
            Bucket=name,
            LifecycleConfiguration={"Rules": [_lifecycle_rule(r, template) for r in lifecycle]},
        )
    return name


def queue_resources(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each AWS::SQS::Queue: logical id -> properties."""
    return {
        logical_id: resource.get("Properties", {})
        for logical_id, resource in template["Resources"].items()
        if resource.get("Type") == "AWS::SQS::Queue"
    }


def create_queue(
    sqs: Any,
    template_path: str | Path = TEMPLATE,
    name: str = "",
    visibility_timeout: int | None = None,
) -> str:
    """Create the submit queue `name` and its dead-letter queue `{name}-dead` with the template's
    attributes (retention, receives before a message is dead); returns the queue's URL.

    `visibility_timeout` replaces the template's (a local stack has no Lambda timeout to
    outlast, and wants a message whose submitter died back in seconds)."""
    template = _cached(str(Path(template_path).resolve()))
    queues = queue_resources(template)
    redriven = [q for q in queues.values() if "RedrivePolicy" in q]
    if len(redriven) != 1:
        raise TemplateError(f"expected one queue with a RedrivePolicy, found {len(redriven)}")
    queue = redriven[0]
    target = queue["RedrivePolicy"]["deadLetterTargetArn"]["Fn::GetAtt"][0]
    dead = queues[target]
    dead_url = sqs.create_queue(
        QueueName=f"{name}-dead",
        Attributes={"MessageRetentionPeriod": str(dead["MessageRetentionPeriod"])},
    )["QueueUrl"]
    dead_arn = sqs.get_queue_attributes(QueueUrl=dead_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    redrive = {
        "deadLetterTargetArn": dead_arn,
        "maxReceiveCount": str(queue["RedrivePolicy"]["maxReceiveCount"]),
    }
    timeout = queue["VisibilityTimeout"] if visibility_timeout is None else visibility_timeout
    attributes = {
        "VisibilityTimeout": str(timeout),
        "MessageRetentionPeriod": str(queue["MessageRetentionPeriod"]),
        "RedrivePolicy": json.dumps(redrive),
    }
    return str(sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"])
