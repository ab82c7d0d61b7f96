"""The test-only lease TTL and the renew margin (minutes, at least 1): how a Node times renewals."""

from __future__ import annotations

import pytest

from flannelpy.node import renew_timing
from flannelpy.subnet.manager import RENEW_RETRY


@pytest.mark.unprivileged
def test_production_ttl_keeps_the_flag_margin_and_flanneld_retry() -> None:
    assert renew_timing(86400, 3600) == (3600, RENEW_RETRY)


@pytest.mark.unprivileged
@pytest.mark.parametrize("ttl", [5, 10, 15, 60, 3600])
def test_a_ttl_at_or_below_the_margin_renews_at_two_thirds_left(ttl: int) -> None:
    margin, retry = renew_timing(ttl, 3600 if ttl == 3600 else 60)
    assert margin == pytest.approx(ttl * 2 / 3)  # renewed every TTL/3 s
    assert 1.0 <= retry <= max(1.0, ttl / 10)  # a failed renewal leaves several retries before expiry
    assert 0 < margin < ttl  # what SubnetManager accepts
