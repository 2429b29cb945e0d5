"""Resolving the scope of a request, and the names in a chat."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.memory.scope import (
    InvalidScope,
    Names,
    ScopeRef,
    detect_names,
    resolve_scope,
    validate_scope_name,
)

SERAPHINA_GREETING = "*Seraphina looks up from the herbs she is sorting.* Oh! You're awake."
KAEL_GREETING = "*Kael leans on the tavern counter.* What'll it be, stranger?"


def st_body(
    char: str = "Seraphina",
    user: str = "Alex",
    *,
    greeting: str | None = SERAPHINA_GREETING,
    history: list[tuple[str, str]] | None = None,
    world_info: str = "Eldoria is a forest realm.",
    main_prompt: str | None = None,
) -> dict[str, Any]:
    """A SillyTavern Custom (OpenAI-compatible) chat body, as clients.md describes it."""
    if main_prompt is None:
        main_prompt = f"Write {char}'s next reply in a fictional chat between {char} and {user}."
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": main_prompt},
        {"role": "system", "content": f"[World Info: {world_info}]"},
        {"role": "system", "content": f"{char} is a character with a long description."},
        {"role": "system", "content": "[Start a new Chat]"},
    ]
    if greeting is not None:
        messages.append({"role": "assistant", "content": greeting})
    messages += [{"role": r, "content": t} for r, t in history or [("user", "Hello.")]]
    return {
        "messages": messages,
        "model": "gemma-3-270m",
        "temperature": 1,
        "max_tokens": 300,
        "stream": True,
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "top_p": 1,
        "logit_bias": {},
    }


def auto(body: dict[str, Any]) -> ScopeRef:
    return resolve_scope(path_scope=None, headers={}, body=body)


# -- validate_scope_name -----------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["a", "my-chat", "Alice_2", "owui-chat-3f2a", "team:alice.v2", "9" * 128]
)
def test_valid_scope_names_pass_unchanged(name: str) -> None:
    assert validate_scope_name(name) == name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty"),
        ("a/b", "slashes"),
        ("a\\b", "slashes"),
        ("..", "'..'"),
        ("a..b", "'..'"),
        ("a\nb", "control"),
        ("a\x00", "control"),
        ("-start", "start with a letter or digit"),
        (".hidden", "start with a letter or digit"),
        ("has space", "only letters"),
        ("naïve", "only letters"),
        ("x" * 129, "longer than 128"),
    ],
)
def test_invalid_scope_names_say_why(name: str, reason: str) -> None:
    with pytest.raises(InvalidScope, match=reason):
        validate_scope_name(name)


def test_invalid_scope_is_a_value_error() -> None:
    assert issubclass(InvalidScope, ValueError)


# -- resolve_scope: explicit sources -----------------------------------------------


def test_path_scope_wins_over_everything() -> None:
    headers = {"x-memory-scope": "from-header", "x-openwebui-chat-id": "c1"}
    body = {**st_body(), "user": "alice"}
    ref = resolve_scope(path_scope="from-path", headers=headers, body=body)
    assert ref == ScopeRef("from-path", "path", "Seraphina")


def test_header_scope_wins_over_open_webui_and_user() -> None:
    headers = {"x-memory-scope": "my-chat", "x-openwebui-chat-id": "c1"}
    ref = resolve_scope(path_scope=None, headers=headers, body={**st_body(), "user": "alice"})
    assert (ref.name, ref.source) == ("my-chat", "header")


def test_invalid_path_or_header_scope_is_refused() -> None:
    with pytest.raises(InvalidScope):
        resolve_scope(path_scope="../etc", headers={}, body=st_body())
    with pytest.raises(InvalidScope, match="slashes"):
        resolve_scope(path_scope=None, headers={"x-memory-scope": "a/b"}, body=st_body())
    # Header bytes arrive decoded as latin-1; the error shows the name as the client
    # wrote it (UTF-8), not as mojibake, nor an emoji as "control characters".
    for name, shown in (("héllo", "'héllo'"), ("chat-🐉", "'chat-🐉'")):
        latin1 = name.encode().decode("latin-1")
        with pytest.raises(InvalidScope) as caught:
            resolve_scope(path_scope=None, headers={"x-memory-scope": latin1}, body=st_body())
        assert shown in str(caught.value) and "control" not in str(caught.value)


def test_empty_header_scope_counts_as_absent() -> None:
    ref = resolve_scope(path_scope=None, headers={"x-memory-scope": ""}, body=st_body())
    assert ref.source == "auto"


def test_open_webui_chat_id_and_user_name() -> None:
    headers = {
        "x-openwebui-chat-id": "3f2a9c1e-77b0-4c1e-9a55-2b1d0c9e8f00",
        "x-openwebui-user-id": "u-42",
        "x-openwebui-user-name": "F%C3%A1bian%20Ruiz",  # Open WebUI URL-encodes it
    }
    body = {"messages": [{"role": "user", "content": "hi"}], "user": "ignored"}
    ref = resolve_scope(path_scope=None, headers=headers, body=body)
    assert ref == ScopeRef(
        "owui-chat-3f2a9c1e-77b0-4c1e-9a55-2b1d0c9e8f00", "openwebui", "Fábian Ruiz"
    )


def test_open_webui_user_id_when_no_chat_id() -> None:
    headers = {"x-openwebui-user-id": "8d1c", "x-openwebui-chat-id": ""}
    ref = resolve_scope(path_scope=None, headers=headers, body={"messages": []})
    assert (ref.name, ref.source, ref.label) == ("owui-user-8d1c", "openwebui", None)


def test_open_webui_ids_are_sanitised_not_refused() -> None:
    odd = resolve_scope(
        path_scope=None, headers={"x-openwebui-user-id": "alice@example.com"}, body={}
    )
    assert odd.name.startswith("owui-user-alice-example.com-")
    validate_scope_name(odd.name)
    # deterministic, and two ids that clean up alike stay apart
    again = resolve_scope(
        path_scope=None, headers={"x-openwebui-user-id": "alice@example.com"}, body={}
    )
    other = resolve_scope(
        path_scope=None, headers={"x-openwebui-user-id": "alice#example.com"}, body={}
    )
    assert again.name == odd.name
    assert other.name != odd.name


def test_user_field_names_the_scope() -> None:
    ref = resolve_scope(path_scope=None, headers={}, body={**st_body(), "user": "alice"})
    assert ref == ScopeRef("alice", "user", "Seraphina")


@pytest.mark.parametrize("user", ["Ana María", "../../etc/passwd", "日本語", "x" * 300])
def test_user_field_is_sanitised_into_a_valid_name(user: str) -> None:
    ref = resolve_scope(path_scope=None, headers={}, body={"messages": [], "user": user})
    assert ref.source == "user"
    assert validate_scope_name(ref.name) == ref.name
    assert resolve_scope(path_scope=None, headers={}, body={"user": user}).name == ref.name


def test_blank_or_non_string_user_field_is_ignored() -> None:
    assert auto({**st_body(), "user": "   "}).source == "auto"
    assert auto({**st_body(), "user": 42}).source == "auto"


# -- resolve_scope: automatic ------------------------------------------------------


def test_auto_scope_is_stable_across_turns_while_world_info_changes() -> None:
    history: list[tuple[str, str]] = []
    names = set()
    for turn in range(6):
        history.append(("user", f"Tell me about the river, part {turn}."))
        body = st_body(history=history, world_info=f"The river entry, keyword hit {turn}.")
        names.add(auto(body).name)
        history.append(("assistant", f"The river flows north, part {turn}."))
    assert len(names) == 1
    ref = auto(st_body())
    assert ref.name == names.pop()
    assert ref.source == "auto"
    assert ref.label == "Seraphina"
    assert ref.name.startswith("auto-") and len(ref.name) == len("auto-") + 12


def test_auto_scope_differs_between_characters() -> None:
    seraphina = auto(st_body("Seraphina", greeting=SERAPHINA_GREETING))
    kael = auto(st_body("Kael", greeting=KAEL_GREETING))
    assert seraphina.name != kael.name
    assert kael.label == "Kael"


def test_auto_scope_is_shared_by_new_chats_with_the_same_character() -> None:
    old = auto(st_body(history=[("user", "Hi!"), ("assistant", "Hello."), ("user", "Bye.")]))
    new = auto(st_body(history=[("user", "Good morning.")]))
    assert old.name == new.name


def test_auto_scope_survives_the_app_dropping_the_greeting() -> None:
    # SillyTavern cuts the oldest messages, greeting included, once a chat is long.
    early = auto(st_body(history=[("user", "Hello.")]))
    late = auto(st_body(greeting=None, history=[("user", "Turn 300."), ("assistant", "Ok.")]))
    assert early.name == late.name


def test_auto_scope_without_names_rests_on_the_greeting() -> None:
    # A custom main prompt without names: the greeting identifies the character.
    prompt = "Stay in character. Be vivid."
    first = auto(st_body(main_prompt=prompt, world_info="A"))
    later = auto(
        st_body(
            main_prompt=prompt,
            world_info="B",
            history=[("user", "Hello."), ("assistant", "Hi."), ("user", "More.")],
        )
    )
    other = auto(st_body(main_prompt=prompt, greeting=KAEL_GREETING))
    assert first.name == later.name
    assert other.name != first.name


def test_auto_scope_of_a_plain_script_uses_its_system_prompt() -> None:
    def body(system: str, question: str) -> dict[str, Any]:
        return {
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": question},
            ]
        }

    helper = auto(body("You are a helpful assistant.", "What is 2+2?"))
    assert helper == auto(body("You are a helpful assistant.", "And 3+3?"))
    assert helper.name != auto(body("You are a pirate.", "What is 2+2?")).name
    assert helper.label is None


def test_auto_scope_with_nothing_to_go_on_is_default() -> None:
    ref = auto({"messages": [{"role": "user", "content": "hi"}]})
    assert ref == ScopeRef("default", "auto", None)
    assert auto({}).name == "default"


def test_auto_scope_copes_with_a_lone_surrogate_in_the_body() -> None:
    # json.loads accepts "\ud83d" on its own; a truncated emoji in a greeting is real.
    body = st_body(main_prompt="Stay in character.", greeting="Hi \ud83d")
    assert auto(body).name.startswith("auto-")


def test_auto_scope_of_a_group_chat_is_stable_while_the_speaker_changes() -> None:
    def group_turn(speaker: str) -> dict[str, Any]:
        prompt = (
            f"Write {speaker}'s next reply in a fictional chat between "
            "Seraphina, Kael, and Mira and Alex."
        )
        return st_body(speaker, main_prompt=prompt)

    refs = {auto(group_turn(s)) for s in ("Seraphina", "Kael", "Mira")}
    assert len(refs) == 1
    assert refs.pop().label == "Seraphina, Kael, and Mira"


# -- detect_names ------------------------------------------------------------------


def test_names_from_the_sillytavern_main_prompt() -> None:
    assert detect_names(st_body()["messages"]) == Names("Seraphina", "Alex")


def test_names_with_spaces_and_apostrophes() -> None:
    body = st_body("D'Artagnan", "Mary Jane")
    assert detect_names(body["messages"]) == Names("D'Artagnan", "Mary Jane")
    body = st_body("Hatsune Miku", "User")
    assert detect_names(body["messages"]) == Names("Hatsune Miku", "User")


@pytest.mark.parametrize(
    "prompt",
    [
        "Write Seraphina's next reply in a fictional roleplay chat between Seraphina and Alex.",
        "Write Seraphina’s next reply in a fictional chat between Seraphina and Alex. "
        "Write 1 reply only in internet RP style, italicize actions.",
        "You're Seraphina in this fictional never-ending uncensored roleplay with Alex.",
    ],
)
def test_names_from_common_main_prompt_variants(prompt: str) -> None:
    assert detect_names(st_body(main_prompt=prompt)["messages"]) == Names("Seraphina", "Alex")


@pytest.mark.parametrize(
    "prompt",
    [
        "Write the character's next reply in a fictional chat between the character and the user.",
        "Write Seraphina's next reply in a fictional chat between Seraphina and her friend Alex.",
        "Write {{char}}'s next reply in a fictional chat between {{char}} and {{user}}.",
        "Write Seraphina's next reply in a fictional chat between Kael and Alex.",
        "You are a helpful assistant.",
    ],
)
def test_no_name_rather_than_a_wrong_one(prompt: str) -> None:
    assert detect_names(st_body(main_prompt=prompt)["messages"]) == Names(None, None)


def test_names_from_name_fields_win() -> None:
    messages = [
        {"role": "system", "content": "Be nice."},
        {"role": "assistant", "content": "Hello.", "name": "Seraphina"},
        {"role": "user", "content": "Hi.", "name": "Alex"},
        {"role": "assistant", "content": "How are you?", "name": "Seraphina"},
    ]
    assert detect_names(messages) == Names("Seraphina", "Alex")


def test_group_name_fields_fall_back_to_the_main_prompt() -> None:
    messages = [
        {
            "role": "system",
            "content": "Write Kael's next reply in a fictional chat between "
            "Seraphina, Kael and Alex.",
        },
        {"role": "assistant", "content": "Hello.", "name": "Seraphina"},
        {"role": "assistant", "content": "Evening.", "name": "Kael"},
        {"role": "user", "content": "Hi both.", "name": "Alex"},
    ]
    assert detect_names(messages) == Names("Kael", "Alex")


def test_group_nudge_gives_the_character_only() -> None:
    messages = [
        {"role": "system", "content": "A story."},
        {"role": "user", "content": "Hi."},
        {"role": "system", "content": "[Write the next reply only as Mira.]"},
    ]
    assert detect_names(messages) == Names("Mira", None)


def test_names_are_not_read_from_what_the_user_types() -> None:
    messages = [
        {
            "role": "user",
            "content": "Write Bob's next reply in a fictional chat between Bob and Eve.",
        }
    ]
    assert detect_names(messages) == Names(None, None)
