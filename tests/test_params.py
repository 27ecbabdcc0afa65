"""Notebook parameters from CLIP_* variables: defaults, strict parsing, clear errors."""

from __future__ import annotations

import pytest

from clip_utils.runtime.env import ParameterError, env_flag, env_float, env_int, env_list, env_str


@pytest.mark.parametrize("raw, expected", [("1", True), ("true", True), ("Yes", True), ("ON", True),
                                           ("0", False), ("false", False), ("no", False), ("Off", False)])
def test_flags_accept_the_usual_spellings(monkeypatch, raw, expected):
    monkeypatch.setenv("CLIP_RESUME", raw)
    assert env_flag("CLIP_RESUME") is expected


def test_unset_or_empty_variables_give_the_default(monkeypatch):
    monkeypatch.delenv("CLIP_X", raising=False)
    assert (env_flag("CLIP_X", True), env_int("CLIP_X", 7), env_float("CLIP_X", 0.5), env_str("CLIP_X", "d"),
            env_list("CLIP_X", "a, b")) == (True, 7, 0.5, "d", ["a", "b"])
    monkeypatch.setenv("CLIP_X", "  ")
    assert env_int("CLIP_X", 7) == 7 and env_flag("CLIP_X") is False


def test_lists_drop_spaces_around_items(monkeypatch):
    monkeypatch.setenv("CLIP_DATASETS", " flowers102, cub200 ,")
    assert env_list("CLIP_DATASETS", "x") == ["flowers102", "cub200"]


@pytest.mark.parametrize("parse, raw, words", [
    (env_flag, "maybe", "true"),
    (lambda name: env_int(name, 1), "ten", "whole number"),
    (lambda name: env_int(name, 1), "0", "at least 1"),
    (lambda name: env_float(name, 1.0), "fast", "number"),
    (lambda name: env_float(name, 1.0), "-1e-3", "positive"),
    (lambda name: env_list(name, "a"), ",,", "comma-separated"),
])
def test_bad_values_name_the_variable(monkeypatch, parse, raw, words):
    monkeypatch.setenv("CLIP_Y", raw)
    with pytest.raises(ParameterError, match=words) as err:
        parse("CLIP_Y")
    assert f"CLIP_Y={raw!r}" in str(err.value)
