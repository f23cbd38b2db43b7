"""The artifact store makes what it writes durable before a row may name it: files and folders."""

from __future__ import annotations

from pathlib import Path

from app.core.storage_local import LocalArtifactStore


def test_put_bytes_syncs_the_file_its_folder_and_the_new_folders_above(
    tmp_path: Path, fsynced: list[str]
) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    (tmp_path / "store").mkdir()
    store.put_bytes("a/b/c.bin", b"data")
    root = (tmp_path / "store").resolve()
    assert any(".c.bin." in path for path in fsynced)  # the temporary file, before its rename
    assert {str(root / "a/b"), str(root / "a"), str(root)} <= set(fsynced)
    fsynced.clear()
    store.put_bytes("a/b/d.bin", b"more")  # no new folder: only the one that gained the name
    assert set(fsynced) - {p for p in fsynced if ".d.bin." in p} == {str(root / "a/b")}


def test_put_many_syncs_each_folder_once(tmp_path: Path, fsynced: list[str]) -> None:
    store = LocalArtifactStore(tmp_path)
    store.put_many({f"t/s/{i}.png": bytes([i]) for i in range(5)})
    root = tmp_path.resolve()
    folders = [path for path in fsynced if Path(path).is_dir()]
    assert sorted(folders) == sorted({str(root / "t/s"), str(root / "t"), str(root)})
    assert len([path for path in fsynced if not Path(path).is_dir()]) == 5


def test_a_copied_tree_is_synced_before_it_is_renamed_into_place(
    tmp_path: Path, fsynced: list[str]
) -> None:
    source = tmp_path / "src"
    (source / "inner").mkdir(parents=True)
    (source / "weights.bin").write_bytes(b"w")
    (source / "inner" / "meta.json").write_bytes(b"{}")
    store = LocalArtifactStore(tmp_path / "store")
    (tmp_path / "store").mkdir()
    store.put_tree("initializations/v1", source)
    root = (tmp_path / "store").resolve()
    assert (root / "initializations/v1/inner/meta.json").read_bytes() == b"{}"
    names = [Path(path).name for path in fsynced]
    assert "weights.bin" in names and "meta.json" in names  # under the temporary folder
    assert str(root / "initializations") in fsynced and str(root) in fsynced
