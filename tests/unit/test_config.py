"""Unit tests for runtime.config: defaults, every variable's rules, parsers, and the msgpack form.

GIE scenarios 36 (defaults) and 37 (GC timeout validation) from reference.md §9 are covered by
``test_defaults_with_empty_environ`` and the ``test_scenario_37_*`` tests.
"""

from __future__ import annotations

import grp
import os
from collections.abc import Iterator, Mapping

import msgspec
import pytest

from runtime import config
from runtime.config import (
    VARIABLES,
    BandSpec,
    Config,
    ConfigError,
    band_capacity,
    describe_variables,
    format_duration,
    format_size,
    load,
    parse_duration,
    parse_size,
)

GB = 1_000_000_000
MIB = 1024 * 1024


def _current_group() -> grp.struct_group:
    return grp.getgrgid(os.getgid())


def _missing_gid() -> int:
    return max(group.gr_gid for group in grp.getgrall()) + 1000


def assert_config_error(environ: Mapping[str, str], *fragments: str) -> str:
    """Loads ``environ``, expects a one-line ConfigError containing every fragment."""
    with pytest.raises(ConfigError) as caught:
        load(environ)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# --- defaults -------------------------------------------------------------------------------


def test_defaults_with_empty_environ() -> None:
    cfg = load({})
    # GIE scenario 36 (shard count differs by design: bandgate defaults to the available CPUs).
    assert cfg.flow_gc_timeout == 5 * 60
    assert cfg.band_gc_timeout == 10 * 60
    assert cfg.ordering == "fcfs"
    assert cfg.fairness == "global-strict"
    assert cfg.band_max_bytes == GB
    assert cfg.max_bytes == 0
    # bandgate's own defaults.
    expected_shards = min(config.available_cpus(), config.MAX_MAX_SHARDS)
    assert cfg.shards == expected_shards
    assert cfg.max_shards == max(config.MIN_MAX_SHARDS, expected_shards)
    assert cfg.socket_dir == f"/tmp/bandgate-{os.getuid()}"
    assert cfg.max_inflight == config.DEFAULT_MAX_INFLIGHT == 100
    assert cfg.bands == ()
    assert cfg.default_ttl == 0
    assert cfg.gc_interval == config.MAX_GC_INTERVAL  # flow timeout / 4, clamped
    assert cfg.gc_prepare_timeout == 2
    assert cfg.max_flows == 65536
    assert cfg.max_bands == 256
    assert cfg.max_frame == 65536
    assert cfg.shutdown_timeout == 10
    assert cfg.socket_group == ""
    assert cfg.log_level == "INFO"


def test_load_none_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith(config.ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.setenv("BANDGATE_LOG_LEVEL", "debug")
    assert load().log_level == "DEBUG"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"XDG_RUNTIME_DIR": "/run/user/1000"}, "/run/user/1000/bandgate"),
        ({"XDG_RUNTIME_DIR": ""}, f"/tmp/bandgate-{os.getuid()}"),
        ({"XDG_RUNTIME_DIR": "  "}, f"/tmp/bandgate-{os.getuid()}"),
        ({}, f"/tmp/bandgate-{os.getuid()}"),
    ],
)
def test_default_socket_dir(environ: dict[str, str], expected: str) -> None:
    assert config.default_socket_dir(environ) == expected
    assert load(environ).socket_dir == expected


# --- GIE scenario 37: GC timeouts -----------------------------------------------------------


def test_scenario_37_band_gc_below_flow_gc_names_both() -> None:
    assert_config_error(
        {"BANDGATE_BAND_GC_TIMEOUT": "5m", "BANDGATE_FLOW_GC_TIMEOUT": "10m"},
        "BANDGATE_BAND_GC_TIMEOUT='5m'",
        "BANDGATE_FLOW_GC_TIMEOUT='10m'",
    )


def test_scenario_37_band_gc_below_default_flow_gc() -> None:
    assert_config_error(
        {"BANDGATE_BAND_GC_TIMEOUT": "1m"},
        "BANDGATE_BAND_GC_TIMEOUT='1m'",
        "BANDGATE_FLOW_GC_TIMEOUT=5m (default)",
    )


def test_scenario_37_equal_timeouts_ok() -> None:
    cfg = load({"BANDGATE_BAND_GC_TIMEOUT": "10m", "BANDGATE_FLOW_GC_TIMEOUT": "600"})
    assert cfg.flow_gc_timeout == cfg.band_gc_timeout == 600


@pytest.mark.parametrize("name", ["BANDGATE_FLOW_GC_TIMEOUT", "BANDGATE_BAND_GC_TIMEOUT"])
@pytest.mark.parametrize("value", ["-1s", "-5m", "0", "0s", "0ms"])
def test_scenario_37_negative_or_zero_timeout(name: str, value: str) -> None:
    assert_config_error({name: value}, f"{name}={value!r}")


def test_band_gc_default_follows_flow_gc() -> None:
    cfg = load({"BANDGATE_FLOW_GC_TIMEOUT": "1h"})
    assert cfg.band_gc_timeout == config.BAND_GC_TIMEOUT_FACTOR * 3600


@pytest.mark.parametrize(
    ("flow", "interval"),
    [
        ("1h", config.MAX_GC_INTERVAL),
        ("1s", 0.25),
        ("10ms", config.MIN_GC_INTERVAL),
        ("1ms", 0.001),  # never longer than the flow timeout itself
    ],
)
def test_gc_interval_default(flow: str, interval: float) -> None:
    assert load({"BANDGATE_FLOW_GC_TIMEOUT": flow}).gc_interval == interval


def test_gc_interval_longer_than_flow_gc_names_both() -> None:
    assert_config_error(
        {"BANDGATE_GC_INTERVAL": "2s", "BANDGATE_FLOW_GC_TIMEOUT": "1s"},
        "BANDGATE_GC_INTERVAL='2s'",
        "BANDGATE_FLOW_GC_TIMEOUT='1s'",
    )


# --- every variable: good values ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "field", "expected"),
    [
        ("BANDGATE_SOCKET_DIR", "/var/run/bg", "socket_dir", "/var/run/bg"),
        ("BANDGATE_SOCKET_DIR", "  /var/run/bg \n", "socket_dir", "/var/run/bg"),
        ("BANDGATE_SHARDS", "1", "shards", 1),
        ("BANDGATE_SHARDS", " 12 ", "shards", 12),
        ("BANDGATE_SHARDS", "40", "max_shards", 40),
        ("BANDGATE_MAX_SHARDS", "1024", "max_shards", 1024),
        ("BANDGATE_MAX_INFLIGHT", "0", "max_inflight", 0),
        ("BANDGATE_MAX_INFLIGHT", "2147483647", "max_inflight", 2**31 - 1),
        ("BANDGATE_MAX_BYTES", "0", "max_bytes", 0),
        ("BANDGATE_MAX_BYTES", "10GB", "max_bytes", 10 * GB),
        ("BANDGATE_MAX_BYTES", "512MiB", "max_bytes", 512 * MIB),
        ("BANDGATE_BANDS", "", "bands", ()),
        ("BANDGATE_BANDS", "  ", "bands", ()),
        ("BANDGATE_BANDS", "hi:1", "bands", (BandSpec("hi", 1, 0),)),
        ("BANDGATE_BAND_MAX_BYTES", "1", "band_max_bytes", 1),
        ("BANDGATE_BAND_MAX_BYTES", "2g", "band_max_bytes", 2 * GB),
        ("BANDGATE_FAIRNESS", "round-robin", "fairness", "round-robin"),
        ("BANDGATE_FAIRNESS", " Global-Strict ", "fairness", "global-strict"),
        ("BANDGATE_ORDERING", "edf", "ordering", "edf"),
        ("BANDGATE_ORDERING", "FCFS", "ordering", "fcfs"),
        ("BANDGATE_DEFAULT_TTL", "0", "default_ttl", 0.0),
        ("BANDGATE_DEFAULT_TTL", "1.5s", "default_ttl", 1.5),
        ("BANDGATE_FLOW_GC_TIMEOUT", "250ms", "flow_gc_timeout", 0.25),
        ("BANDGATE_BAND_GC_TIMEOUT", "1h", "band_gc_timeout", 3600.0),
        ("BANDGATE_GC_INTERVAL", "5m", "gc_interval", 300.0),
        ("BANDGATE_GC_INTERVAL", "0.005", "gc_interval", 0.005),
        ("BANDGATE_GC_PREPARE_TIMEOUT", "500ms", "gc_prepare_timeout", 0.5),
        ("BANDGATE_MAX_FLOWS", "16", "max_flows", 16),
        ("BANDGATE_MAX_FLOWS", "4194304", "max_flows", 4_194_304),
        ("BANDGATE_MAX_BANDS", "1", "max_bands", 1),
        ("BANDGATE_MAX_BANDS", "65536", "max_bands", 65536),
        ("BANDGATE_MAX_FRAME", "4096", "max_frame", 4096),
        ("BANDGATE_MAX_FRAME", "16MiB", "max_frame", 16 * MIB),
        ("BANDGATE_MAX_FRAME", "1mb", "max_frame", 1_000_000),
        ("BANDGATE_SHUTDOWN_TIMEOUT", "30", "shutdown_timeout", 30.0),
        ("BANDGATE_SOCKET_GROUP", "", "socket_group", ""),
        ("BANDGATE_SOCKET_GROUP", str(os.getgid()), "socket_group", str(os.getgid())),
        (
            "BANDGATE_SOCKET_GROUP",
            _current_group().gr_name,
            "socket_group",
            _current_group().gr_name,
        ),
        ("BANDGATE_LOG_LEVEL", "debug", "log_level", "DEBUG"),
        ("BANDGATE_LOG_LEVEL", "Warning", "log_level", "WARNING"),
        ("BANDGATE_LOG_LEVEL", "ERROR", "log_level", "ERROR"),
    ],
)
def test_good_value(name: str, value: str, field: str, expected: object) -> None:
    assert getattr(load({name: value}), field) == expected


# --- every variable: bad values -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BANDGATE_SOCKET_DIR", ""),
        ("BANDGATE_SOCKET_DIR", "relative/dir"),
        ("BANDGATE_SOCKET_DIR", "/" + "d" * config.MAX_SOCKET_DIR_BYTES),
        ("BANDGATE_SHARDS", ""),
        ("BANDGATE_SHARDS", "0"),
        ("BANDGATE_SHARDS", "-1"),
        ("BANDGATE_SHARDS", "+2"),
        ("BANDGATE_SHARDS", "1_000"),
        ("BANDGATE_SHARDS", "2.0"),
        ("BANDGATE_SHARDS", "four"),
        ("BANDGATE_SHARDS", "1025"),
        ("BANDGATE_SHARDS", "9" * 5000),
        ("BANDGATE_MAX_SHARDS", "0"),
        ("BANDGATE_MAX_SHARDS", "1025"),
        ("BANDGATE_MAX_INFLIGHT", "-1"),
        ("BANDGATE_MAX_INFLIGHT", "2147483648"),
        ("BANDGATE_MAX_INFLIGHT", "lots"),
        ("BANDGATE_MAX_BYTES", "-1"),
        ("BANDGATE_MAX_BYTES", "10XB"),
        ("BANDGATE_MAX_BYTES", "9223372036854775808"),
        ("BANDGATE_BANDS", "critical"),
        ("BANDGATE_BAND_MAX_BYTES", "0"),
        ("BANDGATE_BAND_MAX_BYTES", "1.5"),
        ("BANDGATE_BAND_MAX_BYTES", ""),
        ("BANDGATE_FAIRNESS", "global_strict"),
        ("BANDGATE_FAIRNESS", ""),
        ("BANDGATE_ORDERING", "lifo"),
        ("BANDGATE_DEFAULT_TTL", "-1"),
        ("BANDGATE_DEFAULT_TTL", "abc"),
        ("BANDGATE_DEFAULT_TTL", "5 minutes"),
        ("BANDGATE_FLOW_GC_TIMEOUT", "abc"),
        ("BANDGATE_FLOW_GC_TIMEOUT", "1d"),
        ("BANDGATE_FLOW_GC_TIMEOUT", "1e3"),
        ("BANDGATE_BAND_GC_TIMEOUT", "inf"),
        ("BANDGATE_GC_INTERVAL", "0"),
        ("BANDGATE_GC_INTERVAL", "10m"),
        ("BANDGATE_GC_PREPARE_TIMEOUT", "0"),
        ("BANDGATE_GC_PREPARE_TIMEOUT", "nan"),
        ("BANDGATE_MAX_FLOWS", "15"),
        ("BANDGATE_MAX_FLOWS", "4194305"),
        ("BANDGATE_MAX_FLOWS", "64k"),
        ("BANDGATE_MAX_BANDS", "0"),
        ("BANDGATE_MAX_BANDS", "65537"),
        ("BANDGATE_MAX_FRAME", "4095"),
        ("BANDGATE_MAX_FRAME", "17MiB"),
        ("BANDGATE_MAX_FRAME", "big"),
        ("BANDGATE_SHUTDOWN_TIMEOUT", "0"),
        ("BANDGATE_SHUTDOWN_TIMEOUT", "-10s"),
        ("BANDGATE_SOCKET_GROUP", "bandgate-no-such-group-x9"),
        ("BANDGATE_SOCKET_GROUP", str(_missing_gid())),
        ("BANDGATE_SOCKET_GROUP", "9" * 30),
        ("BANDGATE_LOG_LEVEL", "TRACE"),
        ("BANDGATE_LOG_LEVEL", "warn"),
        ("BANDGATE_LOG_LEVEL", "INFO\nBANDGATE_SHARDS=1"),
    ],
)
def test_bad_value_is_one_line_naming_variable_and_value(name: str, value: str) -> None:
    message = assert_config_error({name: value}, f"{name}={value!r}", "expected")
    assert message.startswith(f"{name}=")


def test_duration_error_message_shows_examples() -> None:
    message = assert_config_error({"BANDGATE_FLOW_GC_TIMEOUT": "abc"})
    assert message == (
        "BANDGATE_FLOW_GC_TIMEOUT='abc': expected a duration greater than 0, "
        "such as 0.5, 250ms, 30s, 5m or 1h"
    )


def test_choice_error_suggests_closest() -> None:
    assert_config_error({"BANDGATE_FAIRNESS": "round_robin"}, "did you mean 'round-robin'?")
    assert_config_error({"BANDGATE_LOG_LEVEL": "infoo"}, "did you mean 'INFO'?")


# --- cross-variable rules -------------------------------------------------------------------


def test_shards_above_max_shards_names_both() -> None:
    assert_config_error(
        {"BANDGATE_SHARDS": "8", "BANDGATE_MAX_SHARDS": "4"},
        "BANDGATE_SHARDS='8'",
        "BANDGATE_MAX_SHARDS='4'",
    )


def test_shards_equal_max_shards_ok() -> None:
    cfg = load({"BANDGATE_SHARDS": "4", "BANDGATE_MAX_SHARDS": "4"})
    assert (cfg.shards, cfg.max_shards) == (4, 4)


def test_explicit_max_shards_caps_default_shards() -> None:
    cfg = load({"BANDGATE_MAX_SHARDS": "1"})
    assert (cfg.shards, cfg.max_shards) == (1, 1)


def test_max_bands_must_exceed_static_bands() -> None:
    bands = "a:3,b:2,c:1"
    assert_config_error(
        {"BANDGATE_BANDS": bands, "BANDGATE_MAX_BANDS": "3"}, "BANDGATE_MAX_BANDS='3'", "4"
    )
    assert load({"BANDGATE_BANDS": bands, "BANDGATE_MAX_BANDS": "4"}).max_bands == 4


def test_too_many_static_bands_for_default_max_bands() -> None:
    bands = ",".join(f"b{i}:{i}" for i in range(config.DEFAULT_MAX_BANDS))
    assert_config_error({"BANDGATE_BANDS": bands}, "BANDGATE_BANDS=", "BANDGATE_MAX_BANDS")


# --- BANDGATE_BANDS -------------------------------------------------------------------------


def test_bands_parsed_and_sorted_highest_first() -> None:
    cfg = load({"BANDGATE_BANDS": " sheddable:-100 , critical:100:10MB,standard:0 "})
    assert cfg.bands == (
        BandSpec("critical", 100, 10_000_000),
        BandSpec("standard", 0, 0),
        BandSpec("sheddable", -100, 0),
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a:+5", BandSpec("a", 5, 0)),
        ("a.b-c_D9:-2147483648", BandSpec("a.b-c_D9", -(2**31), 0)),
        ("a:2147483647:0", BandSpec("a", 2**31 - 1, 0)),
        ("a : 1 : 64KiB", BandSpec("a", 1, 65536)),
        ("\ta:1\n", BandSpec("a", 1, 0)),
        ("x" * 64 + ":1", BandSpec("x" * 64, 1, 0)),
    ],
)
def test_band_item_good(value: str, expected: BandSpec) -> None:
    assert load({"BANDGATE_BANDS": value}).bands == (expected,)


@pytest.mark.parametrize(
    ("value", "item", "fragment"),
    [
        ("a:1,a:2", "a:2", "band name 'a' already used by 'a:1'"),
        ("a:1, b:1", "b:1", "priority 1 already used by 'a:1'"),
        ("a:1,b:01", "b:01", "priority 1 already used"),
        ("a:high", "a:high", "priority 'high': expected an integer"),
        ("a:1.5", "a:1.5", "expected an integer"),
        ("a:2147483648", "a:2147483648", "32-bit"),
        ("a:-2147483649", "a:-2147483649", "32-bit"),
        ("a:1:lots", "a:1:lots", "max_bytes 'lots'"),
        ("a:1:-5", "a:1:-5", "max_bytes '-5'"),
        ("a:1:9223372036854775808", "a:1:9223372036854775808", "max_bytes"),
        ("a", "a", "name:priority"),
        ("a:1:2:3", "a:1:2:3", "name:priority"),
        ("a:1,,b:2", "", "name:priority"),
        ("a:1,", "", "name:priority"),
        (":1", ":1", "band name"),
        ("a b:1", "a b:1", "band name"),
        ("crit/cal:1", "crit/cal:1", "band name"),
        ("x" * 65 + ":1", "x" * 65 + ":1", "band name"),
    ],
)
def test_band_item_bad(value: str, item: str, fragment: str) -> None:
    assert_config_error(
        {"BANDGATE_BANDS": value}, f"BANDGATE_BANDS={value!r}", f"item {item!r}", fragment
    )


def test_band_capacity() -> None:
    cfg = load(
        {"BANDGATE_BANDS": "big:10:5GB,plain:5", "BANDGATE_BAND_MAX_BYTES": "2GB"},
    )
    assert band_capacity(cfg, 10) == 5 * GB
    assert band_capacity(cfg, 5) == 2 * GB  # static band without its own limit
    assert band_capacity(cfg, 7) == 2 * GB  # dynamic band


# --- unknown names --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("BANDGATE_SHARD", "BANDGATE_SHARDS"),
        ("BANDGATE_FLOW_GC_TIMOUT", "BANDGATE_FLOW_GC_TIMEOUT"),
        ("BANDGATE_LOGLEVEL", "BANDGATE_LOG_LEVEL"),
        ("bandgate_shards", "BANDGATE_SHARDS"),
        ("BANDGATE_MAXFRAME", "BANDGATE_MAX_FRAME"),
    ],
)
def test_unknown_variable_suggests_closest(name: str, suggestion: str) -> None:
    message = assert_config_error({name: "1"}, f"{name}='1'", f"did you mean {suggestion}?")
    assert message.startswith(name)


def test_unknown_variable_always_gets_a_suggestion() -> None:
    message = assert_config_error({"BANDGATE_FOO": "x"}, "BANDGATE_FOO='x'", "did you mean")
    suggested = message.split("did you mean ")[1].split("?")[0]
    assert suggested in {variable.name for variable in VARIABLES}


def test_other_variables_are_ignored() -> None:
    assert load({"PATH": "/bin", "BANDGATEWAY": "x", "MY_BANDGATE_X": "y"}) == load({})


# --- parsers and formatters -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("0.5", 0.5),
        (".5", 0.5),
        ("2", 2.0),
        ("250ms", 0.25),
        ("30s", 30.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("0.1h", 360.0),
        (" 30 s ", 30.0),
    ],
)
def test_parse_duration_good(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["", " ", "-1", "-0.5s", "abc", "5x", "1d", "5M", "1S", "1e3", "inf", "nan", "1m30s", "s",
     "1 000", "+1s", "1.2.3s", "9" * 400],
)  # fmt: skip
def test_parse_duration_bad(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("1024", 1024),
        ("10B", 10),
        ("10KB", 10_000),
        ("10kb", 10_000),
        ("10k", 10_000),
        ("10MB", 10_000_000),
        ("10m", 10_000_000),
        ("1GB", GB),
        ("1g", GB),
        ("10KiB", 10 * 1024),
        ("10kib", 10 * 1024),
        ("2MiB", 2 * MIB),
        ("1GiB", 1024 * MIB),
        ("4Ki", 4096),
        ("1.5KB", 1500),
        ("0.5KiB", 512),
        (" 64 KiB ", 65536),
    ],
)
def test_parse_size_good(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text",
    ["", "-1", "-1KB", "abc", "10XB", "10TB", "1.5", "0.3B", "1e3", "KB", "1_000", "+5", "1,000"],
)
def test_parse_size_bad(text: str) -> None:
    with pytest.raises(ValueError, match=r"size|bytes"):
        parse_size(text)


@pytest.mark.parametrize(
    "seconds", [0.0, 0.001, 0.005, 0.25, 1.5, 2.0, 30.0, 90.0, 300.0, 3600.0, 7200.0, 1e-7]
)
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0"), (1000, "1KB"), (1023, "1023"), (65536, "64KiB"), (16 * MIB, "16MiB"), (GB, "1GB")],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text
    assert parse_size(text) == size


# --- transport and documentation ------------------------------------------------------------


def test_config_round_trips_through_msgpack() -> None:
    cfg = load(
        {
            "BANDGATE_BANDS": "critical:100:1MiB,standard:0,sheddable:-100",
            "BANDGATE_DEFAULT_TTL": "1.5s",
            "BANDGATE_SOCKET_DIR": "/run/bandgate",
        }
    )
    data = msgspec.msgpack.encode(cfg)
    decoded = msgspec.msgpack.Decoder(Config).decode(data)
    assert decoded == cfg
    assert isinstance(decoded.bands, tuple)
    assert isinstance(decoded.bands[0], BandSpec)


def test_variables_match_config_fields_one_to_one() -> None:
    names = [variable.name for variable in VARIABLES]
    assert len(names) == len(set(names))
    fields = [name.removeprefix(config.ENV_PREFIX).lower() for name in names]
    assert fields == list(Config.__struct_fields__)


def test_describe_variables_mentions_every_variable() -> None:
    text = describe_variables()
    for variable in VARIABLES:
        assert variable.name in text
        assert variable.default in text
    header, *lines = text.splitlines()
    default_column = header.index("DEFAULT")
    help_column = header.index("DESCRIPTION")
    rows = [line for line in lines if line.startswith(config.ENV_PREFIX)]
    assert [row[:default_column].rstrip() for row in rows] == [v.name for v in VARIABLES]
    assert [row[default_column:help_column].rstrip() for row in rows] == [
        v.default for v in VARIABLES
    ]
    for line in lines:
        # Every description line, first or wrapped, starts in the description column.
        assert line[help_column - 1] == " "
        assert line[help_column] != " "
        assert line.startswith(config.ENV_PREFIX) or not line[:help_column].strip()


class RecordingEnv(Mapping[str, str]):
    """A mapping that records every key looked up."""

    def __init__(self, data: dict[str, str]) -> None:
        self.data = data
        self.looked_up: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.looked_up.add(key)
        return self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


def test_load_reads_exactly_the_variables() -> None:
    env = RecordingEnv({"PATH": "/bin"})
    load(env)
    read = {key for key in env.looked_up if key.upper().startswith(config.ENV_PREFIX)}
    assert read == {variable.name for variable in VARIABLES}


@pytest.mark.parametrize("variable", VARIABLES, ids=lambda variable: variable.name)
def test_every_variable_is_validated(variable: config.Variable) -> None:
    # A value no variable accepts proves load() reads and validates this name.
    assert_config_error({variable.name: "?bad value?"}, f"{variable.name}='?bad value?'")
