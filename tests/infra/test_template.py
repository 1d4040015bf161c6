"""template.yaml: lint-clean, the pynamodb models' exact storage, the API the code expects.

Static checks read the template (and SAM's translation of it); the moto checks deploy it into a
moto server (`AWS::Serverless` translated first: moto does not apply the transform) and inspect
what was created. What moto cannot create is listed in MOTO_CANNOT and checked statically.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import zipfile
from typing import Any

import pytest
from pynamodb.models import Model

import first_core.tables
from first_core.settings import Settings, get_settings
from first_local.provision import (
    TEMPLATE,
    TemplateError,
    create_bucket,
    create_tables_from_template,
    table_resources,
)
from tests.infra.conftest import STACK_PARAMETERS, client

PROXY_NAME = "first-${Stage}-proxy"
CONTROL_NAME = "first-${Stage}-control"
# What each function may do to each table (crud: read and write; read: read only).
TABLE_ACCESS = {
    "ProxyFunction": {
        "requests": "crud",
        "token_cache": "crud",
        "results": "read",
        "stream_chunks": "read",
        "registry": "read",
        "rate_counters": "crud",
        "usage": "crud",
        "idempotency_keys": "crud",
    },
    "ControlPlaneFunction": {
        "requests": "crud",
        "results": "crud",
        "stream_chunks": "crud",
        "token_cache": "crud",
        "registry": "read",
        "rate_counters": "crud",
        "usage": "crud",
        "files": "crud",
        "batches": "crud",
        "idempotency_keys": "crud",
    },
    "HealthPollerFunction": {"registry": "crud", "rate_counters": "crud"},
    "SubmitterFunction": {
        "requests": "crud",
        "results": "crud",
        "rate_counters": "crud",
        "usage": "crud",
    },
    "ReconcilerFunction": {
        "requests": "crud",
        "results": "crud",
        "stream_chunks": "crud",
        "rate_counters": "crud",
        "usage": "crud",
    },
    "BatchDriverFunction": {
        "batches": "crud",
        "files": "crud",
        "rate_counters": "crud",
        "usage": "crud",
        "registry": "read",  # a direct backend's batches: its URL and key
    },
}
# What each function may do in each prefix of the bucket. A presigned URL carries its signer's
# rights: the control plane presigns the clusters' PUTs of batch outputs (batches/) and the GETs
# of batch inputs (files/); the batch driver presigns input GETs again on a resubmit. HEAD needs
# s3:GetObject.
READ_WRITE_DELETE = {"s3:PutObject", "s3:GetObject", "s3:DeleteObject"}
S3_ACCESS: dict[str, dict[str, set[str]]] = {
    "ReconcilerFunction": {"results/*": READ_WRITE_DELETE},
    "HealthPollerFunction": {},
    "ProxyFunction": {"results/*": {"s3:GetObject"}, "queued/*": {"s3:PutObject"}},
    "SubmitterFunction": {"queued/*": {"s3:GetObject"}},
    "ControlPlaneFunction": {
        "results/*": READ_WRITE_DELETE,
        "files/*": READ_WRITE_DELETE,
        "batches/*": READ_WRITE_DELETE,
        "list": {"files/*", "batches/*"},
    },
    "BatchDriverFunction": {
        "files/*": {"s3:GetObject"},
        # A direct backend's batch: the driver writes its output parts and files itself.
        "batches/*": {"s3:GetObject", "s3:PutObject"},
        "list": {"files/*", "batches/*"},
    },
}
# Secrets each function may read: only the direct backends' keys, under the stage's prefix.
DIRECT_KEYS = r"arn:aws:secretsmanager:us-east-1:\d{12}:secret:first/dev/direct/\*"
SECRETS_ACCESS = {
    "ProxyFunction": {DIRECT_KEYS: {"secretsmanager:GetSecretValue"}},
    "HealthPollerFunction": {DIRECT_KEYS: {"secretsmanager:GetSecretValue"}},
    "BatchDriverFunction": {DIRECT_KEYS: {"secretsmanager:GetSecretValue"}},
}
# What each function may do with the submit queue: the proxy sends, the submitter's event
# source (SAM's SQS poller policy) receives and deletes.
SQS_ACCESS: dict[str, dict[str, set[str]]] = {
    "ProxyFunction": {"first-dev-submit": {"sqs:SendMessage*"}},
    "SubmitterFunction": {
        "first-dev-submit": {
            "sqs:ChangeMessageVisibility",
            "sqs:ChangeMessageVisibilityBatch",
            "sqs:DeleteMessage",
            "sqs:DeleteMessageBatch",
            "sqs:GetQueueAttributes",
            "sqs:ReceiveMessage",
        }
    },
}
# Functions that submit to or look up tasks in Globus Compute (the SDK reads its client
# credentials from GLOBUS_COMPUTE_CLIENT_ID/SECRET and writes state under GLOBUS_COMPUTE_USER_DIR).
GLOBUS_COMPUTE_FUNCTIONS = [
    "first-dev-proxy",
    "first-dev-control",
    "first-dev-reconciler",
    "first-dev-health",
    "first-dev-batch-driver",
    "first-dev-submitter",
]
# Created by CloudFormation on AWS; moto skips them with a warning.
MOTO_SKIPS = {"AWS::S3::BucketPolicy", "AWS::CloudWatch::Alarm"}


# ------------------------------------------------------------------ lint


def test_cfn_lint_is_clean_including_informational_checks() -> None:
    from cfnlint.api import ManualArgs, lint_file

    matches = lint_file(TEMPLATE, config=ManualArgs(include_checks=["I"], regions=["us-east-1"]))
    assert [str(m) for m in matches] == []


def test_the_provisioning_loader_reads_the_template_as_cfn_lint_does(
    template: dict[str, Any],
) -> None:
    from cfnlint.decode import decode

    decoded, problems = decode(str(TEMPLATE))
    assert not problems
    assert json.loads(json.dumps(decoded)) == template


# ------------------------------------------------------------------ tables == models


def _models() -> list[type[Model]]:
    found = [
        value
        for value in vars(first_core.tables).values()
        if isinstance(value, type) and issubclass(value, Model) and value is not Model
    ]
    assert set(found) == set(first_core.tables.ALL_MODELS)
    return found


def _model_table(model: type[Model]) -> str:
    return str(model.Meta.table_name).removeprefix(get_settings().table_prefix)


def _keys(key_schema: Any) -> dict[str, str]:
    return {k["KeyType"]: k["AttributeName"] for k in key_schema}


def _projection(projection: dict[str, Any]) -> tuple[str, list[str]]:
    return projection["ProjectionType"], sorted(projection.get("NonKeyAttributes", []))


def model_storage(model: type[Model]) -> dict[str, Any]:
    """Keys, attribute types, indexes and TTL attribute, as the pynamodb model declares them."""
    schema = model._get_schema()
    ttl = model._ttl_attribute()
    return {
        "attributes": {
            a["AttributeName"]: a["AttributeType"] for a in schema["attribute_definitions"]
        },
        "keys": _keys(schema["key_schema"]),
        "global_indexes": {
            index["index_name"]: (_keys(index["key_schema"]), _projection(index["projection"]))
            for index in schema["global_secondary_indexes"]
        },
        "local_indexes": {
            index["index_name"]: (_keys(index["key_schema"]), _projection(index["projection"]))
            for index in schema["local_secondary_indexes"]
        },
        "ttl": ttl.attr_name if ttl is not None else None,
    }


def template_storage(properties: dict[str, Any]) -> dict[str, Any]:
    """The same, as the template's AWS::DynamoDB::Table declares it."""
    ttl = properties.get("TimeToLiveSpecification")
    return {
        "attributes": {
            a["AttributeName"]: a["AttributeType"] for a in properties["AttributeDefinitions"]
        },
        "keys": _keys(properties["KeySchema"]),
        "global_indexes": {
            index["IndexName"]: (_keys(index["KeySchema"]), _projection(index["Projection"]))
            for index in properties.get("GlobalSecondaryIndexes", [])
        },
        "local_indexes": {
            index["IndexName"]: (_keys(index["KeySchema"]), _projection(index["Projection"]))
            for index in properties.get("LocalSecondaryIndexes", [])
        },
        "ttl": ttl["AttributeName"] if ttl and ttl.get("Enabled") else None,
    }


def test_every_model_has_its_table_in_the_template_key_for_key(template: dict[str, Any]) -> None:
    tables = {name: props for name, props in table_resources(template).values()}
    models = {_model_table(model): model for model in _models()}
    assert sorted(tables) == sorted(models), "a table without a model, or a model without a table"
    for name, model in models.items():
        assert template_storage(tables[name]) == model_storage(model), f"table {name}"


def test_every_table_is_on_demand_recoverable_and_encrypted(template: dict[str, Any]) -> None:
    for logical_id, resource in template["Resources"].items():
        if resource["Type"] != "AWS::DynamoDB::Table":
            continue
        properties = resource["Properties"]
        assert properties["BillingMode"] == "PAY_PER_REQUEST", logical_id
        assert properties["PointInTimeRecoverySpecification"] == {
            "PointInTimeRecoveryEnabled": True
        }, logical_id
        assert properties["SSESpecification"] == {"SSEEnabled": True}, logical_id
        assert resource["DeletionPolicy"] == "Retain", logical_id


def test_table_names_line_up_with_the_prefix_the_functions_get(template: dict[str, Any]) -> None:
    prefix = template["Globals"]["Function"]["Environment"]["Variables"]["FIRST_TABLE_PREFIX"]
    for _name, (suffix, properties) in table_resources(template).items():
        assert properties["TableName"] == {"Fn::Sub": prefix["Fn::Sub"] + suffix}
    broken = json.loads(json.dumps(template))
    broken["Resources"]["RegistryTable"]["Properties"]["TableName"] = "registry"
    with pytest.raises(TemplateError, match="RegistryTable"):
        table_resources(broken)


def test_provisioning_creates_the_template_storage(template: dict[str, Any]) -> None:
    """What the local stack and the unit tests get: tables, TTL and bucket rules as declared."""
    import boto3
    from moto import mock_aws

    with mock_aws():
        dynamodb = boto3.client("dynamodb", region_name="us-east-1")
        names = create_tables_from_template(dynamodb, TEMPLATE, "probe-")
        assert create_tables_from_template(dynamodb, TEMPLATE, "probe-") == names  # idempotent
        for _, (suffix, properties) in table_resources(template).items():
            table = dynamodb.describe_table(TableName=f"probe-{suffix}")["Table"]
            assert _keys(table["KeySchema"]) == _keys(properties["KeySchema"])
            indexes = {i["IndexName"] for i in table.get("GlobalSecondaryIndexes", [])}
            assert indexes == {i["IndexName"] for i in properties.get("GlobalSecondaryIndexes", [])}
            ttl = dynamodb.describe_time_to_live(TableName=f"probe-{suffix}")
            spec = ttl["TimeToLiveDescription"]
            if "TimeToLiveSpecification" in properties:
                assert spec["TimeToLiveStatus"] == "ENABLED"
                assert spec["AttributeName"] == "expires_at"
            else:
                assert spec["TimeToLiveStatus"] == "DISABLED"
        s3 = boto3.client("s3", region_name="us-east-1")
        create_bucket(s3, TEMPLATE, "probe-bucket")
        block = s3.get_public_access_block(Bucket="probe-bucket")
        assert all(block["PublicAccessBlockConfiguration"].values())
        rules = s3.get_bucket_lifecycle_configuration(Bucket="probe-bucket")["Rules"]
        expiry = {
            r["Filter"]["Prefix"]: r["Expiration"]["Days"] for r in rules if "Expiration" in r
        }
        defaults = template["Parameters"]
        assert expiry == {
            "results/": defaults["ResultRetentionDays"]["Default"],
            "files/": defaults["BatchRetentionDays"]["Default"],
            "batches/": defaults["BatchRetentionDays"]["Default"],
            "queued/": 1,
        }
        encryption = s3.get_bucket_encryption(Bucket="probe-bucket")
        rule = encryption["ServerSideEncryptionConfiguration"]["Rules"][0]
        assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"


def test_large_results_expire_no_sooner_than_their_rows(template: dict[str, Any]) -> None:
    days = template["Parameters"]["ResultRetentionDays"]["Default"]
    assert days * 86400 >= Settings.model_fields["result_ttl_seconds"].default


def test_the_bucket_is_private_and_tls_only(template: dict[str, Any]) -> None:
    bucket = template["Resources"]["ResultsBucket"]["Properties"]
    assert all(bucket["PublicAccessBlockConfiguration"].values())
    assert len(bucket["PublicAccessBlockConfiguration"]) == 4
    policy = template["Resources"]["ResultsBucketPolicy"]["Properties"]["PolicyDocument"]
    [deny] = policy["Statement"]
    assert deny["Effect"] == "Deny"
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


# ------------------------------------------------------------------ the API


def _operations(template: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    body = template["Resources"]["GatewayApi"]["Properties"]["DefinitionBody"]
    return {
        (path, method.upper()): operation
        for path, item in body["paths"].items()
        for method, operation in item.items()
    }


def _target(operation: dict[str, Any]) -> str:
    uri = operation["x-amazon-apigateway-integration"]["uri"]["Fn::Sub"]
    match = re.search(r"function:([^/]+)/", uri)
    assert match, uri
    return match.group(1)


def _concrete(path: str) -> str:
    return path.replace("{cluster}", "sophia").replace("{framework}", "vllm").replace(
        "{request_id}", "req_1"
    )


def test_inference_routes_stream_from_the_proxy(template: dict[str, Any]) -> None:
    from first_core.inference import INFERENCE_PATHS
    from functions.proxy.app import CLUSTER_PREFIX, FEDERATED_PREFIX, is_inference

    proxied = {key: op for key, op in _operations(template).items() if _target(op) == PROXY_NAME}
    expected = {
        (prefix + openai_path, "POST")
        for prefix in (FEDERATED_PREFIX, CLUSTER_PREFIX)
        for openai_path in INFERENCE_PATHS
    }
    assert set(proxied) == expected
    for (path, method), operation in proxied.items():
        assert is_inference(method, _concrete(path)), path
        integration = operation["x-amazon-apigateway-integration"]
        assert integration["type"] == "aws_proxy"
        assert integration["httpMethod"] == "POST"
        assert integration["responseTransferMode"] == "STREAM"
        assert integration["timeoutInMillis"] == 900_000
        uri = integration["uri"]["Fn::Sub"]
        assert ":lambda:path/2021-11-15/functions/" in uri
        assert uri.endswith(f":function:{PROXY_NAME}/response-streaming-invocations")


def test_every_chalice_route_and_nothing_else_goes_to_the_control_plane(
    template: dict[str, Any],
) -> None:
    """Chalice dispatches on the API's resource path: each @app.route must be its own path."""
    from chalice.deploy.swagger import CFNSwaggerGenerator

    import app
    from functions.proxy.app import is_inference

    routed = {key: op for key, op in _operations(template).items() if _target(op) == CONTROL_NAME}
    chalice = CFNSwaggerGenerator().generate_swagger(app.app)["paths"]
    expected = {(path, method.upper()) for path, item in chalice.items() for method in item}
    missing = expected - set(routed)
    assert not missing, f"Chalice routes missing from template.yaml's GatewayApi: {missing}"
    assert set(routed) == expected, f"not Chalice routes: {set(routed) - expected}"
    assert set(_operations(template)) == set(routed) | {
        k for k, op in _operations(template).items() if _target(op) == PROXY_NAME
    }
    for (path, method), operation in routed.items():
        assert not is_inference(method, _concrete(path)), path
        ours = operation["x-amazon-apigateway-integration"]
        theirs = chalice[path][method.lower()]["x-amazon-apigateway-integration"]
        for field in ("type", "httpMethod", "passthroughBehavior", "contentHandling"):
            assert ours[field] == theirs[field], (path, field)
        assert "responseTransferMode" not in ours
        uri = ours["uri"]["Fn::Sub"]
        assert ":lambda:path/2015-03-31/functions/" in uri
        assert uri.endswith(f":function:{CONTROL_NAME}/invocations")
        params = chalice[path][method.lower()].get("parameters", [])
        assert operation.get("parameters", []) == params, path


def test_no_two_path_variables_are_siblings(template: dict[str, Any]) -> None:
    """API Gateway allows one variable path part per parent resource: importing both
    /callbacks/{request_id} and /callbacks/{batch_id}/batch fails on AWS ("A sibling
    ({request_id}) of this resource already has a variable path part -- only one is allowed"),
    which moto, which ignores the OpenAPI body, cannot show. A Chalice route that adds one must
    reuse its sibling's name."""
    variables: dict[str, set[str]] = {}
    for path, _method in _operations(template):
        parts = path.strip("/").split("/")
        for depth, part in enumerate(parts):
            if part.startswith("{"):
                parent = "/" + "/".join(parts[:depth])
                variables.setdefault(parent, set()).add(part)
    clashes = {parent: names for parent, names in variables.items() if len(names) > 1}
    assert not clashes, f"sibling path variables API Gateway refuses: {clashes}"


def test_chalice_needs_a_path_per_route_not_a_catch_all() -> None:
    """Why the template lists every route: behind /{proxy+}, Chalice knows no route at all."""
    import app

    event = {
        "resource": "/{proxy+}",
        "path": "/health",
        "httpMethod": "GET",
        "headers": {},
        "multiValueHeaders": {},
        "queryStringParameters": None,
        "multiValueQueryStringParameters": None,
        "pathParameters": {"proxy": "health"},
        "stageVariables": None,
        "requestContext": {"resourcePath": "/{proxy+}", "httpMethod": "GET", "stage": "dev"},
        "body": None,
        "isBase64Encoded": False,
    }
    assert app.app(event, None)["statusCode"] == 405


def test_integrations_name_the_functions_the_template_declares(template: dict[str, Any]) -> None:
    resources = template["Resources"]
    assert resources["ProxyFunction"]["Properties"]["FunctionName"] == {"Fn::Sub": PROXY_NAME}
    assert resources["ControlPlaneFunction"]["Properties"]["FunctionName"] == {
        "Fn::Sub": CONTROL_NAME
    }


def test_the_api_is_regional_with_chalice_binary_types_and_openai_shaped_errors(
    translated: dict[str, Any],
) -> None:
    import app

    api = translated["Resources"]["GatewayApi"]["Properties"]
    assert api["EndpointConfiguration"] == {"Types": ["REGIONAL"]}
    body = api["Body"]
    assert body["x-amazon-apigateway-binary-media-types"] == app.app.api.binary_types
    responses = body["x-amazon-apigateway-gateway-responses"]
    unknown = responses["MISSING_AUTHENTICATION_TOKEN"]
    assert int(unknown["statusCode"]) == 404
    assert json.loads(unknown["responseTemplates"]["application/json"]) == {
        "error": {
            "message": "Unknown route.",
            "type": "invalid_request_error",
            "param": None,
            "code": "unknown_route",
        }
    }
    defaults = (("DEFAULT_4XX", "invalid_request_error"), ("DEFAULT_5XX", "server_error"))
    for kind, error_type in defaults:
        text = responses[kind]["responseTemplates"]["application/json"]
        # $context.error.messageString is API Gateway's message as a quoted JSON string.
        error = json.loads(text.replace("$context.error.messageString", '"Throttled"'))["error"]
        assert error == {"message": "Throttled", "type": error_type, "param": None, "code": None}
    [stage] = [r for r in translated["Resources"].values() if r["Type"] == "AWS::ApiGateway::Stage"]
    assert stage["Properties"]["StageName"] == {"Ref": "Stage"}


def test_the_proxy_runs_under_lambda_web_adapter(translated: dict[str, Any]) -> None:
    proxy = translated["Resources"]["ProxyFunction"]["Properties"]
    assert proxy["Handler"] == "run.sh"
    [core, adapter] = proxy["Layers"]
    assert core == {"Ref": next(k for k in translated["Resources"] if k.startswith("CoreLayer"))}
    assert adapter["Fn::Sub"].startswith(
        "arn:${AWS::Partition}:lambda:${AWS::Region}:753240598075:layer:LambdaAdapterLayerX86:"
    )
    control = translated["Resources"]["ControlPlaneFunction"]["Properties"]
    assert control["Layers"] == [core]


# ------------------------------------------------------------------ deployed into moto


def test_every_resource_moto_supports_is_created(deployed: dict[str, Any]) -> None:
    created = deployed["resources"]
    for logical_id, resource in deployed["template"]["Resources"].items():
        if resource["Type"] in MOTO_SKIPS:
            continue
        if "Condition" in resource:  # the optional domain and WAF: not asked for here
            assert logical_id not in created, logical_id
            continue
        assert created[logical_id]["ResourceStatus"] == "CREATE_COMPLETE", logical_id
    assert {r["Type"] for r in deployed["template"]["Resources"].values()} >= {
        "AWS::DynamoDB::Table",
        "AWS::S3::Bucket",
        "AWS::Lambda::LayerVersion",
        "AWS::Lambda::Function",
        "AWS::Lambda::Permission",
        "AWS::IAM::Role",
        "AWS::ApiGateway::RestApi",
        "AWS::Logs::LogGroup",
    }


def _function_env(deployed: dict[str, Any], name: str) -> tuple[dict[str, Any], dict[str, str]]:
    config = client("lambda", deployed["endpoint"]).get_function(FunctionName=name)["Configuration"]
    return config, {k: str(v) for k, v in config["Environment"]["Variables"].items()}


@pytest.mark.parametrize(
    ("name", "handler", "memory", "timeout"),
    [
        ("first-dev-proxy", "run.sh", 1024, 900),
        ("first-dev-control", "app.app", 512, 30),
        ("first-dev-reconciler", "functions.scheduled.reconciler", 512, 120),
        ("first-dev-health", "functions.scheduled.health_poller", 512, 300),
        ("first-dev-batch-driver", "functions.scheduled.batch_driver", 512, 120),
        ("first-dev-submitter", "functions.submitter.handler", 512, 60),
    ],
)
def test_functions_carry_exactly_the_settings_the_code_reads(
    deployed: dict[str, Any], name: str, handler: str, memory: int, timeout: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config, env = _function_env(deployed, name)
    assert (config["Handler"], config["Runtime"]) == (handler, "python3.11")
    assert (config["MemorySize"], config["Timeout"]) == (memory, timeout)
    known = {f"FIRST_{field.upper()}" for field in Settings.model_fields}
    first = {k: v for k, v in env.items() if k.startswith("FIRST_")}
    assert set(first) <= known, f"not settings: {set(first) - known}"
    # The secrets are dynamic references to the named secrets (resolved by CloudFormation on
    # AWS; moto leaves them as they are), never values.
    assert first["FIRST_GLOBUS_CLIENT_SECRET"] == (
        "{{resolve:secretsmanager:first/dev/globus-client-secret}}"
    )
    assert first["FIRST_CALLBACK_SECRET"] == (
        "{{resolve:secretsmanager:first/dev/callback-secret:SecretString:::v-callback-2}}"
    )
    # Read through the gateway's own settings class, as the function will.
    for key in [k for k in os.environ if k.startswith("FIRST_")]:
        monkeypatch.delenv(key)
    for key, value in first.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    outputs = deployed["outputs"]
    assert settings.stage == "dev"
    assert settings.aws_region == "us-east-1"
    assert settings.aws_endpoint_url is None
    assert settings.table_prefix == outputs["TablePrefix"] == "first-dev-"
    assert settings.results_bucket == outputs["ResultsBucketName"]
    assert settings.public_base_url == outputs["GatewayUrl"]
    assert settings.globus_client_id == STACK_PARAMETERS["GlobusClientId"]
    assert settings.gateway_scope == STACK_PARAMETERS["GatewayScope"]
    assert settings.allowed_domains == ["anl.gov", "uchicago.edu"]
    assert settings.allowed_groups == [STACK_PARAMETERS["AllowedGroups"]]
    assert settings.admin_groups == [STACK_PARAMETERS["AdminGroups"]]
    assert settings.authentication_policies == []
    assert settings.result_wait_seconds == 240
    parameters = deployed["template"]["Parameters"]
    assert settings.max_concurrent_batches_per_user == int(
        parameters["MaxConcurrentBatchesPerUser"]["Default"]
    )
    assert settings.batch_chunk_lines == int(parameters["BatchChunkLines"]["Default"])


def test_batch_parameters_default_to_the_settings_defaults(template: dict[str, Any]) -> None:
    parameters = template["Parameters"]
    variables = template["Globals"]["Function"]["Environment"]["Variables"]
    for parameter, field_name in (
        ("MaxConcurrentBatchesPerUser", "max_concurrent_batches_per_user"),
        ("BatchChunkLines", "batch_chunk_lines"),
        ("BatchRetentionDays", "file_retention_days"),
    ):
        assert parameters[parameter]["Default"] == Settings.model_fields[field_name].default
        assert variables[f"FIRST_{field_name.upper()}"] == {"Ref": parameter}


@pytest.mark.parametrize("name", GLOBUS_COMPUTE_FUNCTIONS)
def test_functions_that_use_globus_compute_carry_its_client_credentials(
    deployed: dict[str, Any], name: str
) -> None:
    _, env = _function_env(deployed, name)
    assert env["GLOBUS_COMPUTE_CLIENT_ID"] == STACK_PARAMETERS["GlobusClientId"]
    assert env["GLOBUS_COMPUTE_CLIENT_SECRET"] == env["FIRST_GLOBUS_CLIENT_SECRET"]
    assert env["GLOBUS_COMPUTE_USER_DIR"].startswith("/tmp/")


def test_the_proxy_function_streams_through_the_web_adapter(deployed: dict[str, Any]) -> None:
    _, env = _function_env(deployed, "first-dev-proxy")
    assert env["AWS_LAMBDA_EXEC_WRAPPER"] == "/opt/bootstrap"
    assert env["AWS_LWA_INVOKE_MODE"] == "response_stream"
    assert env["PORT"] == "8080"
    assert env["GLOBUS_COMPUTE_CLIENT_ID"] == STACK_PARAMETERS["GlobusClientId"]
    assert env["GLOBUS_COMPUTE_CLIENT_SECRET"] == env["FIRST_GLOBUS_CLIENT_SECRET"]
    assert env["GLOBUS_COMPUTE_USER_DIR"].startswith("/tmp/")
    archive = zipfile.ZipFile(io.BytesIO(deployed["zips"]["ProxyFunction"]))
    run = archive.getinfo("run.sh")
    assert (run.external_attr >> 16) & 0o111 == 0o111, "run.sh must be executable"
    assert "exec python -m uvicorn functions.proxy.app:app" in archive.read("run.sh").decode()
    assert {"functions/__init__.py", "functions/proxy/app.py"} <= set(archive.namelist())
    control = zipfile.ZipFile(io.BytesIO(deployed["zips"]["ControlPlaneFunction"]))
    assert {"app.py", "chalice/__init__.py", "chalice/app.py"} <= set(control.namelist())


def _table_of(arn: str) -> str:
    table = r"arn:aws:dynamodb:us-east-1:\d{12}:table/first-dev-([a-z_]+)(/index/\*)?"
    match = re.fullmatch(table, arn)
    assert match, arn
    return match.group(1)


METRIC_READS = {"cloudwatch:ListMetrics", "cloudwatch:GetMetricStatistics"}


@pytest.mark.parametrize("function", sorted(TABLE_ACCESS))
def test_each_role_reaches_only_the_tables_and_objects_its_function_uses(
    deployed: dict[str, Any], function: str
) -> None:
    iam = client("iam", deployed["endpoint"])
    role = deployed["resources"][f"{function}Role"]["PhysicalResourceId"]
    # (moto does not load AWS managed policies, so it attaches none: checked in the template.)
    declared = deployed["template"]["Resources"][f"{function}Role"]["Properties"]
    assert declared["ManagedPolicyArns"] == [
        "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole"
    ]
    access: dict[str, set[str]] = {}
    s3_actions: dict[str, set[str]] = {}
    sqs_actions: dict[str, set[str]] = {}
    secret_actions: dict[str, set[str]] = {}
    bucket = deployed["outputs"]["ResultsBucketName"]
    for policy_name in iam.list_role_policies(RoleName=role)["PolicyNames"]:
        document = iam.get_role_policy(RoleName=role, PolicyName=policy_name)["PolicyDocument"]
        if isinstance(document, str):
            # moto returns CloudFormation-made inline policies as a Python repr.
            document = ast.literal_eval(document)
        for statement in document["Statement"]:
            assert statement["Effect"] == "Allow"
            actions = statement["Action"] if isinstance(statement["Action"], list) else [
                statement["Action"]
            ]
            arns = statement["Resource"] if isinstance(statement["Resource"], list) else [
                statement["Resource"]
            ]
            if set(actions) <= METRIC_READS:
                # The dashboard reads the gateway's metrics; these actions take no resource.
                assert function == "ControlPlaneFunction" and arns == ["*"], (function, arns)
                continue
            assert "*" not in arns
            services = {a.split(":")[0] for a in actions}
            assert services in ({"dynamodb"}, {"s3"}, {"sqs"}, {"secretsmanager"}), actions
            if services == {"secretsmanager"}:
                for arn in arns:
                    pattern = next(p for p in SECRETS_ACCESS[function] if re.fullmatch(p, arn))
                    secret_actions.setdefault(pattern, set()).update(actions)
                continue
            if services == {"sqs"}:
                for arn in arns:
                    queue = re.fullmatch(r"arn:aws:sqs:us-east-1:\d{12}:(.+)", arn)
                    assert queue, arn
                    sqs_actions.setdefault(queue.group(1), set()).update(actions)
                continue
            if services == {"s3"}:
                if actions == ["s3:ListBucket"]:
                    # Listing, only so that S3 says 404 for a missing object: on the bucket,
                    # and only under the prefixes the function reads.
                    assert arns == [f"arn:aws:s3:::{bucket}"], arns
                    listed = statement["Condition"]["StringLike"]["s3:prefix"]
                    s3_actions.setdefault("list", set()).update(
                        [listed] if isinstance(listed, str) else listed
                    )
                    continue
                for arn in arns:
                    prefix = arn.removeprefix(f"arn:aws:s3:::{bucket}/")
                    assert prefix != arn and prefix.endswith("/*"), arn
                    s3_actions.setdefault(prefix, set()).update(actions)
                continue
            for arn in arns:
                access.setdefault(_table_of(arn), set()).update(actions)
    kinds = {
        table: "crud" if "dynamodb:PutItem" in actions else "read"
        for table, actions in access.items()
    }
    assert kinds == TABLE_ACCESS[function]
    assert s3_actions == S3_ACCESS[function]
    assert sqs_actions == SQS_ACCESS.get(function, {})
    assert secret_actions == SECRETS_ACCESS.get(function, {})


def test_the_tables_exist_with_the_models_keys(deployed: dict[str, Any]) -> None:
    dynamodb = client("dynamodb", deployed["endpoint"])
    for model in _models():
        name = f"{deployed['outputs']['TablePrefix']}{_model_table(model)}"
        table = dynamodb.describe_table(TableName=name)["Table"]
        storage = model_storage(model)
        assert _keys(table["KeySchema"]) == storage["keys"], name
        indexes = {
            i["IndexName"]: _keys(i["KeySchema"]) for i in table.get("GlobalSecondaryIndexes", [])
        }
        assert indexes == {k: v[0] for k, v in storage["global_indexes"].items()}, name


def test_api_gateway_may_invoke_each_function_from_this_api_only(deployed: dict[str, Any]) -> None:
    api_id = deployed["resources"]["GatewayApi"]["PhysicalResourceId"]
    api = client("apigateway", deployed["endpoint"]).get_rest_api(restApiId=api_id)
    # (The endpoint type is checked in the translated template: moto keeps CloudFormation's
    # `Types` key, which the API's `types` does not read.)
    assert api["name"] == "first-dev"
    lambda_ = client("lambda", deployed["endpoint"])
    for name, scope in (("first-dev-proxy", "/dev/POST/*"), ("first-dev-control", "/dev/*/*")):
        [statement] = json.loads(lambda_.get_policy(FunctionName=name)["Policy"])["Statement"]
        assert statement["Principal"] == {"Service": "apigateway.amazonaws.com"}
        assert statement["Action"] == "lambda:InvokeFunction"
        source = statement["Condition"]["ArnLike"]["AWS:SourceArn"]
        assert source.endswith(f":{api_id}{scope}"), source


def test_outputs_give_the_sdk_base_url(deployed: dict[str, Any]) -> None:
    outputs = deployed["outputs"]
    api_id = deployed["resources"]["GatewayApi"]["PhysicalResourceId"]
    assert outputs["GatewayUrl"] == f"https://{api_id}.execute-api.us-east-1.amazonaws.com/dev"
    assert outputs["BaseUrl"] == outputs["GatewayUrl"] + "/v1"
    assert outputs["RegistryFile"] == "infra/registry/dev.yaml"


def test_scheduled_functions_are_plain_handlers_that_exist(template: dict[str, Any]) -> None:
    """The scheduled and queue-fed functions ship without Chalice or the routes: their handlers
    are functions of `functions/`, every scheduled one runs every minute, and the Chalice app
    declares no schedule of its own (one would deploy nowhere)."""
    import importlib

    from chalice.app import ScheduledEventConfig

    import app

    assert not [s for s in app.app.event_sources if isinstance(s, ScheduledEventConfig)]
    handlers: dict[str, str | None] = {}
    for resource in template["Resources"].values():
        properties = resource.get("Properties", {})
        if resource["Type"] != "AWS::Serverless::Function" or properties.get("CodeUri") != (
            "build/scheduled/"
        ):
            continue
        events = (properties.get("Events") or {}).values()
        rates = [e["Properties"]["Schedule"] for e in events if e["Type"] == "Schedule"]
        handlers[properties["Handler"]] = rates[0] if rates else None
    assert handlers == {
        "functions.scheduled.reconciler": "rate(1 minute)",
        "functions.scheduled.health_poller": "rate(1 minute)",
        "functions.scheduled.batch_driver": "rate(1 minute)",
        "functions.submitter.handler": None,  # fed by SubmitterQueueMapping
    }
    for handler in handlers:
        module, _, name = handler.rpartition(".")
        assert callable(getattr(importlib.import_module(module), name)), handler


def test_every_function_logs_to_its_own_group_with_the_stack_retention(
    template: dict[str, Any],
) -> None:
    resources = template["Resources"]
    functions = {k: r for k, r in resources.items() if r["Type"] == "AWS::Serverless::Function"}
    groups = set()
    for logical_id, resource in functions.items():
        properties = resource["Properties"]
        group = properties["LoggingConfig"]["LogGroup"]["Ref"]
        groups.add(group)
        group_properties = resources[group]["Properties"]
        assert group_properties["LogGroupName"] == {
            "Fn::Sub": "/aws/lambda/" + properties["FunctionName"]["Fn::Sub"]
        }, logical_id
        assert group_properties["RetentionInDays"] == {"Ref": "LogRetentionDays"}, logical_id
    assert len(groups) == len(functions)


def test_queued_requests_have_a_dead_letter_queue_an_alarm_and_one_submitter(
    template: dict[str, Any],
) -> None:
    resources = template["Resources"]
    queue = resources["SubmitQueue"]["Properties"]
    submitter = resources["SubmitterFunction"]["Properties"]
    assert queue["RedrivePolicy"]["deadLetterTargetArn"] == {
        "Fn::GetAtt": ["SubmitDeadLetterQueue", "Arn"]
    }
    # A message must not come back while its submitter may still be sending it.
    assert queue["VisibilityTimeout"] > submitter["Timeout"]
    assert queue["SqsManagedSseEnabled"] and resources["SubmitDeadLetterQueue"]["Properties"][
        "SqsManagedSseEnabled"
    ]
    alarm = resources["SubmitDeadLetterAlarm"]["Properties"]
    assert alarm["Namespace"] == "AWS/SQS" and alarm["Threshold"] == 0
    assert alarm["Dimensions"] == [
        {"Name": "QueueName", "Value": {"Fn::GetAtt": ["SubmitDeadLetterQueue", "QueueName"]}}
    ]
    mapping = resources["SubmitterQueueMapping"]["Properties"]
    assert mapping["EventSourceArn"] == {"Fn::GetAtt": ["SubmitQueue", "Arn"]}
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert mapping["MaximumBatchingWindowInSeconds"] >= 1 and mapping["BatchSize"] == 100
    assert submitter["ReservedConcurrentExecutions"] == 1
    # No SQS event on the function: SAM would attach a managed policy reaching every queue.
    assert "Events" not in submitter
    variables = template["Globals"]["Function"]["Environment"]["Variables"]
    assert variables["FIRST_SUBMIT_QUEUE_URL"] == {"Ref": "SubmitQueue"}


def test_the_local_submit_queue_is_the_templates(template: dict[str, Any]) -> None:
    import json as _json

    import boto3
    from moto import mock_aws

    from first_local.provision import create_queue

    with mock_aws():
        sqs = boto3.client("sqs", region_name="us-east-1")
        url = create_queue(sqs, TEMPLATE, "probe-submit", visibility_timeout=5)
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        queue = template["Resources"]["SubmitQueue"]["Properties"]
        assert attributes["VisibilityTimeout"] == "5"
        assert attributes["MessageRetentionPeriod"] == str(queue["MessageRetentionPeriod"])
        redrive = _json.loads(attributes["RedrivePolicy"])
        assert redrive["deadLetterTargetArn"].endswith(":probe-submit-dead")
        assert int(redrive["maxReceiveCount"]) == queue["RedrivePolicy"]["maxReceiveCount"]
