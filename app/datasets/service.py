"""Meta-training datasets: a zip of one folder per class, checked in full before it is kept."""

from __future__ import annotations

import hashlib
import stat
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core import ml
from app.core.config import Settings
from app.core.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge, ServiceUnavailable
from app.core.images import check_image
from app.core.runtime import Runtime
from app.core.storage import dataset_key, dataset_prefix, delete_owned
from app.models import Dataset, Job

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class DatasetSummary:
    """What a checked zip holds."""

    class_count: int
    image_count: int
    group_count: int
    min_images_per_class: int
    validation: dict[str, Any] = field(default_factory=dict)


def validation_split(path: Path) -> dict[str, Any]:
    """The held-out part of a dataset, fixed at registration from its group (or class) names.

    Grouped data holds out whole groups (alphabets); flat data holds out whole classes. The
    choice depends only on the names (fewshot.promotion.choose_validation_groups), so it can
    be recomputed and audited, and every run on the dataset validates on exactly these.
    """
    classes_of = ml.dataset_classes(path)
    groups = sorted(set(classes_of.values()))
    by = "group" if len(groups) >= 2 else "class"

    def unit(group: str, class_key: str) -> str:
        if by == "group":
            return group
        # The class name fewshot.data.load_dataset gives a flat dataset's class.
        return f"{group}/{class_key.split('/')[-1]}" if group else class_key

    try:
        held = ml.choose_validation_groups(sorted({unit(g, c) for c, g in classes_of.items()}))
    except ml.DatasetError:
        return {}
    classes = {c for c, g in classes_of.items() if unit(g, c) in held}
    return {"validation_by": by, "validation_groups": held, "validation_classes": len(classes)}


def _ignored(name: str) -> bool:
    # The same members fewshot's loader skips: macOS resource forks and hidden files.
    return any(part.startswith(".") or part == "__MACOSX" for part in PurePosixPath(name).parts)


def _unsafe(info: zipfile.ZipInfo) -> bool:
    name = info.filename
    if name.startswith(("/", "\\")) or "\\" in name or (len(name) > 1 and name[1] == ":"):
        return True
    if ".." in PurePosixPath(name).parts:
        return True
    # Symbolic links could point anywhere once unpacked.
    return stat.S_ISLNK(info.external_attr >> 16)


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise InvalidRequest(
            "the upload is not a readable zip file; zip one folder per class and send it again",
            code="invalid_dataset_archive",
        ) from None


def _check_members(archive: zipfile.ZipFile, settings: Settings) -> list[zipfile.ZipInfo]:
    infos = archive.infolist()
    for info in infos:
        if _unsafe(info):
            raise InvalidRequest(
                f"zip member {info.filename!r} points outside the dataset folder (absolute path, "
                "'..', backslash or link); zip the class folders with relative paths",
                code="unsafe_dataset_path",
            )
    files = [i for i in infos if not i.is_dir() and not _ignored(i.filename)]
    for info in files:
        if PurePosixPath(info.filename).suffix.lower() not in IMAGE_SUFFIXES:
            raise InvalidRequest(
                f"zip member {info.filename!r} is not an image; a dataset holds only PNG or JPEG "
                "files in class folders",
                code="non_image_file",
            )
    if len(files) > settings.max_dataset_images:
        raise PayloadTooLarge(
            f"the zip holds {len(files)} images; the limit is {settings.max_dataset_images}",
            code="dataset_too_large",
        )
    unpacked = sum(i.file_size for i in files)
    if unpacked > settings.max_dataset_unpacked_bytes:
        raise PayloadTooLarge(
            f"the zip unpacks to {unpacked} bytes; the limit is "
            f"{settings.max_dataset_unpacked_bytes} bytes",
            code="dataset_too_large",
        )
    return files


def _check_layout(
    archive: zipfile.ZipFile, files: Sequence[zipfile.ZipInfo], min_classes: int
) -> DatasetSummary:

    names = [i.filename for i in files]
    if not names:
        raise InvalidRequest(
            "the zip holds no images; expected one folder per class (class/image.png, or "
            "group/class/image.png)",
            code="no_class_folders",
        )
    try:
        counts = ml.scan_dataset(Path(archive.filename or ""))
    except ml.DatasetError as exc:
        raise InvalidRequest(
            f"{exc}; expected one folder per class (class/image.png, or group/class/image.png)",
            code="no_class_folders",
        ) from None
    # A folder entry that holds no image at any depth is a class without images.
    parents = {str(PurePosixPath(n).parent) for n in names}
    for info in archive.infolist():
        folder = info.filename.rstrip("/")
        empty = not any(p == folder or p.startswith(folder + "/") for p in parents)
        if info.is_dir() and not _ignored(folder) and empty:
            raise InvalidRequest(
                f"class folder {folder!r} holds no images; every class needs at least one",
                code="empty_class",
            )
    classes = int(counts["classes"])  # type: ignore[call-overload]
    if classes < min_classes:
        raise InvalidRequest(
            f"the zip has {classes} classes; at least {min_classes} are needed (the largest way "
            "count it will be used for)",
            code="too_few_classes",
        )
    return DatasetSummary(
        class_count=classes,
        image_count=int(counts["images"]),  # type: ignore[call-overload]
        group_count=int(counts["groups"]),  # type: ignore[call-overload]
        min_images_per_class=int(counts["min_images_per_class"]),  # type: ignore[call-overload]
        validation=validation_split(Path(archive.filename or "")),
    )


def check_dataset_zip(path: Path, *, settings: Settings, min_classes: int) -> DatasetSummary:
    """Check a zip before it is accepted: safe paths, images only and decodable, enough classes."""
    with _open_zip(path) as archive:
        files = _check_members(archive, settings)
        summary = _check_layout(archive, files, min_classes)
        for info in files:
            if info.file_size > settings.max_image_bytes:
                raise PayloadTooLarge(
                    f"zip member {info.filename!r} is {info.file_size} bytes; the limit is "
                    f"{settings.max_image_bytes} bytes per image",
                    code="file_too_large",
                )
            try:
                data = archive.read(info)
            except (zipfile.BadZipFile, OSError, EOFError):
                raise InvalidRequest(
                    f"zip member {info.filename!r} is corrupt (bad CRC or truncated); "
                    "zip the folder again",
                    code="invalid_dataset_archive",
                ) from None
            check_image(
                data,
                what=f"zip member {info.filename!r}",
                max_bytes=settings.max_image_bytes,
                max_pixels=settings.max_image_pixels,
            )
        return summary


def _copy_capped(source: IO[bytes], target: Path, limit: int) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with target.open("wb") as out:
        while chunk := source.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(
                    f"the dataset zip is over the {limit}-byte limit "
                    "(MAML_SERVE_MAX_DATASET_BYTES); send fewer or smaller images",
                    code="dataset_too_large",
                )
            digest.update(chunk)
            out.write(chunk)
    return size, digest.hexdigest()


def create_dataset(
    *,
    session: Session,
    runtime: Runtime,
    tenant_id: uuid.UUID,
    name: str,
    source: IO[bytes],
    min_classes: int,
    details: dict[str, Any] | None = None,
) -> Dataset:
    """Store a zip, check it, and record it; on any failure neither a row nor a file remains."""
    name = name.strip()
    if not name:
        raise InvalidRequest("name must not be empty", code="invalid_dataset_name")
    if session.scalar(
        select(Dataset.id).where(Dataset.tenant_id == tenant_id, Dataset.name == name)
    ):
        raise Conflict(
            f"a dataset named {name!r} exists already; choose another name",
            code="dataset_name_taken",
        )
    dataset_id = uuid.uuid4()
    store = runtime.store
    key = dataset_key(dataset_id)
    # Received and checked on this host; the store gets it whole once it is accepted.
    staging = runtime.settings.work_dir / "uploads" / f"{dataset_id}.zip"
    try:
        staging.parent.mkdir(parents=True, exist_ok=True)
        size, sha256 = _copy_capped(source, staging, runtime.settings.max_dataset_bytes)
        summary = check_dataset_zip(staging, settings=runtime.settings, min_classes=min_classes)
        store.put_file(key, staging, sha256)
        row = Dataset(
            id=dataset_id,
            tenant_id=tenant_id,
            name=name,
            artifact_key=key,
            sha256=sha256,
            size_bytes=size,
            class_count=summary.class_count,
            image_count=summary.image_count,
            details={
                "layout": "grouped" if summary.group_count > 1 else "flat",
                "groups": summary.group_count,
                "min_images_per_class": summary.min_images_per_class,
                "min_classes": min_classes,
                **summary.validation,
                **(details or {}),
            },
        )
        session.add(row)
        session.commit()
    except IntegrityError:
        session.rollback()
        delete_owned(store, dataset_prefix(dataset_id))
        raise Conflict(
            f"a dataset named {name!r} exists already; choose another name",
            code="dataset_name_taken",
        ) from None
    except BaseException:
        session.rollback()
        delete_owned(store, dataset_prefix(dataset_id))
        raise
    finally:
        staging.unlink(missing_ok=True)
    return row


def register_omniglot(
    *, session: Session, runtime: Runtime, tenant_id: uuid.UUID, name: str
) -> Dataset:
    """Register the Omniglot background zip named in the settings (never a path from a request)."""
    path = runtime.settings.omniglot_path
    if path is None or not path.is_file():
        raise ServiceUnavailable(
            "no Omniglot zip is configured; set MAML_SERVE_OMNIGLOT_PATH to "
            "images_background.zip on the server, or upload a zip",
            code="omniglot_not_configured",
        )
    with path.open("rb") as source:
        return create_dataset(
            session=session,
            runtime=runtime,
            tenant_id=tenant_id,
            name=name,
            source=source,
            min_classes=20,
            details={"source": "omniglot", "file": path.name},
        )


def list_datasets(*, session: Session, tenant_id: uuid.UUID) -> Sequence[Dataset]:
    """The tenant's datasets, newest first."""
    return session.scalars(
        select(Dataset).where(Dataset.tenant_id == tenant_id).order_by(Dataset.created_at.desc())
    ).all()


def get_dataset(*, session: Session, tenant_id: uuid.UUID, dataset_id: uuid.UUID) -> Dataset:
    """The tenant's dataset, or 404."""
    row = session.scalar(
        select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id)
    )
    if row is None:
        raise NotFound(f"no dataset {dataset_id}; GET /v1/admin/datasets lists them")
    return row


def delete_dataset(*, session: Session, runtime: Runtime, dataset: Dataset) -> None:
    """Remove a dataset's row and then its zip; 409 while a queued or running run reads it."""
    busy = session.scalar(
        select(Job.id).where(Job.dataset_id == dataset.id, Job.state.in_(("queued", "running")))
    )
    if busy is not None:
        raise Conflict(
            f"meta-training run {busy} uses dataset {dataset.name!r}; cancel it "
            f"(POST /v1/admin/meta-trainings/{busy}/cancel) or wait for it to end",
            code="dataset_in_use",
        )
    dataset_id = dataset.id
    # Finished runs and versions keep their record of the dataset (name in params, id set null).
    session.delete(dataset)
    session.commit()
    delete_owned(runtime.store, dataset_prefix(dataset_id))
