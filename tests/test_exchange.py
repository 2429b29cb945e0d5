"""Scope documents imported into a scope that already has something of its own."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from proxy.memory import exchange, manage, records
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


class ChattyStore(Store):
    """A store on which `between()` writes after each write of an import: a chat (or
    another import) landing between its batches, in a fixed order."""

    between: Callable[[], Awaitable[None]] | None = None

    async def write(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        result = await super().write(fn, *args, **kwargs)
        if fn in (exchange.begin_import, exchange.restore_messages) and self.between:
            between, self.between = self.between, None  # not again while it runs
            try:
                await between()
            finally:
                self.between = between
        return result


def document(count: int) -> dict[str, Any]:
    messages = [
        {"seq": i, "role": "user" if i % 2 else "assistant", "content": f"Old line {i}."}
        for i in range(1, count + 1)
    ]
    return {"format": exchange.FORMAT, "version": exchange.VERSION, "messages": messages}


def contents(store: Store, scope_id: int) -> list[str]:
    rows = store.read_sync(manage.transcript, scope_id, states=("active",), limit=1000)
    return [m["content"] for m in rows["messages"]]


def test_a_chat_between_the_batches_of_an_appended_import_goes_after_it(tmp_path: Path) -> None:
    store = ChattyStore(tmp_path / "memory.db")
    store.start_sync()
    try:
        scope = store.write_sync(records.get_or_create_scope, "", "live", None, 1.0)
        said = [exchange.ChatMessage("user", "Hello.")]
        store.write_sync(exchange.append_chat, scope.id, said, thread=None, append=False, now=1.0)
        turns = iter(range(1, 100))

        async def chat() -> None:
            said = [exchange.ChatMessage("user", f"Live turn {next(turns)}.")]
            await store.write(
                exchange.append_chat, scope.id, said, thread=None, append=True, now=2.0
            )

        store.between = chat
        doc = document(10)
        result = asyncio.run(
            exchange.import_scope(store, scope.id, doc, append=True, now=3.0, batch=3)
        )
        store.between = None
        assert result["messages"] == 10
        live = [f"Live turn {i}." for i in range(1, 5)]  # after begin and after 3 batches
        assert contents(store, scope.id) == [
            "Hello.",
            *(m["content"] for m in doc["messages"]),
            *live,
        ]
    finally:
        store.close_sync()


def test_of_two_imports_into_one_empty_scope_the_second_is_refused(tmp_path: Path) -> None:
    store = ChattyStore(tmp_path / "memory.db")
    store.start_sync()
    try:
        scope = store.write_sync(records.get_or_create_scope, "", "race", None, 1.0)
        doc = document(10)
        refused: list[Exception] = []

        async def other_import() -> None:
            try:
                await exchange.import_scope(store, scope.id, doc, append=False, now=2.0, batch=3)
            except manage.Refused as exc:
                refused.append(exc)

        store.between = other_import
        result = asyncio.run(
            exchange.import_scope(store, scope.id, doc, append=False, now=3.0, batch=3)
        )
        store.between = None
        assert result["messages"] == 10
        assert len(refused) == 4 and "append" in str(refused[0])  # after each write
        assert contents(store, scope.id) == [m["content"] for m in doc["messages"]]
    finally:
        store.close_sync()
