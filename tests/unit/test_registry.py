"""The registry: versions, atomic durable writes, locking, and the serving-side store."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from svd_vllm.core import artifact
from svd_vllm.registry import Registry, RegistryError
from svd_vllm.registry.manifest_watcher import ManifestWatcher
from svd_vllm.vllm.vector_store import VectorStore
from tests.support.artifacts import random_vector

vec = random_vector


def test_registry_adds_lists_replaces_and_removes_versions(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    e1 = reg.add(vec("a"))
    assert (e1.name, e1.version) == ("a", 1)
    assert reg.get("a") == e1 and [e.name for e in reg.list()] == ["a"]
    with pytest.raises(RegistryError) as err:
        reg.add(vec("a", seed=1))
    assert err.value.code == "conflict"
    e2 = reg.add(vec("a", seed=1), replace=True)
    assert e2.version == 2 and e2.content_hash != e1.content_hash
    assert torch.equal(reg.load("a").shift, vec("a", seed=1).shift)
    reg.remove("a")
    with pytest.raises(RegistryError) as err:
        reg.get("a")
    assert err.value.code == "not_found"
    # Versions only grow, even across delete and re-register.
    assert reg.add(vec("a", seed=2)).version == 3


def test_update_settings_bumps_version_and_keeps_them_on_replace(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    reg.add(vec("a", mu=-2.0))
    e = reg.update("a", default_scale=0.5, alpha_override=0.2)
    assert e.version == 2 and e.strength() == pytest.approx(-1.0) and e.mask_alpha() == 0.2
    e = reg.update("a", mu_bar_override=-4.0, enabled=False)
    assert e.version == 3 and e.strength() == pytest.approx(-2.0) and not e.enabled
    e = reg.add(vec("a", seed=5, mu=-3.0), replace=True)
    assert e.version == 4 and e.default_scale == 0.5 and e.mu_bar_override == -4.0 and not e.enabled
    with pytest.raises(RegistryError, match="unknown settings"):
        reg.update("a", colour="red")
    with pytest.raises(RegistryError, match="invalid settings"):
        reg.update("a", alpha_override=0.0)
    with pytest.raises(RegistryError, match="invalid settings"):
        reg.update("a", default_scale=float("nan"))
    assert reg.get("a").version == 4  # nothing written by the refused updates


def test_bad_names_and_vocab_are_refused(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    for name in ("../x", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(RegistryError, match="invalid vector name"):
            reg.add(vec("ok"), name=name)
    with pytest.raises(RegistryError, match="vocab_size 16 does not match the served model's 32"):
        reg.add(vec("a"), expected_vocab_size=32)
    assert reg.list() == []


def test_manifest_names_only_complete_files(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    for i in range(3):
        reg.add(vec(f"v{i}", seed=i))
    m = json.loads(reg.manifest_path.read_text())
    for entry in m["vectors"].values():
        assert artifact.load(tmp_path / entry["file"]).meta.content_hash == entry["content_hash"]
    assert not list(tmp_path.rglob("*.tmp"))


def _hammer(root: str, worker: int, n: int) -> None:
    reg = Registry(root)
    for i in range(n):
        reg.add(vec(f"w{worker}", seed=i), replace=True)
        reg.update("shared", default_scale=worker + i / 100)


def test_concurrent_writers_lose_no_update(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    reg.add(vec("shared"))
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), w, 10)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    m = reg.manifest()
    assert {f"w{w}" for w in range(4)} <= set(m.vectors)
    assert all(m.vectors[f"w{w}"].version == 10 for w in range(4))
    assert m.vectors["shared"].version == 1 + 40  # every update got its own version


def _writer_paused_at(root: str, replace_call: int, paused: Any) -> None:
    """Keep replacing 'victim'; freeze just before the ``replace_call``-th atomic rename.

    Runs in a child process: patching ``os.replace`` here touches no other process.
    """
    real_replace = os.replace
    calls = 0

    def replace(src: Any, dst: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == replace_call:
            paused.set()
            time.sleep(120)  # the parent kills us here, with the temp file written
        real_replace(src, dst)

    os.replace = replace
    reg = Registry(root)
    for i in range(1, 100):
        reg.add(vec("victim", vocab=200_000, seed=i), replace=True)


# rename 1: the new artifact file; rename 2: the manifest naming it; rename 3: the next file.
@pytest.mark.parametrize(("replace_call", "version_after"), [(1, 1), (2, 1), (3, 2)])
def test_writer_killed_mid_write_leaves_a_consistent_registry(
    tmp_path: Path, replace_call: int, version_after: int
) -> None:
    reg = Registry(tmp_path)
    reg.add(vec("victim", vocab=200_000))
    ctx = mp.get_context("spawn")  # a forked child of a torch process can deadlock in torch
    paused = ctx.Event()
    p = ctx.Process(target=_writer_paused_at, args=(str(tmp_path), replace_call, paused))
    p.start()
    assert paused.wait(60), "the writer never reached the rename"
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    torn = list(tmp_path.rglob(".*.tmp"))
    assert len(torn) == 1  # the kill landed mid-write: its temp file is still there
    entry = reg.get("victim")
    assert entry.version == version_after  # the manifest moved only if its rename happened
    art = reg.load(entry)  # and it names a complete, valid file
    assert art.meta.content_hash == entry.content_hash
    assert reg.cleanup() == 1 and not list(tmp_path.rglob(".*.tmp"))
    # The lock is free again after the killed writer.
    assert reg.add(vec("after")).version == 1


def test_watcher_sees_changes_by_stat(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    w = ManifestWatcher(reg)
    m, changed = w.current()
    assert m.vectors == {} and changed
    assert w.current()[1] is False
    reg.add(vec("a"))
    m, changed = w.current()
    assert changed and "a" in m.vectors
    reg.manifest_path.write_text("{ not json")
    m, changed = w.current()
    assert "a" in m.vectors and not changed  # the broken manifest is ignored


def test_store_refuses_bad_files_and_never_serves_a_stale_version(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    reg.add(vec("a", seed=1))
    reg.add(vec("wrong", vocab=8))
    store = VectorStore(reg, "cpu", 16, start_thread=False)
    assert store.names() == ["a"]  # the wrong-vocab vector is refused
    good = store.resolve("a")
    assert good is not None and good.entry.version == 1
    first_key = good.key
    # Drop a corrupted artifact in as version 2 of "a".
    m = reg.manifest()
    bad_rel = "vectors/a/v2-corrupt.safetensors"
    (tmp_path / bad_rel).write_bytes(b"\x00" * 64)
    m.vectors["a"] = m.vectors["a"].model_copy(
        update={"version": 2, "file": bad_rel, "content_hash": "sha256:" + "0" * 64}
    )
    reg.manifest_path.write_text(m.model_dump_json())
    assert store.refresh()
    # Never an older version the manifest no longer names: "a" serves nothing now...
    assert store.resolve("a") is None and store.names() == []
    # ...except to requests that pinned version 1 before the change.
    pinned = store.resolve("a", pinned=first_key)
    assert pinned is not None and pinned.entry.version == 1
    # Repaired in place (same entry, the file rewritten): picked up without a manifest change.
    good_bytes = artifact.save(vec("a", seed=5), tmp_path / "v2.safetensors").read_bytes()
    m = reg.manifest()
    m.vectors["a"] = m.vectors["a"].model_copy(
        update={"content_hash": artifact.load(tmp_path / "v2.safetensors").meta.content_hash}
    )
    reg.manifest_path.write_text(m.model_dump_json())
    assert store.refresh() and store.resolve("a") is None  # new entry, file still corrupt
    assert not store.refresh()  # nothing changed: the bad file is not read again
    (tmp_path / bad_rel).write_bytes(good_bytes)
    assert store.refresh()
    assert store.resolve("a").entry.version == 2
    # A good replacement is picked up.
    reg.add(vec("a", seed=7), replace=True)
    store.refresh()
    assert store.resolve("a").entry.version == 3
    assert torch.equal(store.resolve("a").shift, vec("a", seed=7).shift)
    # A pinned old version stays resolvable for in-flight requests.
    assert store.resolve("a", pinned=first_key).entry.version == 1


def test_store_thread_picks_up_changes_within_a_second(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    store = VectorStore(reg, "cpu", 16, poll_interval=0.1)
    try:
        t0 = time.monotonic()
        reg.add(vec("late"))
        while store.resolve("late") is None and time.monotonic() - t0 < 5:
            time.sleep(0.02)
        assert store.resolve("late") is not None
        assert time.monotonic() - t0 < 1.0
    finally:
        store.close()


def test_store_slots_are_reference_counted_and_bounded(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    for i in range(10):
        reg.add(vec(f"v{i}", seed=i))
    store = VectorStore(reg, "cpu", 16, start_thread=False)
    lvs = [store.resolve(f"v{i}") for i in range(10)]
    s0 = store.acquire(lvs[0])
    assert store.acquire(lvs[0]) == s0  # one copy per version
    assert torch.equal(store.table[s0], lvs[0].shift)
    slots = [store.acquire(lv) for lv in lvs[1:6]]
    assert len(set(slots) | {s0}) == 6 and store.rows_in_use() == 6
    for i, s in enumerate(slots):
        assert torch.equal(store.table[s], lvs[i + 1].shift)
    for s in slots:
        store.release(s)
    cap = store.table.shape[0]
    for lv in lvs[6:]:  # idle slots are reused before the table grows
        store.release(store.acquire(lv))
    assert store.table.shape[0] == cap
    assert torch.equal(store.table[s0], lvs[0].shift)  # the in-use slot was never evicted


def test_store_host_memory_is_bounded_and_evicted_vectors_are_read_again(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    for i in range(10):
        reg.add(vec(f"v{i}", seed=i))
    store = VectorStore(reg, "cpu", 16, start_thread=False, host_capacity=3)
    assert store.names() == sorted(f"v{i}" for i in range(10))  # every entry is served
    assert store.host_cached() == 3 and store.loads == 10  # each file verified once
    for i in range(10):  # every vector still resolves to its own data
        lv = store.resolve(f"v{i}")
        assert lv is not None and torch.equal(lv.shift, vec(f"v{i}", seed=i).shift)
        assert store.host_cached() <= 3
    assert store.loads > 10  # the evicted ones were read again
    # A hot vector stays cached: no further reads.
    store.resolve("v9")
    before = store.loads
    for _ in range(5):
        store.resolve("v9")
    assert store.loads == before
    # An evicted vector whose file went bad after registration is not served (no crash).
    path = tmp_path / reg.manifest().vectors["v0"].file
    path.write_bytes(b"\x00" * 64)
    assert store.resolve("v0") is None
    assert store.resolve("v1") is not None


def test_store_host_capacity_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SVD_VLLM_HOST_CACHE", "5")
    assert VectorStore(Registry(tmp_path), "cpu", 16, start_thread=False).host_capacity == 5
    monkeypatch.setenv("SVD_VLLM_HOST_CACHE", "zero")
    with pytest.raises(ValueError, match="SVD_VLLM_HOST_CACHE"):
        VectorStore(Registry(tmp_path), "cpu", 16, start_thread=False)


def test_a_recreated_registry_never_serves_the_old_bytes(tmp_path: Path) -> None:
    """Versions restart when the registry is deleted: the engine must not reuse name@1's slot."""
    import shutil

    reg = Registry(tmp_path / "reg")
    reg.add(vec("sv", seed=1))
    store = VectorStore(reg, "cpu", 16, start_thread=False)
    old = store.resolve("sv")
    assert old is not None
    slot = store.acquire(old)  # a request steered with it
    store.release(slot)
    shutil.rmtree(tmp_path / "reg")  # the operator wipes the registry ...
    store.refresh()
    again = reg.add(vec("sv", seed=2))  # ... and registers other content under the same name
    assert again.version == old.entry.version  # the version number is reused
    store.refresh()
    new = store.resolve("sv")
    assert new is not None and new.key != old.key
    assert torch.equal(new.shift, vec("sv", seed=2).shift)
    assert torch.equal(store.table[store.acquire(new)], vec("sv", seed=2).shift)


def test_a_member_is_named_by_vector_or_name_and_its_scale_is_a_scale() -> None:
    from pydantic import ValidationError

    from svd_vllm.registry import Member

    assert Member.model_validate({"name": "a", "scale": 0.5}) == Member(vector="a", scale=0.5)
    assert Member.model_validate({"vector": "a"}).model_dump() == {"vector": "a", "scale": None}
    for bad in (
        {"vector": "a", "name": "b"},
        {"name": "a", "scale": float("nan")},
        {"name": "a", "scale": "0.5"},
        {"name": "a", "scale": 1e6},
    ):
        with pytest.raises(ValidationError):
            Member.model_validate(bad)
