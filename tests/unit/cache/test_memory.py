"""The per-worker LRU: order, exact byte accounting, bounds, Vary variants, deletes."""

from __future__ import annotations

from proxyd.cache.memory import MemoryStore
from proxyd.cache.store import ENTRY_OVERHEAD, Entry

AE = b"accept-encoding"


def entry(body: bytes = b"x", headers: list[tuple[bytes, bytes]] | None = None,
          vary: tuple[bytes, ...] = ()) -> Entry:
    return Entry(status=200, headers=headers or [(b"Content-Type", b"text/plain")], body=body,
                 stored_at=1000.0, initial_age=0.0, lifetime=60.0, vary=vary)


def accounted(store: MemoryStore) -> int:
    return sum(e.size for e in store._entries.values())


def test_entry_size_is_exact() -> None:
    e = entry(b"12345", [(b"A", b"bc"), (b"Content-Type", b"text/plain")])
    assert e.size == 5 + (1 + 2 + 4) + (12 + 10 + 4) + ENTRY_OVERHEAD


def test_get_miss_and_hit() -> None:
    store = MemoryStore(10, 1 << 20, 1 << 20)
    assert store.get("k", []) is None
    e = entry()
    assert store.put("k", [], e)
    assert store.get("k", []) is e
    assert len(store) == 1


def test_lru_order_get_refreshes_recency() -> None:
    store = MemoryStore(3, 1 << 20, 1 << 20)
    for key in ("a", "b", "c"):
        store.put(key, [], entry())
    assert store.get("a", []) is not None  # a is now the most recent
    store.put("d", [], entry())
    assert store.get("b", []) is None  # the least recently used went
    assert [k for k in ("a", "c", "d") if store.get(k, []) is not None] == ["a", "c", "d"]
    assert store.evictions == 1


def test_max_entries_bound() -> None:
    store = MemoryStore(5, 1 << 20, 1 << 20)
    for i in range(50):
        store.put(f"k{i}", [], entry())
    assert len(store) == 5
    assert store.evictions == 45
    assert [store.get(f"k{i}", []) is not None for i in range(45, 50)] == [True] * 5


def test_byte_accounting_on_insert_replace_evict_delete() -> None:
    one = entry(b"a" * 100).size
    store = MemoryStore(100, 3 * one, 1 << 20)
    store.put("a", [], entry(b"a" * 100))
    store.put("b", [], entry(b"b" * 100))
    assert store.bytes == 2 * one == accounted(store)
    # Replacement counts the new entry only, not both.
    bigger = entry(b"b" * 150)
    store.put("b", [], bigger)
    assert store.bytes == one + bigger.size == accounted(store)
    # Over max_bytes: the oldest goes, the count stays exact.
    store.put("c", [], entry(b"c" * 100))
    assert store.get("a", []) is None
    assert store.bytes == bigger.size + one == accounted(store)
    assert store.bytes <= store.max_bytes
    store.delete("b")
    assert store.bytes == one == accounted(store)
    store.delete("c")
    assert store.bytes == 0 and len(store) == 0


def test_eviction_by_bytes_makes_room_for_a_large_entry() -> None:
    small = entry(b"s" * 10).size
    store = MemoryStore(100, 10 * small, 1 << 20)
    for i in range(10):
        store.put(f"s{i}", [], entry(b"s" * 10))
    assert store.bytes == 10 * small
    large = entry(b"L" * (5 * small))
    assert store.put("large", [], large)
    assert store.get("large", []) is large
    assert store.bytes == accounted(store) <= store.max_bytes
    assert store.evictions >= 5


def test_bytes_stay_within_max_bytes_under_churn() -> None:
    store = MemoryStore(10_000, 64 * 1024, 1 << 20)
    for i in range(2000):
        store.put(f"k{i % 300}", [], entry(b"z" * (i % 700)))
        assert store.bytes == accounted(store) <= store.max_bytes


def test_max_object_size_and_oversized_entries_are_not_stored() -> None:
    store = MemoryStore(10, 1 << 20, 100)
    assert store.put("ok", [], entry(b"a" * 100))
    assert not store.put("big", [], entry(b"a" * 101))
    assert store.get("big", []) is None
    tiny = MemoryStore(10, 200, 1 << 20)  # an entry bigger than the whole store
    assert not tiny.put("k", [], entry(b"a" * 100))
    assert tiny.bytes == 0 and len(tiny) == 0


def test_vary_variants_kept_apart() -> None:
    store = MemoryStore(10, 1 << 20, 1 << 20)
    gz, br = [(AE, b"gzip")], [(AE, b"br")]
    e_gz, e_br = entry(b"gz", vary=(AE,)), entry(b"br", vary=(AE,))
    store.put("k", gz, e_gz)
    store.put("k", br, e_br)
    assert store.get("k", gz) is e_gz
    assert store.get("k", br) is e_br
    assert store.get("k", []) is None  # no Accept-Encoding: a third variant, not stored
    assert len(store) == 2


def test_vary_change_drops_old_variants() -> None:
    store = MemoryStore(10, 1 << 20, 1 << 20)
    gz, br = [(AE, b"gzip")], [(AE, b"br")]
    store.put("k", gz, entry(b"gz", vary=(AE,)))
    store.put("k", br, entry(b"br", vary=(AE,)))
    plain = entry(b"plain")  # the upstream stopped varying
    store.put("k", gz, plain)
    assert len(store) == 1
    assert store.get("k", br) is plain  # one entry for every request now
    assert store.bytes == plain.size == accounted(store)


def test_eviction_of_last_variant_forgets_the_vary() -> None:
    store = MemoryStore(1, 1 << 20, 1 << 20)
    store.put("k", [(AE, b"gzip")], entry(vary=(AE,)))
    store.put("other", [], entry())
    assert store._vary == {"other": ()}
    assert store._variants == {"other": {"other"}}


def test_delete_removes_every_variant() -> None:
    store = MemoryStore(10, 1 << 20, 1 << 20)
    store.put("k", [(AE, b"gzip")], entry(vary=(AE,)))
    store.put("k", [(AE, b"br")], entry(vary=(AE,)))
    store.put("other", [], entry())
    assert store.delete("k") == 2
    assert store.get("k", [(AE, b"gzip")]) is None
    assert store.delete("k") == 0
    assert len(store) == 1
    assert store.bytes == accounted(store)


def test_delete_prefix() -> None:
    store = MemoryStore(10, 1 << 20, 1 << 20)
    for key in ("http://h/a/1", "http://h/a/2", "http://h/ab", "http://h/b/1"):
        store.put(key, [], entry())
    store.put("http://h/a/3", [(AE, b"gzip")], entry(vary=(AE,)))
    assert store.delete_prefix("http://h/a/") == 3
    assert [k for k in ("http://h/a/1", "http://h/ab", "http://h/b/1")
            if store.get(k, []) is not None] == ["http://h/ab", "http://h/b/1"]
    assert store.bytes == accounted(store)
    store.clear()
    assert store.bytes == 0 and len(store) == 0
