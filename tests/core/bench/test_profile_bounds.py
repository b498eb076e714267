"""Every number of a machine profile is held to the range a real machine's can have
(:mod:`klotski_tier.core.plausible`): a figure no bench measures is refused in one line that names the
field, its value and the range, whichever field it is."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import typing
from collections.abc import Iterator
from typing import Annotated, Any

import pytest

from klotski_tier.core.bench.profile import MachineProfile
from klotski_tier.core.errors import ConfigError
from klotski_tier.core.plausible import Plausible
from tests.conftest import BENCH_PROFILE

Keys = tuple[str | int, ...]
ABSURD_FLOAT = 1e308
ABSURD_INT = 10**30


def full_profile() -> dict[str, Any]:
    """The test data's CPU profile with every optional part a newer or a CUDA bench writes."""
    data: dict[str, Any] = json.loads(BENCH_PROFILE.read_text())
    data["h2d"] = {"device": "NVIDIA H100", "copy_bytes": 64 << 20, "pinned_gbps": 25.0, "pageable_gbps": 9.0}
    layouts = {"block_bytes": 1 << 20, "queue_depth": 4, "packed_gbps": 1.4, "checkpoint_gbps": 1.3}
    data["drive"]["layouts"] = layouts
    compute = data["compute"]
    compute.update(io_slowdown=0.5, io_read_gbps=1.2, io_alone_s={"1": 0.001}, io_streaming_s={"1": 0.0015})
    return data


def numbers(value: Any, keys: Keys = ()) -> Iterator[Keys]:
    """The keys of every number in the JSON ``value``."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from numbers(item, (*keys, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from numbers(item, (*keys, index))
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield keys


def field_name(keys: Keys) -> str:
    """As the profile's messages name a field: ``reads[3].gbps``, ``compute.expert_s.1``."""
    name = ""
    for key in keys:
        name += f"[{key}]" if isinstance(key, int) else f".{key}" if name else key
    return name


def edited(data: dict[str, Any], keys: Keys, value: Any) -> dict[str, Any]:
    copied = copy.deepcopy(data)
    holder: Any = copied
    for key in keys[:-1]:
        holder = holder[key]
    holder[keys[-1]] = value
    return copied


def test_the_full_profile_loads() -> None:
    MachineProfile.from_json(full_profile())


NUMBERS = [keys for keys in numbers(full_profile()) if keys != ("version",)]  # a version is compared


@pytest.mark.parametrize("keys", NUMBERS, ids=field_name)
def test_every_number_beyond_its_range_is_refused_naming_the_field(keys: Keys) -> None:
    data = full_profile()
    original: Any = data
    for key in keys:
        original = original[key]
    absurd = ABSURD_INT if isinstance(original, int) else ABSURD_FLOAT
    with pytest.raises(ConfigError) as caught:
        MachineProfile.from_json(edited(data, keys, absurd), "machine profile p.json")
    message = str(caught.value)
    assert message.startswith(f"machine profile p.json: field {field_name(keys)} is ")
    assert "not a plausible measurement (" in message and "\n" not in message
    assert message.endswith("run `klotski-tier bench` to write a new one")


def test_a_drive_at_1e308_gbps_names_the_field_its_value_and_the_range() -> None:
    data = edited(full_profile(), ("drive", "raw_gbps"), 1e308)
    with pytest.raises(ConfigError, match=r"field drive\.raw_gbps is 1e\+308 GB/s, not a plausible "
                       r"measurement \(0.001 GB/s <= x <= 10000 GB/s\)"):  # fmt: skip
        MachineProfile.from_json(data)


def test_a_token_count_beyond_any_measurement_is_refused() -> None:
    data = full_profile()
    data["compute"]["expert_s"][str(ABSURD_INT)] = 0.01
    phrase = f"field compute.expert_s.{ABSURD_INT} is {ABSURD_INT:g}, not a plausible measurement"
    with pytest.raises(ConfigError, match=re.escape(phrase)):
        MachineProfile.from_json(data)


def numeric_fields(kind: type, where: str = "") -> Iterator[tuple[str, Any]]:
    """Every int or float of the dataclass ``kind`` (dict keys and values included), with its type."""
    for item in dataclasses.fields(kind):
        hint = typing.get_type_hints(kind, include_extras=True)[item.name]
        yield from _numeric(hint, f"{where}{item.name}")


def _numeric(hint: Any, where: str) -> Iterator[tuple[str, Any]]:
    base = typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint
    if base in (int, float):
        yield where, hint
    elif dataclasses.is_dataclass(base):
        yield from numeric_fields(base, f"{where}.")  # type: ignore[arg-type]
    else:
        for arg in typing.get_args(hint):
            yield from _numeric(arg, where)


def test_every_number_of_the_schema_declares_its_range() -> None:
    """A new numeric field without a range fails here, not only when a profile that has it is read."""
    fields = list(numeric_fields(MachineProfile))
    assert len(fields) > 40
    for where, hint in fields:
        assert typing.get_origin(hint) is Annotated, f"{where} has no plausible range"
        assert any(isinstance(meta, Plausible) for meta in hint.__metadata__), where
