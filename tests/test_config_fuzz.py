"""The knobs' parsers and the job ad's network type, given anything: a value
or a one-line error naming what is wrong, never another exception
(no root needed)."""

from __future__ import annotations

import string
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from larkns.config import KNOBS, MODES, ConfigError, Settings

# Reproducible in CI: the same examples on every run, nothing kept between runs.
FUZZ = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

_numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["", " ", "0", "-0", "1e999", "nan", "²", "٣", "0x10", "1_000", "9" * 5000]),
)
_networks = st.builds(
    lambda a, b, c, d, n, sep: f"{a}{sep}{b}{sep}{c}{sep}{d}/{n}",
    *[st.integers(-1, 300)] * 4,
    st.integers(-1, 140),
    st.sampled_from([".", ":", "::"]),
)
_values = st.one_of(
    st.text(max_size=64),
    st.text(alphabet=string.printable + "\x00\u2028\x85/=;,-", max_size=64),
    _numbers,
    _networks,
    st.sampled_from(
        [
            *MODES,
            "NAT",
            '"nat"',
            "ifThenElse(",
            'ifThenElse(Owner == "a", "none", "nat")',
            "Campus = 198.18.0.0/16; Campus = ::/0",
            "A = 10.0.0.0/8, 10.1.0.0/16",
            "1024-65535",
            "65535-1024",
            "/",
            "/\x00",
            "\n",
            "a\nb",
        ]
    ),
)


@FUZZ
@given(st.dictionaries(st.sampled_from(KNOBS), _values, min_size=1, max_size=3))
def test_any_knob_values_give_settings_or_a_one_line_error_naming_the_knob(
    knobs: dict[str, str],
) -> None:
    try:
        got = Settings().with_overrides(knobs)
    except ConfigError as e:
        message = str(e)
        assert message and len(message.splitlines()) == 1 and "\n" not in message, message
        assert any(k in message for k in knobs) or "LARKNS_" in message, message
    else:
        assert isinstance(got, Settings)


_attrs = st.sampled_from(["Owner", "LarkNetworkType", "RequestCpus", "X", "undefined"])
_literals = st.one_of(
    st.sampled_from([*MODES, "NAT", "bogus", ""]).map(lambda m: f'"{m}"'),
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["true", "false", "undefined", "error", "1.5", "{}", '{"nat"}', "[]"]),
)
_exprs = st.recursive(
    st.one_of(_literals, _attrs),
    lambda inner: st.one_of(
        st.builds(lambda c, a, b: f"ifThenElse({c}, {a}, {b})", inner, inner, inner),
        st.builds(lambda a, b: f"({a} == {b})", inner, inner),
        st.builds(lambda a, b: f"({a} =?= {b})", inner, inner),
        st.builds(lambda a, b: f"({a} + {b})", inner, inner),
        st.builds(lambda a, b: f"strcat({a}, {b})", inner, inner),
        st.builds(lambda a: f"toLower({a})", inner),
        st.builds(lambda a: f"size({a})", inner),
    ),
    max_leaves=8,
)
_ad_values = st.one_of(
    st.sampled_from([*MODES, "NAT", "bogus", ""]),
    st.text(max_size=20),
    st.integers(-(2**63), 2**63 - 1),
    st.booleans(),
    st.floats(allow_nan=False),
)


@FUZZ
@given(
    st.one_of(_exprs, st.text(max_size=40)),
    st.lists(st.sampled_from(MODES), max_size=4),
    st.dictionaries(_attrs, _ad_values, max_size=4),
    st.dictionaries(_attrs, _exprs, max_size=2),
)
def test_any_job_ad_gives_a_network_type_or_a_one_line_error(
    expression: str,
    allowed: list[str],
    values: dict[str, Any],
    expressions: dict[str, str],
) -> None:
    import classad2

    try:
        s = Settings().with_overrides(
            {"LARKNS_NETWORK_TYPE": expression, "LARKNS_ALLOWED_NETWORK_TYPES": " ".join(allowed)}
        )
    except ConfigError as e:
        assert "LARKNS_NETWORK_TYPE" in str(e) and "\n" not in str(e)
        return
    ad = classad2.ClassAd()
    for k, v in values.items():
        ad[k] = v
    for k, text in expressions.items():
        ad[k] = classad2.ExprTree(text)
    for job in (ad, None):
        try:
            mode = s.job_mode(job)
        except ConfigError as e:
            message = str(e)
            assert "\n" not in message and message.startswith(
                ("LARKNS_NETWORK_TYPE:", "LarkNetworkType:")
            ), message
        else:
            assert mode in MODES
