"""The results bucket: one S3 client, and the presigned URLs handed to clusters and clients.

Keys by prefix (each expires by the bucket's lifecycle rules in template.yaml):
`results/` result bodies too large for an item, `files/` uploaded batch inputs, `batches/`
batch outputs written by the clusters through presigned PUTs.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal

from first_core.settings import get_settings


@lru_cache(maxsize=1)
def s3() -> Any:
    """The S3 client (one per process)."""
    import boto3
    from botocore.config import Config

    s = get_settings()
    # SigV4 for presigned URLs: botocore may otherwise sign them the legacy (SigV2) way, which
    # S3 refuses for buckets created since 2020.
    return boto3.client(
        "s3",
        region_name=s.aws_region,
        endpoint_url=s.aws_endpoint_url,
        config=Config(signature_version="s3v4"),
    )


def bucket() -> str:
    """The results bucket's name."""
    return get_settings().results_bucket


def put(key: str, body: bytes) -> None:
    """Write an object to the results bucket."""
    s3().put_object(Bucket=bucket(), Key=key, Body=body)


def get(key: str) -> bytes:
    """Read an object from the results bucket."""
    return bytes(s3().get_object(Bucket=bucket(), Key=key)["Body"].read())


def get_if_present(key: str) -> bytes | None:
    """The object's bytes, or None if there is no such object (expired, deleted)."""
    try:
        return get(key)
    except Exception as error:
        if _missing(error):
            return None
        raise


def delete(key: str) -> None:
    """Delete an object from the results bucket (no error if it is gone)."""
    s3().delete_object(Bucket=bucket(), Key=key)


def _missing(error: Exception) -> bool:
    """Whether S3 said "no such object" (GET says NoSuchKey, HEAD a bare 404)."""
    from botocore.exceptions import ClientError

    code = error.response.get("Error", {}).get("Code") if isinstance(error, ClientError) else None
    return code in ("404", "NoSuchKey", "NotFound")


def size(key: str) -> int | None:
    """The object's size, or None if there is no such object."""
    try:
        return int(s3().head_object(Bucket=bucket(), Key=key)["ContentLength"])
    except Exception as error:
        if _missing(error):
            return None
        raise


def presigned_url(method: Literal["GET", "PUT"], key: str, filename: str | None = None) -> str:
    """A URL that reads (GET) or writes (PUT) one object for `presigned_url_seconds`, with no
    other credential: how a cluster fetches a batch's input and delivers its output, and how a
    client downloads a file too large to answer inline."""
    params: dict[str, Any] = {"Bucket": bucket(), "Key": key}
    if filename and method == "GET":
        params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
    return str(
        s3().generate_presigned_url(
            "get_object" if method == "GET" else "put_object",
            Params=params,
            ExpiresIn=get_settings().presigned_url_seconds,
        )
    )
