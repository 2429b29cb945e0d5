"""Scope documents imported into a scope that already has something of its own."""

from __future__ import annotations

import asyncio
from pathlib import Path

from proxy.memory import exchange, records
from proxy.memory.store import Store


def test_an_import_into_a_scope_with_settings_of_its_own_adds_the_documents_others(
    tmp_path: Path,
) -> None:
    store = Store.open_sync(tmp_path / "memory.db")
    try:
        source = store.write_sync(records.get_or_create_scope, "", "source", None, 1.0)
        scene = {"character": "A cartographer.", "char_name": "Mira"}
        store.write_sync(records.update_scope_settings, source.id, {"scene": scene, "style": False})
        doc = store.read_sync(exchange.export_scope, source.id)
        # Made first, with a switch set (to the value it has anyway): not "fresh".
        target = store.write_sync(records.get_or_create_scope, "", "target", None, 2.0)
        store.write_sync(records.update_scope_settings, target.id, {"style": True})
        result = asyncio.run(exchange.import_scope(store, target.id, doc, append=False, now=3.0))
        settings = store.read_sync(records.get_scope_by_id, "", target.id).settings
        assert settings == {"scene": scene, "style": True}  # its own switch kept
        assert result["kept_existing"] == ["settings.style"]
    finally:
        store.close_sync()
