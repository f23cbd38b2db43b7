"""The S3-compatible artifact store: objects in one bucket under a key prefix, through boto3.

Meant for AWS S3, Ceph RGW, SeaweedFS, Garage and MinIO; the tests run it against a real
SeaweedFS server. boto3 rather than obstore: the objects are images of KBs and checkpoints,
datasets and initializations of 1-250 MB, read and written from synchronous worker threads, and
boto3 gives that with nothing written by hand: managed multipart uploads and ranged parallel
downloads (s3transfer, streamed from and to files), bounded timeouts and standard-mode retries
with backoff, conditional writes (If-None-Match), and the error codes and stubs every
S3-compatible server is tested against. obstore's speed matters for many small async requests,
which this service does not make; its error types would need their own mapping too.

Reads check the sha256 recorded in the database, as the local store does; a local copy
(`local_file`, `local_tree`) lives in a bounded folder of verified copies (LocalCopies). A server
that does not answer, or answers 5xx or refuses the credentials, raises StorageUnavailable (503
with Retry-After) within seconds; the bucket, endpoint and key are logged, never shown.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.exceptions import RetriesExceededError

from app.core.config import Settings
from app.core.errors import StorageUnavailable
from app.core.storage import StoredObject, corrupt, sha256_bytes, sha256_file
from app.core.storage_cache import LocalCopies

log = logging.getLogger(__name__)

# PUTs in flight at once for a support set's images (a round trip each).
PARALLEL_PUTS = 8
# S3's own bound on ListObjectsV2 pages and DeleteObjects batches.
MAX_PAGE = 1000
# Files above this go up in parts of this size, several at a time (checkpoints, datasets).
MULTIPART_BYTES = 16 * 1024 * 1024
# Answers that mean "the store cannot serve now": the server's own trouble, or credentials or a
# bucket the operator must fix. Each becomes StorageUnavailable (503), never a 500.
_UNAVAILABLE_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "NoSuchBucket",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
# A conditional write that found the key there (412), or one racing another such write (409).
_ALREADY_THERE_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}


def s3_client(settings: Settings) -> Any:
    """A boto3 S3 client for the settings: bounded timeouts and retries, path-style requests
    for a custom endpoint; credentials from the usual AWS environment."""
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=settings.s3_region,
        connect_timeout=settings.s3_connect_timeout_seconds,
        read_timeout=settings.s3_read_timeout_seconds,
        retries={"total_max_attempts": settings.s3_max_attempts, "mode": "standard"},
        s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto"},
        # CRC checksums only where an operation needs them: several S3-compatible servers reject
        # the newer default ones, and every read is checked against its sha256 anyway.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=settings.s3_endpoint_url, config=config
    )


class S3ArtifactStore:
    """Artifacts as objects `<prefix><key>` in one bucket; local copies in `copies`."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        copies: LocalCopies,
        *,
        prefix: str = "",
        page_size: int = MAX_PAGE,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.copies = copies
        self.page_size = min(page_size, MAX_PAGE)
        self.transfer = TransferConfig(
            multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> S3ArtifactStore:
        """The store the settings name (MAML_SERVE_S3_BUCKET, _PREFIX, _ENDPOINT_URL, _REGION)."""
        if not settings.s3_bucket:
            raise ValueError("MAML_SERVE_ARTIFACT_BACKEND=s3 needs MAML_SERVE_S3_BUCKET")
        copies = LocalCopies(settings.artifact_cache_dir, settings.artifact_cache_bytes)
        return cls(s3_client(settings), settings.s3_bucket, copies, prefix=settings.s3_prefix)

    # --- writes ---------------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes) -> str:
        """Write `data` under `key` (a PUT is visible only once complete); its sha256."""
        sha256 = sha256_bytes(data)
        with self._answers("put", key):
            self.client.put_object(
                Bucket=self.bucket, Key=self._name(key), Body=data, Metadata={"sha256": sha256}
            )
        return sha256

    def put_many(self, items: Mapping[str, bytes]) -> None:
        """Write content-addressed keys, each only if absent (If-None-Match: *), several at once."""
        if len(items) <= 1:
            for key, data in items.items():
                self._put_new(key, data)
            return
        with ThreadPoolExecutor(min(len(items), PARALLEL_PUTS)) as pool:
            # Every PUT is waited for; the first error, if any, is raised after.
            for done in [pool.submit(self._put_new, k, d) for k, d in items.items()]:
                done.result()

    def put_file(self, key: str, path: Path, sha256: str | None = None) -> str:
        """Upload a file (in parts above 16 MiB, visible once the upload completes); its sha256."""
        sha256 = sha256 if sha256 is not None else sha256_file(path)
        with self._answers("upload", key):
            self.client.upload_file(
                str(path),
                self.bucket,
                self._name(key),
                ExtraArgs={"Metadata": {"sha256": sha256}},
                Config=self.transfer,
            )
        return sha256

    def put_tree(self, prefix: str, folder: Path) -> None:
        """Upload every file of a folder under `prefix`; keys already there are kept."""
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            if path.stat().st_size <= MULTIPART_BYTES:
                self._put_new(key, path.read_bytes())
            elif self.head(key) is None:
                # Uploaded in parts from the file, which cannot be made conditional: a
                # concurrent registration of the same folder writes the same bytes.
                self.put_file(key, path)

    def _put_new(self, key: str, data: bytes) -> None:
        """PUT unless the key exists; a key that does holds the same bytes (content addressing)."""
        try:
            with self._answers("put", key):
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=self._name(key),
                    Body=data,
                    Metadata={"sha256": sha256_bytes(data)},
                    IfNoneMatch="*",
                )
        except ClientError as exc:
            if _code(exc) not in _ALREADY_THERE_CODES:
                raise

    # --- reads ----------------------------------------------------------------------------------

    def read_bytes(self, key: str, sha256: str | None = None) -> bytes:
        """The object's bytes, checked against `sha256` when one is given."""
        with self._answers("get", key):
            answer = self.client.get_object(Bucket=self.bucket, Key=self._name(key))
            data: bytes = answer["Body"].read()
        if sha256 is not None and sha256_bytes(data) != sha256:
            raise corrupt(key)
        return data

    def local_file(self, key: str, sha256: str) -> Path:
        """A verified local copy of the object, downloaded once into the copies folder."""
        path = self.copies.file(sha256, lambda target: self._download(key, target))
        if path is None:
            raise corrupt(key)
        return path

    def local_tree(self, prefix: str, expected: Mapping[str, str] | None = None) -> Path:
        """A local copy of every object under `prefix`, the files in `expected` verified."""
        bad: list[str] = []
        for _ in range(2):
            folder = self.copies.tree(prefix, lambda target: self._download_tree(prefix, target))
            bad = [
                name
                for name, sha256 in (expected or {}).items()
                if not (folder / name).is_file() or sha256_file(folder / name) != sha256
            ]
            if not bad:
                return folder
            # A copy that rotted on disk is fetched once more; a bad object stays bad.
            self.copies.forget_tree(prefix)
        raise corrupt(f"{prefix}/{bad[0]}")

    def _download(self, key: str, target: Path) -> None:
        with self._answers("download", key):
            self.client.download_file(
                self.bucket, self._name(key), str(target), Config=self.transfer
            )

    def _download_tree(self, prefix: str, target: Path) -> None:
        found = False
        for item in self.iter_objects(prefix):
            found = True
            relative = PurePosixPath(item.key).relative_to(prefix)
            path = target.joinpath(*relative.parts)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._download(item.key, path)
        if not found:
            raise FileNotFoundError(f"no stored folder {prefix!r}")

    def head(self, key: str) -> tuple[int, str | None] | None:
        """The object's size and the sha256 recorded when it was written, or None if absent."""
        try:
            with self._answers("head", key):
                answer = self.client.head_object(Bucket=self.bucket, Key=self._name(key))
        except FileNotFoundError:
            return None
        return int(answer["ContentLength"]), answer.get("Metadata", {}).get("sha256")

    def digest(self, key: str) -> tuple[int, str]:
        """Size and sha256 of the object as read back now (streamed)."""
        digest = hashlib.sha256()
        size = 0
        with self._answers("get", key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._name(key))["Body"]
            for chunk in body.iter_chunks(1 << 20):
                digest.update(chunk)
                size += len(chunk)
        return size, digest.hexdigest()

    def exists(self, key: str) -> bool:
        """True when the key is an object, or a prefix with objects under it."""
        if self.head(key) is not None:
            return True
        return next(self.iter_objects(key), None) is not None

    # --- listing and deleting -------------------------------------------------------------------

    def iter_objects(self, prefix: str) -> Iterator[StoredObject]:
        """Every object under `prefix` ("" for all), page by page, in key order."""
        folder = prefix.strip("/")
        name = self._name(folder) + "/" if folder else self.prefix
        for page in self._pages(name):
            for item in page:
                yield StoredObject(
                    item["Key"][len(self.prefix) :], int(item["Size"]), item["LastModified"]
                )

    def delete_tree(self, prefix: str) -> None:
        """Delete the key and every object under `prefix/`, a listed page at a time."""
        folder = prefix.strip("/")
        self._delete([self._name(folder)])
        for page in self._pages(self._name(folder) + "/"):
            self._delete([item["Key"] for item in page])

    def _pages(self, name: str) -> Iterator[list[dict[str, Any]]]:
        token: str | None = None
        while True:
            extra = {} if token is None else {"ContinuationToken": token}
            with self._answers("list", name):
                answer = self.client.list_objects_v2(
                    Bucket=self.bucket, Prefix=name, MaxKeys=self.page_size, **extra
                )
            yield list(answer.get("Contents", []))
            token = answer.get("NextContinuationToken")
            if not answer.get("IsTruncated") or not token:
                return

    def _delete(self, names: list[str]) -> None:
        for start in range(0, len(names), MAX_PAGE):
            batch = [{"Key": name} for name in names[start : start + MAX_PAGE]]
            with self._answers("delete", batch[0]["Key"]):
                answer = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            errors = answer.get("Errors", [])
            if errors:
                log.error("S3 delete in bucket %s left %d objects: %s", self.bucket,
                          len(errors), errors[:5])  # fmt: skip
                raise StorageUnavailable()

    # --- names and errors -----------------------------------------------------------------------

    def _name(self, key: str) -> str:
        parts = key.split("/")
        if key.startswith("/") or ".." in parts:
            raise ValueError(f"artifact key escapes the store: {key!r}")
        return self.prefix + key

    @contextmanager
    def _answers(self, action: str, key: str) -> Iterator[None]:
        """Map the client's errors: missing -> FileNotFoundError; unreachable, 5xx or refused
        -> StorageUnavailable (logged with the bucket, endpoint and key); others as they are."""
        try:
            yield
        except ClientError as exc:
            code = _code(exc)
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in _MISSING_CODES:
                raise FileNotFoundError(f"no stored object {key!r}") from None
            if status >= 500 or status == 403 or code in _UNAVAILABLE_CODES:
                self._log_unavailable(action, key, f"{status} {code}")
                raise StorageUnavailable() from exc
            raise
        except (BotoCoreError, Boto3Error, RetriesExceededError) as exc:
            self._log_unavailable(action, key, repr(exc))
            raise StorageUnavailable() from exc

    def _log_unavailable(self, action: str, key: str, why: str) -> None:
        endpoint = getattr(getattr(self.client, "meta", None), "endpoint_url", None)
        log.error("S3 %s of %r in bucket %s at %s failed: %s", action, key, self.bucket,
                  endpoint, why)  # fmt: skip


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
